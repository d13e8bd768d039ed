"""Anki / Tatoeba English -> French with the base Transformer of
multi30k_transformer.py (seed 003's data; its sentences 'Go .', 'Good Night
!', "I'm OK ." and 'I won !' are decoded in the README).

python train.py --config=configs/anki_fra_transformer.py --workdir=DIR
python train.py --config=configs/anki_fra_transformer.py:tiny ...  (tests)
"""

import ml_collections

from configs import translation


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  tiny = translation.parse_tiny(variant)
  config = translation.get_config('anki_fra', 'transformer')
  config.data.max_source_len = 48  # Longer pairs (a few hundred) skipped.
  config.data.max_target_len = 48  # Longest target with EOS.
  config.data.buckets = (8, 12, 16, 24, 48)  # Most pairs are short.
  config.data.heldout_size = 2000  # Validation pairs scored in training.
  config.batch_size = 128  # Sentence pairs per step.
  config.num_train_steps = 4000  # About 3.4 epochs of 1,180 batches.
  config.optimizer.learning_rate = 7e-4  # Peak.
  config.optimizer.warmup_steps = 400  # Linear warmup.
  config.optimizer.schedule = 'cosine'  # Then cosine decay to 0.
  config.log_every_steps = 100  # Train metrics and console progress.
  config.eval_every_steps = 1000  # Validation BLEU (and at the end).
  config.checkpoint_every_steps = 1000  # Checkpoints (and at the end).
  if tiny:
    translation.make_tiny(config)
  return config
