"""Translation end to end: SentencePiece vocabularies, the bucketed Grain
pipeline, training, checkpoints, BLEU evaluation and decoding.

Uses the Multi30k copy in `../shared/data` (skipped without it) and tiny
configs.
"""

import gzip
import importlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
import sacrebleu
from absl import flags

from attnjax import train_lib
from attnjax.data import parallel, tokenizer
from attnjax.data.vocab import BOS_ID, EOS_ID, PAD_ID

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import multi30k_bahdanau, multi30k_transformer  # noqa: E402

MULTI30K = ROOT.parent / 'shared' / 'data' / 'multi30k'
pytestmark = pytest.mark.skipif(
  not MULTI30K.is_dir(), reason=f'no Multi30k copy at {MULTI30K}'
)


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def tiny_config(tfds_dir, module=multi30k_transformer, **overrides):
  config = module.get_config('tiny')
  config.data.tfds_dir = tfds_dir
  config.data.source_dir = str(MULTI30K)
  config.optimizer.schedule = 'constant'
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def make_task(tfds_dir, vocab_dir, **fields):
  data = dict(
    task='multi30k',
    tfds_dir=tfds_dir,
    source_dir=str(MULTI30K),
    train_split='train[:600]',
    vocab_size=300,
    max_source_len=40,
    max_target_len=40,
    buckets=(12, 20, 40),
  )
  data.update(fields)
  return parallel.TranslationTask(parallel.TranslationData(**data), vocab_dir)


@pytest.fixture(scope='module')
def task(tfds_dir, tmp_path_factory):
  return make_task(tfds_dir, tmp_path_factory.mktemp('vocab'))


@pytest.fixture(scope='module')
def trained(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('multi30k_tiny')
  config = tiny_config(tfds_dir, keep_checkpoints=1)
  result = train_lib.train_and_evaluate(config, str(workdir))
  return workdir, result


# ---------------------------------------------------------------------------
# Vocabularies.


def test_vocab_special_ids_and_round_trip(task):
  vocab = task.source_vocab
  assert vocab.size == 300
  assert vocab.pieces([PAD_ID, BOS_ID, EOS_ID, tokenizer.UNK_ID]) == [
    '<pad>',
    '<s>',
    '</s>',
    '<unk>',
  ]
  text = 'Zwei Hunde spielen im Schnee.'
  ids = vocab.encode(text)
  assert min(ids) >= tokenizer.UNK_ID
  # Decoding stops at EOS and skips PAD and BOS.
  assert vocab.decode([BOS_ID, *ids, EOS_ID, 7, 8, PAD_ID]) == text


def test_vocab_training_is_deterministic(task, tfds_dir, tmp_path):
  again = make_task(tfds_dir, tmp_path)
  assert again.source_vocab.digest == task.source_vocab.digest


def test_separate_vocabularies(tfds_dir, tmp_path):
  task = make_task(tfds_dir, tmp_path, joint_vocab=False, vocab_size=200)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    'params.json',
    'source.model',
    'target.model',
  ]
  assert task.source_vocab.digest != task.target_vocab.digest
  assert task.vocab is task.target_vocab


# ---------------------------------------------------------------------------


def test_process_zero_prepares_data_and_vocabularies_first(
  tfds_dir, tmp_path, monkeypatch
):
  """Two processes simulated one after the other on a shared workdir:
  process 0 reads the data (building it) and trains the vocabularies
  before it broadcasts that it succeeded (0); process 1 reads nothing and
  learns from the broadcasts that the vocabularies exist. Each time, all
  processes meet in a broadcast before process 0 starts: Gloo gives up
  after 30 s on a first collective that one process reaches late."""
  from jax.experimental import multihost_utils

  events = []
  load_pairs = parallel.translation_lib.load_pairs

  def logged_load(*args, **kwargs):
    events.append('read data')
    return load_pairs(*args, **kwargs)

  def logged_broadcast(x):
    events.append(f'broadcast {int(x)}')
    return x

  def logged_allgather(x):
    events.append(f'allgather {int(x)}')
    return np.asarray([x, x])

  monkeypatch.setattr(parallel.translation_lib, 'load_pairs', logged_load)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all', logged_broadcast)
  monkeypatch.setattr(multihost_utils, 'process_allgather', logged_allgather)
  per_process = []
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    events.clear()
    make_task(tfds_dir, tmp_path)
    per_process.append(list(events))
  assert per_process == [
    # Met, built; vocabularies missing; met, trained.
    [
      'broadcast 0',
      'read data',
      'broadcast 0',
      'broadcast 1',
      'broadcast 0',
      'read data',
      'broadcast 0',
      'allgather 1',
    ],
    # Met, built; vocabularies present.
    ['broadcast 0', 'broadcast 0', 'broadcast 0'],
  ]
  # A process that does not see the vocabularies process 0 wrote (another
  # file system) stops every process, not only itself.
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  monkeypatch.setattr(
    multihost_utils, 'process_allgather', lambda x: np.asarray([x, 0])
  )
  with pytest.raises(FileNotFoundError, match=r'process\(es\) \[1\] do not'):
    make_task(tfds_dir, tmp_path / 'elsewhere')


def test_failure_on_process_zero_stops_every_process(tmp_path):
  """Process 0 cannot prepare the data (no such folder): it raises its own
  error, and process 1 one that points at it, at once, instead of timing
  out at a barrier."""
  port = _free_port()
  flags = [
    f'--config={ROOT / "configs" / "multi30k_transformer.py"}:tiny',
    f'--workdir={tmp_path / "workdir"}',
    f'--config.data.source_dir={tmp_path / "nothing"}',
    f'--config.data.tfds_dir={tmp_path / "tfds"}',
    f'--coordinator_address=localhost:{port}',
    '--num_processes=2',
  ]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  procs = [
    subprocess.Popen(
      [sys.executable, str(ROOT / 'train.py'), *flags, f'--process_id={i}'],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [proc.communicate(timeout=120)[0] for proc in procs]
  assert [proc.returncode for proc in procs] == [1, 1], outs
  assert 'Multi30k data folder' in outs[0], outs[0][-2000:]
  assert 'process 0 failed to prepare the TFDS dataset' in outs[1], outs[1][
    -2000:
  ]
  assert not any('Traceback' in out for out in outs), outs


# The training pipeline.


def batches(task, steps, **kwargs):
  it = iter(task.train_dataset(**kwargs))
  return [next(it) for _ in range(steps)]


def test_batches_have_bucket_shapes_and_cover_an_epoch(task):
  plan = parallel._BatchPlan(task, 8)
  sources, targets = task.train_ids()
  epoch = batches(task, plan.steps_per_epoch, global_batch_size=8)
  shapes = {b['inputs'].shape[1] for b in epoch}
  assert shapes <= {12, 20, 40}
  # Buckets too small for a batch join the next longer one.
  widths = [w for w, _ in plan.shapes]
  seen = []
  for batch in epoch:
    assert batch['inputs'].shape[0] == batch['targets'].shape[0] == 8
    for row in range(8):
      src = batch['inputs'][row]
      tgt = batch['targets'][row]
      src = src[src != PAD_ID]
      tgt = tgt[tgt != PAD_ID]
      assert tgt[-1] == EOS_ID
      # The row is one training pair, padded to the bucket of its length.
      matches = [
        i
        for i in range(len(sources))
        if np.array_equal(sources[i], src) and np.array_equal(targets[i], tgt)
      ]
      assert matches
      # The smallest bucket that holds the pair: a pair as long as a
      # bucket's edge belongs to that bucket, not the next.
      longest = max(len(src), len(tgt))
      width = min(w for w in widths if w >= longest)
      assert batch['inputs'].shape[1] == batch['targets'].shape[1] == width
      seen.append(matches[0])
  # No pair twice in one epoch; only bucket remainders sit out.
  assert len(set(seen)) == len(seen) == plan.steps_per_epoch * 8
  assert len(sources) - len(seen) < 8 * len(plan.buckets)


def test_epochs_are_shuffled_differently_and_reproducibly(task):
  plan = parallel._BatchPlan(task, 8)
  n = plan.steps_per_epoch
  first = batches(task, 2 * n, global_batch_size=8)
  again = batches(task, 2 * n, global_batch_size=8)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
  assert any(
    a['inputs'].shape != b['inputs'].shape
    or not np.array_equal(a['inputs'], b['inputs'])
    for a, b in zip(first[:n], first[n:], strict=True)
  )


def test_the_data_seed_picks_the_shuffle(task, tfds_dir):
  reseeded = make_task(tfds_dir, task.vocab_dir, seed=1)
  first, other = (batches(t, 4, global_batch_size=8) for t in (task, reseeded))
  assert any(
    a['inputs'].shape != b['inputs'].shape
    or not np.array_equal(a['inputs'], b['inputs'])
    for a, b in zip(first, other, strict=True)
  )
  again = batches(
    make_task(tfds_dir, task.vocab_dir, seed=1), 4, global_batch_size=8
  )
  for a, b in zip(other, again, strict=True):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])


def test_processes_split_each_global_batch(task):
  whole = batches(task, 5, global_batch_size=8)
  halves = [
    batches(task, 5, global_batch_size=8, process_index=p, process_count=2)
    for p in range(2)
  ]
  for k in range(5):
    for key in ('inputs', 'targets'):
      np.testing.assert_array_equal(
        np.concatenate([halves[0][k][key], halves[1][k][key]]), whole[k][key]
      )


def test_iterator_state_restores_exactly(task):
  it = iter(task.train_dataset(global_batch_size=8))
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = iter(task.train_dataset(global_batch_size=8))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got['inputs'], want['inputs'])
    np.testing.assert_array_equal(got['targets'], want['targets'])
  assert isinstance(fresh, grain.DatasetIterator)


def test_too_long_pairs_are_left_out_with_a_count(tfds_dir, tmp_path, caplog):
  caplog.set_level('INFO')
  short = make_task(tfds_dir, tmp_path, max_source_len=12, max_target_len=12)
  sources, targets = short.train_ids()
  assert all(len(s) <= 12 for s in sources)
  assert all(len(t) <= 12 for t in targets)
  assert len(sources) < 600
  assert f'{600 - len(sources)} left out' in caplog.text


def test_reused_vocabularies_must_fit_the_config(tfds_dir, tmp_path, caplog):
  """A vocabulary is trained once per workdir; a config that asks for
  another size is refused, other changes are logged, never silent."""
  make_task(tfds_dir, tmp_path)
  params = json.loads((tmp_path / 'params.json').read_text())
  assert params['vocab_size'] == 300
  assert params['train_split'] == 'train[:600]'
  with pytest.raises(ValueError, match='has 300 ids') as e:
    make_task(tfds_dir, tmp_path, vocab_size=350)
  assert 'vocab_size=300' in str(e.value) and str(tmp_path) in str(e.value)
  caplog.set_level('WARNING', logger=parallel.__name__)
  task = make_task(tfds_dir, tmp_path, train_split='train[:500]')
  assert task.source_vocab.size == 300
  assert "train_split='train[:600]'" in caplog.text
  assert "train_split='train[:500]'" in caplog.text


class _FakeTask:
  """A task of made-up pairs: a source of `n` ids, its target with EOS."""

  def __init__(self, source_lengths, **fields):
    self.data = parallel.TranslationData(task='multi30k', **fields)
    self.sources = [np.full(n, 7, np.int32) for n in source_lengths]
    self.targets = [np.append(s, EOS_ID).astype(np.int32) for s in self.sources]

  def train_ids(self):
    return self.sources, self.targets


@pytest.mark.parametrize(
  'source_lengths, shapes',
  [
    # The longest bucket holds 5 pairs, fewer than a batch of 8: they join
    # the bucket before it, at the longest shape.
    ([2] * 40 + [6] * 40 + [12] * 5, {4: 40, 16: 45}),
    # A short middle bucket joins the next longer one.
    ([2] * 40 + [6] * 3 + [12] * 40, {4: 40, 16: 43}),
  ],
)
def test_buckets_smaller_than_a_batch_are_still_trained_on(
  source_lengths, shapes
):
  fake = _FakeTask(
    source_lengths, buckets=(4, 8, 16), max_source_len=16, max_target_len=16
  )
  plan = parallel._BatchPlan(fake, 8)
  assert {
    s: len(m) for (s, _), m in zip(plan.shapes, plan.buckets, strict=True)
  } == shapes
  seen = set()
  for epoch in range(30):
    for bucket, members in plan.epoch(epoch):
      (width, _) = plan.shapes[bucket]
      assert all(len(fake.targets[i]) <= width for i in members)
      seen.update(members.tolist())
  assert seen == set(range(len(source_lengths)))


def test_batch_larger_than_every_bucket_is_refused(task):
  with pytest.raises(ValueError, match='lower batch_size'):
    task.train_dataset(global_batch_size=10_000)


# ---------------------------------------------------------------------------
# Inputs, held-out sets and scores.


def test_long_input_errors_or_truncates(tfds_dir, task, tmp_path, caplog):
  long = ' '.join(['Ein Hund läuft durch den Schnee.'] * 10)
  with pytest.raises(ValueError, match='long_input=truncate'):
    task.prepare_source(long)
  cut = make_task(tfds_dir, tmp_path, long_input='truncate')
  assert len(cut.prepare_source(long)) == 40
  assert 'truncated' in caplog.text
  with pytest.raises(ValueError, match='empty input'):
    task.prepare_source('   ')


@pytest.mark.parametrize('text', ['\u200b', '\ufeff \u00a0'])
def test_input_that_normalises_to_nothing_is_empty(task, text):
  with pytest.raises(ValueError, match='empty input'):
    task.prepare_source(text)


def test_input_that_is_not_utf8_is_named(task):
  # What sys.argv holds for the bytes b'Zwei \xff Hunde'.
  text = b'Zwei \xff Hunde'.decode('utf-8', 'surrogateescape')
  with pytest.raises(ValueError, match=r'not valid UTF-8 \(character 6\)'):
    task.prepare_source(text)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(global_batch_size=0), '>= 1'),
    (dict(global_batch_size=8, process_index=2, process_count=2), 'index'),
    (dict(global_batch_size=8, process_index=-1, process_count=2), 'index'),
    (dict(global_batch_size=9, process_count=2), 'evenly'),
  ],
)
def test_bad_process_slices_are_refused(task, kwargs, match):
  with pytest.raises(ValueError, match=match):
    task.train_dataset(**kwargs)


def test_heldout_batches_hold_the_split(task):
  heldout = task.heldout('test', n=37, batch_size=16)
  assert len(heldout.batches) == 3
  assert len(heldout.references) == len(heldout.sources) == 37
  assert int(sum(b['valid'].sum() for b in heldout.batches)) == 37
  row = heldout.batches[0]['targets'][0]
  assert task.target_vocab.decode(row) == heldout.references[0]
  # Teacher forcing scores the EOS too, as in training.
  ids = task.target_vocab.encode_many(heldout.references[:1])[0]
  np.testing.assert_array_equal(row[: len(ids) + 1], [*ids, EOS_ID])
  assert (row[len(ids) + 1 :] == PAD_ID).all()
  # Sources are padded to the smallest bucket that holds the longest one
  # (cut to max_source_len=40).
  source_ids = task.source_vocab.encode_many(heldout.sources)
  longest = min(max(map(len, source_ids)), 40)
  width = min(b for b in (12, 20, 40) if b >= longest)
  assert {b['inputs'].shape for b in heldout.batches} == {(16, width)}
  with pytest.raises(ValueError, match='validation, test'):
    task.heldout('test_2016', n=1, batch_size=1)


def test_heldout_width_is_the_smallest_bucket_that_holds_the_source():
  """A source as long as a bucket's edge fits that bucket; the width never
  exceeds max_source_len (here 32, below the last bucket)."""
  widths = [
    parallel._bucket_len(n, (12, 20, 40), 32) for n in (1, 12, 13, 20, 21, 50)
  ]
  assert widths == [12, 12, 20, 20, 32, 32]


def test_bleu_cased_and_lowercased():
  refs = ['A dog runs in the snow .', 'Two men are talking .']
  hyps = ['a dog runs in the snow .', 'Two men are talking .']
  scores = parallel.bleu(hyps, refs)
  assert scores['bleu_lowercase'] == pytest.approx(100.0)
  assert scores['bleu'] < 100.0
  expected = sacrebleu.corpus_bleu(hyps, [refs]).score
  assert scores['bleu'] == pytest.approx(expected)


def test_bleu_of_chinese_uses_the_zh_tokenizer():
  refs = ['我们在公园里散步。', '他喜欢喝茶。']
  hyps = ['我们在公园散步。', '他喜欢喝茶。']
  scores = parallel.bleu(hyps, refs, tokenize='zh')
  expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize='zh').score
  assert scores['bleu'] == pytest.approx(expected)
  # 13a would see each unsegmented sentence as one word.
  assert expected != sacrebleu.corpus_bleu(hyps, [refs]).score


def test_task_scores_with_the_configured_bleu_tokenizer(tfds_dir, tmp_path):
  task = make_task(tfds_dir, tmp_path, bleu_tokenize='char')
  refs = ['Ein Hund rennt im Schnee.', 'Zwei Männer reden.']
  hyps = ['Ein Hund läuft im Schnee.', 'Zwei Männer reden.']
  expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize='char').score
  assert task.score(hyps, refs)['bleu'] == pytest.approx(expected)
  assert expected != sacrebleu.corpus_bleu(hyps, [refs]).score


def test_heldout_truncation_is_counted(tfds_dir, tmp_path, caplog):
  short = make_task(tfds_dir, tmp_path, max_source_len=8, max_target_len=8)
  heldout = short.heldout('validation', n=50, batch_size=25)
  assert heldout.batches[0]['inputs'].shape[1] == 8
  counts = [
    int(w) for w in caplog.text.split('validation:')[1].split() if w.isdigit()
  ]
  assert counts[0] > 0  # sources truncated, counted in the warning
  assert len(heldout.references) == 50


def test_named_split_is_read_whole(trained):
  exp, _ = train_lib.load_trained(trained[0])
  assert len(exp.heldout('test').references) == 1000  # test_2016
  assert len(exp.heldout().references) == exp.config.data.heldout_size
  assert len(exp.heldout('test', 5).references) == 5


def test_bad_data_config_names_the_field():
  with pytest.raises(ValueError, match='config.data.buckets'):
    parallel.TranslationData(task='multi30k', buckets=(20, 10))
  with pytest.raises(ValueError, match='config.data.task'):
    parallel.TranslationData(task='wmt14')
  with pytest.raises(ValueError, match='config.data.long_input'):
    parallel.TranslationData(task='multi30k', long_input='drop')
  with pytest.raises(ValueError, match='does not take'):
    parallel.TranslationData.from_config({'task': 'multi30k', 'vocab': 3})


@pytest.mark.parametrize(
  'overrides, message',
  [
    # 8 devices on the data axis.
    ({'batch_size': 12}, 'config.batch_size=12 is not divisible'),
    ({'model.num_heads': 5}, 'must be divisible by num_heads=5'),
    (
      {'model.share_embeddings': True, 'data.joint_vocab': False},
      'share_embeddings=True ties one embedding',
    ),
  ],
)
def test_mesh_and_model_are_checked_before_the_data_and_vocabularies(
  tmp_path, overrides, message
):
  tfds_dir = tmp_path / 'tfds'
  workdir = tmp_path / 'workdir'
  config = tiny_config(str(tfds_dir), **overrides)
  with pytest.raises(ValueError, match=message):
    train_lib.Experiment.create(config, workdir)
  # Neither the TFDS dataset nor a vocabulary was made first.
  assert not tfds_dir.exists() and not workdir.exists()


# ---------------------------------------------------------------------------
# Train -> checkpoint -> evaluate -> decode.


def test_train_checkpoint_evaluate_decode(trained):
  workdir, result = trained
  assert {'bleu', 'bleu_lowercase', 'perplexity'} <= set(result)
  assert result['num_examples'] == 16
  assert (workdir / 'vocab' / 'joint.model').is_file()
  rows = [
    json.loads(line)
    for line in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  train = [r['loss'] for r in rows if r['split'] == 'train']
  assert train[-1] < train[0]  # it learns
  exp, params = train_lib.load_trained(workdir)
  again = train_lib.evaluate(exp, params)
  assert again['loss'] == pytest.approx(result['loss'], rel=1e-5)
  assert again['bleu'] == pytest.approx(result['bleu'])
  test = train_lib.evaluate(exp, params, split='test', num_examples=8)
  assert test['num_examples'] == 8
  [output] = train_lib.decode(exp, params, ['Zwei Hunde spielen im Schnee.'])
  assert isinstance(output, str)
  # The decoded text is the greedy search's, read with the target vocab.
  inputs = train_lib.source_batch(exp.task, ['Zwei Hunde spielen im Schnee.'])
  tokens = train_lib.search(
    exp.model, params, inputs, max_len=exp.task.max_target_len
  )
  assert output == exp.task.target_vocab.decode(np.asarray(tokens)[0])


def test_resume_equals_uninterrupted_run(tfds_dir, tmp_path):
  """Stopped at step 8 and resumed to 24, across epoch boundaries."""
  common = {
    'log_every_steps': 1,
    'checkpoint_every_steps': 4,
    'eval_every_steps': 100,
    'data.train_split': 'train[:200]',
    'data.vocab_size': 250,
  }
  runs = {}
  for name, steps in (('straight', [24]), ('resumed', [8, 24])):
    for num_steps in steps:
      config = tiny_config(tfds_dir, num_train_steps=num_steps, **common)
      train_lib.train_and_evaluate(config, str(tmp_path / name))
    exp, params = train_lib.load_trained(tmp_path / name)
    runs[name] = jax.device_get(params)
  assert parallel._BatchPlan(exp.task, 16).steps_per_epoch < 16
  for a, b in zip(
    jax.tree.leaves(runs['straight']),
    jax.tree.leaves(runs['resumed']),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)  # Bit for bit.


def test_vocab_not_of_the_checkpoint_is_refused(
  trained, task, tfds_dir, tmp_path
):
  workdir, _ = trained
  copy = tmp_path / 'copy'
  copy.mkdir()
  for item in ('config.json', 'checkpoints', 'vocab'):
    src = workdir / item
    if src.is_dir():
      shutil.copytree(src, copy / item)
    else:
      (copy / item).write_bytes(src.read_bytes())
  # A vocabulary trained on other text, under the same name.
  other = make_task(
    tfds_dir, tmp_path / 'other', train_split='train[600:1400]', vocab_size=400
  )
  (copy / 'vocab' / 'joint.model').write_bytes(
    other.source_vocab.path.read_bytes()
  )
  with pytest.raises(ValueError, match='not the ones checkpoint step'):
    train_lib.load_trained(copy)
  # Resuming training there is refused too.
  config = tiny_config(tfds_dir, keep_checkpoints=1, num_train_steps=30)
  with pytest.raises(ValueError, match='not the ones checkpoint step'):
    train_lib.train_and_evaluate(config, str(copy))
  # One of another size: the model's config is right, the file is not.
  (copy / 'vocab' / 'joint.model').write_bytes(
    task.source_vocab.path.read_bytes()
  )
  with pytest.raises(ValueError, match=r'has 300 ids.*Copy back'):
    train_lib.load_trained(copy)
  (copy / 'vocab' / 'joint.model').unlink()
  with pytest.raises(FileNotFoundError, match='copy them back'):
    train_lib.load_trained(copy)


@pytest.mark.parametrize(
  'name, folder',
  [
    ('anki_fra_transformer', 'anki_fra_eng'),
    ('anki_cmn_transformer', 'anki_cmn_eng/attrib_version'),
  ],
)
def test_tiny_anki_configs_train_their_vocabularies(
  tfds_dir, tmp_path, name, folder
):
  """The tests' variants must run: the Chinese one needs room for its
  ~1,500 characters."""
  source_dir = MULTI30K.parent / folder
  if not source_dir.is_dir():
    pytest.skip(f'no Anki copy at {source_dir}')
  config = importlib.import_module(f'configs.{name}').get_config('tiny')
  config.data.tfds_dir = tfds_dir
  config.data.source_dir = str(source_dir)
  task = parallel.TranslationTask.create(config.data, tmp_path)
  assert task.source_vocab.size == config.data.vocab_size
  assert task.train_dataset(global_batch_size=config.batch_size)


def test_bahdanau_trains_on_translation(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir, module=multi30k_bahdanau, num_train_steps=10)
  config.eval_every_steps = 10
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(result['loss'])
  assert 'bleu' in result


# ---------------------------------------------------------------------------
# Your own corpus (parallel_text), end to end.


def _multi30k_head(name: str, n: int) -> bytes:
  with gzip.open(MULTI30K / name, 'rb') as f:
    return b''.join(f.readline() for _ in range(n))


def test_own_corpus_trains_evaluates_and_decodes(tmp_path, capsys):
  """The first lines of Multi30k as plain `{split}.{lang}` files, without
  a test split, trained with configs/text_transformer.py:tiny as train.py
  parses it, then `attnjax decode` / `evaluate`."""
  from ml_collections import config_flags

  from attnjax import cli

  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for split, stem, n in (('train', 'train', 400), ('validation', 'val', 32)):
    for lang in ('de', 'en'):
      data = _multi30k_head(f'{stem}.{lang}.gz', n)
      (corpus / f'{split}.{lang}').write_bytes(data)
  argv = [
    'train.py',
    f'--config={ROOT / "configs" / "text_transformer.py"}:tiny',
    f'--config.data.source_dir={corpus}',
    '--config.data.languages=de,en',
    f'--config.data.tfds_dir={tmp_path / "tfds"}',
    '--config.num_train_steps=10',
    '--config.eval_every_steps=10',
  ]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sys, 'argv', argv)  # config_flags reads overrides there.
    flag_values = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
      'config', flag_values=flag_values, lock_config=True
    )
    flag_values(argv)
  workdir = tmp_path / 'workdir'
  result = train_lib.train_and_evaluate(config.value, str(workdir))
  assert np.isfinite(result['loss']) and 'bleu' in result
  assert result['num_examples'] == 16  # tiny's heldout_size
  params = json.loads((workdir / 'vocab' / 'params.json').read_text())
  assert params['task'] == 'parallel_text'
  assert params['languages'] == ['de', 'en']
  capsys.readouterr()  # Training's progress lines.

  code = cli.main(['decode', '--workdir', str(workdir), '--input', 'Ein Hund.'])
  out, err = capsys.readouterr()
  assert code == 0, err
  (line,) = out.splitlines()
  assert line.startswith('Ein Hund. -> ')

  code = cli.main(['evaluate', '--workdir', str(workdir), '--split', 'test'])
  out, err = capsys.readouterr()
  assert code == 2 and out == ''
  assert err.startswith('attnjax evaluate: error: ')
  assert "no 'test' split" in err and 'test.de / test.en' in err


def test_own_corpora_are_prepared_in_their_workdirs(tmp_path):
  """Without config.data.tfds_dir, each parallel_text run prepares its
  corpus in WORKDIR/tfds: two corpora of one language pair never meet in
  TFDS's shared default folder, where the second would be refused."""
  for name, lines in (('a', 120), ('b', 150)):
    corpus = tmp_path / f'corpus_{name}'
    corpus.mkdir()
    for split, stem in (('train', 'train'), ('validation', 'val')):
      for lang in ('de', 'en'):
        data = _multi30k_head(f'{stem}.{lang}.gz', lines)
        (corpus / f'{split}.{lang}').write_bytes(data)
    workdir = tmp_path / f'run_{name}'
    data = dict(
      task='parallel_text',
      source_dir=str(corpus),
      languages=('de', 'en'),
      vocab_size=200,
      max_source_len=40,
      max_target_len=40,
      buckets=(20, 40),
    )
    task = parallel.TranslationTask.create(data, workdir)
    assert task.tfds_dir == str(workdir / 'tfds')
    assert (workdir / 'tfds' / 'parallel_text').is_dir()
    assert len(task.pairs('train')) == lines


def test_languages_are_part_of_the_model_identity(tmp_path):
  """A workdir's config.json from before config.data.languages is not a
  changed field; other languages are (a checkpoint of de->en is not one
  of en->de)."""
  config = tiny_config(str(tmp_path / 'tfds'))
  saved = json.loads(config.to_json_best_effort())
  del saved['data']['languages']
  (tmp_path / train_lib.CONFIG_FILE).write_text(json.dumps(saved))
  assert train_lib._changed_fields(config, tmp_path) == []
  text = importlib.import_module('configs.text_transformer').get_config()
  text.data.languages = ('de', 'en')
  train_lib.save_config(text, tmp_path)
  text.data.languages = ('en', 'de')
  changed = train_lib._changed_fields(text, tmp_path)
  assert changed == ["data.languages: ['de', 'en'] -> ['en', 'de']"]
  assert changed[0].startswith(train_lib._IDENTITY_FIELDS)
  # The same languages, however given: --config.data.languages=de,en
  # arrives (and is saved) as ['de,en'].
  for same in (('de,en',), ('de, en',)):
    text.data.languages = same
    assert train_lib._changed_fields(text, tmp_path) == [], same
