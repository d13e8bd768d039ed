"""The Transformer: cached steps == full pass, causality, source padding,
greedy/beam decoding, other scores, config errors and a tiny overfit.

Compiling dominates these tests, so each variant's functions are jitted once
(`_compiled`) and shared by the tests.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from search_oracles import (
  TeacherForced,
  assert_matches,
  decode_model_and_beam,
  reference_nbest,
)

from attnjax import decoding, plotting
from attnjax.models.transformer import Transformer, TransformerConfig

SRC_VOCAB, TGT_VOCAB = 14, 12
B, S, T = 3, 6, 5
PAD, BOS, EOS = 0, 1, 2

# XLA's backend optimisations cost more compile time than they save here.
jit = functools.partial(
  jax.jit,
  compiler_options={
    'xla_backend_optimization_level': 0,
    'xla_llvm_disable_expensive_passes': True,
  },
)

# (pre_ln, positions, extra overrides): every norm x position pair, one with
# shared embeddings and one with a non-default score; then mixed precision.
VARIANTS = [
  (False, 'sinusoidal', ()),
  (True, 'sinusoidal', (('score', 'additive'),)),
  (False, 'learned', (('score', 'general'),)),
  (
    True,
    'learned',
    (('share_embeddings', True), ('target_vocab_size', SRC_VOCAB)),
  ),
  (
    False,
    'sinusoidal',
    (
      ('matmul_dtype', 'bfloat16'),
      ('share_embeddings', True),
      ('target_vocab_size', SRC_VOCAB),
    ),
  ),
  (True, 'learned', (('matmul_dtype', 'bfloat16'),)),
]
IDS = [
  'post_ln-sinusoidal',
  'pre_ln-sinusoidal-additive',
  'post_ln-learned-general',
  'pre_ln-learned-shared',
  'post_ln-sinusoidal-shared-bfloat16_matmul',
  'pre_ln-learned-bfloat16_matmul',
]


def _config(**overrides) -> TransformerConfig:
  fields = dict(
    source_vocab_size=SRC_VOCAB,
    target_vocab_size=TGT_VOCAB,
    d_model=16,
    num_heads=2,
    num_encoder_layers=2,
    num_decoder_layers=2,
    mlp_dim=32,
    dropout_rate=0.0,
    max_len=8,
  )
  fields.update(overrides)
  return TransformerConfig(**fields)


def _batch(vocab=TGT_VOCAB, seed=0):
  """Right-padded sources (lengths 6, 4, 1) and EOS-terminated targets."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, SRC_VOCAB, (B, S))
  targets = rng.integers(3, vocab, (B, T))
  for row, (src_len, tgt_len) in enumerate([(6, 5), (4, 3), (1, 1)]):
    inputs[row, src_len:] = PAD
    targets[row, tgt_len - 1] = EOS
    targets[row, tgt_len:] = PAD
  return jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32)


@functools.cache
def _compiled(variant):
  """Model, variables and jitted functions of one variant (built once)."""
  pre_ln, positions, extra = variant
  config = _config(pre_ln=pre_ln, positions=positions, **dict(extra))
  model = Transformer(config)
  inputs, targets = _batch(config.target_vocab_size)
  variables = jit(functools.partial(model.init, train=False))(
    jax.random.key(0), inputs, targets
  )

  @jit
  def forward(variables, inputs, targets, source_lengths=None):
    return model.apply(
      variables, inputs, targets, train=False, source_lengths=source_lengths
    )

  @jit
  def stepwise(variables, inputs, targets):
    """Teacher-forced logits, one cached `decode_step` at a time."""
    encoded = model.apply(variables, inputs, method=model.encode)
    state = model.apply(
      variables, encoded, inputs, method=model.initial_decoder_state
    )
    bos = jnp.full_like(targets[:, :1], BOS)
    decoder_inputs = jnp.concatenate([bos, targets[:, :-1]], axis=1)

    def step(state, tokens):
      logits, state = model.apply(
        variables, tokens, state, method=model.decode_step
      )
      return state, logits

    state, logits = jax.lax.scan(step, state, decoder_inputs.T)
    return jnp.swapaxes(logits, 0, 1), state

  @functools.partial(jit, static_argnames=('beam_size',))
  def search(variables, inputs, beam_size=1):
    return decoding.decode_model(
      model, variables, inputs, max_len=T, beam_size=beam_size
    )

  return model, variables, (inputs, targets), forward, stepwise, search


@pytest.mark.parametrize('variant', VARIANTS, ids=IDS)
def test_cached_steps_equal_full_pass(variant):
  model, variables, (inputs, targets), forward, stepwise, _ = _compiled(variant)
  full = forward(variables, inputs, targets)
  assert full.shape == (B, T, model.config.target_vocab_size)
  assert full.dtype == jnp.float32
  steps, state = stepwise(variables, inputs, targets)
  np.testing.assert_allclose(steps, full, atol=2e-5, rtol=2e-5)
  # Every leaf of the state has the batch first (beam search tiles it).
  for leaf in jax.tree.leaves(state):
    assert leaf.shape[0] == B
  np.testing.assert_array_equal(state['index'], T)
  weights = Transformer.attention_weights(state)
  assert weights.shape == (B, S)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(weights[inputs == PAD], 0.0)


@pytest.mark.parametrize('variant', VARIANTS[:2], ids=IDS[:2])
def test_decoder_is_causal(variant):
  """d logits[:, t] / d target embeddings[:, u] is exactly 0 for u > t."""
  model, variables, (inputs, targets), *_ = _compiled(variant)

  def logits_at(delta, t):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      is_target = context.module.name == 'target_embed'
      if is_target and context.method_name == '__call__':
        out = out + delta
      return out

    with nn.intercept_methods(add_delta):
      logits = model.apply(variables, inputs, targets, train=False)
    return logits[:, t].sum()

  delta = jnp.zeros((B, T, model.config.d_model))
  grads = jit(jax.vmap(jax.grad(logits_at), in_axes=(None, 0)))(
    delta, jnp.arange(T)
  )  # [t, batch, u, d_model]
  per_position = np.abs(np.asarray(grads)).sum(axis=(1, 3))  # [t, u]
  future = np.triu(np.ones((T, T), bool), k=1)
  np.testing.assert_array_equal(per_position[future], 0.0)
  assert (per_position[~future] > 0).all()


@pytest.mark.parametrize('variant', VARIANTS[:2], ids=IDS[:2])
def test_source_padding_never_matters(variant):
  _, variables, (inputs, targets), forward, *_ = _compiled(variant)
  lengths = jnp.sum(inputs != PAD, axis=1, dtype=jnp.int32)
  reference = forward(variables, inputs, targets)
  # Tokens at padded positions, given explicit lengths.
  garbage = jnp.where(inputs == PAD, 7, inputs)
  np.testing.assert_allclose(
    forward(variables, garbage, targets, lengths), reference, atol=1e-5
  )
  # More PAD columns (S + 2 <= max_len).
  wider = jnp.pad(inputs, ((0, 0), (0, 2)))
  np.testing.assert_allclose(
    forward(variables, wider, targets), reference, atol=1e-5
  )


def _check_greedy_is_argmax_path(variables, inputs, forward, tokens):
  """Each greedy token is the argmax (over all but PAD and BOS, which the
  searches never emit) of the teacher-forced pass on the greedy output
  itself, up to and including EOS."""
  tokens = np.asarray(tokens)
  logits = forward(variables, inputs, jnp.asarray(tokens))
  argmax = np.argmax(logits.at[..., [PAD, BOS]].set(-jnp.inf), -1)
  for row in range(tokens.shape[0]):
    ends = np.flatnonzero(tokens[row] == EOS)
    length = ends[0] + 1 if len(ends) else tokens.shape[1]
    np.testing.assert_array_equal(argmax[row, :length], tokens[row, :length])
    assert (tokens[row, length:] == PAD).all()


@pytest.mark.parametrize('variant', VARIANTS[:2], ids=IDS[:2])
def test_decode_model_greedy_and_beam(variant):
  model, variables, (inputs, _), forward, _, search = _compiled(variant)
  greedy = search(variables, inputs)
  assert greedy.shape == (B, T)
  _check_greedy_is_argmax_path(variables, inputs, forward, greedy)
  # Beam search through the cache, whose rows it reorders after every step,
  # returns what a numpy beam search returns on the full pass's log-probs:
  # the same best hypothesis, length, log-prob and length-penalised score.
  beam_size, alpha = 3, 0.6
  oracle = TeacherForced(
    lambda targets: (forward(variables, inputs, jnp.asarray(targets)), None),
    rows=B,
    max_len=T,
    vocab=model.config.target_vocab_size,
  )
  expected = [
    reference_nbest(oracle, row, beam_size, 1, alpha=alpha) for row in range(B)
  ]
  tokens, result = jit(
    decode_model_and_beam(model, max_len=T, beam_size=beam_size, alpha=alpha)
  )(variables, inputs)
  assert_matches(result, expected, T)
  np.testing.assert_array_equal(tokens, result.tokens[:, 0])
  assert (tokens != greedy).any()  # The beam found something greedy did not.


def test_beam_search_with_coverage_penalty():
  """The coverage penalty reads the last decoder layer's cross-attention,
  averaged over the heads, from the cache. Beam search with it returns what
  a numpy beam search returns on the full pass's log-probs and attention:
  the same best hypothesis, its attention and GNMT's score."""
  variant = VARIANTS[0]
  model, variables, (inputs, _), _, _, _ = _compiled(variant)

  @jit
  def forward(targets):
    logits, state = model.apply(
      variables, inputs, targets, train=False, mutable=['intermediates']
    )
    # [batch, layers, heads, target, source] -> the last layer's mean.
    weights = plotting.find_attention_weights(state['intermediates'])
    return logits, weights[:, -1].mean(axis=1)

  oracle = TeacherForced(
    forward,
    rows=B,
    max_len=T,
    vocab=model.config.target_vocab_size,
    source_mask=inputs != PAD,
  )
  beam_size, penalties = 3, dict(alpha=0.6, coverage_weight=3.0)
  expected = [
    reference_nbest(oracle, row, beam_size, 1, **penalties) for row in range(B)
  ]
  tokens, result = jit(
    decode_model_and_beam(model, max_len=T, beam_size=beam_size, **penalties)
  )(variables, inputs)
  assert_matches(result, expected, T)
  np.testing.assert_array_equal(tokens, result.tokens[:, 0])
  # The penalty changes at least one row's best hypothesis.
  alpha = dict(alpha=penalties['alpha'])
  assert any(
    reference_nbest(oracle, row, beam_size, 1, **alpha)[0][2]
    != expected[row][0][2]
    for row in range(B)
  )


def test_decode_model_uses_the_model_special_ids():
  """A model built with its own pad/bos/eos ids is decoded with them: the
  first step is fed its BOS, its EOS ends a row and its PAD fills the rest."""
  pad, bos, eos = 5, 3, 4
  model = Transformer(_config(pad_id=pad, bos_id=bos, eos_id=eos))
  inputs, _ = _batch()
  inputs = jnp.where(inputs == PAD, pad, inputs)
  first = jnp.full((B, 1), bos, jnp.int32)  # Only position 0 counts.
  variables = model.init(jax.random.key(0), inputs, first, train=False)
  search = jit(
    functools.partial(decoding.decode_model, model, max_len=T),
    static_argnames='beam_size',
  )
  greedy = np.asarray(search(variables, inputs))
  # Causal: position 0's logits depend only on the model's BOS.
  logits = model.apply(variables, inputs, first, train=False)
  logits = logits.at[..., [pad, bos]].set(-jnp.inf)
  np.testing.assert_array_equal(greedy[:, 0], np.argmax(logits[:, 0], -1))
  # An output bias that always prefers the model's EOS.
  params = nn.unbox(variables)['params']
  bias = params['output_proj']['bias']
  params['output_proj']['bias'] = jnp.zeros_like(bias).at[eos].set(100.0)
  for beam_size in (1, 2):
    tokens = search({'params': params}, inputs, beam_size=beam_size)
    expected = np.full((B, T), pad)
    expected[:, 0] = eos
    np.testing.assert_array_equal(tokens, expected)


@pytest.mark.parametrize(
  'overrides, match',
  [
    (dict(d_model=15, num_heads=2), 'divisible by num_heads'),
    (dict(d_model=15, num_heads=3), 'even for sinusoidal'),
    (dict(target_vocab_size=10, share_embeddings=True), 'share_embeddings'),
    (dict(positions='rotary'), 'positions'),
    (dict(score='location'), 'absolute key'),
    (dict(score='nope'), 'nope'),
    (dict(score=jnp.dot), 'must be the name of a score'),
    (dict(dropout_rate=1.0), 'dropout_rate'),
    (dict(num_encoder_layers=0), 'num_encoder_layers'),
    (dict(pre_ln=1), 'pre_ln'),
    (dict(eos_id=20), 'eos_id'),
    (dict(bos_id=0), 'must differ'),
    (dict(matmul_dtype='float16'), 'matmul_dtype'),
  ],
)
def test_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    _config(**overrides)


def test_too_long_source_is_an_error():
  model, variables, (inputs, targets), *_ = _compiled(VARIANTS[0])
  too_long = jnp.ones((B, model.config.max_len + 1), jnp.int32)
  with pytest.raises(ValueError, match='max_len'):
    model.apply(variables, too_long, targets, train=False)


def test_overfits_reverse_task_and_decodes_it():
  """A tiny model learns to reverse 8 sequences; greedy and beam search then
  reproduce the targets exactly."""
  config = _config(
    source_vocab_size=10,
    target_vocab_size=10,
    d_model=32,
    num_heads=2,
    mlp_dim=64,
    share_embeddings=True,
    pre_ln=True,
  )
  model = Transformer(config)
  rng = np.random.default_rng(1)
  inputs = rng.integers(3, 10, (8, 4))
  targets = np.concatenate([inputs[:, ::-1], np.full((8, 1), EOS)], axis=1)
  inputs, targets = jnp.asarray(inputs), jnp.asarray(targets)
  params = jit(functools.partial(model.init, train=False))(
    jax.random.key(0), inputs, targets
  )['params']
  optimizer = optax.adam(5e-3)

  def loss_fn(params):
    logits = model.apply({'params': params}, inputs, targets, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, targets
    ).mean()

  @jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = optimizer.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(
      step, (params, optimizer.init(params)), length=100
    )
    return params, losses

  params, losses = train(params)
  assert losses[-1] < 0.05, losses[::10]
  variables = {'params': params}
  for beam_size in (1, 2):
    decoded = jit(
      lambda v, x, k=beam_size: decoding.decode_model(
        model, v, x, max_len=5, beam_size=k
      )
    )(variables, inputs)
    np.testing.assert_array_equal(decoded, targets)


def test_config_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    _config().d_model = 8


def test_dropout_and_bfloat16():
  """Training applies dropout (rng-dependent); bfloat16 keeps float32
  logits."""
  config = _config(
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.3,
    attention_dropout_rate=0.3,
    dtype=jnp.bfloat16,
  )
  model = Transformer(config)
  inputs, targets = _batch()
  variables = jit(functools.partial(model.init, train=False))(
    jax.random.key(0), inputs, targets
  )

  @jit
  def forward(rng):
    return model.apply(
      variables, inputs, targets, train=True, rngs={'dropout': rng}
    )

  a, b = forward(jax.random.key(1)), forward(jax.random.key(2))
  assert a.dtype == jnp.float32
  assert np.isfinite(a).all()
  assert not np.allclose(a, b)


def test_bfloat16_scores_compute_in_bfloat16():
  """The float32 score weights of a bfloat16 model are cast like its other
  weights: no attention score (nor the additive score's `[batch, heads,
  q_len, k_len, head_dim]` activations) is computed in float32."""
  config = _config(
    num_encoder_layers=1,
    num_decoder_layers=1,
    score='additive',
    dtype=jnp.bfloat16,
  )
  model = Transformer(config)
  inputs, targets = _batch()
  variables = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    inputs,
    targets,
  )
  apply = functools.partial(model.apply, train=False)
  jaxpr = jax.make_jaxpr(apply)(variables, inputs, targets).jaxpr
  computed = [
    eqn.outvars[0].aval.dtype
    for eqn in jaxpr.eqns
    if eqn.primitive.name in ('dot_general', 'tanh')
  ]
  assert computed and set(computed) == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
  'rate', ['dropout_rate', 'attention_dropout_rate', 'mlp_dropout_rate', None]
)
def test_each_dropout_acts_alone_and_only_in_training(rate):
  config = _config(
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    mlp_dropout_rate=0.0,
  )
  if rate:
    config = dataclasses.replace(config, **{rate: 0.5})
  model = Transformer(config)
  inputs, targets = _batch()
  variables = jit(functools.partial(model.init, train=False))(
    jax.random.key(0), inputs, targets
  )

  @functools.partial(jit, static_argnames='train')
  def forward(rng, train):
    return model.apply(
      variables, inputs, targets, train=train, rngs={'dropout': rng}
    )

  evaluated = forward(jax.random.key(1), False)
  np.testing.assert_array_equal(forward(jax.random.key(2), False), evaluated)
  trained = forward(jax.random.key(1), True)
  if rate:
    assert np.abs(trained - evaluated).max() > 1e-2
    assert not np.allclose(forward(jax.random.key(2), True), trained)
  else:
    np.testing.assert_allclose(trained, evaluated, atol=1e-6)


def test_decoding_past_the_cache_is_an_error():
  model, variables, (inputs, _), *_ = _compiled(VARIANTS[0])
  limit = model.config.max_len
  assert model.max_decode_len == limit
  with pytest.raises(ValueError, match='key/value cache'):
    decoding.decode_model(model, variables, inputs, max_len=limit + 1)


def _reference_logits(params, config, inputs, targets):
  """The paper's Transformer in float64 numpy, written from the formulas
  (not from the model's code): embeddings * sqrt(d_model) + sin/cos
  positions, scaled dot-product heads, post-LN `LN(x + f(x))` or pre-LN
  `x + f(LN(x))` with a final LN per stack."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  d, h = config.d_model, config.num_heads
  pos = np.arange(config.max_len)[:, None]
  i = np.arange(d // 2)[None, :]
  angle = pos / 10000.0 ** (2 * i / d)
  pe = np.zeros((config.max_len, d))
  pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle)

  def norm(x, q):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * q['scale'] + q['bias']

  def attend(x, memory, q, mask):
    query, key, value = (
      np.einsum('bld,dhk->bhlk', y, q[n]['kernel'])
      + q[n]['bias'][None, :, None]
      for y, n in ((x, 'query'), (memory, 'key'), (memory, 'value'))
    )
    s = np.einsum('bhqk,bhlk->bhql', query, key) / np.sqrt(d // h)
    s = np.where(mask, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    context = np.einsum('bhql,bhlk->bqhk', w, value)
    out = np.einsum('bqhk,hkd->bqd', context, q['out']['kernel'])
    return out + q['out']['bias']

  def ffn(x, q):
    hidden = np.maximum(x @ q['wi']['kernel'] + q['wi']['bias'], 0)
    return hidden @ q['wo']['kernel'] + q['wo']['bias']

  def block(x, fn, q):
    if config.pre_ln:
      return x + fn(norm(x, q['norm']))
    return norm(x + fn(x), q['norm'])

  inputs, targets = np.asarray(inputs), np.asarray(targets)
  source_mask = (inputs != PAD)[:, None, None, :]
  x = p['source_embed']['embedding'][inputs] * np.sqrt(d)
  x = x + pe[: inputs.shape[1]]
  for n in range(config.num_encoder_layers):
    q = p[f'encoder_layers_{n}']
    x = block(
      x,
      lambda y, q=q: attend(y, y, q['self_attention'], source_mask),
      q['attention_block'],
    )
    x = block(x, lambda y, q=q: ffn(y, q['mlp']), q['mlp_block'])
  if config.pre_ln:
    x = norm(x, p['encoder_norm'])
  decoder_inputs = np.concatenate(
    [np.full_like(targets[:, :1], BOS), targets[:, :-1]], 1
  )
  t = decoder_inputs.shape[1]
  y = p['target_embed']['embedding'][decoder_inputs] * np.sqrt(d) + pe[:t]
  causal = np.tril(np.ones((t, t), bool))
  for n in range(config.num_decoder_layers):
    q = p[f'decoder_layers_{n}']
    y = block(
      y,
      lambda z, q=q: attend(z, z, q['self_attention'], causal),
      q['self_block'],
    )
    y = block(
      y,
      lambda z, q=q: attend(z, x, q['cross_attention'], source_mask),
      q['cross_block'],
    )
    y = block(y, lambda z, q=q: ffn(z, q['mlp']), q['mlp_block'])
  if config.pre_ln:
    y = norm(y, p['decoder_norm'])
  return y @ p['output_proj']['kernel'] + p['output_proj']['bias']


@pytest.mark.parametrize('pre_ln', [False, True], ids=['post_ln', 'pre_ln'])
def test_forward_matches_a_numpy_reference(pre_ln):
  """The teacher-forced logits equal an independent float64 reference of
  the paper's formulas. The other tests compare the model with itself
  (cached with full, padded with unpadded), which a wrong formula passes.
  Every parameter is random, so layer norms and biases count too."""
  config = _config(pre_ln=pre_ln, num_encoder_layers=1, num_decoder_layers=1)
  model = Transformer(config)
  inputs, targets = _batch()
  params = nn.unbox(
    model.init(jax.random.key(0), inputs, targets, train=False)
  )['params']
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
    treedef,
    [
      0.5 * jax.random.normal(key, leaf.shape)
      for key, leaf in zip(keys, leaves, strict=True)
    ],
  )
  logits = model.apply({'params': params}, inputs, targets, train=False)
  expected = _reference_logits(params, config, inputs, targets)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
