"""Seq2seq train-step throughput beside the PyTorch peer.

  python bench/seq2seq_throughput.py --torch_python=/path/to/venv/bin/python
      [--models=lstm,bahdanau,transformer] [--rounds=3] [--steps=10]
      [--unroll=1] [--profile]

The sizes are those of `../shared/bench/torch_seq2seq_bench.py` (the PyTorch
seq2seq tutorials on Multi30k): vocabularies 7853 / 5893, batch 128, source
and target length 24, Adam 5e-4 with a global-norm clip of 1.

- `lstm`: `sutskever`, embeddings 256, 2 x 512 LSTM encoder and decoder,
  dropout 0.5;
- `bahdanau`: `bahdanau`, embeddings 256, bidirectional GRU 512 encoder,
  GRU 512 decoder, additive attention (H = 512), dropout 0.5;
- `transformer`: `attnjax.models.transformer.Transformer`, d_model 256,
  3 + 3 post-LN layers, 8 heads, feed-forward 512, dropout 0.1, learned
  positions (max_len 100), separate source and target embeddings and output
  projection (the peer's `nn.Transformer`).

Each round times `--steps` of our jitted train step (`train_lib.train_step`:
forward, backward, update; after two warm-up steps) and then runs the peer
once (`--steps` timed steps after its own warm-up), so machine noise hits
both alike. The table gives the median target tokens/s of each and their
ratio. The peer is skipped without --torch_python (torch lives in its own
virtual environment: `pip install torch==2.13.0 numpy`). `--unroll` applies
to the RNN models' time scans only.

`--profile` then traces `--steps` more steps of each model with the JAX
profiler and prints where the CPU worker threads spent them: busy time per
thread, the share of the two-thread wall clock they kept busy, and the ops
(XLA fusions, YNNPACK matrix products) that took the most thread time.
"""

import collections
import functools
import pathlib
import re
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from attnjax import train_lib
from attnjax.models import seq2seq, transformer

SOURCE_VOCAB, TARGET_VOCAB, BATCH, LENGTH = 7853, 5893, 128, 24
RNN_DROPOUT = 0.5
RNN_MODELS = {
  'lstm': dict(
    decoder='sutskever', cell='lstm', embed_dim=256, hidden_dim=512,
    num_layers=2,
  ),
  'bahdanau': dict(
    decoder='bahdanau', cell='gru', embed_dim=256, hidden_dim=512,
    bidirectional=True,
  ),
}  # fmt: skip
TRANSFORMER = dict(
  d_model=256, num_heads=8, num_encoder_layers=3, num_decoder_layers=3,
  mlp_dim=512, dropout_rate=0.1, max_len=100, positions='learned',
)  # fmt: skip
MODELS = (*RNN_MODELS, 'transformer')
PEER = pathlib.Path(__file__).resolve().parents[2] / (
  'shared/bench/torch_seq2seq_bench.py'
)

_MODELS = flags.DEFINE_list('models', list(MODELS), 'Models to measure.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per round.')
_UNROLL = flags.DEFINE_integer('unroll', 1, 'Unroll of the RNN time scans.')
_PROFILE = flags.DEFINE_bool(
  'profile', False, 'Also print where the worker threads spend a step.'
)
_TORCH = flags.DEFINE_string(
  'torch_python', '', 'Python of a virtual environment with torch.'
)


def _make_model(name: str):
  """The attnjax model of peer `name`."""
  if name == 'transformer':
    return transformer.Transformer(
      transformer.TransformerConfig(
        source_vocab_size=SOURCE_VOCAB,
        target_vocab_size=TARGET_VOCAB,
        **TRANSFORMER,
      )
    )
  return seq2seq.Seq2Seq(
    seq2seq.Seq2SeqConfig(
      source_vocab_size=SOURCE_VOCAB,
      target_vocab_size=TARGET_VOCAB,
      dropout_rate=RNN_DROPOUT,
      unroll=_UNROLL.value,
      max_source_len=LENGTH,
      **RNN_MODELS[name],
    )
  )


def _make_step(name: str):
  """A jitted train step of model `name`, its state and a batch."""
  model = _make_model(name)
  rng = np.random.default_rng(0)
  batch = {
    'inputs': jnp.asarray(rng.integers(3, SOURCE_VOCAB, (BATCH, LENGTH))),
    'targets': jnp.asarray(rng.integers(3, TARGET_VOCAB, (BATCH, LENGTH))),
  }
  params = jax.jit(
    lambda key: model.init(key, batch['inputs'], batch['targets'], train=False)
  )(jax.random.key(0))['params']
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(5e-4))
  state = train_lib.TrainState.create(
    apply_fn=model.apply, params=params, tx=tx
  )
  step = jax.jit(
    functools.partial(
      train_lib.train_step, model=model, pad_id=0, label_smoothing=0.0
    ),
    donate_argnums=0,
  )
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return step, state, batch, n_params


def _time(step, state, batch, steps):
  rng = jax.random.key(0)
  start = time.perf_counter()
  for _ in range(steps):
    state, sums = step(state, batch, rng)
  jax.block_until_ready(sums)
  return state, BATCH * LENGTH * steps / (time.perf_counter() - start)


def _profile(name, step, state, batch):
  """Traces `--steps` steps and prints a per-thread and per-op breakdown."""
  flops = step.lower(state, batch, jax.random.key(0)).compile()
  flops = flops.cost_analysis()['flops']
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    state, _ = _time(step, state, batch, _STEPS.value)
    wall = (time.perf_counter() - start) / _STEPS.value
    jax.profiler.stop_trace()
    (path,) = pathlib.Path(trace_dir).rglob('*.xplane.pb')
    data = jax.profiler.ProfileData.from_file(str(path))
  # XLA's CPU worker threads; the outer executor and pool-wait events
  # enclose the ops, so only the ops themselves count as busy.
  threads, ops = {}, collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if 'XLAEigen' not in line.name:
        continue
      events = sorted(
        (e.start_ns, e.start_ns + e.duration_ns, e.name)
        for e in line.events
        if not e.name.startswith(('ThunkExecutor', 'Slinky', 'Threadpool'))
        and not e.name.startswith('end: ')
      )
      busy, end = 0, 0
      for start_ns, end_ns, op in events:
        busy += max(0, end_ns - max(start_ns, end))
        end = max(end, end_ns)
        ops[op.split('.')[0]] += end_ns - start_ns
      threads[line.name] = busy / _STEPS.value / 1e9
  if not threads:
    print(f'{name}: the trace has no XLA CPU worker threads to profile.')
    return state
  busy = sum(threads.values())
  matmul = ops['ynn_fusion'] / _STEPS.value / 1e9
  print(
    f'\n{name}: {wall * 1e3:.0f} ms per step (traced), {flops / 1e9:.1f} '
    f'GFLOP per step (XLA cost analysis); worker threads busy '
    f'{" + ".join(f"{t * 1e3:.0f}" for t in threads.values())} ms, '
    f'{busy / (len(threads) * wall):.0%} of {len(threads)} x the wall '
    f'clock; YNNPACK matrix products {matmul * 1e3:.0f} thread-ms '
    f'({flops / 1e9 / matmul:.0f} GFLOP/s per busy thread if all the '
    'FLOPs were theirs)\n'
  )
  print('| op (XLA CPU thunk) | thread-ms per step | share of busy |')
  print('|---|---|---|')
  for op, ns in ops.most_common(12):
    ms = ns / _STEPS.value / 1e6
    print(f'| {op} | {ms:.1f} | {ms / 1e3 / busy:.1%} |')
  return state


def _peer(name: str) -> float:
  command = [_TORCH.value, str(PEER), name, str(LENGTH), str(LENGTH)]
  out = subprocess.run(
    [*command, str(_STEPS.value)], capture_output=True, text=True, check=True
  ).stdout
  return float(re.search(r'tgt_tokens_per_s=(\d+)', out).group(1))


def main(argv):
  del argv
  rows = []
  for name in _MODELS.value:
    step, state, batch, n_params = _make_step(name)
    state, _ = _time(step, state, batch, 2)  # compile and warm up
    ours, peers = [], []
    for _ in range(_ROUNDS.value):
      state, rate = _time(step, state, batch, _STEPS.value)
      ours.append(rate)
      if _TORCH.value:
        peers.append(_peer(name))
    rows.append((name, n_params, ours, peers))
    if _PROFILE.value:
      state = _profile(name, step, state, batch)
    print(f'{name}: attnjax {[round(r) for r in ours]} torch {peers}')
  print(
    f'\nbatch {BATCH}, lengths {LENGTH}, unroll {_UNROLL.value}, '
    f'{len(jax.devices())} {jax.devices()[0].platform} device(s); median '
    f'of {_ROUNDS.value} rounds of {_STEPS.value} steps, target tokens/s\n'
  )
  print('| model | params | attnjax | torch | ratio |')
  print('|---|---|---|---|---|')
  for name, n_params, ours, peers in rows:
    mine = statistics.median(ours)
    peer = statistics.median(peers) if peers else float('nan')
    print(
      f'| {name} | {n_params / 1e6:.1f}M | {mine:,.0f} | {peer:,.0f} | '
      f'{mine / peer:.2f}x |'
    )


if __name__ == '__main__':
  app.run(main)
