"""Seed 000's addition task: 2 numbers in 1..999, e.g. ' 123+45' -> ' 168'.

Questions and answers are left-padded with spaces to a fixed width.

python train.py --config=configs/addition.py --workdir=/tmp/addition
python train.py --config=configs/addition.py:tiny ...   (the test variant)
"""

import ml_collections

from configs import base


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  base.check_variant(variant)
  config = base.get_base_config()
  config.data.task = 'addition'  # attnjax.data.synthetic task name.
  config.data.n_numbers = 2  # Numbers per question.
  config.data.largest = 999  # Numbers are drawn from 1..largest.
  config.num_train_steps = 8000  # About 1M questions; ~4 minutes on 2 cores.
  config.eval_every_steps = 2000  # Held-out evaluation (and at the end).
  config.checkpoint_every_steps = 2000  # Checkpoints (and at the end).
  if variant == 'tiny':
    base.make_tiny(config)
    config.data.largest = 99
  return config
