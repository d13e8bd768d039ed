"""TFDS builders for parallel text: `multi30k`, `anki` and `parallel_text`
(no TensorFlow).

The builders write array_record files, so the splits are read back with
random access through the builder's `as_data_source` (see `load_pairs`),
which is what the Grain pipeline wants.

- `multi30k`: German-English image captions (WMT16 multimodal task 1).
  Splits `train` 29,000, `validation` 1,014, `test_2016` 1,000 pairs;
  features `{'de': text, 'en': text}`, in file order. The six official
  gzipped files are read from a local folder when one is given (the
  `source_dir` argument, or `$ATTNJAX_DATA_DIR/multi30k/`), otherwise they
  are downloaded from the official Multi30k GitHub repository.
- `anki/fra-eng`, `anki/cmn-eng`: Tatoeba / ManyThings.org sentence pairs,
  features `{'en', 'fr'}` / `{'en', 'zh'}`. There is no official split, so
  each pair goes to train / validation / test by a hash of its normalised
  English sentence (90 / 5 / 5 percent of the English sentences). Hashing
  the English side, not the pair, keeps all translations of one English
  sentence in the same split, so no test source is seen in training (into
  English, `parallel.TranslationTask` leaves out the held-out pairs whose
  source is a training source). Local
  file: `source_dir/{fra,cmn}.txt` or under `$ATTNJAX_DATA_DIR` with the
  layout of `../shared/data` (`anki_fra_eng/fra.txt`,
  `anki_cmn_eng/attrib_version/cmn.txt`). ManyThings.org refuses scripted
  downloads, so nothing is downloaded.
- `parallel_text`: your own corpus in the Moses / fairseq layout, from the
  folder `source_dir` only: for `languages=('de', 'en')`, `train.de` /
  `train.en`, `validation.de` / `validation.en` and, optionally,
  `test.de` / `test.en` (only the splits present are generated), each file
  plain or gzipped (`train.de.gz`). Line i of one language translates line
  i of the other. Features `{'source': languages[0], 'target':
  languages[1]}`, in file order.

Text is normalised the same way everywhere: a UTF-8 BOM, zero-width
spaces, word joiners and soft hyphens (U+FEFF, U+200B, U+2060, U+00AD) are
removed, no-break, thin and figure spaces (U+00A0, U+202F, U+2009, U+2007)
become plain spaces, the text is put in Unicode NFC (so that 'é' typed as
'e' + U+0301 is the 'é' of the training text, not an unknown character)
and the ends are stripped.

Bad input raises `TranslationDataError`, naming the file and the fix. Lines
that are not UTF-8 (`on_bad_utf8`) and anki lines without 2 or 3 columns
(`on_bad_line`) raise by default, or are skipped with a logged count when
the option is `'skip'`. A skipped multi30k or parallel_text line drops the
pair, on both sides.

TFDS prepares a dataset once per `data_dir` and reuses it. Each build
records the SHA-256 of the source files it read and its `on_bad_*`
options (for parallel_text, its languages too); `load_pairs` refuses a
prepared dataset whose record differs from the files and options it is
given now (a new release of `fra.txt` in
`source_dir`, say), instead of silently serving the old text.
"""

import collections
import gzip
import hashlib
import logging
import os
import re
import unicodedata
import zlib
from collections.abc import Iterator, Sequence
from typing import Literal

import tensorflow_datasets as tfds
from etils import epath

DATA_DIR_ENV = 'ATTNJAX_DATA_DIR'
MULTI30K_URL = (
  'https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/'
)
# split name -> file stem of `{stem}.de.gz` / `{stem}.en.gz`.
MULTI30K_SPLITS = {
  'train': 'train',
  'validation': 'val',
  'test_2016': 'test_2016_flickr',
}
MULTI30K_FILES = tuple(
  f'{stem}.{lang}.gz'
  for stem in MULTI30K_SPLITS.values()
  for lang in ('de', 'en')
)
# Percent of English sentences (by hash bucket) in each anki split.
ANKI_SPLIT_PERCENT = {'train': 90, 'validation': 5, 'test': 5}
ANKI_URL = 'https://www.manythings.org/anki/'
# The splits of `parallel_text`, each read from `{split}.{lang}[.gz]`.
PARALLEL_TEXT_SPLITS = ('train', 'validation', 'test')
PARALLEL_TEXT_REQUIRED = ('train', 'validation')
# The first two bytes of every gzip file.
_GZIP_MAGIC = b'\x1f\x8b'
# A language code as it appears in file names: 'de', 'zh-Hans', 'pt_BR'.
_LANGUAGE_CODE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_-]{0,15}')

OnBad = Literal['error', 'skip']

_SPACES = str.maketrans(
  {
    # No-break, narrow no-break, thin and figure spaces: a plain space.
    **dict.fromkeys('\u00a0\u202f\u2009\u2007', ' '),
    # Zero-width space, BOM, word joiner and soft hyphen: nothing.
    **dict.fromkeys('\u200b\ufeff\u2060\u00ad'),
  }
)
_log = logging.getLogger(__name__)


class TranslationDataError(ValueError):
  """Bad or missing translation data; the message names the file and fix."""


def normalize_text(text: str) -> str:
  """Removes invisible characters, maps special spaces to ' ', composes
  to NFC, strips (see the module docstring)."""
  return unicodedata.normalize('NFC', text.translate(_SPACES)).strip()


def _check_on_bad(name: str, value: str) -> None:
  if value not in ('error', 'skip'):
    raise ValueError(f"{name} must be 'error' or 'skip', got {value!r}.")


def _split_lines(data: bytes) -> list[bytes]:
  """Splits on '\\n' only (str.splitlines would also split on U+2028...)."""
  lines = data.split(b'\n')
  if lines and not lines[-1]:
    lines.pop()  # The file ends with a newline.
  return [line.removesuffix(b'\r') for line in lines]


def _decode_lines(
  path: str, lines: list[bytes], on_bad_utf8: OnBad
) -> list[str | None]:
  """Decodes each line; a bad line is an error or None (to be skipped)."""
  out = []
  for i, line in enumerate(lines):
    try:
      out.append(line.decode('utf-8'))
    except UnicodeDecodeError as e:
      if on_bad_utf8 == 'error':
        raise TranslationDataError(
          f'{path}, line {i + 1}: not valid UTF-8 ({e.reason} at byte '
          f'{e.start}: {line[e.start : e.start + 4]!r}). Re-encode the file '
          'as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or build with '
          "on_bad_utf8='skip' to drop such lines."
        ) from None
      out.append(None)
  return out


def _read_gzip(path: str, fix: str) -> bytes:
  """The contents of the gzipped file `path`; `fix` ends the error."""
  try:
    with open(path, 'rb') as f:
      return gzip.decompress(f.read())
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise TranslationDataError(
      f'{path} is not a valid gzip file ({e}). {fix}'
    ) from None


def _multi30k_fix(name: str) -> str:
  return f'Delete it and download it again from {MULTI30K_URL}{name}'


def _aligned_pairs(
  files: dict[str, tuple[str, bytes]],
  on_bad_utf8: OnBad,
  *,
  mismatch_fix: str,
  empty_fix: str,
) -> Iterator[tuple[int, dict[str, str]]]:
  """The examples `(i, {key: line i})` of two line-aligned files.

  Args:
    files: {feature key: (path, contents)}, two of them, source first.
    on_bad_utf8: 'error', or 'skip' to drop a pair with a line that is not
      UTF-8 (logging how many).
    mismatch_fix: ends the error when the line counts differ.
    empty_fix: ends the error when no pair is left.
  """
  (key_a, (path_a, data_a)), (key_b, (path_b, data_b)) = files.items()
  lines_a, lines_b = _split_lines(data_a), _split_lines(data_b)
  if len(lines_a) != len(lines_b):
    raise TranslationDataError(
      f'{path_a} has {len(lines_a)} lines but {path_b} has {len(lines_b)}; '
      f'line i of one must translate line i of the other. {mismatch_fix}'
    )
  text_a = _decode_lines(path_a, lines_a, on_bad_utf8)
  text_b = _decode_lines(path_b, lines_b, on_bad_utf8)
  skipped = 0
  for i, (a, b) in enumerate(zip(text_a, text_b, strict=True)):
    if a is None or b is None:
      skipped += 1
      continue
    yield i, {key_a: normalize_text(a), key_b: normalize_text(b)}
  if skipped == len(text_a):  # tfds would fail with no word of which file.
    what = f'all {skipped} lines are not UTF-8' if skipped else 'empty'
    raise TranslationDataError(
      f'{path_a} / {path_b} hold no sentence pairs ({what}). {empty_fix}'
    )
  if skipped:
    _log.warning(
      'Skipped %d line pairs that are not valid UTF-8 in %s / %s.',
      skipped,
      path_a,
      path_b,
    )


def _source_record(paths: dict[str, str], options: dict[str, str]) -> dict:
  """{'files': {name: sha256}, 'options': options}: what a build read from
  `paths` ({name: path}, the names as the dataset knows its files)."""
  files = {}
  for name, path in sorted(paths.items()):
    with open(path, 'rb') as f:
      files[name] = hashlib.file_digest(f, 'sha256').hexdigest()
  return {'files': files, 'options': dict(options)}


def _data_dir_from_env(subdir: str) -> str | None:
  root = os.environ.get(DATA_DIR_ENV)
  return os.path.join(root, subdir) if root else None


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders here."""

  def _local_sources(self) -> dict[str, str]:
    """{name: path} of the local files this builder reads (raises
    `TranslationDataError` if there are none)."""
    raise NotImplementedError

  def _options(self) -> dict[str, str]:
    return {'on_bad_utf8': self.on_bad_utf8}

  def _record_sources(self, paths: dict[str, str]) -> None:
    """Stores what this build read in its `DatasetInfo` (`check_sources`)."""
    self.info.metadata['sources'] = _source_record(paths, self._options())

  def check_sources(self) -> None:
    """Refuses a prepared dataset built from other files or options than
    this builder's (a no-op without local files to compare, e.g. when the
    dataset was downloaded, or for a build that predates the record)."""
    saved = (self.info.metadata or {}).get('sources')
    if saved is None:
      return
    try:
      paths = self._local_sources()
    except TranslationDataError:  # Gone since the build: the build stands.
      return
    current = _source_record(paths, self._options())
    if saved == current:
      return
    differ = sorted(
      key
      for key in {**saved['files'], **current['files']}
      if saved['files'].get(key) != current['files'].get(key)
    ) + sorted(
      key
      for key in current['options']
      if saved['options'].get(key) != current['options'][key]
    )
    raise TranslationDataError(
      f'the prepared dataset in {self.data_dir} was built from other source '
      f'files or options (differing: {", ".join(differ)}) than the ones '
      f'given now: {", ".join(paths.values())} with {current["options"]}. '
      'TFDS would serve the old build: delete that folder to rebuild it, or '
      'set config.data.tfds_dir to another folder.'
    )

  def check_split(self, split: str) -> None:
    """Refuses a split expression that names a split this build lacks,
    before tfds does, when the builder can say more than tfds (a no-op
    here)."""
    del split

  # tfds 4.9's default `code_path` imports `importlib_resources`, which it
  # declares only for Python < 3.9; point it at this file instead.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


class Multi30k(_Builder):
  """Multi30k German-English (WMT16 multimodal task 1), in file order."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {
    '1.0.0': 'Initial release.',
    '1.1.0': 'Thin and figure spaces, word joiners, soft hyphens normalised.',
    '1.2.0': 'Text in Unicode NFC.',
  }

  def __init__(
    self,
    *,
    source_dir: str | os.PathLike | None = None,
    on_bad_utf8: OnBad = 'error',
    file_format: str = 'array_record',
    **kwargs,
  ):
    """`source_dir`: folder with the six .gz files; defaults to
    `$ATTNJAX_DATA_DIR/multi30k`, and to downloading when neither is set."""
    _check_on_bad('on_bad_utf8', on_bad_utf8)
    self.source_dir = (
      os.fspath(source_dir) if source_dir else _data_dir_from_env('multi30k')
    )
    self.on_bad_utf8 = on_bad_utf8
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {'de': tfds.features.Text(), 'en': tfds.features.Text()}
      ),
      supervised_keys=('de', 'en'),
      homepage='https://github.com/multi30k/dataset',
      disable_shuffling=True,  # Keep file order: line i is example i.
      metadata=tfds.core.MetadataDict(),
    )

  def _local_sources(self) -> dict[str, str]:
    if not self.source_dir:
      raise TranslationDataError('multi30k: no local folder (downloaded).')
    return _local_multi30k_files(self.source_dir)

  def _split_generators(self, dl_manager):
    if self.source_dir:
      paths = _local_multi30k_files(self.source_dir)
    else:
      paths = _download_multi30k(dl_manager)
    self._record_sources(paths)
    return {
      split: self._generate_examples(stem, paths)
      for split, stem in MULTI30K_SPLITS.items()
    }

  def _generate_examples(self, stem: str, paths: dict[str, str]):
    """The pairs of `{stem}.de.gz` / `{stem}.en.gz` (at `paths[name]`)."""
    de_name, en_name = f'{stem}.de.gz', f'{stem}.en.gz'
    de_path, en_path = paths[de_name], paths[en_name]
    yield from _aligned_pairs(
      {
        'de': (de_path, _read_gzip(de_path, _multi30k_fix(de_name))),
        'en': (en_path, _read_gzip(en_path, _multi30k_fix(en_name))),
      },
      self.on_bad_utf8,
      mismatch_fix='One of them is truncated or from another release: '
      f'download both again from {MULTI30K_URL}',
      empty_fix=f'Download both again from {MULTI30K_URL}',
    )


def _download_multi30k(dl_manager) -> dict[str, str]:
  """Downloads the six files; a failure names them and the local option."""
  try:
    paths = dl_manager.download(
      {name: MULTI30K_URL + name for name in MULTI30K_FILES}
    )
  except OSError as e:  # requests' errors are OSErrors too.
    raise TranslationDataError(
      f'could not download Multi30k from {MULTI30K_URL} ({e}). Without '
      f'network access, put {", ".join(MULTI30K_FILES)} in a folder and '
      f'pass it as config.data.source_dir, or set ${DATA_DIR_ENV} to a '
      'folder holding them under multi30k/.'
    ) from e
  return {name: os.fspath(p) for name, p in paths.items()}


def _local_multi30k_files(folder: str) -> dict[str, str]:
  missing = [
    name
    for name in MULTI30K_FILES
    if not os.path.isfile(os.path.join(folder, name))
  ]
  if missing:
    what = 'does not exist' if not os.path.isdir(folder) else 'lacks files'
    raise TranslationDataError(
      f'Multi30k data folder {folder} {what}: expected '
      f'{", ".join(MULTI30K_FILES)}; missing {", ".join(missing)}. Get them '
      f'from {MULTI30K_URL} (data/task1/raw of '
      'https://github.com/multi30k/dataset), or unset source_dir and '
      f'${DATA_DIR_ENV} to let tfds download them.'
    )
  return {name: os.path.join(folder, name) for name in MULTI30K_FILES}


class AnkiConfig(tfds.core.BuilderConfig):
  """An anki language pair; the file's first column is always English."""

  def __init__(
    self, *, lang: str, file_name: str, subdirs: Sequence[str], **kwargs
  ):
    super().__init__(**kwargs)
    self.lang = lang  # Feature name of the second column.
    self.file_name = file_name
    # Folders under $ATTNJAX_DATA_DIR that may hold the file.
    self.subdirs = tuple(subdirs)


class Anki(_Builder):
  """Tatoeba / ManyThings.org sentence pairs with a hash-based split."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {
    '1.0.0': 'Initial release.',
    '1.1.0': 'Thin and figure spaces, word joiners, soft hyphens normalised.',
    '1.2.0': 'Text in Unicode NFC.',
  }
  BUILDER_CONFIGS = [
    AnkiConfig(
      name='fra-eng',
      description='English-French, 2- or 3-column fra.txt.',
      lang='fr',
      file_name='fra.txt',
      subdirs=('anki_fra_eng', 'fra-eng'),
    ),
    AnkiConfig(
      name='cmn-eng',
      description='English-Mandarin Chinese, 2- or 3-column cmn.txt.',
      lang='zh',
      file_name='cmn.txt',
      subdirs=('anki_cmn_eng/attrib_version', 'anki_cmn_eng', 'cmn-eng'),
    ),
  ]

  def __init__(
    self,
    *,
    source_dir: str | os.PathLike | None = None,
    on_bad_utf8: OnBad = 'error',
    on_bad_line: OnBad = 'error',
    file_format: str = 'array_record',
    **kwargs,
  ):
    """`source_dir`: folder holding `fra.txt` / `cmn.txt`; defaults to the
    config's folder under `$ATTNJAX_DATA_DIR`."""
    _check_on_bad('on_bad_utf8', on_bad_utf8)
    _check_on_bad('on_bad_line', on_bad_line)
    self.source_dir = os.fspath(source_dir) if source_dir else None
    self.on_bad_utf8 = on_bad_utf8
    self.on_bad_line = on_bad_line
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    lang = self.builder_config.lang
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {'en': tfds.features.Text(), lang: tfds.features.Text()}
      ),
      supervised_keys=('en', lang),
      homepage=ANKI_URL,
      metadata=tfds.core.MetadataDict(),
    )

  def _local_sources(self) -> dict[str, str]:
    return {self.builder_config.file_name: self._source_file()}

  def _options(self) -> dict[str, str]:
    return {**super()._options(), 'on_bad_line': self.on_bad_line}

  def _source_file(self) -> str:
    config = self.builder_config
    if self.source_dir:
      candidates = [os.path.join(self.source_dir, config.file_name)]
    elif root := os.environ.get(DATA_DIR_ENV):
      candidates = [
        os.path.join(root, sub, config.file_name) for sub in config.subdirs
      ]
    else:
      candidates = []
    for path in candidates:
      if os.path.isfile(path):
        return path
    where = (
      f'none of {", ".join(candidates)} exists'
      if candidates
      else f'neither source_dir nor ${DATA_DIR_ENV} is set'
    )
    raise TranslationDataError(
      f'anki/{config.name}: {where}. Download {config.name}.zip from '
      f'{ANKI_URL}, unzip it and pass the folder holding {config.file_name} '
      f'as source_dir, or set ${DATA_DIR_ENV} to a folder with '
      f'{config.subdirs[0]}/{config.file_name}.'
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    path = self._source_file()
    self._record_sources({self.builder_config.file_name: path})
    pairs = read_anki_pairs(
      path, on_bad_utf8=self.on_bad_utf8, on_bad_line=self.on_bad_line
    )
    if not pairs:
      # Else tfds writes a dataset without splits, and keeps it.
      config = self.builder_config
      raise TranslationDataError(
        f'{path} holds no sentence pairs (it is empty, or every line was '
        'skipped). It must be the English<TAB>translation file '
        f'{config.file_name} of {config.name}.zip from {ANKI_URL}: download '
        'and unzip it again.'
      )
    by_split = collections.defaultdict(list)
    for key, en, other in pairs:
      by_split[anki_split(en)].append((key, en, other))
    # tfds cannot write an empty split, which tiny files can give.
    empty = [split for split in ANKI_SPLIT_PERCENT if not by_split[split]]
    if empty:
      _log.warning('anki: no examples for split(s) %s; left out.', empty)
    return {
      split: self._generate_examples(by_split[split])
      for split in ANKI_SPLIT_PERCENT
      if by_split[split]
    }

  def _generate_examples(self, pairs):
    lang = self.builder_config.lang
    for key, en, other in pairs:
      yield key, {'en': en, lang: other}


def anki_split(english: str) -> str:
  """The split of a pair, from a stable hash of its English sentence."""
  digest = hashlib.sha256(english.encode('utf-8')).digest()
  bucket = int.from_bytes(digest[:8], 'little') % 100
  for split, percent in ANKI_SPLIT_PERCENT.items():
    if bucket < percent:
      return split
    bucket -= percent
  raise AssertionError('ANKI_SPLIT_PERCENT must sum to 100.')


def read_anki_pairs(
  path: str, *, on_bad_utf8: OnBad = 'error', on_bad_line: OnBad = 'error'
) -> list[tuple[int, str, str]]:
  """Reads an anki file as `(line_number, english, other)` triples.

  Accepts 2 columns (English, other) or 3 (plus attribution). Empty lines
  are skipped silently; bad lines follow `on_bad_utf8` / `on_bad_line`.
  """
  with open(path, 'rb') as f:
    data = f.read().removeprefix(b'\xef\xbb\xbf')
  lines = _decode_lines(path, _split_lines(data), on_bad_utf8)
  pairs, bad_utf8, bad_lines = [], 0, 0
  for i, line in enumerate(lines):
    if line is None:
      bad_utf8 += 1
      continue
    if not normalize_text(line):
      continue
    cols = [normalize_text(c) for c in line.split('\t')]
    if len(cols) not in (2, 3) or not cols[0] or not cols[1]:
      if on_bad_line == 'error':
        raise TranslationDataError(
          f'{path}, line {i + 1}: expected English<TAB>translation'
          f'[<TAB>attribution], got {len(cols)} column(s) '
          f'{"with an empty sentence " if len(cols) in (2, 3) else ""}'
          f'in {line[:80]!r}. Fix the line, or build with '
          "on_bad_line='skip' to drop such lines."
        )
      bad_lines += 1
      continue
    pairs.append((i + 1, cols[0], cols[1]))
  if bad_utf8:
    _log.warning(
      'Skipped %d lines that are not valid UTF-8 in %s.', bad_utf8, path
    )
  if bad_lines:
    _log.warning('Skipped %d malformed lines in %s.', bad_lines, path)
  return pairs


class ParallelText(_Builder):
  """Your own corpus: `{split}.{lang}` line-aligned files in one folder.

  The Moses / fairseq layout: for `languages=('de', 'en')`, `train.de` and
  `train.en` (line i of one translates line i of the other), the same for
  `validation` and, if there is one, `test`; each file may be gzipped as
  `train.de.gz`. Features `{'source', 'target'}` (languages[0] and
  languages[1]), in file order, so that one builder serves every pair.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(
    self,
    *,
    languages: Sequence[str] = (),
    source_dir: str | os.PathLike | None = None,
    on_bad_utf8: OnBad = 'error',
    file_format: str = 'array_record',
    **kwargs,
  ):
    """`languages`: the (source, target) codes, which name the files;
    `source_dir`: the folder holding them (required: nothing downloads)."""
    _check_on_bad('on_bad_utf8', on_bad_utf8)
    if not valid_languages(languages):
      raise ValueError(
        f'parallel_text: languages={languages!r} must be two different '
        "language codes such as ('de', 'en') (letters, digits, '-' or '_'; "
        'they name the files train.de, train.en, ...).'
      )
    self.languages = tuple(languages)
    self.source_dir = os.fspath(source_dir) if source_dir else None
    self.on_bad_utf8 = on_bad_utf8
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {'source': tfds.features.Text(), 'target': tfds.features.Text()}
      ),
      supervised_keys=('source', 'target'),
      disable_shuffling=True,  # Keep file order: line i is example i.
      metadata=tfds.core.MetadataDict(),
    )

  def _options(self) -> dict[str, str]:
    # The languages are what `source` and `target` hold.
    return {**super()._options(), 'languages': ','.join(self.languages)}

  def _local_sources(self) -> dict[str, str]:
    return _parallel_text_files(self.source_dir, self.languages)

  def check_sources(self) -> None:
    """As `_Builder.check_sources`; other languages are refused even when
    the files of the build are gone (their text would be served under the
    new languages' names)."""
    saved = (self.info.metadata or {}).get('sources')
    built = saved and saved['options'].get('languages')
    if built and built != ','.join(self.languages):
      swapped = built == ','.join(reversed(self.languages))
      raise TranslationDataError(
        f'the prepared dataset in {self.data_dir} holds languages {built}, '
        f'not {",".join(self.languages)}. TFDS would serve the old build: '
        'delete that folder to rebuild it, or set config.data.tfds_dir to '
        'another folder.'
        + (
          f' To translate the other way, keep languages={built} and set '
          'config.data.reverse=True.'
          if swapped
          else ''
        )
      )
    super().check_sources()

  def check_split(self, split: str) -> None:
    """Refuses a split expression ('test', 'train[:100]+test') that reads
    an optional split the corpus was prepared without, naming its files."""
    for part in split.split('+'):
      base = part.split('[', 1)[0].strip()
      if base in PARALLEL_TEXT_SPLITS and base not in self.info.splits:
        src, tgt = self.languages
        raise TranslationDataError(
          f'the corpus has no {base!r} split: it was prepared from '
          f'{self.source_dir} with the splits {", ".join(self.info.splits)} '
          f'only (no {base}.{src} / {base}.{tgt}). Add those files and '
          f'delete {self.data_dir} to prepare it again, or choose a split '
          'it has.'
        )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    paths = _parallel_text_files(self.source_dir, self.languages)
    self._record_sources(paths)
    return {
      split: self._generate_examples(split, paths)
      for split in PARALLEL_TEXT_SPLITS
      if _split_names(split, self.languages, paths)
    }

  def _generate_examples(self, split: str, paths: dict[str, str]):
    """The pairs of `{split}.{source}` / `{split}.{target}`."""
    names = _split_names(split, self.languages, paths)
    yield from _aligned_pairs(
      {
        key: (paths[name], _read_corpus_file(paths[name], name))
        for key, name in zip(('source', 'target'), names, strict=True)
      },
      self.on_bad_utf8,
      mismatch_fix='Fix the shorter one (a sentence split over two lines, '
      'or a line dropped?), or remove the pairs the files disagree on.',
      empty_fix='Every split of the corpus needs at least one pair.',
    )


def _read_corpus_file(path: str, name: str) -> bytes:
  """The bytes of `path` (`name` in the corpus), gunzipped if gzipped.

  By its first bytes too: a gzipped file saved without `.gz` would
  otherwise be read as text that is not UTF-8. (No UTF-8 text starts with
  them: 0x8b is a continuation byte.)
  """
  with open(path, 'rb') as f:
    gzipped = f.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
  if name.endswith('.gz') or gzipped:
    return _read_gzip(
      path,
      f'Compress {name.removesuffix(".gz")} again, or put the plain text '
      'file in its place.',
    )
  with open(path, 'rb') as f:
    return f.read()


def valid_languages(languages: Sequence[str]) -> bool:
  """Whether `languages` are two different codes fit for file names."""
  return (
    isinstance(languages, Sequence)
    and not isinstance(languages, str)
    and len(languages) == 2
    and all(isinstance(code, str) for code in languages)
    and all(_LANGUAGE_CODE.fullmatch(code) for code in languages)
    and languages[0] != languages[1]
  )


def parallel_text_layout(languages: Sequence[str]) -> str:
  """The files `ParallelText` reads, in words, for error messages."""
  src, tgt = languages
  required = ', '.join(
    f'{split}.{lang}' for split in PARALLEL_TEXT_REQUIRED for lang in (src, tgt)
  )
  return (
    f'{required} and optionally test.{src}, test.{tgt} (one sentence per '
    'line, line i of one language translating line i of the other; UTF-8 '
    f'text, or gzipped as e.g. train.{src}.gz)'
  )


def _split_names(
  split: str, languages: Sequence[str], paths: dict[str, str]
) -> tuple[str, ...]:
  """The file names of `split` in `paths`, source first; () if none."""
  return tuple(
    name
    for lang in languages
    for name in (f'{split}.{lang}', f'{split}.{lang}.gz')
    if name in paths
  )


def _parallel_text_files(
  folder: str | None, languages: Sequence[str]
) -> dict[str, str]:
  """{name: path} of the corpus files in `folder` (see `ParallelText`)."""
  if not folder:
    raise TranslationDataError(
      'parallel_text: no source_dir given. Set config.data.source_dir to '
      f'the folder holding {parallel_text_layout(languages)}.'
    )
  if not os.path.isdir(folder):
    raise TranslationDataError(
      f'parallel_text: the folder {folder} does not exist. It must hold '
      f'{parallel_text_layout(languages)}.'
    )
  paths, missing = {}, []
  for split in PARALLEL_TEXT_SPLITS:
    found = {}
    for lang in languages:
      plain = f'{split}.{lang}'
      here = [
        name
        for name in (plain, plain + '.gz')
        if os.path.isfile(os.path.join(folder, name))
      ]
      if len(here) == 2:
        raise TranslationDataError(
          f'parallel_text: {folder} holds both {plain} and {plain}.gz; it '
          'is not clear which to read. Remove one of them.'
        )
      if here:
        found[here[0]] = os.path.join(folder, here[0])
    if len(found) == 2:
      paths.update(found)
    elif found or split in PARALLEL_TEXT_REQUIRED:
      missing += [
        f'{split}.{lang}'
        for lang in languages
        if not _split_names(split, [lang], found)
      ]
  if missing:
    raise TranslationDataError(
      f'parallel_text: the folder {folder} lacks {", ".join(missing)} (or '
      f'the same gzipped, .gz). It must hold '
      f'{parallel_text_layout(languages)}.'
    )
  return paths


# Which feature is the source and which the target, per dataset.
_DIRECTIONS = {
  'multi30k': ('de', 'en'),
  'anki/fra-eng': ('en', 'fr'),
  'anki/cmn-eng': ('en', 'zh'),
  'parallel_text': ('source', 'target'),
}


class PairSource(Sequence):
  """Random-access `(source, target)` string pairs over a tfds data source."""

  def __init__(self, data_source, source_key: str, target_key: str):
    self._data = data_source
    self.source_key = source_key
    self.target_key = target_key

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.__getitems__(range(*index.indices(len(self))))
    example = self._data[range(len(self))[index]]  # Negative, bounds.
    return (
      _as_str(example[self.source_key]),
      _as_str(example[self.target_key]),
    )

  def __getitems__(self, indices: Sequence[int]) -> list[tuple[str, str]]:
    """Batched read (about twice as fast per pair); Grain calls this."""
    examples = self._data.__getitems__([range(len(self))[i] for i in indices])
    return [
      (_as_str(ex[self.source_key]), _as_str(ex[self.target_key]))
      for ex in examples
    ]

  def __iter__(self) -> Iterator[tuple[str, str]]:
    for start in range(0, len(self), 1024):
      yield from self.__getitems__(range(start, min(start + 1024, len(self))))


def directions(name: str, reverse: bool = False) -> tuple[str, str]:
  """The (source, target) feature names of dataset `name`, e.g. ('de',
  'en') for multi30k or ('source', 'target') for parallel_text, swapped
  when `reverse`."""
  if name not in _DIRECTIONS:
    raise ValueError(f'Unknown dataset {name!r}; known: {list(_DIRECTIONS)}.')
  src, tgt = _DIRECTIONS[name]
  return (tgt, src) if reverse else (src, tgt)


def _as_str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def load_pairs(
  name: str,
  split: str,
  *,
  data_dir: str | os.PathLike | None = None,
  reverse: bool = False,
  **builder_kwargs,
) -> PairSource:
  """Builds `name` if needed and returns `split` as (source, target) pairs.

  Args:
    name: 'multi30k', 'anki/fra-eng', 'anki/cmn-eng' or 'parallel_text'.
    split: a tfds split, e.g. 'train', 'validation', 'test_2016[:10]'.
    data_dir: where tfds writes the array_record files (tfds's default when
      None).
    reverse: swap source and target (default directions: de->en, en->fr,
      en->zh, and for parallel_text languages[0] -> languages[1]).
    **builder_kwargs: `source_dir`, `on_bad_utf8`, `on_bad_line` (anki),
      `languages` (parallel_text).

  Returns:
    A sequence with random access, usable as a Grain data source.

  Raises:
    TranslationDataError: bad source files, or a dataset prepared in
      `data_dir` from other source files or `on_bad_*` options than these
      (see `_Builder.check_sources`).
  """
  src, tgt = directions(name, reverse)
  builder = tfds.builder(
    name, data_dir=os.fspath(data_dir) if data_dir else None, **builder_kwargs
  )
  builder.download_and_prepare()  # Once per data_dir; then a no-op.
  builder.check_sources()
  builder.check_split(split)
  try:
    builder.info.splits[split]  # Parses the split; reads nothing.
  except ValueError as e:  # tfds: an unknown split or a malformed slice.
    raise TranslationDataError(
      f'bad split {split!r} for {name}: {str(e).splitlines()[0]} (A slice '
      "reads like 'train[:2000]' or 'train[:10%]'.)"
    ) from None
  return PairSource(builder.as_data_source(split=split), src, tgt)
