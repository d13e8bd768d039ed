"""Fields shared by the RNN sequence-to-sequence configs.

Each experiment config starts from `get_base_config()` and sets its data and
whatever it changes; every field is commented here.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Parameter init and dropout; the data has its own seed.

  config.data = ml_collections.ConfigDict()
  config.data.seed = 0  # Seed of the training stream.
  config.data.heldout_size = 10_000  # Held-out examples for exact match.

  config.model = ml_collections.ConfigDict()
  config.model.decoder = 'cho'  # 'sutskever' or 'cho'.
  config.model.cell = 'lstm'  # Recurrent cell: 'lstm' or 'gru'.
  config.model.embed_dim = 32  # Token embedding width.
  config.model.hidden_dim = 128  # Recurrent state width.
  config.model.num_layers = 1  # Stacked recurrent layers (encoder/decoder).
  config.model.bidirectional = False  # Bidirectional encoder.
  config.model.dropout_rate = 0.0  # Dropout on embeddings and RNN outputs.
  config.model.unroll = 1  # lax.scan unroll factor of the recurrences.
  config.model.dtype = 'float32'  # Computation dtype.

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
  return config


def check_variant(variant: str) -> None:
  if variant not in ('', 'tiny'):
    raise ValueError(f"unknown config variant {variant!r}; known: '', 'tiny'.")
