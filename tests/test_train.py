"""The training system end to end, on the tiny addition config."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attnjax import cli, decoding, train_lib
from attnjax.training import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import addition  # noqa: E402


def tiny_config(**overrides):
  config = addition.get_config('tiny')
  config.optimizer.schedule = 'constant'
  config.optimizer.warmup_steps = 0
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def train_losses(workdir) -> dict[int, float]:
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  return {r['step']: r['loss'] for r in rows if r['split'] == 'train'}


def final_params(workdir):
  exp, params = train_lib.load_trained(workdir)
  return jax.device_get(params)


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny run of 20 steps, shared by the checkpoint-reuse tests."""
  workdir = tmp_path_factory.mktemp('trained')
  config = tiny_config(keep_checkpoints=1)
  result = train_lib.train_and_evaluate(config, str(workdir))
  return workdir, result


def test_end_to_end_run_writes_everything(trained):
  workdir, result = trained
  assert 0.0 <= result['exact_match'] <= 1.0
  assert result['num_examples'] == 64
  config = json.loads((workdir / 'config.json').read_text())
  assert config['data']['largest'] == 99
  steps = sorted(
    int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()
  )
  assert steps == [20]  # saved at 10 and 20, keep_checkpoints=1
  rows = [
    json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  train_steps = [r['step'] for r in rows if r['split'] == 'train']
  assert train_steps == [5, 10, 15, 20]
  heldout = [r for r in rows if r['split'] == 'heldout']
  assert [r['step'] for r in heldout] == [10, 20]
  assert {'exact_match', 'token_accuracy', 'loss'} <= set(heldout[0])
  assert {'steps_per_s', 'tokens_per_s', 'loss'} <= set(rows[0])
  assert list((workdir / 'tensorboard' / 'train').glob('events.out.*'))
  losses = train_losses(workdir)
  assert losses[20] < losses[5]  # it learns


def test_one_device_equals_eight_devices(tmp_path):
  runs = {
    'one': dict(**{'mesh.num_devices': 1}),
    'data8': dict(**{'mesh.data': 8, 'mesh.model': 1}),
    'data4_model2': dict(**{'mesh.data': 4, 'mesh.model': 2}),
  }
  losses = {}
  for name, overrides in runs.items():
    config = tiny_config(
      num_train_steps=6,
      log_every_steps=1,
      eval_every_steps=6,
      checkpoint_every_steps=6,
      **overrides,
    )
    train_lib.train_and_evaluate(config, str(tmp_path / name))
    losses[name] = train_losses(tmp_path / name)
  assert sorted(losses['one']) == list(range(1, 7))
  for name in ('data8', 'data4_model2'):
    np.testing.assert_allclose(
      list(losses[name].values()), list(losses['one'].values()), atol=1e-5
    )


def test_metrics_are_fetched_one_step_late(tmp_path, monkeypatch):
  """Step k's metrics are read after step k + 1 is dispatched, so the
  device never waits for the host; at a checkpoint they are read first."""
  events = []
  make_train_step, add = train_lib.make_train_step, train_lib._TrainLog.add

  def recorded_make_train_step(exp):
    step_fn = make_train_step(exp)

    def run(state, batch, rng):
      events.append('step')
      return step_fn(state, batch, rng)

    return run

  def recorded_add(self, step, sums):
    events.append(f'read {step}')
    return add(self, step, sums)

  monkeypatch.setattr(train_lib, 'make_train_step', recorded_make_train_step)
  monkeypatch.setattr(train_lib._TrainLog, 'add', recorded_add)
  config = tiny_config(
    num_train_steps=6, checkpoint_every_steps=6, eval_every_steps=6
  )
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert events == [
    'step',
    'step',
    'read 1',
    'step',
    'read 2',
    'step',
    'read 3',
    'step',
    'read 4',
    'step',
    'read 5',
    'read 6',
  ]


def test_resume_equals_uninterrupted_run(tmp_path):
  common = dict(
    log_every_steps=1, checkpoint_every_steps=4, eval_every_steps=100
  )
  train_lib.train_and_evaluate(
    tiny_config(num_train_steps=16, **common), str(tmp_path / 'straight')
  )
  train_lib.train_and_evaluate(
    tiny_config(num_train_steps=8, **common), str(tmp_path / 'resumed')
  )
  train_lib.train_and_evaluate(
    tiny_config(num_train_steps=16, **common), str(tmp_path / 'resumed')
  )
  straight, resumed = (
    train_losses(tmp_path / 'straight'),
    train_losses(tmp_path / 'resumed'),
  )
  assert sorted(resumed) == list(range(1, 17))  # no step logged twice
  # Same losses step by step: the resumed run saw the same batches. Bit for
  # bit: the same programs on the same inputs and state, on one CPU host.
  assert [resumed[s] for s in range(9, 17)] == [
    straight[s] for s in range(9, 17)
  ]
  assert_trees_close(
    final_params(tmp_path / 'resumed'),
    final_params(tmp_path / 'straight'),
    atol=0,
  )


def test_an_error_during_training_still_finishes_the_checkpoint(
  tmp_path, monkeypatch
):
  """The evaluation right after the step-10 save fails; the checkpoint
  being written in the background is still completed."""

  def failing_evaluate(*args, **kwargs):
    raise RuntimeError('evaluation failed')

  evaluate = train_lib.evaluate
  monkeypatch.setattr(train_lib, 'evaluate', failing_evaluate)
  with pytest.raises(RuntimeError, match='evaluation failed'):
    train_lib.train_and_evaluate(tiny_config(), str(tmp_path))
  assert checkpoints.latest_step(tmp_path) == 10
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['10']
  # The rerun logs the evaluation the failed run did not (step 10 is the
  # end of this one, as in a run stopped during its final evaluation).
  monkeypatch.setattr(train_lib, 'evaluate', evaluate)
  train_lib.train_and_evaluate(tiny_config(num_train_steps=10), str(tmp_path))
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  heldout = [row for row in map(json.loads, lines) if row['split'] == 'heldout']
  assert [row['step'] for row in heldout] == [10]


def test_resumed_logs_equal_the_uninterrupted_ones(tmp_path):
  """Killed after step 10 (its last checkpoint step 8), with log windows
  that straddle checkpoints: the resumed run logs what the other did. With
  dropout and a warmup + cosine schedule, so the dropout rng and the
  schedule must resume where they were too."""
  config = tiny_config(
    num_train_steps=12,
    checkpoint_every_steps=4,
    log_every_steps=5,
    eval_every_steps=100,
    **{
      'model.dropout_rate': 0.2,
      'optimizer.schedule': 'cosine',
      'optimizer.warmup_steps': 5,
    },
  )
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  train_lib.train_and_evaluate(config, str(straight))
  shutil.copytree(straight, killed)
  shutil.rmtree(killed / 'checkpoints' / '12')
  train_lib.train_and_evaluate(config, str(killed))

  def train_lines(workdir):
    lines = (workdir / 'metrics.jsonl').read_text().splitlines()
    return [
      (row['step'], row['loss'], row['token_accuracy'])
      for row in map(json.loads, lines)
      if row['split'] == 'train'
    ]

  assert [step for step, *_ in train_lines(straight)] == [4, 5, 8, 10, 12]
  np.testing.assert_allclose(
    train_lines(killed), train_lines(straight), rtol=1e-6
  )


def _events(path: pathlib.Path):
  """The records of a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  data, pos = path.read_bytes(), 0
  while pos < len(data):
    (size,) = struct.unpack('<Q', data[pos : pos + 8])
    yield event_pb2.Event.FromString(data[pos + 12 : pos + 12 + size])
    pos += 12 + size + 4


def test_resumed_metrics_replace_the_killed_runs(tmp_path):
  """A run killed after logging step 12 resumes from its step-8 checkpoint:
  metrics.jsonl drops steps 9-12 and TensorBoard is told to hide them."""
  from tensorboardX.proto import event_pb2

  from attnjax.training import metrics

  killed = metrics.MetricsWriter(tmp_path)
  for step in range(1, 13):
    killed.write(step, 'train', {'loss': 1.0})
  killed.close()
  time.sleep(1.1)  # Event files are named by the second.
  resumed = metrics.MetricsWriter(tmp_path, resume_step=8)
  for step in range(9, 17):
    resumed.write(step, 'train', {'loss': 2.0})
  resumed.close()
  text = (tmp_path / 'metrics.jsonl').read_text()
  lines = [json.loads(line) for line in text.splitlines()]
  assert [x['step'] for x in lines] == list(range(1, 17))
  assert [x['loss'] for x in lines] == [1.0] * 8 + [2.0] * 8
  first, second = sorted((tmp_path / 'tensorboard' / 'train').iterdir())
  assert not any(e.HasField('session_log') for e in _events(first))
  (purge,) = [e for e in _events(second) if e.HasField('session_log')]
  assert purge.session_log.status == event_pb2.SessionLog.START
  assert purge.step == 9  # TensorBoard drops older events from step 9 on.


def test_restart_before_the_first_checkpoint_hides_the_killed_runs(tmp_path):
  """A run killed before its first checkpoint starts again from step 0;
  TensorBoard is told to hide the killed run's steps as metrics.jsonl
  drops them."""
  from attnjax.training import metrics

  killed = metrics.MetricsWriter(tmp_path)
  for step in range(1, 8):
    killed.write(step, 'train', {'loss': 1.0})
  killed.close()
  time.sleep(1.1)  # Event files are named by the second.
  again = metrics.MetricsWriter(tmp_path, resume_step=0)
  again.write(1, 'train', {'loss': 2.0})
  again.close()
  assert (tmp_path / 'metrics.jsonl').read_text().count('\n') == 1
  _, second = sorted((tmp_path / 'tensorboard' / 'train').iterdir())
  (purge,) = [e for e in _events(second) if e.HasField('session_log')]
  assert purge.step == 1


def test_metrics_line_cut_short_does_not_stop_a_resume(tmp_path):
  from attnjax.training import metrics

  lines = [json.dumps({'step': s, 'split': 'train'}) for s in (5, 10)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 1')
  metrics.MetricsWriter(tmp_path, resume_step=8)
  assert (tmp_path / 'metrics.jsonl').read_text() == lines[0] + '\n'


def test_progress_rates_and_eta(monkeypatch):
  from attnjax.training import metrics

  clock = iter([100.0, 102.0, 106.0])
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  progress = metrics.Progress(10, 110)
  # 10 steps and 500 target tokens in 2 s; 90 steps to go.
  assert progress.report(20, 500.0) == {
    'steps_per_s': 5.0,
    'tokens_per_s': 250.0,
    'eta_s': 18.0,
  }
  # Rates since the previous report: 20 steps in 4 s.
  assert progress.report(40, 400.0) == {
    'steps_per_s': 5.0,
    'tokens_per_s': 100.0,
    'eta_s': 14.0,
  }
  assert metrics.format_eta(3725) == '1:02:05'
  assert metrics.format_eta(65.4) == '1:05'


def _train_command(workdir, *flags):
  return [
    sys.executable,
    str(ROOT / 'train.py'),
    f'--config={ROOT / "configs" / "addition.py"}:tiny',
    f'--workdir={workdir}',
    *flags,
  ]


def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path):
  flags = [
    '--config.num_train_steps=400',
    '--config.checkpoint_every_steps=5',
    '--config.log_every_steps=5',
    '--config.eval_every_steps=1000',
    '--config.optimizer.schedule=constant',
  ]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(
    _train_command(workdir, *flags),
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  mngr_dir = workdir / 'checkpoints'
  deadline = time.time() + 240
  while time.time() < deadline:
    done = (
      [p for p in mngr_dir.glob('*') if p.name.isdigit()]
      if (mngr_dir.exists())
      else []
    )
    if len(done) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  latest = checkpoints.manager(workdir, read_only=True).latest_step()
  assert latest is not None and 0 < latest < 400
  # The killed run's process is gone mid-training; a rerun resumes.
  subprocess.run(
    _train_command(workdir, *flags), env=env, check=True, capture_output=True
  )
  assert checkpoints.manager(workdir, read_only=True).latest_step() == 400
  subprocess.run(
    _train_command(tmp_path / 'straight', *flags),
    env=env,
    check=True,
    capture_output=True,
  )
  assert_trees_close(
    final_params(workdir), final_params(tmp_path / 'straight'), atol=1e-6
  )


def test_checkpoint_from_eight_devices_restores_on_one(tmp_path):
  config = tiny_config(**{'mesh.data': 4, 'mesh.model': 2})
  config.num_train_steps = 4
  config.checkpoint_every_steps = config.eval_every_steps = 4
  train_lib.train_and_evaluate(config, str(tmp_path))
  eight = final_params(tmp_path)
  single = tiny_config(**{'mesh.num_devices': 1})
  exp = train_lib.Experiment.create(single)
  mngr = checkpoints.manager(tmp_path, read_only=True)
  state, step = train_lib.restore_or_init(exp, tmp_path, mngr)
  assert step == 4
  leaves = jax.tree.leaves(state.params)
  assert all(len(x.sharding.device_set) == 1 for x in leaves)
  assert_trees_close(jax.device_get(state.params), eight, atol=0)


def test_nan_loss_stops_with_the_step_and_keeps_checkpoint(tmp_path, caplog):
  train_lib.train_and_evaluate(
    tiny_config(num_train_steps=4, checkpoint_every_steps=2), str(tmp_path)
  )
  # Resume with a learning rate that overflows the parameters at once.
  config = tiny_config(
    num_train_steps=40,
    checkpoint_every_steps=2,
    **{'optimizer.learning_rate': 1e38},
  )
  with pytest.raises(FloatingPointError, match=r'at step \d+') as info:
    train_lib.train_and_evaluate(config, str(tmp_path))
  # The resume under a changed config says so.
  assert (
    'Resuming from step 4 under a changed config: num_train_steps: 4 -> 40; '
    'optimizer.learning_rate: 0.003 -> 1e+38.'
  ) in caplog.text
  step = int(re.search(r'at step (\d+)', str(info.value)).group(1))
  latest = checkpoints.manager(tmp_path, read_only=True).latest_step()
  assert 4 <= latest < step
  assert f'checkpoint (step {latest}) is kept' in str(info.value)
  # The kept checkpoint is finite and still loads.
  params = final_params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('data, model', [(2, 1), (1, 2)])
def test_two_processes_match_one_process_two_devices(tmp_path, data, model):
  """2 processes x 1 device == 1 process x 2 devices, with the mesh's data
  axis across the processes (each reads half of every batch) or its model
  axis (both read the whole batch). Then the 2-process run resumes in 1
  process, where Grain finds no iterator file of its own."""
  common = dict(
    num_train_steps=6,
    log_every_steps=1,
    checkpoint_every_steps=6,
    eval_every_steps=6,
  )
  flags = [f'--config.{k}={v}' for k, v in common.items()] + [
    '--config.optimizer.schedule=constant',
    '--config.optimizer.warmup_steps=0',
    f'--config.mesh.data={data}',
    f'--config.mesh.model={model}',
  ]
  port = _free_port()
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  procs = [
    subprocess.Popen(
      _train_command(
        tmp_path / 'multi',
        *flags,
        f'--coordinator_address=localhost:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ),
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
  mesh = {'mesh.data': data, 'mesh.model': model, 'mesh.num_devices': 2}
  single = tiny_config(**common, **mesh)
  train_lib.train_and_evaluate(single, str(tmp_path / 'single'))
  losses = train_losses(tmp_path / 'multi')
  assert sorted(losses) == list(range(1, 7))
  np.testing.assert_allclose(
    list(losses.values()),
    list(train_losses(tmp_path / 'single').values()),
    atol=1e-5,
  )
  # Two more steps for both, now in this single process.
  longer = tiny_config(**{**common, 'num_train_steps': 8}, **mesh)
  for name in ('multi', 'single'):
    train_lib.train_and_evaluate(longer, str(tmp_path / name))
  resumed, straight = (train_losses(tmp_path / n) for n in ('multi', 'single'))
  np.testing.assert_allclose(
    [resumed[7], resumed[8]], [straight[7], straight[8]], atol=1e-5
  )


# ---------------------------------------------------------------------------
# Command line reuse of a checkpoint.


def test_cli_decode_and_evaluate(trained, capsys):
  workdir, _ = trained
  assert (
    cli.main(
      [
        'decode',
        '--workdir',
        str(workdir),
        '--input',
        '12+34',
        '--input',
        '9+9',
      ]
    )
    == 0
  )
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith('12+34 -> ')
  assert (
    cli.main(
      [
        'evaluate',
        '--workdir',
        str(workdir),
        '--split',
        'test',
        '--num_examples',
        '20',
        '--show',
        '2',
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  report = json.loads(out[: out.rindex('}') + 1])
  assert report['num_examples'] == 20 and 0 <= report['exact_match'] <= 1


@pytest.mark.parametrize(
  'text, message',
  [
    ('12*34', "'\\*'"),
    ('ab', "text 'ab' holds characters not in the alphabet"),
    ('', 'empty'),
    # The tiny config adds two numbers up to 99.
    ('123+4', 'give 2 numbers from 0 to 99'),
    ('1234567+1', 'give 2 numbers from 0 to 99'),
    ('7+8+9', 'not a question'),
    ('1 + 2', 'without spaces'),
    ('+12', 'not a question'),
  ],
)
def test_cli_decode_bad_input(trained, capsys, text, message):
  workdir, _ = trained
  assert cli.main(['decode', '--workdir', str(workdir), '--input', text]) == 2
  err = capsys.readouterr().err
  assert 'error' in err
  assert re.search(message, err), err


def test_cli_missing_workdir(tmp_path, capsys):
  missing = tmp_path / 'nope'
  assert cli.main(['evaluate', '--workdir', str(missing)]) == 2
  assert 'does not exist' in capsys.readouterr().err
  a_file = tmp_path / 'config.json'
  a_file.write_text('{')
  assert cli.main(['evaluate', '--workdir', str(a_file)]) == 2
  assert f'workdir {a_file} is a file' in capsys.readouterr().err
  # The file as a workdir's damaged config.
  assert cli.main(['evaluate', '--workdir', str(tmp_path)]) == 2
  assert f'{a_file} is not valid JSON' in capsys.readouterr().err
  for text in ('[1, 2]', '{}', '{"data": {}, "model": 3}'):
    a_file.write_text(text)
    assert cli.main(['evaluate', '--workdir', str(tmp_path)]) == 2
    assert f'{a_file} is not a config train.py wrote' in capsys.readouterr().err


def test_cli_evaluate_more_examples_than_held_out_names_the_flag(
  trained, capsys
):
  workdir, _ = trained
  argv = ['evaluate', '--workdir', str(workdir), '--num_examples', '100000']
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert re.search(r'--num_examples=100000: .* ask for n <= \d+', err), err


@pytest.mark.parametrize(
  'flag, value, message',
  [
    ('--show', '-1', 'must be an integer >= 0'),
    ('--num_examples', '0', 'must be an integer >= 1'),
    ('--num_examples', 'many', "must be an integer >= 1; got 'many'"),
  ],
)
def test_cli_evaluate_bad_counts_fail_before_loading(
  tmp_path, capsys, flag, value, message
):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['evaluate', '--workdir', str(tmp_path / 'nope'), flag, value])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Bad configs fail before anything is compiled.


def test_unknown_config_field_suggests_close_match(tmp_path):
  result = subprocess.run(
    _train_command(tmp_path, '--config.batch_sise=3'),
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
  )
  assert result.returncode != 0
  assert 'Did you mean "batch_size"' in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--config.model.hiden_dim=3'], 'no field .hiden_dim.'),
    (['--config.modle.hidden_dim=3'], 'Did you mean "model"'),
    (['--config.batch_size=0'], r'config.batch_size=0 is invalid'),
    (['--config.data.largest=0'], 'largest'),
    (['--config=configs/nope.py'], r'--config=configs/nope.py: no such file'),
    (['--config=configs/addition.py:bahdanu'], 'unknown config variant'),
    (
      ['--num_processes=2', '--process_id=5', '--coordinator_address=h:1'],
      'process_id < num_processes',
    ),
    (
      ['--num_processes=1', '--process_id=0', '--coordinator_address=h'],
      "coordinator address 'h' has no port",
    ),
  ],
)
def test_train_py_config_errors_are_one_line(tmp_path, flags, message):
  """A mistake in the config or the flags is a message naming it, not a
  traceback."""
  result = subprocess.run(
    _train_command(tmp_path, *flags),
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  errors = [
    line for line in result.stderr.splitlines() if line.startswith('train.py')
  ]
  assert len(errors) == 1 and re.search(message, errors[0]), result.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_train_py_keeps_the_traceback_of_a_library_error():
  """Only the project's own checks are cut to one line: a ValueError from
  inside JAX is more likely a bug and keeps its traceback."""
  spec = importlib.util.spec_from_file_location('train_main', ROOT / 'train.py')
  train_main = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(train_main)
  with pytest.raises(ValueError) as own:
    train_lib.validate_config(tiny_config(batch_size=0))
  assert train_main._own_check(own.value) is own.value
  with pytest.raises(ValueError) as library:
    jax.numpy.broadcast_shapes((2,), (3,))
  assert train_main._own_check(library.value) is None

  # A ValueError from a line of attnjax that is not a `raise` is a bug too.
  def step_fn(tokens, state):  # Returns three values, not two.
    return jax.numpy.zeros((2, 5)), state, None

  with pytest.raises(ValueError, match='too many values to unpack') as bug:
    decoding.greedy_search(
      step_fn, jax.numpy.zeros((2, 3)), batch_size=2, max_len=4
    )
  assert train_main._own_check(bug.value) is None


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'batch_size': 0}, 'batch_size'),
    ({'optimizer.learning_rate': -1.0}, 'learning_rate'),
    ({'optimizer.schedule': 'cosin'}, 'schedule'),
    ({'label_smoothing': 1.0}, 'label_smoothing'),
    ({'mesh.data': 3}, 'mesh data=3'),
    ({'mesh.model': 3}, 'mesh.model=3 does not divide the 8 .* multiple of 3'),
    ({'mesh.model': 16}, r'mesh.model=16 does not divide .* a divisor of 8\.$'),
    ({'batch_size': 12, 'mesh.data': 8}, 'not divisible'),
    ({'mesh.num_devices': 9}, 'num_devices=9'),
    ({'data.largest': 0}, 'largest'),
    ({'data.task': 'multi31k'}, 'known tasks: .*anki_fra, .*multi30k'),
    ({'model.cell': 'lstmm'}, 'cell'),
    ({'optimizer.weight_decay': 0.1}, "optimizer.name='adamw'"),
    (
      {'seed': 2**32},
      r'config.seed=4294967296 .* integer in \[0, 4294967295\]',
    ),
    ({'optimizer.warmup_steps': -1}, 'warmup_steps'),
    # 99 + 99 leaves 213 held-out questions: refused before any training.
    ({'data.heldout_size': 1000}, 'heldout_size=1000 .* only 213 held-out'),
  ],
)
def test_bad_config_values(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train_lib.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize(
  'field', ['batch_size', 'num_train_steps', 'data.heldout_size']
)
def test_float_where_an_integer_belongs_is_refused(tmp_path, field):
  """A config file may write `1e4`; the field's type is not locked then."""
  config = tiny_config()
  *parents, leaf = field.split('.')
  node = config[parents[0]] if parents else config
  value = float(node[leaf])
  del node[leaf]
  node[leaf] = value
  with pytest.raises(ValueError, match=f'config.{field}=.* must be an integer'):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_workdir_of_a_different_model_is_refused(trained, tmp_path):
  workdir, _ = trained
  config = tiny_config(**{'model.hidden_dim': 32})
  with pytest.raises(ValueError, match='model.hidden_dim: 16 -> 32'):
    train_lib.train_and_evaluate(config, str(workdir))


def test_workdir_from_before_a_new_model_field_still_resumes(trained, tmp_path):
  """A workdir whose config.json predates a model field (here
  reverse_source) resumes when the config leaves that field at its default,
  and is refused when it does not."""
  workdir, _ = trained
  old = tmp_path / 'old'
  shutil.copytree(workdir, old)
  saved = json.loads((old / 'config.json').read_text())
  del saved['model']['reverse_source']
  (old / 'config.json').write_text(json.dumps(saved))
  train_lib.check_config_matches(tiny_config(), old)
  config = tiny_config(**{'model.reverse_source': True})
  with pytest.raises(ValueError, match='model.reverse_source: False -> True'):
    train_lib.check_config_matches(config, old)


def test_reverse_config_trains_and_decodes(tmp_path):
  from configs import reverse

  config = reverse.get_config('tiny')
  config.num_train_steps = config.checkpoint_every_steps = 4
  config.eval_every_steps = 4
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert result['num_examples'] == 64
  exp, params = train_lib.load_trained(tmp_path)
  (output,) = train_lib.decode(exp, params, ['abcd'])
  assert set(output) <= set(exp.task.vocab.alphabet)


def test_init_from_takes_parameters_only(trained, tmp_path):
  source, _ = trained
  config = tiny_config(
    init_from=str(source), **{'optimizer.learning_rate': 1e-4}
  )
  exp = train_lib.Experiment.create(config)
  state, step = train_lib.restore_or_init(
    exp, tmp_path, checkpoints.manager(tmp_path)
  )
  assert step == 0 and int(state.step) == 0  # a fresh run ...
  assert_trees_close(
    jax.device_get(state.params), final_params(source), atol=0
  )  # ... from the trained parameters
  assert all(
    float(abs(x).max()) == 0.0  # and a fresh optimiser state
    for x in jax.tree.leaves(state.opt_state)
    if x.ndim
  )


def test_init_from_without_checkpoint_is_an_error(tmp_path):
  config = tiny_config(init_from=str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))


def test_init_from_another_model_names_the_parameters(trained, tmp_path):
  source, _ = trained
  config = tiny_config(init_from=str(source), **{'model.hidden_dim': 32})
  with pytest.raises(ValueError, match='do not fit this model') as e:
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert re.search(r'\(16,?\) in the checkpoint, \(32,?\) here', message)
  assert 'Config fields changed' not in message  # That is about resuming.
  assert checkpoints.latest_step(tmp_path / 'run') is None


def test_damaged_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
  source, _ = trained
  workdir = tmp_path / 'copy'
  shutil.copytree(source, workdir)
  step = checkpoints.latest_step(workdir)
  shutil.rmtree(workdir / 'checkpoints' / str(step) / 'state')
  with pytest.raises(ValueError, match='damaged or incomplete'):
    train_lib.load_trained(workdir)
  argv = ['decode', '--workdir', str(workdir), '--input', '1+2']
  assert cli.main(argv) == 2
  assert 'damaged or incomplete' in capsys.readouterr().err


def test_truncated_array_files_are_a_damaged_checkpoint(
  trained, tmp_path, monkeypatch
):
  source, _ = trained
  workdir = tmp_path / 'copy'
  shutil.copytree(source, workdir)
  state = workdir / 'checkpoints' / str(checkpoints.latest_step(workdir))
  for path in (state / 'state').glob('**/d/*'):
    path.write_bytes(path.read_bytes()[:10])
  with pytest.raises(checkpoints.DamagedCheckpoint, match='OUT_OF_RANGE'):
    train_lib.load_trained(workdir)

  # Where the index survives, Orbax wraps TensorStore's error on a chunk in
  # a bare Exception (serialization.py, _read_array_index_and_device_put).
  def restore(*args, **kwargs):
    try:
      raise ValueError('OUT_OF_RANGE: Error reading "params.x/0.0"')
    except ValueError as e:
      raise Exception('Encountered error while reading array index') from e

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', restore)
  with pytest.raises(checkpoints.DamagedCheckpoint, match='params.x/0.0'):
    train_lib.load_trained(source)
  config = tiny_config(keep_checkpoints=1, num_train_steps=30)
  with pytest.raises(checkpoints.DamagedCheckpoint, match='damaged'):
    train_lib.train_and_evaluate(config, str(workdir))


@pytest.mark.parametrize('damaged', ['state', 'data'])
def test_damaged_checkpoint_on_resume_is_not_blamed_on_the_config(
  trained, tmp_path, damaged
):
  """A resume from an unreadable checkpoint says it is damaged, not that it
  belongs to another model."""
  source, _ = trained
  workdir = tmp_path / 'copy'
  shutil.copytree(source, workdir)
  step_dir = workdir / 'checkpoints' / str(checkpoints.latest_step(workdir))
  if damaged == 'state':
    shutil.rmtree(step_dir / 'state')
  else:
    (step_dir / 'data' / 'process_0-of-1.json').write_text('{')
  config = tiny_config(keep_checkpoints=1, num_train_steps=30)
  with pytest.raises(ValueError, match='damaged or incomplete') as e:
    train_lib.train_and_evaluate(config, str(workdir))
  assert 'does not match' not in str(e.value)
  assert 'Config fields changed' not in str(e.value)


def test_workdir_that_is_a_file_is_refused(tmp_path):
  a_file = tmp_path / 'run'
  a_file.write_text('')
  with pytest.raises(FileExistsError, match=f'workdir {a_file} is a file'):
    train_lib.train_and_evaluate(tiny_config(), str(a_file))


def test_damaged_config_json_on_resume_is_a_clear_error(trained, tmp_path):
  source, _ = trained
  workdir = tmp_path / 'copy'
  shutil.copytree(source, workdir)
  (workdir / 'config.json').write_text('{')
  config = tiny_config(keep_checkpoints=1, num_train_steps=30)
  with pytest.raises(ValueError, match='config.json is not valid JSON'):
    train_lib.train_and_evaluate(config, str(workdir))


def test_unknown_field_set_from_python_is_refused(tmp_path):
  config = tiny_config()
  config.batchsize = 8  # unlocked ConfigDicts accept any new field
  with pytest.raises(ValueError, match="did you mean 'batch_size'"):
    train_lib.train_and_evaluate(config, str(tmp_path))
  config = tiny_config()
  config.model.hiden_dim = 8
  with pytest.raises(ValueError, match='hiden_dim'):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_refused_resume_leaves_the_workdir_usable(trained, tmp_path):
  workdir, _ = trained
  saved = (workdir / 'config.json').read_text()
  # No clipping changes the optimiser state's structure: not resumable.
  config = tiny_config(num_train_steps=30, **{'optimizer.clip_norm': 0.0})
  with pytest.raises(ValueError, match=r'optimizer.clip_norm: 1.0 -> 0.0'):
    train_lib.train_and_evaluate(config, str(workdir))
  assert (workdir / 'config.json').read_text() == saved
  exp, params = train_lib.load_trained(workdir)
  assert train_lib.decode(exp, params, ['1+2'])


def test_cli_beam_search(trained, capsys):
  workdir, _ = trained
  base = [
    'decode',
    '--workdir',
    str(workdir),
    '--input',
    '12+34',
    '--input',
    '5+60',
  ]
  assert cli.main(base) == 0
  greedy = capsys.readouterr().out
  assert cli.main([*base, '--beam_size', '1']) == 0
  assert capsys.readouterr().out == greedy  # beam 1 is greedy
  assert cli.main([*base, '--beam_size', '4', '--alpha', '0.6']) == 0
  assert len(capsys.readouterr().out.strip().splitlines()) == 2
  assert (
    cli.main(
      [
        'evaluate',
        '--workdir',
        str(workdir),
        '--num_examples',
        '8',
        '--beam_size',
        '3',
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert json.loads(out[: out.rindex('}') + 1])['num_examples'] == 8


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--beam_size', '0'], 'beam_size must be'),
    (['--alpha', '-1'], 'alpha.* must be a finite number >= 0'),
    (['--alpha', 'nan'], 'alpha.* must be a finite number >= 0 .*got nan'),
    # Greedy search has nothing for a length penalty to rank.
    (['--alpha', '0.6'], 'alpha=0.6 would be ignored.*beam_size > 1'),
    (
      ['--beam_size', '2', '--coverage_weight', '-0.5'],
      'coverage_weight must be a finite number >= 0',
    ),
    (['--coverage_weight', '0.2'], 'coverage_weight=0.2 would be ignored'),
  ],
)
def test_cli_bad_search_flags(trained, capsys, flags, message):
  workdir, _ = trained
  args = ['decode', '--workdir', str(workdir), '--input', '1+2', *flags]
  assert cli.main(args) == 2
  assert re.search(message, capsys.readouterr().err)
  # Refused before the model is loaded: a missing workdir is not reached.
  args[2] = str(workdir / 'missing')
  assert cli.main(args) == 2
  assert re.search(message, capsys.readouterr().err)


def test_evaluate_refuses_search_settings_its_eval_step_would_ignore(
  trained,
):
  workdir, _ = trained
  exp, params = train_lib.load_trained(workdir)
  step = train_lib.make_eval_step(exp)  # Greedy search.
  for search in (
    dict(beam_size=2),
    dict(beam_size=2, alpha=0.6),
    dict(beam_size=2, coverage_weight=0.2),
  ):
    with pytest.raises(ValueError, match='would be ignored; pass them to'):
      train_lib.evaluate(exp, params, eval_step=step, **search)


def test_cli_coverage_penalty_reaches_the_search(
  trained, tmp_path, capsys, monkeypatch
):
  """decode, evaluate and plot pass --beam_size, --alpha and
  --coverage_weight to the model's beam search."""
  workdir, _ = trained
  searches = []
  decode_model = decoding.decode_model

  def recording(*args, **kwargs):
    searches.append({k: kwargs[k] for k in ('beam_size', 'alpha')})
    searches[-1]['coverage_weight'] = kwargs.get('coverage_weight', 0.0)
    return decode_model(*args, **kwargs)

  monkeypatch.setattr(decoding, 'decode_model', recording)
  flags = ['--beam_size', '3', '--alpha', '0.6', '--coverage_weight', '0.4']
  source = ['--workdir', str(workdir), '--input', '12+34']
  for argv in (
    ['decode', *source, *flags],
    ['evaluate', '--workdir', str(workdir), '--num_examples', '4', *flags],
    ['plot', *source, '--out', str(tmp_path / 'a.png'), *flags],
  ):
    searches.clear()
    assert cli.main(argv) == 0, capsys.readouterr().err
    expected = dict(beam_size=3, alpha=0.6, coverage_weight=0.4)
    assert searches and all(s == expected for s in searches), argv
  capsys.readouterr()
