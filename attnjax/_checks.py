"""Entry checks shared by the pure functions.

They run while tracing (shapes and dtypes are static), so under `jax.jit` they
cost nothing and fail before compilation. Each raises with a message that names
the argument, what was expected and what came in.
"""

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp


def assert_min_rank(
  x: jax.Array, rank: int, name: str, layout: str = '[..., length, depth]'
) -> None:
  """Asserts `x` has at least `rank` dims; the message names the layout."""
  if jnp.ndim(x) < rank:
    raise ValueError(
      f'{name} must have rank >= {rank}, laid out as {layout}; got shape '
      f'{jnp.shape(x)}.'
    )


def assert_float(*arrays: jax.Array, names: Sequence[str]) -> None:
  for x, name in zip(arrays, names, strict=True):
    chex.assert_type(x, float, custom_message=f'{name} must be floating point')


def check_mask(mask: jax.Array, target_shape: tuple[int, ...]) -> None:
  """A mask is boolean (True = may attend) and broadcasts to the scores."""
  if not jnp.issubdtype(jnp.result_type(mask), jnp.bool_):
    raise TypeError(
      f'mask must be boolean (True = may attend); got dtype '
      f'{jnp.result_type(mask)}. Convert it with `mask != 0` or build it with '
      'attnjax.masks.length_mask / causal_mask.'
    )
  try:
    broadcast = jnp.broadcast_shapes(jnp.shape(mask), target_shape)
  except ValueError:
    broadcast = None
  if broadcast != tuple(target_shape):
    raise ValueError(
      f'mask of shape {jnp.shape(mask)} does not broadcast to the scores '
      f'shape {tuple(target_shape)} ([..., q_len, k_len]). Give it size-1 '
      'dims where it is constant, e.g. [batch, 1, 1, k_len] for key padding.'
    )
