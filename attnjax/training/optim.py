"""Optimiser and learning-rate schedule from the config (optax)."""

import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ('constant', 'cosine', 'linear', 'rsqrt')
OPTIMIZERS = ('adam', 'adamw')


def learning_rate_schedule(
  config: ml_collections.ConfigDict, num_train_steps: int
) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then the named decay.

  The schedule takes optax's count of updates already made, so step k (the
  k-th update, numbered from 1 as in the logs and checkpoints) gets its
  value at k - 1. Warmup gives step k `lr * k / warmup`, reaching the peak
  at step `warmup` (no step has a learning rate of 0); the decay starts after.
  'rsqrt' is the Transformer schedule (Vaswani et al. 2017, with the peak
  rate as lr): `lr * min(k / warmup, sqrt(warmup / k))` at step k.
  """
  lr, warmup = config.learning_rate, config.warmup_steps

  def warmup_fn(count):
    return lr * jnp.minimum(count + 1, warmup) / max(warmup, 1)

  decay_steps = max(num_train_steps - warmup, 1)
  if config.schedule == 'constant':
    decay_fn = optax.constant_schedule(lr)
  elif config.schedule == 'cosine':
    decay_fn = optax.cosine_decay_schedule(lr, decay_steps)
  elif config.schedule == 'linear':
    decay_fn = optax.linear_schedule(lr, 0.0, decay_steps)
  else:  # rsqrt
    scale = max(warmup, 1)

    def decay_fn(count):
      # Step k = count + warmup + 1. join_schedules also evaluates this
      # before the warmup ends (negative counts); the clamp keeps those
      # throwaway values finite.
      return lr * jnp.sqrt(scale / jnp.maximum(count + warmup + 1, scale))

  if warmup == 0:
    return decay_fn
  return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def make_optimizer(
  config: ml_collections.ConfigDict, num_train_steps: int
) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(config, num_train_steps)
  if config.name == 'adam':
    opt = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
  else:
    opt = optax.adamw(
      schedule,
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
    )
  if config.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
  return opt
