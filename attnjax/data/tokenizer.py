"""SentencePiece subword vocabularies for real text.

`train_vocab(texts, path, vocab_size=...)` trains a SentencePiece model on
`texts` and writes it to `path`; `SubwordVocab(path)` loads one. The ids
agree with `attnjax.data.vocab`: 0 = PAD, 1 = BOS, 2 = EOS, then 3 = UNK and
the pieces, so `ids != PAD_ID` is the length mask as for the synthetic tasks.

A vocabulary is identified by the SHA-256 of its model file (`digest`); a
training run records the digests of its vocabularies so that a checkpoint is
never decoded with a tokenizer it was not trained with.
"""

import hashlib
import io
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from attnjax.data.vocab import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, text_ids

UNK_ID = NUM_SPECIAL
MODEL_TYPES = ('unigram', 'bpe')


def train_vocab(
  texts: Iterable[str],
  path: str | os.PathLike,
  *,
  vocab_size: int,
  model_type: str = 'unigram',
  character_coverage: float = 1.0,
) -> 'SubwordVocab':
  """Trains a SentencePiece model on `texts` and saves it at `path`.

  Training is single-threaded, so the same texts give the same model file.

  Args:
    texts: the training sentences, one string each.
    path: the model file to write (its directory is created).
    vocab_size: ids in all, the 4 special ones included.
    model_type: 'unigram' or 'bpe'.
    character_coverage: the share of characters the pieces must cover; the
      rest map to UNK (1.0 for small alphabets, 0.9995 for Chinese).

  Raises:
    ValueError: bad arguments, or texts too few for `vocab_size` pieces
      (SentencePiece's message says how many it could make).
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(
      f'model_type must be one of {MODEL_TYPES}; got {model_type!r}.'
    )
  if not isinstance(vocab_size, int) or vocab_size <= NUM_SPECIAL + 1:
    raise ValueError(
      f'vocab_size must be an integer > {NUM_SPECIAL + 1} (the special ids '
      f'PAD, BOS, EOS and UNK come first); got {vocab_size!r}.'
    )
  if not 0 < character_coverage <= 1:
    raise ValueError(
      f'character_coverage must be in (0, 1]; got {character_coverage}.'
    )
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      pad_id=PAD_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      # No NFKC: decoded text must match the raw references BLEU compares
      # it with (NFKC turns Chinese full-width punctuation into ASCII).
      normalization_rule_name='identity',
      num_threads=1,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(
      f'SentencePiece could not train a {vocab_size}-piece vocabulary '
      f'({e}); set the vocabulary size within the bounds it names.'
    ) from e
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written whole or not at all: a reader never sees half a model.
  partial = path.with_name(path.name + '.partial')
  partial.write_bytes(model.getvalue())
  os.replace(partial, path)
  return SubwordVocab(path)


class SubwordVocab:
  """A SentencePiece model with attnjax's special ids.

  Has the interface of `attnjax.data.vocab.CharVocab` that the training code
  uses (`size`, `encode`, `decode`) plus `pieces` for plot labels.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(
        f'no SentencePiece model at {self.path}; train.py writes one into '
        'the workdir when it starts.'
      )
    proto = self.path.read_bytes()
    self.digest = hashlib.sha256(proto).hexdigest()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except RuntimeError as e:
      raise ValueError(
        f'{self.path} is not a SentencePiece model ({e}).'
      ) from e
    ids = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())
    if ids != (PAD_ID, BOS_ID, EOS_ID) or self._sp.unk_id() != UNK_ID:
      raise ValueError(
        f'{self.path} has the special ids (pad, bos, eos, unk) = '
        f'{(*ids, self._sp.unk_id())}; attnjax needs '
        f'{(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}. Train it with '
        'attnjax.data.tokenizer.train_vocab.'
      )

  @property
  def size(self) -> int:
    """Number of ids, the special ones included."""
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without BOS or EOS (unknown characters -> UNK)."""
    return self._sp.encode(text)

  def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text, in one call (much faster for many)."""
    return self._sp.encode(list(texts))

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The detokenised text of `ids` (see `attnjax.data.vocab.text_ids`)."""
    return self._sp.decode(text_ids(ids))

  def pieces(self, ids: Iterable[int] | np.ndarray) -> list[str]:
    """One piece per id, e.g. ['▁Zwei', '▁Hunde', '.'] (for plot labels)."""
    return [self._sp.id_to_piece(i) for i in np.asarray(ids).reshape(-1)]

  def __eq__(self, other: object) -> bool:
    return isinstance(other, SubwordVocab) and other.digest == self.digest

  def __hash__(self) -> int:
    return hash(('SubwordVocab', self.digest))

  def __repr__(self) -> str:
    return f'SubwordVocab({str(self.path)!r}, size={self.size})'
