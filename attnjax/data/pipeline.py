"""Grain input pipelines for the synthetic tasks.

The training stream is a `grain.MapDataset` over global step indices: element
`k` is this process's slice of global batch `k`, and global batch `k` holds
training examples `k * global_batch_size ...` of the task's stream. Because
every example is a pure function of its index, the processes of a multi-host
run need no communication, and the union over processes of batch `k` is
exactly what a single process would read as batch `k`.

The iterator's state is just the next step index, so it is tiny, and it can
be saved with the model, e.g. with Orbax:

  it = iter(train_dataset(task, global_batch_size=64, seed=0))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(it)))
  # On resume: restores `it` in place (and returns it).
  mngr.restore(step, args=ocp.args.Composite(
      state=..., data=grain.checkpoint.CheckpointRestore(it)))

Note that Grain's Orbax handler names its file after `jax.process_index()`
and `jax.process_count()`, not after the `process_index` given here.
"""

import dataclasses

import grain
import numpy as np

from attnjax.data.synthetic import Task, encode_batch
from attnjax.data.vocab import PAD_ID

# Effectively infinite: at 10**4 steps per second this lasts 10**7 years.
_NUM_STEPS = 2**62
# Batches are computed in Python, so more threads only fight over the GIL;
# one thread overlaps batch generation with the accelerator.
_DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """A held-out set as fixed-shape batches and its text.

  `batches` have 'inputs' `[batch_size, source_len]`, 'targets'
  `[batch_size, max_target_len]` and 'valid' (False on filler rows);
  `sources[i]` / `references[i]` are the text of the i-th valid row, and
  outputs are scored against `references`.
  """

  batches: list[dict[str, np.ndarray]]
  sources: list[str]
  references: list[str]


class _TrainBatch:
  """Maps a global step index to this process's slice of that batch.

  A class rather than a closure so that the dataset pickles (Grain's
  multiprocessing needs that).
  """

  def __init__(
    self, task: Task, global_batch_size: int, seed: int, first: int, size: int
  ):
    self.task = task
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.first = first
    self.size = size

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    start = step * self.global_batch_size + self.first
    examples = [
      self.task.train_example(i, stream_seed=self.seed)
      for i in range(start, start + self.size)
    ]
    return encode_batch(self.task, examples)


def local_batch_size(
  global_batch_size: int, process_index: int, process_count: int
) -> int:
  """Rows of each global batch that process `process_index` reads.

  Raises:
    ValueError: a batch size below 1, a process index outside
      `[0, process_count)`, or a batch that does not split evenly.
  """
  if global_batch_size < 1:
    raise ValueError(
      f'global_batch_size must be >= 1, got {global_batch_size}.'
    )
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f'need 0 <= process_index < process_count, got process_index='
      f'{process_index}, process_count={process_count}.'
    )
  if global_batch_size % process_count:
    raise ValueError(
      f'global_batch_size={global_batch_size} does not split evenly over '
      f'process_count={process_count} processes; pass a multiple of '
      f'{process_count}.'
    )
  return global_batch_size // process_count


def train_dataset(
  task: Task,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """Returns this process's infinite stream of training batches.

  Each element is a dict of
    'inputs': int32 [global_batch_size // process_count, max_source_len],
    'targets': int32 [global_batch_size // process_count, max_target_len],
  as made by `encode_batch`. Process `p` gets rows `p * local ... (p + 1) *
  local` of every global batch. `iter()` of the result has `get_state()` /
  `set_state()` and works with `grain.checkpoint.CheckpointSave/Restore`.

  Args:
    task: the synthetic task.
    global_batch_size: rows per step over all processes.
    seed: selects the example stream (see `Task.train_example`'s
      `stream_seed`); the same seed gives the same batches.
    process_index: this process, in `[0, process_count)`.
    process_count: number of processes sharing each global batch.
    read_options: Grain threading and prefetch; one thread by default.

  Raises:
    ValueError: the batch does not split evenly over processes, or a bad
      process index.
  """
  local = local_batch_size(global_batch_size, process_index, process_count)
  make_batch = _TrainBatch(
    task, global_batch_size, seed, process_index * local, local
  )
  dataset = grain.MapDataset.range(_NUM_STEPS).map(make_batch)
  return dataset.to_iter_dataset(read_options or _DEFAULT_READ_OPTIONS)


def seek(iterator: grain.DatasetIterator, num_batches: int) -> None:
  """Moves a `train_dataset` iterator to just after `num_batches` batches."""
  state = iterator.get_state()
  if set(state) != {'next_index'}:
    raise ValueError(f'not an iterator of train_dataset (state {state}).')
  iterator.set_state({'next_index': int(num_batches)})


def heldout_batches(
  task: Task, *, n: int, batch_size: int
) -> list[dict[str, np.ndarray]]:
  """Returns the first `n` held-out examples as padded batches.

  Every batch has `batch_size` rows, so evaluation compiles once:
    'inputs': int32 [batch_size, max_source_len],
    'targets': int32 [batch_size, max_target_len],
    'valid': bool [batch_size], False for the PAD-only rows that fill the
      last batch.
  Weight per-example metrics by 'valid'.
  """
  return _padded_batches(task, task.heldout_examples(n), batch_size)


def _padded_batches(
  task: Task, examples: list[tuple[str, str]], batch_size: int
) -> list[dict[str, np.ndarray]]:
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  batches = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start : start + batch_size]
    batch = encode_batch(task, chunk)
    fill = batch_size - len(chunk)
    for key, value in batch.items():
      batch[key] = np.pad(value, ((0, fill), (0, 0)), constant_values=PAD_ID)
    batch['valid'] = np.arange(batch_size) < len(chunk)
    batches.append(batch)
  return batches


def heldout_set(task: Task, *, n: int, batch_size: int) -> HeldOut:
  """`heldout_batches` with the examples' text."""
  examples = task.heldout_examples(n)
  return HeldOut(
    _padded_batches(task, examples, batch_size),
    [source for source, _ in examples],
    [target for _, target in examples],
  )
