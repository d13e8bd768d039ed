"""String copying, lengths 20-30 over a-z: 'abc...' -> 'abc...'.

The alignment is the diagonal, the case monotonic and local-m attention are
built for.

python train.py --config=configs/copy.py:monotonic --workdir=/tmp/copy
"""

import string

import ml_collections

from configs import base


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  name, tiny = base.parse_variant(variant)
  config = base.get_base_config()
  config.data.task = 'copy'  # attnjax.data.synthetic task name.
  config.data.alphabet = string.ascii_lowercase  # Characters of the strings.
  config.data.min_len = 20  # Shortest string.
  config.data.max_len = 30  # Longest string.
  config.model.bidirectional = True  # Both ends of the source in view.
  config.model.hidden_dim = 256  # Room for 30 characters in one state.
  base.apply_variant(config, name)
  if tiny:
    base.make_tiny(config)
    config.data.min_len, config.data.max_len = 3, 6  # Short strings.
  return config
