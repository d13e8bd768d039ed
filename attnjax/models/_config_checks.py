"""Field checks shared by the model config dataclasses.

Each raises ValueError naming the class, the field and what it must be, so
that a bad config fails before anything is built.
"""

from collections.abc import Iterable
from typing import Any


def is_int(value: Any) -> bool:
  """An int that is not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


def _name(config: Any, field: str) -> str:
  return f'{type(config).__name__}.{field}'


def ints(config: Any, fields: Iterable[str], minimum: int) -> None:
  """Each field is an integer >= `minimum`."""
  for field in fields:
    value = getattr(config, field)
    if not is_int(value) or value < minimum:
      raise ValueError(
        f'{_name(config, field)} must be an integer >= {minimum}; got '
        f'{value!r}.'
      )


def bools(config: Any, fields: Iterable[str]) -> None:
  """Each field is True or False."""
  for field in fields:
    value = getattr(config, field)
    if not isinstance(value, bool):
      raise ValueError(
        f'{_name(config, field)} must be True or False; got {value!r}.'
      )


def rates(config: Any, fields: Iterable[str]) -> None:
  """Each field is a number in [0, 1) (a dropout rate)."""
  for field in fields:
    rate = getattr(config, field)
    if isinstance(rate, bool) or not isinstance(rate, int | float):
      raise ValueError(
        f'{_name(config, field)} must be a number in [0, 1); got {rate!r}.'
      )
    if not 0 <= rate < 1:
      raise ValueError(
        f'{_name(config, field)} must be in [0, 1); got {rate!r}.'
      )


def special_ids(config: Any) -> None:
  """pad_id, bos_id and eos_id differ and fit both vocabularies.

  BOS/EOS never occur in the source, but PAD does; a shared id space keeps
  the data layer simple, so all three must fit both.
  """
  ids = {
    'pad_id': config.pad_id,
    'bos_id': config.bos_id,
    'eos_id': config.eos_id,
  }
  ints(config, ids, 0)
  for field, value in ids.items():
    for vocab in ('source_vocab_size', 'target_vocab_size'):
      size = getattr(config, vocab)
      if value >= size:
        raise ValueError(
          f'{_name(config, field)}={value} must be < {vocab}={size}.'
        )
  if len(set(ids.values())) != 3:
    raise ValueError(
      f'{type(config).__name__} pad_id, bos_id and eos_id must differ; got '
      f'{ids}.'
    )
