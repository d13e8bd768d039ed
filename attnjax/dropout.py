"""Dropout with half the random bits of `flax.linen.Dropout`.

`nn.Dropout` draws a float32 uniform, 32 random bits, for every element it
may drop. On CPU the threefry bits were the largest cost of the Transformer's
train step after the matrix products (about a tenth of it, `BENCHMARKS.md`).
Sixteen bits decide a drop just as well: each 32-bit threefry word here is
split into two uint16 halves, and an element is kept when its half is at
least `round(rate * 2**16)`. The drop probability is that threshold over
2**16 (0.1 becomes 0.100006) and kept values are scaled by its inverse, so
the output's expectation is still exactly the input.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

_LEVELS = 2**16


def keep_mask(rng: Array, rate: float, shape: Sequence[int]) -> Array:
  """A boolean mask of `shape`, each element False with probability ~`rate`.

  The probability is `round(rate * 2**16) / 2**16` (`effective_rate`). The
  16-bit draws are packed two to a word along the last axis, so leading axes
  (batch, length) keep the layout a sharded input has.
  """
  *lead, last = shape or (1,)
  pairs = (last + 1) // 2
  words = jax.random.bits(rng, (*lead, pairs), jnp.uint32)
  halves = jax.lax.bitcast_convert_type(words, jnp.uint16)
  halves = halves.reshape(*lead, 2 * pairs)[..., :last]
  return (halves >= round(rate * _LEVELS)).reshape(shape)


def effective_rate(rate: float) -> float:
  """The drop probability `keep_mask` realises for `rate`."""
  return round(rate * _LEVELS) / _LEVELS


def dropout(
  rng: Array, inputs: Array, rate: float, broadcast_dims: Sequence[int] = ()
) -> Array:
  """Zeroes elements of `inputs` with probability ~`rate`, scales the rest.

  Elements along `broadcast_dims` share one draw. The kept ones are divided
  by `1 - effective_rate(rate)`, so the expectation is `inputs`.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'A dropout rate is in [0, 1]; got {rate}.')
  keep_prob = 1.0 - effective_rate(rate)
  if keep_prob == 1.0:
    return inputs
  if keep_prob == 0.0:
    # Not `inputs / 0`, whose gradient would be NaN.
    return jnp.zeros_like(inputs)
  shared = {axis % inputs.ndim for axis in broadcast_dims}
  mask_shape = [
    1 if axis in shared else size for axis, size in enumerate(inputs.shape)
  ]
  mask = keep_mask(rng, rate, mask_shape)
  scaled = inputs * jnp.asarray(1.0 / keep_prob, inputs.dtype)
  return jnp.where(mask, scaled, jnp.zeros_like(inputs))


class Dropout(nn.Dropout):
  """`flax.linen.Dropout` (same fields, same `'dropout'` rng) on `dropout`."""

  @nn.compact
  def __call__(
    self,
    inputs: Array,
    deterministic: bool | None = None,
    rng: Array | None = None,
  ) -> Array:
    deterministic = nn.merge_param(
      'deterministic', self.deterministic, deterministic
    )
    if deterministic or self.rate == 0.0:
      return inputs
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    return dropout(rng, inputs, self.rate, self.broadcast_dims)
