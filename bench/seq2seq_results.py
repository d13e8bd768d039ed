"""Trains model variants on a synthetic task and prints a results table.

  python bench/seq2seq_results.py --task=addition
  python bench/seq2seq_results.py --task=reverse \\
      --variants=sutskever,cho,bahdanau,luong_general --steps=3000
  python bench/seq2seq_results.py --task=copy --variants=monotonic \\
      --heatmap=monotonic --input=abcdefghijklmnopqrstuvwxyz

Each variant (see `configs/base.py` VARIANTS) trains from scratch with
`configs/<task>.py:<variant>` in `<workdir_root>/<task>/<variant>`; the table
gives the held-out exact match on the config's held-out set (its
`data.heldout_size`: 10,000 for addition, 2,000 for reverse and copy) and
the wall-clock time of the whole run (compilation and evaluations
included). Rows are appended to `<workdir_root>/<task>/results.jsonl` as
they finish; the table lists the latest row of every variant in that file, so
an interrupted sweep can be finished by running the remaining variants.

With --heatmap, the named variant's attention for --input is drawn to
`<workdir_root>/<task>/<variant>.png`.
"""

import importlib
import json
import logging
import pathlib
import shutil
import sys
import time

from absl import app, flags

# configs/*.py import `configs.base`; make the repository root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from attnjax import train_lib  # noqa: E402
from attnjax.models import seq2seq  # noqa: E402
from attnjax.training import checkpoints  # noqa: E402
from configs import base  # noqa: E402

_TASK = flags.DEFINE_enum(
  'task', 'addition', ['addition', 'reverse', 'copy'], 'configs/<task>.py.'
)
_VARIANTS = flags.DEFINE_list(
  'variants', list(base.VARIANTS), 'Variants to train, in table order.'
)
_STEPS = flags.DEFINE_integer(
  'steps',
  0,
  'Training steps of every variant (0: the config default).',
  lower_bound=0,
)
_ROOT = flags.DEFINE_string(
  'workdir_root', '/tmp/attnjax-results', 'Where the runs are written.'
)
_HEATMAP = flags.DEFINE_string(
  'heatmap', '', 'A variant whose attention on --input is plotted.'
)
_INPUT = flags.DEFINE_string('input', '', 'The source of the heatmap.')


def _describe(name: str) -> str:
  """The variant's decoder, with the score and alignment it resolves to
  (e.g. 'bahdanau normed_additive, monotonic')."""
  fields = base.VARIANTS[name]
  config = seq2seq.Seq2SeqConfig(
    source_vocab_size=4, target_vocab_size=4, max_source_len=64, **fields
  )
  parts = [config.decoder]
  if config.decoder in seq2seq.ATTENTION_DECODERS:
    parts.append(config.attention_score)
    if config.alignment != 'soft':
      parts[-1] += f', {config.alignment}'
  if config.reverse_source:
    parts.append('(reversed source)')
  return ' '.join(parts)


def _config(name: str):
  return importlib.import_module(f'configs.{_TASK.value}').get_config(name)


def _check_heatmap(root: pathlib.Path) -> None:
  """Refuses, before any training, a --heatmap that could not be drawn."""
  name = _HEATMAP.value
  if name not in base.VARIANTS:
    raise app.UsageError(
      f'--heatmap={name} is not a variant; known: {", ".join(base.VARIANTS)}.'
    )
  if not _INPUT.value:
    raise app.UsageError('--heatmap needs --input, the source to plot.')
  if base.VARIANTS[name]['decoder'] not in seq2seq.ATTENTION_DECODERS:
    raise app.UsageError(
      f'--heatmap={name}: its decoder has no attention to draw.'
    )
  if name not in _VARIANTS.value and not (root / name).is_dir():
    raise app.UsageError(
      f'--heatmap={name} is neither in --variants nor trained in {root}.'
    )
  try:
    train_lib.make_task(_config(name)).prepare_source(_INPUT.value)
  except ValueError as e:
    raise app.UsageError(f'--input={_INPUT.value!r}: {e}') from None


def _run(name: str, root: pathlib.Path) -> dict:
  config = _config(name)
  if _STEPS.value:
    config.num_train_steps = _STEPS.value
    config.eval_every_steps = config.checkpoint_every_steps = _STEPS.value
  workdir = root / name
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.perf_counter()
  result = train_lib.train_and_evaluate(config, str(workdir))
  seconds = time.perf_counter() - start
  return {
    'variant': name,
    'model': _describe(name),
    'steps': config.num_train_steps,
    'exact_match': result['exact_match'],
    'token_accuracy': result['token_accuracy'],
    'num_examples': result['num_examples'],
    'seconds': seconds,
  }


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  checkpoints.quiet_orbax_logs(logging.ERROR)
  unknown = sorted(set(_VARIANTS.value) - set(base.VARIANTS))
  if unknown:
    raise app.UsageError(
      f'unknown variants {unknown}; known: {", ".join(base.VARIANTS)}.'
    )
  root = pathlib.Path(_ROOT.value) / _TASK.value
  if _HEATMAP.value:
    _check_heatmap(root)
  root.mkdir(parents=True, exist_ok=True)
  results = root / 'results.jsonl'
  with open(results, 'a') as log:
    for name in _VARIANTS.value:
      row = _run(name, root)
      log.write(json.dumps(row) + '\n')
      log.flush()
      print(
        f'{name}: exact match {row["exact_match"]:.2%} in '
        f'{row["seconds"]:.0f} s',
        flush=True,
      )
  # The latest row of every variant measured so far, also in earlier runs.
  latest = {}
  for line in results.read_text().splitlines():
    row = json.loads(line)
    latest[row['variant']] = row
  rows = [latest[name] for name in base.VARIANTS if name in latest]
  if not rows:
    raise app.UsageError(f'no variant trained yet in {root}: give --variants.')
  examples = rows[0]['num_examples']
  print(f'\n{_TASK.value}, held-out exact match on {examples} examples')
  print('\n| variant | model | steps | exact match | token acc | time |')
  print('|---|---|---|---|---|---|')
  for row in rows:
    minutes, seconds = divmod(round(row['seconds']), 60)
    print(
      f'| {row["variant"]} | {row["model"]} | {row["steps"]} | '
      f'{row["exact_match"]:.2%} | {row["token_accuracy"]:.4f} | '
      f'{minutes}:{seconds:02d} |'
    )
  if _HEATMAP.value:
    from attnjax import plotting

    exp, params = train_lib.load_trained(root / _HEATMAP.value)
    maps = plotting.attention_maps(exp, params, [_INPUT.value])
    (path,) = plotting.plot_maps(
      maps,
      root / f'{_HEATMAP.value}.png',
      decoder=f'{_TASK.value} {_HEATMAP.value}',
    )
    print(f'\nheatmap of {maps[0].source!r} -> {maps[0].output!r}: {path}')


if __name__ == '__main__':
  app.run(main)
