"""Fields shared by the RNN sequence-to-sequence configs.

Each experiment config starts from `get_base_config()` and sets its data and
whatever it changes; every field is commented here.
"""

import string

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Parameter init and dropout; the data has its own seed.

  config.data = ml_collections.ConfigDict()
  config.data.seed = 0  # Seed of the training stream.
  config.data.heldout_size = 10_000  # Held-out examples for exact match.

  config.model = ml_collections.ConfigDict()
  # 'sutskever', 'cho' (no attention), 'bahdanau' or 'luong'.
  config.model.decoder = 'cho'
  config.model.cell = 'lstm'  # Recurrent cell: 'lstm' or 'gru'.
  config.model.embed_dim = 32  # Token embedding width.
  config.model.hidden_dim = 128  # Recurrent state width.
  config.model.num_layers = 1  # Stacked recurrent layers (encoder/decoder).
  config.model.bidirectional = False  # Bidirectional encoder.
  config.model.reverse_source = False  # Encoder reads sources backwards.
  config.model.dropout_rate = 0.0  # Dropout on embeddings and RNN outputs.
  config.model.unroll = 1  # lax.scan unroll factor of the recurrences.
  config.model.dtype = 'float32'  # Computation dtype.
  # Attention (bahdanau and luong decoders; see VARIANTS below):
  # A name in attnjax.scores.SCORES; '' = the decoder's default.
  config.model.score = ''
  # soft, hard, local_m, local_p, monotonic or location_aware.
  config.model.alignment = 'soft'
  config.model.attention_dim = 0  # Additive score width H (0: hidden_dim).
  config.model.project_keys = False  # Map encoder outputs to decoder width.
  config.model.local_window = 3  # Half-width D of local attention.
  config.model.input_feeding = True  # Luong: feed h~_{t-1} to the cell.
  config.model.attention_noise = 1.0  # Monotonic pre-sigmoid noise std.
  config.model.monotonic_bias = -2.0  # Initial monotonic score bias r.
  config.model.gumbel_temperature = 1.0  # Hard attention's Gumbel-softmax.
  config.model.location_channels = 8  # Location-aware filters.
  config.model.location_kernel = 7  # Location-aware filter width (odd).

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adam'  # 'adam' or 'adamw'.
  config.optimizer.learning_rate = 3e-3  # Peak learning rate.
  config.optimizer.schedule = 'cosine'  # constant, cosine, linear or rsqrt.
  config.optimizer.warmup_steps = 200  # Linear warmup steps.
  config.optimizer.weight_decay = 0.0  # adamw only.
  config.optimizer.clip_norm = 1.0  # Global gradient-norm clip (0: off).
  config.optimizer.b1 = 0.9  # Adam beta1.
  config.optimizer.b2 = 0.999  # Adam beta2.
  config.optimizer.eps = 1e-8  # Adam epsilon.

  config.batch_size = 128  # Global batch (split over data-parallel devices).
  config.eval_batch_size = 1000  # Held-out decoding batch.
  config.num_train_steps = 10_000  # Optimiser steps.
  config.label_smoothing = 0.0  # Label smoothing of the cross-entropy.
  config.log_every_steps = 500  # Train metrics and console progress.
  config.eval_every_steps = 2500  # Held-out evaluation (and at the end).
  config.checkpoint_every_steps = 2500  # Checkpoints (and at the end).
  config.keep_checkpoints = 3  # How many recent checkpoints to keep.
  config.init_from = ''  # A workdir whose parameters initialise this run.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data-parallel axis size (-1: all devices left).
  config.mesh.model = 1  # Model-parallel axis size.
  config.mesh.num_devices = 0  # Use the first N devices (0: all).
  return config


def get_string_task_config(
  task: str, variant: str
) -> ml_collections.ConfigDict:
  """`copy`, `reverse` or `sort` of strings of length 20-30 over a-z."""
  name, tiny = parse_variant(variant)
  config = get_base_config()
  config.data.task = task  # attnjax.data.synthetic task name.
  config.data.alphabet = string.ascii_lowercase  # Characters of the strings.
  config.data.min_len = 20  # Shortest string.
  config.data.max_len = 30  # Longest string.
  config.data.heldout_size = 2000  # Greedy decoding of 31 steps is costly.
  config.model.bidirectional = True  # Both ends of the source in view.
  config.model.hidden_dim = 128  # Recurrent state width.
  config.num_train_steps = 1500  # 192k strings; 30 decoder steps each.
  config.eval_every_steps = 500  # Held-out evaluation (and at the end).
  config.checkpoint_every_steps = 500  # Checkpoints (and at the end).
  apply_variant(config, name)
  if tiny:
    make_tiny(config)
    config.data.min_len, config.data.max_len = 3, 6  # Short strings.
  return config


def make_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The test variant: a tiny model, 20 steps, frequent logs and saves."""
  config.data.heldout_size = 64
  config.model.embed_dim = 8
  config.model.hidden_dim = 16
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_train_steps = 20
  config.optimizer.warmup_steps = 5
  config.log_every_steps = 5
  config.eval_every_steps = 10
  config.checkpoint_every_steps = 10
  config.model.local_window = 2  # Fits the tiny tasks' 5-6 source tokens.
  return config


# Model variants, selected by the config argument: `addition.py:bahdanau`,
# `reverse.py:luong_dot,tiny`. Each names the config.model fields it sets.
VARIANTS: dict[str, dict[str, object]] = {
  'sutskever': dict(decoder='sutskever'),
  # Sutskever et al.'s reversed source order.
  'sutskever_reversed': dict(decoder='sutskever', reverse_source=True),
  'cho': dict(decoder='cho'),
  'bahdanau': dict(decoder='bahdanau'),
  'bahdanau_normed': dict(decoder='bahdanau', score='normed_additive'),
  'luong_dot': dict(decoder='luong', score='dot'),
  'luong_general': dict(decoder='luong', score='general'),
  # Luong's "concat" score v^T tanh(W [h_t; h_s]) is the additive score.
  'luong_concat': dict(decoder='luong', score='additive'),
  'luong_location': dict(decoder='luong', score='location'),
  'local_m': dict(decoder='luong', alignment='local_m'),
  'local_p': dict(decoder='luong', alignment='local_p'),
  'hard': dict(decoder='bahdanau', alignment='hard'),
  'monotonic': dict(decoder='bahdanau', alignment='monotonic'),
  'location_aware': dict(decoder='bahdanau', alignment='location_aware'),
}


def parse_variant(argument: str) -> tuple[str, bool]:
  """`'bahdanau,tiny'` -> ('bahdanau', True); '' -> ('', False)."""
  parts = [part for part in argument.split(',') if part]
  tiny = 'tiny' in parts
  names = [part for part in parts if part != 'tiny']
  if len(names) > 1 or (names and names[0] not in VARIANTS):
    raise ValueError(
      f'unknown config variant {argument!r}: give at most one of '
      f'{", ".join(VARIANTS)}, optionally with "tiny" (e.g. '
      '"bahdanau,tiny").'
    )
  return (names[0] if names else ''), tiny


def apply_variant(config: ml_collections.ConfigDict, name: str) -> None:
  """Sets the model fields of the variant `name` ('' changes nothing)."""
  for field, value in VARIANTS.get(name, {}).items():
    config.model[field] = value
  if config.model.score == 'dot' and config.model.bidirectional:
    # The decoder state is half as wide as a bidirectional encoder's output.
    config.model.project_keys = True
