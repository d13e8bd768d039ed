"""String reversal, lengths 20-30 over a-z: 'abc...' -> '...cba'.

A task where attention-free decoders struggle (the first output token needs
the last input token), so the attention decoders' alignments are easy to read.
The fields are in `configs/base.py` (`get_string_task_config`).

python train.py --config=configs/reverse.py:bahdanau --workdir=/tmp/reverse
"""

import ml_collections

from configs import base


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  return base.get_string_task_config('reverse', variant)
