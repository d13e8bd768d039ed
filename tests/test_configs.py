"""Every experiment config, with every model variant, builds a model."""

import importlib
import pathlib
import sys

import jax
import pytest

from attnjax import train_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import base  # noqa: E402

TASKS = ('addition', 'reverse', 'copy')


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
