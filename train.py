"""Trains a model: `python train.py --config=configs/addition.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.num_train_steps=500`.
Rerunning with the same workdir resumes from its latest checkpoint.
For several processes, pass --coordinator_address, --num_processes and
--process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID), or --distributed under a cluster manager JAX recognises.
"""

import os
import pathlib
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from attnjax import train_lib
from attnjax.training import checkpoints

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a configs/*.py file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Where checkpoints, the config and metrics go.'
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 (multi-process).'
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', None, 'Number of processes (multi-process).'
)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id', None, 'This process (multi-process).'
)
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed',
  False,
  'Start jax.distributed without the flags above (it '
  'detects SLURM, Open MPI, TPU pods and similar clusters itself).',
)
flags.mark_flags_as_required(['config', 'workdir'])


def _multi_process() -> bool:
  return bool(
    _DISTRIBUTED.value
    or _COORDINATOR.value
    or _NUM_PROCESSES.value
    or 'JAX_COORDINATOR_ADDRESS' in os.environ
    or 'JAX_NUM_PROCESSES' in os.environ
  )


# The project's own checks are raised from here.
_OWN_CODE = (
  pathlib.Path(train_lib.__file__).resolve().parent,
  pathlib.Path(__file__).resolve().parent / 'configs',
)


def _own_check(e: BaseException | None) -> BaseException | None:
  """The error of one of the project's checks behind `e`, if any.

  attnjax and the configs raise ValueError, OSError, FloatingPointError (a
  NaN loss) and RuntimeError (another process failed) with a message naming
  the problem and the fix, printed in one line. The same types raised
  inside a library, or by a line of ours that is not a `raise` (a failed
  unpacking, numpy's shape errors), are more likely bugs and keep their
  traceback.
  """
  while e is not None:
    frames = traceback.extract_tb(e.__traceback__)
    if (
      isinstance(e, ValueError | OSError | FloatingPointError | RuntimeError)
      and frames
    ):
      where = pathlib.Path(frames[-1].filename).resolve()
      if (frames[-1].line or '').startswith('raise') and any(
        where.is_relative_to(own) for own in _OWN_CODE
      ):
        return e
    # A config file's error reaches us wrapped by ml_collections and absl.
    e = e.__context__
  return None


def _unknown_field(e: BaseException | None, argv: list[str]) -> str:
  """ml_collections' error for `--config.FIELD=` naming no field, as one
  line ('' if `e` is something else)."""
  while e is not None and not isinstance(e, KeyError):
    e = e.__context__
  if e is None or not e.args or not isinstance(e.args[0], str):
    return ''
  # "'name'", then 'Did you mean "x" instead of "name"?' if one is close.
  name, *hint = e.args[0].splitlines()
  for arg in argv:
    flag = arg.split('=', 1)[0]
    if flag.startswith('--config.') and name.strip("'") in flag.split('.'):
      return ' '.join([f'{flag}: the config has no field {name}.', *hint])
  return ''


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake in --config said in one line rather
  than with ml_collections' traceback."""
  try:
    argv = flags.FLAGS(argv)
    path = config_flags.get_config_filename(flags.FLAGS['config'])
    # ml_collections defers the error of a file it cannot load to its use.
    if path is not None and not os.path.isfile(path.split(':', 1)[0]):
      message = f'--config={path}: no such file in {os.getcwd()}.'
    else:
      return argv
  except (KeyError, AttributeError) as e:
    message = _unknown_field(e, argv)
    if not message:
      raise
  except flags.Error as e:
    own = _own_check(e)
    message = f'--config: {own}' if own else str(e)
    message += '\nPass --helpshort or --helpfull to see help on flags.'
  print(f'train.py: error: {message}', file=sys.stderr)
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  checkpoints.quiet_orbax_logs()
  try:
    if _multi_process():
      train_lib.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
      )
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
    if _own_check(e) is not e:
      raise
    print(f'train.py: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
