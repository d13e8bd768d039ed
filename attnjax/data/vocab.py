"""Character-level vocabulary for the synthetic tasks.

Ids 0, 1 and 2 are reserved for PAD, BOS and EOS; the alphabet's characters
follow in order, so `CharVocab('ab')` maps 'a' -> 3 and 'b' -> 4. PAD is 0 so
that `ids != PAD_ID` is the length mask everywhere in attnjax.
"""

from collections.abc import Iterable
from typing import Any

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL = 3


def text_ids(ids: Iterable[int] | np.ndarray) -> list[int]:
  """The ids of one sequence that carry text: those before the first EOS,
  without PAD and BOS (a padded target row, an output that starts with BOS).

  Raises:
    ValueError: `ids` is not one sequence of integers.
  """
  array = np.asarray(ids)
  if array.ndim != 1 or not (
    array.size == 0 or np.issubdtype(array.dtype, np.integer)
  ):
    raise ValueError(
      f'decode takes one sequence of integer ids; got an array of shape '
      f'{array.shape} and dtype {array.dtype} (decode each row on its own).'
    )
  kept = []
  for i in array.tolist():
    if i == EOS_ID:
      break
    if i not in (PAD_ID, BOS_ID):
      kept.append(i)
  return kept


def check_alphabet(alphabet: Any, field: str = 'alphabet') -> str:
  """Returns `alphabet` if it is a usable alphabet, else raises ValueError.

  Args:
    alphabet: a string of distinct, printable characters.
    field: the name to use for the argument in error messages.
  """
  if not isinstance(alphabet, str):
    raise ValueError(
      f'{field} must be a string of characters, got {type(alphabet).__name__}'
      f' {alphabet!r}; pass e.g. {field}="abc".'
    )
  if not alphabet:
    raise ValueError(
      f'{field} is empty; pass at least one character, e.g. {field}="abc".'
    )
  duplicates = sorted({c for c in alphabet if alphabet.count(c) > 1})
  if duplicates:
    raise ValueError(
      f'{field} {alphabet!r} repeats the characters '
      f'{", ".join(map(repr, duplicates))}; list each character once.'
    )
  # Control characters (newline, tab, ...) would make printed examples and
  # attention plots ambiguous: one character must look like one cell.
  unprintable = [c for c in alphabet if not c.isprintable()]
  if unprintable:
    raise ValueError(
      f'{field} {alphabet!r} holds non-printable characters '
      f'{", ".join(map(repr, unprintable))}; use printable characters only.'
    )
  return alphabet


class CharVocab:
  """Maps text over a fixed alphabet to ids and back.

  Ids: 0 = PAD, 1 = BOS, 2 = EOS, then one id per alphabet character, in
  alphabet order.
  """

  def __init__(self, alphabet: str):
    self._alphabet = check_alphabet(alphabet)
    self._char_to_id = {c: i + NUM_SPECIAL for i, c in enumerate(alphabet)}

  @property
  def alphabet(self) -> str:
    """The characters, in id order (the first has id `NUM_SPECIAL`)."""
    return self._alphabet

  @property
  def size(self) -> int:
    """Number of ids, the special ones included."""
    return NUM_SPECIAL + len(self._alphabet)

  def encode(self, text: str) -> list[int]:
    """Returns the ids of `text`, one per character, without BOS or EOS.

    Raises:
      ValueError: `text` is empty or holds characters not in the alphabet
        (all of them are named).
    """
    if not text:
      raise ValueError('empty input: there is nothing to encode.')
    unknown = sorted({c for c in text if c not in self._char_to_id})
    if unknown:
      raise ValueError(
        f'text {text!r} holds characters not in the alphabet: '
        f'{", ".join(map(repr, unknown))}; the alphabet is '
        f'{self._alphabet!r}.'
      )
    return [self._char_to_id[c] for c in text]

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Returns the text of `ids` (see `text_ids`).

    Raises:
      ValueError: not one sequence of ids, or an id outside `[0, size)`.
    """
    chars = []
    for i in text_ids(ids):
      if not NUM_SPECIAL <= i < self.size:
        raise ValueError(
          f'id {i} is outside this vocabulary (ids 0..{self.size - 1}).'
        )
      chars.append(self._alphabet[i - NUM_SPECIAL])
    return ''.join(chars)

  def to_json(self) -> dict[str, Any]:
    """Returns a JSON-serialisable dict that `from_json` reads back."""
    return {
      'type': 'char',
      'alphabet': self._alphabet,
      'pad_id': PAD_ID,
      'bos_id': BOS_ID,
      'eos_id': EOS_ID,
    }

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> 'CharVocab':
    """Inverse of `to_json`.

    Raises:
      ValueError: `data` is not a saved `CharVocab`, or its special ids differ
        from this version's (the saved run would decode wrongly).
    """
    if data.get('type') != 'char' or 'alphabet' not in data:
      raise ValueError(
        f'not a saved CharVocab (want type "char" and an alphabet): {data!r}'
      )
    saved = (data.get('pad_id'), data.get('bos_id'), data.get('eos_id'))
    if saved != (PAD_ID, BOS_ID, EOS_ID):
      raise ValueError(
        f'saved special ids (pad, bos, eos) = {saved} differ from '
        f'{(PAD_ID, BOS_ID, EOS_ID)}; the vocabulary is incompatible.'
      )
    return cls(data['alphabet'])

  def __eq__(self, other: object) -> bool:
    return isinstance(other, CharVocab) and other._alphabet == self._alphabet

  def __hash__(self) -> int:
    return hash(('CharVocab', self._alphabet))

  def __repr__(self) -> str:
    return f'CharVocab({self._alphabet!r})'
