"""Seq2seq train-step throughput beside the PyTorch peer.

  python bench/seq2seq_throughput.py --torch_python=/path/to/venv/bin/python
      [--models=lstm,bahdanau,bahdanau_linear_readout,transformer,
                transformer_bfloat16]
      [--rounds=3] [--steps=10] [--unroll=1] [--profile] [--peer=PATH]
      [--peer_autocast]

The sizes are those of `../shared/bench/torch_seq2seq_bench.py` (the PyTorch
seq2seq tutorials on Multi30k): vocabularies 7853 / 5893, batch 128, source
and target length 24, Adam 5e-4 with a global-norm clip of 1.

- `lstm`: `sutskever`, embeddings 256, 2 x 512 LSTM encoder and decoder,
  dropout 0.5;
- `bahdanau`: `bahdanau`, embeddings 256, bidirectional GRU 512 encoder,
  GRU 512 decoder, additive attention (H = 512), dropout 0.5. Its output
  layer is the paper's maxout (512 units, then the vocabulary), about half
  the arithmetic of the peer's one linear map of [s; c; e] (1,792 wide);
- `bahdanau_linear_readout`: the same with the peer's output layer, a
  like-for-like comparison (timed beside the peer's `bahdanau`);
- `transformer`: `attnjax.models.transformer.Transformer`, d_model 256,
  3 + 3 post-LN layers, 8 heads, feed-forward 512, learned positions
  (max_len 100), separate source and target embeddings and output projection,
  and dropout 0.1 where the peer's `nn.Transformer` has it: sublayer outputs,
  attention weights and feed-forward activations (ours also drops the
  embeddings, the peer does not);
- `transformer_bfloat16`: the same in mixed precision
  (`matmul_dtype='bfloat16'`: the dense layers' products, forward and
  backward, take bfloat16 operands and accumulate in float32; parameters,
  activations, attention and the optimizer stay float32), timed beside the
  peer's `transformer`.

Each round times `--steps` of our jitted train step (`train_lib.train_step`:
forward, backward, update; after two warm-up steps) and then runs the peer
once (`--steps` timed steps after its own warm-up), so machine noise hits
both alike. The table gives the median target tokens/s of each and their
ratio. The peer is skipped without --torch_python (torch lives in its own
virtual environment: `pip install torch==2.13.0 numpy`). `--unroll` applies
to the RNN models' time scans only. `--peer_autocast` also runs the peer
under `torch.autocast('cpu', torch.bfloat16)` (`bench/torch_autocast.py`)
each round, its own mixed precision, in extra columns.

`--profile` then traces `--steps` more steps of each model with the JAX
profiler and prints where the CPU worker threads spent them: busy time per
thread (its ops and its thread-pool tasks), the share of the wall clock they
kept busy, and the ops (XLA fusions, YNNPACK matrix products) that took the
most thread time. From the thread time of the matrix products it gives the
tokens/s the step would reach if nothing else took time ("products only",
with its ratio to the peer). For comparison it also finds every matrix
product of the step (the dot_generals of its jaxpr: forward, backward,
attention) and times each alone, jitted by itself on the same shapes.
"""

import bisect
import collections
import functools
import pathlib
import re
import statistics
import subprocess
import tempfile
import time

import jax
import jax.extend
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
  'bahdanau_linear_readout': dict(
    decoder='bahdanau_linear_readout', cell='gru', embed_dim=256,
    hidden_dim=512, bidirectional=True,
  ),
}  # fmt: skip
TRANSFORMER = dict(
  d_model=256, num_heads=8, num_encoder_layers=3, num_decoder_layers=3,
  mlp_dim=512, dropout_rate=0.1, attention_dropout_rate=0.1,
  mlp_dropout_rate=0.1, max_len=100, positions='learned',
)  # fmt: skip
# Transformer name -> its TransformerConfig.matmul_dtype.
TRANSFORMERS = {'transformer': 'float32', 'transformer_bfloat16': 'bfloat16'}
MODELS = (*RNN_MODELS, *TRANSFORMERS)
# Our model -> the peer's model it is timed beside.
PEER_MODELS = {
  'bahdanau_linear_readout': 'bahdanau',
  'transformer_bfloat16': 'transformer',
}
# XLA CPU thunks that compute matrix products: YNNPACK and XNNPACK fusions
# (some with a fused reduction) and Eigen's dots.
MATMUL_THUNKS = ('ynn_fusion', 'xnn_fusion', 'dot', 'dot_general')
_PEER = flags.DEFINE_string(
  'peer',
  str(
    pathlib.Path(__file__).resolve().parents[2]
    / 'shared/bench/torch_seq2seq_bench.py'
  ),
  'The PyTorch peer program.',
)

_MODELS = flags.DEFINE_list('models', list(MODELS), 'Models to measure.')
_ROUNDS = flags.DEFINE_integer(
  'rounds', 3, 'Alternating rounds.', lower_bound=1
)
_STEPS = flags.DEFINE_integer(
  'steps', 10, 'Timed steps per round.', lower_bound=1
)
_UNROLL = flags.DEFINE_integer(
  'unroll', 1, 'Unroll of the RNN time scans.', lower_bound=1
)
_PROFILE = flags.DEFINE_bool(
  'profile', False, 'Also print where the worker threads spend a step.'
)
_TORCH = flags.DEFINE_string(
  'torch_python', '', 'Python of a virtual environment with torch.'
)
_PEER_AUTOCAST = flags.DEFINE_bool(
  'peer_autocast',
  False,
  "Also time the peer under torch.autocast('cpu', torch.bfloat16), its "
  'mixed precision (column "torch bf16").',
)
flags.register_validator(
  'models',
  lambda names: bool(names) and set(names) <= set(MODELS),
  f'--models must name one or more of {", ".join(MODELS)}.',
)


class _LinearReadoutBahdanau(seq2seq.BahdanauDecoder):
  """Bahdanau with the peer's output layer: logits = W [s; E y; c] + b, one
  linear map of the 1,792-wide features instead of the maxout."""

  def readout(self, features, *, train=False):
    features = self.dropout(features, deterministic=not train)
    return self.output_proj(features)


seq2seq.DECODERS['bahdanau_linear_readout'] = _LinearReadoutBahdanau


def _make_model(name: str):
  """The attnjax model of peer `name`."""
  if name in TRANSFORMERS:
    return transformer.Transformer(
      transformer.TransformerConfig(
        source_vocab_size=SOURCE_VOCAB,
        target_vocab_size=TARGET_VOCAB,
        matmul_dtype=TRANSFORMERS[name],
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
  # The peer's optimizer: Adam 5e-4 after a global-norm clip of 1.
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


def _worker_time(data):
  """Per XLA CPU worker thread: its busy ns, and thread ns per op.

  A worker runs thunks (op events) and thread-pool tasks: the XLA executor's
  and the parallel chunks of a YNNPACK product, recorded as StartRegion /
  StopRegion pairs. A task that runs on one thread while an op runs on the
  other is that op's parallel work and is counted as its time (the tasks
  also hold the thread's own ops, counted once).
  """
  threads = {}
  for plane in data.planes:
    for line in plane.lines:
      if 'XLAEigen' not in line.name:
        continue
      ops, tasks, start = [], [], None
      for e in sorted(line.events, key=lambda e: e.start_ns):
        if e.name == 'ThreadpoolListener::StartRegion':
          start = e.start_ns
        elif e.name == 'ThreadpoolListener::StopRegion' and start is not None:
          tasks.append((start, e.start_ns))
          start = None
        elif not e.name.startswith(
          ('ThunkExecutor', 'Slinky', 'Threadpool', 'end: ')
        ):
          ops.append((e.start_ns, e.start_ns + e.duration_ns, e.name))
      threads[line.name] = ops, tasks
  busy, per_op = {}, collections.Counter()
  for name, (ops, tasks) in threads.items():
    spans, covered, end = sorted([(s, e) for s, e, _ in ops] + tasks), 0, 0
    for s, e in spans:
      covered += max(0, e - max(s, end))
      end = max(end, e)
    busy[name] = covered
    for s, e, op in ops:
      per_op[op.split('.')[0]] += e - s
    others = [o for other, (o, _) in threads.items() if other != name]
    for s, e in _gaps(ops, tasks):
      mid = (s + e) / 2
      owner = next((op for o in others if (op := _running(o, mid))), None)
      per_op[owner[2].split('.')[0] if owner else '(pool task, no op)'] += e - s
  return busy, per_op


def _running(ops, t):
  """The op of one thread's sorted, disjoint `ops` running at time t."""
  i = bisect.bisect_right(ops, (t, float('inf'))) - 1
  return ops[i] if i >= 0 and ops[i][1] >= t else None


def _gaps(ops, tasks):
  """The parts of `tasks` outside one thread's sorted, disjoint `ops`."""
  for start, end in tasks:
    i = max(0, bisect.bisect_right(ops, (start, float('inf'))) - 1)
    while start < end and i < len(ops) and ops[i][0] < end:
      if ops[i][1] > start:
        if ops[i][0] > start:
          yield start, ops[i][0]
        start = ops[i][1]
      i += 1
    if start < end:
      yield start, end


def _dot_products(step, state, batch):
  """{(operand shapes and dtypes, dimension numbers, result dtype): count}
  of the dot_generals the step runs (those in scans times their length)."""
  dots = collections.Counter()

  def walk(jaxpr, times):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        operands = tuple((v.aval.shape, v.aval.dtype) for v in eqn.invars)
        dots[
          operands,
          eqn.params['dimension_numbers'],
          eqn.params['preferred_element_type'],
        ] += times
      if eqn.primitive.name == 'scan':
        inner = times * eqn.params['length']
      else:
        inner = times
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub, inner)

  walk(jax.make_jaxpr(step)(state, batch, jax.random.key(0)).jaxpr, 1)
  return dots


def _median_call(compiled, args, calls=7):
  """Median seconds of one call of `compiled`, after a warm-up call."""
  compiled(*args).block_until_ready()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    compiled(*args).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _products_alone(step, state, batch):
  """Seconds and FLOPs of the step's matrix products, each timed alone.

  Each product is jitted by itself; the cost of a call that does no work on
  the same arguments is taken off, which matters for the small products in
  the RNN models' time loops.
  """
  seconds = flops = 0.0
  rng = np.random.default_rng(0)
  for (operands, dims, out_dtype), count in _dot_products(
    step, state, batch
  ).items():
    args = [jnp.asarray(rng.standard_normal(s), d) for s, d in operands]
    dot = jax.jit(
      functools.partial(
        jax.lax.dot_general,
        dimension_numbers=dims,
        preferred_element_type=out_dtype,
      )
    )
    dot = dot.lower(*args).compile()
    call = jax.jit(lambda a, b: a.ravel()[0] + b.ravel()[0])
    call = call.lower(*args).compile()
    work = _median_call(dot, args) - _median_call(call, args)
    seconds += count * max(work, 0.0)
    flops += count * dot.cost_analysis()['flops']
  return seconds, flops


def _profile(name, step, state, batch):
  """Traces `--steps` steps and prints a per-thread and per-op breakdown.

  Returns the state and the target tokens/s the step would reach if only
  its matrix products took time, at the speed they ran in the trace.
  """
  flops = step.lower(state, batch, jax.random.key(0)).compile()
  flops = flops.cost_analysis()['flops']
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    state, _ = _time(step, state, batch, _STEPS.value)
    wall = (time.perf_counter() - start) / _STEPS.value
    jax.profiler.stop_trace()
    (path,) = pathlib.Path(trace_dir).rglob('*.xplane.pb')
    busy, per_op = _worker_time(jax.profiler.ProfileData.from_file(str(path)))
  if not busy:
    print(f'{name}: the trace has no XLA CPU worker threads to profile.')
    return state, float('nan')
  busy = {thread: ns / _STEPS.value / 1e9 for thread, ns in busy.items()}
  total = sum(busy.values())
  products = sum(per_op[op] for op in MATMUL_THUNKS) / _STEPS.value / 1e9
  alone, product_flops = _products_alone(step, state, batch)
  bound = BATCH * LENGTH * len(busy) / products
  print(
    f'\n{name}: {wall * 1e3:.0f} ms per step (traced), {flops / 1e9:.1f} '
    f'GFLOP (XLA cost analysis), {flops / 1e9 / wall:.0f} GFLOP/s. Worker '
    f'threads busy {" + ".join(f"{t * 1e3:.0f}" for t in busy.values())} '
    f'ms, {total / (len(busy) * wall):.0%} of {len(busy)} x the wall clock.'
    f'\nMatrix products ({product_flops / 1e9:.1f} GFLOP): '
    f'{products * 1e3:.0f} thread-ms in the step, '
    f'{product_flops / 1e9 / products:.0f} GFLOP/s per busy thread; if '
    f'nothing else took time the step would run at {bound:,.0f} target '
    f'tokens/s. Each timed alone (jitted by itself, all threads): '
    f'{alone * 1e3:.0f} ms per step, {product_flops / 1e9 / alone:.0f} '
    f'GFLOP/s.\n'
  )
  print('| op (XLA CPU thunk) | thread-ms per step | share of busy |')
  print('|---|---|---|')
  for op, ns in per_op.most_common(12):
    ms = ns / _STEPS.value / 1e6
    print(f'| {op} | {ms:.1f} | {ms / 1e3 / total:.1%} |')
  return state, bound


def _peer(name: str, autocast: bool = False) -> float:
  peer = PEER_MODELS.get(name, name)
  command = [_TORCH.value, _PEER.value, peer, str(LENGTH), str(LENGTH)]
  if autocast:
    command.insert(
      1, str(pathlib.Path(__file__).with_name('torch_autocast.py'))
    )
  command.append(str(_STEPS.value))
  done = subprocess.run(command, capture_output=True, text=True)
  found = re.search(r'tgt_tokens_per_s=(\d+)', done.stdout)
  if done.returncode or not found:
    # The peer's own error (e.g. no torch in --torch_python) is in its stderr.
    tail = '\n'.join(done.stderr.strip().splitlines()[-5:])
    raise SystemExit(
      f'the peer failed (exit {done.returncode}): {" ".join(command)}\n{tail}'
    )
  return float(found.group(1))


def _check_peer_flags() -> None:
  """Fails before anything compiles on a --torch_python or --peer that
  cannot run."""
  if not _TORCH.value:
    return
  if not pathlib.Path(_TORCH.value).is_file():
    raise app.UsageError(f'--torch_python={_TORCH.value}: no such file.')
  if not pathlib.Path(_PEER.value).is_file():
    raise app.UsageError(f'--peer={_PEER.value}: no such file.')


def main(argv):
  del argv
  _check_peer_flags()
  rows = []
  for name in _MODELS.value:
    step, state, batch, n_params = _make_step(name)
    state, _ = _time(step, state, batch, 2)  # compile and warm up
    ours, peers, peers_bf16 = [], [], []
    for _ in range(_ROUNDS.value):
      state, rate = _time(step, state, batch, _STEPS.value)
      ours.append(rate)
      if _TORCH.value:
        peers.append(_peer(name))
      if _TORCH.value and _PEER_AUTOCAST.value:
        peers_bf16.append(_peer(name, autocast=True))
    bound = float('nan')
    if _PROFILE.value:
      state, bound = _profile(name, step, state, batch)
    rows.append((name, n_params, ours, peers, peers_bf16, bound))
    print(f'{name}: attnjax {[round(r) for r in ours]} torch {peers}', end='')
    print(f' torch bf16 {peers_bf16}' if peers_bf16 else '')
  print(
    f'\nbatch {BATCH}, lengths {LENGTH}, unroll {_UNROLL.value}, '
    f'{len(jax.devices())} {jax.devices()[0].platform} device(s); median '
    f'of {_ROUNDS.value} rounds of {_STEPS.value} steps, target tokens/s\n'
  )
  header = '| model | params | attnjax | torch | ratio |'
  if _PEER_AUTOCAST.value:
    header += ' torch bf16 | ratio |'
  if _PROFILE.value:
    header += ' products only | its ratio |'
  print(header)
  print('|---' * header.count(' | ') + '|---|')
  for name, n_params, ours, peers, peers_bf16, bound in rows:
    mine = statistics.median(ours)
    cells = [name, f'{n_params / 1e6:.1f}M', f'{mine:,.0f}']
    peer = statistics.median(peers) if peers else None
    cells += [f'{peer:,.0f}', f'{mine / peer:.2f}x'] if peer else ['-', '-']
    if _PEER_AUTOCAST.value:
      bf16 = statistics.median(peers_bf16) if peers_bf16 else None
      cells += [f'{bf16:,.0f}', f'{mine / bf16:.2f}x'] if bf16 else ['-', '-']
    if _PROFILE.value:
      cells.append(f'{bound:,.0f}')
      cells.append(f'{bound / peer:.2f}x' if peer else '-')
    print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  app.run(main)
