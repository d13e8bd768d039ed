"""Learning-rate schedules and the optimiser built from a config."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from attnjax import train_lib
from attnjax.training import optim


def _config(**overrides):
  config = ml_collections.ConfigDict(
    dict(
      name='adam',
      learning_rate=1.0,
      schedule='constant',
      warmup_steps=10,
      weight_decay=0.0,
      clip_norm=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
    )
  )
  config.update(overrides)
  return config


@pytest.mark.parametrize('schedule', optim.SCHEDULES)
def test_warmup_is_linear_to_the_peak(schedule):
  """Step k (1-based, the k-th update) is evaluated at optax's count k - 1:
  warmup_steps=10 gives steps 1, 5 and 10 a tenth, half and all the peak."""
  lr = optim.learning_rate_schedule(_config(schedule=schedule), 100)
  np.testing.assert_allclose([lr(0), lr(4), lr(9)], [0.1, 0.5, 1.0], atol=1e-6)


@pytest.mark.parametrize('warmup', [1, 4, 10])
def test_rsqrt_is_the_transformer_schedule(warmup):
  """Vaswani et al.'s lrate, scaled to a peak of 1, at steps 1, 2, ...:
  min(step / warmup, sqrt(warmup / step)). The first update is not lost to
  a learning rate of 0, and the peak falls on step `warmup`."""
  lr = optim.learning_rate_schedule(
    _config(schedule='rsqrt', warmup_steps=warmup), 100
  )
  steps = np.arange(1, 60)
  expected = np.minimum(steps / warmup, np.sqrt(warmup / steps))
  np.testing.assert_allclose([lr(k - 1) for k in steps], expected, rtol=1e-6)


def test_decays():
  steps, warmup = 110, 10
  constant = optim.learning_rate_schedule(_config(), steps)
  cosine = optim.learning_rate_schedule(_config(schedule='cosine'), steps)
  linear = optim.learning_rate_schedule(_config(schedule='linear'), steps)
  rsqrt = optim.learning_rate_schedule(_config(schedule='rsqrt'), steps)
  assert float(constant(90)) == pytest.approx(1.0)
  # Halfway through the decay: cosine and linear at half the peak.
  assert float(cosine(warmup + 50)) == pytest.approx(0.5, abs=1e-6)
  assert float(linear(warmup + 50)) == pytest.approx(0.5, abs=1e-6)
  assert float(cosine(steps)) == pytest.approx(0.0, abs=1e-6)
  # rsqrt: lr * sqrt(warmup / k) at step k (count k - 1) after the warmup.
  assert float(rsqrt(40 - 1)) == pytest.approx((10 / 40) ** 0.5)


def test_no_warmup_starts_at_the_peak():
  lr = optim.learning_rate_schedule(_config(warmup_steps=0), 10)
  assert float(lr(0)) == pytest.approx(1.0)


def test_clipping_and_weight_decay():
  params = {'w': jnp.ones(4)}
  grads = {'w': jnp.full(4, 100.0)}
  plain = optim.make_optimizer(_config(warmup_steps=0, name='adamw'), 10)
  clipped = optim.make_optimizer(
    _config(warmup_steps=0, clip_norm=1.0, name='adamw'), 10
  )
  # Adam normalises the step; clipping shows in the moments it keeps.
  _, state = clipped.update(grads, clipped.init(params), params)
  mu = optax.tree_utils.tree_get(state, 'mu')
  np.testing.assert_allclose(optax.tree.norm(mu), 0.1, rtol=1e-5)
  _, state = plain.update(grads, plain.init(params), params)
  np.testing.assert_allclose(
    optax.tree.norm(optax.tree_utils.tree_get(state, 'mu')), 20.0, rtol=1e-5
  )
  decayed = optim.make_optimizer(
    _config(warmup_steps=0, name='adamw', weight_decay=0.5), 10
  )
  zero = {'w': jnp.zeros(4)}
  updates, _ = decayed.update(zero, decayed.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.5 * params['w'], rtol=1e-6)


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.3])
def test_smoothed_cross_entropy_matches_optax_labels(smoothing):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, size=(3, 5)))
  labels = optax.smooth_labels(jax.nn.one_hot(targets, 11), smoothing)
  expected = optax.softmax_cross_entropy(logits, labels)
  got = train_lib.smoothed_cross_entropy(logits, targets, smoothing)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_perplexity_ignores_label_smoothing():
  """The logged loss is the smoothed objective; perplexity is exp of the
  plain negative log-likelihood, the same with or without smoothing."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 4, 9)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(1, 9, size=(2, 4))).at[1, 3].set(0)
  mask = np.asarray(targets) != 0
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  expected = np.exp(np.sum(np.asarray(nll) * mask) / mask.sum())
  results = {}
  for smoothing in (0.0, 0.2):
    sums = train_lib.token_metrics(logits, targets, 0, smoothing)
    results[smoothing] = train_lib.summarize(jax.device_get(sums))
    np.testing.assert_allclose(
      results[smoothing]['perplexity'], expected, rtol=1e-5
    )
  assert results[0.2]['loss'] > results[0.0]['loss']
  # The loss is the smoothed objective's mean over the non-PAD tokens.
  labels = optax.smooth_labels(jax.nn.one_hot(targets, 9), 0.2)
  smoothed = np.asarray(optax.softmax_cross_entropy(logits, labels))
  np.testing.assert_allclose(
    results[0.2]['loss'], np.sum(smoothed * mask) / mask.sum(), rtol=1e-5
  )


def test_sequence_metrics_count_only_valid_rows():
  """Held-out batches are filled up with all-PAD rows (valid False). Those
  are trivially 'right' everywhere, and must count neither as sequences nor
  as exact matches."""
  logits = jax.nn.one_hot(jnp.array([[3, 2, 0], [3, 4, 0], [0, 0, 0]]), 5)
  targets = jnp.array([[3, 2, 0], [3, 2, 0], [0, 0, 0]])
  valid = jnp.array([True, True, False])
  sums = train_lib.token_metrics(logits, targets, 0, valid=valid)
  assert float(sums['sequences']) == 2.0
  assert float(sums['correct_sequences']) == 1.0
  assert float(sums['tokens']) == 4.0
  assert float(sums['correct_tokens']) == 3.0
  summary = train_lib.summarize(jax.device_get(sums))
  assert summary['teacher_forced_exact_match'] == 0.5


def test_train_step_draws_new_dropout_at_every_step():
  """The dropout rng is folded with the step: the same parameters, batch
  and rng at another step drop other logits, so the loss differs."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, inputs, targets, *, train):
      w = self.param('w', nn.initializers.normal(1.0), (7,))
      logits = jnp.ones((*targets.shape, 7)) * w
      return nn.Dropout(0.5, deterministic=not train)(logits)

  targets = jnp.ones((2, 4), jnp.int32)
  params = Model().init(jax.random.key(1), targets, targets, train=False)
  state = train_lib.TrainState.create(
    apply_fn=None, params=params['params'], tx=optax.sgd(0.0)
  )

  train_step = jax.jit(
    functools.partial(
      train_lib.train_step, model=Model(), pad_id=0, label_smoothing=0.0
    )
  )

  def loss_at(step):
    batch = {'inputs': targets, 'targets': targets}
    _, sums = train_step(state.replace(step=step), batch, jax.random.key(0))
    return float(sums['loss_sum'])

  assert loss_at(3) == loss_at(3)
  assert loss_at(3) != loss_at(4)
