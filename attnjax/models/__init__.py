"""The models built on attnjax's layers, one file each."""

from attnjax.models.seq2seq import (
  CELLS,
  DECODERS,
  ChoDecoder,
  Decoder,
  Encoder,
  Seq2Seq,
  Seq2SeqConfig,
  SutskeverDecoder,
)
from attnjax.models.transformer import Transformer, TransformerConfig

__all__ = [
  'CELLS',
  'DECODERS',
  'ChoDecoder',
  'Decoder',
  'Encoder',
  'Seq2Seq',
  'Seq2SeqConfig',
  'SutskeverDecoder',
  'Transformer',
  'TransformerConfig',
]
