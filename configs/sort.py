"""String sorting, lengths 20-30 over a-z: 'dbca...' -> 'abcd...'.

Each output letter attends to wherever that letter sits in the source, so the
alignment is a permutation that is easy to check on a plot. The fields are in
`configs/base.py` (`get_string_task_config`).

python train.py --config=configs/sort.py:bahdanau --workdir=/tmp/sort
"""

import ml_collections

from configs import base


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  return base.get_string_task_config('sort', variant)
