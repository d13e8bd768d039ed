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
    task_ = train_lib.make_task(config)
    model = train_lib.build_model(config, task_)
    if name:
      for field, value in base.VARIANTS[name].items():
        assert getattr(model.config, field) == value, (argument, field)
    batch = train_lib._dummy_batch(task_)
    init = jax.eval_shape(
      lambda key, m=model, b=batch: m.init(
        key, b['inputs'], b['targets'], train=False
      ),
      jax.random.key(0),
    )
    assert init['params'], argument


@pytest.mark.parametrize(
  'argument', ['nope', 'bahdanau,luong_dot', 'tiny,small']
)
def test_unknown_variant_is_refused(argument):
  from configs import addition

  with pytest.raises(ValueError, match='unknown config variant'):
    addition.get_config(argument)
