"""Score functions against independent float64 numpy references."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import scores

TOL = dict(rtol=1e-5, atol=1e-5)

# Leading dims that broadcast: [2, 1] with [1, 5] -> [2, 5].
Q_SHAPE = (2, 1, 3, 4)
K_SHAPE = (1, 5, 6, 4)
OUT_SHAPE = (2, 5, 3, 6)


def _rand(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def _qk(seed=0, q_shape=Q_SHAPE, k_shape=K_SHAPE):
  rng = np.random.default_rng(seed)
  return rng, _rand(rng, *q_shape), _rand(rng, *k_shape)


def _pairwise(q, k, fn):
  """out[..., i, j] = fn(q[..., i, :], k[..., j, :]) with explicit loops."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
  qb = np.broadcast_to(q, batch + q.shape[-2:])
  kb = np.broadcast_to(k, batch + k.shape[-2:])
  out = np.zeros(batch + (q.shape[-2], k.shape[-2]))
  for idx in np.ndindex(*batch):
    for i in range(q.shape[-2]):
      for j in range(k.shape[-2]):
        out[idx + (i, j)] = fn(qb[idx + (i,)], kb[idx + (j,)])
  return out


def _jit(fn, *args, **static):
  """Calls `fn` under jit (eager JAX compiles every op: far slower here)."""
  return np.asarray(jax.jit(functools.partial(fn, **static))(*args))


def _f64(*arrays):
  return [np.asarray(a, np.float64) for a in arrays]


def _ref_location_features(prev, conv, num_keys=None, key_offset=0):
  """Zero-padded 'same' correlation of each row of `prev` with `conv`."""
  prev, conv = _f64(prev, conv)
  kernel, channels = conv.shape
  half = kernel // 2
  total = prev.shape[-1]
  num_keys = total if num_keys is None else num_keys
  out = np.zeros(prev.shape[:-1] + (num_keys, channels))
  for idx in np.ndindex(*prev.shape[:-1]):
    for j in range(num_keys):
      pos = key_offset + j
      for c in range(channels):
        acc = 0.0
        for t in range(kernel):
          src = pos + t - half
          if 0 <= src < total:
            acc += prev[idx + (src,)] * conv[t, c]
        out[idx + (j, c)] = acc
  return out


def _additive_weights(rng, dq, dk, hidden):
  return (
    _rand(rng, dq, hidden),
    _rand(rng, dk, hidden),
    _rand(rng, hidden),
    _rand(rng, hidden),
  )


# Reference formulas.


def test_dot_matches_reference():
  _, q, k = _qk(0)
  out = _jit(scores.dot, q, k)
  assert out.shape == OUT_SHAPE
  ref = _pairwise(q, k, lambda a, b: sum(a[d] * b[d] for d in range(len(a))))
  np.testing.assert_allclose(out, ref, **TOL)


def test_scaled_dot_matches_reference():
  _, q, k = _qk(1)
  out = _jit(scores.scaled_dot, q, k)
  assert out.shape == OUT_SHAPE
  depth = q.shape[-1]
  ref = _pairwise(q, k, lambda a, b: np.dot(a, b) / np.sqrt(depth))
  np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize('q_len,k_len', [(3, 6), (6, 3)])
def test_general_matches_reference(q_len, k_len):
  # Both einsum orders (shorter side projected first) are exercised.
  rng, q, k = _qk(2, (2, 1, q_len, 4), (1, 5, k_len, 7))
  w = _rand(rng, 4, 7)
  out = _jit(scores.general, q, k, w)
  assert out.shape == (2, 5, q_len, k_len)
  (w64,) = _f64(w)
  ref = _pairwise(q, k, lambda a, b: a @ w64 @ b)
  np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize('with_bias', [False, True])
def test_additive_matches_reference(with_bias):
  rng, q, k = _qk(3, (2, 1, 3, 4), (1, 5, 6, 7))
  w_q, w_k, v, b = _additive_weights(rng, 4, 7, 8)
  bias = jnp.asarray(b) if with_bias else None
  out = _jit(scores.additive, q, k, w_q, w_k, v, b=bias)
  assert out.shape == OUT_SHAPE
  w_q, w_k, v, b = _f64(w_q, w_k, v, b)
  if not with_bias:
    b = np.zeros_like(b)
  ref = _pairwise(q, k, lambda a, c: v @ np.tanh(a @ w_q + c @ w_k + b))
  np.testing.assert_allclose(out, ref, **TOL)


def test_normed_additive_matches_reference():
  rng, q, k = _qk(4, (2, 1, 3, 4), (1, 5, 6, 7))
  w_q, w_k, v, b = _additive_weights(rng, 4, 7, 8)
  g = np.float32(1.7)
  out = _jit(scores.normed_additive, q, k, w_q, w_k, v, g, b)
  assert out.shape == OUT_SHAPE
  w_q, w_k, v, b = _f64(w_q, w_k, v, b)
  v_unit = v / np.sqrt(np.sum(v**2))
  ref = _pairwise(
    q, k, lambda a, c: 1.7 * v_unit @ np.tanh(a @ w_q + c @ w_k + b)
  )
  np.testing.assert_allclose(out, ref, **TOL)


def test_normed_additive_ignores_scale_of_v():
  rng, q, k = _qk(5)
  w_q, w_k, v, b = _additive_weights(rng, 4, 4, 8)
  fn = jax.jit(functools.partial(scores.normed_additive, q, k, w_q, w_k))
  out = fn(v, np.float32(0.5), b)
  out_scaled = fn(13.0 * v, np.float32(0.5), b)
  np.testing.assert_allclose(out, out_scaled, **TOL)
  # g as a Python number, outside jit.
  out_eager = scores.normed_additive(q, k, w_q, w_k, v, 0.5, b)
  np.testing.assert_allclose(out_eager, out, **TOL)


@pytest.mark.parametrize('dtype', [jnp.float16, jnp.bfloat16])
def test_normed_additive_low_precision_normalises_in_float32(dtype):
  # |v| ~ 200 over 8 units: ||v||^2 overflows float16 (it gave all zeros).
  # The normalised v is rounded once, so the scores equal `additive` with the
  # float64 g v / ||v|| rounded to `dtype`.
  rng, q, k = _qk(6, (3, 4), (5, 4))
  w_q, w_k, v, b = _additive_weights(rng, 4, 4, 8)
  q, k, w_q, w_k, b = (jnp.asarray(x, dtype) for x in (q, k, w_q, w_k, b))
  v = jnp.asarray(200.0 * v, dtype)
  out = _jit(
    scores.normed_additive, q, k, w_q, w_k, v, jnp.asarray(1.5, dtype), b
  )
  v64 = np.asarray(v, np.float64)
  v_unit = jnp.asarray(1.5 * v64 / np.sqrt(np.sum(v64**2)), dtype)
  ref = _jit(scores.additive, q, k, w_q, w_k, v_unit, b)
  np.testing.assert_array_equal(out, ref)
  assert np.abs(np.asarray(out, np.float32)).max() > 0.1


def _ref_cosine(a, b):
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  if na == 0 or nb == 0:
    return 0.0
  return np.dot(a, b) / (na * nb)


def test_cosine_matches_reference_with_zero_vectors():
  _, q, k = _qk(6)
  q[1, 0, 2, :] = 0.0
  k[0, 3, 4, :] = 0.0
  out = _jit(scores.cosine, q, k)
  assert out.shape == OUT_SHAPE
  np.testing.assert_allclose(out, _pairwise(q, k, _ref_cosine), **TOL)
  assert np.all(np.asarray(out)[1, :, 2, :] == 0.0)
  assert np.all(np.asarray(out)[:, 3, :, 4] == 0.0)
  assert np.all(np.abs(np.asarray(out)) <= 1.0 + 1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float16, jnp.bfloat16])
def test_cosine_gradient_finite_at_zero_vector(dtype):
  _, q, k = _qk(7)
  q[0, 0, 1, :] = 0.0
  k[0, 2, 0, :] = 0.0
  q, k = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
  loss = lambda q, k: jnp.sum(scores.cosine(q, k) ** 2 + scores.cosine(q, k))
  out = scores.cosine(q, k)
  assert out.dtype == dtype
  assert np.all(np.asarray(out, np.float32)[0, :, 1, :] == 0.0)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, k)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


def test_cosine_is_scale_invariant():
  _, q, k = _qk(8)
  out = _jit(scores.cosine, q, k)
  out_scaled = _jit(scores.cosine, 3.0 * q, 0.25 * k)
  np.testing.assert_allclose(out, out_scaled, **TOL)


def test_concat_matches_reference():
  rng, q, k = _qk(9, (2, 1, 3, 4), (1, 5, 6, 7))
  w = _rand(rng, 11)
  out = _jit(scores.concat, q, k, w)
  assert out.shape == OUT_SHAPE
  (w64,) = _f64(w)
  ref = _pairwise(q, k, lambda a, b: w64 @ np.concatenate([a, b]))
  np.testing.assert_allclose(out, ref, **TOL)


def _ref_location(q, w, num_keys, key_offset=0):
  q, w = _f64(q, w)
  out = np.zeros(q.shape[:-1] + (num_keys,))
  for idx in np.ndindex(*q.shape[:-1]):
    for j in range(num_keys):
      out[idx + (j,)] = sum(
        q[idx + (d,)] * w[d, key_offset + j] for d in range(q.shape[-1])
      )
  return out


@pytest.mark.parametrize('num_keys,key_offset', [(6, 0), (10, 0), (4, 3)])
def test_location_matches_reference(num_keys, key_offset):
  rng = np.random.default_rng(10)
  q, w = _rand(rng, 2, 3, 4), _rand(rng, 4, 10)
  out = _jit(scores.location, q, w, num_keys=num_keys, key_offset=key_offset)
  assert out.shape == (2, 3, num_keys)
  np.testing.assert_allclose(
    out, _ref_location(q, w, num_keys, key_offset), **TOL
  )


def test_location_key_offset_equals_slice_of_full():
  rng = np.random.default_rng(11)
  q, w = _rand(rng, 2, 3, 4), _rand(rng, 4, 10)
  full = _jit(scores.location, q, w, num_keys=10)
  for offset, n in [(0, 4), (3, 4), (6, 4), (9, 1)]:
    part = _jit(scores.location, q, w, num_keys=n, key_offset=offset)
    np.testing.assert_allclose(part, full[..., offset : offset + n], **TOL)


@pytest.mark.parametrize('kernel', [1, 3, 5])
def test_location_features_matches_reference(kernel):
  rng = np.random.default_rng(12)
  prev = rng.random((2, 3, 8)).astype(np.float32)
  conv = _rand(rng, kernel, 2)
  out = _jit(scores.location_features, prev, conv)
  assert out.shape == (2, 3, 8, 2)
  np.testing.assert_allclose(out, _ref_location_features(prev, conv), **TOL)


def test_location_features_key_offset_sees_full_alignment():
  rng = np.random.default_rng(13)
  prev = rng.random((2, 3, 8)).astype(np.float32)
  conv = _rand(rng, 5, 2)
  full = _jit(scores.location_features, prev, conv)
  for offset, n in [(0, 3), (2, 4), (5, 3)]:
    part = _jit(
      scores.location_features, prev, conv, num_keys=n, key_offset=offset
    )
    assert part.shape == (2, 3, n, 2)
    np.testing.assert_allclose(part, full[..., offset : offset + n, :], **TOL)
    np.testing.assert_allclose(
      part, _ref_location_features(prev, conv, n, offset), **TOL
    )


def _location_aware_inputs(seed, with_bias=True):
  rng = np.random.default_rng(seed)
  q = _rand(rng, 2, 1, 3, 4)
  k = _rand(rng, 1, 5, 8, 7)
  prev = rng.random((2, 1, 3, 8)).astype(np.float32)
  w_q, w_k, v, b = _additive_weights(rng, 4, 7, 6)
  conv = _rand(rng, 3, 2)
  w_f = _rand(rng, 2, 6)
  weights = dict(w_q=w_q, w_k=w_k, conv=conv, w_f=w_f, v=v)
  weights['b'] = b if with_bias else None
  return q, k, prev, weights


def _ref_location_aware(q, k, prev, weights, key_offset=0):
  w_q, w_k, conv, w_f, v = _f64(
    *(weights[n] for n in ('w_q', 'w_k', 'conv', 'w_f', 'v'))
  )
  b = 0.0 if weights['b'] is None else _f64(weights['b'])[0]
  q, k = _f64(q, k)
  num_keys = k.shape[-2]
  feats = _ref_location_features(prev, conv, num_keys, key_offset)
  batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], prev.shape[:-2])
  qb = np.broadcast_to(q, batch + q.shape[-2:])
  kb = np.broadcast_to(k, batch + k.shape[-2:])
  fb = np.broadcast_to(feats, batch + feats.shape[-3:])
  out = np.zeros(batch + (q.shape[-2], num_keys))
  for idx in np.ndindex(*batch):
    for i, j in itertools.product(range(q.shape[-2]), range(num_keys)):
      pre = (
        qb[idx + (i,)] @ w_q + kb[idx + (j,)] @ w_k + fb[idx + (i, j)] @ w_f + b
      )
      out[idx + (i, j)] = v @ np.tanh(pre)
  return out


def _jnp_weights(weights):
  return {n: None if a is None else jnp.asarray(a) for n, a in weights.items()}


@pytest.mark.parametrize('with_bias', [False, True])
def test_location_aware_matches_reference(with_bias):
  q, k, prev, weights = _location_aware_inputs(14, with_bias)
  out = _jit(scores.location_aware, q, k, prev, **_jnp_weights(weights))
  assert out.shape == (2, 5, 3, 8)
  np.testing.assert_allclose(
    out, _ref_location_aware(q, k, prev, weights), **TOL
  )


def test_location_aware_key_offset_equals_slice_of_full():
  q, k, prev, weights = _location_aware_inputs(15)
  jw = _jnp_weights(weights)
  full = _jit(scores.location_aware, q, k, prev, **jw)
  for start, stop in [(0, 3), (5, 8)]:
    chunk = k[..., start:stop, :]
    part = _jit(scores.location_aware, q, chunk, prev, **jw, key_offset=start)
    np.testing.assert_allclose(part, full[..., start:stop], **TOL)
    np.testing.assert_allclose(
      part,
      _ref_location_aware(q, chunk, prev, weights, key_offset=start),
      **TOL,
    )


def test_location_aware_traced_key_offset_under_jit():
  q, k, prev, weights = _location_aware_inputs(16)
  jw = _jnp_weights(weights)
  full = _jit(scores.location_aware, q, k, prev, **jw)
  fn = jax.jit(
    lambda chunk, offset: scores.location_aware(
      q, chunk, prev, **jw, key_offset=offset
    )
  )
  for start in (0, 2, 5):
    part = fn(k[..., start : start + 3, :], np.int32(start))
    np.testing.assert_allclose(part, full[..., start : start + 3], **TOL)


# Registry.


def test_get_returns_registered_functions():
  assert scores.get('dot') is scores.dot
  for name, fn in scores.SCORES.items():
    assert scores.get(name) is fn


def test_get_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match='unknown score') as excinfo:
    scores.get('dott')
  message = str(excinfo.value)
  assert "'dott'" in message
  for name in scores.SCORES:
    assert name in message


@pytest.fixture
def registry_name():
  name = '_test_only_score'
  assert name not in scores.SCORES
  yield name
  scores.SCORES.pop(name, None)


def test_register_refuses_overwrite(registry_name):
  first = lambda q, k: scores.dot(q, k)
  second = lambda q, k: -scores.dot(q, k)
  assert scores.register(registry_name, first) is first
  assert scores.get(registry_name) is first
  with pytest.raises(ValueError, match='already registered.*overwrite=True'):
    scores.register(registry_name, second)
  assert scores.get(registry_name) is first
  assert scores.register(registry_name, second, overwrite=True) is second
  assert scores.get(registry_name) is second


def test_register_refuses_builtin_name():
  with pytest.raises(ValueError, match='already registered'):
    scores.register('dot', scores.scaled_dot)
  assert scores.get('dot') is scores.dot


def test_takes_key_offset():
  assert scores.takes_key_offset(scores.location)
  assert scores.takes_key_offset(scores.location_aware)
  assert scores.takes_key_offset(functools.partial(scores.location, w=None))
  assert not scores.takes_key_offset(scores.dot)
  assert not scores.takes_key_offset(scores.additive)


# Bad input.


@pytest.mark.parametrize('fn', [scores.dot, scores.scaled_dot, scores.cosine])
def test_different_depths_rejected(fn):
  q, k = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 6))
  with pytest.raises(ValueError, match='same depth.*q depth 4.*k depth 6'):
    fn(q, k)


@pytest.mark.parametrize('fn', [scores.dot, scores.scaled_dot, scores.cosine])
def test_rank_one_query_rejected(fn):
  with pytest.raises(ValueError, match=r'q must have rank >= 2'):
    fn(jnp.ones((4,)), jnp.ones((5, 4)))


def test_rank_one_key_rejected():
  with pytest.raises(ValueError, match=r'k must have rank >= 2'):
    scores.dot(jnp.ones((3, 4)), jnp.ones((4,)))


def test_rank_one_query_rejected_by_location():
  with pytest.raises(ValueError, match='rank >= 2'):
    scores.location(jnp.ones((4,)), jnp.ones((4, 10)), 3)


def test_integer_inputs_rejected():
  with pytest.raises(AssertionError, match='q must be floating point'):
    scores.dot(jnp.ones((3, 4), jnp.int32), jnp.ones((5, 4)))


@pytest.mark.parametrize('num_keys,key_offset', [(11, 0), (5, 6)])
def test_location_beyond_max_len_rejected(num_keys, key_offset):
  q, w = jnp.ones((2, 3, 4)), jnp.ones((4, 10))
  with pytest.raises(ValueError, match=r'asked for 11 .*max_len=10'):
    scores.location(q, w, num_keys, key_offset=key_offset)


def _bad_weight_calls():
  q, k = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 7))
  w_q, w_k, v, b = jnp.ones((4, 8)), jnp.ones((7, 8)), jnp.ones(8), jnp.ones(8)
  prev, conv, w_f = jnp.ones((2, 3, 5)), jnp.ones((3, 2)), jnp.ones((2, 8))
  aware = functools.partial(scores.location_aware, q, k, prev)
  return [
    ('general-w', lambda: scores.general(q, k, jnp.ones((7, 4))), r'w must'),
    ('additive-w_q', lambda: scores.additive(q, k, w_k, w_k, v), 'w_q is'),
    ('additive-w_k', lambda: scores.additive(q, k, w_q, w_q, v), 'w_k is'),
    (
      'additive-v',
      lambda: scores.additive(q, k, w_q, w_k, jnp.ones((1, 8))),
      'v is',
    ),
    ('additive-b', lambda: scores.additive(q, k, w_q, w_k, v, b[:3]), 'b is'),
    (
      'normed-g',
      lambda: scores.normed_additive(q, k, w_q, w_k, v, jnp.ones(1), b),
      'g is a scalar',
    ),
    ('concat-w', lambda: scores.concat(q, k, jnp.ones(10)), 'w must'),
    (
      'location-w',
      lambda: scores.location(q, jnp.ones(10), 3),
      r'w is \[q_depth, max_len\]',
    ),
    (
      'location_aware-w_f',
      lambda: aware(w_q, w_k, conv, jnp.ones((3, 8)), v),
      'w_f is',
    ),
    (
      'location_aware-conv',
      lambda: aware(w_q, w_k, jnp.ones(3), w_f, v),
      'conv is',
    ),
  ]


@pytest.mark.parametrize(
  'call,match',
  [c[1:] for c in _bad_weight_calls()],
  ids=[c[0] for c in _bad_weight_calls()],
)
def test_wrong_weight_shapes_rejected(call, match):
  with pytest.raises(AssertionError, match=match):
    call()


@pytest.mark.parametrize('fn', [scores.additive, scores.normed_additive])
def test_scalar_v_rejected_with_clear_message(fn):
  q, k = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 7))
  w_q, w_k, b = jnp.ones((4, 8)), jnp.ones((7, 8)), jnp.ones(8)
  extra = (jnp.float32(1.0), b) if fn is scores.normed_additive else ()
  with pytest.raises(AssertionError, match=r'v is \[H\]'):
    fn(q, k, w_q, w_k, jnp.float32(1.0), *extra)


def test_location_numpy_integer_offset_beyond_max_len_rejected():
  # A concrete numpy integer is as static as a Python int: same check.
  q, w = jnp.ones((2, 3, 4)), jnp.ones((4, 10))
  with pytest.raises(ValueError, match=r'asked for 12 .*max_len=10'):
    scores.location(q, w, 4, key_offset=np.int64(8))


@pytest.mark.parametrize('k_len,key_offset', [(8, 0), (4, 3)])
def test_location_aware_prev_weights_too_short_rejected(k_len, key_offset):
  # prev_weights covers 5 key positions; the keys asked for end past them.
  rng = np.random.default_rng(23)
  q, k, prev = _rand(rng, 3, 4), _rand(rng, k_len, 7), _rand(rng, 3, 5)
  w_q, w_k, v, _ = _additive_weights(rng, 4, 7, 6)
  conv, w_f = _rand(rng, 3, 2), _rand(rng, 2, 6)
  with pytest.raises(ValueError, match='prev_weights'):
    scores.location_aware(
      q, k, prev, w_q, w_k, conv, w_f, v, key_offset=key_offset
    )


@pytest.mark.parametrize('kernel', [2, 4])
def test_location_features_even_width_rejected(kernel):
  with pytest.raises(ValueError, match=f'odd; got {kernel}'):
    scores.location_features(jnp.ones((2, 3, 5)), jnp.ones((kernel, 2)))


# jit vs no jit.


class ScoresVariantsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_scaled_dot(self):
    _, q, k = _qk(20)
    out = self.variant(scores.scaled_dot)(jnp.asarray(q), jnp.asarray(k))
    ref = _pairwise(q, k, lambda a, b: np.dot(a, b) / 2.0)
    np.testing.assert_allclose(out, ref, **TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_additive(self):
    rng, q, k = _qk(21)
    w_q, w_k, v, b = _additive_weights(rng, 4, 4, 8)
    args = map(jnp.asarray, (q, k, w_q, w_k, v, b))
    out = self.variant(scores.additive)(*args)
    w_q, w_k, v, b = _f64(w_q, w_k, v, b)
    ref = _pairwise(q, k, lambda a, c: v @ np.tanh(a @ w_q + c @ w_k + b))
    np.testing.assert_allclose(out, ref, **TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_location_traced_offset(self):
    rng = np.random.default_rng(22)
    q, w = _rand(rng, 2, 3, 4), _rand(rng, 4, 10)
    fn = self.variant(
      lambda q, w, offset: scores.location(q, w, 4, key_offset=offset)
    )
    out = fn(jnp.asarray(q), jnp.asarray(w), jnp.int32(5))
    np.testing.assert_allclose(out, _ref_location(q, w, 4, 5), **TOL)
