"""Train-step throughput of a config, sharded jit vs plain jit.

  python bench/train_step.py --config=configs/addition.py [--steps=30]
      [--rounds=5] [--config.batch_size=...] [--workdir=DIR]

Translation configs train (or load) their vocabularies in --workdir (a
temporary directory by default).

Prints steps/s and target tokens/s of `train_lib.make_train_step` (jit with
in/out shardings over the config's mesh, donated state) and of a plain
`jax.jit` of the same step function on one device (only when the mesh has
one device), measured in alternating rounds so machine noise hits both
alike. Each round cycles through the same 4 batches, a multiple of 4 steps
(--steps rounded up), so the tokens per step are those of the 4.
"""

import functools
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from attnjax import train_lib
from attnjax.data import vocab as vocab_lib
from attnjax.training import sharding

# configs/*.py import `configs.base`; make the repository root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py.')
_STEPS = flags.DEFINE_integer(
  'steps', 30, 'Timed steps per round.', lower_bound=1
)
_ROUNDS = flags.DEFINE_integer(
  'rounds', 5, 'Alternating rounds.', lower_bound=1
)
_WORKDIR = flags.DEFINE_string(
  'workdir', '', 'Where a translation task keeps its vocabularies.'
)
flags.mark_flag_as_required('config')
_BATCHES = 4  # Distinct batches each round cycles through.


def _time_steps(step_fn, state, batches, rng, steps):
  start = time.perf_counter()
  for i in range(steps):
    state, _ = step_fn(state, batches[i % len(batches)], rng)
  jax.block_until_ready(state)
  return state, time.perf_counter() - start


def _bench(config, workdir: str) -> None:
  """Times both steps of `config` and prints the table."""
  exp = train_lib.Experiment.create(config, workdir)
  iterator = exp.train_iterator()
  local = [next(iterator) for _ in range(_BATCHES)]
  steps = -(-_STEPS.value // _BATCHES) * _BATCHES
  tokens = float(
    np.mean([(b['targets'] != vocab_lib.PAD_ID).sum() for b in local])
  )
  rng = jax.random.key(0)

  sharded_fn = train_lib.make_train_step(exp)
  plain_fn = jax.jit(
    functools.partial(
      train_lib.train_step,
      model=exp.model,
      pad_id=vocab_lib.PAD_ID,
      label_smoothing=config.label_smoothing,
    ),
    donate_argnums=0,
  )
  with jax.set_mesh(exp.mesh):
    sharded_batches = [
      sharding.global_batch(b, exp.mesh, config.batch_size) for b in local
    ]
    sharded_state = exp.init_state(rng)
  plain_state = jax.device_put(jax.device_get(sharded_state), jax.devices()[0])
  plain_batches = [jax.device_put(b, jax.devices()[0]) for b in local]

  # Compile (once per batch shape: translation batches come in buckets) and
  # warm up both.
  plain = exp.mesh.size == 1
  sharded_state, _ = _time_steps(
    sharded_fn, sharded_state, sharded_batches, rng, _BATCHES
  )
  if plain:
    plain_state, _ = _time_steps(
      plain_fn, plain_state, plain_batches, rng, _BATCHES
    )
  times = {'sharded jit': [], 'plain jit': []}
  for _ in range(_ROUNDS.value):
    sharded_state, t = _time_steps(
      sharded_fn, sharded_state, sharded_batches, rng, steps
    )
    times['sharded jit'].append(t / steps)
    if plain:
      plain_state, t = _time_steps(
        plain_fn, plain_state, plain_batches, rng, steps
      )
      times['plain jit'].append(t / steps)

  print(
    f'jax {jax.__version__}, {jax.devices()[0].platform} x '
    f'{len(jax.devices())}, mesh {dict(exp.mesh.shape)}'
  )
  params = sum(x.size for x in jax.tree.leaves(sharded_state.params))
  print(
    f'config: {train_lib.model_name(config)} on {config.data.task}, '
    f'{params / 1e6:.1f}M parameters, batch {config.batch_size}, '
    f'{tokens:.0f} target tokens/batch'
  )
  print()
  print('| step | median s/step | steps/s | target tokens/s |')
  print('|---|---|---|---|')
  for name, values in times.items():
    if not values:
      continue
    median = statistics.median(values)
    print(
      f'| {name} | {median:.4f} | {1 / median:.1f} | {tokens / median:,.0f} |'
    )
  if times['plain jit']:
    ratio = statistics.median(times['sharded jit']) / statistics.median(
      times['plain jit']
    )
    print(f'\nsharded / plain time: {ratio:.3f}')


def main(argv):
  del argv
  if _WORKDIR.value:
    _bench(_CONFIG.value, _WORKDIR.value)
    return
  with tempfile.TemporaryDirectory(prefix='attnjax-bench-') as workdir:
    _bench(_CONFIG.value, workdir)


if __name__ == '__main__':
  app.run(main)
