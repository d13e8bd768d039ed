"""Trains a model: `python train.py --config=configs/addition.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.num_train_steps=500`.
Rerunning with the same workdir resumes from its latest checkpoint.
For several processes, pass --coordinator_address, --num_processes and
--process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID), or --distributed under a cluster manager JAX recognises.
"""

import os

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _multi_process():
    train_lib.initialize_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
  logging.set_verbosity(logging.INFO)
  checkpoints.quiet_orbax_logs()
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
