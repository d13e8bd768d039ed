"""Orbax checkpoints of the train state and the data iterator.

A checkpoint step holds `state` (the train state, as sharded arrays,
restorable onto any mesh), `data` (the Grain iterator's position, one entry
per process), so a resumed run sees exactly the batches the uninterrupted run
would have seen, and for translation tasks `meta` (the SHA-256 digests of the
vocabulary files the state was trained with). Orbax writes each step to a
temporary directory and renames it when complete, so a run killed mid-save
resumes from the previous complete step.
"""

import logging
import pathlib

import grain
import jax
import orbax.checkpoint as ocp

from attnjax.data import pipeline

CHECKPOINT_DIR = 'checkpoints'


class _OrbaxBelow(logging.Filter):
  """Drops Orbax's records below a level (it logs every save step at INFO)."""

  def __init__(self, level: int):
    super().__init__()
    self.level = level

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= self.level or 'orbax' not in record.pathname


def quiet_orbax_logs(level: int = logging.WARNING) -> None:
  """Keeps Orbax's logs below `level` off the console (absl's logger)."""
  logger = logging.getLogger('absl')
  for existing in [f for f in logger.filters if isinstance(f, _OrbaxBelow)]:
    logger.removeFilter(existing)
  logger.addFilter(_OrbaxBelow(level))


def manager(
  workdir: str | pathlib.Path,
  *,
  max_to_keep: int | None = None,
  read_only: bool = False,
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=not read_only,
    read_only=read_only,
    save_interval_steps=0 if read_only else 1,
    enable_async_checkpointing=True,
  )
  directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  return ocp.CheckpointManager(directory, options=options)


def latest_step(workdir: str | pathlib.Path) -> int | None:
  """The latest complete checkpoint step in `workdir`, or None."""
  if not (pathlib.Path(workdir) / CHECKPOINT_DIR).is_dir():
    return None
  with manager(workdir, read_only=True) as mngr:
    return mngr.latest_step()


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state,
  data_iterator,
  meta: dict[str, str] | None = None,
) -> None:
  """Saves `state`, the iterator's position and, if given, `meta` (strings
  that identify what the state goes with, e.g. its vocabularies' digests)."""
  args = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  if meta:
    args['meta'] = ocp.args.JsonSave(dict(meta))
  mngr.save(step, args=ocp.args.Composite(**args))


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, str]:
  """The `meta` saved with checkpoint `step` ({} if none was)."""
  if not (pathlib.Path(mngr.directory) / str(step) / 'meta').exists():
    return {}
  restored = mngr.restore(
    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
  )
  return dict(restored['meta'])


def _abstract(state, shardings):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    state,
    shardings,
  )


def restore(
  mngr: ocp.CheckpointManager,
  step: int,
  abstract_state,
  shardings,
  data_iterator=None,
):
  """Restores `state` (onto `shardings`) and, if given, the data iterator.

  A state of other names or shapes is refused, naming them, before any array
  is read; a checkpoint that cannot be read is reported as damaged.

  Grain saves one iterator file per process. A run resumed on a different
  number of processes finds none for itself; its iterator is then moved to
  batch `step` with `seek`, which is exact for our pipelines because batch k
  is a pure function of k.
  """
  differ = _differences(
    _saved_shapes(mngr, step, None), _shapes(abstract_state)
  )
  if differ:
    raise ValueError(
      f'checkpoint step {step} in {mngr.directory} does not match this '
      f'model/config: {differ}. Use a fresh --workdir, or delete the '
      'checkpoints to start over.'
    )
  args = {
    'state': ocp.args.StandardRestore(_abstract(abstract_state, shardings))
  }
  own_file = (
    pathlib.Path(mngr.directory)
    / str(step)
    / 'data'
    / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  )
  if data_iterator is not None and own_file.exists():
    args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  elif data_iterator is not None:
    logging.info('No data state for this process count; seeking to %d.', step)
    pipeline.seek(data_iterator, step)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:
    if not _is_read_error(e):
      raise
    raise _damaged(mngr, step, e) from e
  logging.info('Restored step %d from %s.', step, mngr.directory)
  return restored['state']


def _latest_or_raise(
  workdir: str | pathlib.Path,
) -> tuple[ocp.CheckpointManager, int]:
  mngr = manager(workdir, read_only=True)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(
      f'{workdir!s} holds no checkpoint (looked in {mngr.directory}). '
      "Point init_from (or --workdir) at a trained run's workdir."
    )
  return mngr, step


class DamagedCheckpoint(ValueError):
  """A checkpoint step whose files cannot be read (not a config mismatch)."""


# What reading a damaged checkpoint raises.
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError)


def _is_read_error(e: Exception) -> bool:
  # Orbax wraps TensorStore's error on a truncated array file in a bare
  # Exception.
  return isinstance(e, _READ_ERRORS) or (
    type(e) is Exception and isinstance(e.__cause__, _READ_ERRORS)
  )


def _damaged(mngr: ocp.CheckpointManager, step: int, e: Exception):
  if type(e) is Exception and e.__cause__ is not None:
    e = e.__cause__  # The file and the problem, not Orbax's wrapper.
  return DamagedCheckpoint(
    f'could not read checkpoint step {step} in {mngr.directory} '
    f'({type(e).__name__}: {str(e)[:300]}). The checkpoint is damaged or '
    'incomplete: delete that step to use an earlier one, or retrain.'
  )


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {
    jax.tree_util.keystr(path, simple=True, separator='/'): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _saved_shapes(mngr, step: int, key: str | None):
  """{name: shape} of the saved state (or of its `key` subtree), read from
  the checkpoint's metadata alone."""
  path = pathlib.Path(mngr.directory) / str(step) / 'state'
  try:
    saved_tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    return _shapes(saved_tree[key] if key else saved_tree)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise _damaged(mngr, step, e) from e


def _differences(saved, wanted) -> str:
  """The entries whose shapes differ (the first 5, parameters before the
  optimiser's state), or '' if none do."""
  names = sorted(
    set(saved) | set(wanted), key=lambda n: (n.startswith('opt_state'), n)
  )
  differ = [
    f'{name}: {saved.get(name, "absent")} in the checkpoint, '
    f'{wanted.get(name, "absent")} here'
    for name in names
    if saved.get(name) != wanted.get(name)
  ]
  more = f' (and {len(differ) - 5} more)' if len(differ) > 5 else ''
  return '; '.join(differ[:5]) + more


def _check_param_shapes(mngr, step: int, workdir, abstract_params) -> None:
  """Refuses, from the checkpoint's metadata alone, parameters that differ
  in name or shape from `abstract_params`."""
  saved = _saved_shapes(mngr, step, 'params')
  differ = _differences(saved, _shapes(abstract_params))
  if differ:
    raise ValueError(
      f'the parameters of {workdir!s} (step {step}) do not fit this model: '
      f'{differ}. Build the same model (its config is '
      f'{pathlib.Path(workdir) / "config.json"}), changing only fields that '
      'keep parameter shapes.'
    )


def restore_params(workdir: str | pathlib.Path, abstract_params, shardings):
  """Parameters only, from the latest checkpoint in `workdir` (fine-tuning,
  decoding). Parameters of other names or shapes are refused, naming them,
  before any array is read."""
  mngr, step = _latest_or_raise(workdir)
  _check_param_shapes(mngr, step, workdir, abstract_params)
  target = {'params': _abstract(abstract_params, shardings)}
  try:
    restored = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
        )
      ),
    )
  except Exception as e:
    if not _is_read_error(e):
      raise
    raise _damaged(mngr, step, e) from e
  logging.info('Initialised parameters from %s step %d.', workdir, step)
  return restored['state']['params']
