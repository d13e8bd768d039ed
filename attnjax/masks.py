"""Boolean attention masks (True = may attend) and the masked softmax."""

import chex
import jax
import jax.numpy as jnp

from attnjax import _checks

Array = jax.Array


def length_mask(lengths: Array, max_len: int) -> Array:
  """True where `position < length`.

  Args:
    lengths: integer `[...]`, valid length of each sequence.
    max_len: the padded length.

  Returns:
    bool `[..., max_len]`.
  """
  chex.assert_type(lengths, int, custom_message='length_mask: lengths')
  if max_len < 0:
    raise ValueError(f'length_mask: max_len must be >= 0; got {max_len}.')
  return jnp.arange(max_len) < jnp.asarray(lengths)[..., None]


def causal_mask(tq: int, tk: int | None = None) -> Array:
  """True where key j is not in the future of query i.

  With `tk > tq` the queries are the last `tq` positions of the keys (as in
  cached decoding): query i sits at key position `i + tk - tq`.

  Returns:
    bool `[tq, tk]`.
  """
  tk = tq if tk is None else tk
  if tq < 0 or tk < tq:
    raise ValueError(
      f'causal_mask needs 0 <= tq <= tk (queries are the last tq of the tk '
      f'key positions); got tq={tq}, tk={tk}.'
    )
  query_pos = jnp.arange(tq)[:, None] + (tk - tq)
  return jnp.arange(tk)[None, :] <= query_pos


def combine(*masks: Array | None) -> Array | None:
  """Logical AND of masks that broadcast together; None entries are skipped."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  for m in present:
    _checks.check_mask(m, jnp.broadcast_shapes(*(x.shape for x in present)))
  out = present[0]
  for m in present[1:]:
    out = jnp.logical_and(out, m)
  return out


def masked_softmax(
  scores: Array, mask: Array | None = None, axis: int = -1
) -> Array:
  """Softmax over `axis` restricted to the positions where `mask` is True.

  Computed and returned in float32 whatever the input dtype. Masked positions
  are exactly 0; a slice with no allowed position (or whose allowed scores
  are all -inf) is all zeros (neither NaN nor uniform) and has a zero, finite
  gradient.

  Args:
    scores: `[..., k_len]` (any float dtype).
    mask: bool, broadcastable to `scores.shape`; None means all allowed.
    axis: the axis to normalise over.
  """
  _checks.assert_float(scores, names=('masked_softmax: scores',))
  scores = scores.astype(jnp.float32)
  if mask is None:
    # Not jax.nn.softmax: a score that is itself -inf on a whole row (a bias
    # table, a custom causal score) must give zeros as with an all-True mask
    # (and as chunked_attention does), not NaN.
    masked = scores
  else:
    _checks.check_mask(mask, scores.shape)
    # Masked entries become -inf *before* any arithmetic, so whatever they
    # held (inf, NaN, huge values) cannot leak into the value or gradient.
    masked = jnp.where(mask, scores, -jnp.inf)
  # initial: an empty axis (no key at all) is a row with nothing allowed.
  row_max = jnp.max(masked, axis=axis, keepdims=True, initial=-jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0))
  unnormalised = jnp.exp(masked - row_max)
  total = jnp.sum(unnormalised, axis=axis, keepdims=True)
  return unnormalised / jnp.where(total > 0, total, 1.0)
