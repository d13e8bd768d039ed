"""The Transformer encoder-decoder (Vaswani et al. 2017).

Encoder: token embedding * sqrt(d_model) + positions, then layers of
multi-head self-attention (`attnjax.layers.MultiHeadAttention`) and a
position-wise feed-forward network. Decoder: the same with causal
self-attention and encoder-decoder attention in between. Every sublayer is
wrapped in a residual connection and layer norm: post-LN as in the paper,
`LN(x + sublayer(x))`, or pre-LN, `x + sublayer(LN(x))` with a final layer
norm on each stack. Any score function of `attnjax.scores` can replace scaled
dot-product attention (`TransformerConfig.score`).

The model has the interface of `attnjax.models.seq2seq.Seq2Seq`, so
`attnjax.decoding.decode_model` drives it unchanged:

  encoded = model.apply(variables, inputs, method='encode')
  state = model.apply(variables, encoded, inputs,
                      method='initial_decoder_state')
  logits, state = model.apply(variables, tokens, state, method='decode_step')

The decoder state holds a fixed-size (`max_len`) key/value cache of every
decoder layer's self-attention, the position of each row, and the
encoder-decoder attention's keys and values, projected once from the encoder
outputs. The decoder's attention is therefore split in two halves
(`DecoderAttention.keys_values` and `DecoderAttention.__call__`); its
parameters are laid out like `MultiHeadAttention`'s. Label smoothing and the
warmup + inverse-sqrt schedule live in the training code
(`attnjax.train_lib`, `attnjax.training.optim`).
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import attention as attn_lib
from attnjax import layers, masks, precision, scores
from attnjax.models import _config_checks as checks

Array = jax.Array
Dtype = Any
# A decoder state: a dict of arrays (or tuples of them, one per layer), each
# with the batch as leading dim.
State = dict[str, Any]

POSITIONS = ('sinusoidal', 'learned')
MATMUL_DTYPES = ('float32', 'bfloat16')
# Scores that depend on absolute key positions rather than on the keys; the
# cache would need their offsets, so they are not offered here.
_POSITIONAL_SCORES = ('location', 'location_aware')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of a Transformer encoder-decoder.

  Attributes:
    source_vocab_size: source vocabulary size, special ids included.
    target_vocab_size: target vocabulary size, special ids included.
    d_model: width of the embeddings and of every layer's output.
    num_heads: attention heads; must divide d_model.
    num_encoder_layers: layers of the encoder stack.
    num_decoder_layers: layers of the decoder stack.
    mlp_dim: hidden width of the position-wise feed-forward networks.
    dropout_rate: dropout on the embeddings and on every sublayer's output,
      when training.
    attention_dropout_rate: dropout on the attention weights, when training.
    mlp_dropout_rate: dropout on the feed-forward networks' hidden
      activations (after the ReLU), when training.
    max_len: longest source or target sequence (the positions and the
      decoding cache are this long).
    positions: 'sinusoidal' or 'learned' position embeddings.
    pre_ln: layer norm before each sublayer (and at the end of each stack)
      instead of after the residual sum as in the paper.
    share_embeddings: one embedding matrix for the source, the target and the
      output projection (needs equal vocabulary sizes).
    score: the attention score function, a name in `attnjax.scores.SCORES`.
    dtype: computation dtype (parameters stay float32; logits are float32).
    matmul_dtype: 'bfloat16' for mixed precision: the dense layers'
      products (projections, feed-forward, output) and those of their
      gradients round their operands to bfloat16 and accumulate and return
      float32 (`attnjax.precision.bfloat16_dot_general`); attention scores
      and weighted sums stay in `dtype`. 'float32' (the default) leaves the
      products to `dtype`.
    pad_id: padding token id.
    bos_id: beginning-of-sequence id, the decoder's first input.
    eos_id: end-of-sequence id.
  """

  source_vocab_size: int
  target_vocab_size: int
  d_model: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  mlp_dim: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  mlp_dropout_rate: float = 0.0
  max_len: int = 256
  positions: str = 'sinusoidal'
  pre_ln: bool = False
  share_embeddings: bool = False
  score: str = 'scaled_dot'
  dtype: Dtype = jnp.float32
  matmul_dtype: str = 'float32'
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2

  def __post_init__(self):
    checks.ints(
      self,
      (
        'source_vocab_size',
        'target_vocab_size',
        'd_model',
        'num_heads',
        'num_encoder_layers',
        'num_decoder_layers',
        'mlp_dim',
        'max_len',
      ),
      minimum=1,
    )
    checks.bools(self, ('pre_ln', 'share_embeddings'))
    checks.rates(
      self, ('dropout_rate', 'attention_dropout_rate', 'mlp_dropout_rate')
    )
    checks.special_ids(self)
    if self.d_model % self.num_heads:
      raise ValueError(
        f'TransformerConfig.d_model={self.d_model} must be divisible by '
        f'num_heads={self.num_heads} (each head gets d_model / num_heads '
        'features); change one of them.'
      )
    if self.positions not in POSITIONS:
      raise ValueError(
        f'TransformerConfig.positions must be one of {POSITIONS}; got '
        f'{self.positions!r}.'
      )
    if self.positions == 'sinusoidal' and self.d_model % 2:
      raise ValueError(
        f'TransformerConfig.d_model={self.d_model} must be even for '
        'sinusoidal positions (sine/cosine pairs); use an even d_model or '
        "positions='learned'."
      )
    if (
      self.share_embeddings and self.source_vocab_size != self.target_vocab_size
    ):
      raise ValueError(
        'TransformerConfig.share_embeddings needs one vocabulary, but '
        f'source_vocab_size={self.source_vocab_size} != target_vocab_size='
        f'{self.target_vocab_size}; use a joint vocabulary or set '
        'share_embeddings=False.'
      )
    if not isinstance(self.score, str):
      # scores.get's error would suggest passing a callable, which is what
      # happened: the decoder builds per-head weights from a name.
      raise ValueError(
        'TransformerConfig.score must be the name of a score in '
        f'attnjax.scores.SCORES, not {self.score!r}; use one of '
        f'{sorted(set(scores.SCORES) - set(_POSITIONAL_SCORES))}.'
      )
    if self.score in _POSITIONAL_SCORES:
      raise ValueError(
        f'TransformerConfig.score={self.score!r} scores absolute key '
        'positions, which the decoding cache does not support; use one of '
        f'{sorted(set(scores.SCORES) - set(_POSITIONAL_SCORES))}.'
      )
    scores.get(self.score)  # raises for unknown names, listing the known
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(
        f'TransformerConfig.matmul_dtype must be one of {MATMUL_DTYPES}; got '
        f'{self.matmul_dtype!r}.'
      )

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def dot_general(self) -> Callable[..., Array] | None:
    """The dense layers' `dot_general` (None: flax's default)."""
    if self.matmul_dtype == 'bfloat16':
      return precision.bfloat16_dot_general
    return None


def sinusoidal_positions(max_len: int, d_model: int) -> Array:
  """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...).

  Returns:
    float32 `[max_len, d_model]`.
  """
  position = jnp.arange(max_len, dtype=jnp.float32)[:, None]
  rates = jnp.exp(
    -math.log(10000.0) * jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model
  )
  angles = position * rates  # [max_len, d_model / 2]
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], -1).reshape(
    max_len, d_model
  )


def _kernel_init(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


def _bias_init(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _flat(layer, x: Array, axes: int = 1) -> Array:
  """`layer(x)` with the leading dims of `x` merged into one.

  The same values and parameters. XLA on CPU computes the kernel gradient of
  a 2-D input as one matrix product, but for `[batch, length, ...]` inputs it
  first transposes the output gradient (for the output projection a
  `[batch * length, vocab]` copy) and uses a slower product: merging the
  dims made the train step of `bench/seq2seq_throughput.py` ~14% faster.
  `axes` is the number of trailing input dims the layer contracts.
  """
  lead = x.shape[:-axes]
  y = layer(x.reshape(-1, *x.shape[x.ndim - axes :]))
  return y.reshape(*lead, *y.shape[1:])


def _layer_norm(config: TransformerConfig, **kwargs) -> nn.LayerNorm:
  return nn.LayerNorm(
    dtype=config.dtype,
    scale_init=nn.with_logical_partitioning(
      nn.initializers.ones_init(), ('embed',)
    ),
    bias_init=_bias_init(('embed',)),
    **kwargs,
  )


class FeedForward(nn.Module):
  """FFN(x) = drop(max(0, x W_1 + b_1)) W_2 + b_2, the dropout
  (`mlp_dropout_rate`) only when training."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    config = self.config
    dense = functools.partial(
      nn.Dense, dtype=config.dtype, dot_general=config.dot_general
    )
    wi = dense(
      config.mlp_dim,
      kernel_init=_kernel_init(('embed', 'mlp')),
      bias_init=_bias_init(('mlp',)),
      name='wi',
    )
    wo = dense(
      config.d_model,
      kernel_init=_kernel_init(('mlp', 'embed')),
      bias_init=_bias_init(('embed',)),
      name='wo',
    )
    dropout = nn.Dropout(config.mlp_dropout_rate, deterministic=not train)
    return _flat(wo, dropout(nn.relu(_flat(wi, x))))


class Sublayer(nn.Module):
  """Residual + layer norm around `fn`: post-LN `LN(x + drop(fn(x)))` or
  pre-LN `x + drop(fn(LN(x)))`."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, fn, *, train: bool) -> Array:
    norm = _layer_norm(self.config, name='norm')
    dropout = nn.Dropout(self.config.dropout_rate, deterministic=not train)
    if self.config.pre_ln:
      return x + dropout(fn(norm(x)))
    return norm(x + dropout(fn(x)))


class EncoderLayer(nn.Module):
  """Self-attention over the source, then the feed-forward network."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, train: bool) -> Array:
    """`x [batch, source_len, d_model]`, `mask` bool `[batch, 1, 1,
    source_len]` (True at real tokens)."""
    config = self.config
    attention = layers.MultiHeadAttention(
      num_heads=config.num_heads,
      score=config.score,
      dropout_rate=config.attention_dropout_rate,
      dtype=config.dtype,
      dot_general=config.dot_general,
      name='self_attention',
    )
    x = Sublayer(config, name='attention_block')(
      x,
      lambda h: attention(h, mask=mask, deterministic=not train),
      train=train,
    )
    mlp = FeedForward(config, name='mlp')
    return Sublayer(config, name='mlp_block')(
      x, lambda h: mlp(h, train=train), train=train
    )


class DecoderAttention(nn.Module):
  """Multi-head attention in two halves, for cached decoding.

  `keys_values` projects keys and values (once per source for
  encoder-decoder attention, once per new position for self-attention);
  `__call__` attends from new queries over given keys and values. The
  parameters (`query`, `key`, `value`, `out`, `score_*`) are laid out like
  `attnjax.layers.MultiHeadAttention`'s.
  """

  config: TransformerConfig

  def setup(self):
    config = self.config
    project = functools.partial(
      nn.DenseGeneral,
      features=(config.num_heads, config.head_dim),
      dtype=config.dtype,
      dot_general=config.dot_general,
      kernel_init=_kernel_init(('embed', 'heads', 'kv')),
      bias_init=_bias_init(('heads', 'kv')),
    )
    self.query = project()
    self.key = project()
    self.value = project()
    self.out = nn.DenseGeneral(
      features=config.d_model,
      axis=(-2, -1),
      dtype=config.dtype,
      dot_general=config.dot_general,
      kernel_init=_kernel_init(('heads', 'kv', 'embed')),
      bias_init=_bias_init(('embed',)),
    )
    self.score_fn = layers.make_score(
      self,
      config.score,
      config.head_dim,
      config.head_dim,
      num_heads=config.num_heads,
      dtype=config.dtype,
    )
    self.dropout = nn.Dropout(config.attention_dropout_rate)

  def keys_values(self, x: Array) -> tuple[Array, Array]:
    """`x [batch, length, d_model]` -> keys, values `[batch, length, heads,
    head_dim]`."""
    return _flat(self.key, x), _flat(self.value, x)

  def __call__(
    self,
    x: Array,
    keys: Array,
    values: Array,
    mask: Array,
    *,
    train: bool = False,
  ) -> tuple[Array, Array]:
    """Attends from `x [batch, q_len, d_model]` over `keys`, `values`
    `[batch, k_len, heads, head_dim]`; `mask` bool, broadcastable to
    `[batch, heads, q_len, k_len]`.

    Returns:
      `(outputs [batch, q_len, d_model], weights [batch, heads, q_len,
      k_len])`.
    """
    # The pure functions take heads before length.
    query = _flat(self.query, x)
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (query, keys, values))
    weights = masks.masked_softmax(self.score_fn(q, k), mask)
    self.sow('intermediates', 'attention_weights', weights)
    dropped = self.dropout(weights, deterministic=not train)
    context = attn_lib.weighted_sum(dropped, v)
    return _flat(self.out, jnp.swapaxes(context, 1, 2), axes=2), weights


class DecoderLayer(nn.Module):
  """Causal self-attention, encoder-decoder attention, feed-forward."""

  config: TransformerConfig

  def setup(self):
    config = self.config
    self.self_attention = DecoderAttention(config)
    self.cross_attention = DecoderAttention(config)
    self.mlp = FeedForward(config)
    self.self_block = Sublayer(config)
    self.cross_block = Sublayer(config)
    self.mlp_block = Sublayer(config)

  def __call__(
    self,
    x: Array,
    cross_keys: Array,
    cross_values: Array,
    source_mask: Array,
    *,
    cache: tuple[Array, Array, Array] | None = None,
    train: bool = False,
  ) -> tuple[Array, tuple[Array, Array] | None, Array]:
    """One decoder layer, over a whole target or one cached step.

    Args:
      x: `[batch, target_len, d_model]` (target_len = 1 with a cache).
      cross_keys, cross_values: the encoder outputs projected by
        `cross_attention.keys_values`, `[batch, source_len, heads,
        head_dim]`.
      source_mask: bool `[batch, source_len]`.
      cache: None for the full (causal) pass, else `(keys, values, index)`:
        this layer's self-attention cache `[batch, max_len, heads,
        head_dim]` and the position `[batch]` of the step.
      train: enables dropout.

    Returns:
      `(x, (keys, values) updated or None, cross-attention weights [batch,
      heads, target_len, source_len])`.
    """
    new_cache = None

    def self_attend(h):
      nonlocal new_cache
      keys, values = self.self_attention.keys_values(h)
      if cache is None:
        mask = masks.causal_mask(h.shape[1])
      else:
        keys, values, index = _write_cache(cache, keys, values)
        new_cache = (keys, values)
        mask = (jnp.arange(keys.shape[1]) <= index[:, None])[:, None, None]
      return self.self_attention(h, keys, values, mask, train=train)[0]

    x = self.self_block(x, self_attend, train=train)
    cross_weights = None

    def cross_attend(h):
      nonlocal cross_weights
      out, cross_weights = self.cross_attention(
        h, cross_keys, cross_values, source_mask[:, None, None], train=train
      )
      return out

    x = self.cross_block(x, cross_attend, train=train)
    x = self.mlp_block(x, lambda h: self.mlp(h, train=train), train=train)
    return x, new_cache, cross_weights


def _write_cache(cache, keys, values):
  """Writes one position's `keys`, `values [batch, 1, heads, head_dim]` at
  each row's index; returns the caches and the index."""
  cached_keys, cached_values, index = cache
  here = (jnp.arange(cached_keys.shape[1]) == index[:, None])[..., None, None]
  cached_keys = jnp.where(here, keys.astype(cached_keys.dtype), cached_keys)
  cached_values = jnp.where(
    here, values.astype(cached_values.dtype), cached_values
  )
  return cached_keys, cached_values, index


class Transformer(nn.Module):
  """The Transformer encoder-decoder; see the module docstring.

  `inputs` are source tokens; positions holding `pad_id` are padding unless
  `source_lengths` (int `[batch]`) are given, which then decide.
  """

  config: TransformerConfig

  def setup(self):
    config = self.config
    embed = functools.partial(
      nn.Embed,
      features=config.d_model,
      dtype=config.dtype,
      embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(stddev=config.d_model**-0.5),
        ('vocab', 'embed'),
      ),
    )
    self.target_embed = embed(config.target_vocab_size)
    if config.share_embeddings:
      self.source_embed = self.target_embed
    else:
      self.source_embed = embed(config.source_vocab_size)
      self.output_proj = nn.Dense(
        config.target_vocab_size,
        dtype=config.dtype,
        dot_general=config.dot_general,
        kernel_init=_kernel_init(('embed', 'vocab')),
        bias_init=_bias_init(('vocab',)),
      )
    if config.positions == 'learned':
      init = nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), (None, 'embed')
      )
      shape = (config.max_len, config.d_model)
      self.source_positions = self.param('source_positions', init, shape)
      self.target_positions = self.param('target_positions', init, shape)
    self.encoder_layers = [
      EncoderLayer(config) for _ in range(config.num_encoder_layers)
    ]
    self.decoder_layers = [
      DecoderLayer(config) for _ in range(config.num_decoder_layers)
    ]
    if config.pre_ln:
      self.encoder_norm = _layer_norm(config)
      self.decoder_norm = _layer_norm(config)
    self.dropout = nn.Dropout(config.dropout_rate)

  # Pieces shared by the full pass and the cached steps.

  def _positions(self, which: str) -> Array:
    """`[max_len, d_model]` position embeddings of 'source' or 'target'."""
    if self.config.positions == 'learned':
      return getattr(self, f'{which}_positions')
    return sinusoidal_positions(self.config.max_len, self.config.d_model)

  def _embed(self, embed, tokens, positions, *, train):
    x = embed(tokens) * jnp.sqrt(self.config.d_model).astype(self.config.dtype)
    x = x + positions.astype(x.dtype)
    return self.dropout(x, deterministic=not train)

  def _logits(self, x: Array) -> Array:
    if self.config.pre_ln:
      x = self.decoder_norm(x)
    if self.config.share_embeddings and self.config.dot_general:
      # x E^T by the mixed-precision product (nn.Embed.attend's is jnp.dot).
      table = precision.row_major_transpose(self.target_embed.embedding)
      logits = _flat(lambda h: precision.bfloat16_matmul(h, table), x)
    elif self.config.share_embeddings:
      logits = _flat(self.target_embed.attend, x)
    else:
      logits = _flat(self.output_proj, x)
    return logits.astype(jnp.float32)

  def _check_len(self, length: int, name: str) -> None:
    if length > self.config.max_len:
      raise ValueError(
        f'{name} length {length} exceeds TransformerConfig.max_len='
        f'{self.config.max_len}; truncate it or raise max_len.'
      )

  def source_mask(
    self, inputs: Array, source_lengths: Array | None = None
  ) -> Array:
    """bool `[batch, source_len]`, True at real source tokens."""
    if source_lengths is None:
      return inputs != self.config.pad_id
    return masks.length_mask(
      jnp.asarray(source_lengths, jnp.int32), inputs.shape[1]
    )

  # The interface of `attnjax.decoding.decode_model`.

  def __call__(
    self,
    inputs: Array,
    targets: Array,
    *,
    train: bool,
    source_lengths: Array | None = None,
  ) -> Array:
    """Teacher-forced logits.

    Args:
      inputs: int `[batch, source_len]`.
      targets: int `[batch, target_len]`, EOS-terminated and PAD-padded; the
        decoder inputs are BOS followed by `targets[:, :-1]`.
      train: enables dropout (needs the 'dropout' rng when a rate is > 0).
      source_lengths: optional int `[batch]`.

    Returns:
      float32 logits `[batch, target_len, target_vocab_size]`; position t
      predicts `targets[:, t]`.
    """
    chex.assert_rank([inputs, targets], 2)
    chex.assert_type([inputs, targets], int)
    chex.assert_equal_shape_prefix([inputs, targets], 1)
    encoded = self.encode(inputs, train=train, source_lengths=source_lengths)
    bos = jnp.full_like(targets[:, :1], self.config.bos_id)
    decoder_inputs = jnp.concatenate([bos, targets[:, :-1]], axis=1)
    return self.decode(
      encoded,
      decoder_inputs,
      self.source_mask(inputs, source_lengths),
      train=train,
    )

  def encode(
    self,
    inputs: Array,
    *,
    train: bool = False,
    source_lengths: Array | None = None,
  ) -> Array:
    """Encoder outputs `[batch, source_len, d_model]`."""
    chex.assert_rank(inputs, 2)
    chex.assert_type(inputs, int)
    self._check_len(inputs.shape[1], 'source')
    positions = self._positions('source')[: inputs.shape[1]]
    x = self._embed(self.source_embed, inputs, positions, train=train)
    mask = self.source_mask(inputs, source_lengths)[:, None, None]
    for layer in self.encoder_layers:
      x = layer(x, mask, train=train)
    if self.config.pre_ln:
      x = self.encoder_norm(x)
    return x

  def decode(
    self,
    encoded: Array,
    decoder_inputs: Array,
    source_mask: Array,
    *,
    train: bool = False,
  ) -> Array:
    """Logits `[batch, target_len, vocab]` of the whole (causal) target."""
    self._check_len(decoder_inputs.shape[1], 'target')
    positions = self._positions('target')[: decoder_inputs.shape[1]]
    x = self._embed(self.target_embed, decoder_inputs, positions, train=train)
    for layer in self.decoder_layers:
      keys, values = layer.cross_attention.keys_values(encoded)
      x, _, _ = layer(x, keys, values, source_mask, train=train)
    return self._logits(x)

  def initial_decoder_state(
    self,
    encoded: Array,
    inputs: Array,
    *,
    source_lengths: Array | None = None,
  ) -> State:
    """The state before the first step (whose input is BOS).

    Holds, per decoder layer, the cross-attention keys/values of the encoder
    outputs and an empty self-attention cache of `max_len` positions.
    """
    config = self.config
    batch, source_len = inputs.shape
    cache_shape = (batch, config.max_len, config.num_heads, config.head_dim)
    cross = [
      layer.cross_attention.keys_values(encoded)
      for layer in self.decoder_layers
    ]
    empty = tuple(
      jnp.zeros(cache_shape, config.dtype) for _ in self.decoder_layers
    )
    return {
      'cross_keys': tuple(k for k, _ in cross),
      'cross_values': tuple(v for _, v in cross),
      'source_mask': self.source_mask(inputs, source_lengths),
      'keys': empty,
      'values': empty,
      'index': jnp.zeros((batch,), jnp.int32),
      'cross_attention': jnp.zeros((batch, source_len), jnp.float32),
    }

  @property
  def max_decode_len(self) -> int:
    """The most steps `decode_step` can take: the cache's length."""
    return self.config.max_len

  def decode_step(self, tokens: Array, state: State) -> tuple[Array, State]:
    """`(logits [batch, target_vocab_size] float32, state)` after feeding the
    previous tokens `[batch]` (no dropout).

    At most `max_len` steps fit the cache; `decoding.decode_model` refuses
    a longer search (see `max_decode_len`). Called directly, a step past
    the cache is not caught (the index is traced) and gives wrong logits.
    """
    chex.assert_rank(tokens, 1)
    index = state['index']
    positions = self._positions('target')[index][:, None]
    x = self._embed(self.target_embed, tokens[:, None], positions, train=False)
    keys, values = [], []
    for i, layer in enumerate(self.decoder_layers):
      x, (k, v), weights = layer(
        x,
        state['cross_keys'][i],
        state['cross_values'][i],
        state['source_mask'],
        cache=(state['keys'][i], state['values'][i], index),
      )
      keys.append(k)
      values.append(v)
    state = {
      **state,
      'keys': tuple(keys),
      'values': tuple(values),
      'index': index + 1,
      # The last layer's weights, averaged over the heads.
      'cross_attention': weights[:, :, 0].mean(axis=1).astype(jnp.float32),
    }
    return self._logits(x)[:, 0], state

  @staticmethod
  def attention_weights(state: State) -> Array:
    """The last layer's cross-attention weights `[batch, source_len]` of the
    step that gave `state`, averaged over the heads."""
    return state['cross_attention']
