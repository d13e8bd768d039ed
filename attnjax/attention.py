"""Pure attention: weights from scores, context from weights.

Layouts: queries `q: [..., q_len, q_depth]`, keys `k: [..., k_len, k_depth]`,
values `v: [..., k_len, v_depth]`; leading dims (batch, heads) broadcast.
Masks are boolean (True = may attend) and broadcast to `[..., q_len, k_len]`.
Weights are float32; contexts have the dtype of `v`.

Besides the default soft alignment this module holds the alignment schemes of
the literature as pure functions: hard (straight-through Gumbel-softmax),
local-m / local-p (Luong 2015), monotonic (Raffel 2017) and location-aware
(Chorowski 2015), plus `chunked_attention`, a memory-efficient form that works
for every score function.
"""

import functools
import operator
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from attnjax import _checks, masks, scores

Array = jax.Array
ScoreFn = Callable[..., Array]


def _check_qkv(q: Array, k: Array, v: Array, name: str) -> None:
  _checks.assert_min_rank(q, 2, f'{name}: q', '[..., q_len, q_depth]')
  _checks.assert_min_rank(k, 2, f'{name}: k', '[..., k_len, k_depth]')
  _checks.assert_min_rank(v, 2, f'{name}: v', '[..., k_len, v_depth]')
  _checks.assert_float(
    q, k, v, names=(f'{name}: q', f'{name}: k', f'{name}: v')
  )
  if k.shape[-2] != v.shape[-2]:
    raise ValueError(
      f'{name}: keys and values must have the same length; got k shape '
      f'{k.shape} and v shape {v.shape}.'
    )


def _check_scores(s: Array, q: Array, k: Array, name: str) -> None:
  if s.ndim < 2 or s.shape[-2:] != (q.shape[-2], k.shape[-2]):
    raise ValueError(
      f'{name}: score_fn must return [..., q_len={q.shape[-2]}, '
      f'k_len={k.shape[-2]}]; it returned shape {s.shape}.'
    )


def weighted_sum(weights: Array, v: Array) -> Array:
  """Context `[..., q_len, v_depth]` from weights `[..., q_len, k_len]`."""
  return jnp.einsum('...qk,...kd->...qd', weights.astype(v.dtype), v)


def attention(
  q: Array, k: Array, v: Array, score_fn: ScoreFn, mask: Array | None = None
) -> tuple[Array, Array]:
  """Soft (global) attention with any score function.

  Args:
    q: `[..., q_len, q_depth]`.
    k: `[..., k_len, k_depth]`.
    v: `[..., k_len, v_depth]`.
    score_fn: `score_fn(q, k) -> [..., q_len, k_len]`, e.g.
      `functools.partial(scores.general, w=w)`.
    mask: bool, broadcastable to `[..., q_len, k_len]`.

  Returns:
    `(context [..., q_len, v_depth], weights [..., q_len, k_len] float32)`.
  """
  _check_qkv(q, k, v, 'attention')
  logits = score_fn(q, k)
  _check_scores(logits, q, k, 'attention')
  weights = masks.masked_softmax(logits, mask)
  return weighted_sum(weights, v), weights


def dot_product_attention(
  q: Array,
  k: Array,
  v: Array,
  mask: Array | None = None,
  scale: float | None = None,
) -> Array:
  """Scaled dot-product attention, softmax(q k^T * scale) v.

  The same maths as `jax.nn.dot_product_attention` in our layout: that
  function takes `[batch, len, heads, depth]`, this one `[..., len, depth]`
  (e.g. `[batch, heads, len, depth]`). One difference on purpose: a query
  with no allowed key gets a zero context here, where `jax.nn` returns the
  mean of the values.

  Args:
    q: `[..., q_len, depth]`.
    k: `[..., k_len, depth]`.
    v: `[..., k_len, v_depth]`.
    mask: bool, broadcastable to `[..., q_len, k_len]`.
    scale: defaults to `depth ** -0.5`.
  """
  _check_qkv(q, k, v, 'dot_product_attention')
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(
      f'dot_product_attention: q and k depths differ ({q.shape[-1]} vs '
      f'{k.shape[-1]}); project them to a common depth first.'
    )
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  # Scaling q ([q_len, depth]) is cheaper than scaling the logits ([q_len,
  # k_len], an extra pass over them when there is no mask to fuse it with:
  # 5-10% of the step at length 2048 on CPU). A 16-bit q would round q *
  # scale once more, so 16-bit inputs scale the float32 logits, as jax.nn.
  scale_q = jnp.dtype(q.dtype).itemsize >= 4
  logits = jnp.einsum(
    '...qd,...kd->...qk',
    q * jnp.asarray(scale, q.dtype) if scale_q else q,
    k,
    preferred_element_type=jnp.float32,
  )
  if not scale_q:
    logits = logits * jnp.asarray(scale, jnp.float32)
  return weighted_sum(masks.masked_softmax(logits, mask), v)


# ---------------------------------------------------------------------------
# Chunked (memory-efficient) attention.


def _call_score(score_fn: ScoreFn, q: Array, k: Array, key_offset) -> Array:
  if scores.takes_key_offset(score_fn):
    return score_fn(q, k, key_offset=key_offset)
  return score_fn(q, k)


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
  """Sums out the dims `x` gained by broadcasting against `shape`."""
  lead = x.ndim - len(shape)
  x = jnp.sum(x, axis=tuple(range(lead)))
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True)


def chunked_attention(
  q: Array,
  k: Array,
  v: Array,
  score_fn: ScoreFn,
  mask: Array | None = None,
  *,
  chunk_size: int = 512,
  causal: bool = False,
) -> Array:
  """`attention(q, k, v, score_fn, mask)[0]` in O(q_len x chunk_size) memory.

  Keys are visited in chunks with an online (running max, running sum)
  softmax. The gradient is a custom VJP in the style of flash attention: it
  keeps only the output and the per-query log-sum-exp from the forward pass
  and recomputes each chunk's scores, pulling their cotangent back through
  `score_fn` with `jax.vjp`. So no `[q_len, k_len]` score, weight or mask
  tensor exists in either pass, for any score function (additive scores
  included, whose `[q_len, chunk, hidden]` pre-activation is the largest
  temporary).

  Args:
    q, k, v: as in `attention`.
    score_fn: any `score_fn(q, k)`; a score that takes `key_offset` (see
      `attnjax.scores`) is told where each chunk starts.
    mask: bool, broadcastable to `[..., q_len, k_len]`. Its last dim is
      sliced per chunk, so pass factored masks (e.g. key padding
      `[batch, 1, 1, k_len]`) to keep memory low.
    chunk_size: keys per chunk (> 0). The last chunk may be shorter.
    causal: also apply `masks.causal_mask(q_len, k_len)`, built per chunk.

  Returns:
    context `[..., q_len, v_depth]` in the dtype of `v`.
  """
  _check_qkv(q, k, v, 'chunked_attention')
  try:  # Any integer (numpy's too), but not a bool or a float.
    valid = not isinstance(chunk_size, bool) and operator.index(chunk_size) > 0
  except TypeError:
    valid = False
  if not valid:
    raise ValueError(
      f'chunked_attention: chunk_size must be a positive int; got '
      f'{chunk_size!r}.'
    )
  chunk_size = operator.index(chunk_size)
  q_len, k_len = q.shape[-2], k.shape[-2]
  if causal and k_len < q_len:
    raise ValueError(
      f'chunked_attention: causal needs k_len >= q_len; got q_len={q_len}, '
      f'k_len={k_len}.'
    )
  # Abstract evaluation on the full keys checks score_fn's shapes (and, for
  # position-dependent scores, that every key position is covered) while
  # allocating nothing.
  full = jax.eval_shape(functools.partial(_call_score, score_fn), q, k, 0)
  _check_scores(full, q, k, 'chunked_attention')
  batch = jnp.broadcast_shapes(full.shape[:-2], v.shape[:-2])
  if mask is not None:
    _checks.check_mask(mask, (*batch, q_len, k_len))

  if k_len == 0:  # no key at all: every query gets a zero context
    return jnp.zeros((*batch, q_len, v.shape[-1]), v.dtype)
  size = min(chunk_size, k_len)
  num_full, remainder = divmod(k_len, size)

  def converted(chunk):
    def fn(q, k_chunk, offset):
      return _call_score(score_fn, q, k_chunk, offset).astype(jnp.float32)

    k_example = jax.ShapeDtypeStruct(
      (*k.shape[:-2], chunk, k.shape[-1]), k.dtype
    )
    return _hoist_closure(fn, q, k_example, jnp.int32(0))

  full_fn, full_consts = converted(size)
  rem_fn, rem_consts = converted(remainder) if remainder else (None, ([], []))
  plan = _ChunkPlan(
    size, num_full, remainder, q_len, k_len, causal, batch, full_fn, rem_fn
  )
  out = _chunked(plan, q, k, v, mask, full_consts, rem_consts)
  return out.astype(v.dtype)


def _hoist_closure(fn, *example_args):
  """`fn` with every tracer it closes over made an explicit argument.

  Like `jax.closure_convert`, which however hoists only the values it deems
  differentiable: an integer tracer (or a float one under `vmap`) stayed
  inside `fn` and escaped its trace through the custom VJP
  (UnexpectedTracerError under `vmap`, `remat` or `scan`, a lowering error
  under `grad` of `jit`). Concrete constants stay closed over.

  Returns `(converted, (floats, others))`: the hoisted float tracers (which
  get cotangents) and the others (integer, bool: none), with
  `converted(*example_args, floats, others) == fn(*example_args)`.
  """
  closed = jax.make_jaxpr(fn)(*example_args)
  consts = closed.consts
  kinds = [
    'concrete'
    if not isinstance(c, jax.core.Tracer)
    else 'float'
    if jnp.issubdtype(c.dtype, jnp.inexact)
    else 'other'
    for c in consts
  ]
  floats = [c for c, kind in zip(consts, kinds, strict=True) if kind == 'float']
  others = [c for c, kind in zip(consts, kinds, strict=True) if kind == 'other']

  def converted(*args):
    *args, floats, others = args
    hoisted = {'float': iter(floats), 'other': iter(others)}
    merged = [
      c if kind == 'concrete' else next(hoisted[kind])
      for c, kind in zip(consts, kinds, strict=True)
    ]
    run = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(closed.jaxpr, merged))
    return run(*args)[0]

  return converted, (floats, others)


class _ChunkPlan:
  """Static description of the chunk loop (hashable by identity)."""

  def __init__(
    self,
    size,
    num_full,
    remainder,
    q_len,
    k_len,
    causal,
    batch,
    full_fn,
    rem_fn,
  ):
    self.size, self.num_full, self.remainder = size, num_full, remainder
    self.q_len, self.k_len, self.causal, self.batch = (
      q_len,
      k_len,
      causal,
      batch,
    )
    self.full_fn, self.rem_fn = full_fn, rem_fn

  def score_fn(self, last: bool):
    return self.rem_fn if last else self.full_fn

  def chunk_mask(self, mask, start, size):
    """The mask of keys [start, start + size), never wider than a chunk."""
    chunk = None
    if mask is not None:
      chunk = mask
      if mask.shape[-1] != 1:
        chunk = jax.lax.dynamic_slice_in_dim(mask, start, size, axis=-1)
    if self.causal:
      query_pos = jnp.arange(self.q_len)[:, None] + (self.k_len - self.q_len)
      key_pos = start + jnp.arange(size)[None, :]
      chunk = masks.combine(chunk, key_pos <= query_pos)
    return chunk


def _scores_of_chunk(plan, fn, q, k, mask, consts, start, size):
  k_chunk = jax.lax.dynamic_slice_in_dim(k, start, size, axis=-2)
  logits = fn(q, k_chunk, start, *consts)
  chunk_mask = plan.chunk_mask(mask, start, size)
  if chunk_mask is not None:
    logits = jnp.where(chunk_mask, logits, -jnp.inf)
  return logits


def _for_each_chunk(plan, body, carry):
  """Runs `body(carry, start, size, last)` over the full chunks (a scan) and
  then the shorter last chunk (`last=True`), if any.

  Returns the final carry and the per-key outputs of `body`, concatenated
  back along the key axis.
  """

  def scan_body(carry, start):
    return body(carry, start, plan.size, False)

  starts = jnp.arange(plan.num_full, dtype=jnp.int32) * plan.size
  carry, per_key = jax.lax.scan(scan_body, carry, starts)
  # [chunks, ..., size, d] -> [..., chunks * size, d]
  per_key = jax.tree.map(
    lambda x: jnp.moveaxis(x, 0, -3).reshape(
      *x.shape[1:-2], plan.num_full * plan.size, x.shape[-1]
    ),
    per_key,
  )
  if plan.remainder:
    start = jnp.int32(plan.num_full * plan.size)
    carry, last = body(carry, start, plan.remainder, True)
    per_key = jax.tree.map(
      lambda a, b: jnp.concatenate([a, b], axis=-2), per_key, last
    )
  return carry, per_key


def _forward(plan, q, k, v, mask, full_consts, rem_consts):
  v_depth = v.shape[-1]
  shape = (*plan.batch, plan.q_len)

  def body(carry, start, size, last):
    running_max, running_sum, acc = carry
    fn, consts = plan.score_fn(last), (rem_consts if last else full_consts)
    logits = _scores_of_chunk(plan, fn, q, k, mask, consts, start, size)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    correction = jnp.exp(running_max - safe_max)
    probs = jnp.exp(logits - safe_max[..., None])
    v_chunk = jax.lax.dynamic_slice_in_dim(v, start, size, axis=-2)
    acc = acc * correction[..., None] + jnp.einsum(
      '...qk,...kd->...qd',
      probs.astype(v.dtype),
      v_chunk,
      preferred_element_type=jnp.float32,
    )
    running_sum = running_sum * correction + jnp.sum(probs, axis=-1)
    # No per-key outputs in the forward pass.
    return (new_max, running_sum, acc), ()

  init = (
    jnp.full(shape, -jnp.inf, jnp.float32),
    jnp.zeros(shape, jnp.float32),
    jnp.zeros((*shape, v_depth), jnp.float32),
  )
  (running_max, running_sum, acc), _ = _for_each_chunk(plan, body, init)
  nonempty = running_sum > 0
  out = acc / jnp.where(nonempty, running_sum, 1.0)[..., None]
  # +inf for a query with nothing allowed makes every recomputed prob 0.
  log_sum = jnp.where(
    nonempty,
    running_max + jnp.log(jnp.where(nonempty, running_sum, 1.0)),
    jnp.inf,
  )
  return out, log_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(plan, q, k, v, mask, full_consts, rem_consts):
  return _forward(plan, q, k, v, mask, full_consts, rem_consts)[0]


def _chunked_fwd(plan, q, k, v, mask, full_consts, rem_consts):
  out, log_sum = _forward(plan, q, k, v, mask, full_consts, rem_consts)
  return out, (q, k, v, mask, full_consts, rem_consts, out, log_sum)


def _chunked_bwd(plan, residuals, d_out):
  q, k, v, mask, full_consts, rem_consts, out, log_sum = residuals
  d_out = d_out.astype(jnp.float32)
  # D_i = sum_d dO_id O_id, the softmax Jacobian's diagonal correction.
  delta = jnp.sum(d_out * out, axis=-1)

  def body(carry, start, size, last):
    d_q, d_full, d_rem = carry
    fn, consts = plan.score_fn(last), (rem_consts if last else full_consts)
    k_chunk = jax.lax.dynamic_slice_in_dim(k, start, size, axis=-2)
    v_chunk = jax.lax.dynamic_slice_in_dim(v, start, size, axis=-2)
    floats, others = consts
    logits, pullback = jax.vjp(
      lambda q, k_chunk, floats: fn(q, k_chunk, start, floats, others),
      q,
      k_chunk,
      floats,
    )
    score_shape = logits.shape
    chunk_mask = plan.chunk_mask(mask, start, size)
    if chunk_mask is not None:
      logits = jnp.where(chunk_mask, logits, -jnp.inf)
    probs = jnp.exp(logits - log_sum[..., None])
    d_v = jnp.einsum('...qk,...qd->...kd', probs, d_out)
    d_probs = jnp.einsum(
      '...qd,...kd->...qk', d_out, v_chunk.astype(jnp.float32)
    )
    d_logits = probs * (d_probs - delta[..., None])
    # The mask and v may carry batch dims the scores lack.
    d_q_chunk, d_k, d_consts = pullback(_sum_to_shape(d_logits, score_shape))
    d_q = d_q + d_q_chunk.astype(jnp.float32)
    add = lambda acc, d: acc + d.astype(jnp.float32)
    if last:
      d_rem = jax.tree.map(add, d_rem, d_consts)
    else:
      d_full = jax.tree.map(add, d_full, d_consts)
    d_v = _sum_to_shape(d_v, (*v.shape[:-2], size, v.shape[-1]))
    return (d_q, d_full, d_rem), (d_k, d_v.astype(v.dtype))

  # Summed over chunks, so kept in float32 whatever the dtype of q or of the
  # score's weights (16-bit sums lose precision with every chunk).
  zeros32 = lambda x: jnp.zeros(jnp.shape(x), jnp.float32)
  init = (
    zeros32(q),
    jax.tree.map(zeros32, full_consts[0]),
    jax.tree.map(zeros32, rem_consts[0]),
  )
  (d_q, d_full, d_rem), (d_k, d_v) = _for_each_chunk(plan, body, init)
  as_dtype_of = lambda d, x: d.astype(jnp.result_type(x))
  d_full = jax.tree.map(as_dtype_of, d_full, full_consts[0])
  d_rem = jax.tree.map(as_dtype_of, d_rem, rem_consts[0])
  # Integer and boolean constants (and the mask) get no cotangent.
  return d_q.astype(q.dtype), d_k, d_v, None, (d_full, None), (d_rem, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ---------------------------------------------------------------------------
# Hard attention.


def hard_weights(
  logits: Array,
  mask: Array | None = None,
  *,
  rng: Array | None = None,
  temperature: float = 1.0,
) -> Array:
  """One-hot weights over keys: argmax at inference, sampled in training.

  Training (`rng` given) uses the straight-through Gumbel-softmax estimator
  (Jang et al. 2017): the forward value is a one-hot sample from
  softmax(logits), the gradient is that of the tempered soft sample
  softmax((logits + g) / temperature). Without `rng` the weights are the
  one-hot argmax. A query with no allowed key gets all-zero weights.

  Returns:
    float32 `[..., q_len, k_len]`.
  """
  _checks.assert_float(logits, names=('hard_weights: logits',))
  if temperature <= 0:
    raise ValueError(
      f'hard_weights: temperature must be > 0; got {temperature}'
    )
  logits = logits.astype(jnp.float32)
  if mask is not None:
    _checks.check_mask(mask, logits.shape)
  if rng is not None:
    logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
  allowed = jnp.ones(logits.shape, bool) if mask is None else mask
  allowed = jnp.broadcast_to(allowed, logits.shape)
  choice = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  one_hot = jax.nn.one_hot(choice, logits.shape[-1], dtype=jnp.float32)
  one_hot = one_hot * jnp.any(allowed, axis=-1, keepdims=True)
  if rng is None:
    return one_hot
  soft = masks.masked_softmax(logits / temperature, mask)
  # Parenthesised: `soft - stop_gradient(soft)` is exactly 0, so the value
  # is exactly one-hot; `one_hot + soft - soft` rounds 1 to 0.99999994.
  return one_hot + (soft - jax.lax.stop_gradient(soft))


def hard_attention(
  q: Array,
  k: Array,
  v: Array,
  score_fn: ScoreFn,
  mask: Array | None = None,
  *,
  rng: Array | None = None,
  temperature: float = 1.0,
) -> tuple[Array, Array]:
  """Attends to one key per query (see `hard_weights` for the estimator)."""
  _check_qkv(q, k, v, 'hard_attention')
  logits = score_fn(q, k)
  _check_scores(logits, q, k, 'hard_attention')
  weights = hard_weights(logits, mask, rng=rng, temperature=temperature)
  return weighted_sum(weights, v), weights


# ---------------------------------------------------------------------------
# Local attention (Luong et al. 2015).


def local_window_mask(centers: Array, num_keys: int, width: int) -> Array:
  """True for keys within `width` of each query's center: |s - p_t| <= D.

  Args:
    centers: `[..., q_len]`, the window center p_t of each query (int or
      real-valued).
    num_keys: k_len.
    width: D, the half-width of the window (>= 0).

  Returns:
    bool `[..., q_len, k_len]`.
  """
  if width < 0:
    raise ValueError(f'local attention window D must be >= 0; got {width}.')
  _checks.assert_min_rank(
    centers, 1, 'local_window_mask: centers', '[..., q_len]'
  )
  positions = jnp.arange(num_keys, dtype=jnp.float32)
  return jnp.abs(positions - centers[..., None].astype(jnp.float32)) <= width


def gaussian_window(centers: Array, num_keys: int, sigma: float) -> Array:
  """exp(-(s - p_t)^2 / (2 sigma^2)) for every key s: `[..., q_len, k_len]`."""
  _checks.assert_min_rank(
    centers, 1, 'gaussian_window: centers', '[..., q_len]'
  )
  if sigma <= 0:
    raise ValueError(f'gaussian_window: sigma must be > 0; got {sigma}.')
  positions = jnp.arange(num_keys, dtype=jnp.float32)
  distance = positions - centers[..., None].astype(jnp.float32)
  return jnp.exp(-jnp.square(distance) / (2.0 * sigma**2))


def predict_positions(
  h: Array, w_p: Array, v_p: Array, source_lengths: Array
) -> Array:
  """local-p's aligned positions p_t = S sigmoid(v_p^T tanh(W_p h_t)).

  S is the last valid source position (`source_lengths - 1`), so p_t lies on
  the source whatever its padding.

  Args:
    h: `[..., q_len, depth]` decoder states.
    w_p: `[depth, hidden]`; v_p: `[hidden]`.
    source_lengths: int `[...]`, broadcastable to `h.shape[:-2]`.

  Returns:
    float32 `[..., q_len]`.
  """
  _checks.assert_min_rank(h, 2, 'predict_positions: h', '[..., q_len, depth]')
  chex.assert_shape(w_p, (h.shape[-1], v_p.shape[-1]))
  last = (jnp.asarray(source_lengths) - 1).astype(jnp.float32)[..., None]
  # In float32: a 16-bit sigmoid resolves S / 2^8 positions, too coarse
  # against the window's sigma for long sources.
  h, w_p, v_p = (x.astype(jnp.float32) for x in (h, w_p, v_p))
  return last * jax.nn.sigmoid(jnp.tanh(h @ w_p) @ v_p)


def local_attention(
  q: Array,
  k: Array,
  v: Array,
  score_fn: ScoreFn,
  centers: Array,
  *,
  width: int,
  mask: Array | None = None,
  gaussian: bool = False,
) -> tuple[Array, Array]:
  """Luong's local attention around `centers`.

  local-m: `centers` are the target positions t (monotonic alignment),
  `gaussian=False`: a softmax over the window [p_t - D, p_t + D].
  local-p: `centers` from `predict_positions`, `gaussian=True`: the window
  softmax times exp(-(s - p_t)^2 / (2 sigma^2)), sigma = D / 2. As in the
  paper the Gaussian is applied after the softmax, so local-p weights sum to
  less than 1.

  Args:
    q, k, v, score_fn, mask: as in `attention`.
    centers: `[..., q_len]` window centers (broadcast against the scores).
    width: the half-width D of the window.
    gaussian: apply the Gaussian (local-p).

  Returns:
    `(context, weights)` as in `attention`.
  """
  _check_qkv(q, k, v, 'local_attention')
  if gaussian and width < 1:
    raise ValueError(
      f'local-p needs a window D >= 1 (sigma = D/2); got {width}'
    )
  logits = score_fn(q, k)
  _check_scores(logits, q, k, 'local_attention')
  window = local_window_mask(centers, k.shape[-2], width)
  weights = masks.masked_softmax(logits, masks.combine(mask, window))
  if gaussian:
    weights = weights * gaussian_window(centers, k.shape[-2], width / 2)
  return weighted_sum(weights, v), weights


# ---------------------------------------------------------------------------
# Monotonic attention (Raffel et al. 2017).


def _check_alignment_inputs(p_choose: Array, prev: Array, name: str) -> None:
  _checks.assert_min_rank(p_choose, 1, f'{name}: p_choose', '[..., k_len]')
  _checks.assert_float(
    p_choose, prev, names=(f'{name}: p_choose', f'{name}: prev_alignment')
  )
  if prev.shape[-1:] != p_choose.shape[-1:]:
    raise ValueError(
      f'{name}: prev_alignment {prev.shape} and p_choose {p_choose.shape} '
      'must cover the same keys (last dim).'
    )


def choose_probabilities(
  energy: Array, *, noise_std: float = 0.0, rng: Array | None = None
) -> Array:
  """p_choose = sigmoid(energy + N(0, noise_std^2)); noise only with `rng`.

  The pre-sigmoid noise pushes training towards near-binary probabilities, so
  the expected alignment matches the hard alignment used at test time.
  """
  _checks.assert_float(energy, names=('choose_probabilities: energy',))
  energy = energy.astype(jnp.float32)
  if rng is not None and noise_std > 0:
    energy = energy + noise_std * jax.random.normal(rng, energy.shape)
  return jax.nn.sigmoid(energy)


def _linear_recurrence(decay: Array, inputs: Array) -> Array:
  """x_j = decay_j x_{j-1} + inputs_j over the last axis (x_{-1} = 0), as a
  parallel prefix scan: only products of decays and sums, no division."""

  def combine(earlier, later):
    (a1, b1), (a2, b2) = earlier, later
    return a1 * a2, b1 * a2 + b2

  return jax.lax.associative_scan(combine, (decay, inputs), axis=-1)[1]


def monotonic_alignment(
  p_choose: Array,
  prev_alignment: Array,
  *,
  mode: str = 'parallel',
) -> Array:
  """Expected monotonic alignment for one output step.

  alpha_{i,j} = p_{i,j} sum_{k<=j} alpha_{i-1,k} prod_{l=k}^{j-1} (1 - p_{i,l})

  Raffel et al. write it as p_i * cumprod(1 - p_i) * cumsum(alpha_{i-1} /
  cumprod(1 - p_i)) with an exclusive cumprod ([1, x_1, x_1 x_2, ...]),
  whose division underflows to 0/0 on long inputs. Both
  modes here evaluate the equivalent recurrence
  q_j = (1 - p_{j-1}) q_{j-1} + alpha_{i-1,j}, alpha_{i,j} = p_j q_j:
  `'recursive'` as a sequential scan over keys, `'parallel'` as an
  associative (prefix) scan. Neither divides, so both are stable at any
  length, and they agree to float rounding.

  Args:
    p_choose: `[..., k_len]` stopping probabilities (0 at masked keys).
    prev_alignment: `[..., k_len]`, alpha_{i-1}; Raffel start from a one-hot
      at key 0 (`initial_alignment`).
    mode: `'parallel'` or `'recursive'`.

  Returns:
    float32 `[..., k_len]`, summing to at most 1 (the rest is the probability
    of attending to nothing).
  """
  _check_alignment_inputs(p_choose, prev_alignment, 'monotonic_alignment')
  p = p_choose.astype(jnp.float32)
  prev = jnp.broadcast_to(prev_alignment.astype(jnp.float32), p.shape)
  # decay_j = 1 - p_{j-1}; decay_0 is irrelevant (q_{-1} = 0).
  decay = jnp.concatenate([jnp.ones_like(p[..., :1]), 1.0 - p[..., :-1]], -1)
  if mode == 'parallel':
    carried = _linear_recurrence(decay, prev)
  elif mode == 'recursive':

    def step(q_prev, inputs):
      decay_j, prev_j = inputs
      q_j = decay_j * q_prev + prev_j
      return q_j, q_j

    _, carried = jax.lax.scan(
      step,
      jnp.zeros(p.shape[:-1], jnp.float32),
      (jnp.moveaxis(decay, -1, 0), jnp.moveaxis(prev, -1, 0)),
    )
    carried = jnp.moveaxis(carried, 0, -1)
  else:
    raise ValueError(
      f"monotonic mode must be 'parallel' or 'recursive'; got {mode!r}."
    )
  return p * carried


def hard_monotonic_alignment(
  p_choose: Array, prev_alignment: Array, mask: Array | None = None
) -> Array:
  """Test-time monotonic attention: attend to the first key at or after the
  previously attended one whose p_choose >= 0.5.

  If there is none the alignment is all zeros (a zero context) and so are all
  later ones, as in Raffel et al.

  Args:
    p_choose: `[..., k_len]`.
    prev_alignment: `[..., k_len]`, one-hot (or all zeros).
    mask: bool `[..., k_len]` valid keys.

  Returns:
    float32 one-hot (or zero) `[..., k_len]`.
  """
  _check_alignment_inputs(p_choose, prev_alignment, 'hard_monotonic_alignment')
  reached = jnp.cumsum(prev_alignment, axis=-1) > 0
  eligible = reached & (p_choose >= 0.5)
  if mask is not None:
    eligible = eligible & mask
  first = eligible & (jnp.cumsum(eligible, axis=-1) == 1)
  return first.astype(jnp.float32)


def initial_alignment(shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """alpha_0 of monotonic attention, all mass on key 0; `shape` [..., k_len]."""
  if not shape or shape[-1] < 1:
    raise ValueError(f'initial_alignment needs k_len >= 1; got shape {shape}.')
  return jnp.zeros(shape, dtype).at[..., 0].set(1)


def _scan_over_queries(step, init, *xs):
  """Runs `step(carry, *x_t) -> (carry, y_t)` along the query axis (-2) of
  each `x` and stacks the `y_t` back on that axis."""
  moved = [jnp.moveaxis(x, -2, 0) for x in xs]
  carry, ys = jax.lax.scan(lambda c, x: step(c, *x), init, moved)
  return carry, jnp.moveaxis(ys, 0, -2)


def monotonic_weights(
  p_choose: Array,
  mask: Array | None = None,
  *,
  init: Array | None = None,
  hard: bool = False,
  mode: str = 'parallel',
) -> Array:
  """Monotonic alignments for a sequence of output steps.

  Args:
    p_choose: `[..., q_len, k_len]`, one row per output step.
    mask: bool, broadcastable to `p_choose` (valid keys).
    init: `[..., k_len]` alignment before the first step (default: one-hot
      at key 0).
    hard: hard monotonic decoding instead of the expected alignment.
    mode: see `monotonic_alignment`.

  Returns:
    float32 `[..., q_len, k_len]`.
  """
  _checks.assert_min_rank(
    p_choose, 2, 'monotonic_weights: p_choose', '[..., q_len, k_len]'
  )
  _checks.assert_float(p_choose, names=('monotonic_weights: p_choose',))
  p = p_choose.astype(jnp.float32)
  if mask is not None:
    _checks.check_mask(mask, p.shape)
    mask = jnp.broadcast_to(mask, p.shape)
    p = jnp.where(mask, p, 0.0)
  else:
    mask = jnp.ones(p.shape, bool)
  if init is None:
    init = initial_alignment(p.shape[:-2] + p.shape[-1:])
  init = jnp.broadcast_to(init.astype(jnp.float32), p.shape[:-2] + p.shape[-1:])

  def step(prev, p_t, mask_t):
    if hard:
      alpha = hard_monotonic_alignment(p_t, prev, mask_t)
    else:
      alpha = monotonic_alignment(p_t, prev, mode=mode)
    return alpha, alpha

  return _scan_over_queries(step, init, p, mask)[1]


def monotonic_attention(
  q: Array,
  k: Array,
  v: Array,
  score_fn: ScoreFn,
  mask: Array | None = None,
  *,
  init: Array | None = None,
  hard: bool = False,
  noise_std: float = 0.0,
  rng: Array | None = None,
  mode: str = 'parallel',
) -> tuple[Array, Array]:
  """Monotonic attention over a sequence of queries (output steps).

  `score_fn` gives the energies (Raffel use `normed_additive` plus a learned
  scalar bias r, initialised around -4); p_choose = sigmoid(energy + noise).
  Training uses the expected alignment; `hard=True` is test-time decoding.

  Returns:
    `(context [..., q_len, v_depth], weights [..., q_len, k_len])`.
  """
  _check_qkv(q, k, v, 'monotonic_attention')
  energy = score_fn(q, k)
  _check_scores(energy, q, k, 'monotonic_attention')
  p_choose = choose_probabilities(energy, noise_std=noise_std, rng=rng)
  weights = monotonic_weights(p_choose, mask, init=init, hard=hard, mode=mode)
  return weighted_sum(weights, v), weights


# ---------------------------------------------------------------------------
# Location-aware attention (Chorowski et al. 2015).


def uniform_alignment(mask: Array) -> Array:
  """Weights spread evenly over the allowed keys of `mask [..., k_len]`."""
  _checks.check_mask(mask, jnp.shape(mask))
  return masks.masked_softmax(jnp.zeros(mask.shape, jnp.float32), mask)


def location_aware_attention(
  q: Array,
  k: Array,
  v: Array,
  score_fn: ScoreFn,
  mask: Array | None = None,
  *,
  init: Array | None = None,
) -> tuple[Array, Array]:
  """Attention whose scores see the previous step's alignment.

  The queries are consecutive output steps: step t is scored with
  `score_fn(q_t, k, prev_weights)` (e.g. `scores.location_aware` with bound
  weights), `prev_weights` being step t-1's weights.

  Args:
    q, k, v, mask: as in `attention` (mask `[..., 1 or q_len, k_len]`).
    score_fn: `score_fn(q [..., 1, q_depth], k, prev [..., 1, k_len])`.
    init: `[..., k_len]` alignment before the first step (default: uniform
      over the allowed keys).

  Returns:
    `(context [..., q_len, v_depth], weights [..., q_len, k_len])`.
  """
  _check_qkv(q, k, v, 'location_aware_attention')
  q_len, k_len = q.shape[-2], k.shape[-2]
  batch = jnp.broadcast_shapes(q.shape[:-2], k.shape[:-2])
  row_shape = (*batch, q_len, k_len)
  if mask is None:
    mask = jnp.ones((*batch, 1, k_len), bool)
  _checks.check_mask(mask, row_shape)
  mask = jnp.broadcast_to(mask, row_shape)
  if init is None:
    init = uniform_alignment(mask[..., 0, :])
  # The scan's carry is the float32 weights of the previous step.
  init = jnp.broadcast_to(init.astype(jnp.float32), (*batch, k_len))

  def step(prev, q_t, mask_t):
    logits = score_fn(q_t[..., None, :], k, prev[..., None, :])
    weights = masks.masked_softmax(logits, mask_t[..., None, :])[..., 0, :]
    return weights, weights

  q_rows = jnp.broadcast_to(q, (*batch, q_len, q.shape[-1]))
  _, weights = _scan_over_queries(step, init, q_rows, mask)
  return weighted_sum(weights, v), weights
