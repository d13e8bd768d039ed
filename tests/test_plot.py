"""Attention heatmaps: the plotted weights, the drawing and the CLI."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from matplotlib import colormaps

from attnjax import cli, plotting, train_lib
from attnjax.data import synthetic
from attnjax.data import vocab as vocab_lib
from attnjax.training import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import addition, translation  # noqa: E402

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# Different lengths, so that source masks and output lengths differ per row.
SOURCES = ['1+2', '12+34', '99+9']


@pytest.fixture(scope='module')
def bahdanau_workdir(tmp_path_factory):
  """The tiny bahdanau run (20 steps), as `train.py` would train it."""
  workdir = tmp_path_factory.mktemp('bahdanau')
  config = addition.get_config('bahdanau,tiny')
  train_lib.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope='module')
def bahdanau(bahdanau_workdir):
  return train_lib.load_trained(bahdanau_workdir)


@pytest.fixture(scope='module')
def cho_workdir(tmp_path_factory):
  """A cho workdir as train.py leaves it, but with the initial parameters:
  its errors need no training, and compiling a train step costs ~20 s."""
  workdir = tmp_path_factory.mktemp('cho')
  config = addition.get_config('cho,tiny')
  exp = train_lib.Experiment.create(config)
  mngr = checkpoints.manager(workdir)
  checkpoints.save(mngr, 0, exp.init_state(jax.random.key(0)), None)
  mngr.wait_until_finished()
  mngr.close()
  train_lib.save_config(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def transformer():
  """An untrained Transformer (2 decoder layers of 2 heads) on addition:
  which weights are plotted needs no training."""
  config = addition.get_config('tiny')
  config.model = translation.transformer_config()
  config.model.update(
    d_model=16,
    num_heads=2,
    num_encoder_layers=1,
    num_decoder_layers=2,
    mlp_dim=32,
    dropout_rate=0.0,
  )
  exp = train_lib.Experiment.create(config)
  return exp, exp.init_state(jax.random.key(1)).params


def _read_png(path: pathlib.Path) -> np.ndarray:
  assert path.stat().st_size > 0
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  return matplotlib.image.imread(path)


def _expected_pixels(rows: int, cols: int) -> tuple[int, int]:
  width, height = plotting.figure_size(rows, cols)
  return round(height * plotting.DPI), round(width * plotting.DPI)


# ---------------------------------------------------------------------------
# The weights.


@pytest.mark.parametrize('beam_size', [1, 2])
def test_weights_are_the_teacher_forced_weights_of_the_decoded_output(
  bahdanau, beam_size
):
  exp, params = bahdanau
  task, model = exp.task, exp.model
  maps = plotting.attention_maps(exp, params, SOURCES, beam_size=beam_size)

  # Independently: search, then the teacher-forced pass on its tokens.
  inputs = jnp.asarray(train_lib.source_batch(task, SOURCES))
  search = functools.partial(
    train_lib.search,
    model,
    max_len=task.max_target_len,
    beam_size=beam_size,
  )
  tokens = np.asarray(jax.jit(search)(params, inputs))
  _, state = model.apply(
    {'params': params}, inputs, tokens, train=False, mutable=['intermediates']
  )
  (sown,) = state['intermediates']['decoder']['attention']['attention_weights']
  sown = np.asarray(sown)
  assert sown.shape == (len(SOURCES), task.max_target_len, task.max_source_len)

  for row, (source, amap) in enumerate(zip(SOURCES, maps, strict=True)):
    source_ids = task.prepare_source(source)
    output_ids = tokens[row].tolist()
    if vocab_lib.EOS_ID in output_ids:
      output_ids = output_ids[: output_ids.index(vocab_lib.EOS_ID) + 1]
    assert amap.source == source
    assert amap.output == task.vocab.decode(tokens[row])
    assert amap.weights.shape == (len(output_ids), len(source_ids))
    assert amap.source_labels == plotting.token_labels(task.vocab, source_ids)
    assert amap.output_labels == plotting.token_labels(task.vocab, output_ids)
    np.testing.assert_array_equal(
      amap.weights, sown[row, : len(output_ids), : len(source_ids)]
    )
    # Soft attention: every plotted row is a distribution over the source,
    # and the padding beyond it gets nothing.
    np.testing.assert_allclose(amap.weights.sum(-1), 1.0, atol=1e-5)
    assert np.all(sown[row, :, len(source_ids) :] == 0)


@pytest.mark.parametrize(
  'layer, head, expected',
  [(None, 'mean', (1, None)), (0, 1, (0, 1)), (-2, -2, (0, 0))],
)
def test_transformer_weights_are_the_chosen_cross_attention(
  transformer, layer, head, expected
):
  exp, params = transformer
  task, model = exp.task, exp.model
  maps = plotting.attention_maps(exp, params, SOURCES, layer=layer, head=head)

  # Independently: greedy search, then the teacher-forced pass on its tokens.
  inputs = jnp.asarray(train_lib.source_batch(task, SOURCES))
  search = functools.partial(
    train_lib.search, model, max_len=task.max_target_len
  )
  tokens = np.asarray(jax.jit(search)(params, inputs))
  _, state = model.apply(
    {'params': params}, inputs, tokens, train=False, mutable=['intermediates']
  )
  expected_layer, expected_head = expected
  sown = state['intermediates'][f'decoder_layers_{expected_layer}']
  (cross,) = sown['cross_attention']['attention_weights']
  cross = np.asarray(cross)  # [batch, heads, target_len, source_len]
  assert cross.shape == (
    len(SOURCES),
    2,
    task.max_target_len,
    task.max_source_len,
  )
  # The heads differ, so picking the wrong one would show.
  assert np.abs(cross[:, 0] - cross[:, 1]).max() > 1e-4
  want = cross.mean(1) if expected_head is None else cross[:, expected_head]
  which = (
    'mean over heads' if expected_head is None else f'head {expected_head}'
  )

  for row, (source, amap) in enumerate(zip(SOURCES, maps, strict=True)):
    source_ids = task.prepare_source(source)
    output_ids = tokens[row].tolist()
    if vocab_lib.EOS_ID in output_ids:
      output_ids = output_ids[: output_ids.index(vocab_lib.EOS_ID) + 1]
    assert amap.output == task.vocab.decode(tokens[row])
    assert amap.attention == f'layer {expected_layer}, {which}'
    assert amap.weights.shape == (len(output_ids), len(source_ids))
    assert amap.source_labels == plotting.token_labels(task.vocab, source_ids)
    np.testing.assert_allclose(
      amap.weights,
      want[row, : len(output_ids), : len(source_ids)],
      rtol=1e-5,
      atol=1e-6,
    )
    np.testing.assert_allclose(amap.weights.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(layer=2), r'layer 2 is out of range.*2 decoder.*-2\.\.1'),
    (dict(layer=-3), r'layer -3 is out of range'),
    (dict(head=2), r'head 2 is out of range.*2 attention heads.*-2\.\.1'),
    (dict(layer=0, head=-3), r'head -3 is out of range.*or \'mean\''),
    (dict(head='first'), r"head must be an integer or 'mean'"),
  ],
)
def test_transformer_bad_layer_or_head_is_refused_before_decoding(
  transformer, kwargs, message
):
  exp, _ = transformer
  with pytest.raises(ValueError, match=message):
    plotting.attention_maps(exp, None, SOURCES, **kwargs)  # no parameters


@pytest.mark.parametrize(
  'kwargs', [dict(layer=0), dict(layer=-1), dict(head=0)]
)
def test_rnn_refuses_layer_and_head(kwargs):
  exp = train_lib.Experiment.create(addition.get_config('bahdanau,tiny'))
  with pytest.raises(ValueError, match=r"'bahdanau' decoder has a single"):
    plotting.attention_maps(exp, None, SOURCES, **kwargs)


def test_find_attention_weights():
  def sown(value):
    return {'attention_weights': (np.full((1, 2, 3, 4), value),)}

  # A Transformer: decoder cross-attention only, layers in numeric order.
  intermediates = {
    f'decoder_layers_{i}': {
      'cross_attention': sown(i),
      'self_attention': sown(-1),
    }
    for i in (0, 2, 10)
  }
  intermediates['encoder_layers_0'] = {'self_attention': sown(-1)}
  weights = plotting.find_attention_weights(intermediates)
  assert weights.shape == (1, 3, 2, 3, 4)
  assert weights[0, :, 0, 0, 0].tolist() == [0, 2, 10]
  np.testing.assert_array_equal(
    plotting.select_weights(weights, 1, None), np.full((1, 3, 4), 2)
  )
  # An RNN decoder: one set of weights, else which to plot is a guess.
  rnn = np.ones((1, 3, 4))
  one = {'decoder': {'attention': {'attention_weights': (rnn,)}}}
  assert plotting.find_attention_weights(one) is rnn
  assert plotting.find_attention_weights({'encoder': {}}) is None
  two = {
    'decoder': {
      'a': one['decoder']['attention'],
      'b': {**one['decoder']['attention']},
    }
  }
  with pytest.raises(ValueError, match='several sets of attention weights'):
    plotting.find_attention_weights(two)


def test_token_labels_show_pieces_of_subword_vocabularies():
  class Pieces:  # The part of SubwordVocab that labels read.
    def pieces(self, ids):
      return [f'\u2581p{i}' for i in ids]

  ids = [5, 7, vocab_lib.EOS_ID, vocab_lib.PAD_ID]
  assert plotting.token_labels(Pieces(), ids) == [
    '\u2581p5',
    '\u2581p7',
    plotting.EOS_LABEL,
    '<pad>',
  ]


def test_token_labels_show_spaces_and_specials():
  vocab = vocab_lib.CharVocab(synthetic.ADDITION_ALPHABET)
  ids = vocab.encode(' 1+2') + [vocab_lib.EOS_ID, vocab_lib.PAD_ID]
  assert plotting.token_labels(vocab, ids) == [
    plotting.SPACE_LABEL,
    '1',
    '+',
    '2',
    plotting.EOS_LABEL,
    '<pad>',
  ]


def test_a_model_without_attention_is_refused_before_decoding():
  config = addition.get_config('sutskever,tiny')
  exp = train_lib.Experiment.create(config)
  with pytest.raises(ValueError, match=r"'sutskever' decoder records no"):
    plotting.check_records_weights(exp)
  # Never gets to the parameters.
  with pytest.raises(ValueError, match=r'bahdanau or luong'):
    plotting.attention_maps(exp, None, SOURCES)


# ---------------------------------------------------------------------------
# Drawing.


@pytest.mark.parametrize('shape', [(3, 12), (12, 3)])
def test_plot_attention_writes_a_heatmap(tmp_path, shape):
  rows, cols = shape
  weights = np.zeros(shape, np.float32)
  weights[np.arange(rows), np.arange(rows) % cols] = 1.0  # one-hot rows
  path = plotting.plot_attention(
    weights,
    [f's{j}' for j in range(cols)],
    [f'o{i}' for i in range(rows)],
    tmp_path / 'map.png',
    title='a title',
  )
  assert path == tmp_path / 'map.png'
  image = _read_png(path)
  assert image.shape[:2] == _expected_pixels(rows, cols)
  height, width = image.shape[:2]
  assert (width > height) == (cols > rows)
  # A weight of 1 is drawn in the colour map's top colour.
  top = np.asarray(colormaps['viridis'](1.0)[:3])
  assert np.any(np.all(np.abs(image[..., :3] - top) < 0.02, axis=-1))
  assert np.any(image[..., :3] < 0.5)  # tick labels and text


def test_plot_attention_refuses_bad_arguments(tmp_path):
  weights = np.full((2, 3), 1 / 3, np.float32)
  labels = (['a', 'b', 'c'], ['x', 'y'])
  with pytest.raises(ValueError, match=r'must be \(2, 2\)'):
    plotting.plot_attention(weights, ['a', 'b'], labels[1], tmp_path / 'a.png')
  with pytest.raises(ValueError, match='does not exist'):
    plotting.plot_attention(weights, *labels, tmp_path / 'missing' / 'a.png')
  with pytest.raises(ValueError, match='is a directory'):
    plotting.plot_attention(weights, *labels, tmp_path)
  with pytest.raises(ValueError, match=r'format suffix.*\.png'):
    plotting.plot_attention(weights, *labels, tmp_path / 'a.txt')
  with pytest.raises(ValueError, match='format suffix'):
    plotting.plot_attention(weights, *labels, tmp_path / 'attention')
  # matplotlib lists .pgf, but writing it needs LaTeX.
  with pytest.raises(ValueError, match='format suffix'):
    plotting.plot_attention(weights, *labels, tmp_path / 'a.pgf')
  assert not list(tmp_path.iterdir())


def test_long_titles_wrap_and_the_figure_grows(tmp_path):
  weights = np.full((2, 3), 1 / 3, np.float32)
  title = ' '.join(['a long sentence'] * 12)
  path = plotting.plot_attention(
    weights, ['▁Zwei', '▁Hunde', '.'], ['x', 'y'], tmp_path / 'a.png', title
  )
  height, width = _read_png(path).shape[:2]
  lines = 180 // int(4.0 * 11) + 1  # 4-inch figure, 11 characters per inch
  assert (height, width) == (
    round((2.5 + 0.2 * (lines - 1)) * plotting.DPI),
    4 * plotting.DPI,
  )


def test_characters_no_font_has_are_named_once(tmp_path):
  """One warning for the characters no installed font draws (here a rare
  script's), instead of matplotlib's one per character and text."""
  rare = '\U00011a00\U00011a01'  # Zanabazar Square
  families, missing = plotting.font_families('monospace', ['ab' + rare])
  if not missing:
    pytest.skip(f'an installed font has Zanabazar Square: {families}')
  assert missing == rare and families == ['monospace']
  weights = np.full((2, 2), 0.5, np.float32)
  with pytest.warns(UserWarning) as record:
    plotting.plot_attention(
      weights, list(rare), ['x', 'y'], tmp_path / 'a.png', title=rare
    )
  assert len(record) == 1
  expected = f'no installed font has the characters {rare!r}; '
  assert str(record[0].message).startswith(expected)


def test_output_paths():
  assert plotting.output_paths('a/b.png', 1) == [pathlib.Path('a/b.png')]
  assert plotting.output_paths('a/b.png', 2) == [
    pathlib.Path('a/b_0.png'),
    pathlib.Path('a/b_1.png'),
  ]


# ---------------------------------------------------------------------------
# The command line.


def test_cli_plot_writes_the_decoded_outputs_heatmap(
  bahdanau_workdir, bahdanau, tmp_path, capsys
):
  out = tmp_path / 'attention.png'
  argv = ['plot', '--workdir', str(bahdanau_workdir), '--input', '12+34']
  assert cli.main([*argv, '--out', str(out)]) == 0
  assert f'wrote {out}' in capsys.readouterr().out
  (amap,) = plotting.attention_maps(*bahdanau, ['12+34'])
  image = _read_png(out)
  assert image.shape[:2] == _expected_pixels(*amap.weights.shape)
  assert np.ptp(image[..., :3]) > 0.5  # not a blank canvas
  assert list(tmp_path.iterdir()) == [out]


def test_cli_decode_plot_writes_one_image_per_input(
  bahdanau_workdir, bahdanau, tmp_path, capsys
):
  out = tmp_path / 'attention.png'
  argv = ['decode', '--workdir', str(bahdanau_workdir), '--beam_size', '2']
  for source in SOURCES:
    argv += ['--input', source]
  assert cli.main([*argv, '--plot', str(out)]) == 0
  captured = capsys.readouterr()
  outputs = train_lib.decode(*bahdanau, SOURCES, beam_size=2)
  assert captured.out.splitlines() == [
    f'{s} -> {o}' for s, o in zip(SOURCES, outputs, strict=True)
  ]
  written = sorted(tmp_path.iterdir())
  assert written == [tmp_path / f'attention_{i}.png' for i in range(3)]
  for path in written:
    assert f'wrote {path}' in captured.err
    _read_png(path)


@pytest.mark.parametrize('command', ['plot', 'decode'])
def test_cli_plot_on_a_model_without_attention_fails(
  cho_workdir, tmp_path, capsys, command
):
  out = str(tmp_path / 'attention.png')
  flag = '--out' if command == 'plot' else '--plot'
  argv = [command, '--workdir', str(cho_workdir), '--input', '1+2', flag, out]
  assert cli.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.startswith(f'attnjax {command}: error: ')
  assert "'cho' decoder records no attention weights" in captured.err
  assert 'bahdanau or luong' in captured.err
  assert not list(tmp_path.iterdir())


def test_cli_plot_checks_the_output_path_first(tmp_path, capsys):
  # The workdir does not exist either: the path is checked before loading.
  out = tmp_path / 'missing' / 'attention.png'
  argv = ['plot', '--workdir', str(tmp_path / 'nowhere'), '--input', '1+2']
  assert cli.main([*argv, '--out', str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith('attnjax plot: error: the directory ')
  assert 'does not exist' in err


def test_cli_plot_refuses_a_layer_for_an_rnn(
  bahdanau_workdir, tmp_path, capsys
):
  out = tmp_path / 'attention.png'
  argv = ['plot', '--workdir', str(bahdanau_workdir), '--input', '1+2']
  assert cli.main([*argv, '--layer', '0', '--out', str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith('attnjax plot: error: ')
  assert "'bahdanau' decoder has a single attention" in err
  assert not out.exists()


def test_cli_decode_layer_needs_plot(tmp_path, capsys):
  argv = ['decode', '--workdir', str(tmp_path / 'nowhere'), '--input', '1+2']
  assert cli.main([*argv, '--head', '0']) == 2
  err = capsys.readouterr().err
  assert err.startswith('attnjax decode: error: --layer and --head choose')
