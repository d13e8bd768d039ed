"""Greedy and beam search against exhaustive enumeration and a reference.

The toy model's next-token distribution is a fixed random table indexed by a
hash of the whole prefix, which the state carries as a `[rows, max_len]`
history buffer: a beam whose state is not reordered along its back-pointers
reads the wrong row of the table, so every comparison below also tests the
state handling. The searches never emit PAD or BOS, so with max_len 4 the
sequences over {EOS, a, b} can all be listed and scored; PAD and BOS have
probability 0 unless `special_logit` gives them some.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from search_oracles import assert_matches, enumerate_nbest, reference_nbest

from attnjax import decoding
from attnjax.data.vocab import BOS_ID, EOS_ID, PAD_ID

HASH_SIZE = 631  # > 5**4, so prefixes of the enumerated model never collide.


def _log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# XLA's backend optimisations cost more compile time than they save here.
jit = functools.partial(
  jax.jit,
  compiler_options={
    'xla_backend_optimization_level': 0,
    'xla_llvm_disable_expensive_passes': True,
  },
)

STEP_CALLS = []  # One entry per step the last search ran (see `search`).


class ToyModel:
  """Random next-token (and attention) tables indexed by the prefix."""

  def __init__(
    self,
    seed,
    rows,
    max_len,
    vocab=5,
    eos_bias=0.0,
    src_len=3,
    src_pad=0,
    special_logit=-np.inf,
  ):
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.normal(size=(rows, HASH_SIZE, vocab))
    logits[..., EOS_ID] += eos_bias
    logits[..., [PAD_ID, BOS_ID]] = special_logit
    self.table = _log_softmax(logits).astype(np.float32)
    attention = np.exp(rng.normal(size=(rows, HASH_SIZE, src_len)))
    attention[..., src_len - src_pad :] = 0.0  # Padded source positions.
    attention /= attention.sum(-1, keepdims=True)
    self.attention = attention.astype(np.float32)
    self.source_mask = np.arange(src_len) < src_len - src_pad
    self.source_mask = np.broadcast_to(self.source_mask, (rows, src_len))
    self.weights = np.array([pow(vocab, i, HASH_SIZE) for i in range(max_len)])
    self.rows, self.max_len, self.vocab = rows, max_len, vocab

  # The model as the searches see it: the tables are arguments of the jitted
  # search, so models of the same shapes share one compilation.

  def params(self):
    return {
      'table': self.table,
      'attention': self.attention,
      'weights': self.weights,
      'source_mask': self.source_mask,
    }

  def init_state(self):
    return {
      'row': jnp.arange(self.rows),
      'pos': jnp.zeros(self.rows, jnp.int32),
      'history': jnp.zeros((self.rows, self.max_len), jnp.int32),
      # The prefix's hash, repeated so that a rank-3 leaf is reordered too.
      'code': jnp.zeros((self.rows, 2, 3), jnp.int32),
    }

  # The same model in numpy, for the oracles.

  def _code(self, tokens):
    inputs = (BOS_ID, *tokens)
    return int(np.dot(inputs, self.weights[: len(inputs)]) % HASH_SIZE)

  def next_log_probs(self, row, tokens):
    return self.table[row, self._code(tokens)].astype(np.float64)

  def next_attention(self, row, tokens):
    return self.attention[row, self._code(tokens)].astype(np.float64)


def toy_step(params, tokens, state):
  jax.debug.callback(lambda: STEP_CALLS.append(1))
  rows = jnp.arange(tokens.shape[0])
  history = state['history'].at[rows, state['pos']].set(tokens)
  code = (history * params['weights']).sum(-1) % HASH_SIZE
  log_probs = params['table'][state['row'], code]
  code = jnp.broadcast_to(code[:, None, None], state['code'].shape)
  return log_probs, dict(
    state, pos=state['pos'] + 1, history=history, code=code
  )


def toy_attention(params, state):
  return params['attention'][state['row'], state['code'][:, -1, -1]]


@functools.cache
def _compiled(search_fn, with_attention, **config):
  def run(params, state):
    extra = {}
    if with_attention:
      extra['attention_fn'] = functools.partial(toy_attention, params)
      extra['source_mask'] = params['source_mask']
    step_fn = functools.partial(toy_step, params)
    return search_fn(step_fn, state, **config, **extra)

  return jit(run)


def search(model, search_fn=decoding.beam_search, attention=False, **config):
  """Runs a jitted search on the toy model; counts its steps in STEP_CALLS."""
  STEP_CALLS.clear()
  run = _compiled(
    search_fn,
    attention,
    batch_size=model.rows,
    max_len=model.max_len,
    **config,
  )
  result = run(model.params(), model.init_state())
  jax.effects_barrier()
  return result


# With max_len 4 and two letters at most 3 * 2**3 candidates have a non-zero
# probability at any step, so a beam of 24 never drops one: exhaustive.
EXHAUSTIVE_BEAM = 24


@pytest.mark.parametrize('alpha', [0.0, 0.6])
def test_beam_search_returns_the_enumerated_nbest(alpha):
  model = ToyModel(seed=1, rows=3, max_len=4)
  result = search(model, beam_size=EXHAUSTIVE_BEAM, num_return=6, alpha=alpha)
  expected = [enumerate_nbest(model, r, 6, alpha=alpha) for r in range(3)]
  assert_matches(result, expected, model.max_len)
  assert result.attention is None


def test_length_penalty_changes_the_enumerated_nbest():
  # Guards the test above: with this seed alpha changes the 6-best.
  model = ToyModel(seed=1, rows=3, max_len=4)
  nbest = [
    [
      [h[2] for h in enumerate_nbest(model, r, 6, alpha=alpha)]
      for r in range(3)
    ]
    for alpha in (0.0, 0.6)
  ]
  assert nbest[0] != nbest[1]


def test_coverage_penalty_and_attention_match_enumeration():
  model = ToyModel(seed=1, rows=2, max_len=4, src_len=4, src_pad=1)
  penalties = dict(alpha=0.6, coverage_weight=0.8)
  result = search(
    model, attention=True, beam_size=EXHAUSTIVE_BEAM, num_return=5, **penalties
  )
  expected = [enumerate_nbest(model, r, 5, **penalties) for r in range(2)]
  assert_matches(result, expected, model.max_len)
  assert result.attention.shape == (2, 5, model.max_len, 4)


def test_coverage_penalty_prefers_the_hypothesis_that_covers_the_source():
  a, b = EOS_ID + 1, EOS_ID + 2
  first = jnp.log(jnp.array([0.0, 0.0, 0.0, 0.6, 0.4]))  # a or b
  then = jnp.log(jnp.array([0.0, 0.0, 1.0, 0.0, 0.0]))  # EOS

  def step_fn(tokens, state):
    return jnp.where(tokens[:, None] == BOS_ID, first, then), tokens

  def attention_fn(last_token):
    # Every step looks at source position 0, except the one after b.
    return jax.nn.one_hot((last_token == b).astype(jnp.int32), 2)

  result = jit(
    functools.partial(
      decoding.beam_search,
      step_fn,
      batch_size=1,
      beam_size=2,
      max_len=3,
      coverage_weight=0.1,
      attention_fn=attention_fn,
    )
  )(jnp.zeros(1, jnp.int32))
  # b EOS covers both positions (no penalty); a EOS, more probable, never
  # looks at position 1 and drops below it.
  np.testing.assert_array_equal(
    result.tokens[0], [[b, EOS_ID, PAD_ID], [a, EOS_ID, PAD_ID]]
  )
  np.testing.assert_allclose(result.log_probs[0], np.log([0.4, 0.6]))
  np.testing.assert_allclose(result.scores[0, 0], np.log(0.4), rtol=1e-6)
  assert result.scores[0, 1] < np.log(0.6) - 1.0
  np.testing.assert_array_equal(
    result.attention[0], [[[1, 0], [0, 1], [0, 0]], [[1, 0], [1, 0], [0, 0]]]
  )


@pytest.mark.parametrize(
  'seed,max_len,eos_bias,beam,num_return,alpha,coverage_weight',
  [
    (3, 6, -3.0, 3, 3, 1.0, 0.5),  # few endings: the fill from live beams
    (4, 30, 2.0, 3, 2, 0.0, 0.0),  # many endings: early stop
    (5, 30, 2.0, 4, 3, 0.6, 0.0),
    (6, 30, 2.0, 2, 2, 0.6, 0.3),
    # Long hypotheses win late: a bound that ignored the length penalty still
    # to come would stop at step 4 with a different answer.
    (21, 12, 1.0, 3, 2, 2.0, 0.0),
  ],
)
def test_beam_search_matches_a_reference_run_to_max_len(
  seed, max_len, eos_bias, beam, num_return, alpha, coverage_weight
):
  model = ToyModel(seed, rows=4, max_len=max_len, vocab=7, eos_bias=eos_bias)
  penalties = dict(alpha=alpha, coverage_weight=coverage_weight)
  result = search(
    model, attention=True, beam_size=beam, num_return=num_return, **penalties
  )
  expected = [
    reference_nbest(model, r, beam, num_return, **penalties) for r in range(4)
  ]
  assert_matches(result, expected, max_len)
  if max_len == 30:
    assert len(STEP_CALLS) < max_len  # it did stop early, and changed nothing


def test_unfinished_hypotheses_fill_the_nbest():
  model = ToyModel(seed=7, rows=3, max_len=4, eos_bias=-np.inf)
  result = search(model, beam_size=EXHAUSTIVE_BEAM, num_return=6, alpha=0.6)
  expected = [enumerate_nbest(model, r, 6, alpha=0.6) for r in range(3)]
  assert_matches(result, expected, model.max_len)
  np.testing.assert_array_equal(result.lengths, 4)


def test_slots_without_a_hypothesis_are_empty():
  # Only one sequence has a non-zero probability: EOS at once.
  def step_fn(tokens, state):
    return jnp.log(jax.nn.one_hot(jnp.full_like(tokens, EOS_ID), 5)), state

  result = jit(
    functools.partial(
      decoding.beam_search, step_fn, batch_size=2, beam_size=3, max_len=4
    )
  )(jnp.zeros(2))
  np.testing.assert_array_equal(result.tokens[:, 0], [[EOS_ID, 0, 0, 0]] * 2)
  np.testing.assert_array_equal(result.tokens[:, 1:], PAD_ID)
  np.testing.assert_array_equal(result.lengths, [[1, 0, 0]] * 2)
  np.testing.assert_array_equal(result.scores[:, 1:], -np.inf)


GREEDY_MODEL = dict(rows=8, max_len=8, vocab=7, eos_bias=0.5)


def test_beam_size_one_equals_greedy():
  model = ToyModel(seed=8, **GREEDY_MODEL)
  beam = search(model, beam_size=1)
  greedy = search(model, decoding.greedy_search)
  assert len(set(np.asarray(greedy.lengths))) > 2
  np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
  np.testing.assert_array_equal(beam.lengths[:, 0], greedy.lengths)
  np.testing.assert_allclose(beam.scores[:, 0], greedy.scores, rtol=1e-6)
  np.testing.assert_allclose(beam.log_probs[:, 0], greedy.scores, rtol=1e-6)


def test_greedy_search_follows_the_argmax_path():
  model = ToyModel(seed=9, **GREEDY_MODEL)
  result = search(model, decoding.greedy_search)
  for row in range(model.rows):
    tokens, log_prob = [], 0.0
    while len(tokens) < model.max_len and EOS_ID not in tokens:
      log_probs = model.next_log_probs(row, tuple(tokens))
      tokens.append(int(np.argmax(log_probs)))
      log_prob += log_probs[tokens[-1]]
    padded = tokens + [PAD_ID] * (model.max_len - len(tokens))
    np.testing.assert_array_equal(result.tokens[row], padded)
    assert result.lengths[row] == len(tokens)
    np.testing.assert_allclose(result.scores[row], log_prob, rtol=1e-6)
  assert len(STEP_CALLS) == max(result.lengths)


def test_searches_never_emit_pad_or_bos():
  """PAD and BOS are the likeliest tokens here, yet neither search emits
  them: both keep to the other tokens, with the model's log-probs."""
  model = ToyModel(seed=4, rows=3, max_len=4, special_logit=6.0)
  for row in range(model.rows):
    assert np.argmax(model.next_log_probs(row, ())) in (PAD_ID, BOS_ID)
  beam = search(model, beam_size=EXHAUSTIVE_BEAM, num_return=6)
  expected = [enumerate_nbest(model, r, 6) for r in range(model.rows)]
  assert_matches(beam, expected, model.max_len)
  greedy = search(model, decoding.greedy_search)
  for row in range(model.rows):
    tokens = []
    while len(tokens) < model.max_len and EOS_ID not in tokens:
      log_probs = model.next_log_probs(row, tuple(tokens))
      log_probs[[PAD_ID, BOS_ID]] = -np.inf
      tokens.append(int(np.argmax(log_probs)))
    np.testing.assert_array_equal(greedy.tokens[row, : len(tokens)], tokens)


def _ends_at_row_index(tokens, state):
  """Row r produces r letters, then EOS."""
  letter = jax.nn.one_hot(jnp.full_like(tokens, EOS_ID + 1), 5)
  eos = jax.nn.one_hot(jnp.full_like(tokens, EOS_ID), 5)
  done = (state['pos'] == state['row'])[:, None]
  log_probs = jnp.log(0.9 * jnp.where(done, eos, letter) + 0.02)
  return log_probs, dict(state, pos=state['pos'] + 1)


@pytest.mark.parametrize('search_fn', ['greedy', 'beam'])
def test_rows_finish_at_different_times_and_stop_the_loop(search_fn):
  calls = []

  def step_fn(tokens, state):
    jax.debug.callback(lambda: calls.append(1))
    return _ends_at_row_index(tokens, state)

  config = dict(batch_size=3, max_len=10)
  if search_fn == 'greedy':
    run = functools.partial(decoding.greedy_search, step_fn, **config)
  else:
    run = functools.partial(
      decoding.beam_search, step_fn, beam_size=2, num_return=1, **config
    )
  state = {'row': jnp.arange(3), 'pos': jnp.zeros(3, jnp.int32)}
  result = jit(run)(state)
  jax.effects_barrier()
  expected = np.full((3, 10), PAD_ID)
  for r in range(3):
    expected[r, :r] = EOS_ID + 1
    expected[r, r] = EOS_ID
  log_probs = np.log(0.92) * np.array([1, 2, 3])
  if search_fn == 'greedy':
    np.testing.assert_array_equal(result.tokens, expected)
    np.testing.assert_array_equal(result.lengths, [1, 2, 3])
    np.testing.assert_allclose(result.scores, log_probs, rtol=1e-6)
  else:
    np.testing.assert_array_equal(result.tokens[:, 0], expected)
    np.testing.assert_array_equal(result.lengths[:, 0], [1, 2, 3])
    np.testing.assert_allclose(result.scores[:, 0], log_probs, rtol=1e-6)
  assert len(calls) == 3  # the last row ends at its third step


@pytest.mark.parametrize('bad', [-np.inf, np.nan])
def test_rows_with_no_possible_token_end_empty_in_both_searches(bad):
  """Row 0 has no possible token at its second step (all -inf, or NaN,
  which counts as -inf); row 1 is the uniform model. Both searches leave
  row 0 empty (PAD, length 0, score -inf) and stop at row 1's end."""

  def step(tokens, state):
    uniform = jnp.full((2, 5), -jnp.log(5.0))
    first = jnp.log(jnp.array([0.1, 0.1, 0.1, 0.6, 0.1]))  # Not EOS.
    log_probs = uniform.at[0].set(jnp.where(state[0] >= 1, bad, first))
    return log_probs, state + 1

  greedy = decoding.greedy_search(step, jnp.zeros(2), batch_size=2, max_len=4)
  beam = decoding.beam_search(
    step, jnp.zeros(2), batch_size=2, beam_size=1, max_len=4
  )
  for tokens, lengths, scores in (
    (greedy.tokens, greedy.lengths, greedy.scores),
    (beam.tokens[:, 0], beam.lengths[:, 0], beam.scores[:, 0]),
  ):
    np.testing.assert_array_equal(tokens[0], [PAD_ID] * 4)
    assert lengths[0] == 0 and scores[0] == -np.inf
    # Row 1: the first of the tied letters is EOS.
    np.testing.assert_array_equal(tokens[1], [EOS_ID] + [PAD_ID] * 3)
    np.testing.assert_allclose(scores[1], -np.log(5.0), rtol=1e-6)


def _uniform_step(tokens, state):
  return jnp.zeros((tokens.shape[0], 5)) - jnp.log(5.0), state


@pytest.mark.parametrize(
  'kwargs,message',
  [
    (dict(beam_size=0), 'beam_size must be >= 1'),
    (dict(alpha=-0.1), 'alpha, .* must be a finite number >= 0'),
    (dict(alpha=float('nan')), 'must be a finite number >= 0 .*got nan'),
    (dict(alpha=float('inf')), 'must be a finite number >= 0 .*got inf'),
    (dict(num_return=5), r'num_return must be in \[1, beam_size=4\]'),
    (dict(num_return=0), 'num_return must be in'),
    (dict(max_len=0), 'max_len must be >= 1'),
    (dict(batch_size=0), 'batch_size must be >= 1'),
    (dict(coverage_weight=-1.0), 'coverage_weight must be a finite number'),
    (dict(coverage_weight=float('nan')), 'coverage_weight must be a finite'),
    (dict(coverage_weight=0.5), 'pass attention_fn'),
  ],
)
def test_beam_search_rejects_bad_arguments(kwargs, message):
  args = dict(batch_size=2, beam_size=4, max_len=3) | kwargs
  with pytest.raises(ValueError, match=message):
    decoding.beam_search(_uniform_step, jnp.zeros(2), **args)


def test_bad_state_and_step_outputs_are_named():
  with pytest.raises(ValueError, match=r"init_state leaf \['h'\] has shape"):
    decoding.beam_search(
      _uniform_step, {'h': jnp.zeros(3)}, batch_size=2, beam_size=2, max_len=3
    )
  with pytest.raises(ValueError, match=r'log_probs of shape \[2, vocab\]'):
    decoding.greedy_search(
      lambda t, s: (jnp.zeros(5), s), jnp.zeros(2), batch_size=2, max_len=3
    )
  with pytest.raises(ValueError, match='max_len must be >= 1'):
    decoding.greedy_search(_uniform_step, jnp.zeros(2), batch_size=2, max_len=0)
  with pytest.raises(ValueError, match=r'source_mask .* needs attention_fn'):
    decoding.beam_search(
      _uniform_step,
      jnp.zeros(2),
      batch_size=2,
      beam_size=2,
      max_len=3,
      source_mask=jnp.ones((2, 3), bool),
    )
  with pytest.raises(ValueError, match='attention_fn must return'):
    decoding.beam_search(
      _uniform_step,
      jnp.zeros(2),
      batch_size=2,
      beam_size=2,
      max_len=3,
      attention_fn=lambda s: jnp.zeros(3),
    )


@pytest.mark.parametrize('alpha', [0.0, 1.0])
def test_one_row_and_one_step(alpha):
  """batch_size 1 and max_len 1: the n-best are every one-token sequence
  (EOS ended, the others truncated) in enumeration order, greedy is the
  first of them, and each search steps once."""
  model = ToyModel(seed=11, rows=1, max_len=1, vocab=6)
  result = search(model, beam_size=4, num_return=4, alpha=alpha)
  assert len(STEP_CALLS) == 1
  assert_matches(result, [enumerate_nbest(model, 0, 4, alpha=alpha)], 1)
  np.testing.assert_array_equal(result.lengths, 1)
  greedy = search(model, decoding.greedy_search)
  assert len(STEP_CALLS) == 1
  best = int(np.argmax(model.next_log_probs(0, ())))
  np.testing.assert_array_equal(greedy.tokens, [[best]])
  np.testing.assert_array_equal(greedy.lengths, [1])


def test_every_row_ending_at_the_first_step_stops_both_searches():
  """EOS is every row's most probable first token by far: greedy stops
  after one step with EOS then PAD; beam search with alpha = 0 keeps EOS
  first and stops once no live hypothesis can beat the full pool."""
  model = ToyModel(seed=12, rows=3, max_len=6, vocab=6, eos_bias=30.0)
  greedy = search(model, decoding.greedy_search)
  assert len(STEP_CALLS) == 1
  np.testing.assert_array_equal(greedy.tokens[:, 0], EOS_ID)
  np.testing.assert_array_equal(greedy.tokens[:, 1:], PAD_ID)
  np.testing.assert_array_equal(greedy.lengths, 1)
  beam = search(model, beam_size=2, num_return=1)
  assert len(STEP_CALLS) == 1
  np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
  np.testing.assert_allclose(beam.scores[:, 0], greedy.scores, rtol=1e-6)
