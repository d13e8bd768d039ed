"""Tests for attnjax.data: vocab, synthetic tasks and Grain pipelines."""

import dataclasses
import itertools
import math

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attnjax.data import pipeline, synthetic
from attnjax.data.vocab import BOS_ID, EOS_ID, PAD_ID, CharVocab

# --- Vocabulary. ---


def test_vocab_ids_and_round_trip():
  vocab = CharVocab('ab+ ')
  assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
  assert vocab.size == 7
  assert vocab.alphabet == 'ab+ '
  assert vocab.encode('ab +') == [3, 4, 6, 5]
  assert vocab.decode(vocab.encode(' a+b')) == ' a+b'


def test_vocab_decode_skips_pad_bos_and_stops_at_eos():
  vocab = CharVocab('abc')
  ids = [BOS_ID, 3, PAD_ID, 4, EOS_ID, 5, PAD_ID]
  assert vocab.decode(ids) == 'ab'
  assert vocab.decode(np.array([3, 5, EOS_ID, EOS_ID, 4])) == 'ac'
  assert vocab.decode([PAD_ID, PAD_ID]) == ''
  with pytest.raises(ValueError, match='id 6'):
    vocab.decode([6])
  assert vocab.decode([]) == ''
  with pytest.raises(ValueError, match=r'one sequence .* shape \(2, 2\)'):
    vocab.decode(np.array([[3, EOS_ID], [4, EOS_ID]]))
  with pytest.raises(ValueError, match='dtype float'):
    vocab.decode(np.array([3.0, 4.0]))


def test_vocab_encode_names_every_bad_character_and_the_alphabet():
  vocab = CharVocab('0123456789+ ')
  with pytest.raises(ValueError) as info:
    vocab.encode('1x+2\n3x')
  message = str(info.value)
  assert "'x'" in message and "'\\n'" in message
  assert repr('0123456789+ ') in message
  with pytest.raises(ValueError, match='empty input'):
    vocab.encode('')


def test_vocab_json_round_trip_and_bad_alphabets():
  vocab = CharVocab('xyz')
  assert CharVocab.from_json(vocab.to_json()) == vocab
  with pytest.raises(ValueError, match='not a saved CharVocab'):
    CharVocab.from_json({'alphabet': 'xyz'})
  for bad in ['', 'aba', 'a\tb']:
    with pytest.raises(ValueError, match='alphabet'):
      CharVocab(bad)


# --- Addition: seed 000's formulation. ---


def _seed_widths(n_numbers, largest):
  """The widths exactly as seed 000's Keras code computes them."""
  source = n_numbers * math.ceil(math.log10(largest + 1)) + n_numbers - 1
  target = math.ceil(math.log10(n_numbers * (largest + 1)))
  return source, target


@pytest.mark.parametrize(
  'n_numbers, largest',
  list(itertools.product([1, 2, 3, 4], [1, 9, 10, 33, 999])),
)
def test_addition_widths_match_seed(n_numbers, largest):
  task = synthetic.addition(n_numbers=n_numbers, largest=largest)
  source_width, target_width = _seed_widths(n_numbers, largest)
  assert task.max_source_len == source_width
  assert task.max_target_len == target_width + 1  # EOS.


def test_addition_default_widths():
  task = synthetic.addition()
  assert (task.max_source_len, task.max_target_len) == (7, 5)
  assert task.vocab.alphabet == '0123456789+ '
  assert task.target('  1+999') == '1000'
  assert task.target(' 12+345') == ' 357'


@pytest.mark.parametrize(
  'n_numbers, largest', [(2, 999), (3, 999), (3, 50), (2, 10)]
)
def test_addition_examples_have_the_exact_format(n_numbers, largest):
  task = synthetic.addition(n_numbers=n_numbers, largest=largest, seed=4)
  source_width, target_width = _seed_widths(n_numbers, largest)
  examples = [task.train_example(i) for i in range(300)]
  examples += task.heldout_examples(2)
  for source, target in examples:
    assert len(source) == source_width and len(target) == target_width
    # Padding is on the left, with spaces only.
    core = source.lstrip(' ')
    assert source == core.rjust(source_width) and ' ' not in core
    numbers = [int(t) for t in core.split('+')]
    assert len(numbers) == n_numbers
    assert all(1 <= x <= largest for x in numbers)
    assert target == str(sum(numbers)).rjust(target_width)
    assert target.strip() == str(eval(core))
  # Short sums are padded, so the padding side is actually exercised.
  assert any(source.startswith(' ') for source, _ in examples)


def test_addition_questions_are_written_as_in_training():
  task = synthetic.addition()
  encode = task.vocab.encode
  assert task.prepare_source('123+456') == encode('123+456')
  assert task.prepare_source(' 7+8 ') == encode('    7+8')
  assert task.prepare_source('007+008') == encode('    7+8')
  # Longer than any training question, yet a question of this task.
  assert task.prepare_source('0000007+8') == encode('    7+8')
  assert task.prepare_source('0' * 5000 + '7+0') == encode('    7+0')
  assert task.prepare_source('00000+1') == encode('    0+1')
  for bad in ('1234+5', '7+8+9', '1 + 2', '+', '12+', '9' * 5000 + '+1'):
    with pytest.raises(ValueError, match='not a question of this addition'):
      task.prepare_source(bad)


def test_addition_draws_cover_the_range():
  task = synthetic.addition(n_numbers=2, largest=9)
  numbers = set()
  for i in range(500):
    numbers.update(int(t) for t in task.train_example(i)[0].split('+'))
  assert numbers == set(range(1, 10))


# --- Copy, reverse, sort. ---


@pytest.mark.parametrize(
  'name, expected',
  [
    ('copy', lambda s: s),
    ('reverse', lambda s: s[::-1]),
    ('sort', lambda s: ''.join(sorted(s))),
  ],
)
def test_string_tasks(name, expected):
  task = synthetic.make_task(name, min_len=3, max_len=8, seed=1)
  assert (task.max_source_len, task.max_target_len) == (8, 9)
  lengths = set()
  for source, target in [task.train_example(i) for i in range(400)]:
    assert target == expected(source)
    assert set(source) <= set('abcdefghijklmnopqrstuvwxyz')
    lengths.add(len(source))
  assert lengths == set(range(3, 9))


def test_sort_uses_alphabet_order():
  task = synthetic.sort(alphabet='zyx', min_len=5, max_len=5)
  assert task.target('xyzzx') == 'zzyxx'


# --- Determinism and the held-out set. ---


def test_stream_is_deterministic_and_seeded():
  def stream(task, **kwargs):
    return [task.train_example(i, **kwargs) for i in range(50)]

  first = stream(synthetic.addition(seed=0))
  assert first == stream(synthetic.addition(seed=0))
  assert first != stream(synthetic.addition(seed=1))
  assert first != stream(synthetic.addition(seed=0), stream_seed=1)
  copy = synthetic.copy(seed=7)
  assert stream(copy) == stream(synthetic.copy(seed=7))
  assert stream(copy) != stream(synthetic.copy(seed=8))


@pytest.mark.parametrize(
  'task', [synthetic.addition(), synthetic.copy(max_len=6)], ids=repr
)
def test_heldout_is_disjoint_from_training_and_distinct(task):
  heldout = task.heldout_examples(500)
  sources = [source for source, _ in heldout]
  assert len(set(sources)) == len(sources) == 500
  assert all(task.is_heldout(s) and task.target(s) == t for s, t in heldout)
  train = {task.train_example(i)[0] for i in range(20_000)}
  assert not train & set(sources)
  # Fixed: independent of the training seed, and prefix-stable.
  reseeded = dataclasses.replace(task, seed=9)
  assert reseeded.heldout_examples(500) == heldout
  assert task.heldout_examples(100) == heldout[:100]


def test_heldout_in_a_tiny_space_says_how_many_exist():
  task = synthetic.addition(n_numbers=2, largest=10)  # 100 sources.
  count = sum(map(task.is_heldout, task._all_sources()))
  assert len(task.heldout_examples(count)) == count
  with pytest.raises(ValueError, match=f'only {count} held-out'):
    task.heldout_examples(count + 1)
  small = synthetic.copy(alphabet='ab', min_len=1, max_len=3)
  with pytest.raises(ValueError, match='held-out examples'):
    small.heldout_examples(20)


# --- make_task and argument checks. ---


def test_make_task_registry():
  task = synthetic.make_task('addition', n_numbers=3, largest=99, seed=2)
  assert isinstance(task, synthetic.AdditionTask)
  assert (task.name, task.n_numbers, task.largest) == ('addition', 3, 99)
  for name in ['copy', 'reverse', 'sort']:
    assert synthetic.make_task(name).name == name
  with pytest.raises(ValueError, match='known tasks: addition, copy'):
    synthetic.make_task('multiply')
  with pytest.raises(ValueError, match='max_length'):
    synthetic.make_task('copy', max_length=3)


@pytest.mark.parametrize(
  'name, kwargs, field',
  [
    ('addition', {'largest': 0}, 'largest'),
    ('addition', {'n_numbers': 0}, 'n_numbers'),
    ('addition', {'largest': 9.5}, 'largest'),
    ('addition', {'seed': -1}, 'seed'),
    ('copy', {'min_len': 5, 'max_len': 3}, 'min_len'),
    ('reverse', {'min_len': 0}, 'min_len'),
    ('sort', {'alphabet': ''}, 'alphabet'),
    ('sort', {'alphabet': 'abca'}, 'alphabet'),
    ('copy', {'alphabet': 'ab\n'}, 'alphabet'),
  ],
)
def test_bad_arguments_name_the_field(name, kwargs, field):
  with pytest.raises(ValueError, match=field):
    synthetic.make_task(name, **kwargs)


# --- encode_batch. ---


def test_encode_batch_shapes_and_eos():
  task = synthetic.reverse(alphabet='abc', min_len=1, max_len=4)
  batch = synthetic.encode_batch(task, [('ab', 'ba'), ('cabc', 'cbac')])
  assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
  np.testing.assert_array_equal(
    batch['inputs'], [[3, 4, PAD_ID, PAD_ID], [5, 3, 4, 5]]
  )
  np.testing.assert_array_equal(
    batch['targets'],
    [[4, 3, EOS_ID, PAD_ID, PAD_ID], [5, 4, 3, 5, EOS_ID]],
  )
  assert task.vocab.decode(batch['targets'][0]) == 'ba'
  with pytest.raises(ValueError, match='max_source_len'):
    synthetic.encode_batch(task, [('abcab', 'bacba')])


# --- Pipelines. ---


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_train_dataset_batches():
  task = synthetic.addition(n_numbers=3)
  batches = _take(
    iter(pipeline.train_dataset(task, global_batch_size=6, seed=0)), 3
  )
  for batch in batches:
    assert set(batch) == {'inputs', 'targets'}
    assert batch['inputs'].shape == (6, task.max_source_len)
    assert batch['targets'].shape == (6, task.max_target_len)
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
    assert (batch['targets'][:, -1] == EOS_ID).all()  # Fixed-width sums.
  # Batch k holds examples k * B ... of the seed's stream.
  expected = [task.train_example(i) for i in range(6, 12)]
  _assert_batches_equal([batches[1]], [synthetic.encode_batch(task, expected)])


def test_train_dataset_is_deterministic_per_seed():
  task = synthetic.copy()
  make = lambda seed: iter(
    pipeline.train_dataset(task, global_batch_size=4, seed=seed)
  )
  first = _take(make(0), 3)
  _assert_batches_equal(first, _take(make(0), 3))
  with pytest.raises(AssertionError):
    _assert_batches_equal(first, _take(make(1), 3))


def test_iterator_state_round_trip():
  task = synthetic.sort()
  dataset = pipeline.train_dataset(task, global_batch_size=4, seed=5)
  iterator = iter(dataset)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 4)
  restored = iter(dataset)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 4), expected)


def test_seek_moves_to_just_after_that_many_batches():
  """What a resume on another process count does instead of restoring the
  iterator (see `checkpoints.restore`): it must land on the same batch."""
  task = synthetic.sort()
  dataset = pipeline.train_dataset(task, global_batch_size=4, seed=5)
  expected = _take(iter(dataset), 5)[3:]
  moved = iter(dataset)
  _take(moved, 1)
  pipeline.seek(moved, 3)
  _assert_batches_equal(_take(moved, 2), expected)


def test_iterator_state_round_trip_through_orbax(tmp_path):
  task = synthetic.addition()
  dataset = pipeline.train_dataset(task, global_batch_size=4, seed=2)
  iterator = iter(dataset)
  _take(iterator, 2)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(
      2,
      args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)),
    )
    manager.wait_until_finished()
  expected = _take(iterator, 3)
  restored = iter(dataset)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.restore(
      2,
      args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored)
      ),
    )
  _assert_batches_equal(_take(restored, 3), expected)


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_slices_make_up_the_global_batch(process_count):
  task = synthetic.reverse()
  single = _take(
    iter(pipeline.train_dataset(task, global_batch_size=8, seed=3)), 4
  )
  per_process = [
    _take(
      iter(
        pipeline.train_dataset(
          task,
          global_batch_size=8,
          seed=3,
          process_index=p,
          process_count=process_count,
        )
      ),
      4,
    )
    for p in range(process_count)
  ]
  for step, batch in enumerate(single):
    joined = {
      key: np.concatenate([parts[step][key] for parts in per_process])
      for key in batch
    }
    _assert_batches_equal([joined], [batch])


def test_bad_batch_split_raises():
  task = synthetic.copy()
  with pytest.raises(ValueError, match='multiple of 4'):
    pipeline.train_dataset(task, global_batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match='process_index'):
    pipeline.train_dataset(
      task, global_batch_size=6, seed=0, process_index=2, process_count=2
    )


def test_heldout_batches_are_padded_with_a_valid_mask():
  task = synthetic.copy()
  batches = pipeline.heldout_batches(task, n=10, batch_size=4)
  assert len(batches) == 3
  for batch in batches:
    assert batch['inputs'].shape == (4, task.max_source_len)
    assert batch['targets'].shape == (4, task.max_target_len)
    assert batch['valid'].dtype == np.bool_
  np.testing.assert_array_equal(batches[-1]['valid'], [1, 1, 0, 0])
  assert (batches[-1]['inputs'][2:] == PAD_ID).all()
  assert (batches[-1]['targets'][2:] == PAD_ID).all()
  assert all(batch['valid'].all() for batch in batches[:2])
  sources = [
    task.vocab.decode(row)
    for batch in batches
    for row, valid in zip(batch['inputs'], batch['valid'], strict=True)
    if valid
  ]
  assert sources == [s for s, _ in task.heldout_examples(10)]
