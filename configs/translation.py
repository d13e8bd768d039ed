"""Fields shared by the translation configs (multi30k_*.py, anki_*.py,
text_transformer.py).

`get_config(task, model)` starts from `base.get_base_config()` (optimiser,
loop, mesh), replaces `config.data` with the translation data fields and
`config.model` with the Transformer's or the RNN's; every field is commented
here. The experiment configs set what they change.
"""

import ml_collections

from configs import base


def data_config(task: str) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  # multi30k (de->en), anki_fra (en->fr), anki_cmn (en->zh), parallel_text.
  data.task = task
  data.reverse = False  # Translate the other way.
  data.source_dir = ''  # Raw files ('' = $ATTNJAX_DATA_DIR, or download).
  data.languages = ()  # parallel_text only: (source, target), e.g. de,en.
  # Where TFDS writes prepared splits ('' = its default; for parallel_text,
  # WORKDIR/tfds).
  data.tfds_dir = ''
  data.train_split = 'train'  # TFDS split expression, e.g. 'train[:2000]'.
  data.vocab_size = 8000  # SentencePiece ids per vocabulary (4 special).
  data.joint_vocab = True  # One vocabulary for both languages.
  data.vocab_model_type = 'unigram'  # SentencePiece 'unigram' or 'bpe'.
  data.character_coverage = 1.0  # Characters the pieces must cover.
  data.max_source_len = 64  # Longest source (tokens); longer pairs skipped.
  data.max_target_len = 64  # Longest target with EOS; also decode length.
  data.buckets = (14, 18, 24, 32, 64)  # Padded lengths of training batches.
  data.long_input = 'error'  # Over-long decode input: 'error' or 'truncate'.
  data.on_bad_utf8 = 'error'  # Non-UTF-8 raw lines: 'error' or 'skip'.
  data.on_bad_line = 'error'  # Malformed anki lines: 'error' or 'skip'.
  data.seed = 0  # Shuffling seed.
  data.heldout_size = 100_000  # Validation pairs scored during training.
  data.bleu_tokenize = ''  # sacreBLEU tokeniser ('' = zh or 13a by target).
  return data


def transformer_config() -> ml_collections.ConfigDict:
  """The base Transformer of the PyTorch Multi30k tutorial's size."""
  model = ml_collections.ConfigDict()
  model.architecture = 'transformer'  # 'transformer' or 'rnn'.
  model.d_model = 256  # Embedding and layer width.
  model.num_heads = 8  # Attention heads.
  model.num_encoder_layers = 3  # Encoder layers.
  model.num_decoder_layers = 3  # Decoder layers.
  model.mlp_dim = 512  # Feed-forward hidden width.
  model.dropout_rate = 0.1  # Embedding and sublayer-output dropout.
  model.attention_dropout_rate = 0.0  # Dropout on attention weights.
  model.mlp_dropout_rate = 0.0  # Dropout inside the feed-forward networks.
  model.positions = 'sinusoidal'  # 'sinusoidal' or 'learned'.
  model.pre_ln = False  # Layer norm before sublayers (else after, as paper).
  model.share_embeddings = True  # Source/target/output embeddings tied.
  model.score = 'scaled_dot'  # Any attnjax.scores name but location ones.
  model.dtype = 'float32'  # Computation dtype.
  model.matmul_dtype = 'float32'  # Dense products' operands: or 'bfloat16'.
  return model


def get_config(task: str, model: str) -> ml_collections.ConfigDict:
  """`model`: 'transformer', or 'bahdanau' (bi-GRU encoder, GRU decoder,
  additive attention)."""
  config = base.get_base_config()
  config.data = data_config(task)
  if model == 'transformer':
    config.model = transformer_config()
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-9
  else:
    config.model.decoder = 'bahdanau'
    config.model.cell = 'gru'
    config.model.bidirectional = True
    config.model.embed_dim = 256
    config.model.hidden_dim = 512
    config.model.dropout_rate = 0.3
  config.label_smoothing = 0.1  # Of the cross-entropy.
  config.eval_batch_size = 256  # Validation decoding batch.
  return config


def make_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The test variant: 2,000 training pairs, a 400-piece vocabulary, a tiny
  model, 20 steps."""
  config.data.train_split = 'train[:2000]'
  config.data.vocab_size = 400
  config.data.max_source_len = 48
  config.data.max_target_len = 48
  config.data.buckets = (24, 48)
  config.data.heldout_size = 16
  if config.model.get('architecture') == 'transformer':
    config.model.d_model = 16
    config.model.num_heads = 2
    config.model.num_encoder_layers = 1
    config.model.num_decoder_layers = 1
    config.model.mlp_dim = 32
  else:
    config.model.embed_dim = 8
    config.model.hidden_dim = 16
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 20
  config.optimizer.warmup_steps = 5
  config.log_every_steps = 5
  config.eval_every_steps = 10
  config.checkpoint_every_steps = 10
  return config


def parse_tiny(variant: str) -> bool:
  """'' -> False, 'tiny' -> True; anything else raises."""
  if variant not in ('', 'tiny'):
    raise ValueError(
      f'unknown config variant {variant!r}: translation configs take only '
      '"tiny" (e.g. configs/multi30k_transformer.py:tiny).'
    )
  return variant == 'tiny'
