"""SentencePiece vocabularies (`attnjax.data.tokenizer`) on in-test text."""

import pytest

from attnjax.data import tokenizer
from attnjax.data.vocab import BOS_ID, EOS_ID, PAD_ID

TEXTS = [
  '住手！你好，朋友？',
  'Il a dit… « oui ».',
  'Two dogs play in the snow.',
  'Zwei Hunde spielen im Schnee.',
] * 40


@pytest.fixture(scope='module')
def vocab(tmp_path_factory):
  path = tmp_path_factory.mktemp('vocab') / 'joint.model'
  return tokenizer.train_vocab(TEXTS, path, vocab_size=40)


def test_special_ids_come_first(vocab):
  assert vocab.pieces([PAD_ID, BOS_ID, EOS_ID, tokenizer.UNK_ID]) == [
    '<pad>',
    '<s>',
    '</s>',
    '<unk>',
  ]
  assert vocab.size == 40


@pytest.mark.parametrize('text', TEXTS[:4])
def test_round_trip_keeps_the_text_exactly(vocab, text):
  # No NFKC: full-width punctuation and the ellipsis come back unchanged,
  # so BLEU compares decoded text with raw references like for like.
  ids = vocab.encode(text)
  assert min(ids) > tokenizer.UNK_ID
  assert vocab.decode(ids) == text
  assert vocab.decode([BOS_ID, *ids, EOS_ID, 9, PAD_ID]) == text


def test_unknown_characters_map_to_unk(vocab):
  assert tokenizer.UNK_ID in vocab.encode('λ')


def test_training_is_deterministic(vocab, tmp_path):
  again = tokenizer.train_vocab(TEXTS, tmp_path / 'again.model', vocab_size=40)
  assert again.digest == vocab.digest
  assert again == vocab
  assert not list(tmp_path.glob('*.partial'))


def test_bad_arguments_and_files(tmp_path):
  with pytest.raises(ValueError, match='within the bounds'):
    tokenizer.train_vocab(TEXTS, tmp_path / 'big.model', vocab_size=5000)
  with pytest.raises(ValueError, match='model_type'):
    tokenizer.train_vocab(TEXTS, tmp_path / 'x.model', vocab_size=40,
                          model_type='wordpiece')  # fmt: skip
  with pytest.raises(FileNotFoundError, match='no SentencePiece model'):
    tokenizer.SubwordVocab(tmp_path / 'missing.model')
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='not a SentencePiece model'):
    tokenizer.SubwordVocab(bad)
