"""The attention of the RNN decoders: hoisted scores and bad settings.

`DecoderAttention` projects the key side of a score once per source
(`prepare`) and finishes it at every step (`scores`); that must compute the
registered pure score function of `attnjax.scores` with the same weights.
Everything runs eagerly on tiny shapes: nothing here is worth compiling.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import attention, decoding, scores
from attnjax.models import rnn_attention
from attnjax.models.seq2seq import Seq2Seq, Seq2SeqConfig

B, S = 2, 5
QUERY_DIM, KEY_DIM, HIDDEN = 4, 6, 3
MAX_SOURCE_LEN = S + 2  # the location score then slices its columns
SCORE_NAMES = (
  'additive',
  'normed_additive',
  'general',
  'concat',
  'location',
  'dot',
  'scaled_dot',
  'cosine',
  'location_aware',
)


def _spec(score, *, project_keys=False) -> rnn_attention.AttentionSpec:
  """Soft attention, or location-aware for its score (they go together)."""
  same_width = score in rnn_attention.SAME_WIDTH_SCORES and not project_keys
  return rnn_attention.AttentionSpec(
    score=score,
    alignment='location_aware' if score == 'location_aware' else 'soft',
    query_dim=QUERY_DIM,
    key_dim=QUERY_DIM if same_width else KEY_DIM,
    hidden=HIDDEN,
    max_source_len=MAX_SOURCE_LEN,
    project_keys=project_keys,
    location_kernel=3,
    location_channels=2,
  )


def _inputs(key_dim, seed=0):
  """A query, keys, a mask with padding and a previous alignment."""
  rng = np.random.default_rng(seed)
  query = rng.normal(size=(B, QUERY_DIM)).astype(np.float32)
  keys = rng.normal(size=(B, S, key_dim)).astype(np.float32)
  mask = np.arange(S) < np.array([S, 3])[:, None]
  previous = rng.uniform(size=(B, S)).astype(np.float32) * mask
  previous /= previous.sum(-1, keepdims=True)
  return query, keys, mask, previous


def _hoisted_scores(module, query, keys, mask, previous):
  memory = module.prepare(keys, mask)
  return module.scores(query, memory, previous)


def _random_params(spec, query, keys, mask, previous, seed=1):
  """The module's parameters, redrawn from N(0, 1): the zero-initialised
  bias (or any other constant initialiser) would hide a weight that the
  hoisted path drops."""
  module = rnn_attention.DecoderAttention(spec)
  variables = module.init(
    jax.random.key(0), query, keys, mask, previous, method=_hoisted_scores
  )
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
    nn.meta.unbox(variables.get('params', {})),
  )


def _pure_score(score, params, query, keys, previous):
  """The registered score function on `keys`, with the module's weights."""
  weights = {
    name.removeprefix('score_'): value
    for name, value in params.items()
    if name.startswith('score_')
  }
  q = query[:, None, :]
  if score == 'location':
    out = scores.location(q, weights['w'], keys.shape[1])
  elif score == 'location_aware':
    out = scores.location_aware(q, keys, previous[:, None, :], **weights)
  else:
    out = scores.get(score)(q, keys, **weights)
  return out[:, 0]


@pytest.mark.parametrize('project_keys', [False, True])
@pytest.mark.parametrize('score', SCORE_NAMES)
def test_hoisted_scores_equal_the_pure_score(score, project_keys):
  spec = _spec(score, project_keys=project_keys)
  query, keys, mask, previous = _inputs(spec.key_dim)
  params = _random_params(spec, query, keys, mask, previous)
  module = rnn_attention.DecoderAttention(spec)
  got = module.apply(
    {'params': params},
    query,
    keys,
    mask,
    previous,
    method=_hoisted_scores,
  )
  assert got.shape == (B, S)
  if project_keys:
    keys = keys @ params['key_proj']['kernel']
  else:
    assert 'key_proj' not in params
  expected = _pure_score(score, params, query, keys, previous)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('score', SCORE_NAMES)
def test_bfloat16_scores_stay_in_bfloat16(score):
  """The float32 score weights are cast to the computation dtype: left as
  they are, they promoted bfloat16 scores (and the additive family's
  `[batch, 1, source_len, hidden]` activations) to float32."""
  spec = _spec(score)
  query, keys, mask, previous = _inputs(spec.key_dim)
  params = _random_params(spec, query, keys, mask, previous)
  expected = rnn_attention.DecoderAttention(spec).apply(
    {'params': params}, query, keys, mask, previous, method=_hoisted_scores
  )
  got = rnn_attention.DecoderAttention(spec, dtype=jnp.bfloat16).apply(
    {'params': params},
    query.astype(jnp.bfloat16),
    keys.astype(jnp.bfloat16),
    mask,
    previous,
    method=_hoisted_scores,
  )
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    got.astype(jnp.float32), expected, rtol=0.05, atol=0.1
  )


def test_location_aware_scores_see_the_previous_alignment():
  spec = _spec('location_aware')
  query, keys, mask, previous = _inputs(spec.key_dim)
  params = _random_params(spec, query, keys, mask, previous)
  apply = functools.partial(
    rnn_attention.DecoderAttention(spec).apply,
    {'params': params},
    method=_hoisted_scores,
  )
  shifted = jnp.roll(previous, 1, axis=-1)
  assert not np.allclose(
    apply(query, keys, mask, previous), apply(query, keys, mask, shifted)
  )


# The alignments: stepping the module equals the pure sequence functions.


def _step_weights(spec, params, queries, keys, mask, *, train=False):
  """The weights `[batch, steps, source_len]` of calling the module once
  per query `[batch, steps, query_dim]`, its state carried between calls."""

  def run(module):
    memory = module.prepare(keys, mask)
    state = module.initial_state(mask)
    weights = []
    for t in range(queries.shape[1]):
      _, w, state = module(queries[:, t], memory, state, train=train)
      weights.append(w)
    return jnp.stack(weights, 1)

  module = rnn_attention.DecoderAttention(spec)
  return nn.apply(run, module)(
    {'params': params}, rngs={'dropout': jax.random.key(0)}
  )


@pytest.mark.parametrize(
  'alignment, train',
  [
    ('monotonic', False),
    ('monotonic', True),
    ('local_m', False),
    ('location_aware', False),
  ],
)
def test_stepped_alignment_equals_the_sequence_function(alignment, train):
  """Each alignment's module, stepped with its state, gives the weights of
  the `attnjax.attention` function over the whole sequence: monotonic with
  p_choose = sigmoid(score + r) from the previous step's alignment (hard at
  eval, expected when training, here without noise), local-m around
  min(t, last source position), location-aware from the previous step's
  weights."""
  score = 'location_aware' if alignment == 'location_aware' else 'general'
  spec = dataclasses.replace(
    _spec(score), alignment=alignment, window=1, noise_std=0.0
  )
  _, keys, mask, previous = _inputs(spec.key_dim)
  steps = 4
  queries = np.random.default_rng(2).normal(size=(B, steps, QUERY_DIM))
  queries = jnp.asarray(queries, jnp.float32)
  params = _random_params(spec, queries[:, 0], keys, mask, previous)
  got = _step_weights(spec, params, queries, keys, mask, train=train)

  weights = {
    name.removeprefix('score_'): value
    for name, value in params.items()
    if name.startswith('score_')
  }
  if alignment == 'monotonic':
    energy = scores.general(queries, keys, weights['w']) + weights['bias']
    expected = attention.monotonic_weights(
      jax.nn.sigmoid(energy), mask[:, None], hard=not train
    )
  elif alignment == 'local_m':
    last = mask.sum(-1, keepdims=True) - 1
    centers = np.minimum(np.arange(steps), last)
    score_fn = functools.partial(scores.general, w=weights['w'])
    _, expected = attention.local_attention(
      queries, keys, keys, score_fn, centers, width=1, mask=mask[:, None]
    )
  else:
    score_fn = functools.partial(scores.location_aware, **weights)
    _, expected = attention.location_aware_attention(
      queries, keys, keys, score_fn, mask[:, None]
    )
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert np.abs(np.diff(np.asarray(got), axis=1)).max() > 0.1  # it moves


# Settings that cannot work fail when the config is built, with a message
# that says what to change.


def _config(**overrides) -> Seq2SeqConfig:
  fields = dict(
    source_vocab_size=16,
    target_vocab_size=12,
    embed_dim=8,
    hidden_dim=8,
    decoder='luong',
  )
  return Seq2SeqConfig(**{**fields, **overrides})


@pytest.mark.parametrize('score', rnn_attention.SAME_WIDTH_SCORES)
def test_same_width_scores_over_a_bidirectional_encoder(score):
  with pytest.raises(ValueError, match='project_keys=True') as error:
    _config(bidirectional=True, score=score)
  assert f'{score!r} score' in str(error.value)
  assert 'width 8' in str(error.value) and 'width 16' in str(error.value)
  # Either fix works.
  _config(bidirectional=True, score=score, project_keys=True)
  _config(bidirectional=False, score=score)


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(score='location'), 'needs max_source_len'),
    (
      dict(alignment='local_m', local_window=3, max_source_len=6),
      r'local_window=3 spans 2D \+ 1 = 7 .* Use local_window <= 2',
    ),
    (
      dict(alignment='local_p', local_window=3, max_source_len=6),
      r'local_window=3 spans 2D \+ 1 = 7',
    ),
    (dict(alignment='local_p', local_window=0), 'local_window=0'),
    (dict(alignment='local_m', local_window=-1), 'local_window=-1'),
    (
      dict(alignment='global'),
      'alignment must be one of soft, hard, local_m, local_p, monotonic, '
      "location_aware; got 'global'",
    ),
    (
      dict(score='bilinear'),
      "unknown score function 'bilinear'; known scores: additive, concat, "
      'cosine, dot, general, location, location_aware, normed_additive, '
      'scaled_dot',
    ),
    (
      dict(alignment='location_aware', score='additive'),
      'location-aware alignment and the "location_aware" score go together '
      r"\(got alignment='location_aware', score='additive'\)",
    ),
    (dict(score='location_aware'), 'go together'),
    (dict(alignment='location_aware', location_kernel=4), 'must be an odd'),
    (dict(alignment='location_aware', location_kernel=-1), 'must be an odd'),
    (
      dict(alignment='location_aware', location_channels=0),
      'location_channels must be an integer >= 1',
    ),
    (dict(alignment='hard', gumbel_temperature=0.0), 'temperature'),
    (dict(alignment='monotonic', attention_noise=-1.0), 'noise'),
    (dict(attention_dim=-1), 'attention_dim must be an integer >= 0'),
    (dict(max_source_len=1.5), 'max_source_len must be an integer >= 0'),
    (dict(project_keys=1), 'project_keys must be True or False'),
  ],
  ids=lambda x: (
    '-'.join(f'{k}={v}' for k, v in x.items())
    if isinstance(x, dict)
    else 'error'
  ),
)
@pytest.mark.parametrize('decoder', ['bahdanau', 'luong'])
def test_bad_attention_settings(decoder, overrides, message):
  with pytest.raises(ValueError, match=message) as error:
    _config(decoder=decoder, **overrides)
  if 'alignment' in overrides or 'score' in overrides:
    assert f'decoder {decoder!r}' in str(error.value)


@pytest.mark.parametrize(
  'overrides',
  [
    dict(alignment='local_m', local_window=2, max_source_len=5),
    dict(alignment='local_m', local_window=0, max_source_len=1),
    dict(alignment='local_p', local_window=1),
    dict(alignment='location_aware'),
    dict(alignment='monotonic', score='additive'),
    dict(score='location', max_source_len=1),
  ],
)
def test_good_attention_settings(overrides):
  config = _config(**overrides)
  config.attention_spec().check()


@pytest.mark.parametrize('decoder', ['sutskever', 'cho'])
@pytest.mark.parametrize(
  'overrides',
  [
    dict(score='dot'),
    dict(alignment='hard'),
    dict(attention_dim=8),
    dict(project_keys=True),
  ],
  ids=str,
)
def test_attention_settings_without_attention(decoder, overrides):
  with pytest.raises(ValueError, match=f'decoder {decoder!r} has no attention'):
    _config(decoder=decoder, **overrides)


def _abstract_variables(model, source_len):
  inputs = jnp.ones((B, source_len), jnp.int32)
  targets = jnp.ones((B, 3), jnp.int32)
  init = functools.partial(model.init, train=False)
  return (
    inputs,
    targets,
    jax.eval_shape(init, jax.random.key(0), inputs, targets),
  )


def test_location_score_refuses_longer_sources_when_traced():
  model = Seq2Seq(_config(score='location', max_source_len=4))
  _, targets, variables = _abstract_variables(model, 4)
  longer = jnp.ones((B, 5), jnp.int32)
  apply = functools.partial(model.apply, train=False)
  message = r'max_source_len=4 source positions but got 5'
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(apply, variables, longer, targets)
  decode = functools.partial(decoding.decode_model, model, max_len=3)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(decode, variables, longer)


# Search settings fail before anything is traced.


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(beam_size=0), 'beam_size must be an integer >= 1'),
    (dict(beam_size=1.5), 'beam_size must be an integer >= 1'),
    (dict(alpha=-0.5), 'alpha, the GNMT length-penalty exponent, must be a'),
    (dict(alpha=float('nan')), 'must be a finite number >= 0 .*got nan'),
    (dict(beam_size=1, alpha=0.6), 'alpha=0.6 would be ignored.*greedy'),
    (dict(coverage_weight=-1.0), 'coverage_weight must be a finite number'),
    (dict(coverage_weight=float('inf')), 'coverage_weight must be a finite'),
    (
      dict(beam_size=1, coverage_weight=0.2),
      'coverage_weight=0.2 would be ignored.*greedy',
    ),
  ],
)
def test_bad_search_settings(kwargs, message):
  search = dict(beam_size=2, alpha=0.0) | kwargs
  with pytest.raises(ValueError, match=message):
    decoding.check_search(**search)
  model = Seq2Seq(_config())
  inputs, _, variables = _abstract_variables(model, S)
  with pytest.raises(ValueError, match=message):
    decoding.decode_model(model, variables, inputs, max_len=3, **kwargs)
