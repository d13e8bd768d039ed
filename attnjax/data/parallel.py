"""Translation tasks on real parallel text: subword vocabularies, a bucketed
Grain training pipeline, held-out sets and BLEU.

`TranslationTask.create(data_config, workdir)` reads the training split of a
dataset of `attnjax.data.translation` (multi30k de->en, anki en->fr, anki
en->zh, or your own corpus: parallel_text, `languages[0] -> languages[1]`),
trains SentencePiece vocabularies on it the first time (joint or
one per language) and saves them in `workdir/vocab/`; a later run, and every
reuse of the workdir, loads them from there.

Training pipeline (`train_dataset`). The tokenised training pairs are
grouped by length into a few buckets; every batch comes from one bucket and
is padded to its length, so the train step sees at most `len(buckets)`
static shapes. A bucket with fewer pairs than one batch would never fill
one, so its pairs join the next longer bucket (the last such bucket joins
the one before it, whose batches then take the last bucket's shape). Epoch
`e` shuffles each bucket with the seed `(seed, e)`, cuts it into full batches
(the remainder, fewer than a batch per bucket, sits this epoch out;
different pairs every epoch) and shuffles the order of all batches. Every
epoch has the same number of batches, so global batch `k` is a pure
function of `k`: as for the synthetic tasks, the dataset is a
`grain.MapDataset` over step indices, its iterator's state is the next index
(checkpointed with the model), and process `p` reads rows
`p * local ... (p + 1) * local` of every global batch.

Pairs longer than the model's maximum lengths are left out of training with
a logged count. A held-out source that is too long is truncated with a
logged count (its reference stays whole, so the score shows the loss); an
input given to `prepare_source` (e.g. `attnjax decode`) raises or is
truncated with a warning, as `long_input` says.
"""

import dataclasses
import json
import logging
import os
import pathlib
import re
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import sacrebleu

from attnjax.data import pipeline, tokenizer
from attnjax.data import translation as translation_lib
from attnjax.data.vocab import EOS_ID, PAD_ID

# attnjax task name -> (tfds name, {'validation': split, 'test': split}).
TASKS = {
  'multi30k': ('multi30k', {'validation': 'validation', 'test': 'test_2016'}),
  'anki_fra': ('anki/fra-eng', {'validation': 'validation', 'test': 'test'}),
  'anki_cmn': ('anki/cmn-eng', {'validation': 'validation', 'test': 'test'}),
  # Your own corpus; config.data.languages names its files.
  'parallel_text': (
    'parallel_text',
    {'validation': 'validation', 'test': 'test'},
  ),
}
LONG_INPUT = ('error', 'truncate')
VOCAB_DIR = 'vocab'
# What the vocabularies were trained with, beside them in VOCAB_DIR.
_VOCAB_PARAMS = 'params.json'
_NUM_STEPS = 2**62  # An infinite stream of step indices.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)
_log = logging.getLogger(__name__)


def _on_process_0(prepare, what: str) -> None:
  """Runs `prepare()` on process 0 while the other processes wait.

  Every process learns whether it succeeded: process 0 re-raises its error,
  the others raise one pointing at process 0's log, instead of waiting at a
  barrier process 0 never reaches.
  """
  import jax  # Only to agree across processes.
  from jax.experimental import multihost_utils

  if jax.process_count() > 1:
    # All processes meet here first: the first collective of a run connects
    # them (Gloo on CPU) and gives up after 30 s, so it must not be the one
    # that waits for minutes of process 0's work.
    multihost_utils.broadcast_one_to_all(np.int32(0))
  error = None
  if jax.process_index() == 0:
    try:
      prepare()
    except Exception as e:  # Re-raised below, after telling the others.
      error = e
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is None and bool(failed):
      raise RuntimeError(
        f'process 0 failed to {what}; its log shows why. Fix that and '
        'restart every process.'
      )
  if error is not None:
    raise error


@dataclasses.dataclass(frozen=True, kw_only=True)
class TranslationData:
  """`config.data` of a translation run (see configs/translation.py).

  Attributes:
    task: a name in `TASKS`.
    reverse: translate the other way (multi30k en->de, anki fr->en, ...).
    source_dir: folder with the raw files ('' = `$ATTNJAX_DATA_DIR`, and for
      multi30k a download when that is unset too; parallel_text requires
      it).
    languages: for parallel_text (and only there), the (source, target)
      language codes, which name its files: ('de', 'en') reads train.de,
      train.en, ... A single 'de,en' string (as `--config.data.languages=
      de,en` gives) is split by `from_config`.
    tfds_dir: where TFDS writes the prepared splits ('' = TFDS's default,
      and for parallel_text `WORKDIR/tfds`: a corpus is the user's own, so
      two runs' corpora must not meet in one shared folder).
    train_split: a TFDS split expression, e.g. 'train' or 'train[:2000]'.
    vocab_size: ids per SentencePiece vocabulary, special ids included.
    joint_vocab: one vocabulary for both languages, else one each.
    vocab_model_type: 'unigram' or 'bpe'.
    character_coverage: SentencePiece's character coverage.
    max_source_len: most source tokens of a training pair (and the input
      width of the model).
    max_target_len: most target tokens of a training pair, EOS included
      (and the longest decoded output).
    buckets: increasing lengths; a training pair goes to the first bucket
      that fits both sides, and its batch is padded to that length (capped
      by the maxima above). The last bucket's batches are padded to the
      maxima, and take the pairs longer than every bucket. A bucket with
      fewer pairs than a batch is merged into its neighbour (logged).
    long_input: what `prepare_source` does with an over-long input: 'error'
      or 'truncate' (with a warning).
    on_bad_utf8, on_bad_line: 'error' or 'skip' (with a logged count) for
      raw lines that are not UTF-8 / not 2- or 3-column (anki).
    seed: the shuffling seed.
    heldout_size: validation pairs scored during training (at most all).
    bleu_tokenize: sacreBLEU's tokeniser for both BLEU scores: '' picks
      'zh' for a Chinese target and '13a' otherwise; or one of
      `sacrebleu.BLEU.TOKENIZERS`, e.g. 'char' for Japanese or Thai, whose
      words are not separated by spaces either.
  """

  task: str
  reverse: bool = False
  source_dir: str = ''
  languages: tuple[str, ...] = ()
  tfds_dir: str = ''
  train_split: str = 'train'
  vocab_size: int = 8000
  joint_vocab: bool = True
  vocab_model_type: str = 'unigram'
  character_coverage: float = 1.0
  max_source_len: int = 64
  max_target_len: int = 64
  buckets: tuple[int, ...] = (16, 24, 32, 64)
  long_input: str = 'error'
  on_bad_utf8: str = 'error'
  on_bad_line: str = 'error'
  seed: int = 0
  heldout_size: int = 100_000
  bleu_tokenize: str = ''

  def __post_init__(self):
    def need(ok: bool, field: str, requirement: str) -> None:
      if not ok:
        raise ValueError(
          f'config.data.{field}={getattr(self, field)!r} is invalid: it must '
          f'be {requirement}. Fix it in the config file or with '
          f'--config.data.{field}=...'
        )

    need(self.task in TASKS, 'task', f'one of {", ".join(TASKS)}')
    if self.task == 'parallel_text':
      need(
        translation_lib.valid_languages(self.languages),
        'languages',
        "two different language codes for task parallel_text, e.g. ('de', "
        "'en') or --config.data.languages=de,en (letters, digits, '-' or "
        "'_'; they name the files train.de, train.en, ...)",
      )
      layout = translation_lib.parallel_text_layout(self.languages)
      need(
        bool(self.source_dir),
        'source_dir',
        f'the folder of your corpus for task parallel_text, holding {layout}',
      )
    else:
      need(
        not self.languages,
        'languages',
        f'() for task {self.task}, whose languages are fixed (only '
        'parallel_text takes languages; reverse translates the other way)',
      )
    for field in ('max_source_len', 'max_target_len', 'heldout_size'):
      need(_is_int(getattr(self, field), 1), field, 'an integer >= 1')
    need(_is_int(self.seed, 0), 'seed', 'an integer >= 0')
    need(
      _is_int(self.vocab_size, tokenizer.NUM_SPECIAL + 2),
      'vocab_size',
      f'an integer >= {tokenizer.NUM_SPECIAL + 2}',
    )
    need(
      self.vocab_model_type in tokenizer.MODEL_TYPES,
      'vocab_model_type',
      f'one of {tokenizer.MODEL_TYPES}',
    )
    need(0 < self.character_coverage <= 1, 'character_coverage', 'in (0, 1]')
    need(
      len(self.buckets) > 0
      and all(_is_int(b, 2) for b in self.buckets)
      and list(self.buckets) == sorted(set(self.buckets)),
      'buckets',
      'a non-empty, strictly increasing tuple of lengths >= 2',
    )
    need(self.long_input in LONG_INPUT, 'long_input', f'one of {LONG_INPUT}')
    for field in ('on_bad_utf8', 'on_bad_line'):
      need(
        getattr(self, field) in ('error', 'skip'), field, "'error' or 'skip'"
      )
    for field in ('reverse', 'joint_vocab'):
      need(isinstance(getattr(self, field), bool), field, 'True or False')
    need(
      self.bleu_tokenize in ('', *sacrebleu.BLEU.TOKENIZERS),
      'bleu_tokenize',
      "'' (by the target language) or one of sacreBLEU's tokenisers: "
      f'{", ".join(sacrebleu.BLEU.TOKENIZERS)}',
    )

  @classmethod
  def from_config(cls, data) -> 'TranslationData':
    """From `config.data` (a ConfigDict or dict); unknown fields raise."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(data)
    if unknown := sorted(set(values) - fields):
      raise ValueError(
        f'config.data has fields a translation task does not take: '
        f'{unknown}. Known: {", ".join(sorted(fields))}.'
      )
    if 'buckets' in values:
      values['buckets'] = tuple(values['buckets'])
    if 'languages' in values:
      values['languages'] = split_codes(values['languages'])
    return cls(**values)

  @property
  def max_len(self) -> int:
    return max(self.max_source_len, self.max_target_len)


def split_codes(languages: Any) -> Any:
  """('de', 'en') from 'de,en' or ('de,en',): ml_collections reads
  `--config.data.languages=de,en` as one string in a tuple. Anything but
  strings passes through unchanged, for `TranslationData` to refuse."""
  if isinstance(languages, str):
    languages = (languages,)
  if not isinstance(languages, Sequence) or not all(
    isinstance(code, str) for code in languages
  ):
    return languages
  return tuple(
    code.strip() for item in languages for code in item.split(',') if item
  )


def _is_int(value: Any, minimum: int) -> bool:
  return (
    isinstance(value, int | np.integer)
    and not isinstance(value, bool)
    and value >= minimum
  )


def target_language(data: TranslationData) -> str:
  """The target's language code ('en', 'zh', ...)."""
  if data.task == 'parallel_text':
    return data.languages[0 if data.reverse else 1]
  dataset = TASKS[data.task][0]
  return translation_lib.directions(dataset, data.reverse)[1]


def _is_chinese(code: str) -> bool:
  """'zh', 'zh-Hans', 'zh_TW', 'cmn': text without spaces between words,
  which 13a would score as one token per sentence."""
  return re.split('[-_]', code, maxsplit=1)[0].lower() in ('zh', 'cmn')


def bleu_tokenizer(data: TranslationData) -> str:
  """The sacreBLEU tokeniser of `data`'s scores (see `bleu_tokenize`).

  Raises:
    ValueError: a tokeniser that cannot run here (e.g. 'ja-mecab' without
      its extra packages, or 'flores101' without network to fetch its
      model), so that it fails before training rather than at the first
      evaluation.
  """
  if not data.bleu_tokenize:
    return 'zh' if _is_chinese(target_language(data)) else '13a'
  try:
    sacrebleu.BLEU(tokenize=data.bleu_tokenize)
  except Exception as e:  # sacrebleu raises RuntimeError, OSError, ...
    why = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip('.')
    raise ValueError(
      f'config.data.bleu_tokenize={data.bleu_tokenize!r} cannot run here: '
      f"{why}. Install what it needs, or choose another tokeniser ('char' "
      'needs nothing).'
    ) from e
  return data.bleu_tokenize


def bleu(
  hypotheses: Sequence[str],
  references: Sequence[str],
  *,
  tokenize: str = '13a',
) -> dict[str, float]:
  """sacreBLEU corpus BLEU: 'bleu' on cased, detokenised text (sacreBLEU's
  standard) and 'bleu_lowercase' on lowercased text; both tokenised by
  `tokenize` (sacreBLEU's 13a by default, 'zh' for Chinese)."""
  hypotheses, references = list(hypotheses), [list(references)]
  cased = sacrebleu.corpus_bleu(hypotheses, references, tokenize=tokenize)
  lower = sacrebleu.corpus_bleu(
    hypotheses, references, tokenize=tokenize, lowercase=True
  )
  return {'bleu': cased.score, 'bleu_lowercase': lower.score}


class TranslationTask:
  """A translation dataset with its vocabularies; see the module docstring.

  Attributes:
    data: the data config.
    name: the task name, e.g. 'multi30k'.
    source_vocab, target_vocab: `SubwordVocab`s (the same one when joint).
    vocab: the target vocabulary (what decoded outputs are read with).
    max_source_len, max_target_len: the model's input width and the longest
      decoded output, EOS included.
    tfds_dir: where TFDS prepares the dataset (None: TFDS's default); see
      `TranslationData.tfds_dir`.
  """

  # The names of the scores `score` returns.
  SCORES = ('bleu', 'bleu_lowercase')

  def __init__(
    self,
    data: TranslationData,
    vocab_dir: str | os.PathLike,
    *,
    train_vocab: bool = True,
  ):
    self.data = data
    self.name = data.task
    self.dataset, self.splits = TASKS[data.task]
    self._bleu_tokenize = bleu_tokenizer(data)
    self.max_source_len = data.max_source_len
    self.max_target_len = data.max_target_len
    self.vocab_dir = pathlib.Path(vocab_dir)
    # vocab_dir is WORKDIR/vocab (see `create`): a corpus of one's own is
    # prepared beside it.
    self.tfds_dir = data.tfds_dir or None
    if self.tfds_dir is None and data.task == 'parallel_text':
      self.tfds_dir = str(self.vocab_dir.parent / 'tfds')
    self._train: tuple[list[np.ndarray], list[np.ndarray]] | None = None
    if train_vocab:
      self._build_dataset()
    self.source_vocab, self.target_vocab = self._vocabs(train_vocab)
    self.vocab = self.target_vocab

  @classmethod
  def create(
    cls, data_config, workdir: str | os.PathLike, *, train_vocab: bool = True
  ):
    """The task of `config.data`, with its vocabularies in `workdir/vocab`
    (trained there first if missing and `train_vocab`)."""
    return cls(
      TranslationData.from_config(data_config),
      pathlib.Path(workdir) / VOCAB_DIR,
      train_vocab=train_vocab,
    )

  # Data.

  def pairs(self, split: str) -> translation_lib.PairSource:
    """`(source, target)` strings of a TFDS split (building it if needed)."""
    kwargs = {'on_bad_utf8': self.data.on_bad_utf8}
    if self.dataset.startswith('anki'):
      kwargs['on_bad_line'] = self.data.on_bad_line
    if self.dataset == 'parallel_text':
      kwargs['languages'] = self.data.languages
    if self.data.source_dir:
      kwargs['source_dir'] = self.data.source_dir
    return translation_lib.load_pairs(
      self.dataset,
      split,
      data_dir=self.tfds_dir,
      reverse=self.data.reverse,
      **kwargs,
    )

  def _build_dataset(self) -> None:
    """In a multi-process run, process 0 prepares the TFDS dataset (all
    its splits) while the others wait, so that they never build it at the
    same time; `tfds_dir` must be on a file system all processes share.
    A single process builds it on first use instead."""
    import jax  # Only to agree across processes.

    if jax.process_count() > 1:
      _on_process_0(
        lambda: self.pairs(self.data.train_split), 'prepare the TFDS dataset'
      )

  def _train_pairs(self) -> list[tuple[str, str]]:
    return list(self.pairs(self.data.train_split))

  # Vocabularies.

  def vocab_paths(self) -> dict[str, pathlib.Path]:
    if self.data.joint_vocab:
      return {'joint': self.vocab_dir / 'joint.model'}
    return {
      'source': self.vocab_dir / 'source.model',
      'target': self.vocab_dir / 'target.model',
    }

  def _vocabs(self, train: bool):
    paths = self.vocab_paths()
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing and not train:
      raise FileNotFoundError(
        f'the vocabulary file(s) {", ".join(missing)} are missing. They are '
        "part of the trained model (train.py writes them into the workdir's "
        f'{VOCAB_DIR}/ folder): copy them back from the original workdir.'
      )
    if train:
      self._train_vocabs(paths)
    vocabs = {name: tokenizer.SubwordVocab(p) for name, p in paths.items()}
    self._check_reused_vocabs(vocabs, train)
    if self.data.joint_vocab:
      return vocabs['joint'], vocabs['joint']
    return vocabs['source'], vocabs['target']

  def _vocab_params(self) -> dict[str, Any]:
    """The fields of `config.data` that shape the trained vocabularies."""
    fields = [
      'task',
      'train_split',
      'vocab_size',
      'vocab_model_type',
      'character_coverage',
    ]
    if not self.data.joint_vocab:  # Which language is 'source.model'.
      fields.append('reverse')
    params = {field: getattr(self.data, field) for field in fields}
    if self.data.task == 'parallel_text':  # As JSON reads it back.
      params['languages'] = list(self.data.languages)
    return params

  def _check_reused_vocabs(self, vocabs: dict[str, Any], train: bool) -> None:
    """Vocabularies already in the workdir are reused as they are: their
    size must be `vocab_size`, and other differences are logged."""
    fix = (
      f'delete {self.vocab_dir} to train new ones (only in a workdir whose '
      'checkpoints do not use them), or use a new workdir'
    )
    for name, vocab in vocabs.items():
      if vocab.size != self.data.vocab_size and not train:
        # Reusing a trained model: its config is right, the file is not.
        raise ValueError(
          f'the {name} vocabulary {vocab.path} has {vocab.size} ids, but '
          f'this model was trained with vocab_size={self.data.vocab_size}: '
          'it is not the vocabulary the model was trained with. Copy back '
          f"the original workdir's {VOCAB_DIR}/ folder."
        )
      if vocab.size != self.data.vocab_size:
        raise ValueError(
          f'config.data.vocab_size={self.data.vocab_size}, but the {name} '
          f'vocabulary {vocab.path} already in the workdir has {vocab.size} '
          f'ids (a vocabulary is trained once, then reused). Set '
          f'vocab_size={vocab.size}, or {fix}.'
        )
    params_file = self.vocab_dir / _VOCAB_PARAMS
    if not params_file.exists():  # An older workdir: the size check only.
      return
    saved = json.loads(params_file.read_text())
    current = self._vocab_params()
    if differ := sorted(k for k in current if saved.get(k) != current[k]):
      _log.warning(
        'The vocabularies in %s were trained with %s; config.data now has '
        '%s. They are reused as they are; %s to change them.',
        self.vocab_dir,
        ', '.join(f'{k}={saved.get(k)!r}' for k in differ),
        ', '.join(f'{k}={current[k]!r}' for k in differ),
        fix,
      )

  def _train_vocabs(self, paths: dict[str, pathlib.Path]) -> None:
    """Trains the missing vocabularies. In a multi-process run process 0
    decides and trains, and every process waits for it; the workdir must
    be on a file system all processes share."""
    import jax  # Only to agree across processes.
    from jax.experimental import multihost_utils

    missing = not all(p.exists() for p in paths.values())
    if jax.process_count() > 1:
      missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
    if not missing:
      return
    _on_process_0(lambda: self._write_vocabs(paths), 'train the vocabularies')
    if jax.process_count() > 1:
      # Agreed on, so that all processes stop, not only those that miss them.
      sees = multihost_utils.process_allgather(
        np.int32(all(p.exists() for p in paths.values()))
      )
      if not np.all(sees):
        blind = np.flatnonzero(np.asarray(sees) == 0).tolist()
        raise FileNotFoundError(
          f'process(es) {blind} do not see the vocabularies process 0 wrote '
          f'to {self.vocab_dir}: the workdir must be on a file system all '
          'processes share.'
        )

  def _write_vocabs(self, paths: dict[str, pathlib.Path]) -> None:
    """Trains a SentencePiece model for each of `paths` on the training
    split and records the parameters beside them."""
    pairs = self._train_pairs()
    texts = {
      'joint': [text for pair in pairs for text in pair],
      'source': [source for source, _ in pairs],
      'target': [target for _, target in pairs],
    }
    for name, path in paths.items():
      _log.info(
        'Training a %d-piece SentencePiece vocabulary (%s) on %d sentences '
        'of %s %s; saving it to %s.',
        self.data.vocab_size,
        name,
        len(texts[name]),
        self.name,
        self.data.train_split,
        path,
      )
      tokenizer.train_vocab(
        texts[name],
        path,
        vocab_size=self.data.vocab_size,
        model_type=self.data.vocab_model_type,
        character_coverage=self.data.character_coverage,
      )
    params = json.dumps(self._vocab_params(), indent=2)
    (self.vocab_dir / _VOCAB_PARAMS).write_text(params + '\n')

  def vocab_digests(self) -> dict[str, str]:
    """SHA-256 of each vocabulary file, by role ('source', 'target')."""
    return {
      'source_vocab': self.source_vocab.digest,
      'target_vocab': self.target_vocab.digest,
    }

  # Encoding.

  def prepare_source(self, text: str) -> list[int]:
    """Token ids of a user-given source sentence.

    Raises:
      ValueError: text that is not UTF-8, a blank input, or one longer than
        `max_source_len` tokens when `long_input` is 'error'.
    """
    try:
      text.encode('utf-8')
    except UnicodeEncodeError as e:
      # A command-line argument with bytes that are not UTF-8 arrives with
      # them as lone surrogates, which SentencePiece cannot take.
      raise ValueError(
        f'input {text[:60]!r} is not valid UTF-8 (character {e.start + 1}); '
        'pass UTF-8 text.'
      ) from None
    normalized = translation_lib.normalize_text(text)
    if not normalized:
      raise ValueError(
        'empty input: give a source sentence with visible characters.'
      )
    ids = self.source_vocab.encode(normalized)
    if len(ids) <= self.max_source_len:
      return ids
    if self.data.long_input == 'error':
      raise ValueError(
        f'input {text[:60]!r}... has {len(ids)} tokens; the model reads at '
        f'most {self.max_source_len} (config.data.max_source_len). Shorten '
        'it, or rerun with long_input=truncate (attnjax decode '
        '--long_input=truncate) to cut it.'
      )
    _log.warning(
      'Input %r has %d tokens; truncated to the first %d.',
      text[:60],
      len(ids),
      self.max_source_len,
    )
    return ids[: self.max_source_len]

  def decode_source(self, ids) -> str:
    return self.source_vocab.decode(ids)

  def source_as_read(self, text: str) -> str:
    """`text` as the model reads it: itself, or when `long_input='truncate'`
    cuts it, the kept tokens decoded and followed by ' …'."""
    ids = self.source_vocab.encode(translation_lib.normalize_text(text))
    if len(ids) <= self.max_source_len:
      return text
    return self.decode_source(ids[: self.max_source_len]) + ' …'

  def score(
    self, predictions: Sequence[str], references: Sequence[str]
  ) -> dict[str, float]:
    """Corpus BLEU of `predictions` against one reference each."""
    return bleu(predictions, references, tokenize=self._bleu_tokenize)

  # The training stream.

  def train_ids(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids of the training pairs that fit (targets end with EOS)."""
    if self._train is None:
      pairs = self._train_pairs()
      sources = self.source_vocab.encode_many([s for s, _ in pairs])
      targets = self.target_vocab.encode_many([t for _, t in pairs])
      kept_s, kept_t, empty, long = [], [], 0, 0
      for s, t in zip(sources, targets, strict=True):
        if not s or not t:
          empty += 1
        elif len(s) > self.max_source_len or len(t) + 1 > self.max_target_len:
          long += 1
        else:
          kept_s.append(np.asarray(s, np.int32))
          kept_t.append(np.asarray(t + [EOS_ID], np.int32))
      _log.info(
        '%s %s: %d training pairs; %d left out as longer than '
        'max_source_len=%d / max_target_len=%d (EOS included), %d as empty.',
        self.name,
        self.data.train_split,
        len(kept_s),
        long,
        self.max_source_len,
        self.max_target_len,
        empty,
      )
      if not kept_s:
        raise ValueError(
          f'no training pair of {self.name} {self.data.train_split} fits '
          f'max_source_len={self.max_source_len} and max_target_len='
          f'{self.max_target_len}; raise them.'
        )
      self._train = kept_s, kept_t
    return self._train

  def train_dataset(
    self,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
  ) -> grain.IterDataset:
    """This process's infinite stream of training batches ('inputs' int32
    `[local, bucket_source_len]`, 'targets' int32 `[local,
    bucket_target_len]`), checkpointable like `pipeline.train_dataset`."""
    local = pipeline.local_batch_size(
      global_batch_size, process_index, process_count
    )
    plan = _BatchPlan(self, global_batch_size)
    batches = _TrainBatches(plan, process_index * local, local)
    dataset = grain.MapDataset.range(_NUM_STEPS).map(batches)
    return dataset.to_iter_dataset(_READ_OPTIONS)

  # Held-out data.

  def heldout(
    self, split: str, *, n: int | None, batch_size: int
  ) -> pipeline.HeldOut:
    """The first `n` pairs (all when None) of 'validation' or 'test' as
    padded batches of `batch_size` rows; see `HeldOut`.

    Sources are padded to the smallest bucket length that holds the longest
    one (one static shape per split).
    """
    if split not in self.splits:
      raise ValueError(
        f'unknown split {split!r} for {self.name}; choose one of '
        f'{", ".join(self.splits)}.'
      )
    pairs = self.pairs(self.splits[split])
    if self.data.reverse and self.dataset.startswith('anki'):
      pairs = self._unseen_sources(pairs, split)
    count = len(pairs) if n is None else min(n, len(pairs))
    pairs = pairs[:count]
    sources = [s for s, _ in pairs]
    references = [t for _, t in pairs]
    source_ids = self.source_vocab.encode_many(sources)
    target_ids = self.target_vocab.encode_many(references)
    cut_sources = sum(len(s) > self.max_source_len for s in source_ids)
    cut_targets = sum(len(t) + 1 > self.max_target_len for t in target_ids)
    if cut_sources or cut_targets:
      _log.warning(
        '%s %s: %d sources truncated to max_source_len=%d and %d targets to '
        'max_target_len=%d for teacher forcing (BLEU uses the whole '
        'references).',
        self.name,
        split,
        cut_sources,
        self.max_source_len,
        cut_targets,
        self.max_target_len,
      )
    longest = max((len(s) for s in source_ids), default=1)
    width = _bucket_len(longest, self.data.buckets, self.max_source_len)
    batches = []
    for start in range(0, count, batch_size):
      rows = range(start, min(start + batch_size, count))
      inputs = np.full((batch_size, width), PAD_ID, np.int32)
      targets = np.full((batch_size, self.max_target_len), PAD_ID, np.int32)
      for row, i in enumerate(rows):
        s = source_ids[i][:width]
        t = (target_ids[i] + [EOS_ID])[: self.max_target_len]
        inputs[row, : len(s)] = s
        targets[row, : len(t)] = t
      valid = np.arange(batch_size) < len(rows)
      batches.append({'inputs': inputs, 'targets': targets, 'valid': valid})
    return pipeline.HeldOut(batches, sources, references)

  def _unseen_sources(
    self, pairs: Sequence[tuple[str, str]], split: str
  ) -> list[tuple[str, str]]:
    """`pairs` less those whose source is also a training source.

    Anki's splits keep each English sentence in one split; translating into
    English, a held-out source may still be a training source with another
    English translation. Those pairs are left out, with a logged count.
    """
    seen = {source for source, _ in self._train_pairs()}
    kept = [pair for pair in pairs if pair[0] not in seen]
    _log.info(
      '%s %s: %d of %d pairs left out, their source being a training source '
      '(%s).',
      self.name,
      split,
      len(pairs) - len(kept),
      len(pairs),
      self.data.train_split,
    )
    return kept


def _bucket_len(length: int, buckets: Sequence[int], cap: int) -> int:
  for bucket in buckets:
    if length <= bucket:
      return min(bucket, cap)
  return cap


def _merge_small_buckets(
  members: list[np.ndarray], batch_size: int
) -> list[tuple[np.ndarray, int]]:
  """Merges the buckets that cannot fill one batch into a neighbour.

  `members[b]` are the pair indices of bucket `b`. Returns `(indices, b)`
  per merged bucket, `b` being the longest bucket in it (which sets its
  shape). A short bucket joins the next longer one, where its pairs fit; a
  short last bucket joins the one before it. Buckets that already fill a
  batch are returned unchanged, so is their order.
  """
  groups, pending = [], []
  for b, indices in enumerate(members):
    pending.append(indices)
    if sum(map(len, pending)) >= batch_size:
      groups.append((np.sort(np.concatenate(pending)), b))
      pending = []
  if sum(map(len, pending)):  # The longest pairs, too few for a batch.
    last = len(members) - 1
    if groups:
      indices, _ = groups.pop()
      pending.append(indices)
    groups.append((np.sort(np.concatenate(pending)), last))
  return groups


class _BatchPlan:
  """Which training pairs make up each batch of each epoch."""

  def __init__(self, task: TranslationTask, global_batch_size: int):
    sources, targets = task.train_ids()
    data = task.data
    self.sources, self.targets = sources, targets
    self.seed = data.seed
    self.global_batch_size = global_batch_size
    lengths = np.array(
      [max(len(s), len(t)) for s, t in zip(sources, targets, strict=True)]
    )
    edges = np.asarray(data.buckets)
    # A pair longer than every bucket goes to the last, at the maxima.
    which = np.minimum(np.searchsorted(edges, lengths), len(edges) - 1)
    members = [np.flatnonzero(which == b) for b in range(len(edges))]
    if len(sources) < global_batch_size:
      raise ValueError(
        f'batch_size={global_batch_size} is larger than the {len(sources)} '
        'training pairs; lower batch_size or use more training pairs.'
      )
    # (pair indices, index of the edge that sets the shape) per bucket.
    groups = _merge_small_buckets(members, global_batch_size)
    if any(0 < len(m) < global_batch_size for m in members):
      _log.info(
        'Length buckets %s hold %s pairs; those that cannot fill a batch of '
        '%d (their pairs would never be trained on) are merged into a '
        'neighbour: buckets %s.',
        list(data.buckets),
        [len(m) for m in members],
        global_batch_size,
        [int(edges[edge]) for _, edge in groups],
      )
    self.buckets = [indices for indices, _ in groups]
    self.shapes = [
      (
        min(int(edges[edge]), data.max_source_len)
        if edge < len(edges) - 1
        else data.max_source_len,
        min(int(edges[edge]), data.max_target_len)
        if edge < len(edges) - 1
        else data.max_target_len,
      )
      for _, edge in groups
    ]
    self.batches_per_bucket = [
      len(m) // global_batch_size for m in self.buckets
    ]
    self.steps_per_epoch = sum(self.batches_per_bucket)
    used = self.steps_per_epoch * global_batch_size
    _log.info(
      'Length buckets %s hold %s pairs: %d batches of %d per epoch; %d pairs '
      '(the remainder of each bucket, different ones every epoch) sit out '
      'each epoch.',
      [int(edges[edge]) for _, edge in groups],
      [len(m) for m in self.buckets],
      self.steps_per_epoch,
      global_batch_size,
      len(sources) - used,
    )
    self._lock = threading.Lock()
    self._epochs: dict[int, list[tuple[int, np.ndarray]]] = {}

  def epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """`(bucket, pair indices)` of each batch of `epoch`, in order."""
    with self._lock:
      if epoch not in self._epochs:
        if len(self._epochs) > 2:
          self._epochs.pop(min(self._epochs))
        self._epochs[epoch] = self._make_epoch(epoch)
      return self._epochs[epoch]

  def _make_epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng([self.seed, epoch])
    batches = []
    for b, members in enumerate(self.buckets):
      order = rng.permutation(members)
      for i in range(self.batches_per_bucket[b]):
        size = self.global_batch_size
        batches.append((b, order[i * size : (i + 1) * size]))
    return [batches[i] for i in rng.permutation(len(batches))]


class _TrainBatches:
  """Global step index -> this process's rows of that batch."""

  def __init__(self, plan: _BatchPlan, first: int, size: int):
    self.plan, self.first, self.size = plan, first, size

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    plan = self.plan
    epoch, index = divmod(int(step), plan.steps_per_epoch)
    bucket, members = plan.epoch(epoch)[index]
    rows = members[self.first : self.first + self.size]
    source_len, target_len = plan.shapes[bucket]
    inputs = np.full((len(rows), source_len), PAD_ID, np.int32)
    targets = np.full((len(rows), target_len), PAD_ID, np.int32)
    for row, i in enumerate(rows):
      s, t = plan.sources[i], plan.targets[i]
      inputs[row, : len(s)] = s
      targets[row, : len(t)] = t
    return {'inputs': inputs, 'targets': targets}
