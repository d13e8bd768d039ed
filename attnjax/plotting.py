"""Attention heatmaps of decoded outputs.

`attention_maps(exp, params, sources)` decodes raw source strings (greedy or
beam search) and returns, per source, the attention weights behind exactly
that output: at eval time a decoder step is a pure function of the prefix, so
the teacher-forced pass on (source, decoded tokens) repeats the search's steps
on its path, and its sown `intermediates/.../attention_weights` are the
weights each output token was produced with. An RNN decoder has one
attention, `[batch, target_len, source_len]`; a Transformer sows one per
attention module, and the map is the decoder's encoder-decoder
(cross-)attention of one layer (default: the last) and one head (default:
the mean over the heads). `plot_attention` draws one map: source tokens along
x, output tokens (up to and including EOS) along y; subword tokens are
labelled with their SentencePiece pieces, characters as themselves.

Figures are drawn on matplotlib's Agg canvas through `Figure` directly, not
pyplot: nothing needs a display and the global backend is left alone.
"""

import dataclasses
import functools
import pathlib
import re
import textwrap
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import font_manager, ft2font
from matplotlib.figure import Figure

from attnjax import decoding, train_lib
from attnjax.data import vocab as vocab_lib
from attnjax.models import seq2seq

Array = jax.Array

EOS_LABEL = '</s>'
# A space would be an invisible tick label; the addition task is full of them.
SPACE_LABEL = '\u2423'  # '␣'
DPI = 100
_CELL_INCHES = 0.4  # One weight's square.
_TITLE_CHARS_PER_INCH = 11  # Of the medium-size title font, about.
_TITLE_LINE_INCHES = 0.2
# Writing .pgf needs a LaTeX installation, which a plot should not.
_EXCLUDED_FORMATS = {'pgf'}
_WEIGHTS_NAME = 'attention_weights'


@dataclasses.dataclass(frozen=True)
class AttentionMap:
  """The attention weights of one decoded output.

  Attributes:
    source: the source string as the model read it: as given, or cut
      (ending ' …') when a translation task's `long_input='truncate'` cut it.
    output: the decoded text (EOS and padding removed).
    source_labels: one label per source token (the task's formatting, e.g.
      addition's left padding, included).
    output_labels: one label per output token, EOS (`EOS_LABEL`) included
      when the search produced it within the task's target length.
    weights: float32 `[len(output_labels), len(source_labels)]`; row t holds
      the weights output token t was predicted with.
    attention: which of the model's attentions `weights` are, e.g. 'layer 2,
      head 0' for a Transformer; '' for an RNN decoder's single one.
  """

  source: str
  output: str
  source_labels: list[str]
  output_labels: list[str]
  weights: np.ndarray
  attention: str = ''


# ---------------------------------------------------------------------------
# Weights.

# The Transformer's decoder layers are `decoder_layers_0`, `decoder_layers_1`,
# ...; the encoder-decoder attention of each is `cross_attention`.
_DECODER_LAYER = re.compile(r'decoder_layers_(\d+)')
_CROSS_ATTENTION = 'cross_attention'
MEAN = 'mean'  # The `head` that averages over the heads.


def find_attention_weights(intermediates: Any) -> Array | None:
  """The decoder's sown attention weights in the `intermediates` collection
  of a teacher-forced pass (None if the decoder records none).

  Returns:
    An RNN decoder's weights `[batch, target_len, source_len]`, or a
    Transformer's cross-attention weights of every decoder layer `[batch,
    layers, heads, target_len, source_len]` (its encoder and decoder
    self-attention weights are left out).

  Raises:
    ValueError: an RNN decoder sows weights under several names (which one
      to plot would be a guess).
  """
  layers, found = {}, []
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [getattr(k, 'key', None) for k in path]
    if _WEIGHTS_NAME not in keys:
      continue
    layer = [
      int(match[1])
      for k in keys
      if isinstance(k, str) and (match := _DECODER_LAYER.fullmatch(k))
    ]
    if layer:
      if _CROSS_ATTENTION in keys:
        layers[layer[0]] = leaf
    elif 'decoder' in keys:
      found.append((jax.tree_util.keystr(path), leaf))
  if layers:
    return jnp.stack([layers[i] for i in sorted(layers)], axis=1)
  if len(found) > 1:
    names = ', '.join(name for name, _ in found)
    raise ValueError(
      f'the decoder records several sets of attention weights ({names}); '
      'plotting supports one attention per decoder step.'
    )
  return found[0][1] if found else None


def teacher_forced_weights(
  model, params, inputs: Array, targets: Array
) -> Array | None:
  """`find_attention_weights` of the teacher-forced pass of `targets` (no
  dropout): None for a decoder without attention."""
  _, state = model.apply(
    {'params': params}, inputs, targets, train=False, mutable=['intermediates']
  )
  return find_attention_weights(state.get('intermediates', {}))


def select_weights(
  weights: Array, layer: int | None, head: int | None
) -> Array:
  """The map `[batch, target_len, source_len]` of `weights` (as
  `find_attention_weights` returns them): an RNN's as they are, else the
  Transformer's of decoder `layer` and `head` (None: the mean over heads)."""
  if weights.ndim == 3:
    return weights
  chex.assert_rank(weights, 5)
  weights = weights[:, layer]
  if head is None:
    return weights.mean(axis=1)
  return weights[:, head]


def check_records_weights(
  exp: train_lib.Experiment,
  *,
  layer: int | None = None,
  head: int | str = MEAN,
) -> tuple[int | None, int | None]:
  """Checks that `exp`'s model records attention weights and that `layer`
  and `head` choose one of its maps.

  Shapes only (`jax.eval_shape`): nothing is computed or compiled.

  Args:
    exp: the experiment.
    layer: a Transformer's decoder layer (negative counts from the end;
      None: the last). RNN decoders take only None.
    head: a head of that layer's cross-attention (negative counts from the
      end), or `MEAN` for the mean over the heads. RNN decoders take only
      `MEAN`.

  Returns:
    `(layer, head)` as `select_weights` takes them: non-negative indices
    (head None for the mean), or `(None, None)` for an RNN decoder.

  Raises:
    ValueError: no attention weights, or a layer or head the model lacks.
  """
  task = exp.task
  inputs = jax.ShapeDtypeStruct((1, task.max_source_len), jnp.int32)
  targets = jax.ShapeDtypeStruct((1, task.max_target_len), jnp.int32)
  params = exp.unboxed_abstract_state().params
  weights = jax.eval_shape(
    functools.partial(teacher_forced_weights, exp.model),
    params,
    inputs,
    targets,
  )
  name = train_lib.model_name(exp.config)
  if weights is None:
    attention = ' or '.join(seq2seq.ATTENTION_DECODERS)
    raise ValueError(
      f'the {name!r} decoder records no attention weights, so there is '
      f'nothing to plot. Train a model with attention (a Transformer, or an '
      f'RNN decoder with attention: {attention}), e.g. python train.py '
      '--config=configs/addition.py:bahdanau --workdir=...'
    )
  if len(weights.shape) == 3:
    if layer is not None or head != MEAN:
      raise ValueError(
        f'the {name!r} decoder has a single attention (no layers or heads): '
        'choosing a layer or head applies to Transformer models only; leave '
        '--layer and --head unset.'
      )
    return None, None
  num_layers, num_heads = weights.shape[1:3]
  if layer is None:
    layer = num_layers - 1
  elif not -num_layers <= layer < num_layers:
    raise ValueError(
      f'layer {layer} is out of range: the model has {num_layers} decoder '
      f'layer(s); give one of {-num_layers}..{num_layers - 1} (negative '
      'counts from the end).'
    )
  if head == MEAN:
    return layer % num_layers, None
  if isinstance(head, bool) or not isinstance(head, int):
    raise ValueError(f'head must be an integer or {MEAN!r}; got {head!r}.')
  if not -num_heads <= head < num_heads:
    raise ValueError(
      f'head {head} is out of range: the model has {num_heads} attention '
      f'heads; give one of {-num_heads}..{num_heads - 1} (negative counts '
      f'from the end), or {MEAN!r} for their mean.'
    )
  return layer % num_layers, head % num_heads


def describe(layer: int | None, head: int | None) -> str:
  """Names the map of `layer` and `head` (as `check_records_weights` returns
  them), e.g. 'layer 2, head 0'; '' for an RNN decoder's single one."""
  if layer is None:
    return ''
  return f'layer {layer}, ' + (
    'mean over heads' if head is None else f'head {head}'
  )


# The searches never emit PAD or BOS, but a source can hold any id, and
# labels are drawn for whatever a map is given.
_SPECIAL_LABELS = {
  vocab_lib.PAD_ID: '<pad>',
  vocab_lib.BOS_ID: '<s>',
  vocab_lib.EOS_ID: EOS_LABEL,
}


def token_labels(vocab, ids: Sequence[int]) -> list[str]:
  """One tick label per token id: special ids as `<pad>`, `<s>`,
  `EOS_LABEL`; a subword vocabulary's SentencePiece piece (e.g. '▁Hunde');
  a character vocabulary's character, spaces as `SPACE_LABEL`."""
  ids = [int(i) for i in ids]
  if hasattr(vocab, 'pieces'):
    pieces = vocab.pieces(ids) if ids else []
    return [
      _SPECIAL_LABELS.get(i, piece)
      for i, piece in zip(ids, pieces, strict=True)
    ]
  labels = []
  for i in ids:
    char = _SPECIAL_LABELS.get(i) or vocab.decode([i])
    labels.append(SPACE_LABEL if char == ' ' else char)
  return labels


def attention_maps(
  exp: train_lib.Experiment,
  params,
  sources: Sequence[str],
  *,
  beam_size: int = 1,
  alpha: float = 0.0,
  coverage_weight: float = 0.0,
  layer: int | None = None,
  head: int | str = MEAN,
) -> list[AttentionMap]:
  """The decoded outputs of `sources` and their attention weights.

  For a Transformer, the cross-attention of decoder `layer` (default the
  last; negative counts from the end) and `head` (default `MEAN`, the mean
  over the heads); RNN decoders have one attention and take neither.

  Raises:
    ValueError: the model records no weights, or has no such layer or head
      (checked before decoding), a bad source string, or bad search
      settings.
  """
  decoding.check_search(beam_size, alpha, coverage_weight)
  layer, head = check_records_weights(exp, layer=layer, head=head)
  task, model = exp.task, exp.model
  inputs = train_lib.source_batch(task, sources)

  def run(params, inputs):
    tokens = train_lib.search(
      model,
      params,
      inputs,
      max_len=task.max_target_len,
      beam_size=beam_size,
      alpha=alpha,
      coverage_weight=coverage_weight,
    )
    weights = teacher_forced_weights(model, params, inputs, tokens)
    return tokens, select_weights(weights, layer, head)

  tokens, weights = jax.device_get(jax.jit(run)(params, jnp.asarray(inputs)))
  maps = []
  for row, source in enumerate(sources):
    source_ids = inputs[row][inputs[row] != vocab_lib.PAD_ID].tolist()
    output_ids = tokens[row].tolist()
    if vocab_lib.EOS_ID in output_ids:
      output_ids = output_ids[: output_ids.index(vocab_lib.EOS_ID) + 1]
    maps.append(
      AttentionMap(
        source=task.source_as_read(source),
        output=task.target_vocab.decode(tokens[row]),
        source_labels=token_labels(task.source_vocab, source_ids),
        output_labels=token_labels(task.target_vocab, output_ids),
        weights=np.asarray(
          weights[row, : len(output_ids), : len(source_ids)], np.float32
        ),
        attention=describe(layer, head),
      )
    )
  return maps


# ---------------------------------------------------------------------------
# Drawing.


def check_output_path(path) -> pathlib.Path:
  """`path` as a Path if an image can be written there, else ValueError.

  Checked before any model is loaded, so a typo fails at once.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    raise ValueError(
      f'{path} is a directory; give an image file name, e.g. '
      f'{path / "attention.png"}.'
    )
  if not path.parent.is_dir():
    raise ValueError(
      f'the directory {path.parent} of {path} does not exist; create it or '
      'write the plot elsewhere.'
    )
  formats = sorted(
    set(Figure().canvas.get_supported_filetypes()) - _EXCLUDED_FORMATS
  )
  if path.suffix.lower().lstrip('.') not in formats:
    raise ValueError(
      f'{path} needs an image format suffix matplotlib writes: '
      f'{", ".join("." + f for f in formats)} (e.g. {path.stem}.png).'
    )
  return path


def output_paths(path, count: int) -> list[pathlib.Path]:
  """Where `count` plots go: `path` itself for one, else `path` with `_0`,
  `_1`, ... before the suffix (`attention.png` -> `attention_0.png`)."""
  path = pathlib.Path(path)
  if count == 1:
    return [path]
  return [path.with_name(f'{path.stem}_{i}{path.suffix}') for i in range(count)]


def figure_size(
  rows: int, cols: int, title_lines: int = 1
) -> tuple[float, float]:
  """(width, height) in inches of the plot of a `[rows, cols]` map: square
  cells plus room for labels, a title of `title_lines` lines and the
  colorbar."""
  width = max(4.0, 2.5 + _CELL_INCHES * cols)
  height = max(2.5, 1.6 + _CELL_INCHES * rows)
  return width, height + _TITLE_LINE_INCHES * max(title_lines - 1, 0)


@functools.cache
def _characters(font_path: str) -> frozenset[int]:
  return frozenset(ft2font.FT2Font(font_path).get_charmap())


def font_families(generic: str, texts: Iterable[str]) -> tuple[list[str], str]:
  """`generic` ('monospace', 'sans-serif') followed by the installed fonts
  that have the characters of `texts` it lacks (e.g. Chinese), for
  matplotlib's per-character fallback; and the characters no installed font
  has, which are drawn as boxes."""
  primary = font_manager.FontProperties(family=[generic])
  missing = {ord(c) for text in texts for c in text if c.isprintable()}
  missing -= _characters(font_manager.findfont(primary))
  families = [generic]
  for font in font_manager.fontManager.ttflist:
    if not missing:
      break
    # Last Resort draws a placeholder box for every character.
    if font.name in families or font.name.startswith('Last Resort'):
      continue
    if found := missing & _characters(font.fname):
      families.append(font.name)
      missing -= found
  return families, ''.join(sorted(map(chr, missing)))


def _warn_missing(characters: str) -> None:
  if characters:
    more = ' and more' if len(characters) > 10 else ''
    warnings.warn(
      f'no installed font has the characters {characters[:10]!r}{more}; '
      'they are drawn as boxes. Install a font that has them (for Chinese, '
      "e.g. Debian's fonts-noto-cjk) and delete matplotlib's font cache.",
      stacklevel=3,
    )


def plot_attention(
  weights: np.ndarray,
  source_labels: Sequence[str],
  output_labels: Sequence[str],
  path,
  title: str | None = None,
) -> pathlib.Path:
  """Draws `weights` `[len(output_labels), len(source_labels)]` as a heatmap
  (source tokens along x, output tokens along y, colours 0..1) and writes it
  to `path`, whose suffix picks the format (.png, .pdf, .svg, ...).

  Returns:
    `path`, as a `pathlib.Path`.
  """
  weights = np.asarray(weights, np.float32)
  shape = (len(output_labels), len(source_labels))
  if weights.shape != shape:
    raise ValueError(
      f'weights have shape {weights.shape}; with {shape[0]} output and '
      f'{shape[1]} source labels they must be {shape}.'
    )
  path = check_output_path(path)
  width, _ = figure_size(*shape)
  # Wrapped to the figure's width: a sentence's title is wider than its map.
  lines = textwrap.wrap(title or '', int(width * _TITLE_CHARS_PER_INCH))
  fig = Figure(
    figsize=figure_size(*shape, len(lines)), dpi=DPI, layout='constrained'
  )
  ax = fig.add_subplot()
  image = ax.imshow(weights, cmap='viridis', vmin=0.0, vmax=1.0)
  label_fonts, missing = font_families(
    'monospace', [*source_labels, *output_labels]
  )
  mono = {'fontfamily': label_fonts}
  # Subword pieces side by side would run into each other.
  rotation = 90 if any(len(label) > 1 for label in source_labels) else 0
  ax.set_xticks(range(shape[1]), list(source_labels), rotation=rotation, **mono)
  ax.set_yticks(range(shape[0]), list(output_labels), **mono)
  ax.set_xlabel('source')
  ax.set_ylabel('output')
  fig.colorbar(image, ax=ax, label='attention weight', shrink=0.9)
  if lines:
    title_fonts, title_missing = font_families('sans-serif', lines)
    missing = ''.join(sorted(set(missing + title_missing)))
    ax.set_title('\n'.join(lines), fontsize='medium', fontfamily=title_fonts)
  _warn_missing(missing)
  with warnings.catch_warnings():
    # Reported once above, not once per character.
    warnings.filterwarnings('ignore', 'Glyph .* missing from font')
    fig.savefig(path, dpi=DPI)
  return path


def plot_maps(
  maps: Sequence[AttentionMap], path, *, decoder: str = ''
) -> list[pathlib.Path]:
  """Writes one plot per map (see `output_paths` for the file names),
  titled with `decoder` (the model's name), the map's `attention` and the
  source and output."""
  paths = output_paths(path, len(maps))
  for amap, out in zip(maps, paths, strict=True):
    title = f'{amap.source!r} -> {amap.output!r}'
    prefix = ', '.join(filter(None, [decoder, amap.attention]))
    plot_attention(
      amap.weights,
      amap.source_labels,
      amap.output_labels,
      out,
      title=f'{prefix}: {title}' if prefix else title,
    )
  return paths
