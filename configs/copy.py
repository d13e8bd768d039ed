"""String copying, lengths 20-30 over a-z: 'abc...' -> 'abc...'.

The alignment is the diagonal, the case monotonic and local-m attention are
built for. The fields are in `configs/base.py` (`get_string_task_config`).

python train.py --config=configs/copy.py:monotonic --workdir=/tmp/copy
"""

import ml_collections

from configs import base


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  return base.get_string_task_config('copy', variant)
