"""Test session setup: 8 simulated CPU devices, fixed before JAX starts."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

# Must run before any backend is initialised, i.e. before the first array.
jax.config.update('jax_num_cpu_devices', 8)
