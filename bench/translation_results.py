"""BLEU of trained translation workdirs, greedy and beam search, as a table.

  python bench/translation_results.py \\
      --workdirs=workdirs/multi30k_transformer,workdirs/multi30k_bahdanau \\
      [--split=test] [--beams=1,4] [--alpha=0.6] [--coverage_weights=0,0.2]
      [--show=4] [--num_examples=N] [--input=SENTENCE ...]

For each workdir (trained by `train.py`) and each beam size, decodes the
whole split and prints sacreBLEU corpus BLEU on cased, detokenised text
(`bleu`) and on lowercased text (`bleu_lc`; both 13a-tokenised, or 'zh' for
Chinese), the teacher-forced perplexity, the decoding time, and the training
time and steps read from the run's `metrics.jsonl` (the sum of its logged
windows: it includes any time the run waited for the CPU). `--input`
sentences are decoded by every model with the largest of --beams, without
the coverage penalty.
`--num_examples` scores only the first N sentences of the split. Each beam
size above 1 is run with each of `--coverage_weights` (GNMT's coverage
penalty; 0 turns it off), side by side.
"""

import json
import math
import pathlib
import time

import jax
from absl import app, flags

from attnjax import train_lib
from attnjax.data import parallel
from attnjax.models import seq2seq
from attnjax.training import checkpoints

_WORKDIRS = flags.DEFINE_list('workdirs', [], 'Trained workdirs.')
_SPLIT = flags.DEFINE_enum(
  'split', 'test', ['validation', 'test'], 'The split to score.'
)
_BEAMS = flags.DEFINE_list('beams', ['1', '4'], 'Beam sizes (1 = greedy).')
_ALPHA = flags.DEFINE_float('alpha', 0.6, 'Length penalty of beam search.')
_COVERAGE = flags.DEFINE_list(
  'coverage_weights', ['0'], 'Coverage penalty weights of beam search.'
)
_INPUTS = flags.DEFINE_multi_string('input', [], 'Sentences to translate.')
_SHOW = flags.DEFINE_integer(
  'show', 0, 'Example translations per model.', lower_bound=0
)
_NUM = flags.DEFINE_integer(
  'num_examples', 0, 'First N sentences (0: all).', lower_bound=0
)


def _valid_beams(values: list[str]) -> bool:
  try:
    return bool(values) and all(int(b) >= 1 for b in values)
  except ValueError:
    return False


flags.register_validator(
  'beams', _valid_beams, 'give integers >= 1 (1 = greedy), e.g. --beams=1,4.'
)
flags.register_validator(
  'alpha',
  lambda alpha: math.isfinite(alpha) and alpha >= 0,
  'give a finite number >= 0 (0 turns the length penalty off).',
)


def _valid_weights(values: list[str]) -> bool:
  try:
    return bool(values) and all(
      math.isfinite(float(w)) and float(w) >= 0 for w in values
    )
  except ValueError:
    return False


flags.register_validator(
  'coverage_weights',
  _valid_weights,
  'give finite numbers >= 0 (0 turns the coverage penalty off), e.g. '
  '--coverage_weights=0,0.2.',
)


def _searches(beams: list[int], alpha: float, weights: list[float]):
  """(beam_size, alpha, coverage_weight) of every row: greedy search once,
  each larger beam with each coverage weight."""
  for beam in beams:
    if beam == 1:
      yield 1, 0.0, 0.0
    else:
      yield from ((beam, alpha, w) for w in weights)


def _check_workdirs(workdirs: list[pathlib.Path], coverage: bool) -> None:
  """Refuses, before decoding anything, a workdir that is not a trained
  translation run, or (`coverage`) whose model has no attention."""
  for workdir in workdirs:
    try:
      config = train_lib.load_config(workdir)
    except (FileNotFoundError, ValueError) as e:
      raise app.UsageError(f'--workdirs: {e}') from None
    task, name = config.data.task, train_lib.model_name(config)
    if task not in parallel.TASKS:
      raise app.UsageError(
        f'--workdirs: {workdir} trained the {task} task; this script scores '
        f'translation runs ({", ".join(parallel.TASKS)}).'
      )
    if coverage and name not in ('transformer', *seq2seq.ATTENTION_DECODERS):
      raise app.UsageError(
        f'--coverage_weights: the coverage penalty needs attention, and the '
        f'{name!r} decoder of {workdir} has none; give --coverage_weights=0.'
      )


def _training_time(workdir: pathlib.Path) -> tuple[int, float]:
  """(last step, seconds of training) from the logged steps/s windows."""
  rows = [
    json.loads(line)
    for line in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  train = [r for r in rows if r['split'] == 'train']
  seconds, previous = 0.0, 0
  for row in train:
    seconds += (row['step'] - previous) / max(row['steps_per_s'], 1e-9)
    previous = row['step']
  return previous, seconds


def main(argv):
  del argv
  checkpoints.quiet_orbax_logs()
  if not _WORKDIRS.value:
    raise app.UsageError('give --workdirs=DIR[,DIR...]')
  workdirs = [pathlib.Path(w) for w in _WORKDIRS.value]
  beams = [int(b) for b in _BEAMS.value]
  weights = [float(w) for w in _COVERAGE.value]
  _check_workdirs(workdirs, coverage=max(beams) > 1 and max(weights) > 0)
  rows, examples = [], []
  for workdir in workdirs:
    try:
      exp, params = train_lib.load_trained(workdir)
    except FileNotFoundError as e:  # No checkpoint yet.
      raise app.UsageError(f'--workdirs: {e}') from None
    steps, seconds = _training_time(workdir)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    for beam, alpha, weight in _searches(beams, _ALPHA.value, weights):
      start = time.perf_counter()
      result = train_lib.evaluate(
        exp,
        params,
        split=_SPLIT.value,
        num_examples=_NUM.value or None,
        beam_size=beam,
        alpha=alpha,
        coverage_weight=weight,
        show=_SHOW.value,
      )
      rows.append(
        (
          workdir.name,
          f'{n_params / 1e6:.{1 if n_params >= 1e6 else 3}f}M',
          str(result['num_examples']),
          f'{steps} ({seconds / 60:.0f} min)',
          str(beam),
          f'{weight:g}',
          f'{result["bleu"]:.2f}',
          f'{result["bleu_lowercase"]:.2f}',
          f'{result["perplexity"]:.2f}',
          f'{time.perf_counter() - start:.0f} s',
        )
      )
      examples += [
        (f'{workdir.name} beam {beam} coverage {weight:g}', *e)
        for e in result.get('examples', [])
      ]
    if _INPUTS.value:
      beam = max(beams)
      alpha = _ALPHA.value if beam > 1 else 0.0
      outputs = train_lib.decode(
        exp, params, _INPUTS.value, beam_size=beam, alpha=alpha
      )
      for source, output in zip(_INPUTS.value, outputs, strict=True):
        print(f'{workdir.name} (beam {beam}): {source} -> {output}')
  print(f'\n{_SPLIT.value} split; alpha {_ALPHA.value}\n')
  header = (
    'workdir',
    'params',
    'sentences',
    'train steps (time)',
    'beam',
    'coverage',
    'bleu',
    'bleu_lc',
    'ppl',
    'decode',
  )
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for row in rows:
    print('| ' + ' | '.join(row) + ' |')
  for name, source, reference, output in examples:
    print(f'{name}: {source!r} -> {output!r} (ref {reference!r})')


if __name__ == '__main__':
  app.run(main)
