"""The train state's shardings come from the parameters' logical axes."""

import logging
import pathlib
import sys

import jax
import optax
from jax.sharding import PartitionSpec as P

from attnjax import train_lib
from attnjax.training import sharding

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import addition  # noqa: E402


def _specs(tree) -> dict[str, P]:
  return {
    jax.tree_util.keystr(path): leaf.spec
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_state_is_split_over_the_model_axis_where_it_divides(caplog):
  config = addition.get_config('tiny')
  config.mesh.data, config.mesh.model = 4, 2
  caplog.set_level(logging.INFO)
  exp = train_lib.Experiment.create(config)
  params = _specs(exp.state_shardings.params)
  split = [name for name, spec in params.items() if sharding.MODEL in spec]
  # The recurrent kernels' gate axis ('mlp') is split over `model`.
  assert "['decoder']['cells_0']['hi']['kernel']" in ' '.join(split)
  assert params["['decoder']['cells_0']['hi']['kernel']"] == P(None, 'model')
  # No parameter is split over `data`: data parallelism replicates them.
  assert not any(sharding.DATA in spec for spec in params.values())
  # The vocabulary (15 ids) does not split in 2: kept whole, with a count.
  assert exp.task.vocab.size % 2
  assert params["['decoder']['output_proj']['kernel']"] == P(None, None)
  assert params["['encoder']['embed']['embedding']"] == P(None, None)
  # 4 arrays with a vocabulary axis, and Adam's 2 moments of each.
  assert '12 parameters kept replicated on a mesh axis' in caplog.text
  # Adam's moments are laid out as the parameters they follow.
  for moment in ('mu', 'nu'):
    (tree,) = optax.tree_utils.tree_get_all_with_path(
      exp.state_shardings.opt_state, moment
    )
    assert _specs(tree[1]) == params
  assert sharding.batch_sharding(exp.mesh).spec == P('data')
