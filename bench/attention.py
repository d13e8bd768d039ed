"""Benchmarks attnjax attention: dense vs jax.nn, chunked vs dense.

Run from the repository root:

  .venv/bin/python bench/attention.py           # full run (tens of minutes)
  .venv/bin/python bench/attention.py --quick   # smoke check, under a minute

Prints markdown tables:

1. Dense dot-product path. Forward+backward time of
   `attnjax.attention.dot_product_attention` ([batch, heads, len, depth])
   against `jax.nn.dot_product_attention` ([batch, len, heads, depth]), each
   fed inputs in its own layout. The two are timed alternately (A, B, A, B,
   ...) so that load from other processes hits both alike.
2. Chunked vs dense attention on long sequences: forward+backward time and
   peak memory of `chunked_attention` against `attention(...)[0]`. Every
   cell runs in a fresh subprocess and reads its own VmHWM (reset to the
   resident set once inputs exist). Not ru_maxrss: a child inherits that
   from its parent across fork+exec, so every cell would report at least
   the parent's peak. A cell whose dense tensors would not fit in memory is
   skipped on an estimate rather than run.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402

from attnjax import attention, scores  # noqa: E402

MIB = 2**20
GIB = 2**30
DEPTH = 64
HIDDEN = 32
CHUNK = 512
# Live [q_len, k_len(, hidden)] float32 copies assumed for a dense fwd+bwd.
DENSE_COPIES = 5
# Dense cells whose estimate exceeds this are skipped (the machine has 24 GiB).
MEMORY_BUDGET = 16 * GIB
# The chunked additive cell at 16384 takes ~1.5 min per call on 2 cores.
CELL_TIMEOUT_S = 1200
REPEAT_BUDGET_S = 60


# ---------------------------------------------------------------------------
# Shared helpers.


def fwd_bwd(fn):
  """jit(grad(sum(fn(q, k, v, *rest) * ct))) w.r.t. q, k and v."""

  def loss(q, k, v, ct, *rest):
    return jnp.sum(fn(q, k, v, *rest) * ct)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def timed_call(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def repeats_for(seconds_per_call, budget_s, low, high):
  """How many timed calls fit in `budget_s`, clipped to [low, high]."""
  return max(low, min(high, int(budget_s / max(seconds_per_call, 1e-6))))


def header():
  cpus = os.cpu_count()
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = cpus
  lines = [
    f'- jax {jax.__version__}, jaxlib {jaxlib.__version__}, '
    f'python {platform.python_version()}',
    f'- devices: {jax.devices()} (backend {jax.default_backend()})',
    f'- CPUs: {cpus} (usable by this process: {usable}), '
    f'{platform.machine()} {platform.processor() or ""}'.rstrip(),
    f'- date: {time.strftime("%Y-%m-%d %H:%M:%S %Z")}',
  ]
  print('\n'.join(lines))
  print()


def table(columns, rows):
  out = ['| ' + ' | '.join(columns) + ' |']
  out.append('|' + '|'.join('---' for _ in columns) + '|')
  out += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(out)


# ---------------------------------------------------------------------------
# Table 1: dense dot-product path against jax.nn.dot_product_attention.


def ours_dense(q, k, v, mask=None):
  return attention.dot_product_attention(q, k, v, mask=mask)


def jax_nn_dense(q, k, v, mask=None):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None)


def dense_inputs(rng, batch, heads, length, with_mask):
  """Inputs in both layouts: ours [b, h, t, d], jax.nn [b, t, h, d]."""
  keys = jax.random.split(rng, 5)
  shape = (batch, heads, length, DEPTH)
  q, k, v, ct = (jax.random.normal(r, shape, jnp.float32) for r in keys[:4])
  mask = None
  if with_mask:
    # Key padding; every sequence keeps at least half its keys so that no
    # query is fully masked (where the two functions differ on purpose).
    lengths = jax.random.randint(keys[4], (batch,), length // 2, length + 1)
    mask = (jnp.arange(length) < lengths[:, None])[:, None, None, :]
  ours = (q, k, v, ct)
  theirs = tuple(jnp.swapaxes(x, 1, 2) for x in ours)
  return ours, theirs, mask


def bench_dense(lengths, mask_lengths, batch, heads, budget_s):
  rows = []
  cases = [(n, False) for n in lengths] + [(n, True) for n in mask_lengths]
  for i, (length, with_mask) in enumerate(cases):
    ours_args, theirs_args, mask = dense_inputs(
      jax.random.key(i), batch, heads, length, with_mask
    )
    extra = (mask,) if with_mask else ()
    ours = fwd_bwd(ours_dense)
    theirs = fwd_bwd(jax_nn_dense)
    ours_args, theirs_args = ours_args + extra, theirs_args + extra
    # Same maths, different layout: check before timing.
    got = jnp.swapaxes(ours(*ours_args)[0], 1, 2)
    want = theirs(*theirs_args)[0]
    max_err = float(jnp.max(jnp.abs(got - want)))
    warm = [timed_call(ours, *ours_args), timed_call(theirs, *theirs_args)]
    n = repeats_for(sum(warm), budget_s, 5, 50)
    t_ours, t_theirs = [], []
    for _ in range(n):
      t_ours.append(timed_call(ours, *ours_args))
      t_theirs.append(timed_call(theirs, *theirs_args))
    m_ours = statistics.median(t_ours) * 1e3
    m_theirs = statistics.median(t_theirs) * 1e3
    rows.append(
      (
        length,
        'key padding' if with_mask else 'none',
        f'{m_ours:.2f}',
        f'{m_theirs:.2f}',
        f'{m_ours / m_theirs:.2f}',
        n,
        f'{max_err:.1e}',
      )
    )
    print(f'  dense L={length} mask={with_mask}: done', file=sys.stderr)
    del ours_args, theirs_args, mask
  columns = (
    'length',
    'mask',
    'ours ms',
    'jax.nn ms',
    'ratio ours/jax.nn',
    'repeats',
    'max abs dq diff',
  )
  return table(columns, rows)


# ---------------------------------------------------------------------------
# Table 2: chunked vs dense, one subprocess per cell.


def dense_estimate_bytes(score, length):
  per_copy = length * length * 4
  if score == 'additive':
    per_copy *= HIDDEN
  return DENSE_COPIES * per_copy


def score_fn_of(score, params):
  if score == 'scaled_dot':
    return scores.scaled_dot
  w_q, w_k, v = params
  return functools.partial(scores.additive, w_q=w_q, w_k=w_k, v=v)


def impl_of(score, impl):
  # The score parameters are arguments of the jitted function (not
  # constants baked into it), as they would be in a training step.
  def run(q, k, v, *params):
    fn = score_fn_of(score, params)
    if impl == 'chunked':
      return attention.chunked_attention(q, k, v, fn, chunk_size=CHUNK)
    return attention.attention(q, k, v, fn)[0]

  return run


def _proc_status_kib(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  return -1


def _reset_hwm():
  """Resets VmHWM to the current RSS (Linux >= 4.0); False if unsupported."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def run_cell(score, length, impl, repeats):
  """Worker: times one cell and reports its memory high-water marks."""
  import resource

  rng = jax.random.split(jax.random.key(length), 7)
  shape = (1, 1, length, DEPTH)
  q, k, v, ct = (jax.random.normal(r, shape, jnp.float32) for r in rng[:4])
  params = ()
  if score == 'additive':
    params = (
      jax.random.normal(rng[4], (DEPTH, HIDDEN)) * DEPTH**-0.5,
      jax.random.normal(rng[5], (DEPTH, HIDDEN)) * DEPTH**-0.5,
      jax.random.normal(rng[6], (HIDDEN,)) * HIDDEN**-0.5,
    )
  args = (q, k, v, ct, *params)
  jax.block_until_ready(args)
  # Importing jax leaves a transient high-water mark above the resident set;
  # resetting it makes the baseline the memory actually held now.
  can_reset = _reset_hwm()
  baseline_kib = _proc_status_kib('VmRSS')

  start = time.perf_counter()
  compiled = fwd_bwd(impl_of(score, impl)).lower(*args).compile()
  compile_s = time.perf_counter() - start
  compile_hwm_kib = _proc_status_kib('VmHWM')
  # Execution-only peak: reset the high-water mark after compiling.
  rss_before_run_kib = _proc_status_kib('VmRSS')
  _reset_hwm()
  first_s = timed_call(compiled, *args)  # warm-up, not in the median
  # The longest cells take minutes per call: fewer repeats, at least one.
  repeats = repeats_for(first_s, REPEAT_BUDGET_S, 1, repeats)
  times = [timed_call(compiled, *args) for _ in range(repeats)]
  exec_hwm_kib = _proc_status_kib('VmHWM')
  if can_reset:
    peak_kib = max(compile_hwm_kib, exec_hwm_kib)
    exec_delta = (exec_hwm_kib - rss_before_run_kib) / 1024
  else:
    # No resettable VmHWM: fall back to ru_maxrss, which includes the
    # import-time transient.
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exec_delta = None
  return {
    'time_s': statistics.median(times),
    'first_call_s': first_s,
    'times_s': times,
    'compile_s': compile_s,
    'baseline_mib': baseline_kib / 1024,
    'peak_mib': peak_kib / 1024,
    'delta_mib': (peak_kib - baseline_kib) / 1024,
    'exec_delta_mib': exec_delta,
    'ru_maxrss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def spawn_cell(score, length, impl, repeats):
  cell = {'score': score, 'length': length, 'impl': impl, 'repeats': repeats}
  command = [sys.executable, os.path.abspath(__file__), '--cell']
  command.append(json.dumps(cell))
  try:
    done = subprocess.run(
      command, capture_output=True, text=True, timeout=CELL_TIMEOUT_S
    )
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {CELL_TIMEOUT_S} s'}
  if done.returncode != 0:
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
    return {'error': f'exit {done.returncode}: {" ".join(tail)[:120]}'}
  return json.loads(done.stdout.strip().splitlines()[-1])


def bench_chunked(score_names, lengths, repeats):
  rows = []
  for score in score_names:
    for length in lengths:
      results = {}
      for impl in ('dense', 'chunked'):
        estimate = dense_estimate_bytes(score, length)
        if impl == 'dense' and estimate > MEMORY_BUDGET:
          results[impl] = {
            'skip': f'does not fit (est. {estimate / GIB:.0f} GiB)'
          }
        else:
          results[impl] = spawn_cell(score, length, impl, repeats)
        print(f'  {score} L={length} {impl}: {results[impl]}', file=sys.stderr)
      rows += _chunked_rows(score, length, results)
  columns = (
    'score',
    'length',
    'impl',
    'fwd+bwd s',
    'peak MiB (delta)',
    'exec-only delta MiB',
    'compile s',
    'repeats',
    'chunked/dense memory',
    'chunked/dense time',
  )
  return table(columns, rows)


def _ratio(num, den):
  return f'{num / den:.3f}' if den > 0 else 'n/a'


def _chunked_rows(score, length, results):
  dense, chunked = results['dense'], results['chunked']
  both = 'time_s' in dense and 'time_s' in chunked
  rows = []
  for impl, r in (('dense', dense), ('chunked', chunked)):
    if 'time_s' not in r:
      note = r.get('skip') or r.get('error')
      rows.append((score, length, impl, note, *['-'] * 6))
      continue
    mem_ratio = time_ratio = '-'
    if impl == 'chunked' and both:
      mem_ratio = _ratio(r['delta_mib'], dense['delta_mib'])
      if r['exec_delta_mib'] is not None:
        exec_ratio = _ratio(r['exec_delta_mib'], dense['exec_delta_mib'])
        mem_ratio += f' (exec {exec_ratio})'
      time_ratio = f'{r["time_s"] / dense["time_s"]:.2f}'
    elif impl == 'chunked' and 'skip' in dense:
      estimate = dense_estimate_bytes(score, length) / MIB
      mem_ratio = f'{r["delta_mib"] / estimate:.4f} vs est.'
    exec_delta = r['exec_delta_mib']
    rows.append(
      (
        score,
        length,
        impl,
        f'{r["time_s"]:.3f}',
        f'{r["peak_mib"]:.0f} ({r["delta_mib"]:+.0f})',
        '-' if exec_delta is None else f'{exec_delta:+.0f}',
        f'{r["compile_s"]:.1f}',
        len(r['times_s']),
        mem_ratio,
        time_ratio,
      )
    )
  return rows


# ---------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--quick', action='store_true', help='tiny sizes, a smoke check'
  )
  parser.add_argument(
    '--table',
    choices=('all', 'dense', 'chunked'),
    default='all',
    help='which table to run',
  )
  parser.add_argument(
    '--cell', help='internal: run one table-2 cell (JSON) and print JSON'
  )
  args = parser.parse_args()
  if args.cell:
    cell = json.loads(args.cell)
    print(json.dumps(run_cell(**cell)))
    return

  header()
  if args.quick:
    dense_cfg = dict(lengths=(128,), mask_lengths=(128,), budget_s=0.5)
    chunked_cfg = dict(lengths=(1024,), repeats=2)
  else:
    dense_cfg = dict(lengths=(128, 512, 2048), mask_lengths=(512,), budget_s=8)
    chunked_cfg = dict(lengths=(2048, 4096, 16384), repeats=5)

  if args.table in ('all', 'dense'):
    print(
      '### Dense dot-product path, fwd+bwd (batch 8, 8 heads, depth 64, '
      'float32, median)\n'
    )
    print(bench_dense(batch=8, heads=8, **dense_cfg), flush=True)
    print()
  if args.table in ('all', 'chunked'):
    print(
      f'### Chunked (chunk {CHUNK}) vs dense, fwd+bwd (batch 1, 1 head, '
      f'depth {DEPTH}, additive hidden {HIDDEN}, float32, median; fresh '
      'process per row)\n'
    )
    print(bench_chunked(('scaled_dot', 'additive'), **chunked_cfg), flush=True)


if __name__ == '__main__':
  main()
