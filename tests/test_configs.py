"""Every experiment config, with every model variant, builds a model."""

import functools
import importlib
import pathlib
import sys
import types

import jax
import pytest

from attnjax import train_lib
from attnjax.data import parallel
from attnjax.data import vocab as vocab_lib
from attnjax.training import optim, sharding

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import base  # noqa: E402

TASKS = ('addition', 'reverse', 'copy', 'sort')


@pytest.mark.parametrize('size', ['', 'tiny'])
@pytest.mark.parametrize('task', TASKS)
def test_every_variant_builds(task, size):
  module = importlib.import_module(f'configs.{task}')
  for name in ['', *base.VARIANTS]:
    argument = ','.join(part for part in (name, size) if part)
    config = module.get_config(argument)
    train_lib.validate_config(config)
    # Builds the model, its abstract train state and the state's shardings
    # from the parameters' logical axes, without computing anything.
    exp = train_lib.Experiment.create(config)
    if name:
      for field, value in base.VARIANTS[name].items():
        assert getattr(exp.model.config, field) == value, (argument, field)
    assert jax.tree.leaves(exp.state_shardings.params), argument


@pytest.mark.parametrize(
  'argument', ['nope', 'bahdanau,luong_dot', 'tiny,small']
)
def test_unknown_variant_is_refused(argument):
  from configs import addition

  with pytest.raises(ValueError, match='unknown config variant'):
    addition.get_config(argument)


TRANSLATION_CONFIGS = (
  'multi30k_transformer',
  'multi30k_bahdanau',
  'anki_fra_transformer',
  'anki_cmn_transformer',
  'text_transformer',
)


@pytest.mark.parametrize('size', ['', 'tiny'])
@pytest.mark.parametrize('name', TRANSLATION_CONFIGS)
def test_translation_configs_build(name, size):
  """Shapes only: a stand-in task with the configured vocabulary sizes, so
  no data is read and no vocabulary trained."""
  config = importlib.import_module(f'configs.{name}').get_config(size)
  if config.data.task == 'parallel_text':  # Set on the command line.
    config.data.source_dir = '/path/to/corpus'
    config.data.languages = ('de', 'en')
  train_lib.validate_config(config)
  data = parallel.TranslationData.from_config(config.data)
  vocab = types.SimpleNamespace(size=data.vocab_size)
  task = types.SimpleNamespace(
    source_vocab=vocab,
    target_vocab=vocab,
    max_source_len=data.max_source_len,
    max_target_len=data.max_target_len,
  )
  model = train_lib.build_model(config, task)
  assert train_lib.model_name(config) in name
  tx = optim.make_optimizer(config.optimizer, config.num_train_steps)
  abstract = jax.eval_shape(
    functools.partial(train_lib._init_state, model, tx, task),
    jax.random.key(0),
  )
  mesh = sharding.make_mesh(-1, 1)
  assert jax.tree.leaves(sharding.state_shardings(abstract, mesh).params)
  # Every bucket fits the model's positions.
  assert max(data.buckets[:-1], default=0) <= data.max_len


@pytest.mark.parametrize('size', ['', 'tiny'])
def test_text_transformer_takes_its_corpus_from_the_command_line(
  size, monkeypatch
):
  """As train.py parses it; without the corpus the error says what to set."""
  from absl import flags
  from ml_collections import config_flags

  def parse(*overrides):
    path = pathlib.Path(base.__file__).with_name('text_transformer.py')
    argv = ['train.py', f'--config={path}:{size}'.rstrip(':'), *overrides]
    # config_flags finds the --config.* overrides in sys.argv.
    monkeypatch.setattr(sys, 'argv', argv)
    flag_values = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
      'config', flag_values=flag_values, lock_config=True
    )
    flag_values(argv)
    return parallel.TranslationData.from_config(config.value.data)

  data = parse(
    '--config.data.source_dir=/path/to/corpus', '--config.data.languages=de,en'
  )
  assert (data.task, data.languages) == ('parallel_text', ('de', 'en'))
  assert data.source_dir == '/path/to/corpus'
  with pytest.raises(ValueError, match=r'--config\.data\.languages=de,en'):
    parse()
  with pytest.raises(
    ValueError, match=r'(?s)source_dir.*train\.de.*--config\.data\.source_dir'
  ):
    parse('--config.data.languages=de,en')


@pytest.mark.parametrize('name', TRANSLATION_CONFIGS)
def test_translation_configs_refuse_rnn_variants(name):
  module = importlib.import_module(f'configs.{name}')
  with pytest.raises(ValueError, match='only "tiny"'):
    module.get_config('bahdanau')


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('eos_id', 7, 'config.model.eos_id=7 differs'),
    ('pad_id', 3, 'config.model.pad_id=3 differs'),
    ('share_embeddings', True, 'joint_vocab=True'),
  ],
)
def test_model_fields_that_disagree_with_the_vocabularies(field, value, match):
  """Separate source and target vocabularies (of one size) cannot share an
  embedding, and the model's special ids are the vocabularies'."""
  config = importlib.import_module('configs.multi30k_transformer').get_config(
    'tiny'
  )
  config.model.share_embeddings = False
  config.model[field] = value
  task = types.SimpleNamespace(
    source_vocab=types.SimpleNamespace(size=64, language='de'),
    target_vocab=types.SimpleNamespace(size=64, language='en'),
    max_source_len=8,
    max_target_len=8,
  )
  with pytest.raises(ValueError, match=match):
    train_lib.build_model(config, task)
  config.model[field] = (
    False if field == 'share_embeddings' else getattr(vocab_lib, field.upper())
  )
  train_lib.build_model(config, task)
