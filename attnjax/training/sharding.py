"""Device mesh and shardings.

Parameters carry logical axis names (see `attnjax.layers` and the models);
`LOGICAL_RULES` maps them onto the mesh axes `data` and `model`. Batches are
split over `data`. A dim whose size the mesh axis does not divide is left
unsharded (replicated) rather than padded.
"""

import logging

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array

DATA, MODEL = 'data', 'model'

# logical axis name -> mesh axis (None: replicated).
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
  ('batch', DATA),
  ('vocab', MODEL),
  ('mlp', MODEL),
  ('heads', MODEL),
  ('embed', None),
  ('kv', None),
  ('score_hidden', None),
)


def make_mesh(data: int, model: int, num_devices: int = 0) -> Mesh:
  """A `data` x `model` mesh over the first `num_devices` devices (0: all).

  `data=-1` takes every device the model axis leaves.
  """
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(
        f'mesh.num_devices={num_devices} but only {len(devices)} devices '
        'are present; lower it or set 0 to use all of them.'
      )
    devices = devices[:num_devices]
  n = len(devices)
  if model < 1 or (data < 1 and data != -1):
    raise ValueError(
      f'mesh.data must be >= 1 or -1 and mesh.model >= 1; got data={data}, '
      f'model={model}.'
    )
  if data == -1:
    if n % model:
      fix = f'choose a divisor of {n}'
      if model <= len(jax.devices()):  # Else no device count is a multiple.
        fix += f', or set mesh.num_devices to a multiple of {model}'
      raise ValueError(
        f'mesh.model={model} does not divide the {n} devices in use '
        f'(mesh.data=-1 takes the rest): {fix}.'
      )
    data = n // model
  if data * model != n:
    raise ValueError(
      f'mesh data={data} x model={model} needs {data * model} devices but '
      f'{n} are in use. Choose sizes whose product is {n} (mesh.data=-1 '
      'takes whatever the model axis leaves).'
    )
  grid = np.asarray(devices).reshape(data, model)
  return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dim."""
  fitted = []
  padded = tuple(spec) + (None,) * (len(shape) - len(spec))
  for dim, axes in zip(shape, padded, strict=True):
    names = (axes,) if isinstance(axes, str) else (axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(axes if dim % size == 0 else None)
  return P(*fitted)


def state_shardings(abstract_state, mesh: Mesh):
  """Mesh shardings for a (boxed, abstract) train state."""
  logical = nn.get_partition_spec(abstract_state)
  mesh_specs = nn.logical_to_mesh(logical, LOGICAL_RULES)
  unboxed = nn.meta.unbox(abstract_state)
  dropped = []

  def to_sharding(spec, leaf):
    shape = getattr(leaf, 'shape', ())
    fitted = _fit_spec(spec, shape, mesh) if spec is not None else P()
    if spec is not None and fitted != P(*spec) and any(spec):
      dropped.append((shape, spec))
    return NamedSharding(mesh, fitted)

  shardings = jax.tree.map(
    to_sharding,
    mesh_specs,
    unboxed,
    is_leaf=lambda x: isinstance(x, P) or x is None,
  )
  if dropped:
    logging.info(
      '%d parameters kept replicated on a mesh axis that does not divide '
      'them, e.g. shape %s with spec %s.',
      len(dropped),
      *dropped[0],
    )
  return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
  """Which rows of each global batch this process must supply.

  Returns `(index, count)`: the process holds rows
  `[index * B / count, (index + 1) * B / count)` of a global batch of B rows.
  Processes whose devices share a `data` shard (a model axis spanning hosts)
  get the same rows, as `jax.make_array_from_process_local_data` requires.
  """
  indices = batch_sharding(mesh).addressable_devices_indices_map(
    (global_batch_size,)
  )
  bounds = [idx[0].indices(global_batch_size)[:2] for idx in indices.values()]
  start = min(b[0] for b in bounds)
  stop = max(b[1] for b in bounds)
  size = stop - start
  covered = set()
  for lo, hi in bounds:
    covered.update(range(lo, hi))
  if (
    covered != set(range(start, stop))
    or start % size
    or (global_batch_size % size)
  ):
    raise ValueError(
      f"this process's devices hold rows {sorted(bounds)} of the batch, not "
      'one contiguous block; order the devices so that each process owns '
      'whole data shards.'
    )
  return start // size, global_batch_size // size


def global_batch(
  local: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int
) -> dict[str, Array]:
  """Assembles each process's rows of the batch into global arrays."""
  sharding = batch_sharding(mesh)
  return {
    name: jax.make_array_from_process_local_data(
      sharding, value, (global_batch_size, *value.shape[1:])
    )
    for name, value in local.items()
  }
