"""Mixed-precision products (`attnjax.precision`): values and gradients
against numpy on bfloat16-rounded operands, the dense layers that take them,
and the Transformer's `matmul_dtype='bfloat16'`."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import precision
from attnjax.models.transformer import Transformer, TransformerConfig


def _rounded(a) -> np.ndarray:
  """`a` rounded to bfloat16, as float64."""
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)


def _random(shape, seed):
  return jnp.asarray(
    np.random.default_rng(seed).normal(size=shape), jnp.float32
  )


@pytest.mark.parametrize(
  'shape', [(6, 4), (9, 5), (35, 3), (49, 2), (143, 2), (11, 4), (1, 3)]
)
def test_row_major_transpose_is_the_transpose(shape):
  a = _random(shape, 0)
  out = jax.jit(precision.row_major_transpose)(a)
  np.testing.assert_array_equal(out, np.asarray(a).T)


# (lhs shape, rhs shape, contracting dims): Dense on 2-D and 3-D inputs,
# DenseGeneral's two-axis output projection, and 13 rows (prime: the plain
# transpose).
DENSE = [
  ((12, 5), (5, 7), 1),
  ((2, 6, 5), (5, 7), 1),
  ((3, 11, 2, 4), (2, 4, 6), 2),
  ((13, 8), (8, 3), 1),
]


@pytest.mark.parametrize('lhs_shape, rhs_shape, n_contract', DENSE)
def test_dense_products_and_gradients_match_numpy(
  lhs_shape, rhs_shape, n_contract
):
  """y = round(x) round(w) in float32; dx = round(dy) round(w)^T and
  dw = round(x)^T round(dy), also accumulated in float32."""
  x, w = _random(lhs_shape, 1), _random(rhs_shape, 2)
  lhs_contract = tuple(range(x.ndim - n_contract, x.ndim))
  dims = ((lhs_contract, tuple(range(n_contract))), ((), ()))
  product = functools.partial(
    precision.bfloat16_dot_general, dimension_numbers=dims
  )
  y, vjp = jax.vjp(jax.jit(product), x, w)
  dy = _random(y.shape, 3)
  dx, dw = vjp(dy)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32

  depth = int(np.prod(rhs_shape[:n_contract]))
  x2 = _rounded(x).reshape(-1, depth)
  w2 = _rounded(w).reshape(depth, -1)
  dy2 = _rounded(dy).reshape(x2.shape[0], -1)
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, (x2 @ w2).reshape(y.shape), **tol)
  np.testing.assert_allclose(dx, (dy2 @ w2.T).reshape(x.shape), **tol)
  np.testing.assert_allclose(dw, (x2.T @ dy2).reshape(w.shape), **tol)


def test_other_dimension_numbers_round_the_operands():
  """A batched product (not a dense layer's) still takes bfloat16 operands
  and returns float32; its gradient is JAX's: the float32 incoming gradient
  times the other rounded operand, rounded to bfloat16."""
  x, w = _random((3, 4, 5), 4), _random((3, 5, 2), 5)
  dims = (((2,), (1,)), ((0,), (0,)))
  y, vjp = jax.vjp(
    functools.partial(precision.bfloat16_dot_general, dimension_numbers=dims),
    x,
    w,
  )
  assert y.dtype == jnp.float32
  expected = np.einsum('bik,bkj->bij', _rounded(x), _rounded(w))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  dy = _random(y.shape, 6)
  dx, dw = vjp(dy)
  assert dx.dtype == dw.dtype == jnp.float32
  dy64 = np.asarray(dy, np.float64)
  tol = dict(rtol=1e-2, atol=1e-2)  # the gradients' bfloat16 rounding
  np.testing.assert_allclose(
    dx, np.einsum('bij,bkj->bik', dy64, _rounded(w)), **tol
  )
  np.testing.assert_allclose(
    dw, np.einsum('bik,bij->bkj', _rounded(x), dy64), **tol
  )


def test_mismatched_contracting_dims_are_an_error():
  """Sizes that do not line up raise as `lax.dot_general` does, not a
  reshaped product of the wrong elements."""
  x, w = _random((5, 2, 3), 7), _random((3, 2, 7), 8)
  with pytest.raises(TypeError, match='contracting dimensions'):
    precision.bfloat16_dot_general(x, w, (((1, 2), (0, 1)), ((), ())))


def test_gradients_have_the_operands_dtypes():
  x = _random((4, 6), 6).astype(jnp.bfloat16)
  w = _random((6, 3), 7)
  y, vjp = jax.vjp(precision.bfloat16_matmul, x, w)
  dx, dw = vjp(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dw.dtype) == (
    jnp.float32,
    jnp.bfloat16,
    jnp.float32,
  )
  out = precision.bfloat16_dot_general(
    x, x.T, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )
  assert out.dtype == jnp.float32
  same = precision.bfloat16_dot_general(x, x.T, (((1,), (0,)), ((), ())))
  assert same.dtype == jnp.bfloat16


def test_matmul_shape_error():
  with pytest.raises(ValueError, match=r'x \[n, k\] and w \[k, m\]'):
    precision.bfloat16_matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))


def test_flax_dense_layers_take_it():
  x = _random((2, 5, 6), 8)
  layer = nn.DenseGeneral(
    (2, 3), dot_general=precision.bfloat16_dot_general, use_bias=False
  )
  params = layer.init(jax.random.key(0), x)
  kernel = params['params']['kernel']
  expected = np.einsum('blk,khd->blhd', _rounded(x), _rounded(kernel))
  np.testing.assert_allclose(
    layer.apply(params, x), expected, rtol=1e-5, atol=1e-5
  )


def _transformer(matmul_dtype: str, share_embeddings: bool):
  config = TransformerConfig(
    source_vocab_size=20,
    target_vocab_size=20,
    d_model=32,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=2,
    mlp_dim=64,
    dropout_rate=0.0,
    max_len=8,
    share_embeddings=share_embeddings,
    matmul_dtype=matmul_dtype,
  )
  return Transformer(config)


def _loss(model, params, inputs, targets):
  logits = model.apply({'params': params}, inputs, targets, train=False)
  picked = jnp.take_along_axis(
    jax.nn.log_softmax(logits), targets[..., None], axis=-1
  )
  return -jnp.mean(picked)


@pytest.mark.parametrize('share', [False, True], ids=['separate', 'shared'])
def test_transformer_mixed_precision(share):
  """Every dense product of the forward and backward pass takes bfloat16
  operands (the attention products stay float32), and the loss and its
  gradients stay close to the float32 model's on the same parameters."""
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(3, 20, (4, 7)), jnp.int32)
  targets = jnp.asarray(rng.integers(3, 20, (4, 6)), jnp.int32)
  exact, mixed = (_transformer(m, share) for m in ('float32', 'bfloat16'))
  params = exact.init(jax.random.key(0), inputs, targets, train=False)
  params = params['params']

  grad = jax.value_and_grad(_loss, argnums=1)
  jaxpr = jax.make_jaxpr(functools.partial(grad, mixed))(
    params, inputs, targets
  )
  dense, attention = [], []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        batched = eqn.params['dimension_numbers'][1][0]
        (attention if batched else dense).append(eqn)
      for inner in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(inner)

  walk(jaxpr.jaxpr)
  assert dense and attention
  for eqn in dense:
    assert {v.aval.dtype for v in eqn.invars} == {jnp.dtype(jnp.bfloat16)}
    assert eqn.outvars[0].aval.dtype == jnp.float32
  for eqn in attention:
    assert {v.aval.dtype for v in eqn.invars} == {jnp.dtype(jnp.float32)}

  loss, grads = jax.jit(functools.partial(grad, exact))(params, inputs, targets)
  mixed_loss, mixed_grads = jax.jit(functools.partial(grad, mixed))(
    params, inputs, targets
  )
  np.testing.assert_allclose(mixed_loss, loss, rtol=1e-2)
  flat, mixed_flat = jax.tree.leaves(grads), jax.tree.leaves(mixed_grads)
  largest = max(float(jnp.linalg.norm(g)) for g in flat)
  for g, m in zip(flat, mixed_flat, strict=True):
    if float(jnp.linalg.norm(g)) < 1e-3 * largest:
      continue  # ~0 by symmetry (key biases): only rounding noise is left
    cosine = jnp.vdot(g, m) / (jnp.linalg.norm(g) * jnp.linalg.norm(m))
    assert cosine > 0.99
