"""Flax linen modules over the pure attention functions.

The modules own the parameters; the maths stays in `attnjax.scores` and
`attnjax.attention`. Every module records its attention weights with
`self.sow('intermediates', 'attention_weights', weights)`, so the alignments of
any model built from them can be read back with
`model.apply(..., mutable=['intermediates'])` and plotted.

Parameters carry logical axis names (`embed`, `heads`, `kv`, `score_hidden`)
for `nn.logical_to_mesh_sharding`.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import attention as attn_lib
from attnjax import masks, scores

Array = jax.Array
ScoreFn = Callable[..., Array]
Dtype = Any

_default_kernel_init = nn.initializers.lecun_normal()


@dataclasses.dataclass(frozen=True)
class _ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: Callable[..., Array]


def _score_param_specs(
  name: str,
  q_depth: int,
  k_depth: int,
  hidden: int,
  max_len: int | None,
  use_bias: bool,
) -> dict[str, _ParamSpec]:
  """Shapes, logical axes and initialisers of a registered score's weights."""
  matrix = _default_kernel_init
  vector = nn.initializers.normal(stddev=hidden**-0.5)
  zeros = nn.initializers.zeros_init()
  additive = {
    'w_q': _ParamSpec((q_depth, hidden), ('embed', 'score_hidden'), matrix),
    'w_k': _ParamSpec((k_depth, hidden), ('embed', 'score_hidden'), matrix),
    'v': _ParamSpec((hidden,), ('score_hidden',), vector),
  }
  bias = {'b': _ParamSpec((hidden,), ('score_hidden',), zeros)}
  if name in ('dot', 'scaled_dot', 'cosine'):
    return {}
  if name == 'general':
    # A logical axis name may occur once per array; the key side has none.
    return {'w': _ParamSpec((q_depth, k_depth), ('embed', None), matrix)}
  if name == 'additive':
    return {**additive, **(bias if use_bias else {})}
  if name == 'normed_additive':
    if not use_bias:
      raise ValueError(
        'the "normed_additive" score always has its bias b (Raffel et al.); '
        "use_bias=False applies to 'additive' only."
      )
    # Raffel et al. initialise g to 1 / sqrt(hidden).
    g = nn.initializers.constant(hidden**-0.5)
    return {**additive, **bias, 'g': _ParamSpec((), (), g)}
  if name == 'concat':
    return {
      'w': _ParamSpec((q_depth + k_depth,), (None,), vector),
    }
  if name == 'location':
    if max_len is None:
      raise ValueError(
        'the "location" score needs max_len, the largest number of key '
        'positions it may attend over (one weight column each).'
      )
    return {'w': _ParamSpec((q_depth, max_len), ('embed', None), matrix)}
  if name == 'location_aware':
    raise ValueError(
      'the "location_aware" score needs the previous alignment; use '
      'LocationAwareAttention.'
    )
  scores.get(name)  # raises for unknown names, listing the known ones
  raise ValueError(
    f'score {name!r} is registered but has no parameter recipe in '
    'attnjax.layers; pass the function itself (with its weights bound) '
    'as `score=` instead.'
  )


def _bind_score(name: str, params: dict[str, Array], heads: bool) -> ScoreFn:
  """Binds `params` to the registered score `name`.

  With `heads`, every parameter has a leading heads dim and the score is
  vmapped over the heads axis (-3) of `q [..., heads, q_len, d]` and `k`.
  """
  raw = scores.get(name)

  def single(q, k, p, key_offset):
    if name == 'location':
      return raw(q, p['w'], k.shape[-2], key_offset=key_offset)
    return raw(q, k, **p)

  def score_fn(q, k, key_offset=0):
    if not heads or not params:
      return single(q, k, params, key_offset)
    per_head = jax.vmap(
      functools.partial(single, key_offset=key_offset),
      in_axes=(-3, -3, 0),
      out_axes=-3,
    )
    return per_head(q, k, params)

  if name != 'location':
    # Only position-dependent scores advertise `key_offset`.
    return lambda q, k: score_fn(q, k)
  return score_fn


def _per_head(init: Callable[..., Array], num_heads: int):
  """`init` applied to each head's slice of a `[heads, ...]` weight.

  Called on the whole shape, a fan-in initialiser (lecun_normal) would count
  the heads dim into its receptive field and draw every head's weights
  sqrt(num_heads) times smaller than a single head's.
  """

  def init_heads(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, num_heads)
    return jax.vmap(lambda k: init(k, shape[1:], dtype))(keys)

  return init_heads


def _param(module, name, init, shape, axes, dtype):
  """`module.param` with logical axis names for sharding."""
  return module.param(
    name, nn.with_logical_partitioning(init, axes), shape, dtype
  )


def make_score(
  module: nn.Module,
  score: str | ScoreFn,
  q_depth: int,
  k_depth: int,
  *,
  hidden: int | None = None,
  max_len: int | None = None,
  use_bias: bool = True,
  num_heads: int | None = None,
  param_dtype: Dtype = jnp.float32,
  dtype: Dtype | None = None,
) -> ScoreFn:
  """Creates the weights of `score` in `module` and returns a bound score_fn.

  `score` is a registered name (see `attnjax.scores.SCORES`) or a callable
  `score(q, k) -> [..., q_len, k_len]` used as is. With `num_heads`, each
  head gets its own weights (a leading heads dim). With `dtype`, the weights
  are cast to it before use, as flax casts a layer's parameters to its
  computation dtype (float32 weights would otherwise promote the score, and
  the additive family's `[..., q_len, k_len, hidden]` activations, of
  16-bit queries and keys to float32).
  """
  if callable(score):
    return score
  params = score_params(
    module,
    score,
    q_depth,
    k_depth,
    hidden=hidden,
    max_len=max_len,
    use_bias=use_bias,
    num_heads=num_heads,
    param_dtype=param_dtype,
  )
  if dtype is not None:
    params = {name: jnp.asarray(p, dtype) for name, p in params.items()}
  return _bind_score(score, params, heads=num_heads is not None)


def score_params(
  module: nn.Module,
  score: str,
  q_depth: int,
  k_depth: int,
  *,
  hidden: int | None = None,
  max_len: int | None = None,
  use_bias: bool = True,
  num_heads: int | None = None,
  param_dtype: Dtype = jnp.float32,
) -> dict[str, Array]:
  """Creates the weights of the registered score `score` in `module`.

  Returns them by the score function's keyword names (`w_q`, `w_k`, `v`,
  ...); the module's parameters are named `score_<keyword>`. For callers
  that apply the score in pieces (e.g. project the keys once per sequence);
  `make_score` binds them instead.
  """
  hidden = hidden or k_depth
  specs = _score_param_specs(score, q_depth, k_depth, hidden, max_len, use_bias)
  params = {}
  for param_name, spec in specs.items():
    shape, axes, init = spec.shape, spec.axes, spec.init
    if num_heads is not None:
      shape, axes = (num_heads, *shape), ('heads', *axes)
      init = _per_head(init, num_heads)
    params[param_name] = _param(
      module, f'score_{param_name}', init, shape, axes, param_dtype
    )
  return params


class ScoredAttention(nn.Module):
  """Base of the single-head modules: the score and the weights it owns.

  Attributes:
    score: a registered score name or a callable `score(q, k)`.
    hidden: H of the additive family (default: the key depth).
    max_len: most key positions of the `location` score.
    use_bias: the additive score's bias b.
    param_dtype: dtype of the score weights.
  """

  score: str | ScoreFn = 'additive'
  hidden: int | None = None
  max_len: int | None = None
  use_bias: bool = True
  param_dtype: Dtype = jnp.float32

  def score_fn(self, q_depth: int, k_depth: int) -> ScoreFn:
    """Creates the score's weights (inside a compact call) and binds them."""
    return make_score(
      self,
      self.score,
      q_depth,
      k_depth,
      hidden=self.hidden,
      max_len=self.max_len,
      use_bias=self.use_bias,
      param_dtype=self.param_dtype,
    )


class Attention(ScoredAttention):
  """Single-head soft attention with any score function (see
  `ScoredAttention` for the attributes)."""

  @nn.compact
  def __call__(
    self,
    query: Array,
    keys: Array,
    values: Array | None = None,
    mask: Array | None = None,
  ) -> tuple[Array, Array]:
    """Attends from the queries over the keys.

    Args:
      query: `[..., q_len, q_depth]`.
      keys: `[..., k_len, k_depth]`.
      values: `[..., k_len, v_depth]` (default: the keys).
      mask: bool, broadcastable to `[..., q_len, k_len]`.

    Returns:
      `(context [..., q_len, v_depth], weights [..., q_len, k_len])`.
    """
    values = keys if values is None else values
    score_fn = self.score_fn(query.shape[-1], keys.shape[-1])
    context, weights = attn_lib.attention(query, keys, values, score_fn, mask)
    self.sow('intermediates', 'attention_weights', weights)
    return context, weights


class MultiHeadAttention(nn.Module):
  """Multi-head attention with any score function (scaled dot by default).

  Inputs are `[batch..., length, features]`. Heads are split as
  `[batch..., heads, length, head_depth]` for the pure functions.

  Attributes:
    num_heads: number of heads; must divide `qkv_features`.
    qkv_features: width of the projected queries/keys/values (default: the
      query features).
    out_features: output width (default: the query features).
    score: a registered score name or a callable on per-head q, k. Scores
      with weights get one set per head.
    score_hidden: H of the additive family, per head (default: head depth).
    max_len: most key positions of the `location` score.
    dropout_rate: dropout on the attention weights.
    deterministic: disables dropout (may be given at call time instead).
    decode: self-attention with a key/value cache, one position per call.
      Initialise with the full-length input (it sets the cache size), then
      call with `[batch, 1, features]` inputs, at most that many times: the
      index is traced, so a call past the cache is not caught (the write is
      clamped to the last slot) and gives wrong outputs.
    implementation: 'dense' (`attnjax.attention.attention`, records the
      weights), 'chunked' (`chunked_attention`: O(q_len x chunk_size) memory,
      no weights recorded) or 'jax' (`jax.nn.dot_product_attention`, cuDNN on
      a GPU; scaled dot only, no weights recorded).
    chunk_size: keys per chunk for 'chunked'.
    use_bias: biases of the projections.
    dtype: computation dtype (None: promoted from the inputs and the
      parameters, as in flax, so 16-bit inputs with float32 parameters
      compute in float32).
    param_dtype: parameter dtype.
    dot_general: the product of the four projections (None:
      `lax.dot_general`), e.g. `attnjax.precision.bfloat16_dot_general`.
  """

  num_heads: int
  qkv_features: int | None = None
  out_features: int | None = None
  score: str | ScoreFn = 'scaled_dot'
  score_hidden: int | None = None
  max_len: int | None = None
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  decode: bool = False
  implementation: str = 'dense'
  chunk_size: int = 512
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., Array] = _default_kernel_init
  dot_general: Callable[..., Array] | None = None

  def _check_config(self, features: int) -> None:
    if self.num_heads < 1 or features % self.num_heads:
      raise ValueError(
        f'MultiHeadAttention: num_heads={self.num_heads} must divide the '
        f'projected width qkv_features={features}.'
      )
    if self.implementation not in ('dense', 'chunked', 'jax'):
      raise ValueError(
        "MultiHeadAttention: implementation must be 'dense', 'chunked' or "
        f"'jax'; got {self.implementation!r}."
      )
    if self.implementation == 'jax' and self.score != 'scaled_dot':
      raise ValueError(
        "implementation='jax' (jax.nn.dot_product_attention) computes scaled "
        f"dot-product scores only; got score={self.score!r}. Use 'dense' or "
        "'chunked' for other scores."
      )

  @nn.compact
  def __call__(
    self,
    inputs_q: Array,
    inputs_kv: Array | None = None,
    mask: Array | None = None,
    *,
    causal: bool = False,
    deterministic: bool | None = None,
  ) -> Array:
    """Attends from `inputs_q` over `inputs_kv` (self-attention if None).

    Args:
      inputs_q: `[batch..., q_len, features]`.
      inputs_kv: `[batch..., k_len, kv_features]` or None.
      mask: bool, broadcastable to `[batch..., heads, q_len, k_len]`. Give
        a per-example mask a heads dim of 1 (`mask[:, None]`): a
        `[batch, q_len, k_len]` mask would broadcast against the heads.
      causal: add `masks.causal_mask(q_len, k_len)` (ignored when decoding,
        where the cache already hides the future).
      deterministic: disables dropout. Give it here or as the attribute,
        not both (`nn.merge_param` raises); needed only when
        `dropout_rate > 0`.

    Returns:
      `[batch..., q_len, out_features]`.
    """
    features = self.qkv_features or inputs_q.shape[-1]
    self._check_config(features)
    if self.decode and inputs_kv is not None:
      raise ValueError(
        'MultiHeadAttention(decode=True) caches self-attention keys and '
        'values; use decode=False for encoder-decoder attention.'
      )
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    head_depth = features // self.num_heads
    if self.dropout_rate > 0:
      deterministic = nn.merge_param(
        'deterministic', self.deterministic, deterministic
      )
    project = functools.partial(
      nn.DenseGeneral,
      features=(self.num_heads, head_depth),
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      dot_general=self.dot_general,
      kernel_init=nn.with_logical_partitioning(
        self.kernel_init, ('embed', 'heads', 'kv')
      ),
      bias_init=nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ('heads', 'kv')
      ),
    )
    # [batch..., length, heads, head_depth]
    query = project(name='query')(inputs_q)
    key = project(name='key')(inputs_kv)
    value = project(name='value')(inputs_kv)

    chunk_causal = False
    if self.decode:
      key, value, mask = self._update_cache(query, key, value, mask)
    elif causal and self.implementation == 'chunked':
      chunk_causal = True  # Built per chunk, never [q_len, k_len] whole.
    elif causal:
      causal_mask = masks.causal_mask(query.shape[-3], key.shape[-3])
      mask = masks.combine(mask, causal_mask)

    context = self._attend(
      query, key, value, mask, deterministic, causal=chunk_causal
    )
    return nn.DenseGeneral(
      features=self.out_features or inputs_q.shape[-1],
      axis=(-2, -1),
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      dot_general=self.dot_general,
      kernel_init=nn.with_logical_partitioning(
        self.kernel_init, ('heads', 'kv', 'embed')
      ),
      bias_init=nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ('embed',)
      ),
      name='out',
    )(context)

  def _update_cache(self, query, key, value, mask):
    """Writes this step's key/value into the cache; returns the cached ones
    and a mask hiding the positions not written yet."""
    initialised = self.has_variable('cache', 'cached_key')
    cached_key = self.variable(
      'cache', 'cached_key', jnp.zeros, key.shape, key.dtype
    )
    cached_value = self.variable(
      'cache', 'cached_value', jnp.zeros, value.shape, value.dtype
    )
    index = self.variable(
      'cache', 'cache_index', lambda: jnp.array(0, jnp.int32)
    )
    if not initialised:
      # The init call sees the full-length input; it only sizes the cache.
      causal_mask = masks.causal_mask(query.shape[-3], key.shape[-3])
      return key, value, masks.combine(mask, causal_mask)
    *batch, max_len, heads, depth = cached_key.value.shape
    if query.shape != (*batch, 1, heads, depth):
      raise ValueError(
        f'decoding expects one position per call, inputs of shape '
        f'[{", ".join(map(str, batch))}, 1, features]; got projected query '
        f'shape {query.shape}.'
      )
    position = index.value
    start = (0,) * len(batch) + (position, 0, 0)
    key = jax.lax.dynamic_update_slice(cached_key.value, key, start)
    value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
    cached_key.value, cached_value.value = key, value
    index.value = position + 1
    written = (jnp.arange(max_len) <= position)[None, :]  # [q_len=1, k_len]
    return key, value, masks.combine(mask, written)

  def _attend(self, query, key, value, mask, deterministic, causal=False):
    """Attention on `[batch..., length, heads, depth]` inputs; `causal`
    only for the chunked implementation (the others get it in `mask`)."""
    dropout = self.dropout_rate > 0 and not deterministic
    if self.implementation == 'jax':
      if dropout:
        raise ValueError(
          "implementation='jax' has no attention dropout; set dropout_rate=0 "
          "or use implementation='dense'."
        )
      if mask is None:
        return jax.nn.dot_product_attention(query, key, value)
      mask = jnp.broadcast_to(
        mask,
        (*query.shape[:-3], self.num_heads, query.shape[-3], key.shape[-3]),
      )
      context = jax.nn.dot_product_attention(query, key, value, mask=mask)
      # jax.nn gives a query with no allowed key the mean of the values; the
      # other paths (masked_softmax's all-zero row) a zero context.
      any_key = jnp.swapaxes(jnp.any(mask, axis=-1), -2, -1)  # [.., q, heads]
      return jnp.where(any_key[..., None], context, 0)

    # The pure functions take heads before length.
    q, k, v = (jnp.swapaxes(x, -3, -2) for x in (query, key, value))
    score_fn = make_score(
      self,
      self.score,
      q.shape[-1],
      k.shape[-1],
      hidden=self.score_hidden,
      max_len=self.max_len,
      num_heads=self.num_heads,
      param_dtype=self.param_dtype,
      dtype=self.dtype,
    )
    if self.implementation == 'chunked':
      if dropout:
        raise ValueError(
          "implementation='chunked' has no attention dropout; set "
          "dropout_rate=0 or use implementation='dense'."
        )
      context = attn_lib.chunked_attention(
        q, k, v, score_fn, mask, chunk_size=self.chunk_size, causal=causal
      )
    else:
      logits = score_fn(q, k)
      weights = masks.masked_softmax(logits, mask)
      self.sow('intermediates', 'attention_weights', weights)
      if dropout:
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
      context = attn_lib.weighted_sum(weights, v)
    return jnp.swapaxes(context, -3, -2)


class LocalAttention(ScoredAttention):
  """Luong's local attention: local-m (`predictive=False`) or local-p.

  Attributes:
    window: D, the half-width of the window [p_t - D, p_t + D] (Luong et
      al. use 10).
    predictive: local-p (predicted centers, Gaussian with sigma = D/2)
      instead of local-m (centers at the target positions).
    score: as in `ScoredAttention`; Luong et al. use 'general' for local
      attention.
    position_hidden: hidden width of the local-p position predictor.
  """

  score: str | ScoreFn = 'general'
  window: int = 10
  predictive: bool = False
  position_hidden: int | None = None

  @nn.compact
  def __call__(
    self,
    query: Array,
    keys: Array,
    values: Array | None = None,
    mask: Array | None = None,
    positions: Array | None = None,
  ) -> tuple[Array, Array]:
    """Args: as in `Attention`, plus `positions [..., q_len]`: the target
    position t of each query for local-m (default 0, 1, ..., q_len - 1).

    Returns:
      `(context, weights)`; local-p weights sum to less than 1 (the Gaussian
      is applied after the window softmax, as in the paper).
    """
    if self.window < 0:
      raise ValueError(
        f'LocalAttention: window must be >= 0; got {self.window}'
      )
    if self.predictive and positions is not None:
      raise ValueError(
        'LocalAttention(predictive=True) predicts its positions; passing '
        'positions= is for local-m (predictive=False).'
      )
    values = keys if values is None else values
    score_fn = self.score_fn(query.shape[-1], keys.shape[-1])
    k_len = keys.shape[-2]
    if self.predictive:
      hidden = self.position_hidden or query.shape[-1]
      w_p = _param(
        self,
        'w_p',
        _default_kernel_init,
        (query.shape[-1], hidden),
        ('embed', None),
        self.param_dtype,
      )
      v_p = _param(
        self,
        'v_p',
        nn.initializers.normal(hidden**-0.5),
        (hidden,),
        (None,),
        self.param_dtype,
      )
      # S: the number of keys the most permissive query row may see.
      lengths = (
        jnp.full(query.shape[:-2], k_len)
        if mask is None
        # A key-only `[k_len]` mask has no query dim to take the max over.
        else jnp.max(jnp.sum(jnp.atleast_2d(mask), axis=-1), axis=-1)
      )
      centers = attn_lib.predict_positions(query, w_p, v_p, lengths)
    elif positions is None:
      centers = jnp.arange(query.shape[-2])
    else:
      centers = positions
    context, weights = attn_lib.local_attention(
      query,
      keys,
      values,
      score_fn,
      centers,
      width=self.window,
      mask=mask,
      gaussian=self.predictive,
    )
    self.sow('intermediates', 'attention_weights', weights)
    return context, weights


class HardAttention(ScoredAttention):
  """Hard attention: one key per query.

  Training (not deterministic) samples with the straight-through
  Gumbel-softmax estimator, using the 'gumbel' rng stream; inference takes
  the argmax. See `attnjax.attention.hard_weights`.
  """

  temperature: float = 1.0
  deterministic: bool | None = None

  @nn.compact
  def __call__(
    self,
    query: Array,
    keys: Array,
    values: Array | None = None,
    mask: Array | None = None,
    *,
    deterministic: bool | None = None,
  ) -> tuple[Array, Array]:
    values = keys if values is None else values
    deterministic = nn.merge_param(
      'deterministic', self.deterministic, deterministic
    )
    score_fn = self.score_fn(query.shape[-1], keys.shape[-1])
    rng = None if deterministic else self.make_rng('gumbel')
    context, weights = attn_lib.hard_attention(
      query,
      keys,
      values,
      score_fn,
      mask,
      rng=rng,
      temperature=self.temperature,
    )
    self.sow('intermediates', 'attention_weights', weights)
    return context, weights


class MonotonicAttention(nn.Module):
  """Monotonic attention (Raffel et al. 2017).

  Energies are `score` (normalised additive by default) plus a learned scalar
  bias r; p_choose = sigmoid(energy + noise). Training (not deterministic)
  uses the expected alignment with Gaussian pre-sigmoid noise from the
  'noise' rng stream; inference uses hard monotonic decoding, or the expected
  alignment without noise if `hard_at_inference=False`.

  The queries are consecutive output steps. For step-by-step decoding call
  with one query and `init=` the previous step's weights.
  """

  score: str | ScoreFn = 'normed_additive'
  hidden: int | None = None
  noise_std: float = 1.0
  score_bias_init: float = -4.0
  hard_at_inference: bool = True
  mode: str = 'parallel'
  deterministic: bool | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    query: Array,
    keys: Array,
    values: Array | None = None,
    mask: Array | None = None,
    *,
    init: Array | None = None,
    deterministic: bool | None = None,
  ) -> tuple[Array, Array]:
    """Args: as in `Attention`, plus `init [..., k_len]`: the alignment
    before the first query (default: one-hot at key 0)."""
    values = keys if values is None else values
    deterministic = nn.merge_param(
      'deterministic', self.deterministic, deterministic
    )
    score_fn = make_score(
      self,
      self.score,
      query.shape[-1],
      keys.shape[-1],
      hidden=self.hidden,
      param_dtype=self.param_dtype,
    )
    bias = _param(
      self,
      'score_bias',
      nn.initializers.constant(self.score_bias_init),
      (),
      (),
      self.param_dtype,
    )
    rng = None if deterministic else self.make_rng('noise')
    context, weights = attn_lib.monotonic_attention(
      query,
      keys,
      values,
      lambda q, k: score_fn(q, k) + bias,
      mask,
      init=init,
      hard=deterministic and self.hard_at_inference,
      noise_std=self.noise_std,
      rng=rng,
      mode=self.mode,
    )
    self.sow('intermediates', 'attention_weights', weights)
    return context, weights


class LocationAwareAttention(nn.Module):
  """Location-aware attention (Chorowski et al. 2015).

  Scores v^T tanh(W s + V h + U (F * a_{t-1}) + b): the additive score plus
  convolutional features of the previous alignment. The queries are
  consecutive output steps; for step-by-step decoding call with one query
  and `init=` the previous step's weights.

  Attributes:
    hidden: H (default: the key depth).
    channels: number of location filters in F.
    kernel_size: odd width of F.
  """

  hidden: int | None = None
  channels: int = 32
  kernel_size: int = 31
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    query: Array,
    keys: Array,
    values: Array | None = None,
    mask: Array | None = None,
    *,
    init: Array | None = None,
  ) -> tuple[Array, Array]:
    """Args: as in `Attention`, plus `init [..., k_len]`: the alignment
    before the first query (default: uniform over the allowed keys)."""
    if self.kernel_size % 2 != 1:
      raise ValueError(
        f'LocationAwareAttention: kernel_size must be odd; got '
        f'{self.kernel_size}.'
      )
    values = keys if values is None else values
    hidden = self.hidden or keys.shape[-1]
    specs = _score_param_specs(
      'additive', query.shape[-1], keys.shape[-1], hidden, None, True
    )
    p = {
      name: _param(
        self,
        f'score_{name}',
        spec.init,
        spec.shape,
        spec.axes,
        self.param_dtype,
      )
      for name, spec in specs.items()
    }
    conv = _param(
      self,
      'score_conv',
      _default_kernel_init,
      (self.kernel_size, self.channels),
      (None, None),
      self.param_dtype,
    )
    w_f = _param(
      self,
      'score_w_f',
      _default_kernel_init,
      (self.channels, hidden),
      (None, 'score_hidden'),
      self.param_dtype,
    )

    def score_fn(q, k, prev):
      return scores.location_aware(
        q, k, prev, p['w_q'], p['w_k'], conv, w_f, p['v'], p['b']
      )

    context, weights = attn_lib.location_aware_attention(
      query, keys, values, score_fn, mask, init=init
    )
    self.sow('intermediates', 'attention_weights', weights)
    return context, weights
