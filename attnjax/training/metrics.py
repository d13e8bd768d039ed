"""Metric output: TensorBoard event files, `metrics.jsonl`, the console.

Only process 0 writes. Each logged step becomes one JSON line
`{"step": ..., "split": ..., name: value, ...}` in `WORKDIR/metrics.jsonl`
and scalars under `WORKDIR/tensorboard/SPLIT`.

TensorBoard files are written with tensorboardX: clu's metric writers would
be the usual choice, but `clu.metric_writers` imports TensorFlow, which
attnjax does not otherwise need.
"""

import json
import logging
import pathlib
import time

import jax
import numpy as np


class MetricsWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: str | pathlib.Path, *, resume_step: int = 0):
    self._workdir = pathlib.Path(workdir)
    self._active = jax.process_index() == 0
    self._tb = {}
    self._jsonl = self._workdir / 'metrics.jsonl'
    self._resume_step = resume_step
    self._kept: set[tuple[int, str]] = set()  # (step, split) already logged
    if self._active:
      self._drop_entries_after(resume_step)

  def logged(self, step: int, split: str) -> bool:
    """Whether an earlier run logged `split` at `step` (at or before the
    resumed step). Only process 0 reads the file; others answer False."""
    return (step, split) in self._kept

  def _drop_entries_after(self, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint; keep one copy."""
    if not self._jsonl.exists():
      return
    lines = [line for line in self._jsonl.read_text().splitlines() if line]
    entries = [_entry(line) for line in lines]
    kept = [
      x
      for x, e in zip(lines, entries, strict=True)
      if e is not None and e[0] <= step
    ]
    self._kept = {e for e in entries if e is not None and e[0] <= step}
    if broken := entries.count(None):
      logging.warning(
        'Dropped %d unreadable lines of %s (cut short when a run died?).',
        broken,
        self._jsonl,
      )
    if len(kept) != len(lines):
      logging.info(
        'Dropped %d metric lines after resumed step %d.',
        len(lines) - len(kept),
        step,
      )
      self._jsonl.write_text(''.join(line + '\n' for line in kept))

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with self._jsonl.open('a') as f:
      f.write(json.dumps({'step': int(step), 'split': split, **scalars}) + '\n')
    writer = self._tb.get(split)
    if writer is None:
      from tensorboardX import SummaryWriter

      log_dir = self._workdir / 'tensorboard' / split
      # TensorBoard hides earlier files' events after the resumed step: also
      # those of a run killed before its first checkpoint (resume_step 0).
      earlier = log_dir.is_dir() and any(log_dir.glob('events.out.*'))
      purge_step = self._resume_step + 1 if earlier else None
      writer = SummaryWriter(str(log_dir), purge_step=purge_step)
      self._tb[split] = writer
    for name, value in scalars.items():
      writer.add_scalar(name, value, step)

  def flush(self) -> None:
    for writer in self._tb.values():
      writer.flush()

  def close(self) -> None:
    for writer in self._tb.values():
      writer.close()
    self._tb.clear()


def _entry(line: str) -> tuple[int, str] | None:
  """(step, split) of a metrics.jsonl line; None for one that does not parse
  (a line cut short by a crash, which must not stop the next run)."""
  try:
    row = json.loads(line)
    return int(row['step']), str(row['split'])
  except (ValueError, KeyError, TypeError):
    return None


class Progress:
  """Steps/s, target tokens/s and ETA between two reports."""

  def __init__(self, first_step: int, last_step: int):
    self._last_step = last_step
    self._step, self._time = first_step, time.perf_counter()

  def restart(self, step: int) -> None:
    """Times the next report from now (e.g. after a compiling first step)."""
    self._step, self._time = step, time.perf_counter()

  def report(self, step: int, tokens: float) -> dict[str, float]:
    """Rates since the previous report; `tokens`: target tokens since then."""
    now = time.perf_counter()
    elapsed = max(now - self._time, 1e-9)
    steps_per_s = (step - self._step) / elapsed
    self._step, self._time = step, now
    return {
      'steps_per_s': steps_per_s,
      'tokens_per_s': tokens / elapsed,
      'eta_s': (self._last_step - step) / max(steps_per_s, 1e-9),
    }


def format_eta(seconds: float) -> str:
  seconds = int(np.round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return (
    f'{hours}:{minutes:02d}:{seconds:02d}'
    if hours
    else f'{minutes}:{seconds:02d}'
  )
