"""Seed 000's addition task: 2 numbers in 1..999, e.g. ' 123+45' -> ' 168'.

Questions and answers are left-padded with spaces to a fixed width.

python train.py --config=configs/addition.py --workdir=/tmp/addition
python train.py --config=configs/addition.py:luong_dot ...  (a model variant,
    see configs/base.py VARIANTS)
python train.py --config=configs/addition.py:bahdanau,tiny ...  (tests)
"""

import ml_collections

from configs import base


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  name, tiny = base.parse_variant(variant)
  config = base.get_base_config()
  config.data.task = 'addition'  # attnjax.data.synthetic task name.
  config.data.n_numbers = 2  # Numbers per question.
  config.data.largest = 999  # Numbers are drawn from 1..largest.
  config.model.decoder = 'bahdanau'  # Additive attention.
  config.model.bidirectional = True  # Each digit seen in its context.
  config.num_train_steps = 3000  # 384k questions.
  config.eval_every_steps = 1000  # Held-out evaluation (and at the end).
  config.checkpoint_every_steps = 1000  # Checkpoints (and at the end).
  base.apply_variant(config, name)
  if tiny:
    base.make_tiny(config)
    config.data.largest = 99
  return config
