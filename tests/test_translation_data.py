"""Tests for the multi30k / anki / parallel_text TFDS builders in
attnjax.data.translation."""

import dataclasses
import gzip
import importlib.util
import logging
import os
import pathlib

import pytest
import tensorflow_datasets as tfds

from attnjax.data import parallel, translation

SHARED = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
MULTI30K_DIR = SHARED / 'multi30k'
FRA_DIR = SHARED / 'anki_fra_eng'
CMN_DIR = SHARED / 'anki_cmn_eng' / 'attrib_version'

tfds.disable_progress_bar()


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
  monkeypatch.delenv(translation.DATA_DIR_ENV, raising=False)


def _write_gz(path, data: bytes):
  with gzip.open(path, 'wb') as f:
    f.write(data)


def _fake_multi30k(folder, n=(5, 3, 2), de_extra=b'', **overrides):
  """Writes the six files with `n` lines per split; `overrides` by name."""
  os.makedirs(folder, exist_ok=True)
  for count, stem in zip(n, translation.MULTI30K_SPLITS.values(), strict=True):
    for lang in ('de', 'en'):
      name = f'{stem}.{lang}.gz'
      lines = ''.join(f'{stem} {lang} {i}\n' for i in range(count))
      data = overrides.get(name, lines.encode())
      _write_gz(os.path.join(folder, name), data)
  return folder


def _build(builder_cls, tmp_path, **kwargs):
  builder = builder_cls(data_dir=str(tmp_path / 'tfds'), **kwargs)
  builder.download_and_prepare()
  return builder


def _pairs(builder, split, src, tgt):
  source = builder.as_data_source(split=split)
  return [
    (ex[src].decode(), ex[tgt].decode())
    for ex in (source[i] for i in range(len(source)))
  ]


# Multi30k on fixtures.


def test_multi30k_fixture_splits_and_order(tmp_path):
  folder = _fake_multi30k(tmp_path / 'm30k')
  builder = _build(translation.Multi30k, tmp_path, source_dir=folder)
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {'train': 5, 'validation': 3, 'test_2016': 2}
  assert _pairs(builder, 'validation', 'de', 'en') == [
    (f'val de {i}', f'val en {i}') for i in range(3)
  ]


def test_multi30k_normalises_spaces(tmp_path):
  de = '\ufeffEin\u00a0Hund\u200b.\n'.encode() + b'b\n' * 4
  en = 'A\u202fdog .  \n'.encode() + b'b\n' * 4
  folder = _fake_multi30k(
    tmp_path / 'm30k', **{'train.de.gz': de, 'train.en.gz': en}
  )
  builder = _build(translation.Multi30k, tmp_path, source_dir=folder)
  assert _pairs(builder, 'train', 'de', 'en')[0] == ('Ein Hund.', 'A dog .')


def test_thin_spaces_and_invisible_characters_are_normalised():
  # French typography puts thin spaces before '!' and '?'; fra.txt has them.
  assert translation.normalize_text('Cours\u2009!') == 'Cours !'
  assert translation.normalize_text('1\u2007000\u2060 km') == '1 000 km'
  assert translation.normalize_text('Zusammen\u00adarbeit') == 'Zusammenarbeit'


def test_text_is_composed_to_nfc(tmp_path):
  # 'é' as 'e' + U+0301 (NFD, as text pasted from some PDFs or macOS has it)
  # must be the training text's 'é' and not an unknown character, and one
  # English sentence must land in one split however it is encoded.
  nfd, nfc = 'The re\u0301sume\u0301 is ready.', 'The résumé is ready.'
  assert translation.normalize_text(nfd) == nfc
  lines = [f'{nfd}\tLe CV est pre\u0302t.', f'{nfc}\tLe C.V. est prêt.']
  folder = _anki_file(tmp_path / 'src', lines)
  builder = _build(
    translation.Anki, tmp_path, config='fra-eng', source_dir=folder
  )
  assert _anki_all(builder) == [
    (nfc, 'Le C.V. est prêt.'),
    (nfc, 'Le CV est prêt.'),
  ]
  assert list(builder.info.splits) == [translation.anki_split(nfc)]


def test_multi30k_env_var(tmp_path, monkeypatch):
  _fake_multi30k(tmp_path / 'root' / 'multi30k')
  monkeypatch.setenv(translation.DATA_DIR_ENV, str(tmp_path / 'root'))
  builder = _build(translation.Multi30k, tmp_path)
  assert builder.info.splits['train'].num_examples == 5


def test_multi30k_downloads_without_a_folder(tmp_path, monkeypatch):
  folder = _fake_multi30k(tmp_path / 'm30k')
  requested = {}

  def fake_download(self, url_or_urls):  # No internet here.
    requested.update(url_or_urls)
    return {
      name: folder / url.rsplit('/', 1)[1] for name, url in url_or_urls.items()
    }

  monkeypatch.setattr(tfds.download.DownloadManager, 'download', fake_download)
  builder = _build(translation.Multi30k, tmp_path)
  assert builder.info.splits['test_2016'].num_examples == 2
  assert requested['val.de.gz'] == (
    'https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/'
    'raw/val.de.gz'
  )
  assert sorted(requested) == sorted(translation.MULTI30K_FILES)


def test_multi30k_download_failure_names_the_local_option(
  tmp_path, monkeypatch
):
  import requests

  def offline(self, url_or_urls):
    raise requests.ConnectionError('Failed to resolve raw.githubusercontent')

  monkeypatch.setattr(tfds.download.DownloadManager, 'download', offline)
  with pytest.raises(translation.TranslationDataError) as e:
    _build(translation.Multi30k, tmp_path)
  msg = str(e.value)
  assert 'could not download Multi30k' in msg and 'Failed to resolve' in msg
  assert 'source_dir' in msg and translation.DATA_DIR_ENV in msg
  for name in translation.MULTI30K_FILES:
    assert name in msg


def test_multi30k_corrupt_download_names_its_url(tmp_path, monkeypatch):
  # tfds stores downloads under names of its own; the error must give the
  # file's real address.
  folder = _fake_multi30k(tmp_path / 'm30k')
  (folder / 'val.de.gz').write_bytes(b'truncated')
  cache = tmp_path / 'downloads'
  cache.mkdir()

  def fake_download(self, url_or_urls):
    paths = {}
    for name, url in url_or_urls.items():
      paths[name] = cache / f'raw.githubusercontent.com_{name}.x7Q9ab'
      paths[name].write_bytes((folder / url.rsplit('/', 1)[1]).read_bytes())
    return paths

  monkeypatch.setattr(tfds.download.DownloadManager, 'download', fake_download)
  with pytest.raises(translation.TranslationDataError) as e:
    _build(translation.Multi30k, tmp_path)
  assert str(e.value).endswith(translation.MULTI30K_URL + 'val.de.gz')


def test_multi30k_missing_folder(tmp_path):
  builder = translation.Multi30k(
    data_dir=str(tmp_path / 'tfds'), source_dir=tmp_path / 'nowhere'
  )
  with pytest.raises(translation.TranslationDataError) as e:
    builder.download_and_prepare()
  msg = str(e.value)
  assert 'nowhere' in msg and 'does not exist' in msg
  for name in translation.MULTI30K_FILES:
    assert name in msg
  assert 'github.com/multi30k/dataset' in msg


@pytest.mark.parametrize(
  'split, message',
  [
    ('trian[:2]', "bad split 'trian\\[:2\\]' for multi30k: Unknown split"),
    ('train[:abc]', "bad split 'train\\[:abc\\]' for multi30k: Error parsing"),
  ],
)
def test_multi30k_bad_split_names_it(tmp_path, split, message):
  folder = _fake_multi30k(tmp_path / 'm30k')
  with pytest.raises(translation.TranslationDataError, match=message):
    translation.load_pairs(
      'multi30k', split, data_dir=tmp_path / 'tfds', source_dir=folder
    )


def test_multi30k_missing_file(tmp_path):
  folder = _fake_multi30k(tmp_path / 'm30k')
  os.remove(folder / 'val.en.gz')
  builder = translation.Multi30k(
    data_dir=str(tmp_path / 'tfds'), source_dir=folder
  )
  with pytest.raises(
    translation.TranslationDataError, match='missing val.en.gz'
  ):
    builder.download_and_prepare()


def test_multi30k_corrupt_gzip(tmp_path):
  folder = _fake_multi30k(tmp_path / 'm30k')
  good = (folder / 'train.de.gz').read_bytes()
  (folder / 'train.de.gz').write_bytes(good[: len(good) // 2])
  builder = translation.Multi30k(
    data_dir=str(tmp_path / 'tfds'), source_dir=folder
  )
  with pytest.raises(translation.TranslationDataError) as e:
    builder.download_and_prepare()
  assert 'train.de.gz is not a valid gzip file' in str(e.value)
  assert 'download it again' in str(e.value)


def test_multi30k_not_gzip_at_all(tmp_path):
  folder = _fake_multi30k(tmp_path / 'm30k')
  (folder / 'val.en.gz').write_bytes(b'plain text, not gzip\n')
  builder = translation.Multi30k(
    data_dir=str(tmp_path / 'tfds'), source_dir=folder
  )
  with pytest.raises(translation.TranslationDataError, match='val.en.gz'):
    builder.download_and_prepare()


def test_multi30k_mismatched_line_counts(tmp_path):
  folder = _fake_multi30k(tmp_path / 'm30k', **{'val.en.gz': b'a\nb\n'})
  builder = translation.Multi30k(
    data_dir=str(tmp_path / 'tfds'), source_dir=folder
  )
  with pytest.raises(translation.TranslationDataError) as e:
    builder.download_and_prepare()
  msg = str(e.value)
  assert 'val.de.gz has 3 lines' in msg and 'val.en.gz has 2' in msg


def test_multi30k_empty_split_names_the_files(tmp_path):
  # E.g. a download that wrote empty files: gzip reads them as no lines.
  folder = _fake_multi30k(tmp_path / 'm30k', n=(5, 0, 2))
  builder = translation.Multi30k(
    data_dir=str(tmp_path / 'tfds'), source_dir=folder
  )
  with pytest.raises(
    translation.TranslationDataError, match='val.de.gz / .*val.en.gz hold no'
  ):
    builder.download_and_prepare()


def test_multi30k_bad_utf8_error_names_file_and_line(tmp_path):
  folder = _fake_multi30k(
    tmp_path / 'm30k', **{'train.en.gz': b'a\nb\n\xa3 c\nd\ne\n'}
  )
  builder = translation.Multi30k(
    data_dir=str(tmp_path / 'tfds'), source_dir=folder
  )
  with pytest.raises(translation.TranslationDataError) as e:
    builder.download_and_prepare()
  assert 'train.en.gz, line 3: not valid UTF-8' in str(e.value)
  assert "on_bad_utf8='skip'" in str(e.value)


def test_multi30k_bad_utf8_skip_drops_the_pair(tmp_path, caplog):
  folder = _fake_multi30k(
    tmp_path / 'm30k', **{'train.en.gz': b'a\nb\n\xa3 c\nd\ne\n'}
  )
  with caplog.at_level(logging.WARNING, logger=translation.__name__):
    builder = _build(
      translation.Multi30k, tmp_path, source_dir=folder, on_bad_utf8='skip'
    )
  pairs = _pairs(builder, 'train', 'de', 'en')
  assert [en for _, en in pairs] == ['a', 'b', 'd', 'e']
  assert pairs[2] == ('train de 3', 'd')  # Sides stay aligned.
  assert 'Skipped 1 line pairs that are not valid UTF-8' in caplog.text


def test_bad_option_value():
  with pytest.raises(ValueError, match='on_bad_utf8'):
    translation.Multi30k(on_bad_utf8='ignore')


# Anki on fixtures.

_ANKI_LINES = [
  '\ufeffGo.\tVa !\tCC-BY 2.0 (France) Attribution: tatoeba.org #2877272',
  'Hi.\tSalut\u00a0!',
  '',
  '   ',
  'Run!\tCours\u202f!\u200b',
  'Who?\tQui ?\tCC-BY attribution',
  'Wow!\tÇa alors\u00a0!',
]


def _anki_file(folder, lines, name='fra.txt', raw_tail=b''):
  os.makedirs(folder, exist_ok=True)
  path = folder / name
  path.write_bytes('\n'.join(lines).encode() + b'\n' + raw_tail)
  return folder


def _anki_all(builder, other='fr'):
  pairs = []
  for split in builder.info.splits:  # Tiny files leave some empty.
    pairs += _pairs(builder, split, 'en', other)
  return sorted(pairs)


def test_anki_fixture_formats(tmp_path):
  folder = _anki_file(tmp_path / 'src', _ANKI_LINES)
  builder = _build(
    translation.Anki, tmp_path, config='fra-eng', source_dir=folder
  )
  assert _anki_all(builder) == sorted(
    [
      ('Go.', 'Va !'),
      ('Hi.', 'Salut !'),
      ('Run!', 'Cours !'),
      ('Who?', 'Qui ?'),
      ('Wow!', 'Ça alors !'),
    ]
  )
  for split, info in builder.info.splits.items():
    pairs = _pairs(builder, split, 'en', 'fr')
    assert info.num_examples == len(pairs)
    assert all(translation.anki_split(en) == split for en, _ in pairs)


def test_anki_cmn_config_features(tmp_path):
  folder = _anki_file(
    tmp_path / 'src',
    ['\ufeffHi.\t嗨。\tCC-BY x', 'Run.\t你\u200b好。'],
    'cmn.txt',
  )
  builder = _build(
    translation.Anki, tmp_path, config='cmn-eng', source_dir=folder
  )
  assert set(builder.info.features) == {'en', 'zh'}
  assert _anki_all(builder, 'zh') == [('Hi.', '嗨。'), ('Run.', '你好。')]


@pytest.mark.parametrize(
  'bad_line',
  ['just one column', 'a\tb\tc\td', 'Hello.\t   ', '\tBonjour.'],
)
def test_anki_malformed_line_error(tmp_path, bad_line):
  folder = _anki_file(tmp_path / 'src', ['Go.\tVa !', bad_line, 'Hi.\tSalut !'])
  builder = translation.Anki(
    config='fra-eng', data_dir=str(tmp_path / 'tfds'), source_dir=folder
  )
  with pytest.raises(translation.TranslationDataError) as e:
    builder.download_and_prepare()
  msg = str(e.value)
  assert 'fra.txt, line 2' in msg and "on_bad_line='skip'" in msg


def test_anki_malformed_lines_skip(tmp_path, caplog):
  lines = _ANKI_LINES + ['one column', 'a\tb\tc\td']
  folder = _anki_file(tmp_path / 'src', lines)
  with caplog.at_level(logging.WARNING, logger=translation.__name__):
    builder = _build(
      translation.Anki,
      tmp_path,
      config='fra-eng',
      source_dir=folder,
      on_bad_line='skip',
    )
  assert len(_anki_all(builder)) == 5
  assert 'Skipped 2 malformed lines' in caplog.text


def test_anki_bad_utf8(tmp_path, caplog):
  folder = _anki_file(
    tmp_path / 'src',
    ['Go.\tVa !'],
    raw_tail=b'Caf\xe9.\tCaf\xe9.\nHi.\tSalut\n',
  )
  builder = translation.Anki(
    config='fra-eng', data_dir=str(tmp_path / 'tfds'), source_dir=folder
  )
  with pytest.raises(
    translation.TranslationDataError, match='fra.txt, line 2: not valid UTF-8'
  ):
    builder.download_and_prepare()
  with caplog.at_level(logging.WARNING, logger=translation.__name__):
    builder = _build(
      translation.Anki,
      tmp_path / 'skip',
      config='fra-eng',
      source_dir=folder,
      on_bad_utf8='skip',
    )
  assert _anki_all(builder) == [('Go.', 'Va !'), ('Hi.', 'Salut')]
  assert 'Skipped 1 lines that are not valid UTF-8' in caplog.text


@pytest.mark.parametrize('content', [b'', b'\n\n', b'<html>\n'])
def test_anki_file_without_pairs_is_an_error_not_an_empty_dataset(
  tmp_path, content
):
  folder = tmp_path / 'src'
  folder.mkdir()
  (folder / 'fra.txt').write_bytes(content)
  kwargs = dict(config='fra-eng', source_dir=folder, on_bad_line='skip')
  with pytest.raises(translation.TranslationDataError, match='fra.txt holds'):
    _build(translation.Anki, tmp_path, **kwargs)
  # Nothing was kept: the same data_dir builds once the file is fixed.
  _anki_file(folder, ['Go.\tVa !'])
  assert _anki_all(_build(translation.Anki, tmp_path, **kwargs)) == [
    ('Go.', 'Va !')
  ]


def test_anki_missing_file(tmp_path, monkeypatch):
  builder = translation.Anki(
    config='cmn-eng', data_dir=str(tmp_path / 'tfds'), source_dir=tmp_path
  )
  with pytest.raises(translation.TranslationDataError) as e:
    builder.download_and_prepare()
  assert 'cmn.txt' in str(e.value) and 'manythings.org/anki' in str(e.value)
  builder = translation.Anki(config='fra-eng', data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(
    translation.TranslationDataError, match='ATTNJAX_DATA_DIR'
  ):
    builder.download_and_prepare()


def test_anki_env_var_shared_layout(tmp_path, monkeypatch):
  _anki_file(
    tmp_path / 'root' / 'anki_cmn_eng' / 'attrib_version',
    ['Hi.\t嗨。'],
    'cmn.txt',
  )
  monkeypatch.setenv(translation.DATA_DIR_ENV, str(tmp_path / 'root'))
  builder = _build(translation.Anki, tmp_path, config='cmn-eng')
  assert _anki_all(builder, 'zh') == [('Hi.', '嗨。')]


def test_into_english_no_heldout_source_is_a_training_source(tmp_path, caplog):
  """The split hashes English; fr->en must still hold out only French
  sentences that training never saw."""
  caplog.set_level(logging.INFO, logger=parallel.__name__)
  english = [f'sentence {i}' for i in range(400)]
  in_train = next(e for e in english if translation.anki_split(e) == 'train')
  in_test = next(e for e in english if translation.anki_split(e) == 'test')
  lines = [f'{e}\tphrase {i}' for i, e in enumerate(english)]
  # One French sentence, two English translations in different splits.
  lines += [f'{in_train}\tBonjour !', f'{in_test}\tBonjour !']
  folder = tmp_path / 'anki'
  _anki_file(folder, lines)

  def task(reverse):
    data = parallel.TranslationData(
      task='anki_fra',
      reverse=reverse,
      source_dir=str(folder),
      tfds_dir=str(tmp_path / 'tfds'),
      vocab_size=40,
      max_source_len=32,
      max_target_len=32,
      buckets=(32,),
    )
    return parallel.TranslationTask(data, tmp_path / f'vocab{reverse}')

  def test_sources(task):
    return task.heldout('test', n=None, batch_size=8).sources

  assert 'Bonjour !' not in test_sources(reverse := task(True))
  train = {source for source, _ in reverse._train_pairs()}
  assert 'Bonjour !' in train
  assert not train & set(test_sources(reverse))
  assert 'test: 1 of' in caplog.text and 'left out' in caplog.text
  # English -> French keeps every test pair: English sources never repeat
  # across splits.
  forward = task(False)
  assert in_test in test_sources(forward)
  assert len(test_sources(forward)) == len(test_sources(reverse)) + 1


def test_prepared_dataset_of_other_sources_is_refused(tmp_path):
  """TFDS reuses a prepared dataset; one built from other files or options
  than the ones given now is an error, not the old text served silently."""
  lines = [f'sentence {i}\tphrase {i}' for i in range(40)]
  folder = _anki_file(tmp_path / 'src', lines)
  tfds_dir = tmp_path / 'tfds'

  def load(**kwargs):
    kwargs = {'source_dir': str(folder), **kwargs}
    return translation.load_pairs(
      'anki/fra-eng', 'train', data_dir=tfds_dir, **kwargs
    )

  built = list(load())
  assert list(load()) == built  # reused as it is
  copy = _anki_file(tmp_path / 'copy', lines)
  assert list(load(source_dir=str(copy))) == built  # same bytes: fine
  with pytest.raises(translation.TranslationDataError, match='on_bad_line'):
    load(on_bad_line='skip')
  _anki_file(folder, [*lines, 'New.\tNouveau.'])
  with pytest.raises(
    translation.TranslationDataError,
    match=r'(?s)other source files.*fra\.txt.*tfds_dir',
  ):
    load()
  os.remove(folder / 'fra.txt')  # gone since the build: the build stands
  assert list(load()) == built


def test_multi30k_record_names_files_as_the_dataset_does(tmp_path):
  folder = _fake_multi30k(tmp_path / 'src')
  builder = _build(translation.Multi30k, tmp_path, source_dir=folder)
  record = builder.info.metadata['sources']
  assert sorted(record['files']) == sorted(translation.MULTI30K_FILES)
  assert record['options'] == {'on_bad_utf8': 'error'}


def test_anki_split_is_stable():
  # Pinned: changing the hash or the ratios moves pairs between splits, so
  # it must come with a new builder version.
  assert translation.anki_split('sentence 0') == 'validation'
  assert translation.anki_split('sentence 1') == 'train'
  assert translation.anki_split('sentence 12') == 'test'
  counts = {split: 0 for split in translation.ANKI_SPLIT_PERCENT}
  for i in range(20_000):
    counts[translation.anki_split(f'sentence {i}')] += 1
  for split, percent in translation.ANKI_SPLIT_PERCENT.items():
    assert abs(counts[split] / 20_000 - percent / 100) < 0.01


# parallel_text (your own corpus) on fixtures.


def _corpus(folder, sizes=None, gz=(), languages=('de', 'en'), **files):
  """Writes `{split}.{lang}` files of `sizes[split]` lines (default train
  4, validation 2, no test); names in `gz` are gzipped (written as
  `name.gz`); `files` gives the bytes of a file by name ('train_de')."""
  os.makedirs(folder, exist_ok=True)
  sizes = sizes or {'train': 4, 'validation': 2}
  for split, count in sizes.items():
    for lang in languages:
      name = f'{split}.{lang}'
      lines = ''.join(f'{split} {lang} {i}\n' for i in range(count))
      data = files.get(name.replace('.', '_'), lines.encode())
      if name in gz:
        _write_gz(folder / f'{name}.gz', data)
      else:
        (folder / name).write_bytes(data)
  return folder


def _text_build(tmp_path, folder, languages=('de', 'en'), **kwargs):
  return _build(
    translation.ParallelText,
    tmp_path,
    source_dir=folder,
    languages=languages,
    **kwargs,
  )


def _text_error(tmp_path, folder, languages=('de', 'en')) -> str:
  with pytest.raises(translation.TranslationDataError) as e:
    _text_build(tmp_path, folder, languages)
  return str(e.value)


def test_parallel_text_splits_order_and_gzip(tmp_path):
  sizes = {'train': 5, 'validation': 3, 'test': 2}
  folder = _corpus(tmp_path / 'src', sizes, gz=('validation.en', 'test.de'))
  builder = _text_build(tmp_path, folder)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == sizes
  assert _pairs(builder, 'validation', 'source', 'target') == [
    (f'validation de {i}', f'validation en {i}') for i in range(3)
  ]
  assert sorted(builder.info.metadata['sources']['files']) == [
    'test.de.gz',
    'test.en',
    'train.de',
    'train.en',
    'validation.de',
    'validation.en.gz',
  ]
  options = builder.info.metadata['sources']['options']
  assert options == {'on_bad_utf8': 'error', 'languages': 'de,en'}


def test_parallel_text_without_test_split(tmp_path):
  folder = _corpus(tmp_path / 'src')
  builder = _text_build(tmp_path, folder)
  assert list(builder.info.splits) == ['train', 'validation']

  def load(split):
    return translation.load_pairs(
      'parallel_text',
      split,
      data_dir=tmp_path / 'tfds',
      source_dir=folder,
      languages=('de', 'en'),
    )

  assert len(load('train[:3]')) == 3
  with pytest.raises(
    translation.TranslationDataError,
    match=r"no 'test' split.*train, validation only \(no test\.de / test\.en",
  ):
    load('test[:5]')
  # Split expressions as for any tfds dataset; a missing part is named.
  assert len(load('validation+train[:3]')) == 5
  with pytest.raises(translation.TranslationDataError, match="no 'test' split"):
    load('validation+test')
  # A name outside the layout is tfds's unknown split, not a missing file.
  with pytest.raises(translation.TranslationDataError, match='bad split'):
    load('tarin')


def test_parallel_text_reverse_and_any_language_pair(tmp_path):
  folder = _corpus(tmp_path / 'src', languages=('pt_BR', 'zh-Hans'))
  pairs = translation.load_pairs(
    'parallel_text',
    'validation',
    data_dir=tmp_path / 'tfds',
    source_dir=folder,
    languages=('pt_BR', 'zh-Hans'),
    reverse=True,
  )
  assert list(pairs) == [
    (f'validation zh-Hans {i}', f'validation pt_BR {i}') for i in range(2)
  ]


def test_parallel_text_normalises(tmp_path):
  de = '\ufeffEin\u00a0Hund\u200b.\r\n'.encode() + b'b\n' * 3
  en = 'A dog\u202f.  \n'.encode() + b'b\n' * 3
  folder = _corpus(tmp_path / 'src', gz=('train.en',), train_de=de, train_en=en)
  builder = _text_build(tmp_path, folder)
  assert _pairs(builder, 'train', 'source', 'target')[0] == (
    'Ein Hund.',
    'A dog .',
  )


def test_parallel_text_bad_utf8_error_names_file_and_line(tmp_path):
  folder = _corpus(tmp_path / 'src', train_en=b'a\nb\n\xa3 c\nd\n')
  msg = _text_error(tmp_path, folder)
  assert 'train.en, line 3: not valid UTF-8' in msg
  assert "on_bad_utf8='skip'" in msg


def test_parallel_text_bad_utf8_skip_drops_the_pair(tmp_path, caplog):
  folder = _corpus(tmp_path / 'src', train_en=b'a\nb\n\xa3 c\nd\n')
  with caplog.at_level(logging.WARNING, logger=translation.__name__):
    builder = _text_build(tmp_path, folder, on_bad_utf8='skip')
  pairs = _pairs(builder, 'train', 'source', 'target')
  assert pairs == [
    ('train de 0', 'a'),
    ('train de 1', 'b'),
    ('train de 3', 'd'),
  ]
  assert 'Skipped 1 line pairs that are not valid UTF-8' in caplog.text
  assert builder.info.metadata['sources']['options']['on_bad_utf8'] == 'skip'


def test_parallel_text_mismatched_line_counts(tmp_path):
  folder = _corpus(tmp_path / 'src', validation_en=b'only one\n')
  msg = _text_error(tmp_path, folder)
  assert 'validation.de has 2 lines' in msg
  assert 'validation.en has 1' in msg


def test_parallel_text_missing_folder_and_files(tmp_path):
  msg = _text_error(tmp_path, tmp_path / 'nowhere')
  assert 'nowhere does not exist' in msg
  assert 'train.de, train.en, validation.de, validation.en' in msg
  assert 'optionally test.de, test.en' in msg and '.gz' in msg
  # Another language pair than the files': every file of it is missing.
  folder = _corpus(tmp_path / 'src')
  msg = _text_error(tmp_path, folder, languages=('fr', 'en'))
  assert 'lacks train.fr, validation.fr (or' in msg and '.gz' in msg
  # A test split with one side only is an error, not a split left out.
  (folder / 'test.de').write_bytes(b'x\n')
  assert 'lacks test.en' in _text_error(tmp_path, folder)
  with pytest.raises(translation.TranslationDataError, match='no source_dir'):
    _text_build(tmp_path, None)


def test_parallel_text_gzipped_file_without_gz_suffix(tmp_path):
  # gzip's own bytes are no UTF-8 text: reading them as text named a
  # "bad UTF-8" line 1 and suggested iconv.
  folder = _corpus(tmp_path / 'src', gz=('train.de',))
  os.rename(folder / 'train.de.gz', folder / 'train.de')
  builder = _text_build(tmp_path, folder)
  assert _pairs(builder, 'train', 'source', 'target')[1] == (
    'train de 1',
    'train en 1',
  )


def test_parallel_text_plain_and_gzipped_file_is_ambiguous(tmp_path):
  folder = _corpus(tmp_path / 'src')
  _write_gz(folder / 'train.en.gz', b'train en 0\n')
  msg = _text_error(tmp_path, folder)
  assert 'both train.en and train.en.gz' in msg and 'Remove one' in msg


def test_parallel_text_corrupt_gzip(tmp_path):
  folder = _corpus(tmp_path / 'src', gz=('train.de',))
  good = (folder / 'train.de.gz').read_bytes()
  (folder / 'train.de.gz').write_bytes(good[: len(good) // 2])
  msg = _text_error(tmp_path, folder)
  assert 'train.de.gz is not a valid gzip file' in msg


def test_parallel_text_empty_split_names_the_files(tmp_path):
  folder = _corpus(tmp_path / 'src', {'train': 4, 'validation': 0})
  msg = _text_error(tmp_path, folder)
  assert 'validation.de / ' in msg and 'hold no sentence pairs' in msg


@pytest.mark.parametrize(
  'languages', [(), ('de',), ('de', 'de'), ('de', 'e/n'), ('de', '.en'), 'de']
)
def test_parallel_text_bad_languages(languages):
  with pytest.raises(ValueError, match='two different language codes'):
    translation.ParallelText(languages=languages, source_dir='x')


def test_parallel_text_prepared_for_other_languages_or_files_is_refused(
  tmp_path,
):
  folder = _corpus(tmp_path / 'src', {'train': 4, 'validation': 2})
  _corpus(folder, {'train': 3, 'validation': 1}, languages=('fr',))

  def load(languages=('de', 'en')):
    return translation.load_pairs(
      'parallel_text',
      'train',
      data_dir=tmp_path / 'tfds',
      source_dir=folder,
      languages=languages,
    )

  built = list(load())
  with pytest.raises(
    translation.TranslationDataError,
    match=r'(?s)holds languages de,en, not fr,en.*tfds_dir',
  ):
    load(('fr', 'en'))
  with pytest.raises(translation.TranslationDataError, match='reverse=True'):
    load(('en', 'de'))
  (folder / 'train.en').write_bytes(b'new\n' * 4)
  with pytest.raises(
    translation.TranslationDataError,
    match=r'(?s)other source files.*differing: train\.en\).*tfds_dir',
  ):
    load()
  # The languages are checked even with the build's files gone.
  for name in ('train.de', 'train.en', 'validation.de', 'validation.en'):
    os.remove(folder / name)
  assert list(load()) == built
  with pytest.raises(translation.TranslationDataError, match='not fr,en'):
    load(('fr', 'en'))


@pytest.mark.parametrize(
  'languages, match',
  [
    ((), 'config.data.languages=\\(\\) is invalid'),
    (('de',), 'two different language codes for task parallel_text'),
    (('de', 'de'), 'two different'),
    (('de', 'en/x'), 'two different'),
    (('de', 'en.gz'), 'two different'),
  ],
)
def test_translation_data_parallel_text_needs_two_languages(languages, match):
  with pytest.raises(ValueError, match=match):
    parallel.TranslationData(
      task='parallel_text', source_dir='corpus', languages=languages
    )


def test_translation_data_languages_only_for_parallel_text():
  with pytest.raises(
    ValueError, match=r'config.data.languages=.*\(\) for task multi30k'
  ):
    parallel.TranslationData(task='multi30k', languages=('de', 'en'))
  with pytest.raises(ValueError, match='one of .*parallel_text'):
    parallel.TranslationData(task='wmt14')


def test_translation_data_parallel_text_needs_source_dir():
  with pytest.raises(
    ValueError,
    match=r"(?s)config.data.source_dir='' is invalid.*holding train\.fr, "
    r'train\.en, validation\.fr.*--config\.data\.source_dir=',
  ):
    parallel.TranslationData(task='parallel_text', languages=('fr', 'en'))


@pytest.mark.parametrize(
  'given', ['de,en', ('de,en',), ['de', 'en'], (' de', 'en ')]
)
def test_translation_data_languages_from_the_command_line(given):
  # `--config.data.languages=de,en` arrives as ('de,en',); JSON as a list.
  data = parallel.TranslationData.from_config(
    {'task': 'parallel_text', 'source_dir': 'corpus', 'languages': given}
  )
  assert data.languages == ('de', 'en')


@pytest.mark.parametrize(
  'languages, reverse, target, tokenizer',
  [
    (('de', 'en'), False, 'en', '13a'),
    (('de', 'en'), True, 'de', '13a'),
    (('en', 'zh'), False, 'zh', 'zh'),
    (('zh-Hans', 'en'), True, 'zh-Hans', 'zh'),
  ],
)
def test_parallel_text_target_language_picks_the_bleu_tokenizer(
  languages, reverse, target, tokenizer
):
  data = parallel.TranslationData(
    task='parallel_text',
    source_dir='corpus',
    languages=languages,
    reverse=reverse,
  )
  assert parallel.target_language(data) == target
  assert parallel.bleu_tokenizer(data) == tokenizer
  # A tokeniser given by name wins over the language.
  char = dataclasses.replace(data, bleu_tokenize='char')
  assert parallel.bleu_tokenizer(char) == 'char'
  anki = parallel.TranslationData(task='anki_cmn', reverse=reverse)
  assert parallel.target_language(anki) == ('en' if reverse else 'zh')
  assert parallel.bleu_tokenizer(anki) == ('13a' if reverse else 'zh')


def test_unknown_or_unusable_bleu_tokenizer_is_refused():
  with pytest.raises(ValueError, match=r"bleu_tokenize='nope'.*13a.*char"):
    parallel.TranslationData(task='multi30k', bleu_tokenize='nope')
  if importlib.util.find_spec('MeCab') is not None:
    pytest.skip('MeCab is installed: ja-mecab can run here.')
  data = parallel.TranslationData(task='multi30k', bleu_tokenize='ja-mecab')
  with pytest.raises(ValueError, match="'ja-mecab' cannot run here"):
    parallel.bleu_tokenizer(data)


# The shared copies.

needs_shared = pytest.mark.skipif(
  not MULTI30K_DIR.is_dir(), reason='../shared/data is not available'
)


def _gz_first_line(path):
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    return f.readline().rstrip('\n')


@needs_shared
def test_multi30k_shared_copy(tmp_path):
  data_dir = tmp_path / 'tfds'
  expected = {'train': 29_000, 'validation': 1_014, 'test_2016': 1_000}
  for split, stem in translation.MULTI30K_SPLITS.items():
    pairs = translation.load_pairs(
      'multi30k', split, data_dir=data_dir, source_dir=MULTI30K_DIR
    )
    assert len(pairs) == expected[split]
    assert pairs[0] == (
      _gz_first_line(MULTI30K_DIR / f'{stem}.de.gz'),
      _gz_first_line(MULTI30K_DIR / f'{stem}.en.gz'),
    )
  pairs = translation.load_pairs(
    'multi30k', 'train[-1:]', data_dir=data_dir, reverse=True
  )
  assert pairs[0] == (
    'A man in shorts and a Hawaiian shirt leans over the rail of a pilot '
    'boat, with fog and mountains in the background.',
    'Ein Mann in Shorts und Hawaiihemd lehnt sich über das Geländer eines '
    'Lotsenboots, mit Nebel und Bergen im Hintergrund.',
  )


@pytest.fixture(scope='module')
def fra_builds(tmp_path_factory):
  """The shared fra.txt built twice, in two data_dirs (about 10 s each)."""
  if not FRA_DIR.is_dir():
    pytest.skip('../shared/data is not available')
  return [
    _build(
      translation.Anki,
      tmp_path_factory.mktemp(f'fra{i}'),
      config='fra-eng',
      source_dir=FRA_DIR,
    )
    for i in range(2)
  ]


def _valid_anki_lines(path):
  with open(path, encoding='utf-8-sig') as f:
    lines = f.read().split('\n')
  return sum(
    len(cols) in (2, 3) and all(translation.normalize_text(c) for c in cols[:2])
    for cols in (line.split('\t') for line in lines if line.strip())
  )


def _record_files(builder):
  return {
    path.name: path.read_bytes()
    for path in sorted(builder.data_path.glob('*.array_record*'))
  }


def test_anki_fra_shared_copy(fra_builds):
  first, second = fra_builds
  splits = {
    split: list(
      translation.load_pairs(
        'anki/fra-eng', split, data_dir=first.data_dir_root
      )
    )
    for split in translation.ANKI_SPLIT_PERCENT
  }
  total = sum(len(p) for p in splits.values())
  assert total == _valid_anki_lines(FRA_DIR / 'fra.txt') == 167_130
  # Disjoint, also by English sentence (no source leaks into test).
  english = {split: {en for en, _ in p} for split, p in splits.items()}
  assert not english['train'] & english['validation']
  assert not english['train'] & english['test']
  assert not english['validation'] & english['test']
  assert len(splits['train']) > 0.85 * total
  # Deterministic: a second build writes the same bytes (examples, order).
  records = _record_files(first)
  assert len(records) == 3
  assert records == _record_files(second)
  # Normalised: no no-break or zero-width spaces left.
  text = '\n'.join(s for pairs in splits.values() for p in pairs for s in p)
  assert not any(c in text for c in ('\u00a0', '\u202f', '\u200b', '\ufeff'))


@needs_shared
def test_anki_cmn_shared_copy(tmp_path):
  builder = _build(
    translation.Anki, tmp_path, config='cmn-eng', source_dir=CMN_DIR
  )
  total = sum(s.num_examples for s in builder.info.splits.values())
  assert total == _valid_anki_lines(CMN_DIR / 'cmn.txt') == 29_155
  pairs = translation.load_pairs(
    'anki/cmn-eng', 'test', data_dir=tmp_path / 'tfds'
  )
  assert len(pairs) == builder.info.splits['test'].num_examples
  assert all('\u200b' not in zh for _, zh in pairs)
