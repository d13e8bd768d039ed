"""Tests for attnjax.attention: soft, chunked, hard, local, monotonic and
location-aware attention."""

import functools

import chex
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import attention, masks, scores

B, TQ, TK, QD, KD, VD, HIDDEN = 2, 5, 13, 4, 4, 3, 5

# Eagerly, the prefix scans compile op by op; jitted they compile once.
_monotonic_alignment = jax.jit(
  attention.monotonic_alignment, static_argnames='mode'
)
_monotonic_weights = jax.jit(
  attention.monotonic_weights, static_argnames=('hard', 'mode')
)


def _normal(rng, *shape, scale=1.0):
  return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)


def _qkv(rng, tq=TQ, tk=TK, lead=(B,)):
  return (
    _normal(rng, *lead, tq, QD),
    _normal(rng, *lead, tk, KD),
    _normal(rng, *lead, tk, VD),
  )


def _np_masked_softmax(s, mask=None):
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


def _padding_mask(lengths, tk=TK):
  """Key padding mask `[batch, 1, tk]`."""
  return masks.length_mask(jnp.asarray(lengths), tk)[:, None, :]


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
    params = {**additive, 'b': n(HIDDEN), 'g': jnp.asarray(1.5, jnp.float32)}
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
      'prev': jax.nn.softmax(n(batch, tq, tk)),
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


# ---------------------------------------------------------------------------
# attention()


def _np_scores(name, q, k, params):
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  p = {key: np.asarray(val, np.float64) for key, val in params.items()}
  if name == 'dot':
    return q @ np.swapaxes(k, -1, -2)
  if name == 'general':
    return q @ p['w'] @ np.swapaxes(k, -1, -2)
  if name == 'additive':
    hidden = (q @ p['w_q'])[..., :, None, :] + (k @ p['w_k'])[..., None, :, :]
    return np.tanh(hidden + p['b']) @ p['v']
  raise AssertionError(name)


@pytest.mark.parametrize('name', ['dot', 'general', 'additive'])
@pytest.mark.parametrize('with_mask', [False, True])
def test_attention_matches_numpy(name, with_mask):
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng)
  params, bind = _score_setup(name, rng)
  mask = _padding_mask([TK, 6]) if with_mask else None
  context, weights = attention.attention(q, k, v, bind(params), mask)
  assert context.shape == (B, TQ, VD)
  assert weights.shape == (B, TQ, TK)
  assert weights.dtype == jnp.float32
  assert context.dtype == v.dtype
  expected_w = _np_masked_softmax(_np_scores(name, q, k, params), mask)
  np.testing.assert_allclose(weights, expected_w, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
    context, expected_w @ np.asarray(v, np.float64), atol=1e-5, rtol=1e-5
  )
  if with_mask:
    assert np.all(np.asarray(weights)[1, :, 6:] == 0)


def test_attention_broadcasts_leading_dims():
  rng = np.random.default_rng(1)
  q = _normal(rng, B, 3, TQ, QD)  # [batch, heads, q_len, depth]
  k = _normal(rng, B, 1, TK, KD)
  v = _normal(rng, TK, VD)
  mask = _padding_mask([TK, 4])[:, None]  # [batch, 1, 1, k_len]
  context, weights = attention.attention(q, k, v, scores.dot, mask)
  assert context.shape == (B, 3, TQ, VD)
  assert weights.shape == (B, 3, TQ, TK)
  expected_w = _np_masked_softmax(_np_scores('dot', q, k, {}), mask)
  np.testing.assert_allclose(weights, expected_w, atol=1e-5)
  np.testing.assert_allclose(context, expected_w @ np.asarray(v), atol=1e-5)


@pytest.mark.parametrize('name', ['dot', 'additive', 'general'])
@pytest.mark.parametrize('junk_scale', [1.0, 1e30])
@pytest.mark.parametrize('chunked', [False, True])
def test_padding_invariance(name, junk_scale, chunked):
  rng = np.random.default_rng(2)
  q, k, v = _qkv(rng)
  params, bind = _score_setup(name, rng)
  lengths = [9, 4]
  mask = _padding_mask(lengths)
  valid = np.asarray(masks.length_mask(jnp.asarray(lengths), TK))  # [B, TK]
  junk_k = _normal(rng, *k.shape, scale=junk_scale)
  junk_v = _normal(rng, *v.shape, scale=junk_scale)
  k2 = jnp.where(valid[..., None], k, junk_k)
  v2 = jnp.where(valid[..., None], v, junk_v)

  def run(k, v):
    if chunked:
      out = attention.chunked_attention(
        q, k, v, bind(params), mask, chunk_size=4
      )
      return out, None
    return attention.attention(q, k, v, bind(params), mask)

  context, weights = run(k, v)
  context2, weights2 = run(k2, v2)
  assert np.all(np.isfinite(context2))
  np.testing.assert_allclose(context2, context, atol=1e-6, rtol=1e-6)
  if not chunked:
    np.testing.assert_allclose(weights2, weights, atol=1e-7)
    assert np.all(np.asarray(weights2)[~np.broadcast_to(mask, weights.shape)]
                  == 0)


def test_fully_masked_row_gives_zero_context():
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng)
  mask = _padding_mask([TK, 0])
  context, weights = attention.attention(q, k, v, scores.dot, mask)
  np.testing.assert_array_equal(context[1], 0.0)
  np.testing.assert_array_equal(weights[1], 0.0)
  assert np.all(np.isfinite(context))
  # A single fully masked query row in an otherwise valid batch entry.
  row_mask = jnp.ones((B, TQ, TK), bool).at[0, 2].set(False)
  context, _ = attention.attention(q, k, v, scores.dot, row_mask)
  np.testing.assert_array_equal(context[0, 2], 0.0)
  assert np.all(np.abs(np.asarray(context[0, :2])) > 0)


# ---------------------------------------------------------------------------
# Seed 003 (d2l attention chapter) examples.


def _seed_003_inputs():
  queries = jnp.ones((2, 1, 2), jnp.float32)
  keys = jnp.ones((2, 10, 2), jnp.float32)
  values = jnp.repeat(
    jnp.arange(40, dtype=jnp.float32).reshape(1, 10, 4), 2, axis=0
  )
  mask = masks.length_mask(jnp.asarray([2, 6]), 10)[:, None, :]
  return queries, keys, values, mask


SEED_003_EXPECTED = np.array([[[2, 3, 4, 5]], [[10, 11, 12, 13]]], np.float32)


def test_seed_003_scaled_dot_attention():
  q, k, v, mask = _seed_003_inputs()
  context, _ = attention.attention(q, k, v, scores.scaled_dot, mask)
  np.testing.assert_allclose(context, SEED_003_EXPECTED, atol=1e-5)
  np.testing.assert_allclose(
    attention.dot_product_attention(q, k, v, mask), SEED_003_EXPECTED,
    atol=1e-5,
  )


def test_seed_003_mlp_attention():
  q, k, v, mask = _seed_003_inputs()
  rng = np.random.default_rng(4)
  score_fn = functools.partial(
    scores.additive,
    w_q=_normal(rng, 2, 8),
    w_k=_normal(rng, 2, 8),
    v=_normal(rng, 8),
  )
  context, _ = attention.attention(q, k, v, score_fn, mask)
  np.testing.assert_allclose(context, SEED_003_EXPECTED, atol=1e-5)


# ---------------------------------------------------------------------------
# dot_product_attention vs jax.nn.dot_product_attention.


def _bhtd(rng, heads=3, tq=6, tk=6, depth=8):
  return (
    _normal(rng, B, heads, tq, depth),
    _normal(rng, B, heads, tk, depth),
    _normal(rng, B, heads, tk, depth),
  )


def _jax_nn(q, k, v, mask=None, scale=None):
  swap = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
  out = jax.nn.dot_product_attention(
    swap(q), swap(k), swap(v), mask=mask, scale=scale
  )
  return swap(out)


@pytest.mark.parametrize('kind', ['none', 'padding', 'causal', 'both'])
@pytest.mark.parametrize('scale', [None, 0.3])
def test_dot_product_attention_matches_jax_nn(kind, scale):
  rng = np.random.default_rng(5)
  q, k, v = _bhtd(rng)
  heads, tq, tk = q.shape[1], q.shape[2], k.shape[2]
  padding = masks.length_mask(jnp.asarray([tk, 3]), tk)[:, None, None, :]
  causal = masks.causal_mask(tq, tk)
  mask = {
    'none': None,
    'padding': padding,
    'causal': causal,
    'both': masks.combine(padding, causal),
  }[kind]
  ours = attention.dot_product_attention(q, k, v, mask, scale=scale)
  full_mask = None if mask is None else jnp.broadcast_to(mask, (B, heads, tq, tk))
  theirs = _jax_nn(q, k, v, full_mask, scale)
  assert ours.shape == q.shape[:-1] + (v.shape[-1],)
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_dot_product_attention_bfloat16():
  rng = np.random.default_rng(6)
  q, k, v = _bhtd(rng)
  mask = masks.causal_mask(q.shape[2])
  expected = attention.dot_product_attention(q, k, v, mask)
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = attention.dot_product_attention(*bf16, mask)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    out.astype(jnp.float32), expected, atol=5e-2, rtol=5e-2
  )


def test_dot_product_attention_equals_attention_scaled_dot():
  rng = np.random.default_rng(7)
  q, k, v = _bhtd(rng)
  mask = masks.causal_mask(q.shape[2])
  np.testing.assert_allclose(
    attention.dot_product_attention(q, k, v, mask),
    attention.attention(q, k, v, scores.scaled_dot, mask)[0],
    atol=1e-5,
  )


# ---------------------------------------------------------------------------
# chunked_attention == attention, value and gradient, for every score.

# These tests are bound by XLA compile time (a custom-VJP scan per case), so
# they compile without backend optimisations; the numerics are unchanged.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}

CB = 3  # batch of the chunked tests: one full, one padded, one empty row

CHUNK_CONFIGS = {
  # name: (chunk_size, key lengths or None, causal)
  # 13 keys in chunks of 4: three full chunks and a remainder of 1; the
  # last batch entry has no valid key at all.
  'ragged_padded': (4, [TK, 7, 0], False),
  # Causal with k_len > q_len, over chunks of 5 (remainder 3), padded.
  'causal_padded': (5, [TK, 10, TK], True),
  # One chunk holds every key (chunk_size >= k_len), no mask.
  'single_chunk': (16, None, False),
}


def _chunked_and_dense_grads(name, config, seed=8):
  """Value and gradients of chunked and of dense attention, both jitted."""
  chunk_size, lengths, causal = CHUNK_CONFIGS[config]
  rng = np.random.default_rng(seed)
  q, k, v = _qkv(rng, lead=(CB,))
  params, bind = _score_setup(name, rng, batch=CB)
  cotangent = _normal(rng, CB, TQ, VD)
  mask = None if lengths is None else _padding_mask(lengths)
  dense_mask = masks.combine(mask, masks.causal_mask(TQ, TK) if causal else None)

  def chunked_loss(q, k, v, params):
    out = attention.chunked_attention(
      q, k, v, bind(params), mask, chunk_size=chunk_size, causal=causal
    )
    return jnp.sum(out * cotangent), out

  def dense_loss(q, k, v, params):
    out, _ = attention.attention(q, k, v, bind(params), dense_mask)
    return jnp.sum(out * cotangent), out

  def value_and_grads(loss):
    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    (_, out), grads = jax.jit(fn, compiler_options=_FAST_COMPILE)(
      q, k, v, params
    )
    return out, grads

  return value_and_grads(chunked_loss), value_and_grads(dense_loss)


@pytest.mark.parametrize('config', list(CHUNK_CONFIGS))
@pytest.mark.parametrize('name', ALL_SCORES)
def test_chunked_matches_dense(name, config):
  (out, grads), (expected_out, expected_grads) = _chunked_and_dense_grads(
    name, config
  )
  assert out.shape == (CB, TQ, VD) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected_out, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_equal_structs(grads, expected_grads)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(grads)]
  for path, got, want in zip(
    paths, jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True
  ):
    assert np.all(np.isfinite(got)), path
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=path)
  if config == 'ragged_padded':
    # A query with no valid key: zero context, zero (finite) gradients.
    np.testing.assert_array_equal(out[2], 0.0)
    for g in grads[:3]:
      np.testing.assert_array_equal(g[2], 0.0)
    if name == 'location_aware':
      np.testing.assert_array_equal(grads[3]['prev'][2], 0.0)


def test_chunked_broadcast_leading_dims():
  """Heads broadcast against shared keys and batch-free values."""
  rng = np.random.default_rng(9)
  q = _normal(rng, B, 3, TQ, QD)
  k = _normal(rng, B, 1, TK, KD)
  v = _normal(rng, TK, VD)
  mask = _padding_mask([TK, 5])[:, None]
  params, bind = _score_setup('additive', rng)
  cotangent = _normal(rng, B, 3, TQ, VD)

  def chunked(q, k, v, score_fn):
    return attention.chunked_attention(q, k, v, score_fn, mask, chunk_size=4)

  def dense(q, k, v, score_fn):
    return attention.attention(q, k, v, score_fn, mask)[0]

  def value_and_grads(fn):
    def loss(q, k, v, params):
      return jnp.sum(fn(q, k, v, bind(params)) * cotangent)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    return jax.jit(grad, compiler_options=_FAST_COMPILE)(q, k, v, params)

  value, grads = value_and_grads(chunked)
  expected_value, expected_grads = value_and_grads(dense)
  np.testing.assert_allclose(value, expected_value, atol=1e-4, rtol=1e-5)
  for got, want in zip(
    jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True
  ):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# chunked_attention's memory structure, read off the jaxpr.


def _all_avals(jaxpr):
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
  q = jnp.zeros((q_len, depth), jnp.float32)
  k = jnp.zeros((k_len, depth), jnp.float32)
  v = jnp.zeros((k_len, depth), jnp.float32)
  params = {
    'w_q': jnp.zeros((depth, hidden)),
    'w_k': jnp.zeros((depth, hidden)),
    'v': jnp.zeros((hidden,)),
    'b': jnp.zeros((hidden,)),
  }
  mask = jnp.ones((1, k_len), bool) if kind == 'padding' else None
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

  grad_args = (q, k, v, params)
  limit = q_len * k_len
  chunked_jaxpr = jax.make_jaxpr(jax.grad(chunked_loss, argnums=(0, 1, 2, 3)))(
    *grad_args
  )
  dense_jaxpr = jax.make_jaxpr(jax.grad(dense_loss, argnums=(0, 1, 2, 3)))(
    *grad_args
  )
  assert _largest_aval(dense_jaxpr) >= limit  # the check can fail
  assert _largest_aval(chunked_jaxpr) < limit
  # The forward pass alone, too.
  forward_jaxpr = jax.make_jaxpr(chunked_loss)(*grad_args)
  assert _largest_aval(forward_jaxpr) < limit


# ---------------------------------------------------------------------------
# Errors.


def _run_chunked(q, k, v, score_fn, mask=None):
  return attention.chunked_attention(q, k, v, score_fn, mask, chunk_size=4)


def _run_attention(q, k, v, score_fn, mask=None):
  return attention.attention(q, k, v, score_fn, mask)


RUNNERS = pytest.mark.parametrize(
  'run', [_run_attention, _run_chunked], ids=['attention', 'chunked']
)


@pytest.mark.parametrize('chunk_size', [0, -1])
def test_chunked_rejects_bad_chunk_size(chunk_size):
  q, k, v = _qkv(np.random.default_rng(10))
  with pytest.raises(ValueError, match='chunk_size'):
    attention.chunked_attention(q, k, v, scores.dot, chunk_size=chunk_size)


@RUNNERS
def test_rejects_non_bool_mask(run):
  q, k, v = _qkv(np.random.default_rng(11))
  mask = jnp.ones((B, 1, TK), jnp.float32)
  with pytest.raises(TypeError, match='boolean'):
    run(q, k, v, scores.dot, mask)


@RUNNERS
def test_rejects_mask_that_does_not_broadcast(run):
  q, k, v = _qkv(np.random.default_rng(12))
  mask = jnp.ones((B, 1, TK + 1), bool)
  with pytest.raises(ValueError, match='broadcast'):
    run(q, k, v, scores.dot, mask)


@RUNNERS
def test_rejects_rank_1_queries(run):
  _, k, v = _qkv(np.random.default_rng(13))
  with pytest.raises(ValueError, match='rank'):
    run(jnp.ones((QD,)), k, v, scores.dot)


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
    run(q, k, v, bad_score)


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
    expected_w = _np_masked_softmax(
      _np_scores('dot', q, k, {}) / np.sqrt(QD), mask
    )
    np.testing.assert_allclose(weights, expected_w, atol=1e-5)
    np.testing.assert_allclose(context, expected_w @ np.asarray(v), atol=1e-5)

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

    expected, _ = attention.attention(q, k, v, bind(params), mask)
    np.testing.assert_allclose(fn(q, k, v, params, mask), expected, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_monotonic_weights(self):
    rng = np.random.default_rng(20)
    p = jnp.asarray(rng.uniform(size=(B, TQ, TK)), jnp.float32)
    mask = _padding_mask([TK, 8])

    @self.variant
    def fn(p, mask):
      return attention.monotonic_weights(p, mask)

    weights = fn(p, mask)
    masked_p = np.where(np.broadcast_to(mask, p.shape), p, 0.0)
    expected = _np_monotonic_weights(masked_p)
    np.testing.assert_allclose(weights, expected, atol=1e-6)


# ---------------------------------------------------------------------------
# Hard attention.


def _hard_inputs(rng):
  logits = _normal(rng, B, 3, 6)
  mask = jnp.asarray(
    [[[True, True, False, True, True, False]], [[True] * 3 + [False] * 3]]
  )
  # The largest logit of each row sits on a masked key.
  logits = logits.at[0, :, 2].set(10.0).at[1, :, 4].set(10.0)
  return logits, mask


def test_hard_weights_argmax_without_rng():
  logits, mask = _hard_inputs(np.random.default_rng(21))
  weights = np.asarray(attention.hard_weights(logits, mask))
  allowed = np.broadcast_to(mask, logits.shape)
  expected_idx = np.argmax(np.where(allowed, logits, -np.inf), -1)
  expected = np.eye(logits.shape[-1])[expected_idx]
  np.testing.assert_array_equal(weights, expected)
  assert np.all(weights[~allowed] == 0)
  # Fully masked rows give zeros.
  empty = np.asarray(
    attention.hard_weights(logits, jnp.zeros((B, 1, 6), bool))
  )
  np.testing.assert_array_equal(empty, 0.0)


def test_hard_attention_context_picks_one_value():
  rng = np.random.default_rng(22)
  q, k, v = _qkv(rng)
  mask = _padding_mask([TK, 4])
  context, weights = attention.hard_attention(q, k, v, scores.dot, mask)
  logits = np.where(np.broadcast_to(mask, (B, TQ, TK)),
                    _np_scores('dot', q, k, {}), -np.inf)
  idx = np.argmax(logits, -1)
  expected = np.take_along_axis(np.asarray(v), idx[..., None], axis=1)
  np.testing.assert_allclose(context, expected, atol=1e-6)
  np.testing.assert_array_equal(weights.sum(-1), 1.0)


def test_hard_weights_sampling():
  logits, mask = _hard_inputs(np.random.default_rng(23))
  logits = logits.at[:, :, :].multiply(0.5).at[0, :, 2].set(10.0)
  num = 2000
  rngs = jax.random.split(jax.random.key(0), num)
  samples = jax.jit(
    jax.vmap(
      lambda r: attention.hard_weights(logits, mask, rng=r, temperature=0.7)
    )
  )(rngs)
  samples = np.asarray(samples)
  allowed = np.broadcast_to(mask, logits.shape)
  # Forward values are one-hot on an allowed key.
  np.testing.assert_allclose(samples.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(samples.max(-1), 1.0, atol=1e-6)
  assert np.all(np.isclose(samples, 0, atol=1e-6) | np.isclose(samples, 1))
  assert np.all(samples[:, ~allowed] == 0)
  # Choice frequencies follow softmax(logits) over the allowed keys.
  chosen = samples > 0.5
  frequencies = chosen.mean(0)
  expected = _np_masked_softmax(logits, mask)
  np.testing.assert_allclose(frequencies, expected, atol=0.03)


def test_hard_weights_straight_through_gradient():
  logits, mask = _hard_inputs(np.random.default_rng(24))
  rng = jax.random.key(3)
  temperature = 0.5
  cotangent = _normal(np.random.default_rng(25), *logits.shape)
  gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)

  def hard_loss(logits):
    w = attention.hard_weights(logits, mask, rng=rng, temperature=temperature)
    return jnp.sum(w * cotangent)

  def soft_loss(logits):
    w = masks.masked_softmax((logits + gumbel) / temperature, mask)
    return jnp.sum(w * cotangent)

  got = jax.jit(jax.grad(hard_loss))(logits)
  want = jax.jit(jax.grad(soft_loss))(logits)
  assert np.any(np.asarray(got) != 0)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # And the forward value is the one-hot of the Gumbel argmax.
  w = attention.hard_weights(logits, mask, rng=rng, temperature=temperature)
  idx = np.argmax(
    np.where(np.broadcast_to(mask, logits.shape), logits + gumbel, -np.inf), -1
  )
  np.testing.assert_allclose(w, np.eye(logits.shape[-1])[idx], atol=1e-6)


def test_hard_weights_rejects_bad_temperature():
  with pytest.raises(ValueError, match='temperature'):
    attention.hard_weights(jnp.zeros((2, 3)), temperature=0.0)


# ---------------------------------------------------------------------------
# Local attention (Luong 2015).


@pytest.mark.parametrize('width', [0, 1, 3])
def test_local_window_mask(width):
  centers = jnp.asarray([[0.0, 2.0, 4.5, 9.0], [3.0, 3.3, 7.7, 8.0]])
  got = attention.local_window_mask(centers, 10, width)
  s = np.arange(10)
  expected = np.abs(s - np.asarray(centers)[..., None]) <= width
  assert got.dtype == jnp.bool_
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize('with_mask', [False, True])
def test_local_m_weights(with_mask):
  rng = np.random.default_rng(26)
  q, k, v = _qkv(rng, tq=6, tk=10)
  width = 2
  centers = jnp.arange(6, dtype=jnp.float32)
  mask = _padding_mask([10, 7], tk=10) if with_mask else None
  context, weights = attention.local_attention(
    q, k, v, scores.dot, centers, width=width, mask=mask
  )
  w = np.asarray(weights)
  window = np.abs(np.arange(10) - np.arange(6)[:, None]) <= width
  allowed = window if mask is None else window & np.asarray(mask)
  assert np.all(w[~np.broadcast_to(allowed, w.shape)] == 0)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  expected = _np_masked_softmax(_np_scores('dot', q, k, {}), allowed)
  np.testing.assert_allclose(w, expected, atol=1e-5)
  np.testing.assert_allclose(context, expected @ np.asarray(v), atol=1e-5)


def test_local_p_weights():
  rng = np.random.default_rng(27)
  q, k, v = _qkv(rng, tq=6, tk=12)
  width = 3
  lengths = jnp.asarray([12, 8])
  w_p, v_p = _normal(rng, QD, 7), _normal(rng, 7)
  centers = attention.predict_positions(q, w_p, v_p, lengths)
  assert centers.shape == (B, 6)
  mask = masks.length_mask(lengths, 12)[:, None, :]
  context, weights = attention.local_attention(
    q, k, v, scores.dot, centers, width=width, mask=mask, gaussian=True
  )
  c = np.asarray(centers, np.float64)[..., None]
  s = np.arange(12)
  window = (np.abs(s - c) <= width) & np.asarray(mask)
  gauss = np.exp(-((s - c) ** 2) / (2 * (width / 2) ** 2))
  expected = _np_masked_softmax(_np_scores('dot', q, k, {}), window) * gauss
  np.testing.assert_allclose(weights, expected, atol=1e-5)
  np.testing.assert_allclose(context, expected @ np.asarray(v), atol=1e-5)
  assert np.all(np.asarray(weights).sum(-1) <= 1 + 1e-6)


def test_predict_positions_in_range():
  rng = np.random.default_rng(28)
  h = _normal(rng, 3, 50, QD, scale=5.0)
  w_p, v_p = _normal(rng, QD, 6, scale=3.0), _normal(rng, 6, scale=10.0)
  lengths = jnp.asarray([1, 7, 30])
  p = np.asarray(attention.predict_positions(h, w_p, v_p, lengths))
  assert p.dtype == np.float32
  assert np.all(p >= 0)
  assert np.all(p <= (np.asarray(lengths) - 1)[:, None])
  np.testing.assert_array_equal(p[0], 0.0)
  # Saturation reaches both ends of the source.
  assert p[2].min() < 1.0 and p[2].max() > 28.0


def test_local_attention_rejects_bad_width():
  q, k, v = _qkv(np.random.default_rng(29))
  centers = jnp.zeros((TQ,))
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
  p, prev = np.asarray(p, np.float64), np.asarray(prev, np.float64)
  prev = np.broadcast_to(prev, p.shape)
  out = np.zeros(p.shape)
  for idx in np.ndindex(p.shape[:-1]):
    for j in range(p.shape[-1]):
      total = 0.0
      for k in range(j + 1):
        prod = 1.0
        for l in range(k, j):  # noqa: E741
          prod *= 1.0 - p[idx][l]
        total += prev[idx][k] * prod
      out[idx][j] = p[idx][j] * total
  return out


def _np_monotonic_weights(p):
  """Expected alignments for each query row, from one-hot at key 0."""
  p = np.asarray(p, np.float64)
  prev = np.zeros(p.shape[:-2] + p.shape[-1:])
  prev[..., 0] = 1
  rows = []
  for t in range(p.shape[-2]):
    prev = _np_raffel(p[..., t, :], prev)
    rows.append(prev)
  return np.stack(rows, -2)


def _random_alignment(rng, *shape):
  x = rng.uniform(size=shape)
  return x / x.sum(-1, keepdims=True) * rng.uniform(0.5, 1.0, shape[:-1])[
    ..., None
  ]


@pytest.mark.parametrize('mode', ['recursive', 'parallel'])
def test_monotonic_alignment_matches_raffel(mode):
  rng = np.random.default_rng(30)
  p = rng.uniform(size=(3, 2, 9))
  p[0, 0, 3] = 1.0
  p[0, 1, 0] = 0.0
  p[1, 0, 5:] = 0.0
  p[2, 1, :] = 1.0
  prev = _random_alignment(rng, 3, 2, 9)
  got = _monotonic_alignment(
    jnp.asarray(p, jnp.float32), jnp.asarray(prev, jnp.float32), mode=mode
  )
  assert got.dtype == jnp.float32
  expected = _np_raffel(p, prev)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert np.all(np.asarray(got).sum(-1) <= 1 + 1e-6)
  assert np.all(np.asarray(got) >= 0)


def test_monotonic_alignment_modes_agree():
  rng = np.random.default_rng(31)
  p = jnp.asarray(rng.uniform(size=(4, 17)), jnp.float32)
  prev = jnp.asarray(_random_alignment(rng, 4, 17), jnp.float32)
  np.testing.assert_allclose(
    _monotonic_alignment(p, prev, mode='recursive'),
    _monotonic_alignment(p, prev, mode='parallel'),
    atol=1e-6,
  )
  # From the initial one-hot, the mass sums to at most 1.
  init = attention.initial_alignment((4, 17))
  alpha = _monotonic_alignment(p, init)
  assert np.all(np.asarray(alpha).sum(-1) <= 1 + 1e-6)


def test_monotonic_alignment_rejects_unknown_mode():
  with pytest.raises(ValueError, match='parallel'):
    attention.monotonic_alignment(jnp.ones((3,)), jnp.ones((3,)), mode='x')


def _np_recurrence(p, prev):
  """Raffel's alignment in float64 via q_j = (1 - p_{j-1}) q_{j-1} + prev_j."""
  p, prev = np.asarray(p, np.float64), np.asarray(prev, np.float64)
  out = np.zeros(p.shape)
  q = np.zeros(p.shape[:-1])
  for j in range(p.shape[-1]):
    q = q * (1.0 - p[..., j - 1]) + prev[..., j] if j else prev[..., 0]
    out[..., j] = p[..., j] * q
  return out


def test_monotonic_alignment_long_inputs_are_stable():
  rng = np.random.default_rng(32)
  k_len = 2000
  p = jnp.asarray(rng.uniform(0.5, 0.999, size=(2, k_len)), jnp.float32)
  prev = np.zeros((2, k_len))
  prev[:, -20:] = rng.uniform(size=(2, 20))
  prev /= prev.sum(-1, keepdims=True)
  prev = jnp.asarray(prev, jnp.float32)
  recursive = _monotonic_alignment(p, prev, mode='recursive')
  parallel = _monotonic_alignment(p, prev, mode='parallel')
  for alpha in (recursive, parallel):
    assert np.all(np.isfinite(alpha))
    assert np.all(np.asarray(alpha).sum(-1) <= 1 + 1e-5)
    assert np.all(np.asarray(alpha) >= 0)
  np.testing.assert_allclose(recursive, parallel, atol=1e-6)
  np.testing.assert_allclose(parallel, _np_recurrence(p, prev), atol=1e-6)
  # The mass stays near the end, where it started.
  assert np.asarray(parallel)[:, -20:].sum() > 1.0


@pytest.mark.parametrize('k_len', [9, 2000])
def test_monotonic_alignment_gradients(k_len):
  rng = np.random.default_rng(33)
  p = rng.uniform(0.5, 0.999, size=(2, k_len))
  p[0, 1] = 1.0
  p[1, 2] = 0.0
  p = jnp.asarray(p, jnp.float32)
  prev = jnp.asarray(_random_alignment(rng, 2, k_len), jnp.float32)
  cotangent = _normal(rng, 2, k_len)

  def loss(p, prev, mode):
    alpha = _monotonic_alignment(p, prev, mode=mode)
    return jnp.sum(alpha * cotangent)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnames='mode')
  recursive = grad(p, prev, 'recursive')
  parallel = grad(p, prev, 'parallel')
  for got, want in zip(recursive, parallel, strict=True):
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(want))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _python_hard_monotonic(p, mask):
  """First key at or after the previous one with p >= 0.5, as a loop."""
  q_len, k_len = p.shape
  out = np.zeros((q_len, k_len))
  position = 0
  for t in range(q_len):
    if position is None:
      continue
    chosen = None
    for j in range(position, k_len):
      if p[t, j] >= 0.5 and mask[j]:
        chosen = j
        break
    position = chosen
    if chosen is not None:
      out[t, chosen] = 1.0
  return out


def test_monotonic_weights_hard():
  rng = np.random.default_rng(34)
  p = (rng.uniform(size=(3, 7, 10)) < 0.3).astype(np.float32)
  # Batch 1 runs out of keys half way; batch 2 has a masked key with p = 1.
  p[1, 4:, :] = 0.0
  p[1, 3, :] = 0.0
  p[2, :, 4] = 1.0
  lengths = np.array([10, 10, 8])
  mask = np.arange(10) < lengths[:, None]
  mask[2, 4] = False
  p[2, :, 8:] = 1.0  # p is 1 on padding, which must still be skipped
  weights = np.asarray(
    _monotonic_weights(
      jnp.asarray(p), jnp.asarray(mask)[:, None, :], hard=True
    )
  )
  for b in range(3):
    np.testing.assert_array_equal(weights[b], _python_hard_monotonic(p[b], mask[b]))
  np.testing.assert_array_equal(weights[1, 3:], 0.0)
  assert np.all(weights[2][:, ~mask[2]] == 0)
  assert set(np.unique(weights)) <= {0.0, 1.0}
  # Chosen positions never move backwards.
  for b in range(3):
    chosen = [np.argmax(row) for row in weights[b] if row.any()]
    assert chosen == sorted(chosen)


def test_monotonic_weights_soft_approaches_hard():
  rng = np.random.default_rng(35)
  energies = rng.uniform(0.2, 1.0, size=(2, 6, 9)) * rng.choice(
    [-1.0, 1.0], size=(2, 6, 9), p=[0.7, 0.3]
  )
  p = jax.nn.sigmoid(jnp.asarray(energies * 50, jnp.float32))
  mask = _padding_mask([9, 7], tk=9)
  soft = _monotonic_weights(p, mask)
  hard = _monotonic_weights(p, mask, hard=True)
  assert np.asarray(hard).sum() > 0
  np.testing.assert_allclose(soft, hard, atol=1e-2)
  assert np.all(np.asarray(soft)[1, :, 7:] == 0)


def test_monotonic_weights_soft_matches_numpy_and_masks():
  rng = np.random.default_rng(36)
  p = jnp.asarray(rng.uniform(size=(B, 4, 8)), jnp.float32)
  mask = _padding_mask([8, 5], tk=8)
  init = jnp.asarray(_random_alignment(rng, B, 8), jnp.float32)
  init = init * np.asarray(mask[:, 0])
  got = _monotonic_weights(p, mask, init=init)
  masked_p = np.where(np.broadcast_to(mask, p.shape), p, 0.0)
  prev, rows = np.asarray(init, np.float64), []
  for t in range(4):
    prev = _np_raffel(masked_p[:, t], prev)
    rows.append(prev)
  np.testing.assert_allclose(got, np.stack(rows, 1), atol=1e-6)
  assert np.all(np.asarray(got)[1, :, 5:] == 0)
  np.testing.assert_allclose(
    got, _monotonic_weights(p, mask, init=init, mode='recursive'),
    atol=1e-6,
  )


def test_choose_probabilities_noise_only_with_rng():
  energy = _normal(np.random.default_rng(37), 3, 8)
  clean = jax.nn.sigmoid(energy)
  np.testing.assert_allclose(
    attention.choose_probabilities(energy, noise_std=2.0), clean, atol=0
  )
  np.testing.assert_allclose(
    attention.choose_probabilities(energy, rng=jax.random.key(0)), clean,
    atol=0,
  )
  noisy = attention.choose_probabilities(
    energy, noise_std=2.0, rng=jax.random.key(0)
  )
  assert np.all(np.abs(np.asarray(noisy) - np.asarray(clean)) > 0)
  assert np.all((np.asarray(noisy) >= 0) & (np.asarray(noisy) <= 1))
  noise = jax.random.normal(jax.random.key(0), energy.shape)
  np.testing.assert_allclose(
    noisy, jax.nn.sigmoid(energy + 2.0 * noise), atol=1e-6
  )


@pytest.mark.parametrize('hard', [False, True])
def test_monotonic_attention_context(hard):
  rng = np.random.default_rng(38)
  q, k, v = _qkv(rng)
  params, bind = _score_setup('normed_additive', rng)
  mask = _padding_mask([TK, 6])
  context, weights = attention.monotonic_attention(
    q, k, v, bind(params), mask, hard=hard
  )
  assert context.shape == (B, TQ, VD) and weights.shape == (B, TQ, TK)
  np.testing.assert_allclose(
    context, np.asarray(weights) @ np.asarray(v), atol=1e-5
  )
  energy = bind(params)(q, k)
  expected = _monotonic_weights(
    jax.nn.sigmoid(energy), mask, hard=hard
  )
  np.testing.assert_allclose(weights, expected, atol=1e-6)
  assert np.all(np.asarray(weights)[1, :, 6:] == 0)


# ---------------------------------------------------------------------------
# Location-aware attention (Chorowski 2015).


def test_location_aware_attention_without_prev_is_attention():
  rng = np.random.default_rng(39)
  q, k, v = _qkv(rng)
  mask = _padding_mask([TK, 6])
  params, bind = _score_setup('additive', rng)

  def score_fn(q, k, prev):
    del prev
    return bind(params)(q, k)

  context, weights = attention.location_aware_attention(
    q, k, v, score_fn, mask
  )
  expected_c, expected_w = attention.attention(q, k, v, bind(params), mask)
  np.testing.assert_allclose(weights, expected_w, atol=1e-6)
  np.testing.assert_allclose(context, expected_c, atol=1e-6)


def _np_location_aware(q_t, k, prev, p):
  """Chorowski's score of one query row q_t [Dq] against keys [Tk, Dk]."""
  p = {key: np.asarray(val, np.float64) for key, val in p.items()}
  kernel = p['conv'].shape[0]
  half = kernel // 2
  padded = np.pad(prev, (half, half))
  features = np.stack(
    [padded[j : j + kernel] @ p['conv'] for j in range(len(prev))]
  )  # [Tk, C]
  hidden = q_t @ p['w_q'] + k @ p['w_k'] + features @ p['w_f'] + p['b']
  return np.tanh(hidden) @ p['v']


@pytest.mark.parametrize('with_init', [False, True])
def test_location_aware_attention_matches_loop(with_init):
  rng = np.random.default_rng(40)
  q, k, v = _qkv(rng, tq=4, tk=9)
  n = functools.partial(_normal, rng)
  p = {
    'w_q': n(QD, HIDDEN),
    'w_k': n(KD, HIDDEN),
    'conv': n(5, 2, scale=3.0),
    'w_f': n(2, HIDDEN),
    'v': n(HIDDEN),
    'b': n(HIDDEN),
  }

  def score_fn(q, k, prev):
    return scores.location_aware(
      q, k, prev, p['w_q'], p['w_k'], p['conv'], p['w_f'], p['v'], p['b']
    )

  lengths = [9, 6]
  mask = _padding_mask(lengths, tk=9)
  valid = np.asarray(mask[:, 0])
  init = None
  if with_init:
    init = jnp.asarray(_random_alignment(rng, B, 9) * valid, jnp.float32)
  context, weights = attention.location_aware_attention(
    q, k, v, score_fn, mask, init=init
  )
  assert weights.shape == (B, 4, 9)
  for b in range(B):
    if init is None:
      prev = valid[b] / valid[b].sum()
    else:
      prev = np.asarray(init[b], np.float64)
    for t in range(4):
      logits = _np_location_aware(
        np.asarray(q[b, t], np.float64), np.asarray(k[b], np.float64), prev, p
      )
      prev = _np_masked_softmax(logits, valid[b])
      np.testing.assert_allclose(weights[b, t], prev, atol=1e-5)
  assert np.all(np.asarray(weights)[1, :, 6:] == 0)
  np.testing.assert_allclose(
    context, np.asarray(weights) @ np.asarray(v), atol=1e-5
  )
  # Default init is the uniform alignment over the valid keys.
  np.testing.assert_allclose(
    attention.uniform_alignment(mask[:, 0]), valid / valid.sum(-1, keepdims=True)
  )
