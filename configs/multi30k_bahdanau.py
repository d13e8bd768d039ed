"""Multi30k German -> English with Bahdanau attention: bidirectional GRU
encoder, GRU decoder, additive attention (the PyTorch tutorial's model 3).

python train.py --config=configs/multi30k_bahdanau.py --workdir=DIR
python train.py --config=configs/multi30k_bahdanau.py:tiny ...  (tests)
"""

import ml_collections

from configs import translation


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  tiny = translation.parse_tiny(variant)
  config = translation.get_config('multi30k', 'bahdanau')
  config.model.hidden_dim = 256  # GRU width (tutorial: 512, ~3x slower).
  config.batch_size = 128  # Sentence pairs per step.
  config.num_train_steps = 2250  # About 10 epochs of 225 batches.
  config.optimizer.learning_rate = 1e-3  # Peak.
  config.optimizer.warmup_steps = 200  # Linear warmup.
  config.optimizer.schedule = 'cosine'  # Then cosine decay to 0.
  config.log_every_steps = 50  # Train metrics and console progress.
  config.eval_every_steps = 1125  # Validation BLEU (and at the end).
  config.checkpoint_every_steps = 250  # Checkpoints (and at the end).
  if tiny:
    translation.make_tiny(config)
  return config
