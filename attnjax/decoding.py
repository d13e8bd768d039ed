"""Greedy and beam search, written once for every decoder.

Both searches drive a step function

  step_fn(tokens [N] int32, state) -> (log_probs [N, vocab] float32, state)

where `state` is any pytree whose leaves all have the rows (N = batch, or
batch * beam in beam search) as their leading dim: an RNN's carry, a
Transformer's cache, a position counter. The step consumes the previous token
(BOS at the first step) and gives normalised log-probabilities (<= 0) of the
next one. Neither search ever emits PAD or BOS (they are never targets):
their log-probs are set to -inf before a token is chosen, so PAD appears
only after the end. A NaN log-prob counts as -inf, and a row in which no
token is possible ends empty (PAD, length 0, score -inf) in both searches.
Neither search loops over time in Python: each is one
`lax.while_loop` that stops as soon as nothing can change the result, so both
run under `jax.jit` with `max_len` (and the beam settings) static.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from attnjax.data.vocab import BOS_ID, EOS_ID, PAD_ID

Array = jax.Array
StepFn = Callable[[Array, Any], tuple[Array, Any]]
AttentionFn = Callable[[Any], Array]

# log(0) would make a hypothesis that never looked at a source position
# impossible (-inf) instead of merely bad; the floor keeps it ranked.
_MIN_COVERAGE = float(jnp.finfo(jnp.float32).tiny)


class GreedyResult(NamedTuple):
  """The argmax path of each row.

  tokens: int32 `[batch, max_len]`, PAD after EOS.
  lengths: int32 `[batch]`, tokens up to and including EOS (max_len if none).
  scores: float32 `[batch]`, sum of the log-probs of those tokens.

  A row that reached a step at which no token was possible is empty: PAD
  tokens, length 0 and score -inf (as `BeamResult`'s empty slots).
  """

  tokens: Array
  lengths: Array
  scores: Array


class BeamResult(NamedTuple):
  """The n best hypotheses of each row, best first: the finished ones by
  score, then (filling the slots left) unfinished ones by score, so a later
  slot can score higher than an earlier one.

  tokens: int32 `[batch, n, max_len]`, PAD after EOS.
  scores: float32 `[batch, n]`, log_probs / length penalty + coverage penalty.
  log_probs: float32 `[batch, n]`, sum of the tokens' log-probs.
  lengths: int32 `[batch, n]`, EOS included (max_len for an unfinished one).
  attention: float32 `[batch, n, max_len, src_len]`, the attention weights
    behind each output token (zero after the end); None without attention_fn.

  Slots for which no hypothesis exists (fewer than n sequences have a
  non-zero probability) hold PAD tokens, length 0 and score -inf.
  """

  tokens: Array
  scores: Array
  log_probs: Array
  lengths: Array
  attention: Array | None = None


def _check_positive(**kwargs: int) -> None:
  for name, value in kwargs.items():
    if value < 1:
      raise ValueError(f'{name} must be >= 1; got {value}.')


def _check_alpha(alpha: float) -> None:
  if not (math.isfinite(alpha) and alpha >= 0):
    raise ValueError(
      f'alpha, the GNMT length-penalty exponent, must be a finite number '
      f'>= 0 (0 turns the penalty off, GNMT uses 0.6-1.0); got {alpha}.'
    )


def _check_coverage_weight(coverage_weight: float) -> None:
  if not (math.isfinite(coverage_weight) and coverage_weight >= 0):
    raise ValueError(
      f'coverage_weight must be a finite number >= 0 (0 turns the coverage '
      f'penalty off); got {coverage_weight}.'
    )


def _check_rows(tree: Any, rows: int, name: str, fix: str) -> None:
  """Every leaf of `tree` has `rows` as its leading dim."""
  for path, leaf in jax.tree.leaves_with_path(tree):
    shape = jnp.shape(leaf)
    if not shape or shape[0] != rows:
      raise ValueError(
        f'{name} leaf {jax.tree_util.keystr(path)} has shape {shape}, but '
        f'every leaf must have the {rows} rows as its leading dim; {fix}.'
      )


def _check_log_probs(log_probs: Any, rows: int) -> None:
  shape = jnp.shape(log_probs)
  if len(shape) != 2 or shape[0] != rows:
    raise ValueError(
      f'step_fn must return log_probs of shape [{rows}, vocab] (one row per '
      f'token it was given); got shape {shape}.'
    )


def _forbid_specials(log_probs: Array, pad_id: int, bos_id: int) -> Array:
  """float32 log-probs with PAD and BOS (the last axis) and NaNs made
  impossible."""
  log_probs = log_probs.astype(jnp.float32)
  log_probs = jnp.where(jnp.isnan(log_probs), -jnp.inf, log_probs)
  return log_probs.at[..., (pad_id, bos_id)].set(-jnp.inf)


def greedy_search(
  step_fn: StepFn,
  init_state: Any,
  *,
  batch_size: int,
  max_len: int,
  bos_id: int = BOS_ID,
  eos_id: int = EOS_ID,
  pad_id: int = PAD_ID,
) -> GreedyResult:
  """Decodes the most probable token at each step.

  Args:
    step_fn: `(tokens [batch] int32, state) -> (log_probs [batch, vocab],
      state)`; see the module docstring.
    init_state: the state before the first step, leaves `[batch, ...]`.
    batch_size: number of rows.
    max_len: most tokens to produce per row, EOS included (static).
    bos_id, eos_id, pad_id: the special token ids.

  Returns:
    A `GreedyResult`. The loop stops once every row has produced EOS; finished
    rows keep being fed PAD until then, and their output stays PAD.
  """
  _check_positive(batch_size=batch_size, max_len=max_len)
  _check_rows(init_state, batch_size, 'init_state', 'give one row per batch')
  start = jnp.full((batch_size,), bos_id, jnp.int32)
  _check_log_probs(jax.eval_shape(step_fn, start, init_state)[0], batch_size)

  def cond(carry):
    t, _, done, *_ = carry
    return (t < max_len) & ~jnp.all(done)

  def body(carry):
    t, tokens, done, lengths, scores, state = carry
    prev = jnp.where(t == 0, start, tokens[:, jnp.maximum(t - 1, 0)])
    log_probs, state = step_fn(prev, state)
    log_probs = _forbid_specials(log_probs, pad_id, bos_id)
    best = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    best_log_prob = jnp.take_along_axis(log_probs, best[:, None], axis=1)[:, 0]
    # No token is possible: the row ends here, empty (see GreedyResult).
    impossible = ~done & (best_log_prob == -jnp.inf)
    scores = scores + jnp.where(done, 0.0, best_log_prob)
    done = done | impossible
    token = jnp.where(done, pad_id, best)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (token == eos_id)
    return t + 1, tokens.at[:, t].set(token), done, lengths, scores, state

  init = (
    jnp.int32(0),
    jnp.full((batch_size, max_len), pad_id, jnp.int32),
    jnp.zeros((batch_size,), bool),
    jnp.zeros((batch_size,), jnp.int32),
    jnp.zeros((batch_size,), jnp.float32),
    init_state,
  )
  _, tokens, _, lengths, scores, _ = jax.lax.while_loop(cond, body, init)
  valid = scores > -jnp.inf
  return GreedyResult(
    tokens=jnp.where(valid[:, None], tokens, pad_id),
    lengths=jnp.where(valid, lengths, 0),
    scores=scores,
  )


def _gather(hyps: BeamResult, index: Array) -> BeamResult:
  """Picks hypotheses `index [batch, k]` along axis 1 of every field."""

  def take(x):
    return jnp.take_along_axis(
      x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1
    )

  return jax.tree.map(take, hyps)


def _concat(a: BeamResult, b: BeamResult) -> BeamResult:
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), a, b)


def beam_search(
  step_fn: StepFn,
  init_state: Any,
  *,
  batch_size: int,
  beam_size: int,
  max_len: int,
  alpha: float = 0.0,
  coverage_weight: float = 0.0,
  num_return: int | None = None,
  bos_id: int = BOS_ID,
  eos_id: int = EOS_ID,
  pad_id: int = PAD_ID,
  attention_fn: AttentionFn | None = None,
  source_mask: Array | None = None,
) -> BeamResult:
  """Beam search with GNMT length and coverage penalties.

  Each step extends the `beam` live hypotheses of a row by every token and
  ranks the `beam * vocab` candidates by log-prob. Candidates ending in EOS
  among the top `beam` move to a pool of finished hypotheses, which keeps the
  `num_return` best by score; the best `beam` candidates not ending in EOS
  stay live. With `beam_size=1`, `alpha=0` and no coverage penalty this is
  `greedy_search`.

  A finished hypothesis Y scores (Wu et al., 2016)

    log P(Y) / lp(Y) + coverage_weight * sum_i log(min(sum_t a_ti, 1))

  with lp(Y) = ((5 + |Y|) / 6) ** alpha, |Y| counting EOS, and a_ti the
  attention paid to source position i at output step t.

  The loop stops at max_len, or earlier once, in every row, the pool is full
  and its worst score is at least the best score any live hypothesis could
  still reach (or no live hypothesis has a non-zero probability left). That
  bound is exact: a descendant's log-prob is at most its
  live ancestor's (log-probs are <= 0), dividing a non-positive number by
  the largest lp(|Y|) <= lp(max_len) can only raise it, and the coverage
  penalty is at most 0. As ties keep the hypothesis already in the pool,
  stopping early returns exactly what running to max_len would.

  Args:
    step_fn: `(tokens [batch * beam] int32, state) -> (log_probs [batch *
      beam, vocab], state)`; the log-probs must be normalised (<= 0).
    init_state: the state before the first step, leaves `[batch, ...]`; it is
      tiled to `[batch * beam, ...]` (row b's beams at b * beam ... b * beam
      + beam - 1) and reordered along the back-pointers after every step.
    batch_size: number of rows.
    beam_size: live hypotheses per row.
    max_len: most tokens per hypothesis, EOS included (static).
    alpha: length penalty exponent; 0 ranks by log-prob alone.
    coverage_weight: weight of the coverage penalty (needs attention_fn).
    num_return: hypotheses to return per row, <= beam_size (default
      beam_size). If fewer have ended by max_len, the best live ones fill the
      remaining slots, scored as if they ended there.
    bos_id, eos_id, pad_id: the special token ids.
    attention_fn: `state -> [batch * beam, src_len]`, the attention weights
      of the step that returned `state`; given, the result carries the
      attention of the returned hypotheses.
    source_mask: optional bool `[batch, src_len]`, True at real source
      positions; padding then does not count in the coverage penalty.

  Returns:
    A `BeamResult` with `n = num_return` hypotheses per row, best first.
  """
  n = beam_size if num_return is None else num_return
  _check_positive(batch_size=batch_size, beam_size=beam_size, max_len=max_len)
  _check_alpha(alpha)
  _check_coverage_weight(coverage_weight)
  if coverage_weight > 0 and attention_fn is None:
    raise ValueError(
      'coverage_weight > 0 needs the attention weights of each step: pass '
      'attention_fn(state) -> [batch * beam, src_len].'
    )
  if not 1 <= n <= beam_size:
    raise ValueError(
      f'num_return must be in [1, beam_size={beam_size}] (the search keeps '
      f'only beam_size hypotheses); got {n}. Raise beam_size or lower '
      'num_return.'
    )
  _check_rows(init_state, batch_size, 'init_state', 'give one row per batch')

  rows, k = batch_size * beam_size, beam_size
  state = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), init_state)
  start = jnp.full((batch_size, k), bos_id, jnp.int32)
  log_probs_shape, next_state = jax.eval_shape(
    step_fn, start.reshape(rows), state
  )
  _check_log_probs(log_probs_shape, rows)
  vocab = log_probs_shape.shape[1]
  _check_rows(next_state, rows, 'the state step_fn returns', 'keep the rows')
  attention = None
  if attention_fn is not None:
    attention_shape = jax.eval_shape(attention_fn, next_state).shape
    if len(attention_shape) != 2 or attention_shape[0] != rows:
      raise ValueError(
        f'attention_fn must return [batch * beam={rows}, src_len]; got '
        f'shape {attention_shape}.'
      )
    attention = jnp.zeros((batch_size, 1, max_len, attention_shape[1]))
  if source_mask is not None:
    src_len = None if attention is None else attention.shape[-1]
    if jnp.shape(source_mask) != (batch_size, src_len):
      raise ValueError(
        'source_mask (for the coverage penalty) needs attention_fn and the '
        f'shape [batch, src_len] = {(batch_size, src_len)}; got shape '
        f'{jnp.shape(source_mask)}.'
      )
    source_mask = jnp.asarray(source_mask, bool)[:, None, :]

  length_penalty = ((5.0 + jnp.arange(max_len + 1)) / 6.0) ** alpha

  def score(h: BeamResult) -> Array:
    s = h.log_probs / length_penalty[h.lengths]
    if coverage_weight > 0:
      coverage = jnp.clip(h.attention.sum(axis=2), _MIN_COVERAGE, 1.0)
      penalty = jnp.log(coverage)
      if source_mask is not None:
        penalty = jnp.where(source_mask, penalty, 0.0)
      s = s + coverage_weight * penalty.sum(axis=-1)
    return s

  def empty(width: int, log_probs: Array) -> BeamResult:
    shape = (batch_size, width)
    return BeamResult(
      tokens=jnp.full(shape + (max_len,), pad_id, jnp.int32),
      scores=jnp.full(shape, -jnp.inf),
      log_probs=log_probs,
      lengths=jnp.zeros(shape, jnp.int32),
      attention=None if attention is None else jnp.repeat(attention, width, 1),
    )

  def cond(carry):
    t, live, finished, _ = carry
    # Best score any descendant of a live hypothesis can reach.
    bound = live.log_probs.max(axis=1) / length_penalty.max()
    return (t < max_len) & ~jnp.all(finished.scores[:, -1] >= bound)

  def body(carry):
    t, live, finished, state = carry
    prev = jnp.where(t == 0, start, live.tokens[:, :, jnp.maximum(t - 1, 0)])
    log_probs, state = step_fn(prev.reshape(rows), state)
    if attention_fn is not None:
      step_attention = attention_fn(state).astype(jnp.float32)
      live = live._replace(
        attention=live.attention.at[:, :, t].set(
          step_attention.reshape(batch_size, k, -1)
        )
      )
    log_probs = _forbid_specials(log_probs, pad_id, bos_id)
    log_probs = log_probs.reshape(batch_size, k, vocab)
    candidates = live.log_probs[:, :, None] + log_probs
    candidates = candidates.reshape(batch_size, k * vocab)

    def extend(log_probs, index):
      h = _gather(live, index // vocab)
      return h._replace(
        tokens=h.tokens.at[:, :, t].set(index % vocab),
        log_probs=log_probs,
        lengths=jnp.full_like(h.lengths, t + 1),
      )

    # Candidates ending in EOS among the top k join the finished pool.
    ended = extend(*jax.lax.top_k(candidates, k))
    ends = (ended.tokens[:, :, t] == eos_id) & (ended.log_probs > -jnp.inf)
    ended = ended._replace(scores=jnp.where(ends, score(ended), -jnp.inf))
    # The pool comes first, so it wins ties.
    pool = _concat(finished, ended)
    finished = _gather(pool, jax.lax.top_k(pool.scores, n)[1])

    # The best k others stay live; the state follows their back-pointers.
    is_eos = jnp.arange(k * vocab) % vocab == eos_id
    live_log_probs, index = jax.lax.top_k(
      jnp.where(is_eos, -jnp.inf, candidates), k
    )
    live = extend(live_log_probs, index)
    flat = jnp.arange(batch_size)[:, None] * k + index // vocab
    state = jax.tree.map(lambda x: x[flat.reshape(rows)], state)
    return t + 1, live, finished, state

  first = jnp.full((batch_size, k), -jnp.inf).at[:, 0].set(0.0)
  unfinished = jnp.full((batch_size, n), -jnp.inf)
  init = (jnp.int32(0), empty(k, first), empty(n, unfinished), state)
  _, live, finished, _ = jax.lax.while_loop(cond, body, init)

  # Finished hypotheses first, then live ones scored as if they ended here.
  pool = _concat(finished, live._replace(scores=score(live)))
  is_finished = (jnp.arange(n + k) < n) & (pool.scores > -jnp.inf)
  order = jnp.lexsort((-pool.scores, ~is_finished), axis=-1)[:, :n]
  best = _gather(pool, order)
  valid = best.scores > -jnp.inf
  return BeamResult(
    tokens=jnp.where(valid[..., None], best.tokens, pad_id),
    scores=best.scores,
    log_probs=jnp.where(valid, best.log_probs, -jnp.inf),
    lengths=jnp.where(valid, best.lengths, 0),
    attention=None
    if attention is None
    else jnp.where(valid[..., None, None], best.attention, 0.0),
  )


# ---------------------------------------------------------------------------
# Searching a model.


def check_search(
  beam_size: int, alpha: float, coverage_weight: float = 0.0
) -> None:
  """Fails early (before tracing) on settings the searches refuse."""
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(
      f'beam_size must be an integer >= 1 (1 is greedy search); got '
      f'{beam_size!r}.'
    )
  _check_alpha(alpha)
  _check_coverage_weight(coverage_weight)
  # Greedy search keeps one hypothesis, so a penalty has nothing to rank.
  if beam_size == 1 and alpha:
    raise ValueError(
      f'alpha={alpha} would be ignored: the length penalty ranks beam-search '
      'hypotheses, and beam_size=1 is greedy search. Give beam_size > 1, or '
      'alpha=0.'
    )
  if beam_size == 1 and coverage_weight:
    raise ValueError(
      f'coverage_weight={coverage_weight} would be ignored: the coverage '
      'penalty ranks beam-search hypotheses, and beam_size=1 is greedy '
      'search. Give beam_size > 1, or coverage_weight=0.'
    )


def special_ids(model) -> dict[str, int]:
  """`{'bos_id', 'eos_id', 'pad_id'}` of `model.config`, defaulting to the
  vocabulary's ids for a model whose config does not name them."""
  config = getattr(model, 'config', None)
  defaults = {'bos_id': BOS_ID, 'eos_id': EOS_ID, 'pad_id': PAD_ID}
  return {name: getattr(config, name, id_) for name, id_ in defaults.items()}


def decode_model(
  model,
  variables: Any,
  inputs: Array,
  *,
  max_len: int,
  beam_size: int = 1,
  alpha: float = 0.0,
  coverage_weight: float = 0.0,
  source_lengths: Array | None = None,
) -> Array:
  """The output tokens `[batch, max_len]` of a sequence-to-sequence model.

  Greedy search for `beam_size=1`, else beam search keeping each row's best
  hypothesis. `model` is a linen module with the methods

    encode(inputs, *, source_lengths=None) -> encoded
    initial_decoder_state(encoded, inputs, *, source_lengths=None) -> state
    decode_step(tokens [batch], state) -> (logits [batch, vocab], state)

  and, for the coverage penalty, a static `attention_weights(state) ->
  [batch, src_len] | None` (the weights of the step that gave `state`). A
  model whose decoder has a fixed-size cache says how many steps fit in a
  `max_decode_len` attribute. The special ids are those of `model.config`
  (`pad_id`, `bos_id`, `eos_id`) when it has them, else the vocabulary's.
  """
  check_search(beam_size, alpha, coverage_weight)
  ids = special_ids(model)
  limit = getattr(model, 'max_decode_len', None)
  if limit is not None and max_len > limit:
    raise ValueError(
      f'max_len={max_len} is more steps than the model can decode ({limit}, '
      'the size of its key/value cache); lower max_len or build the model '
      'with a larger maximum length.'
    )
  encoded = model.apply(
    variables, inputs, source_lengths=source_lengths, method=model.encode
  )
  state = model.apply(
    variables,
    encoded,
    inputs,
    source_lengths=source_lengths,
    method=model.initial_decoder_state,
  )

  def step_fn(tokens, state):
    logits, state = model.apply(
      variables, tokens, state, method=model.decode_step
    )
    return jax.nn.log_softmax(logits), state

  batch_size = inputs.shape[0]
  if beam_size == 1:
    return greedy_search(
      step_fn, state, batch_size=batch_size, max_len=max_len, **ids
    ).tokens
  attention_fn, source_mask = None, None
  if coverage_weight > 0:
    attention_fn = getattr(model, 'attention_weights', None)
    if attention_fn is None or attention_fn(state) is None:
      raise ValueError(
        'the coverage penalty needs attention weights, and this model '
        'records none; set coverage_weight=0.'
      )
    # Padding is never attended; it must not count as uncovered source.
    if source_lengths is None:
      source_mask = inputs != ids['pad_id']
    else:
      positions = jnp.arange(inputs.shape[1])
      source_mask = positions < jnp.asarray(source_lengths)[:, None]
  result = beam_search(
    step_fn,
    state,
    batch_size=batch_size,
    beam_size=beam_size,
    max_len=max_len,
    alpha=alpha,
    coverage_weight=coverage_weight,
    num_return=1,
    attention_fn=attention_fn,
    source_mask=source_mask,
    **ids,
  )
  return result.tokens[:, 0]
