"""`attnjax` command line: reuse a trained workdir.

  attnjax decode --workdir DIR --input "123+456" [--input ...] [--plot PATH]
      [--long_input {error,truncate}] [--layer L] [--head H]
  attnjax evaluate --workdir DIR [--split SPLIT] [--num_examples N] [--show K]
  attnjax plot --workdir DIR --input "Zwei Hunde spielen im Schnee." --out PATH
      [--long_input {error,truncate}] [--layer L] [--head H]

All take --beam_size K (1, the default, is greedy search), and for beam
search --alpha A (the GNMT length-penalty exponent) and --coverage_weight B
(GNMT's coverage penalty: B times the sum over source tokens of
log(min(attention received, 1)); models with attention only).

`evaluate` prints the held-out metrics as JSON (loss, perplexity, token
accuracy and the task's scores: exact_match for the synthetic tasks, bleu and
bleu_lowercase (sacreBLEU) for translation), then --show example outputs.
--split is one of the task's held-out splits: test for the synthetic tasks,
validation or test for translation; the default is the one scored during
training (validation for translation).

--long_input (translation only) says what to do with an input longer than
the model reads: error (the default) or truncate it, with a warning.

`plot` (and `decode --plot`) draws the attention weights of the decoded
output, source tokens along x and output tokens (EOS as </s>) along y:
characters (spaces as ␣) for the synthetic tasks, SentencePiece pieces for
translation. A Transformer has several maps: --layer picks the decoder layer
whose encoder-decoder attention is drawn (default the last; negative counts
from the end) and --head one of its heads (default mean, the average over the
heads). An RNN decoder with attention (bahdanau, luong) has one map and
takes neither. The suffix of PATH picks the format (.png, .pdf, .svg, ...);
with several --input values each gets its own image, PATH with _0, _1, ...
before the suffix (attention.png -> attention_0.png, attention_1.png).

All read the config saved in DIR and its latest checkpoint, on whatever
devices are present (also `python -m attnjax ...`).
"""

import argparse
import json
import logging
import sys

LONG_INPUT = ('error', 'truncate')
MEAN_HEAD = 'mean'


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='attnjax',
    description=__doc__,
    formatter_class=argparse.RawTextHelpFormatter,
  )
  commands = parser.add_subparsers(dest='command', required=True)

  decode = commands.add_parser('decode', help="print the model's output")
  _source_flags(decode, 'a source string; repeat for several')
  decode.add_argument(
    '--plot',
    metavar='PATH',
    default=None,
    help='also write attention heatmaps there (see attnjax --help)',
  )
  _plot_flags(decode)
  _search_flags(decode)

  evaluate = commands.add_parser('evaluate', help='print held-out metrics')
  evaluate.add_argument('--workdir', required=True, help='a trained workdir')
  evaluate.add_argument(
    '--split',
    default=None,
    help="one of the task's held-out splits: test (synthetic tasks), "
    'validation or test (translation); default: the split scored during '
    'training',
  )
  evaluate.add_argument(
    '--num_examples',
    type=_at_least(1),
    default=None,
    help="default: the config's data.heldout_size (the set scored during "
    'training); a translation split named by --split is read whole',
  )
  evaluate.add_argument(
    '--show',
    type=_at_least(0),
    default=5,
    help='example predictions to print',
  )
  _search_flags(evaluate)

  plot = commands.add_parser(
    'plot', help='draw the attention weights of the decoded output'
  )
  _source_flags(plot, 'a source string; repeat for several (one image each)')
  plot.add_argument(
    '--out',
    metavar='PATH',
    required=True,
    help='the image file, e.g. attention.png (see attnjax --help)',
  )
  _plot_flags(plot)
  _search_flags(plot)
  return parser


def _source_flags(parser: argparse.ArgumentParser, input_help: str) -> None:
  parser.add_argument('--workdir', required=True, help='a trained workdir')
  parser.add_argument(
    '--input', action='append', required=True, help=input_help
  )
  parser.add_argument(
    '--long_input',
    choices=LONG_INPUT,
    default=None,
    help='translation: an input longer than the model reads is an error '
    '(default) or is truncated',
  )


def _at_least(minimum: int):
  """An argparse type: an integer >= `minimum`."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < minimum:
      raise argparse.ArgumentTypeError(
        f'must be an integer >= {minimum}; got {text!r}'
      )
    return value

  return parse


def _head(text: str) -> int | str:
  if text == MEAN_HEAD:
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
      f'must be an integer or {MEAN_HEAD!r}; got {text!r}'
    ) from None


def _plot_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    '--layer',
    type=int,
    default=None,
    help='Transformer: the decoder layer whose cross-attention is plotted '
    '(default: the last; negative counts from the end)',
  )
  parser.add_argument(
    '--head',
    type=_head,
    default=MEAN_HEAD,
    help='Transformer: the attention head to plot, or mean (the default) '
    'for the average over the heads',
  )


def _search_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    '--beam_size', type=int, default=1, help='beam width; 1 is greedy search'
  )
  parser.add_argument(
    '--alpha',
    type=float,
    default=0.0,
    help='length penalty ((5 + len) / 6) ** alpha of beam search '
    '(--beam_size > 1); 0 turns it off',
  )
  parser.add_argument(
    '--coverage_weight',
    type=float,
    default=0.0,
    help="weight of beam search's coverage penalty, which favours outputs "
    'whose attention covers every source token (--beam_size > 1; a model '
    'with attention); 0 turns it off',
  )


def _default_split(task) -> str:
  """The split `Experiment.heldout` scores when given none."""
  return 'validation' if 'validation' in task.splits else 'test'


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  # Imported late so that `attnjax --help` is instant.
  from attnjax import decoding, train_lib
  from attnjax.training import checkpoints

  checkpoints.quiet_orbax_logs(logging.ERROR)

  try:
    plot_path = getattr(args, 'out' if args.command == 'plot' else 'plot', None)
    if plot_path is not None:
      from attnjax import plotting  # matplotlib, only when asked for

      # Before the slow model load, so that a typo fails at once.
      plotting.check_output_path(plot_path)
    elif args.command == 'decode' and (
      args.layer is not None or args.head != MEAN_HEAD
    ):
      raise ValueError('--layer and --head choose what --plot draws; add it.')
    search = dict(
      beam_size=args.beam_size,
      alpha=args.alpha,
      coverage_weight=args.coverage_weight,
    )
    decoding.check_search(**search)  # Also before the model load.
    exp, params = train_lib.load_trained(
      args.workdir, long_input=getattr(args, 'long_input', None)
    )
    if plot_path is not None:
      # Decodes once: the printed outputs are the plotted ones.
      maps = plotting.attention_maps(
        exp, params, args.input, layer=args.layer, head=args.head, **search
      )
      paths = plotting.plot_maps(
        maps, plot_path, decoder=train_lib.model_name(exp.config)
      )
      for amap, path in zip(maps, paths, strict=True):
        print(f'{amap.source} -> {amap.output}')
        # decode's stdout stays one line per input.
        where = sys.stdout if args.command == 'plot' else sys.stderr
        print(f'wrote {path}', file=where)
    elif args.command == 'decode':
      outputs = train_lib.decode(exp, params, args.input, **search)
      for source, output in zip(args.input, outputs, strict=True):
        print(f'{source} -> {output}')
    else:
      _evaluate(exp, params, args, search)
  # OSError: FileNotFoundError and an unwritable plot path.
  except (ValueError, OSError) as e:
    print(f'attnjax {args.command}: error: {e}', file=sys.stderr)
    return 2
  return 0


def _evaluate(exp, params, args: argparse.Namespace, search) -> None:
  from attnjax import train_lib
  from attnjax.data import synthetic

  # Without --split, the set scored during training.
  try:
    result = train_lib.evaluate(
      exp,
      params,
      split=args.split,
      num_examples=args.num_examples,
      show=args.show,
      **search,
    )
  except synthetic.HeldoutTooLarge as e:
    if args.num_examples is None:  # The config's heldout_size: it says so.
      raise
    raise ValueError(f'--num_examples={args.num_examples}: {e}') from None
  examples = result.pop('examples', [])
  split = args.split or _default_split(exp.task)
  print(json.dumps({'split': split, **result}, indent=2))
  exact = 'exact_match' in exp.task.SCORES
  for source, reference, predicted in examples:
    if exact:
      mark = 'ok ' if predicted == reference else 'BAD'
      print(f'{mark} {source!r} -> {predicted!r} (target {reference!r})')
    else:
      print(f'{source!r} -> {predicted!r} (reference {reference!r})')


if __name__ == '__main__':
  sys.exit(main())
