"""Synthetic sequence-to-sequence tasks, generated in process from a seed.

Every task maps a source string to a target string over a small character
alphabet:

- `addition`: seed 000's Keras example, e.g. ' 12+345' -> ' 357';
- `copy`, `reverse`, `sort`: a random string -> itself, reversed, or sorted.

Training examples are an infinite stream: example `i` is a pure function of
`(seed, stream_seed, i)`, drawn from its own `random.Random` (seeding one costs
about 10 us, a fifth of `np.random.default_rng`, which dominated batch time).

The held-out set is fixed and disjoint from every training example *by
construction*: a stable hash of the source string puts about 2.5% of all
sources in a held-out partition, training draws redraw until they leave it,
and held-out examples come only from it.

`encode_batch` turns examples into the arrays the models read:
`{'inputs': int32 [batch, max_source_len], 'targets': int32 [batch,
max_target_len]}`.
"""

import abc
import dataclasses
import inspect
import itertools
import random
import string
import zlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np

from attnjax.data.vocab import EOS_ID, PAD_ID, CharVocab, check_alphabet

# Sources whose salted CRC32 is below this, out of 1000, are held out.
HELDOUT_PER_MILLE = 25
# Input spaces up to this size are enumerated to find the held-out set exactly;
# larger ones are sampled.
_ENUMERATE_LIMIT = 200_000

ADDITION_ALPHABET = '0123456789+ '


class HeldoutTooLarge(ValueError):
  """More held-out examples asked for than a task has."""


def _check_int(value: Any, field: str, minimum: int, fix: str) -> int:
  """Returns `value` as an int if it is an integer >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise ValueError(
      f'{field} must be an integer, got {type(value).__name__} {value!r}; {fix}'
    )
  if value < minimum:
    raise ValueError(f'{field} must be >= {minimum}, got {value}; {fix}')
  return int(value)


def _partition_salt(name: str) -> int:
  return zlib.crc32(f'attnjax.data.synthetic/{name}'.encode())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task(abc.ABC):
  """A synthetic task: an infinite training stream and a fixed held-out set.

  Attributes:
    name: the registry name, e.g. 'addition'.
    vocab: the character vocabulary of sources and targets.
    max_source_len: length of every encoded source row.
    max_target_len: length of every encoded target row, EOS included.
    seed: selects the training stream; the held-out set does not depend on
      it, so runs with different seeds are evaluated on the same examples.
  """

  name: ClassVar[str]
  seed: int = 0

  def __post_init__(self):
    _check_int(self.seed, 'seed', 0, 'pass a non-negative seed, e.g. seed=0.')
    self._check_fields()
    # A tiny input space may hash entirely into the held-out partition; the
    # training stream would then never find a source.
    if self.num_sources() <= _ENUMERATE_LIMIT and all(
      map(self.is_heldout, self._all_sources())
    ):
      raise ValueError(
        f'{self!r} has {self.num_sources()} possible sources, all held out, '
        'so it has no training examples; enlarge the input space '
        '(a longer alphabet, max_len or largest).'
      )

  # --- What each task defines. ---

  @property
  @abc.abstractmethod
  def vocab(self) -> CharVocab:
    """The vocabulary of sources and targets."""

  @property
  @abc.abstractmethod
  def max_source_len(self) -> int:
    """Length of every encoded source row."""

  @property
  @abc.abstractmethod
  def max_target_len(self) -> int:
    """Length of every encoded target row, the EOS included."""

  @abc.abstractmethod
  def target(self, source: str) -> str:
    """Returns the target text of `source`."""

  @abc.abstractmethod
  def num_sources(self) -> int:
    """Returns how many distinct sources the task can draw."""

  @abc.abstractmethod
  def _check_fields(self) -> None:
    """Raises ValueError naming a bad field and its fix."""

  @abc.abstractmethod
  def _draw_source(self, rng: random.Random) -> str:
    """Draws one source from the whole input space."""

  @abc.abstractmethod
  def _all_sources(self) -> Iterator[str]:
    """Yields every possible source once, in a fixed order."""

  # --- Shared machinery. ---

  # The held-out splits `attnjax evaluate --split` accepts: one, fixed.
  splits: ClassVar[tuple[str, ...]] = ('test',)
  # The names of the scores `score` returns.
  SCORES: ClassVar[tuple[str, ...]] = ('exact_match',)

  @property
  def source_vocab(self) -> CharVocab:
    """The vocabulary of sources (the same as of targets)."""
    return self.vocab

  @property
  def target_vocab(self) -> CharVocab:
    """The vocabulary of targets (the same as of sources)."""
    return self.vocab

  def score(
    self, predictions: list[str], references: list[str]
  ) -> dict[str, float]:
    """{'exact_match': the share of predictions equal to their reference}."""
    right = sum(p == r for p, r in zip(predictions, references, strict=True))
    return {'exact_match': right / max(len(references), 1)}

  def format_source(self, text: str) -> str:
    """A user-given source written as the training sources are."""
    return text

  def prepare_source(self, text: str) -> list[int]:
    """Token ids of a user-given source (e.g. from `attnjax decode`).

    Raises:
      ValueError: empty input, characters outside the alphabet, or a source
        longer than the task's sources.
    """
    self._check_characters(text)
    ids = self.vocab.encode(self.format_source(text))
    if len(ids) > self.max_source_len:
      raise ValueError(
        f'input {text!r} is too long: {len(ids)} characters where the '
        f'{self.name} task allows at most {self.max_source_len}.'
      )
    return ids

  def _check_characters(self, text: str) -> None:
    """Raises ValueError for a blank `text` or one with characters outside
    the alphabet (named as given, not as `format_source` pads them)."""
    if not text.strip():
      raise ValueError('empty input: give a non-blank source string.')
    self.vocab.encode(text.strip())

  def source_as_read(self, text: str) -> str:
    """`text` itself: a synthetic task refuses a source that does not fit
    rather than cut it."""
    return text

  def is_heldout(self, source: str) -> bool:
    """Whether `source` is in the held-out partition (about 2.5%)."""
    crc = zlib.crc32(source.encode(), _partition_salt(self.name))
    return crc % 1000 < HELDOUT_PER_MILLE

  def train_example(
    self, index: int, *, stream_seed: int = 0
  ) -> tuple[str, str]:
    """Returns training example `index` as (source text, target text).

    A pure function of `(self.seed, stream_seed, index)`; never a held-out
    source.

    Args:
      index: position in the infinite stream, >= 0.
      stream_seed: selects one of many streams of the same task; the input
        pipeline passes its own seed here.
    """
    index = _check_int(index, 'index', 0, 'pass index >= 0.')
    stream_seed = _check_int(
      stream_seed, 'stream_seed', 0, 'pass stream_seed >= 0.'
    )
    # A string seed is hashed (SHA-512) by `random`: distinct triples give
    # unrelated streams, and seeding is stable across Python versions.
    rng = random.Random(f'{self.seed}:{stream_seed}:{index}')
    while True:
      source = self._draw_source(rng)
      if not self.is_heldout(source):
        return source, self.target(source)

  def heldout_examples(self, n: int) -> list[tuple[str, str]]:
    """Returns `n` distinct held-out examples as (source, target) pairs.

    The set is fixed (it does not depend on `seed`) and prefix-stable:
    `heldout_examples(m)` starts with `heldout_examples(k)` for k < m.
    Input spaces of up to 200,000 sources are listed and the held-out ones
    taken in a fixed random order (uniform over distinct sources); larger
    spaces are sampled like training draws, skipping repeats.

    Raises:
      HeldoutTooLarge: fewer than `n` held-out examples exist; the message
        says how many do.
    """
    n = _check_int(n, 'n', 0, 'pass the number of examples wanted.')
    rng = random.Random(_partition_salt(self.name))
    total = self.num_sources()
    if total <= _ENUMERATE_LIMIT:
      pool = [s for s in self._all_sources() if self.is_heldout(s)]
      if n > len(pool):
        raise HeldoutTooLarge(
          f'{self!r} has only {len(pool)} held-out examples (of {total} '
          f'possible sources); ask for n <= {len(pool)} or enlarge the input '
          'space.'
        )
      rng.shuffle(pool)
      sources = pool[:n]
    else:
      # Too many sources to list: sample, and stay well below the expected
      # number of held-out sources so that distinct ones remain easy to find.
      limit = total * HELDOUT_PER_MILLE // 1000 // 2
      if n > limit:
        raise HeldoutTooLarge(
          f'{self!r} has about {2 * limit} held-out examples, of which at '
          f'most half, {limit}, are drawn (more would take ever longer to '
          f'find); ask for n <= {limit}.'
        )
      sources, seen = [], set()
      while len(sources) < n:
        source = self._draw_source(rng)
        if self.is_heldout(source) and source not in seen:
          seen.add(source)
          sources.append(source)
    return [(s, self.target(s)) for s in sources]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdditionTask(Task):
  """Seed 000's Keras addition example.

  `n_numbers` integers drawn uniformly from 1..`largest`, joined by '+', and
  left-padded with spaces to a fixed width; the target is their sum,
  left-padded with spaces. With n_numbers=2, largest=999: '12+345' becomes
  ' 12+345' (width 7) and its target ' 357' (width 4).
  """

  name: ClassVar[str] = 'addition'
  n_numbers: int = 2
  largest: int = 999

  def _check_fields(self) -> None:
    _check_int(self.n_numbers, 'n_numbers', 1, 'pass n_numbers >= 1, e.g. 2.')
    _check_int(self.largest, 'largest', 1, 'pass largest >= 1, e.g. 999.')

  @property
  def vocab(self) -> CharVocab:
    return CharVocab(ADDITION_ALPHABET)

  @property
  def source_width(self) -> int:
    # Seed 000: n_numbers * ceil(log10(largest + 1)) + n_numbers - 1, where
    # ceil(log10(largest + 1)) is exactly the digit count of largest.
    return self.n_numbers * len(str(self.largest)) + self.n_numbers - 1

  @property
  def target_width(self) -> int:
    # Seed 000: ceil(log10(n_numbers * (largest + 1))), computed exactly in
    # integers: the smallest k with 10**k >= y is the digit count of y - 1.
    # It is the digit count of the largest sum n_numbers * largest, or one
    # more in a few cases (n_numbers=3, largest=33: width 3 for sums <= 99);
    # we follow the seed there too.
    return len(str(self.n_numbers * (self.largest + 1) - 1))

  @property
  def max_source_len(self) -> int:
    return self.source_width

  @property
  def max_target_len(self) -> int:
    return self.target_width + 1

  def target(self, source: str) -> str:
    # Seed 000 pads on the LEFT (spaces are prepended), inputs and targets.
    total = sum(int(term) for term in source.split('+'))
    return str(total).rjust(self.target_width)

  def num_sources(self) -> int:
    return self.largest**self.n_numbers

  def format_source(self, text: str) -> str:
    # Questions are left-padded to a fixed width, as in training.
    return text.strip().rjust(self.source_width)

  def prepare_source(self, text: str) -> list[int]:
    """Token ids of a user-given question such as '123+456', written as
    the training questions are ('007+8' as '7+8', however long the zeros).

    Raises:
      ValueError: a blank question, characters outside the alphabet, or a
        question that is not `n_numbers` numbers from 0 to `largest` joined
        by '+'.
    """
    # No length check: a question of the right form always fits once written
    # as in training, and one that does not is refused below.
    self._check_characters(text)
    # Zeros dropped first: int() refuses strings of over 4,300 digits.
    terms = [term.lstrip('0') or term[:1] for term in text.strip().split('+')]
    if len(terms) != self.n_numbers or not all(
      term.isdigit()
      and len(term) <= len(str(self.largest))
      and int(term) <= self.largest
      for term in terms
    ):
      example = '+'.join(
        str(self.largest // 3 + i) for i in range(self.n_numbers)
      )
      raise ValueError(
        f'input {text!r} is not a question of this addition task: give '
        f'{self.n_numbers} numbers from 0 to {self.largest} joined by '
        f"'+', without spaces, e.g. {example!r}."
      )
    return self.vocab.encode(self._format([int(term) for term in terms]))

  def _format(self, numbers: list[int]) -> str:
    return '+'.join(map(str, numbers)).rjust(self.source_width)

  def _draw_source(self, rng: random.Random) -> str:
    numbers = [rng.randint(1, self.largest) for _ in range(self.n_numbers)]
    return self._format(numbers)

  def _all_sources(self) -> Iterator[str]:
    numbers = range(1, self.largest + 1)
    for combo in itertools.product(numbers, repeat=self.n_numbers):
      yield self._format(list(combo))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StringTask(Task):
  """Random strings over `alphabet`, lengths uniform in [min_len, max_len].

  Subclasses say what the target is. Sources are not padded as text: rows
  are padded with PAD ids by `encode_batch`.
  """

  name: ClassVar[str] = 'string'
  alphabet: str = string.ascii_lowercase
  min_len: int = 1
  max_len: int = 10

  def _check_fields(self) -> None:
    check_alphabet(self.alphabet)
    _check_int(self.min_len, 'min_len', 1, 'pass min_len >= 1.')
    _check_int(self.max_len, 'max_len', 1, 'pass max_len >= 1.')
    if self.min_len > self.max_len:
      raise ValueError(
        f'min_len ({self.min_len}) is greater than max_len ({self.max_len}); '
        'pass min_len <= max_len.'
      )

  @property
  def vocab(self) -> CharVocab:
    return CharVocab(self.alphabet)

  @property
  def max_source_len(self) -> int:
    return self.max_len

  @property
  def max_target_len(self) -> int:
    return self.max_len + 1

  def num_sources(self) -> int:
    k = len(self.alphabet)
    return sum(k**length for length in range(self.min_len, self.max_len + 1))

  def _draw_source(self, rng: random.Random) -> str:
    length = rng.randint(self.min_len, self.max_len)
    return ''.join(rng.choices(self.alphabet, k=length))

  def _all_sources(self) -> Iterator[str]:
    for length in range(self.min_len, self.max_len + 1):
      for chars in itertools.product(self.alphabet, repeat=length):
        yield ''.join(chars)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CopyTask(StringTask):
  """Target = source: the alignment is the diagonal."""

  name: ClassVar[str] = 'copy'

  def target(self, source: str) -> str:
    return source


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReverseTask(StringTask):
  """Target = source reversed: the alignment is the anti-diagonal."""

  name: ClassVar[str] = 'reverse'

  def target(self, source: str) -> str:
    return source[::-1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SortTask(StringTask):
  """Target = source sorted in alphabet (= vocabulary id) order."""

  name: ClassVar[str] = 'sort'

  def target(self, source: str) -> str:
    rank = {c: i for i, c in enumerate(self.alphabet)}
    return ''.join(sorted(source, key=rank.__getitem__))


def addition(
  n_numbers: int = 2, largest: int = 999, seed: int = 0
) -> AdditionTask:
  """Seed 000's addition task; see `AdditionTask`."""
  return AdditionTask(n_numbers=n_numbers, largest=largest, seed=seed)


def copy(
  alphabet: str = string.ascii_lowercase,
  min_len: int = 1,
  max_len: int = 10,
  seed: int = 0,
) -> CopyTask:
  """Copy a random string; see `StringTask`."""
  return CopyTask(
    alphabet=alphabet, min_len=min_len, max_len=max_len, seed=seed
  )


def reverse(
  alphabet: str = string.ascii_lowercase,
  min_len: int = 1,
  max_len: int = 10,
  seed: int = 0,
) -> ReverseTask:
  """Reverse a random string; see `StringTask`."""
  return ReverseTask(
    alphabet=alphabet, min_len=min_len, max_len=max_len, seed=seed
  )


def sort(
  alphabet: str = string.ascii_lowercase,
  min_len: int = 1,
  max_len: int = 10,
  seed: int = 0,
) -> SortTask:
  """Sort a random string in alphabet order; see `StringTask`."""
  return SortTask(
    alphabet=alphabet, min_len=min_len, max_len=max_len, seed=seed
  )


TASKS: dict[str, Callable[..., Task]] = {
  'addition': addition,
  'copy': copy,
  'reverse': reverse,
  'sort': sort,
}


def make_task(name: str, **kwargs: Any) -> Task:
  """Builds the registered task `name` with keyword arguments `kwargs`.

  Raises:
    ValueError: unknown task, unknown argument, or a bad argument value (the
      message names the field and the fix).
  """
  if name not in TASKS:
    raise ValueError(
      f'unknown task {name!r}; known tasks: {", ".join(sorted(TASKS))}.'
    )
  factory = TASKS[name]
  signature = inspect.signature(factory)
  unknown = sorted(set(kwargs) - set(signature.parameters))
  if unknown:
    raise ValueError(
      f'task {name!r} takes no argument(s) {", ".join(unknown)}; it takes '
      f'{", ".join(signature.parameters)}.'
    )
  return factory(**kwargs)


def encode_batch(
  task: Task, examples: list[tuple[str, str]]
) -> dict[str, np.ndarray]:
  """Encodes (source, target) pairs into fixed-shape id arrays.

  Returns:
    'inputs': int32 [batch, max_source_len], source ids then PAD.
    'targets': int32 [batch, max_target_len], target ids, EOS, then PAD. No
      BOS: the model shifts targets right itself.

  Raises:
    ValueError: a text is too long for the task or holds unknown characters.
  """
  vocab = task.vocab
  inputs = np.full((len(examples), task.max_source_len), PAD_ID, np.int32)
  targets = np.full((len(examples), task.max_target_len), PAD_ID, np.int32)
  for row, (source, target) in enumerate(examples):
    source_ids = vocab.encode(source)
    target_ids = vocab.encode(target) + [EOS_ID]
    if len(source_ids) > task.max_source_len:
      raise ValueError(
        f'source {source!r} has {len(source_ids)} characters, more than '
        f'max_source_len={task.max_source_len}.'
      )
    if len(target_ids) > task.max_target_len:
      raise ValueError(
        f'target {target!r} plus EOS has {len(target_ids)} ids, more than '
        f'max_target_len={task.max_target_len}.'
      )
    inputs[row, : len(source_ids)] = source_ids
    targets[row, : len(target_ids)] = target_ids
  return {'inputs': inputs, 'targets': targets}
