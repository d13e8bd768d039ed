"""`attnjax decode / evaluate / plot` on a tiny trained Multi30k Transformer."""

import json
import pathlib
import re
import sys

import pytest

from attnjax import cli, plotting, train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import multi30k_transformer  # noqa: E402

MULTI30K_DIR = ROOT.parent / 'shared' / 'data' / 'multi30k'
SOURCE = 'Zwei Hunde spielen im Schnee.'
# Far more than the tiny config's 48 source tokens.
LONG_SOURCE = ' '.join([SOURCE] * 20)
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'

pytestmark = pytest.mark.skipif(
  not MULTI30K_DIR.is_dir(), reason=f'no Multi30k files in {MULTI30K_DIR}'
)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """The tiny Transformer run (20 steps), as `train.py` would train it."""
  workdir = tmp_path_factory.mktemp('multi30k_transformer')
  config = multi30k_transformer.get_config('tiny')
  config.data.tfds_dir = str(tmp_path_factory.mktemp('tfds'))
  config.data.source_dir = str(MULTI30K_DIR)
  train_lib.train_and_evaluate(config, str(workdir))
  return str(workdir)


def _run(capsys, *argv) -> tuple[int, str, str]:
  code = cli.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_decode_prints_one_line(workdir, capsys):
  code, out, err = _run(
    capsys, 'decode', '--workdir', workdir, '--input', SOURCE
  )
  assert code == 0, err
  (line,) = out.splitlines()
  assert line.startswith(f'{SOURCE} -> ')


def test_decode_long_input_errors_unless_truncated(workdir, capsys):
  argv = ['decode', '--workdir', workdir, '--input', LONG_SOURCE]
  code, out, err = _run(capsys, *argv)
  assert code == 2 and out == ''
  assert err.startswith('attnjax decode: error: ')
  assert 'at most 48' in err and 'truncate' in err

  code, out, err = _run(capsys, *argv, '--long_input', 'truncate')
  assert code == 0, err
  (line,) = out.splitlines()
  assert line.startswith(f'{LONG_SOURCE} -> ')


def test_evaluate_test_split_prints_bleu(workdir, capsys):
  argv = ['evaluate', '--workdir', workdir, '--split', 'test']
  code, out, err = _run(capsys, *argv, '--num_examples', '8', '--show', '2')
  assert code == 0, err
  report, end = json.JSONDecoder().raw_decode(out)
  assert report['split'] == 'test'
  assert report['num_examples'] == 8
  for name in ('bleu', 'bleu_lowercase'):
    assert 0 <= report[name] <= 100
  assert report['perplexity'] > 1
  assert len(out[end:].strip().splitlines()) == 2  # the examples shown


def test_evaluate_defaults_to_the_set_scored_in_training(workdir, capsys):
  code, out, err = _run(capsys, 'evaluate', '--workdir', workdir)
  assert code == 0, err
  report, _ = json.JSONDecoder().raw_decode(out)
  assert report['split'] == 'validation'
  config = json.loads((pathlib.Path(workdir) / 'config.json').read_text())
  assert report['num_examples'] == config['data']['heldout_size'] == 16
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  *_, last = (json.loads(line) for line in lines if '"heldout"' in line)
  assert report['bleu'] == pytest.approx(last['bleu'], abs=1e-6)


def test_evaluate_unknown_split_errors(workdir, capsys):
  argv = ['evaluate', '--workdir', workdir, '--split', 'nope']
  code, out, err = _run(capsys, *argv)
  assert code == 2 and out == ''
  assert err.startswith('attnjax evaluate: error: ')
  assert "'nope'" in err and 'validation' in err and 'test' in err


def test_plot_layer_and_head_writes_a_png(workdir, tmp_path, capsys):
  out_path = tmp_path / 'attention.png'
  argv = ['plot', '--workdir', workdir, '--input', SOURCE]
  code, out, err = _run(
    capsys, *argv, '--layer', '0', '--head', '1', '--out', str(out_path)
  )
  assert code == 0, err
  assert out.splitlines() == [
    f'{SOURCE} -> {out.splitlines()[0].split(" -> ", 1)[1]}',
    f'wrote {out_path}',
  ]
  assert out_path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--layer', '1'], r'layer 1 is out of range.*1 decoder layer.*-1\.\.0'),
    (['--head', '2'], r'head 2 is out of range.*2 attention heads.*-2\.\.1'),
  ],
)
def test_plot_bad_layer_or_head_errors(
  workdir, tmp_path, capsys, flags, message
):
  out_path = tmp_path / 'attention.png'
  argv = [
    'plot',
    '--workdir',
    workdir,
    '--input',
    SOURCE,
    '--out',
    str(out_path),
  ]
  code, out, err = _run(capsys, *argv, *flags)
  assert code == 2 and out == ''
  assert re.search(message, err), err
  assert not out_path.exists()


def test_plot_labels_are_sentencepiece_pieces(workdir):
  exp, params = train_lib.load_trained(workdir)
  task = exp.task
  (amap,) = plotting.attention_maps(exp, params, [SOURCE], layer=0, head=1)
  source_ids = task.prepare_source(SOURCE)
  assert amap.source_labels == task.source_vocab.pieces(source_ids)
  assert amap.source_labels[0].startswith('\u2581')  # SentencePiece's '▁'
  assert amap.weights.shape == (len(amap.output_labels), len(source_ids))
  assert amap.attention == 'layer 0, head 1'


def test_plot_of_a_cut_input_is_titled_with_what_the_model_read(workdir):
  exp, params = train_lib.load_trained(workdir, long_input='truncate')
  task = exp.task
  (amap,) = plotting.attention_maps(exp, params, [LONG_SOURCE])
  kept = task.prepare_source(LONG_SOURCE)
  assert len(kept) == task.max_source_len == len(amap.source_labels)
  assert amap.source == task.decode_source(kept) + ' …'
  assert LONG_SOURCE.startswith(amap.source[: -len(' …')])
  (whole,) = plotting.attention_maps(exp, params, [SOURCE])
  assert whole.source == SOURCE
