"""Dropout on 16-bit draws: rates, scaling, gradients, shardings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax import dropout

keep_mask = jax.jit(dropout.keep_mask, static_argnums=(1, 2))
apply_dropout = jax.jit(dropout.dropout, static_argnums=(2, 3))


def _within_binomial(count, n, p, sigmas=5.0):
  return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize('rate', [0.1, 0.3, 0.5, 0.9])
def test_drop_fraction_is_the_effective_rate(rate):
  mask = np.asarray(keep_mask(jax.random.key(0), rate, (64, 31, 257)))
  assert _within_binomial((~mask).sum(), mask.size, rate)
  assert dropout.effective_rate(rate) == pytest.approx(rate, abs=2**-17)


def test_the_two_halves_of_a_word_are_independent():
  # Elements 2i and 2i + 1 come from one 32-bit word. Were a half reused or
  # the halves correlated, both would drop together more (or less) often
  # than rate**2.
  rate = 0.5
  mask = np.asarray(keep_mask(jax.random.key(1), rate, (512, 1024)))
  both = (~mask[:, 0::2] & ~mask[:, 1::2]).sum()
  assert _within_binomial(both, mask.size // 2, rate**2)
  # Neighbouring words, and neighbouring rows, are independent too.
  across = (~mask[:, 1:-1:2] & ~mask[:, 2::2]).sum()
  assert _within_binomial(across, mask.size // 2 - 512, rate**2)
  rows = (~mask[:-1] & ~mask[1:]).sum()
  assert _within_binomial(rows, mask.size - 1024, rate**2)


@pytest.mark.parametrize('shape', [(), (1,), (7,), (3, 5), (2, 0), (0, 4)])
def test_any_shape_including_odd_and_empty(shape):
  mask = keep_mask(jax.random.key(0), 0.5, shape)
  assert mask.shape == shape and mask.dtype == jnp.bool_


def test_keys_give_different_masks_and_one_key_the_same():
  a, b = (keep_mask(jax.random.key(s), 0.5, (100,)) for s in (0, 1))
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, keep_mask(jax.random.key(0), 0.5, (100,)))


def test_kept_values_are_scaled_so_the_expectation_is_the_input():
  x = jax.random.uniform(jax.random.key(2), (300, 40), minval=1, maxval=2)
  rate = 0.3
  outs = np.stack(
    [np.asarray(apply_dropout(jax.random.key(s), x, rate)) for s in range(20)]
  )
  kept = outs != 0
  keep_prob = 1 - dropout.effective_rate(rate)
  np.testing.assert_allclose(
    outs[kept], np.broadcast_to(x / keep_prob, outs.shape)[kept], rtol=1e-6
  )
  # out / x is 1 / keep_prob or 0: its mean over all draws is 1, give or
  # take 5 standard errors.
  ratio = outs / np.asarray(x)
  error = 5 * np.sqrt(rate / keep_prob / ratio.size)
  assert abs(ratio.mean() - 1) < error


def test_gradient_is_the_mask_over_the_keep_probability():
  rng, x = jax.random.key(3), jnp.linspace(-1, 1, 96).reshape(8, 12)
  rate = 0.25
  grad = jax.grad(lambda x: dropout.dropout(rng, x, rate).sum())(x)
  mask = dropout.keep_mask(rng, rate, x.shape)
  expected = np.where(mask, 1 / (1 - dropout.effective_rate(rate)), 0)
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_rates_zero_and_one():
  x = jnp.arange(1.0, 7.0)
  rng = jax.random.key(0)
  assert dropout.dropout(rng, x, 0.0) is x
  np.testing.assert_array_equal(dropout.dropout(rng, x, 1.0), 0)
  grad = jax.grad(lambda x: dropout.dropout(rng, x, 1.0).sum())(x)
  np.testing.assert_array_equal(grad, 0)  # not NaN
  with pytest.raises(ValueError, match=r'in \[0, 1\]; got 1.5'):
    dropout.dropout(rng, x, 1.5)


def test_broadcast_dims_share_one_draw():
  x = jnp.ones((16, 6, 10))
  for dims in [(1,), (-2,), (0, 2)]:
    dropped = np.asarray(apply_dropout(jax.random.key(4), x, 0.5, dims)) == 0
    np.testing.assert_array_equal(
      dropped, np.broadcast_to(dropped.any(dims, keepdims=True), x.shape)
    )
    assert 0 < dropped.mean() < 1


def test_keeps_the_input_dtype():
  x = jnp.ones((4, 8), jnp.bfloat16)
  assert apply_dropout(jax.random.key(0), x, 0.1).dtype == jnp.bfloat16


def test_mask_is_the_same_on_one_device_and_on_eight():
  # With JAX's partitionable threefry a draw depends only on the key and the
  # element's index: a batch split over devices drops the same elements.
  mesh = jax.make_mesh((8,), ('data',))
  x = jax.random.normal(jax.random.key(5), (16, 5, 9))
  sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  one = apply_dropout(jax.random.key(6), x, 0.4)
  eight = apply_dropout(jax.random.key(6), sharded, 0.4)
  np.testing.assert_array_equal(one, eight)


def test_module_is_flax_dropout_on_half_the_bits():
  layer = dropout.Dropout(0.2)
  assert isinstance(layer, nn.Dropout)  # the same fields and defaults
  x = jnp.ones((6, 10))
  assert layer.apply({}, x, deterministic=True) is x
  rng = jax.random.key(7)
  np.testing.assert_array_equal(
    layer.apply({}, x, deterministic=False, rng=rng),
    dropout.dropout(rng, x, 0.2),
  )
  # Without `rng=`, the key comes from the 'dropout' stream, like nn.Dropout.
  draw = lambda key: layer.apply(  # noqa: E731
    {}, x, deterministic=False, rngs={'dropout': key}
  )
  np.testing.assert_array_equal(draw(rng), draw(rng))
  assert not np.array_equal(draw(rng), draw(jax.random.key(8)))
  with pytest.raises(Exception, match='dropout'):
    layer.apply({}, x, deterministic=False)
