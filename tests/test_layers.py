"""Linen modules: they own the weights and agree with the pure functions."""

import functools

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import attention, layers, masks, scores
from attnjax.training import sharding

B, T, D, HEADS = 2, 7, 16, 4
PARAM_SCORES = [
  'scaled_dot',
  'dot',
  'cosine',
  'general',
  'additive',
  'normed_additive',
  'concat',
  'location',
]


def _inputs(seed=0, shape=(B, T, D)):
  return jax.random.normal(jax.random.key(seed), shape)


def _padding_mask(lengths, length=T):
  # [batch, heads=1, q_len=1, k_len]
  return masks.length_mask(jnp.asarray(lengths), length)[:, None, None, :]


def _unbox(tree):
  return nn.meta.unbox(tree)


def _f64(x):
  return np.asarray(x, np.float64)


def _np_softmax(s, mask):
  """Float64 softmax over the last axis; rows with nothing allowed are 0."""
  mask = np.broadcast_to(mask, s.shape)
  e = np.where(
    mask, np.exp(s - np.where(mask, s, -np.inf).max(-1, keepdims=True)), 0
  )
  total = e.sum(-1, keepdims=True)
  return e / np.where(total > 0, total, 1.0)


class TestMultiHeadAttention:
  @pytest.mark.parametrize('score', PARAM_SCORES)
  def test_cached_decoding_equals_full_forward(self, score):
    x = _inputs()
    model = layers.MultiHeadAttention(
      num_heads=HEADS, score=score, max_len=T, deterministic=True
    )
    params = model.init(jax.random.key(1), x, causal=True)['params']
    full = model.apply({'params': params}, x, causal=True)

    decoder = model.clone(decode=True)
    cache = decoder.init(jax.random.key(1), x)['cache']
    step = jax.jit(functools.partial(decoder.apply, mutable=['cache']))
    steps = []
    for t in range(T):
      y, state = step({'params': params, 'cache': cache}, x[:, t : t + 1])
      cache = state['cache']
      steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
    assert int(cache['cache_index']) == T

  def test_cached_decoding_with_padding_mask(self):
    x = _inputs()
    mask = _padding_mask([4, 7])
    model = layers.MultiHeadAttention(num_heads=HEADS, deterministic=True)
    params = model.init(jax.random.key(1), x)['params']
    full = model.apply({'params': params}, x, mask=mask, causal=True)
    decoder = model.clone(decode=True)
    cache = decoder.init(jax.random.key(1), x)['cache']
    step = jax.jit(functools.partial(decoder.apply, mutable=['cache']))
    for t in range(T):
      y, state = step(
        {'params': params, 'cache': cache}, x[:, t : t + 1], mask=mask
      )
      cache = state['cache']
      np.testing.assert_allclose(y[:, 0], full[:, t], atol=1e-5)

  def test_decoding_rejects_more_than_one_position(self):
    x = _inputs()
    decoder = layers.MultiHeadAttention(num_heads=HEADS, decode=True)
    variables = decoder.init(jax.random.key(1), x)
    with pytest.raises(ValueError, match='one position per call'):
      decoder.apply(variables, x[:, :2], mutable=['cache'])

  @pytest.mark.parametrize('score', PARAM_SCORES)
  def test_chunked_equals_dense(self, score):
    x = _inputs()
    mask = _padding_mask([5, 7])
    model = layers.MultiHeadAttention(
      num_heads=HEADS, score=score, max_len=T, deterministic=True
    )
    params = model.init(jax.random.key(1), x)['params']
    dense = model.apply({'params': params}, x, mask=mask, causal=True)
    chunked = model.clone(implementation='chunked', chunk_size=3).apply(
      {'params': params}, x, mask=mask, causal=True
    )
    np.testing.assert_allclose(chunked, dense, atol=1e-5)

  def test_chunked_causal_never_builds_the_whole_mask(self):
    """O(q_len x chunk) memory holds for causal self-attention too: no
    `[..., T, T]` array appears in the computation, forward or backward."""
    length, chunk = 64, 8
    x = jnp.ones((2, length, D))
    model = layers.MultiHeadAttention(
      num_heads=HEADS, implementation='chunked', chunk_size=chunk
    )
    params = model.init(jax.random.key(1), x)['params']
    mask = _padding_mask(jnp.array([length, 40]), length)

    def loss(params):
      out = model.apply({'params': params}, x, mask=mask, causal=True)
      return jnp.sum(out)

    shapes = set()

    def collect(jaxpr):
      for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          collect(sub)

    collect(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert not [s for s in shapes if s[-2:] == (length, length)]
    assert [s for s in shapes if s[-2:] == (length, chunk)]

  def test_jax_path_equals_dense(self):
    x = _inputs()
    mask = _padding_mask([3, 7])
    model = layers.MultiHeadAttention(num_heads=HEADS, deterministic=True)
    params = model.init(jax.random.key(1), x)['params']
    dense = model.apply({'params': params}, x, mask=mask, causal=True)
    fast = model.clone(implementation='jax').apply(
      {'params': params}, x, mask=mask, causal=True
    )
    np.testing.assert_allclose(fast, dense, atol=1e-5)

  def test_jax_path_equals_dense_for_a_sequence_without_valid_keys(self):
    # An all-padding entry: jax.nn.dot_product_attention gives a query with
    # no allowed key the mean of the values; the dense and chunked paths
    # (masked_softmax's all-zero row) a zero context.
    x = _inputs()
    mask = _padding_mask([0, 7])
    model = layers.MultiHeadAttention(num_heads=HEADS, deterministic=True)
    params = model.init(jax.random.key(1), x)['params']
    dense = model.apply({'params': params}, x, mask=mask)
    fast = model.clone(implementation='jax').apply(
      {'params': params}, x, mask=mask
    )
    np.testing.assert_allclose(fast, dense, atol=1e-5)

  def test_matches_pure_attention_on_its_own_projections(self):
    x, y = _inputs(0), _inputs(1, (B, 5, D))
    model = layers.MultiHeadAttention(
      num_heads=HEADS, score='general', deterministic=True
    )
    params = _unbox(model.init(jax.random.key(1), x, y)['params'])

    def project(name, inputs):
      p = params[name]
      return (
        jnp.einsum('btd,dhk->bhtk', inputs, p['kernel']) + p['bias'][:, None, :]
      )

    q, k, v = project('query', x), project('key', y), project('value', y)
    w = params['score_w']  # one bilinear matrix per head
    logits = jnp.einsum('bhqd,hde,bhke->bhqk', q, w, k)
    context = jnp.einsum('bhqk,bhkd->bhqd', jax.nn.softmax(logits), v)
    expected = (
      jnp.einsum('bhqd,hde->bqe', context, params['out']['kernel'])
      + params['out']['bias']
    )
    np.testing.assert_allclose(
      model.apply({'params': params}, x, y), expected, atol=1e-5
    )

  def test_per_head_score_weights(self):
    model = layers.MultiHeadAttention(
      num_heads=HEADS, score='additive', score_hidden=6
    )
    params = _unbox(model.init(jax.random.key(0), _inputs())['params'])
    head_depth = D // HEADS
    assert params['score_w_q'].shape == (HEADS, head_depth, 6)
    assert params['score_v'].shape == (HEADS, 6)

  @pytest.mark.parametrize('score', ['general', 'additive'])
  def test_per_head_score_weights_init_like_one_head(self, score):
    """Each head's lecun_normal score weights have std 1 / sqrt(head
    depth), as in a single-head layer: the heads dim is no fan-in."""
    heads, depth = 8, 8
    model = layers.MultiHeadAttention(num_heads=heads, score=score)
    x = jnp.ones((1, 2, heads * depth))
    params = _unbox(model.init(jax.random.key(0), x)['params'])
    w = params['score_w' if score == 'general' else 'score_w_q']
    assert w.shape == (heads, depth, depth)
    np.testing.assert_allclose(w.std() * depth**0.5, 1.0, atol=0.15)
    # The heads are drawn independently.
    assert not np.allclose(w[0], w[1])

  def test_records_weights(self):
    x = _inputs()
    mask = _padding_mask([3, 7])
    model = layers.MultiHeadAttention(num_heads=HEADS, deterministic=True)
    variables = model.init(jax.random.key(1), x)
    _, state = model.apply(variables, x, mask=mask, mutable=['intermediates'])
    (weights,) = state['intermediates']['attention_weights']
    assert weights.shape == (B, HEADS, T, T)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert float(jnp.abs(weights[0, :, :, 3:]).max()) == 0.0

  def test_causal_model_never_sees_the_future(self):
    x = _inputs()
    model = layers.MultiHeadAttention(
      num_heads=HEADS, score='additive', deterministic=True
    )
    params = model.init(jax.random.key(1), x)['params']
    # d output[b, t] / d input[b', s, :] for all t, s at once.
    jacobian = jax.jacrev(
      lambda x: model.apply({'params': params}, x, causal=True).sum(-1)
    )(x)
    per_position = jnp.abs(jacobian).sum(axis=(2, 4))  # [batch, t, s]
    future = jnp.triu(jnp.ones((T, T), bool), k=1)
    assert float(jnp.where(future, per_position, 0).max()) == 0.0
    assert float(jnp.where(future, 1, per_position).min()) > 0.0

  @pytest.mark.parametrize('implementation', ['dense', 'chunked', 'jax'])
  def test_padding_never_changes_the_output(self, implementation):
    x = _inputs()
    lengths = jnp.array([4, 6])
    mask = _padding_mask(lengths)
    junk = 1e3 * _inputs(5)
    keep = masks.length_mask(lengths, T)[..., None]
    x_junk = jnp.where(keep, x, junk)
    model = layers.MultiHeadAttention(
      num_heads=HEADS,
      implementation=implementation,
      chunk_size=3,
      deterministic=True,
    )
    params = model.init(jax.random.key(1), x)['params']
    out = model.apply({'params': params}, x, mask=mask)
    out_junk = model.apply({'params': params}, x_junk, mask=mask)
    np.testing.assert_allclose(
      jnp.where(keep, out, 0), jnp.where(keep, out_junk, 0), atol=1e-4
    )

  def test_dropout(self):
    x = _inputs()
    model = layers.MultiHeadAttention(num_heads=HEADS, dropout_rate=0.5)
    params = model.init(jax.random.key(1), x, deterministic=True)['params']
    det = model.apply({'params': params}, x, deterministic=True)
    train = functools.partial(
      model.apply, {'params': params}, x, deterministic=False
    )
    a = train(rngs={'dropout': jax.random.key(2)})
    b = train(rngs={'dropout': jax.random.key(3)})
    assert not np.allclose(a, det) and not np.allclose(a, b)
    np.testing.assert_allclose(
      train(rngs={'dropout': jax.random.key(2)}), a, atol=0
    )

  def test_bfloat16_computation(self):
    x = _inputs()
    model = layers.MultiHeadAttention(num_heads=HEADS, deterministic=True)
    params = model.init(jax.random.key(1), x)['params']
    ref = model.apply({'params': params}, x, causal=True)
    low = model.clone(dtype=jnp.bfloat16).apply(
      {'params': params}, x.astype(jnp.bfloat16), causal=True
    )
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), ref, atol=0.1)

  @pytest.mark.parametrize('score', ['additive', 'general'])
  def test_score_weights_compute_in_the_module_dtype(self, score):
    """float32 score weights do not promote a bfloat16 layer's scores (and
    the additive `[..., q_len, k_len, H]` activations) to float32."""
    x = _inputs().astype(jnp.bfloat16)
    model = layers.MultiHeadAttention(
      num_heads=HEADS, score=score, dtype=jnp.bfloat16
    )
    variables = model.init(jax.random.key(1), x)
    jaxpr = jax.make_jaxpr(model.apply)(variables, x).jaxpr
    computed = [
      eqn.outvars[0].aval.dtype
      for eqn in jaxpr.eqns
      if eqn.primitive.name in ('dot_general', 'tanh')
    ]
    assert computed and set(computed) == {jnp.dtype(jnp.bfloat16)}

  def test_bad_configurations(self):
    x = _inputs()
    with pytest.raises(ValueError, match='must divide'):
      layers.MultiHeadAttention(num_heads=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match='scaled dot'):
      layers.MultiHeadAttention(
        num_heads=HEADS, score='additive', implementation='jax'
      ).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match='implementation'):
      layers.MultiHeadAttention(num_heads=HEADS, implementation='flash').init(
        jax.random.key(0), x
      )
    with pytest.raises(ValueError, match='known scores'):
      layers.MultiHeadAttention(num_heads=HEADS, score='dott').init(
        jax.random.key(0), x
      )
    with pytest.raises(ValueError, match='max_len'):
      layers.MultiHeadAttention(num_heads=HEADS, score='location').init(
        jax.random.key(0), x
      )
    with pytest.raises(ValueError, match='max_len=4'):
      layers.MultiHeadAttention(
        num_heads=HEADS, score='location', max_len=4
      ).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match='LocationAwareAttention'):
      layers.MultiHeadAttention(num_heads=HEADS, score='location_aware').init(
        jax.random.key(0), x
      )
    with pytest.raises(ValueError, match='no attention dropout'):
      layers.MultiHeadAttention(
        num_heads=HEADS, implementation='chunked', dropout_rate=0.1
      ).init(jax.random.key(0), x, deterministic=False)

  def test_logical_axes(self):
    model = layers.MultiHeadAttention(num_heads=HEADS, score='general')
    boxed = model.init(jax.random.key(0), _inputs())['params']
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs['query']['kernel']) == ('embed', 'heads', 'kv')
    assert tuple(specs['out']['kernel']) == ('heads', 'kv', 'embed')
    # A logical name may occur once per array, or no mesh mapping exists.
    assert tuple(specs['score_w']) == ('heads', 'embed', None)
    mesh_specs = nn.logical_to_mesh(specs, sharding.LOGICAL_RULES)
    assert tuple(mesh_specs['score_w']) == ('model', None, None)


class TestAttention:
  @pytest.mark.parametrize('score', PARAM_SCORES)
  def test_equals_pure_attention(self, score):
    q, k = _inputs(0, (B, 3, 8)), _inputs(1, (B, T, 8))
    mask = masks.length_mask(jnp.array([4, 7]), T)[:, None, :]
    layer = layers.Attention(score=score, hidden=5, max_len=T)
    variables = layer.init(jax.random.key(2), q, k, mask=mask)
    params = _unbox(variables.get('params', {}))
    context, weights = layer.apply({'params': params}, q, k, mask=mask)
    p = {name.removeprefix('score_'): value for name, value in params.items()}
    if score == 'location':
      score_fn = lambda q, k: scores.location(q, p['w'], k.shape[-2])  # noqa: E731
    else:
      score_fn = functools.partial(scores.get(score), **p)
    ref_context, ref_weights = attention.attention(q, k, k, score_fn, mask)
    np.testing.assert_allclose(context, ref_context, atol=1e-6)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6)

  def test_use_bias_false_drops_the_bias_or_is_refused(self):
    q, k = _inputs(0, (B, 3, 8)), _inputs(1, (B, T, 8))
    layer = layers.Attention(score='additive', use_bias=False)
    names = set(_unbox(layer.init(jax.random.key(0), q, k)['params']))
    assert names == {'score_w_q', 'score_w_k', 'score_v'}
    normed = layers.Attention(score='normed_additive', use_bias=False)
    with pytest.raises(ValueError, match='always has its bias'):
      normed.init(jax.random.key(0), q, k)

  def test_callable_score_and_values(self):
    q, k, v = (
      _inputs(0, (B, 3, 8)),
      _inputs(1, (B, T, 8)),
      _inputs(2, (B, T, 5)),
    )
    layer = layers.Attention(score=scores.cosine)
    variables = layer.init(jax.random.key(0), q, k, v)
    assert not variables
    context, weights = layer.apply(variables, q, k, v)
    ref = attention.attention(q, k, v, scores.cosine)
    np.testing.assert_allclose(context, ref[0], atol=1e-6)
    _, state = layer.apply(variables, q, k, v, mutable=['intermediates'])
    chex.assert_trees_all_close(
      state['intermediates']['attention_weights'][0], weights
    )


class TestAlignmentModules:
  def _mask(self):
    return masks.length_mask(jnp.array([5, 7]), T)[:, None, :]

  def test_local_m_window(self):
    q, k = _inputs(0, (B, 4, D)), _inputs(1)
    layer = layers.LocalAttention(window=1)
    variables = layer.init(jax.random.key(0), q, k)
    positions = jnp.array([0, 2, 4, 6])
    _, weights = layer.apply(variables, q, k, positions=positions)
    for row, center in enumerate(positions):
      outside = jnp.abs(jnp.arange(T) - center) > 1
      assert float(jnp.abs(weights[:, row][:, outside]).max()) == 0.0
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)

  def test_local_p_gaussian_and_source_length(self):
    q, k = _inputs(0, (B, 4, D)), _inputs(1)
    mask = self._mask()
    layer = layers.LocalAttention(window=2, predictive=True)
    variables = layer.init(jax.random.key(0), q, k, mask=mask)
    _, weights = layer.apply(variables, q, k, mask=mask)
    assert float(weights[0, :, 5:].max()) == 0.0  # never past the source
    assert bool(jnp.all(weights.sum(-1) <= 1.0 + 1e-6))
    params = _unbox(variables['params'])
    centers = attention.predict_positions(
      q, params['w_p'], params['v_p'], jnp.array([5, 7])
    )
    expected = attention.local_attention(
      q,
      k,
      k,
      functools.partial(scores.general, w=params['score_w']),
      centers,
      width=2,
      mask=mask,
      gaussian=True,
    )[1]
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    with pytest.raises(ValueError, match='predicts its positions'):
      layer.apply(variables, q, k, mask=mask, positions=jnp.arange(4))

  def test_local_p_takes_a_key_only_mask(self):
    """A `[k_len]` mask broadcasts like `[batch, 1, k_len]` rows of it."""
    q, k = _inputs(0, (B, 4, D)), _inputs(1)
    layer = layers.LocalAttention(window=2, predictive=True)
    variables = layer.init(jax.random.key(0), q, k)
    lengths = jnp.array([5, 5])
    _, expected = layer.apply(
      variables, q, k, mask=masks.length_mask(lengths, T)[:, None, :]
    )
    _, weights = layer.apply(
      variables, q, k, mask=masks.length_mask(jnp.array(5), T)
    )
    np.testing.assert_allclose(weights, expected, atol=1e-6)

  def test_local_p_positions_in_float32_for_16_bit_inputs(self):
    """p_t = S sigmoid(...) in bfloat16 would move by S / 2^8 steps, about
    a sigma of the window at S = 1000."""
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(64, 32)), jnp.bfloat16)
    w_p = jnp.asarray(rng.normal(size=(32, 16)) / 6, jnp.bfloat16)
    v_p = jnp.asarray(rng.normal(size=(16,)) / 4, jnp.bfloat16)
    centers = attention.predict_positions(h, w_p, v_p, jnp.array(1001))
    assert centers.dtype == jnp.float32
    f32 = [np.asarray(x, np.float64) for x in (h, w_p, v_p)]
    expected = 1000 / (1 + np.exp(-np.tanh(f32[0] @ f32[1]) @ f32[2]))
    np.testing.assert_allclose(centers, expected, atol=0.05)

  def test_hard_attention_modes(self):
    q, k = _inputs(0, (B, 3, D)), _inputs(1)
    mask = self._mask()
    layer = layers.HardAttention()
    variables = layer.init(
      jax.random.key(0), q, k, mask=mask, deterministic=True
    )
    _, argmax = layer.apply(variables, q, k, mask=mask, deterministic=True)
    np.testing.assert_allclose(argmax.sum(-1), 1.0, atol=1e-6)
    assert float(argmax[0, :, 5:].max()) == 0.0
    _, sampled = layer.apply(
      variables,
      q,
      k,
      mask=mask,
      deterministic=False,
      rngs={'gumbel': jax.random.key(4)},
    )
    # Straight-through values are one-hot up to float rounding.
    np.testing.assert_allclose(sampled.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(jnp.round(sampled), sampled, atol=1e-6)

  def test_monotonic_step_by_step_equals_sequence(self):
    q, k = _inputs(0, (B, 4, D)), _inputs(1)
    mask = self._mask()
    for deterministic in (True, False):
      layer = layers.MonotonicAttention(noise_std=0.0, score_bias_init=0.0)
      variables = layer.init(
        {'params': jax.random.key(0), 'noise': jax.random.key(1)},
        q,
        k,
        mask=mask,
        deterministic=deterministic,
      )
      apply = functools.partial(
        layer.apply,
        variables,
        mask=mask,
        deterministic=deterministic,
        rngs={'noise': jax.random.key(1)},
      )
      context, weights = apply(q, k)
      prev = None
      for t in range(q.shape[1]):
        c_t, w_t = apply(q[:, t : t + 1], k, init=prev)
        np.testing.assert_allclose(w_t[:, 0], weights[:, t], atol=1e-6)
        np.testing.assert_allclose(c_t[:, 0], context[:, t], atol=1e-5)
        prev = w_t[:, 0]
      assert float(weights[0, :, 5:].max()) == 0.0
      if deterministic:  # hard monotonic decoding: one-hot or nothing
        assert set(np.unique(np.asarray(weights))) <= {0.0, 1.0}

  def test_location_aware_step_by_step_equals_sequence(self):
    q, k = _inputs(0, (B, 4, D)), _inputs(1)
    mask = self._mask()
    layer = layers.LocationAwareAttention(channels=3, kernel_size=5)
    variables = layer.init(jax.random.key(0), q, k, mask=mask)
    context, weights = layer.apply(variables, q, k, mask=mask)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    prev = None
    for t in range(q.shape[1]):
      c_t, w_t = layer.apply(
        variables, q[:, t : t + 1], k, mask=mask, init=prev
      )
      np.testing.assert_allclose(w_t[:, 0], weights[:, t], atol=1e-6)
      np.testing.assert_allclose(c_t[:, 0], context[:, t], atol=1e-5)
      prev = w_t[:, 0]
    # The previous alignment matters: a different start changes step 0.
    other = jax.nn.one_hot(jnp.array([4, 6]), T)
    _, w_other = layer.apply(variables, q, k, mask=mask, init=other)
    assert not np.allclose(w_other[:, 0], weights[:, 0])

  # The modules against float64 numpy references of the paper formulas,
  # computed from the modules' own parameters.

  def test_local_m_matches_numpy(self):
    q, k = _inputs(0, (B, 4, D)), _inputs(1)
    mask = self._mask()
    layer = layers.LocalAttention(window=1)  # Luong's 'general' score
    variables = layer.init(jax.random.key(0), q, k, mask=mask)
    positions = jnp.array([0, 2, 4, 6])
    context, weights = layer.apply(
      variables, q, k, mask=mask, positions=positions
    )
    w = _f64(_unbox(variables['params'])['score_w'])
    q64, k64 = _f64(q), _f64(k)
    logits = q64 @ w @ np.swapaxes(k64, -1, -2)
    window = np.abs(np.arange(T) - np.asarray(positions)[:, None]) <= 1
    expected = _np_softmax(logits, window & np.asarray(mask))
    np.testing.assert_allclose(weights, expected, atol=1e-5)
    np.testing.assert_allclose(context, expected @ k64, atol=1e-5)

  def test_hard_attention_argmax_matches_numpy(self):
    q, k = _inputs(0, (B, 3, D)), _inputs(1)
    mask = self._mask()
    layer = layers.HardAttention()  # Bahdanau's additive score
    variables = layer.init(
      jax.random.key(0), q, k, mask=mask, deterministic=True
    )
    context, weights = layer.apply(
      variables, q, k, mask=mask, deterministic=True
    )
    p = {n: _f64(x) for n, x in _unbox(variables['params']).items()}
    hidden = (_f64(q) @ p['score_w_q'])[:, :, None] + (
      _f64(k) @ p['score_w_k']
    )[:, None]
    logits = np.tanh(hidden + p['score_b']) @ p['score_v']
    allowed = np.broadcast_to(np.asarray(mask), logits.shape)
    choice = np.argmax(np.where(allowed, logits, -np.inf), -1)
    expected = np.eye(T)[choice]
    np.testing.assert_array_equal(weights, expected)
    np.testing.assert_allclose(context, expected @ _f64(k), atol=1e-6)

    # Training: a sampled one-hot on an allowed key, and a straight-through
    # gradient that reaches the score's weights.
    def loss(params):
      _, w = layer.apply(
        {'params': params},
        q,
        k,
        mask=mask,
        deterministic=False,
        rngs={'gumbel': jax.random.key(4)},
      )
      return jnp.sum(w * jnp.arange(T)), w

    grads, sampled = jax.grad(loss, has_aux=True)(variables['params'])
    sampled = np.asarray(sampled)
    np.testing.assert_array_equal(sampled.sum(-1), 1.0)
    assert np.all(sampled[~allowed] == 0)
    g = np.asarray(_unbox(grads)['score_v'])
    assert np.all(np.isfinite(g)) and np.any(g != 0)

  def test_monotonic_matches_numpy(self):
    """Energies g v^T / ||v|| tanh(W s + V h + b) + r (Raffel et al.),
    with the learned bias r, then the expected alignment recurrence in
    training and hard monotonic decoding at inference."""
    q, k = _inputs(0, (B, 4, D)), _inputs(1)
    mask = self._mask()
    layer = layers.MonotonicAttention(noise_std=0.0, score_bias_init=-0.7)
    variables = layer.init(
      jax.random.key(0), q, k, mask=mask, deterministic=True
    )
    # A larger gain than the initial 1 / sqrt(H) spreads p_choose over
    # (0, 1), so hard decoding both attends and skips.
    variables = {
      'params': {**_unbox(variables['params']), 'score_g': jnp.float32(3.0)}
    }
    p = {n: _f64(x) for n, x in variables['params'].items()}
    assert p['score_bias'] == np.float32(-0.7)
    hidden = (_f64(q) @ p['score_w_q'])[:, :, None] + (
      _f64(k) @ p['score_w_k']
    )[:, None]
    v_unit = p['score_g'] * p['score_v'] / np.linalg.norm(p['score_v'])
    energy = np.tanh(hidden + p['score_b']) @ v_unit + p['score_bias']
    valid = np.broadcast_to(np.asarray(mask), energy.shape)
    p_choose = np.where(valid, 1 / (1 + np.exp(-energy)), 0.0)

    # Expected alignment, row by row from a one-hot at key 0:
    # alpha_j = p_j sum_{k<=j} alpha_prev_k prod_{l=k}^{j-1} (1 - p_l).
    expected = np.zeros(energy.shape)
    for b in range(B):
      prev = np.eye(T)[0]
      for t in range(q.shape[1]):
        for j in range(T):
          expected[b, t, j] = p_choose[b, t, j] * sum(
            prev[m] * np.prod(1 - p_choose[b, t, m:j]) for m in range(j + 1)
          )
        prev = expected[b, t]
    _, soft = layer.apply(
      variables,
      q,
      k,
      mask=mask,
      deterministic=False,
      rngs={'noise': jax.random.key(5)},
    )
    np.testing.assert_allclose(soft, expected, atol=1e-5)

    # Hard: the first valid key at or after the last one with p >= 0.5.
    hard_expected = np.zeros(energy.shape)
    for b in range(B):
      start = 0
      for t in range(q.shape[1]):
        hits = [j for j in range(start, T) if p_choose[b, t, j] >= 0.5]
        if not hits:
          break
        start = hits[0]
        hard_expected[b, t, start] = 1.0
    _, hard = layer.apply(variables, q, k, mask=mask, deterministic=True)
    assert hard_expected.sum() > 0
    np.testing.assert_array_equal(hard, hard_expected)

    # Training noise (pre-sigmoid) changes the alignment.
    _, noisy = layer.clone(noise_std=1.0).apply(
      variables,
      q,
      k,
      mask=mask,
      deterministic=False,
      rngs={'noise': jax.random.key(5)},
    )
    assert not np.allclose(noisy, soft, atol=1e-3)

  def test_location_aware_rejects_even_kernel(self):
    q, k = _inputs(0, (B, 4, D)), _inputs(1)
    with pytest.raises(ValueError, match='odd'):
      layers.LocationAwareAttention(kernel_size=4).init(jax.random.key(0), q, k)
