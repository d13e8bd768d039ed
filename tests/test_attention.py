"""Tests for attnjax.attention: soft, chunked, hard, local, monotonic and
location-aware attention.

Inputs are built in numpy and the library runs under `jax.jit` unless a test
is about eager execution: run eagerly, every primitive compiles on its own and
compile time would dominate the suite.
"""

import functools

import chex
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import attention, masks, scores

B, TQ, TK, QD, KD, VD, HIDDEN = 2, 5, 13, 4, 4, 3, 5

# The suite's time goes into XLA compiling many small programs (custom-VJP
# scans, prefix scans); without backend optimisations that takes about half
# as long, and no checked value depends on it. The chex variants below use
# the default jit.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}
_jit = functools.partial(jax.jit, compiler_options=_FAST_COMPILE)

_monotonic_alignment = _jit(
  attention.monotonic_alignment, static_argnames='mode'
)
_monotonic_weights = _jit(
  attention.monotonic_weights, static_argnames=('hard', 'mode')
)


def _normal(rng, *shape, scale=1.0):
  return (scale * rng.normal(size=shape)).astype(np.float32)


def _qkv(rng, tq=TQ, tk=TK, lead=(B,)):
  return (
    _normal(rng, *lead, tq, QD),
    _normal(rng, *lead, tk, KD),
    _normal(rng, *lead, tk, VD),
  )


def _np_softmax(s, mask=None):
  """Float64 softmax over the last axis; rows with nothing allowed are 0."""
  s = np.asarray(s, np.float64)
  mask = np.ones(s.shape, bool) if mask is None else np.asarray(mask)
  mask = np.broadcast_to(mask, s.shape)
  masked = np.where(mask, s, -np.inf)
  row_max = masked.max(-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(mask, np.exp(masked - row_max), 0.0)
  total = e.sum(-1, keepdims=True)
  return e / np.where(total > 0, total, 1.0)


def _valid(lengths, tk=TK):
  """Valid keys `[batch, tk]` (numpy)."""
  return np.arange(tk) < np.asarray(lengths)[:, None]


def _padding_mask(lengths, tk=TK):
  """Key padding mask `[batch, 1, tk]` (numpy)."""
  return _valid(lengths, tk)[:, None, :]


def _f64(x):
  return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------
# Score functions with their weights, for every registered score.

ALL_SCORES = (
  'dot',
  'scaled_dot',
  'general',
  'additive',
  'normed_additive',
  'cosine',
  'concat',
  'location',
  'location_aware',
)


def _score_setup(name, rng, tq=TQ, tk=TK, batch=B):
  """Returns `(params, bind)`; `bind(params)` is a `score_fn(q, k)`."""
  n = functools.partial(_normal, rng)
  additive = {'w_q': n(QD, HIDDEN), 'w_k': n(KD, HIDDEN), 'v': n(HIDDEN)}
  if name in ('dot', 'scaled_dot', 'cosine'):
    fn = getattr(scores, name)
    return {}, lambda p: fn
  if name == 'general':
    return {'w': n(QD, KD)}, lambda p: functools.partial(scores.general, **p)
  if name == 'additive':
    params = {**additive, 'b': n(HIDDEN)}
    return params, lambda p: functools.partial(scores.additive, **p)
  if name == 'normed_additive':
    params = {**additive, 'b': n(HIDDEN), 'g': np.float32(1.5)}
    return params, lambda p: functools.partial(scores.normed_additive, **p)
  if name == 'concat':
    return {'w': n(QD + KD)}, lambda p: functools.partial(scores.concat, **p)
  if name == 'location':

    def bind_location(p):
      def score_fn(q, k, key_offset=0):
        return scores.location(q, p['w'], k.shape[-2], key_offset=key_offset)

      return score_fn

    return {'w': n(QD, tk + 3)}, bind_location
  if name == 'location_aware':
    params = {
      **additive,
      'prev': _np_softmax(n(batch, tq, tk)).astype(np.float32),
      'conv': n(3, 2),
      'w_f': n(2, HIDDEN),
      'b': n(HIDDEN),
    }

    def bind_location_aware(p):
      def score_fn(q, k, key_offset=0):
        return scores.location_aware(
          q,
          k,
          p['prev'],
          p['w_q'],
          p['w_k'],
          p['conv'],
          p['w_f'],
          p['v'],
          p['b'],
          key_offset=key_offset,
        )

      return score_fn

    return params, bind_location_aware
  raise AssertionError(name)


def _np_scores(name, q, k, params):
  q, k = _f64(q), _f64(k)
  p = {key: _f64(val) for key, val in params.items()}
  if name == 'dot':
    return q @ np.swapaxes(k, -1, -2)
  if name == 'general':
    return q @ p['w'] @ np.swapaxes(k, -1, -2)
  if name == 'additive':
    hidden = (q @ p['w_q'])[..., :, None, :] + (k @ p['w_k'])[..., None, :, :]
    return np.tanh(hidden + p['b']) @ p['v']
  raise AssertionError(name)


# ---------------------------------------------------------------------------
# attention()


@_jit
def _additive_attention(q, k, v, params, mask):
  return attention.attention(
    q, k, v, functools.partial(scores.additive, **params), mask
  )


@pytest.mark.parametrize('name', ['dot', 'general', 'additive'])
@pytest.mark.parametrize('with_mask', [False, True])
def test_attention_matches_numpy(name, with_mask):
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng)
  params, bind = _score_setup(name, rng)
  mask = _padding_mask([TK, 6]) if with_mask else None
  run = _jit(lambda q, k, v, p, m: attention.attention(q, k, v, bind(p), m))
  context, weights = run(q, k, v, params, mask)
  assert context.shape == (B, TQ, VD)
  assert weights.shape == (B, TQ, TK)
  assert weights.dtype == jnp.float32
  assert context.dtype == jnp.float32
  expected_w = _np_softmax(_np_scores(name, q, k, params), mask)
  np.testing.assert_allclose(weights, expected_w, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
    context, expected_w @ _f64(v), atol=1e-5, rtol=1e-5
  )
  if with_mask:
    assert np.all(np.asarray(weights)[1, :, 6:] == 0)


def test_attention_broadcasts_leading_dims():
  rng = np.random.default_rng(1)
  q = _normal(rng, B, 3, TQ, QD)  # [batch, heads, q_len, depth]
  k = _normal(rng, B, 1, TK, KD)
  v = _normal(rng, TK, VD)
  mask = _padding_mask([TK, 4])[:, None]  # [batch, 1, 1, k_len]
  run = _jit(lambda *a: attention.attention(*a[:3], scores.dot, a[3]))
  context, weights = run(q, k, v, mask)
  assert context.shape == (B, 3, TQ, VD)
  assert weights.shape == (B, 3, TQ, TK)
  expected_w = _np_softmax(_np_scores('dot', q, k, {}), mask)
  np.testing.assert_allclose(weights, expected_w, atol=1e-5)
  np.testing.assert_allclose(context, expected_w @ _f64(v), atol=1e-5)


@pytest.mark.parametrize('name', ['dot', 'additive', 'general'])
@pytest.mark.parametrize('junk_scale', [1.0, 1e38])
@pytest.mark.parametrize('chunked', [False, True])
def test_padding_invariance(name, junk_scale, chunked):
  """Keys and values at masked positions never reach the output."""
  rng = np.random.default_rng(2)
  q, k, v = _qkv(rng)
  params, bind = _score_setup(name, rng)
  valid = _valid([9, 4])
  mask = valid[:, None, :]
  k2 = np.where(valid[..., None], k, _normal(rng, *k.shape, scale=junk_scale))
  v2 = np.where(valid[..., None], v, _normal(rng, *v.shape, scale=junk_scale))

  @_jit
  def run(k, v, params):
    if chunked:
      out = attention.chunked_attention(
        q, k, v, bind(params), mask, chunk_size=4
      )
      return out, jnp.zeros(())
    return attention.attention(q, k, v, bind(params), mask)

  context, weights = run(k, v, params)
  context2, weights2 = run(k2, v2, params)
  assert np.all(np.isfinite(context2))
  np.testing.assert_allclose(context2, context, atol=1e-6, rtol=1e-6)
  if not chunked:
    assert np.all(np.isfinite(weights2))
    np.testing.assert_allclose(weights2, weights, atol=1e-7)
    assert np.all(np.asarray(weights2)[:, :, ~valid[1]][1] == 0)


def test_fully_masked_row_gives_zero_context():
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng)
  run = _jit(lambda *a: attention.attention(*a[:3], scores.dot, a[3]))
  context, weights = jax.device_get(run(q, k, v, _padding_mask([TK, 0])))
  np.testing.assert_array_equal(context[1], 0.0)
  np.testing.assert_array_equal(weights[1], 0.0)
  assert np.all(np.isfinite(context))
  # A single fully masked query row in an otherwise valid batch entry.
  row_mask = np.ones((B, TQ, TK), bool)
  row_mask[0, 2] = False
  context, _ = jax.device_get(run(q, k, v, row_mask))
  np.testing.assert_array_equal(context[0, 2], 0.0)
  assert np.all(np.abs(context[0, :2]) > 0)


# ---------------------------------------------------------------------------
# Seed 003 (d2l attention chapter) examples.


def _seed_003_inputs():
  queries = np.ones((2, 1, 2), np.float32)
  keys = np.ones((2, 10, 2), np.float32)
  values = np.repeat(np.arange(40, dtype=np.float32).reshape(1, 10, 4), 2, 0)
  valid_lens = np.array([2, 6])
  return queries, keys, values, valid_lens


SEED_003_EXPECTED = np.array([[[2, 3, 4, 5]], [[10, 11, 12, 13]]], np.float32)


def test_seed_003_dot_product_attention():
  q, k, v, valid_lens = _seed_003_inputs()

  @_jit
  def run(q, k, v, valid_lens):
    mask = masks.length_mask(valid_lens, 10)[:, None, :]
    return (
      attention.attention(q, k, v, scores.scaled_dot, mask)[0],
      attention.dot_product_attention(q, k, v, mask),
    )

  for context in run(q, k, v, valid_lens):
    np.testing.assert_allclose(context, SEED_003_EXPECTED, atol=1e-5)


def test_seed_003_mlp_attention():
  q, k, v, valid_lens = _seed_003_inputs()
  rng = np.random.default_rng(4)
  params = {'w_q': _normal(rng, 2, 8), 'w_k': _normal(rng, 2, 8)}
  params['v'] = _normal(rng, 8)
  mask = masks.length_mask(valid_lens, 10)[:, None, :]
  context, _ = _additive_attention(q, k, v, params, mask)
  np.testing.assert_allclose(context, SEED_003_EXPECTED, atol=1e-5)


# ---------------------------------------------------------------------------
# dot_product_attention vs jax.nn.dot_product_attention.


def _bhtd(rng, heads=3, tq=6, tk=6, depth=8):
  return (
    _normal(rng, B, heads, tq, depth),
    _normal(rng, B, heads, tk, depth),
    _normal(rng, B, heads, tk, depth),
  )


@functools.partial(_jit, static_argnames='scale')
def _both_dot_product_attentions(q, k, v, mask, scale=None):
  ours = attention.dot_product_attention(q, k, v, mask, scale=scale)
  # jax.nn's layout is [batch, len, heads, depth], its mask [b, h, q, k].
  swap = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (*q.shape[:-1], k.shape[-2]))
  theirs = jax.nn.dot_product_attention(
    swap(q), swap(k), swap(v), mask=mask, scale=scale
  )
  return ours, swap(theirs)


@pytest.mark.parametrize('kind', ['none', 'padding', 'causal', 'both'])
@pytest.mark.parametrize('scale', [None, 0.3])
def test_dot_product_attention_matches_jax_nn(kind, scale):
  rng = np.random.default_rng(5)
  q, k, v = _bhtd(rng)
  tq, tk = q.shape[2], k.shape[2]
  padding = _valid([tk, 3], tk)[:, None, None, :]
  causal = np.tril(np.ones((tq, tk), bool))
  mask = {
    'none': None,
    'padding': padding,
    'causal': causal,
    'both': padding & causal,
  }[kind]
  ours, theirs = _both_dot_product_attentions(q, k, v, mask, scale=scale)
  assert ours.shape == q.shape[:-1] + (v.shape[-1],)
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_dot_product_attention_bfloat16():
  rng = np.random.default_rng(6)
  q, k, v = _bhtd(rng)
  mask = np.tril(np.ones((q.shape[2],) * 2, bool))
  run = _jit(attention.dot_product_attention)
  expected = run(q, k, v, mask)
  out = run(*[jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)], mask)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(out, np.float32), expected, atol=5e-2, rtol=5e-2
  )


def test_dot_product_attention_bfloat16_matches_jax_nn():
  # depth 12: the default scale 12 ** -0.5 is not a power of two, so
  # scaling the bfloat16 queries before the product (rather than the
  # float32 logits, as jax.nn does) rounds once more: 2 ulps off.
  rng = np.random.default_rng(6)
  q, k, v = (
    jnp.asarray(3 * x, jnp.bfloat16) for x in _bhtd(rng, tq=8, tk=8, depth=12)
  )
  ours, theirs = _both_dot_product_attentions(q, k, v, None)
  assert ours.dtype == jnp.bfloat16
  # At most 1 bfloat16 ulp apart.
  np.testing.assert_allclose(
    np.asarray(ours, np.float32),
    np.asarray(theirs, np.float32),
    rtol=2**-7,
    atol=1e-2,
  )


def test_dot_product_attention_equals_attention_scaled_dot():
  rng = np.random.default_rng(7)
  q, k, v = _bhtd(rng)

  @_jit
  def run(q, k, v):
    mask = masks.causal_mask(q.shape[-2])
    return (
      attention.dot_product_attention(q, k, v, mask),
      attention.attention(q, k, v, scores.scaled_dot, mask)[0],
    )

  ours, expected = run(q, k, v)
  np.testing.assert_allclose(ours, expected, atol=1e-5)


# ---------------------------------------------------------------------------
# chunked_attention == attention, value and gradient, for every score.

CB = 3  # batch of the chunked tests: a full, a padded and an empty entry

CHUNK_CONFIGS = {
  # name: (chunk_size, key lengths or None, causal)
  # 13 keys in chunks of 4: three full chunks and a remainder of 1. The
  # mask is a full [batch, q_len, k_len] one (padding with random holes);
  # query 1 of entry 0 and all of entry 2 have no valid key.
  'ragged_masked': (4, [TK, 7, 0], False),
  # Causal with k_len > q_len, over chunks of 5 (remainder 3), and a
  # factored key padding mask [batch, 1, k_len].
  'causal_padded': (5, [TK, 10, TK], True),
  # One chunk holds every key (chunk_size >= k_len), no mask.
  'single_chunk': (16, None, False),
}


def _chunked_and_dense_grads(name, config, seed=8):
  """Values and gradients of chunked and of dense attention, both jitted."""
  chunk_size, lengths, causal = CHUNK_CONFIGS[config]
  rng = np.random.default_rng(seed)
  q, k, v = _qkv(rng, lead=(CB,))
  params, bind = _score_setup(name, rng, batch=CB)
  cotangent = _normal(rng, CB, TQ, VD)
  mask = None if lengths is None else _padding_mask(lengths)
  if config == 'ragged_masked':
    mask = mask & (rng.uniform(size=(CB, TQ, TK)) < 0.7)
    mask[0, 1] = False

  def chunked_loss(q, k, v, params):
    out = attention.chunked_attention(
      q, k, v, bind(params), mask, chunk_size=chunk_size, causal=causal
    )
    return jnp.sum(out * cotangent), out

  def dense_loss(q, k, v, params):
    causal_mask = masks.causal_mask(TQ, TK) if causal else None
    dense_mask = masks.combine(mask, causal_mask)
    out, _ = attention.attention(q, k, v, bind(params), dense_mask)
    return jnp.sum(out * cotangent), out

  @_jit  # one program for both: compiling is most of the cost
  def run(q, k, v, params):
    results = []
    for loss in (chunked_loss, dense_loss):
      fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
      (_, out), grads = fn(q, k, v, params)
      results.append((out, grads))
    return results

  return jax.device_get(run(q, k, v, params))


def _assert_trees_close(got, want, atol, rtol):
  chex.assert_trees_all_equal_structs(got, want)
  for (path, x), y in zip(
    jax.tree.leaves_with_path(got), jax.tree.leaves(want), strict=True
  ):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(x)), name
    np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=name)


@pytest.mark.parametrize('config', list(CHUNK_CONFIGS))
@pytest.mark.parametrize('name', ALL_SCORES)
def test_chunked_matches_dense(name, config):
  (out, grads), (expected_out, expected_grads) = _chunked_and_dense_grads(
    name, config
  )
  assert out.shape == (CB, TQ, VD) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected_out, atol=1e-5, rtol=1e-5)
  _assert_trees_close(grads, expected_grads, atol=1e-4, rtol=1e-4)
  if config == 'ragged_masked':
    # Queries with no valid key: zero context, zero (finite) gradients.
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_array_equal(out[0, 1], 0.0)
    np.testing.assert_array_equal(grads[0][0, 1], 0.0)
    for g in grads[:3]:
      np.testing.assert_array_equal(g[2], 0.0)
    if name == 'location_aware':
      np.testing.assert_array_equal(grads[3]['prev'][2], 0.0)
      np.testing.assert_array_equal(grads[3]['prev'][0, 1], 0.0)


@pytest.mark.parametrize(
  'q_batch, k_batch, v_batch, mask_batch, lengths',
  [
    # Heads broadcast against shared keys and batch-free values.
    ((B, 3), (B, 1), (), (B, 1), [TK, 5]),
    # Values carry a batch the scores (and so the mask) lack.
    ((), (), (B,), (), [5]),
  ],
)
def test_chunked_broadcast_leading_dims(
  q_batch, k_batch, v_batch, mask_batch, lengths
):
  rng = np.random.default_rng(9)
  q = _normal(rng, *q_batch, TQ, QD)
  k = _normal(rng, *k_batch, TK, KD)
  v = _normal(rng, *v_batch, TK, VD)
  mask = _padding_mask(lengths).reshape(*mask_batch, 1, TK)
  params, bind = _score_setup('additive', rng)
  out_batch = np.broadcast_shapes(q_batch, k_batch, v_batch, mask_batch)
  cotangent = _normal(rng, *out_batch, TQ, VD)

  def chunked(q, k, v, score_fn):
    return attention.chunked_attention(q, k, v, score_fn, mask, chunk_size=4)

  def dense(q, k, v, score_fn):
    return attention.attention(q, k, v, score_fn, mask)[0]

  @_jit
  def run(q, k, v, params):
    results = []
    for fn in (chunked, dense):

      def loss(q, k, v, params, fn=fn):
        return jnp.sum(fn(q, k, v, bind(params)) * cotangent)

      results.append(jax.value_and_grad(loss, (0, 1, 2, 3))(q, k, v, params))
    return results

  (value, grads), (expected_value, expected_grads) = run(q, k, v, params)
  np.testing.assert_allclose(value, expected_value, atol=1e-4, rtol=1e-5)
  _assert_trees_close(grads, expected_grads, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# chunked_attention's memory structure, read off the jaxpr.


def _all_avals(jaxpr):
  """Every aval in `jaxpr` and, recursively, in the jaxprs of its eqns."""
  if isinstance(jaxpr, jex.core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  for var in (*jaxpr.constvars, *jaxpr.invars, *jaxpr.outvars):
    yield var.aval
  for eqn in jaxpr.eqns:
    for var in (*eqn.invars, *eqn.outvars):
      yield var.aval
    for param in eqn.params.values():
      subs = param if isinstance(param, (tuple, list)) else (param,)
      for sub in subs:
        if isinstance(sub, (jex.core.Jaxpr, jex.core.ClosedJaxpr)):
          yield from _all_avals(sub)


def _largest_aval(jaxpr):
  return max(int(np.prod(getattr(a, 'shape', ()))) for a in _all_avals(jaxpr))


@pytest.mark.parametrize('kind', ['none', 'padding', 'causal'])
def test_chunked_memory_structure(kind):
  q_len, k_len, chunk, hidden, depth = 64, 4096, 128, 8, 4
  # Only traced: no array of these shapes is ever computed.
  q = jax.ShapeDtypeStruct((q_len, depth), jnp.float32)
  k = v = jax.ShapeDtypeStruct((k_len, depth), jnp.float32)
  params = {
    'w_q': jax.ShapeDtypeStruct((depth, hidden), jnp.float32),
    'w_k': jax.ShapeDtypeStruct((depth, hidden), jnp.float32),
    'v': jax.ShapeDtypeStruct((hidden,), jnp.float32),
    'b': jax.ShapeDtypeStruct((hidden,), jnp.float32),
  }
  mask = np.ones((1, k_len), bool) if kind == 'padding' else None
  causal = kind == 'causal'

  def chunked_loss(q, k, v, params):
    score_fn = functools.partial(scores.additive, **params)
    out = attention.chunked_attention(
      q, k, v, score_fn, mask, chunk_size=chunk, causal=causal
    )
    return jnp.sum(out)

  def dense_loss(q, k, v, params):
    score_fn = functools.partial(scores.additive, **params)
    dense_mask = masks.causal_mask(q_len, k_len) if causal else mask
    return jnp.sum(attention.attention(q, k, v, score_fn, dense_mask)[0])

  def jaxpr_of(fn):
    return jax.make_jaxpr(fn)(q, k, v, params)

  limit = q_len * k_len
  assert depth * k_len < limit  # inputs alone stay under the limit
  # The dense gradient materialises [q_len, k_len]: the check can fail.
  assert _largest_aval(jaxpr_of(jax.grad(dense_loss, (0, 1, 2, 3)))) >= limit
  assert _largest_aval(jaxpr_of(jax.grad(chunked_loss, (0, 1, 2, 3)))) < limit
  assert _largest_aval(jaxpr_of(chunked_loss)) < limit


def test_chunked_location_score_stays_chunked():
  # The location score's weights have one column per key; under chunking
  # only the chunk's columns may be multiplied, never all k_len at once.
  q_len, k_len, chunk, depth = 64, 4096, 128, 4
  q = jax.ShapeDtypeStruct((q_len, depth), jnp.float32)
  k = v = jax.ShapeDtypeStruct((k_len, depth), jnp.float32)
  w = jax.ShapeDtypeStruct((depth, k_len), jnp.float32)

  def loss(q, k, v, w, chunked):
    def score_fn(q, k, key_offset=0):
      return scores.location(q, w, k.shape[-2], key_offset=key_offset)

    if chunked:
      out = attention.chunked_attention(q, k, v, score_fn, chunk_size=chunk)
    else:
      out = attention.attention(q, k, v, score_fn)[0]
    return jnp.sum(out)

  def largest(chunked):
    grad = jax.grad(functools.partial(loss, chunked=chunked), (0, 1, 2, 3))
    return _largest_aval(jax.make_jaxpr(grad)(q, k, v, w))

  assert largest(chunked=False) >= q_len * k_len
  assert largest(chunked=True) < q_len * k_len


def test_chunked_score_may_close_over_any_tracer():
  # A custom score closing over vmapped integer positions (into a bias
  # table) and weights: the closed-over tracers must not escape
  # chunked_attention's custom VJP (they did: UnexpectedTracerError).
  rng = np.random.default_rng(12)
  q, k, v = _qkv(rng)
  table, w = jnp.asarray(_normal(rng, TK + 2)), _normal(rng, 3, QD, KD)

  def loss(q, positions, w, chunked):
    def score_fn(q, k, key_offset=0):
      pos = jax.lax.dynamic_slice_in_dim(positions, key_offset, k.shape[-2])
      return scores.general(q, k, w) + table[pos]

    if chunked:
      out = attention.chunked_attention(q, k, v, score_fn, chunk_size=4)
    else:
      out = attention.attention(q, k, v, score_fn)[0]
    return jnp.sum(out**2)

  @_jit  # one program for both
  def run(q, positions, w):
    results = []
    for chunked in (True, False):
      per_w = functools.partial(loss, chunked=chunked)
      total = lambda q, pos, w, f=per_w: jnp.sum(
        jax.vmap(f, (None, 0, 0))(q, pos, w)
      )
      results.append(jax.grad(total, (0, 2))(q, positions, w))
    return results

  positions = np.arange(TK) + np.arange(3)[:, None]
  got, want = run(q, positions, w)
  _assert_trees_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_bfloat16_weight_gradient_summed_in_float32():
  # A bfloat16 weight's gradient is a sum over 512 one-key chunks: summed
  # in bfloat16 it was 2.4x further from the float32 gradient than dense
  # attention's (7x at larger sizes); summed in float32, 1.1x.
  rng = np.random.default_rng(14)
  q, k, v = _qkv(rng, tk=512)
  w = 0.3 * _normal(rng, QD, KD)
  cotangent = _normal(rng, B, TQ, VD)

  def loss(w, q, k, v, chunked):
    score_fn = functools.partial(scores.general, w=w)
    if chunked:
      out = attention.chunked_attention(q, k, v, score_fn, chunk_size=1)
    else:
      out = attention.attention(q, k, v, score_fn)[0]
    return jnp.sum(out.astype(jnp.float32) * cotangent)

  @_jit
  def run(w, q, k, v):
    half = [jnp.asarray(x, jnp.bfloat16) for x in (w, q, k, v)]
    exact = [x.astype(jnp.float32) for x in half]
    return [
      jax.grad(loss)(*half, True),
      jax.grad(loss)(*half, False),
      jax.grad(loss)(*exact, False),
    ]

  chunked, dense, exact = (np.asarray(g, np.float32) for g in run(w, q, k, v))
  assert np.abs(chunked - exact).max() <= 1.5 * np.abs(dense - exact).max()


def test_chunked_equals_dense_when_the_score_rules_out_a_whole_row():
  # No mask, but the score itself is -inf on every key of query 1 (e.g. a
  # bias table): the dense softmax gave NaN there, the chunked one 0.
  rng = np.random.default_rng(15)
  q, k, v = _qkv(rng)
  blocked = (np.arange(TQ) == 1)[:, None]

  def score_fn(q, k):
    return jnp.where(blocked, -jnp.inf, scores.dot(q, k))

  def loss(q, k, v, chunked):
    if chunked:
      out = attention.chunked_attention(q, k, v, score_fn, chunk_size=4)
    else:
      out = attention.attention(q, k, v, score_fn)[0]
    return jnp.sum(out), out

  @_jit
  def run(q, k, v):
    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    return grad(q, k, v, True), grad(q, k, v, False)

  (chunked_grads, chunked), (dense_grads, dense) = run(q, k, v)
  np.testing.assert_array_equal(dense[:, 1], 0.0)
  np.testing.assert_allclose(dense, chunked, atol=1e-5, rtol=1e-5)
  _assert_trees_close(dense_grads, chunked_grads, atol=1e-4, rtol=1e-4)


def test_chunked_without_keys_equals_dense():
  # No key at all: a zero context, as from attention(), not a division by 0.
  q, k, v = _qkv(np.random.default_rng(13), tk=0)
  run = _jit(
    lambda q, k, v: (
      attention.chunked_attention(q, k, v, scores.dot, chunk_size=4),
      attention.attention(q, k, v, scores.dot)[0],
    )
  )
  out, expected = run(q, k, v)
  assert out.shape == expected.shape == (B, TQ, VD)
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(out, 0.0)


# ---------------------------------------------------------------------------
# Errors.


def _run_chunked(q, k, v, score_fn, mask=None):
  return attention.chunked_attention(q, k, v, score_fn, mask, chunk_size=4)


def _run_attention(q, k, v, score_fn, mask=None):
  return attention.attention(q, k, v, score_fn, mask)


RUNNERS = pytest.mark.parametrize(
  'run', [_run_attention, _run_chunked], ids=['attention', 'chunked']
)


@pytest.mark.parametrize('chunk_size', [0, -1, True, 2.0, np.int64(0)])
def test_chunked_rejects_bad_chunk_size(chunk_size):
  q, k, v = _qkv(np.random.default_rng(10))
  with pytest.raises(ValueError, match='chunk_size'):
    attention.chunked_attention(q, k, v, scores.dot, chunk_size=chunk_size)


def test_chunked_takes_a_numpy_chunk_size():
  q, k, v = _qkv(np.random.default_rng(10))
  np.testing.assert_array_equal(
    attention.chunked_attention(q, k, v, scores.dot, chunk_size=np.int64(3)),
    attention.chunked_attention(q, k, v, scores.dot, chunk_size=3),
  )


@RUNNERS
def test_rejects_non_bool_mask(run):
  q, k, v = _qkv(np.random.default_rng(11))
  mask = np.ones((B, 1, TK), np.float32)
  with pytest.raises(TypeError, match='boolean'):
    run(q, k, v, scores.dot, mask)


@RUNNERS
def test_rejects_mask_that_does_not_broadcast(run):
  q, k, v = _qkv(np.random.default_rng(12))
  mask = np.ones((B, 1, TK + 1), bool)
  with pytest.raises(ValueError, match='broadcast'):
    run(q, k, v, scores.dot, mask)


@RUNNERS
def test_rejects_rank_1_queries(run):
  _, k, v = _qkv(np.random.default_rng(13))
  with pytest.raises(ValueError, match='rank'):
    run(np.ones((QD,), np.float32), k, v, scores.dot)


@RUNNERS
def test_rejects_key_value_length_mismatch(run):
  q, k, v = _qkv(np.random.default_rng(14))
  with pytest.raises(ValueError, match='same length'):
    run(q, k, v[:, :-1], scores.dot)


@RUNNERS
def test_rejects_score_of_wrong_shape(run):
  q, k, v = _qkv(np.random.default_rng(15))

  def bad_score(q, k):
    return scores.dot(q, k)[..., :-1]

  with pytest.raises(ValueError, match='score_fn must return'):
    _jit(lambda q, k, v: run(q, k, v, bad_score))(q, k, v)


def test_dot_product_attention_rejects_depth_mismatch():
  rng = np.random.default_rng(16)
  with pytest.raises(ValueError, match='depths differ'):
    attention.dot_product_attention(
      _normal(rng, 2, 3), _normal(rng, 4, 5), _normal(rng, 4, 5)
    )


def test_chunked_causal_rejects_short_keys():
  q, k, v = _qkv(np.random.default_rng(17), tq=6, tk=4)
  with pytest.raises(ValueError, match='causal'):
    attention.chunked_attention(q, k, v, scores.dot, causal=True)


# ---------------------------------------------------------------------------
# jit vs no jit.


class JitVariantsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_attention(self):
    rng = np.random.default_rng(18)
    q, k, v = _qkv(rng)
    mask = _padding_mask([TK, 5])

    @self.variant
    def fn(q, k, v, mask):
      return attention.attention(q, k, v, scores.scaled_dot, mask)

    context, weights = fn(q, k, v, mask)
    expected_w = _np_softmax(_np_scores('dot', q, k, {}) / np.sqrt(QD), mask)
    np.testing.assert_allclose(weights, expected_w, atol=1e-5)
    np.testing.assert_allclose(context, expected_w @ _f64(v), atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_chunked_attention(self):
    rng = np.random.default_rng(19)
    q, k, v = _qkv(rng)
    params, bind = _score_setup('additive', rng)
    mask = _padding_mask([TK, 5])

    @self.variant
    def fn(q, k, v, params, mask):
      return attention.chunked_attention(
        q, k, v, bind(params), mask, chunk_size=4
      )

    expected, _ = _additive_attention(q, k, v, params, mask)
    np.testing.assert_allclose(fn(q, k, v, params, mask), expected, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_monotonic_weights(self):
    rng = np.random.default_rng(20)
    p = rng.uniform(size=(B, TQ, TK)).astype(np.float32)
    mask = _padding_mask([TK, 8])

    @self.variant
    def fn(p, mask):
      return attention.monotonic_weights(p, mask)

    expected = _np_monotonic_weights(np.where(mask, p, 0.0))
    np.testing.assert_allclose(fn(p, mask), expected, atol=1e-6)


# ---------------------------------------------------------------------------
# Hard attention.


def _hard_inputs(rng):
  logits = _normal(rng, B, 3, 6)
  mask = np.array(
    [[[True, True, False, True, True, False]], [[True] * 3 + [False] * 3]]
  )
  # The largest logit of each row sits on a masked key.
  logits[0, :, 2] = 10.0
  logits[1, :, 4] = 10.0
  return logits, mask


def _one_hot_argmax(logits, mask):
  allowed = np.broadcast_to(mask, logits.shape)
  idx = np.argmax(np.where(allowed, logits, -np.inf), -1)
  return np.eye(logits.shape[-1])[idx]


_hard_weights = _jit(attention.hard_weights, static_argnames='temperature')


def test_hard_weights_argmax_without_rng():
  logits, mask = _hard_inputs(np.random.default_rng(21))
  weights = np.asarray(_hard_weights(logits, mask))
  np.testing.assert_array_equal(weights, _one_hot_argmax(logits, mask))
  assert np.all(weights[~np.broadcast_to(mask, logits.shape)] == 0)
  # Fully masked rows give zeros.
  empty = _hard_weights(logits, np.zeros((B, 1, 6), bool))
  np.testing.assert_array_equal(empty, 0.0)


def test_hard_attention_context_picks_one_value():
  rng = np.random.default_rng(22)
  q, k, v = _qkv(rng)
  mask = _padding_mask([TK, 4])
  run = _jit(lambda *a: attention.hard_attention(*a[:3], scores.dot, a[3]))
  context, weights = run(q, k, v, mask)
  one_hot = _one_hot_argmax(_np_scores('dot', q, k, {}), mask)
  np.testing.assert_array_equal(weights, one_hot)
  np.testing.assert_allclose(context, one_hot @ _f64(v), atol=1e-6)


def test_hard_weights_sampling():
  logits, mask = _hard_inputs(np.random.default_rng(23))
  logits *= 0.5
  logits[0, :, 2] = 10.0
  # 2000 draws at once: one key, the logits broadcast along a sample axis.
  # (An 'rbg' key because threefry takes seconds to compile on CPU.)
  samples = _jit(
    lambda logits, rng: attention.hard_weights(
      jnp.broadcast_to(logits, (2000, *logits.shape)),
      mask,
      rng=rng,
      temperature=0.7,
    )
  )(logits, jax.random.key(0, impl='rbg'))
  samples = np.asarray(samples)
  allowed = np.broadcast_to(mask, logits.shape)
  # Forward values are exactly one-hot on an allowed key.
  np.testing.assert_array_equal(samples.sum(-1), 1.0)
  assert np.all((samples == 0) | (samples == 1))
  assert np.all(samples[:, ~allowed] == 0)
  # Choice frequencies follow softmax(logits) over the allowed keys.
  frequencies = (samples > 0.5).mean(0)
  np.testing.assert_allclose(frequencies, _np_softmax(logits, mask), atol=0.03)


def test_hard_weights_straight_through_gradient():
  logits, mask = _hard_inputs(np.random.default_rng(24))
  rng = jax.random.key(3, impl='rbg')  # see test_hard_weights_sampling
  temperature = 0.5
  cotangent = _normal(np.random.default_rng(25), *logits.shape)

  @_jit
  def run(logits):
    def hard_loss(logits):
      w = attention.hard_weights(logits, mask, rng=rng, temperature=temperature)
      return jnp.sum(w * cotangent), w

    gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)

    def soft_loss(logits):
      w = masks.masked_softmax((logits + gumbel) / temperature, mask)
      return jnp.sum(w * cotangent)

    got, w = jax.grad(hard_loss, has_aux=True)(logits)
    return got, jax.grad(soft_loss)(logits), w, gumbel

  got, want, w, gumbel = run(logits)
  assert np.any(np.asarray(got) != 0)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # The forward value is exactly the one-hot of the Gumbel argmax.
  expected = _one_hot_argmax(logits + np.asarray(gumbel), mask)
  np.testing.assert_array_equal(w, expected)


def test_hard_weights_rejects_bad_temperature():
  with pytest.raises(ValueError, match='temperature'):
    attention.hard_weights(np.zeros((2, 3), np.float32), temperature=0.0)


# ---------------------------------------------------------------------------
# Local attention (Luong 2015).


@pytest.mark.parametrize('width', [0, 1, 3])
def test_local_window_mask(width):
  centers = np.array([[0.0, 2.0, 4.5, 9.0], [3.0, 3.3, 7.7, 8.0]], np.float32)
  got = _jit(attention.local_window_mask, static_argnums=(1, 2))(
    centers, 10, width
  )
  expected = np.abs(np.arange(10) - centers[..., None]) <= width
  assert got.dtype == jnp.bool_
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize('with_mask', [False, True])
def test_local_m_weights(with_mask):
  rng = np.random.default_rng(26)
  q, k, v = _qkv(rng, tq=6, tk=10)
  width = 2
  centers = np.arange(6, dtype=np.float32)
  mask = _padding_mask([10, 7], tk=10) if with_mask else None
  run = _jit(
    lambda q, k, v, c, m: attention.local_attention(
      q, k, v, scores.dot, c, width=width, mask=m
    )
  )
  context, weights = run(q, k, v, centers, mask)
  w = np.asarray(weights)
  window = np.abs(np.arange(10) - np.arange(6)[:, None]) <= width
  allowed = np.broadcast_to(window if mask is None else window & mask, w.shape)
  assert np.all(w[~allowed] == 0)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  expected = _np_softmax(_np_scores('dot', q, k, {}), allowed)
  np.testing.assert_allclose(w, expected, atol=1e-5)
  np.testing.assert_allclose(context, expected @ _f64(v), atol=1e-5)


def test_local_p_weights():
  rng = np.random.default_rng(27)
  q, k, v = _qkv(rng, tq=6, tk=12)
  width = 3
  lengths = np.array([12, 8])
  w_p, v_p = _normal(rng, QD, 7), _normal(rng, 7)

  @_jit
  def run(q, k, v, lengths):
    centers = attention.predict_positions(q, w_p, v_p, lengths)
    mask = masks.length_mask(lengths, 12)[:, None, :]
    return centers, attention.local_attention(
      q, k, v, scores.dot, centers, width=width, mask=mask, gaussian=True
    )

  centers, (context, weights) = run(q, k, v, lengths)
  assert centers.shape == (B, 6)
  # p_t = S sigmoid(v_p^T tanh(W_p h_t)), S the last valid position.
  energy = np.tanh(_f64(q) @ _f64(w_p)) @ _f64(v_p)
  expected_centers = (lengths - 1)[:, None] / (1 + np.exp(-energy))
  np.testing.assert_allclose(centers, expected_centers, atol=1e-5)
  c = _f64(centers)[..., None]
  s = np.arange(12)
  window = (np.abs(s - c) <= width) & _padding_mask(lengths, 12)
  gauss = np.exp(-((s - c) ** 2) / (2 * (width / 2) ** 2))
  expected = _np_softmax(_np_scores('dot', q, k, {}), window) * gauss
  np.testing.assert_allclose(weights, expected, atol=1e-5)
  np.testing.assert_allclose(context, expected @ _f64(v), atol=1e-5)
  assert np.all(np.asarray(weights).sum(-1) <= 1 + 1e-6)


def test_predict_positions_in_range():
  rng = np.random.default_rng(28)
  h = _normal(rng, 3, 50, QD, scale=5.0)
  w_p, v_p = _normal(rng, QD, 6, scale=3.0), _normal(rng, 6, scale=10.0)
  lengths = np.array([1, 7, 30])
  p = np.asarray(_jit(attention.predict_positions)(h, w_p, v_p, lengths))
  assert p.dtype == np.float32
  assert np.all(p >= 0)
  assert np.all(p <= (lengths - 1)[:, None])
  np.testing.assert_array_equal(p[0], 0.0)
  # Saturation reaches both ends of the source.
  assert p[2].min() < 1.0 and p[2].max() > 28.0


def test_local_attention_rejects_bad_width():
  q, k, v = _qkv(np.random.default_rng(29))
  centers = np.zeros((TQ,), np.float32)
  with pytest.raises(ValueError, match='D >= 1'):
    attention.local_attention(
      q, k, v, scores.dot, centers, width=0, gaussian=True
    )
  with pytest.raises(ValueError, match='>= 0'):
    attention.local_attention(q, k, v, scores.dot, centers, width=-1)
  with pytest.raises(ValueError, match='>= 0'):
    attention.local_window_mask(centers, TK, -1)


# ---------------------------------------------------------------------------
# Monotonic attention (Raffel 2017).


def _np_raffel(p, prev):
  """alpha_j = p_j sum_{k<=j} prev_k prod_{l=k}^{j-1} (1 - p_l), with loops."""
  p, prev = _f64(p), np.broadcast_to(_f64(prev), np.shape(p))
  out = np.zeros(p.shape)
  for idx in np.ndindex(p.shape[:-1]):
    for j in range(p.shape[-1]):
      total = 0.0
      for k in range(j + 1):
        prod = 1.0
        for m in range(k, j):
          prod *= 1.0 - p[idx][m]
        total += prev[idx][k] * prod
      out[idx][j] = p[idx][j] * total
  return out


def _np_monotonic_weights(p, init=None):
  """Expected alignments row by row, from a one-hot at key 0 by default."""
  p = _f64(p)
  if init is None:
    init = np.zeros(p.shape[:-2] + p.shape[-1:])
    init[..., 0] = 1
  prev, rows = _f64(init), []
  for t in range(p.shape[-2]):
    prev = _np_raffel(p[..., t, :], prev)
    rows.append(prev)
  return np.stack(rows, -2)


def _random_alignment(rng, *shape):
  """Nonnegative rows with total mass in [0.5, 1]."""
  x = rng.uniform(size=shape)
  mass = rng.uniform(0.5, 1.0, size=shape[:-1] + (1,))
  return (x / x.sum(-1, keepdims=True) * mass).astype(np.float32)


@pytest.mark.parametrize('mode', ['recursive', 'parallel'])
def test_monotonic_alignment_matches_raffel(mode):
  rng = np.random.default_rng(30)
  p = rng.uniform(size=(3, 2, 9)).astype(np.float32)
  # Exact 0s and 1s.
  p[0, 0, 3] = 1.0
  p[0, 1, 0] = 0.0
  p[1, 0, 5:] = 0.0
  p[2, 1, :] = 1.0
  p[2, 0, :4] = 0.0
  prev = _random_alignment(rng, 3, 2, 9)
  got = _monotonic_alignment(p, prev, mode=mode)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_raffel(p, prev), atol=1e-6)
  assert np.all(np.asarray(got).sum(-1) <= 1 + 1e-6)
  assert np.all(np.asarray(got) >= 0)


def test_monotonic_alignment_modes_agree():
  rng = np.random.default_rng(31)
  p = rng.uniform(size=(4, 17)).astype(np.float32)
  prev = _random_alignment(rng, 4, 17)
  np.testing.assert_allclose(
    _monotonic_alignment(p, prev, mode='recursive'),
    _monotonic_alignment(p, prev, mode='parallel'),
    atol=1e-6,
  )
  # From the initial one-hot, the mass sums to at most 1.
  init = np.asarray(attention.initial_alignment((4, 17)))
  np.testing.assert_array_equal(init, np.eye(17)[[0] * 4])
  alpha = np.asarray(_monotonic_alignment(p, init))
  assert np.all(alpha.sum(-1) <= 1 + 1e-6)
  np.testing.assert_allclose(alpha, _np_raffel(p, init), atol=1e-6)


def test_monotonic_alignment_rejects_unknown_mode():
  with pytest.raises(ValueError, match='parallel'):
    attention.monotonic_alignment(np.ones(3), np.ones(3), mode='x')


def _np_recurrence(p, prev):
  """Float64 q_j = (1 - p_{j-1}) q_{j-1} + prev_j, alpha_j = p_j q_j."""
  p, prev = _f64(p), _f64(prev)
  out = np.zeros(p.shape)
  q = prev[..., 0]
  for j in range(p.shape[-1]):
    if j:
      q = q * (1.0 - p[..., j - 1]) + prev[..., j]
    out[..., j] = p[..., j] * q
  return out


def test_monotonic_alignment_long_inputs_are_stable():
  rng = np.random.default_rng(32)
  k_len = 2000
  p = rng.uniform(0.5, 0.999, size=(2, k_len)).astype(np.float32)
  prev = np.zeros((2, k_len), np.float32)
  prev[:, -20:] = rng.uniform(size=(2, 20))
  prev /= prev.sum(-1, keepdims=True)
  recursive = np.asarray(_monotonic_alignment(p, prev, mode='recursive'))
  parallel = np.asarray(_monotonic_alignment(p, prev, mode='parallel'))
  for alpha in (recursive, parallel):
    assert np.all(np.isfinite(alpha))
    assert np.all(alpha.sum(-1) <= 1 + 1e-5)
    assert np.all(alpha >= 0)
  np.testing.assert_allclose(recursive, parallel, atol=1e-6)
  np.testing.assert_allclose(parallel, _np_recurrence(p, prev), atol=1e-6)
  # The mass stays near the end, where it started.
  assert parallel[:, -20:].sum() > 1.0


def test_monotonic_alignment_gradients():
  rng = np.random.default_rng(33)
  k_len = 2000
  p = rng.uniform(0.5, 0.999, size=(2, k_len)).astype(np.float32)
  p[0, 1] = 1.0
  p[1, 2] = 0.0
  prev = _random_alignment(rng, 2, k_len)
  cotangent = _normal(rng, 2, k_len)

  @_jit
  def grads(p, prev):
    def loss(p, prev, mode):
      alpha = attention.monotonic_alignment(p, prev, mode=mode)
      return jnp.sum(alpha * cotangent)

    grad = jax.grad(loss, argnums=(0, 1))
    return grad(p, prev, 'recursive'), grad(p, prev, 'parallel')

  recursive, parallel = grads(p, prev)
  for got, want in zip(recursive, parallel, strict=True):
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(want))
    assert np.any(np.asarray(got) != 0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _python_hard_monotonic(p, valid):
  """First valid key at or after the previous one with p >= 0.5, as a loop."""
  q_len, k_len = p.shape
  out = np.zeros((q_len, k_len))
  position = 0
  for t in range(q_len):
    if position is None:
      break
    position = next(
      (j for j in range(position, k_len) if p[t, j] >= 0.5 and valid[j]), None
    )
    if position is not None:
      out[t, position] = 1.0
  return out


def test_monotonic_weights_hard():
  rng = np.random.default_rng(34)
  p = (rng.uniform(size=(3, 7, 10)) < 0.3).astype(np.float32)
  p[1, 3:, :] = 0.0  # batch 1 runs out of keys at step 3
  p[2, :, 4] = 1.0  # a masked key with p = 1
  p[2, :, 8:] = 1.0  # and padding with p = 1
  valid = _valid([10, 10, 8], 10)
  valid[2, 4] = False
  weights = np.asarray(_monotonic_weights(p, valid[:, None, :], hard=True))
  for b in range(3):
    expected = _python_hard_monotonic(p[b], valid[b])
    np.testing.assert_array_equal(weights[b], expected)
  np.testing.assert_array_equal(weights[1, 3:], 0.0)
  assert np.all(weights[2][:, ~valid[2]] == 0)
  assert set(np.unique(weights)) <= {0.0, 1.0}
  # Chosen positions never move backwards.
  for b in range(3):
    chosen = [np.argmax(row) for row in weights[b] if row.any()]
    assert chosen == sorted(chosen)


def test_monotonic_weights_soft_approaches_hard():
  rng = np.random.default_rng(35)
  shape = (2, 6, 9)
  energies = rng.uniform(0.2, 1.0, size=shape)
  energies *= rng.choice([-1.0, 1.0], size=shape, p=[0.7, 0.3])
  p = (1 / (1 + np.exp(-energies * 50))).astype(np.float32)
  mask = _padding_mask([9, 7], tk=9)
  soft = np.asarray(_monotonic_weights(p, mask))
  hard = np.asarray(_monotonic_weights(p, mask, hard=True))
  assert hard.sum() > 0
  np.testing.assert_allclose(soft, hard, atol=1e-2)
  assert np.all(soft[1, :, 7:] == 0)


def test_monotonic_weights_soft_matches_numpy_and_masks():
  rng = np.random.default_rng(36)
  p = rng.uniform(size=(B, 4, 8)).astype(np.float32)
  valid = _valid([8, 5], 8)
  init = _random_alignment(rng, B, 8) * valid
  got = np.asarray(_monotonic_weights(p, valid[:, None], init=init))
  expected = _np_monotonic_weights(np.where(valid[:, None], p, 0.0), init)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert np.all(got[1, :, 5:] == 0)
  recursive = _monotonic_weights(p, valid[:, None], init=init, mode='recursive')
  np.testing.assert_allclose(got, recursive, atol=1e-6)


def test_monotonic_weights_take_a_16_bit_initial_alignment():
  rng = np.random.default_rng(40)
  p = rng.uniform(size=(B, 4, 8)).astype(np.float32)
  init = _random_alignment(rng, B, 8)
  half = jnp.asarray(init, jnp.bfloat16)
  got = attention.monotonic_weights(jnp.asarray(p), init=half)
  expected = attention.monotonic_weights(
    jnp.asarray(p), init=jnp.asarray(half, jnp.float32)
  )
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_choose_probabilities_noise_only_with_rng():
  energy = _normal(np.random.default_rng(37), 3, 8)
  key = jax.random.key(0)

  @_jit
  def run(energy, key):
    return (
      attention.choose_probabilities(energy, noise_std=2.0),
      attention.choose_probabilities(energy, rng=key),
      attention.choose_probabilities(energy, noise_std=2.0, rng=key),
      jax.nn.sigmoid(energy + 2.0 * jax.random.normal(key, energy.shape)),
    )

  no_rng, no_noise, noisy, expected_noisy = (
    np.asarray(x) for x in run(energy, key)
  )
  clean = 1 / (1 + np.exp(-_f64(energy)))
  np.testing.assert_allclose(no_rng, clean, atol=1e-6)
  np.testing.assert_allclose(no_noise, clean, atol=1e-6)
  np.testing.assert_array_equal(no_rng, no_noise)
  assert np.all(np.abs(noisy - no_rng) > 0)
  assert np.all((noisy >= 0) & (noisy <= 1))
  np.testing.assert_allclose(noisy, expected_noisy, atol=1e-6)


@pytest.mark.parametrize('hard', [False, True])
def test_monotonic_attention_context(hard):
  rng = np.random.default_rng(38)
  q, k, v = _qkv(rng)
  params, bind = _score_setup('normed_additive', rng)
  mask = _padding_mask([TK, 6])

  @_jit
  def run(q, k, v, params, mask):
    context, weights = attention.monotonic_attention(
      q, k, v, bind(params), mask, hard=hard
    )
    p_choose = jax.nn.sigmoid(bind(params)(q, k))
    expected = attention.monotonic_weights(p_choose, mask, hard=hard)
    return context, weights, expected

  context, weights, expected = run(q, k, v, params, mask)
  assert context.shape == (B, TQ, VD) and weights.shape == (B, TQ, TK)
  np.testing.assert_allclose(context, _f64(weights) @ _f64(v), atol=1e-5)
  np.testing.assert_allclose(weights, expected, atol=1e-6)
  assert np.all(np.asarray(weights)[1, :, 6:] == 0)


# ---------------------------------------------------------------------------
# Location-aware attention (Chorowski 2015).


def test_location_aware_attention_without_prev_is_attention():
  rng = np.random.default_rng(39)
  q, k, v = _qkv(rng)
  mask = _padding_mask([TK, 6])
  params, bind = _score_setup('additive', rng)

  @_jit
  def run(q, k, v, params, mask):
    def score_fn(q, k, prev):
      del prev
      return bind(params)(q, k)

    return (
      attention.location_aware_attention(q, k, v, score_fn, mask),
      attention.attention(q, k, v, bind(params), mask),
    )

  (context, weights), (expected_c, expected_w) = run(q, k, v, params, mask)
  np.testing.assert_allclose(weights, expected_w, atol=1e-6)
  np.testing.assert_allclose(context, expected_c, atol=1e-6)


def _np_location_aware(q_t, k, prev, p):
  """Chorowski's score of one query q_t `[Dq]` against keys `[Tk, Dk]`."""
  p = {key: _f64(val) for key, val in p.items()}
  kernel = p['conv'].shape[0]
  padded = np.pad(prev, kernel // 2)
  features = np.stack(
    [padded[j : j + kernel] @ p['conv'] for j in range(len(prev))]
  )  # [Tk, channels]
  hidden = q_t @ p['w_q'] + k @ p['w_k'] + features @ p['w_f'] + p['b']
  return np.tanh(hidden) @ p['v']


@pytest.mark.parametrize('with_init', [False, True])
def test_location_aware_attention_matches_loop(with_init):
  rng = np.random.default_rng(40)
  q, k, v = _qkv(rng, tq=4, tk=9)
  n = functools.partial(_normal, rng)
  params = {
    'w_q': n(QD, HIDDEN),
    'w_k': n(KD, HIDDEN),
    'conv': n(5, 2, scale=3.0),
    'w_f': n(2, HIDDEN),
    'v': n(HIDDEN),
    'b': n(HIDDEN),
  }
  valid = _valid([9, 6], 9)
  init = _random_alignment(rng, B, 9) * valid if with_init else None

  @_jit
  def run(q, k, v, p, mask, init):
    def score_fn(q, k, prev):
      return scores.location_aware(
        q, k, prev, p['w_q'], p['w_k'], p['conv'], p['w_f'], p['v'], p['b']
      )

    return attention.location_aware_attention(
      q, k, v, score_fn, mask, init=init
    ), attention.uniform_alignment(mask[:, 0])

  (context, weights), uniform = jax.device_get(
    run(q, k, v, params, valid[:, None], init)
  )
  assert weights.shape == (B, 4, 9)
  # Default init: the uniform alignment over the valid keys.
  np.testing.assert_allclose(
    uniform, valid / valid.sum(-1, keepdims=True), atol=1e-7
  )
  for b in range(B):
    prev = valid[b] / valid[b].sum() if init is None else _f64(init[b])
    for t in range(4):
      logits = _np_location_aware(_f64(q[b, t]), _f64(k[b]), prev, params)
      prev = _np_softmax(logits, valid[b])
      np.testing.assert_allclose(weights[b, t], prev, atol=1e-5)
  assert np.all(np.asarray(weights)[1, :, 6:] == 0)
  np.testing.assert_allclose(context, _f64(weights) @ _f64(v), atol=1e-5)
