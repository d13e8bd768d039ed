"""Test session setup: 8 simulated CPU devices, fixed before JAX starts.

Compiled programs are cached on disk for the session (and the `train.py`
subprocesses the tests start): the training tests compile the same steps in
many runs, and loading them back saves most of the suite's time.
"""

import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR',
  os.path.join(tempfile.gettempdir(), 'attnjax-test-jax-cache'),
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402

# Must run before any backend is initialised, i.e. before the first array.
jax.config.update('jax_num_cpu_devices', 8)
