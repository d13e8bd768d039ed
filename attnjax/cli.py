"""`attnjax` command line: reuse a trained workdir.

  attnjax decode --workdir DIR --input "123+456" [--input ...] [--plot PATH]
  attnjax evaluate --workdir DIR [--split test] [--num_examples N]
  attnjax plot --workdir DIR --input "123+456" [--input ...] --out PATH

All take --beam_size K (1, the default, is greedy search) and --alpha A
(the GNMT length-penalty exponent of beam search).

`plot` (and `decode --plot`) draws the attention weights of the decoded
output, source tokens along x and output tokens (EOS as </s>, spaces as ␣)
along y, for a model with an attention decoder (bahdanau, luong). The suffix
of PATH picks the format (.png, .pdf, .svg, ...); with several --input values
each gets its own image, PATH with _0, _1, ... before the suffix
(attention.png -> attention_0.png, attention_1.png).

All read the config saved in DIR and its latest checkpoint, on whatever
devices are present (also `python -m attnjax ...`).
"""

import argparse
import json
import logging
import sys

SPLITS = ('test',)


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
    help='also write attention heatmaps there (see above)',
  )
  _search_flags(decode)

  evaluate = commands.add_parser('evaluate', help='print held-out metrics')
  evaluate.add_argument('--workdir', required=True, help='a trained workdir')
  evaluate.add_argument(
    '--split',
    default='test',
    choices=SPLITS,
    help='synthetic tasks have one held-out split, test',
  )
  evaluate.add_argument(
    '--num_examples',
    type=int,
    default=None,
    help="default: the config's data.heldout_size",
  )
  evaluate.add_argument(
    '--show', type=int, default=5, help='example predictions to print'
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
    help='the image file, e.g. attention.png (see above)',
  )
  _search_flags(plot)
  return parser


def _source_flags(parser: argparse.ArgumentParser, input_help: str) -> None:
  parser.add_argument('--workdir', required=True, help='a trained workdir')
  parser.add_argument(
    '--input', action='append', required=True, help=input_help
  )


def _search_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    '--beam_size', type=int, default=1, help='beam width; 1 is greedy search'
  )
  parser.add_argument(
    '--alpha',
    type=float,
    default=0.0,
    help='length penalty ((5 + len) / 6) ** alpha; 0 turns it off',
  )


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  # Imported late so that `attnjax --help` is instant.
  from attnjax import train_lib
  from attnjax.training import checkpoints

  checkpoints.quiet_orbax_logs(logging.ERROR)

  try:
    plot_path = getattr(args, 'out' if args.command == 'plot' else 'plot', None)
    if plot_path is not None:
      from attnjax import plotting  # matplotlib, only when asked for

      # Before the slow model load, so that a typo fails at once.
      plotting.check_output_path(plot_path)
    exp, params = train_lib.load_trained(args.workdir)
    search = dict(beam_size=args.beam_size, alpha=args.alpha)
    if plot_path is not None:
      # Decodes once: the printed outputs are the plotted ones.
      maps = plotting.attention_maps(exp, params, args.input, **search)
      paths = plotting.plot_maps(
        maps, plot_path, decoder=exp.config.model.decoder
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
      if args.num_examples is not None and args.num_examples < 1:
        raise ValueError('--num_examples must be >= 1.')
      result = train_lib.evaluate(
        exp,
        params,
        num_examples=args.num_examples,
        show=args.show,
        beam_size=args.beam_size,
        alpha=args.alpha,
      )
      examples = result.pop('examples', [])
      print(json.dumps({'split': args.split, **result}, indent=2))
      for source, target, predicted in examples:
        mark = 'ok ' if predicted == target else 'BAD'
        print(f'{mark} {source!r} -> {predicted!r} (target {target!r})')
  # OSError: FileNotFoundError and an unwritable plot path.
  except (ValueError, OSError) as e:
    print(f'attnjax {args.command}: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
