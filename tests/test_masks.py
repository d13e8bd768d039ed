"""Masks and the masked softmax: reference values and invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from attnjax import masks

TOL = dict(rtol=1e-5, atol=1e-6)

# Under jit a shape compiles once; eager JAX compiles every op, far slower.
masked_softmax = jax.jit(masks.masked_softmax, static_argnames='axis')
causal_mask = jax.jit(masks.causal_mask, static_argnums=(0, 1))
softmax = jax.jit(jax.nn.softmax, static_argnames='axis')


def _ref_masked_softmax(scores, mask):
  """Row-wise float64 softmax over the allowed entries, with explicit loops."""
  scores = np.asarray(scores, np.float64)
  mask = np.broadcast_to(mask, scores.shape)
  out = np.zeros(scores.shape)
  for idx in np.ndindex(*scores.shape[:-1]):
    allowed = [j for j in range(scores.shape[-1]) if mask[idx + (j,)]]
    if not allowed:
      continue
    top = max(scores[idx + (j,)] for j in allowed)
    exps = {j: np.exp(scores[idx + (j,)] - top) for j in allowed}
    total = sum(exps.values())
    for j in allowed:
      out[idx + (j,)] = exps[j] / total
  return out


# length_mask.


def test_length_mask_matches_numpy():
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, 8, size=(2, 3))
  out = masks.length_mask(jnp.asarray(lengths), 7)
  assert out.dtype == jnp.bool_
  assert out.shape == (2, 3, 7)
  expected = np.zeros((2, 3, 7), bool)
  for idx in np.ndindex(2, 3):
    for pos in range(7):
      expected[idx + (pos,)] = pos < lengths[idx]
  np.testing.assert_array_equal(out, expected)


def test_length_mask_edge_lengths():
  out = masks.length_mask(jnp.array([0, 4, 9]), 4)
  np.testing.assert_array_equal(out, [[False] * 4, [True] * 4, [True] * 4])
  assert masks.length_mask(jnp.array([2]), 0).shape == (1, 0)


def test_length_mask_rejects_bad_input():
  with pytest.raises(ValueError, match='max_len must be >= 0'):
    masks.length_mask(jnp.array([1]), -1)
  with pytest.raises(AssertionError, match='lengths'):
    masks.length_mask(jnp.array([1.5]), 3)


# causal_mask.


def test_causal_mask_square_is_lower_triangular():
  out = masks.causal_mask(5)
  assert out.dtype == jnp.bool_
  np.testing.assert_array_equal(out, np.tril(np.ones((5, 5), bool)))
  np.testing.assert_array_equal(masks.causal_mask(5, 5), out)


@pytest.mark.parametrize('tq,tk', [(1, 6), (3, 7), (4, 5)])
def test_causal_mask_queries_aligned_to_end_of_keys(tq, tk):
  out = np.asarray(masks.causal_mask(tq, tk))
  assert out.shape == (tq, tk)
  for i in range(tq):
    for j in range(tk):
      assert out[i, j] == (j <= i + tk - tq), (i, j)
  # A single query (one decoding step) sees every cached key.
  if tq == 1:
    assert out.all()


def test_causal_mask_rejects_more_queries_than_keys():
  with pytest.raises(ValueError, match='tq <= tk.*tq=5, tk=3'):
    masks.causal_mask(5, 3)


def test_combine_is_a_broadcasting_and_that_skips_none():
  rng = np.random.default_rng(0)
  a = rng.random((2, 1, 5)) < 0.5
  b = rng.random((3, 1)) < 0.5
  c = rng.random((5,)) < 0.5
  out = masks.combine(jnp.asarray(a), None, jnp.asarray(b), jnp.asarray(c))
  np.testing.assert_array_equal(out, a & b & c)
  assert out.shape == (2, 3, 5)
  np.testing.assert_array_equal(masks.combine(None, jnp.asarray(c)), c)
  assert masks.combine(None, None) is None
  with pytest.raises(ValueError):
    masks.combine(jnp.asarray(a), jnp.ones((4,), bool))


@settings(max_examples=30, deadline=None)
@given(tq=st.integers(1, 5), extra=st.integers(0, 5))
def test_causal_mask_properties(tq, extra):
  tk = tq + extra
  out = np.asarray(causal_mask(tq, tk))
  assert out.shape == (tq, tk)
  i, j = np.indices((tq, tk))
  np.testing.assert_array_equal(out, j <= i + tk - tq)
  counts = out.sum(axis=1)
  assert np.all(np.diff(counts) >= 0)
  assert out[-1].all()


# masked_softmax: values.


def _scores_and_mask(seed=0, shape=(3, 4, 6)):
  rng = np.random.default_rng(seed)
  scores = rng.standard_normal(shape).astype(np.float32) * 3
  mask = rng.random(shape) < 0.6
  mask[0, 1, :] = False  # a fully masked row
  mask[1, 2, :] = True  # a fully allowed row
  return scores, mask


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16, jnp.float32])
def test_masked_softmax_returns_float32(dtype):
  scores, mask = _scores_and_mask(1)
  low = jnp.asarray(scores, dtype)
  out = masked_softmax(low, mask)
  assert out.dtype == jnp.float32
  assert masked_softmax(low).dtype == jnp.float32
  ref = _ref_masked_softmax(np.asarray(low.astype(jnp.float32)), mask)
  np.testing.assert_allclose(out, ref, **TOL)


def test_masked_softmax_matches_reference():
  scores, mask = _scores_and_mask(2)
  out = np.asarray(masked_softmax(scores, mask))
  np.testing.assert_allclose(out, _ref_masked_softmax(scores, mask), **TOL)
  assert np.all(out[~mask] == 0.0)
  sums = out.sum(-1)
  has_any = mask.any(-1)
  np.testing.assert_allclose(sums[has_any], 1.0, **TOL)
  assert np.all(out[0, 1] == 0.0)
  assert not np.any(np.isnan(out))


def test_fully_masked_row_is_all_zeros():
  scores = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  mask = jnp.array([[False] * 3, [False] * 3])
  out = np.asarray(masked_softmax(scores, mask))
  np.testing.assert_array_equal(out, np.zeros((2, 3), np.float32))


def test_broadcast_mask():
  scores, _ = _scores_and_mask(3)
  key_mask = np.array([True, True, False, True, False, False])
  out = masked_softmax(scores, key_mask)
  np.testing.assert_allclose(out, _ref_masked_softmax(scores, key_mask), **TOL)


def test_other_axis_equals_transposed_last_axis():
  scores, mask = _scores_and_mask(4)
  out = masked_softmax(scores, mask, axis=1)
  transposed = masked_softmax(
    np.swapaxes(scores, 1, 2), np.swapaxes(mask, 1, 2)
  )
  np.testing.assert_allclose(out, np.swapaxes(transposed, 1, 2), **TOL)


def test_no_mask_equals_jax_softmax():
  scores, _ = _scores_and_mask(5)
  for axis in (-1, 0):
    np.testing.assert_allclose(
      masked_softmax(scores, None, axis=axis),
      softmax(scores, axis=axis),
      **TOL,
    )


def test_all_true_mask_equals_jax_softmax():
  scores, _ = _scores_and_mask(6)
  np.testing.assert_allclose(
    masked_softmax(scores, np.ones(scores.shape, bool)),
    softmax(scores),
    **TOL,
  )


def test_no_mask_equals_all_true_mask_on_rows_of_minus_inf():
  # A score function may itself return -inf (a bias table, a custom causal
  # score). mask=None means "all allowed", so it must give what an all-True
  # mask gives: a -inf row is all zeros with a zero gradient, not NaN (as
  # chunked_attention, which has no softmax of its own, already returns).
  scores = np.array(
    [[-np.inf, -np.inf, -np.inf], [0.5, -np.inf, 2.0], [1.0, 2.0, 3.0]],
    np.float32,
  )
  ones = np.ones(scores.shape, bool)
  out = np.asarray(masked_softmax(scores, None))
  np.testing.assert_array_equal(out, masked_softmax(scores, ones))
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_allclose(out[1:], _ref_masked_softmax(scores[1:], ones[1:]))
  weights = np.arange(3, dtype=np.float32)
  grad = np.asarray(_grad_of_weighted_sum(scores, None, weights))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[0], 0.0)


@pytest.mark.parametrize('with_mask', [False, True])
def test_no_key_at_all_gives_an_empty_result(with_mask):
  # k_len = 0 (e.g. an empty source): nothing allowed, not a max-of-empty
  # error.
  scores = np.zeros((2, 3, 0), np.float32)
  mask = np.zeros((2, 1, 0), bool) if with_mask else None
  out = masked_softmax(scores, mask)
  assert out.shape == (2, 3, 0) and out.dtype == jnp.float32


def test_large_allowed_scores_do_not_overflow():
  scores = np.array([[1e4, 1e4 - 1.0, -1e4, 5e4]], np.float32)
  mask = np.array([[True, True, True, False]])
  out = np.asarray(masked_softmax(scores, mask))
  e = np.exp(-1.0)
  np.testing.assert_allclose(out, [[1 / (1 + e), e / (1 + e), 0, 0]], **TOL)


# masked_softmax: gradients.


@jax.jit
def _grad_of_weighted_sum(scores, mask, weights):
  loss = lambda s: jnp.sum(masks.masked_softmax(s, mask) * weights)
  return jax.grad(loss)(scores)


@pytest.mark.parametrize('fill', [np.inf, -np.inf, np.nan, 1e30, 0.0])
def test_gradient_finite_and_zero_at_masked(fill):
  scores, mask = _scores_and_mask(7)
  scores = np.where(mask, scores, np.float32(fill)).astype(np.float32)
  weights = np.random.default_rng(8).standard_normal(scores.shape)
  weights = weights.astype(np.float32)

  out = np.asarray(masked_softmax(scores, mask))
  assert np.all(np.isfinite(out))
  assert np.all(out[~mask] == 0.0)

  grad = np.asarray(_grad_of_weighted_sum(scores, mask, weights))
  assert np.all(np.isfinite(grad))
  assert np.all(grad[~mask] == 0.0)
  assert np.all(grad[0, 1] == 0.0)  # the fully masked row

  # d/ds_j sum_i p_i w_i = p_j (w_j - sum_i p_i w_i) over the allowed entries.
  p = _ref_masked_softmax(scores, mask)
  expected = p * (weights - np.sum(p * weights, axis=-1, keepdims=True))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


# masked_softmax: bad input.


@pytest.mark.parametrize('mask_dtype', [np.int32, np.float32])
def test_non_boolean_mask_rejected(mask_dtype):
  scores, mask = _scores_and_mask(9)
  with pytest.raises(TypeError, match='boolean'):
    masks.masked_softmax(jnp.asarray(scores), jnp.asarray(mask, mask_dtype))


@pytest.mark.parametrize('mask_shape', [(4,), (3, 4, 5), (2, 3, 4, 6)])
def test_non_broadcasting_mask_rejected(mask_shape):
  # The last one broadcasts with the scores but to a bigger shape.
  scores, _ = _scores_and_mask(10)
  with pytest.raises(ValueError, match='broadcast'):
    masks.masked_softmax(jnp.asarray(scores), jnp.ones(mask_shape, bool))


def test_integer_scores_rejected():
  with pytest.raises(AssertionError, match='floating point'):
    masks.masked_softmax(jnp.ones((2, 3), jnp.int32))


# masked_softmax: properties.

_SHAPES = st.tuples(st.integers(1, 3), st.integers(1, 5))


@st.composite
def _scores_mask(draw, extra_fill=False):
  shape = draw(_SHAPES)
  finite = st.floats(-20, 20, width=32)
  scores = draw(hnp.arrays(np.float32, shape, elements=finite))
  mask = draw(hnp.arrays(np.bool_, shape))
  if not extra_fill:
    return scores, mask
  anything = st.floats(width=32, allow_nan=True, allow_infinity=True)
  other = draw(hnp.arrays(np.float32, shape, elements=anything))
  shift = draw(hnp.arrays(np.float32, (shape[0], 1), elements=finite))
  return scores, mask, other, shift


@settings(max_examples=40, deadline=None)
@given(_scores_mask())
def test_masked_softmax_properties(scores_mask):
  scores, mask = scores_mask
  out = np.asarray(masked_softmax(scores, mask))
  assert out.dtype == np.float32
  assert np.all(out >= 0.0)
  assert np.all(out[~mask] == 0.0)
  sums = out.sum(-1)
  has_any = mask.any(-1)
  np.testing.assert_allclose(sums[has_any], 1.0, rtol=1e-5)
  assert np.all(sums[~has_any] == 0.0)
  np.testing.assert_allclose(out, _ref_masked_softmax(scores, mask), **TOL)


@settings(max_examples=40, deadline=None)
@given(_scores_mask(extra_fill=True))
def test_masked_softmax_invariances(data):
  scores, mask, other, shift = data
  out = np.asarray(masked_softmax(scores, mask))
  # A constant added to a row changes nothing.
  shifted = np.asarray(masked_softmax(scores + shift, mask))
  np.testing.assert_allclose(shifted, out, rtol=1e-5, atol=1e-5)
  # Whatever the masked positions hold (inf, NaN, ...) changes nothing.
  replaced = np.where(mask, scores, other)
  np.testing.assert_array_equal(masked_softmax(replaced, mask), out)


# The seed 003 example: masked_softmax(rand(2, 2, 4), [2, 3]).


def test_seed_003_valid_lengths_example():
  scores = np.random.default_rng(11).random((2, 2, 4)).astype(np.float32)
  valid = jnp.array([2, 3])
  mask = masks.length_mask(valid, 4)[:, None, :]  # [batch, 1, k_len]
  # Eager on purpose: the example as a user would type it.
  out = np.asarray(masks.masked_softmax(jnp.asarray(scores), mask))
  assert out.shape == (2, 2, 4)
  assert np.all(out[0, :, 2:] == 0.0)
  assert np.all(out[1, :, 3:] == 0.0)
  assert np.all(out[0, :, :2] > 0.0)
  assert np.all(out[1, :, :3] > 0.0)
  np.testing.assert_allclose(out.sum(-1), np.ones((2, 2)), **TOL)
  for b, n in enumerate([2, 3]):
    e = np.exp(scores[b, :, :n].astype(np.float64))
    np.testing.assert_allclose(
      out[b, :, :n], e / e.sum(-1, keepdims=True), **TOL
    )
