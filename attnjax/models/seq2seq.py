"""RNN encoder-decoders, without and with attention.

One encoder, several decoders behind one interface, chosen by
`Seq2SeqConfig.decoder`:

- `sutskever`: the encoder's final state initialises the decoder, which then
  sees only its previous token (Sutskever, Vinyals & Le 2014).
- `cho`: a context vector c = tanh(V h_N) summarises the source; it is fed to
  every decoder step (concatenated with the previous token's embedding) and to
  the maxout output layer, and s_0 = tanh(W c) (Cho et al. 2014).
- `bahdanau`: attends from the previous state s_{t-1} before the cell
  update; the cell and the maxout output layer see y_{t-1}, s_{t-1} and the
  context c_t; s_0 = tanh(W_s h<-_1), the backward encoder's state at the
  first token it reads, which has read the whole source (Bahdanau, Cho &
  Bengio 2015).
- `luong`: attends from the new state h_t after the cell; the attentional
  state h~_t = tanh(W_c [c_t; h_t]) gives the logits and is fed to the next
  step's cell (input feeding); s_0 is the encoder's final state (Luong, Pham &
  Manning 2015).

The attention decoders take any score function of `attnjax.scores` and any
alignment scheme (`Seq2SeqConfig.score`, `.alignment`; see
`attnjax.models.rnn_attention`). Their states hold the encoder outputs with
the key side of the score already projected, so the time loop only projects
the query.

A decoder is a `Decoder` subclass registered in `DECODERS`; see `Decoder` for
what a new one implements. The model drives every decoder the same way, so
greedy and beam search (`attnjax.decoding`) need nothing decoder-specific:

  encoded = model.apply(variables, inputs, method='encode')
  state = model.apply(variables, encoded, inputs,
                      method='initial_decoder_state')
  logits, state = model.apply(variables, tokens, state, method='decode_step')

Decoder states are pytrees whose leaves all have the batch as leading dim, so a
beam search can reorder or tile them with `jax.tree.map`.

Source lengths default to the number of non-PAD tokens per row (right-padded
inputs); pass `source_lengths` explicitly for anything else, and pass the same
lengths to `encode` and `initial_decoder_state`.

Logical axis names of the parameters (for `nn.logical_to_mesh_sharding`):

- `vocab`: the vocabulary dim of the embeddings and of the output projection;
- `embed`: the input (contracted) side of every kernel: embedding features,
  RNN inputs, hidden states fed to a cell or a dense layer;
- `mlp`: the output side of the RNN cells' kernels (one kernel per gate, each
  `[in, hidden]`), of the bridges and projections that produce hidden-sized
  vectors, and of their biases.

So embeddings are ('vocab', 'embed'), every cell and dense kernel is
('embed', 'mlp'), the output projection is ('embed', 'vocab') and biases take
the kernel's output name. `nn.OptimizedLSTMCell` and `nn.GRUCell` accept the
`nn.with_logical_partitioning` initialisers, so the cells' parameters carry
these names too.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.models import _config_checks as checks
from attnjax.models import rnn_attention

Array = jax.Array
Dtype = Any
# One layer's carry: (memory c, hidden h) for the LSTM, h for the GRU.
Carry = Any
# A decoder's state: a dict of arrays, each with the batch as leading dim.
State = dict[str, Any]

CELLS: dict[str, Callable[..., nn.RNNCellBase]] = {
  'lstm': nn.OptimizedLSTMCell,
  'gru': nn.GRUCell,
}


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
  """Hyperparameters of an RNN encoder-decoder.

  Attributes:
    source_vocab_size: source vocabulary size, special ids included.
    target_vocab_size: target vocabulary size, special ids included.
    embed_dim: width of the source and target token embeddings.
    hidden_dim: RNN hidden size of every layer (per direction in the encoder;
      a bidirectional encoder's outputs are `2 * hidden_dim` wide).
    num_layers: stacked RNN layers, in the encoder and in the decoder.
    cell: 'lstm' or 'gru' (see `CELLS`).
    bidirectional: a bidirectional encoder.
    reverse_source: the encoder reads each source backwards, last valid
      token first (Sutskever et al. 2014, section 3.3); its outputs are put
      back at their tokens' positions, so attention weights still follow
      the source order.
    decoder: a key of `DECODERS`: 'sutskever', 'cho' (no attention),
      'bahdanau', 'luong'.
    dropout_rate: dropout on embeddings, between stacked layers and on the
      encoder outputs and the decoder's output layer inputs, when training.
    max_target_len: the longest target, EOS included (what searches produce).
    dtype: computation dtype (parameters and RNN carries stay float32;
      logits are returned in float32).
    unroll: unroll factor of the time scans.
    pad_id: padding token id.
    bos_id: beginning-of-sequence id, the decoder's first input.
    eos_id: end-of-sequence id; greedy decoding pads after it.
    score: the attention decoders' score function, a name in
      `attnjax.scores.SCORES`; '' picks the decoder's default ('additive'
      for bahdanau, 'general' for luong, 'normed_additive' for monotonic
      and 'location_aware' for location-aware alignments). Luong's
      "concat" score, v^T tanh(W [h_t; h_s]), is 'additive' here; 'concat'
      is the linear w^T [q; k], whose query term is the same at every
      source position and cancels in a softmax, so under the 'soft',
      'hard' and 'local_m' alignments its weights ignore the decoder state.
    alignment: one of `rnn_attention.ALIGNMENTS`: 'soft', 'hard',
      'local_m', 'local_p', 'monotonic', 'location_aware'.
    attention_dim: H of the additive scores and of local-p's position
      predictor; 0 means `hidden_dim`.
    project_keys: map the encoder outputs to the decoder's width before
      scoring (lets 'dot' attend over a bidirectional encoder).
    max_source_len: most source positions the model attends over (the
      'location' score has one weight column each); 0 if unknown.
    local_window: D, the half-width of local attention's window.
    input_feeding: luong feeds h~_{t-1} to the cell with y_{t-1}.
    attention_noise: std of monotonic attention's pre-sigmoid noise.
    monotonic_bias: initial score bias r of monotonic attention.
    gumbel_temperature: temperature of hard attention's Gumbel-softmax.
    location_channels: filters of the location-aware convolution.
    location_kernel: odd width of the location-aware convolution.
  """

  source_vocab_size: int
  target_vocab_size: int
  embed_dim: int = 256
  hidden_dim: int = 512
  num_layers: int = 1
  cell: str = 'lstm'
  bidirectional: bool = False
  reverse_source: bool = False
  decoder: str = 'sutskever'
  dropout_rate: float = 0.0
  max_target_len: int = 64
  dtype: Dtype = jnp.float32
  unroll: int = 1
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  score: str = ''
  alignment: str = 'soft'
  attention_dim: int = 0
  project_keys: bool = False
  max_source_len: int = 0
  local_window: int = 4
  input_feeding: bool = True
  attention_noise: float = 1.0
  monotonic_bias: float = -2.0
  gumbel_temperature: float = 1.0
  location_channels: int = 8
  location_kernel: int = 7

  def __post_init__(self):
    checks.ints(
      self,
      (
        'source_vocab_size',
        'target_vocab_size',
        'embed_dim',
        'hidden_dim',
        'num_layers',
        'max_target_len',
        'unroll',
      ),
      minimum=1,
    )
    checks.ints(self, ('attention_dim', 'max_source_len'), minimum=0)
    checks.bools(
      self,
      ('bidirectional', 'reverse_source', 'project_keys', 'input_feeding'),
    )
    checks.rates(self, ('dropout_rate',))
    checks.special_ids(self)
    if self.cell not in CELLS:
      raise ValueError(
        f'Seq2SeqConfig.cell must be one of {sorted(CELLS)}; got {self.cell!r}.'
      )
    if self.decoder not in DECODERS:
      raise ValueError(
        f'Seq2SeqConfig.decoder must be one of {sorted(DECODERS)}; got '
        f'{self.decoder!r}.'
      )
    if self.decoder in ATTENTION_DECODERS:
      try:
        self.attention_spec().check()
      except ValueError as e:
        raise ValueError(
          f'Seq2SeqConfig (decoder {self.decoder!r}): {e}'
        ) from None
    elif (
      self.score
      or self.alignment != 'soft'
      or self.attention_dim
      or self.project_keys
    ):
      raise ValueError(
        f'decoder {self.decoder!r} has no attention, so score='
        f'{self.score!r}, alignment={self.alignment!r}, attention_dim='
        f'{self.attention_dim} and project_keys={self.project_keys} would be '
        'ignored. Use one of the attention decoders '
        f"({', '.join(ATTENTION_DECODERS)}) or leave score '', alignment "
        "'soft', attention_dim 0 and project_keys False."
      )
    if not self.input_feeding and self.decoder != 'luong':
      raise ValueError(
        f'input_feeding=False would be ignored: only the luong decoder feeds '
        f'its attentional state back, not {self.decoder!r}. Leave '
        'input_feeding=True, or use decoder luong.'
      )

  @property
  def encoder_dim(self) -> int:
    """Width of the encoder outputs."""
    return self.hidden_dim * (2 if self.bidirectional else 1)

  @property
  def attention_score(self) -> str:
    """`score`, or the default of the decoder and alignment."""
    if self.score:
      return self.score
    if self.alignment == 'monotonic':
      return 'normed_additive'  # Raffel et al.'s energy
    if self.alignment == 'location_aware':
      return 'location_aware'
    return _DEFAULT_SCORES.get(self.decoder, 'additive')

  def attention_spec(self) -> rnn_attention.AttentionSpec:
    """The attention decoders' `rnn_attention.AttentionSpec`."""
    return rnn_attention.AttentionSpec(
      score=self.attention_score,
      alignment=self.alignment,
      query_dim=self.hidden_dim,
      key_dim=self.encoder_dim,
      hidden=self.attention_dim or self.hidden_dim,
      max_source_len=self.max_source_len,
      window=self.local_window,
      project_keys=self.project_keys,
      noise_std=self.attention_noise,
      monotonic_bias=self.monotonic_bias,
      temperature=self.gumbel_temperature,
      location_channels=self.location_channels,
      location_kernel=self.location_kernel,
    )


# Parameter factories: one place for the logical axis names.


def _kernel_init(axes: tuple[str, ...], init=None):
  init = init or nn.initializers.lecun_normal()
  return nn.with_logical_partitioning(init, axes)


def _bias_init(axis: str):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis,))


def _dense(
  features: int, config: Seq2SeqConfig, out_axis: str = 'mlp', **kwargs
) -> nn.Dense:
  return nn.Dense(
    features,
    dtype=config.dtype,
    kernel_init=_kernel_init(('embed', out_axis)),
    bias_init=_bias_init(out_axis),
    **kwargs,
  )


def _embed(vocab_size: int, config: Seq2SeqConfig, **kwargs) -> nn.Embed:
  init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal', out_axis=0)
  return nn.Embed(
    vocab_size,
    config.embed_dim,
    dtype=config.dtype,
    embedding_init=_kernel_init(('vocab', 'embed'), init),
    **kwargs,
  )


def _cell(config: Seq2SeqConfig, **kwargs) -> nn.RNNCellBase:
  return CELLS[config.cell](
    features=config.hidden_dim,
    dtype=config.dtype,
    kernel_init=_kernel_init(('embed', 'mlp')),
    recurrent_kernel_init=_kernel_init(
      ('embed', 'mlp'), nn.initializers.orthogonal()
    ),
    bias_init=_bias_init('mlp'),
    **kwargs,
  )


# Carries: the LSTM's is a (c, h) pair, the GRU's a single array.


def carry_parts(config: Seq2SeqConfig, carry: Carry) -> tuple[Array, ...]:
  """The arrays of one layer's carry, each `[batch, hidden]`."""
  return tuple(carry) if config.cell == 'lstm' else (carry,)


def carry_from_parts(config: Seq2SeqConfig, parts: tuple[Array, ...]) -> Carry:
  """Inverse of `carry_parts`; carries are kept in float32 so that a scan's
  carry has one dtype whatever the computation dtype."""
  parts = tuple(p.astype(jnp.float32) for p in parts)
  return parts if config.cell == 'lstm' else parts[0]


def carry_hidden(config: Seq2SeqConfig, carry: Carry) -> Array:
  """The hidden state h (the layer's output) of one layer's carry."""
  return carry_parts(config, carry)[-1]


def source_lengths_from(inputs: Array, pad_id: int) -> Array:
  """Lengths of right-padded rows: the number of non-PAD tokens, `[batch]`."""
  return jnp.sum(inputs != pad_id, axis=-1, dtype=jnp.int32)


def reversed_order(lengths: Array, width: int) -> Array:
  """Indices that reverse each row's first `lengths` positions and leave
  the padding after them in place, int32 `[batch, width]`. The permutation
  is its own inverse."""
  positions = jnp.arange(width, dtype=jnp.int32)
  lengths = lengths[:, None].astype(jnp.int32)
  return jnp.where(positions < lengths, lengths - 1 - positions, positions)


# Encoder.


class Encoder(nn.Module):
  """Embedding + `num_layers` stacked (bi)RNN layers over variable lengths.

  Positions at or after a row's length never affect the outputs at valid
  positions nor the final state: the RNNs run with `seq_lengths` (the backward
  direction starts at each row's last valid token), the final carry is the
  one at the last valid position, and padded outputs are set to zero. A row
  of length 0 has zero outputs and a zero final state. With
  `reverse_source`, the valid tokens are read last to first.

  With `bidirectional`, each layer's final state combines the forward and
  the backward final carries into `hidden_dim`: every carry component (c and
  h for the LSTM, h for the GRU) becomes tanh(W [forward; backward] + b), with
  W learned per layer and component (`bridge_{layer}_{component}`).
  """

  config: Seq2SeqConfig

  @nn.compact
  def __call__(
    self, inputs: Array, source_lengths: Array, *, train: bool = False
  ) -> tuple[Array, tuple[Carry, ...]]:
    """Encodes the source.

    Args:
      inputs: int `[batch, source_len]` source tokens.
      source_lengths: int `[batch]` valid length of each row.
      train: enables dropout (needs the 'dropout' rng).

    Returns:
      `(outputs [batch, source_len, encoder_dim], final_state)`, the outputs
      zero at padded positions, `final_state` a tuple of `num_layers` carries
      of the decoder's hidden size (bottom layer first).
    """
    config = self.config
    chex.assert_rank(inputs, 2)
    chex.assert_type(inputs, int)
    chex.assert_shape(source_lengths, inputs.shape[:1])
    mask = masks.length_mask(source_lengths, inputs.shape[1])[..., None]
    dropout = nn.Dropout(config.dropout_rate, deterministic=not train)
    if config.reverse_source:
      order = reversed_order(source_lengths, inputs.shape[1])
      inputs = jnp.take_along_axis(inputs, order, axis=1)
    x = dropout(_embed(config.source_vocab_size, config, name='embed')(inputs))
    # nn.RNN picks the carry at index length - 1, i.e. the last one for
    # length 0; an empty source gets the zero initial state instead.
    nonempty = (source_lengths > 0)[:, None]
    final_state = []
    for layer in range(config.num_layers):
      rnn = functools.partial(nn.RNN, unroll=config.unroll, return_carry=True)
      if config.bidirectional:
        # parent=None: a submodule given to another is adopted by it (named
        # 'forward_rnn'/'backward_rnn', the cells 'cell') instead of being
        # registered here under an automatic name.
        carry, x = nn.Bidirectional(
          rnn(_cell(config, parent=None), parent=None),
          rnn(_cell(config, parent=None), parent=None),
          return_carry=True,
          name=f'layer_{layer}',
        )(x, seq_lengths=source_lengths)
        carry = self._bridge(carry, layer)
      else:
        carry, x = rnn(_cell(config, parent=None), name=f'layer_{layer}')(
          x, seq_lengths=source_lengths
        )
      final_state.append(
        jax.tree.map(lambda c: jnp.where(nonempty, c, 0), carry)
      )
      x = dropout(jnp.where(mask, x, 0).astype(config.dtype))
    if config.reverse_source:  # Back to the source's order.
      x = jnp.take_along_axis(x, order[..., None], axis=1)
    return x, tuple(final_state)

  def _bridge(self, carry: tuple[Carry, Carry], layer: int) -> Carry:
    """Forward and backward final carries -> one carry of `hidden_dim`."""
    config = self.config
    forward, backward = (carry_parts(config, c) for c in carry)
    parts = tuple(
      jnp.tanh(
        _dense(config.hidden_dim, config, name=f'bridge_{layer}_{i}')(
          jnp.concatenate([f, b], axis=-1)
        )
      )
      for i, (f, b) in enumerate(zip(forward, backward, strict=True))
    )
    return carry_from_parts(config, parts)


# Decoders.


class Decoder(nn.Module):
  """Base of the RNN decoders: stacked cells driven one token at a time.

  A decoder turns the encoder's result into a state, then maps (previous
  token, state) to (logits, new state). A subclass implements three hooks:

  - `initial_state(encoded, source_mask) -> state`: a dict of arrays with the
    batch as leading dim. Whatever a step needs from the source lives here
    (an attention decoder stores the encoder outputs and the mask).
  - `recur(x [batch, embed_dim], state, *, train) -> (features, state)`: one
    time step, everything sequential (cell updates, attention). `features`
    are the inputs of the output layer at this step.
  - `readout(features, *, train) -> logits`: the output layer, position-wise,
    so that it runs once over `[batch, target_len, ...]` in teacher forcing.

  `step` is readout(recur(embed(token))). `__call__` (teacher forcing) embeds
  all tokens at once, runs `recur` under `nn.scan` and applies `readout` to
  all positions, which computes what iterating `step` does.

  The base `setup` creates `embed` (target embeddings), `cells` (one per
  layer) and `dropout`; subclasses call `super().setup()` and add their own.
  """

  config: Seq2SeqConfig

  def setup(self):
    config = self.config
    self.embed = _embed(config.target_vocab_size, config)
    self.cells = [_cell(config) for _ in range(config.num_layers)]
    self.dropout = nn.Dropout(config.dropout_rate)

  def initial_state(
    self, encoded: tuple[Array, tuple[Carry, ...]], source_mask: Array
  ) -> State:
    """The state before the first step.

    Args:
      encoded: the encoder's `(outputs, final_state)`.
      source_mask: bool `[batch, source_len]`, True at real tokens.
    """
    raise NotImplementedError

  def recur(
    self, x: Array, state: State, *, train: bool = False
  ) -> tuple[Array, State]:
    """One time step from the previous token's embedding `[batch, embed]`.

    Returns:
      `(features [batch, ...], new state)`, `features` the output layer's
      inputs; the new state has the structure and dtypes of `state` (it is a
      scan carry).
    """
    raise NotImplementedError

  def readout(self, features: Array, *, train: bool = False) -> Array:
    """Output layer: `[..., features] -> [..., target_vocab_size]` logits."""
    raise NotImplementedError

  def embed_tokens(self, tokens: Array, *, train: bool = False) -> Array:
    """`[...]` token ids -> `[..., embed_dim]` embeddings (with dropout)."""
    return self.dropout(self.embed(tokens), deterministic=not train)

  def run_cells(
    self,
    x: Array,
    carries: tuple[Carry, ...],
    *,
    train: bool = False,
  ) -> tuple[Array, tuple[Carry, ...]]:
    """One step of the stacked cells, dropout between layers.

    Returns:
      `(top layer output [batch, hidden_dim], new carries)`.
    """
    new_carries = []
    for layer, (cell, carry) in enumerate(
      zip(self.cells, carries, strict=True)
    ):
      if layer:
        x = self.dropout(x, deterministic=not train)
      carry, x = cell(carry, x)
      new_carries.append(carry)
    return x, tuple(new_carries)

  def step(
    self, tokens: Array, state: State, *, train: bool = False
  ) -> tuple[Array, State]:
    """One decoding step.

    Args:
      tokens: int `[batch]`, the previous target tokens (BOS first).
      state: the decoder state.
      train: enables dropout.

    Returns:
      `(logits [batch, target_vocab_size] float32, new state)`.
    """
    chex.assert_rank(tokens, 1)
    features, state = self.recur(
      self.embed_tokens(tokens, train=train), state, train=train
    )
    return self.readout(features, train=train).astype(jnp.float32), state

  def __call__(
    self, tokens: Array, state: State, *, train: bool = False
  ) -> Array:
    """Teacher forcing: runs the decoder over all target positions.

    Args:
      tokens: int `[batch, target_len]` decoder inputs (BOS, then the gold
        targets shifted right).
      state: the initial decoder state.
      train: enables dropout.

    Returns:
      float32 logits `[batch, target_len, target_vocab_size]`.
    """
    chex.assert_rank(tokens, 2)

    def body(decoder, state, x):
      features, state = decoder.recur(x, state, train=train)
      return state, features

    scan = nn.scan(
      body,
      variable_broadcast='params',
      # Whatever a step sows (e.g. attention weights) stacks along time.
      variable_axes={'intermediates': 1},
      split_rngs={'params': False, 'dropout': True},
      in_axes=1,
      out_axes=1,
      unroll=self.config.unroll,
    )
    _, features = scan(self, state, self.embed_tokens(tokens, train=train))
    return self.readout(features, train=train).astype(jnp.float32)


class SutskeverDecoder(Decoder):
  """The encoder's final state is the decoder's initial state.

  The decoder sees only its previous token; logits are a dense layer on the
  top layer's output.
  """

  def setup(self):
    super().setup()
    self.output_proj = _dense(
      self.config.target_vocab_size, self.config, 'vocab'
    )

  def initial_state(self, encoded, source_mask):
    del source_mask  # the final state already ignores the padding
    _, final_state = encoded
    return {'carries': final_state}

  def recur(self, x, state, *, train=False):
    output, carries = self.run_cells(x, state['carries'], train=train)
    return output, {'carries': carries}

  def readout(self, features, *, train=False):
    features = self.dropout(features, deterministic=not train)
    return self.output_proj(features)


class _MaxoutDecoder(Decoder):
  """Shared parts of the Cho and Bahdanau decoders: every layer's initial
  carry projected from one summary vector, and the maxout output layer."""

  def setup(self):
    super().setup()
    config = self.config
    num_parts = 2 if config.cell == 'lstm' else 1
    self.init_projs = [
      [_dense(config.hidden_dim, config) for _ in range(num_parts)]
      for _ in range(config.num_layers)
    ]
    self.maxout_proj = _dense(2 * config.hidden_dim, config)
    self.output_proj = _dense(config.target_vocab_size, config, 'vocab')

  def carries_from(self, summary: Array) -> tuple[Carry, ...]:
    """Each layer's carry from `summary`: tanh(W summary) per component."""
    return tuple(
      carry_from_parts(
        self.config, tuple(jnp.tanh(proj(summary)) for proj in projs)
      )
      for projs in self.init_projs
    )

  def readout(self, features, *, train=False):
    """Deep output with maxout: logits = G maxout_2(O features), the maxout
    layer `hidden_dim` wide (Cho et al. 2014, Bahdanau et al. 2015)."""
    features = self.dropout(features, deterministic=not train)
    pre = self.maxout_proj(features)
    hidden = jnp.max(pre.reshape(*pre.shape[:-1], -1, 2), axis=-1)
    return self.output_proj(hidden)


class ChoDecoder(_MaxoutDecoder):
  """A fixed context vector c conditions every step and the output layer.

  c = tanh(V h_N), with h_N the top encoder layer's final hidden state (for a
  bidirectional encoder, its bridged forward/backward state); each
  decoder layer starts from tanh(W_l c) (every carry component, its own W);
  the bottom cell's input is [y_{t-1} embedding; c]; the output layer is
  Cho et al.'s deep output with maxout: m_t = maxout_2(O [s_t; y_{t-1}; c]),
  `hidden_dim` units, then logits = G m_t.
  """

  def setup(self):
    super().setup()
    self.context_proj = _dense(self.config.hidden_dim, self.config)

  def initial_state(self, encoded, source_mask):
    del source_mask  # the final state already ignores the padding
    _, final_state = encoded
    summary = carry_hidden(self.config, final_state[-1])
    context = jnp.tanh(self.context_proj(summary))
    return {'carries': self.carries_from(context), 'context': context}

  def recur(self, x, state, *, train=False):
    context = state['context']
    inputs = jnp.concatenate([x, context.astype(x.dtype)], axis=-1)
    output, carries = self.run_cells(inputs, state['carries'], train=train)
    features = jnp.concatenate(
      [output.astype(x.dtype), x, context.astype(x.dtype)], axis=-1
    )
    return features, {'carries': carries, 'context': context}


def _attention(config: Seq2SeqConfig) -> rnn_attention.DecoderAttention:
  return rnn_attention.DecoderAttention(
    config.attention_spec(), dtype=config.dtype
  )


class BahdanauDecoder(_MaxoutDecoder):
  """Attention from s_{t-1}, before the cell update (Bahdanau et al. 2015).

  At step t, with s_{t-1} the top layer's previous hidden state:

    c_t = sum_j a_tj h_j,  a_t = align(score(s_{t-1}, h))
    s_t = cell([E y_{t-1}; c_t], s_{t-1})         (the bottom layer)
    logits_t = G maxout_2(O [s_{t-1}; E y_{t-1}; c_t])

  as in seed 000's `AttentionDecoder`. With a bidirectional encoder every
  layer starts from tanh(W_s h<-_1), h<-_1 being the top encoder layer's
  backward state at the first token the encoder reads: the first source
  token, or the last valid one with `reverse_source` (the encoder then reads
  x_L .. x_1, its backward RNN x_1 .. x_L); either way the state that has
  read the whole source. Otherwise every layer starts from the encoder's
  final hidden state.
  """

  def setup(self):
    super().setup()
    self.attention = _attention(self.config)

  def initial_state(self, encoded, source_mask):
    config = self.config
    outputs, final_state = encoded
    if config.bidirectional:
      # h<-_1 of the sequence the encoder read; `outputs` are in source
      # order, so with reverse_source that is the last valid token.
      backward = outputs[..., config.hidden_dim :]
      if config.reverse_source:
        lengths = jnp.sum(source_mask, axis=-1, dtype=jnp.int32)
        first = jnp.maximum(lengths - 1, 0)
        summary = jnp.take_along_axis(backward, first[:, None, None], axis=1)[
          :, 0
        ]
      else:
        summary = backward[:, 0]
    else:
      summary = carry_hidden(config, final_state[-1])
    return {
      'carries': self.carries_from(summary.astype(jnp.float32)),
      'memory': self.attention.prepare(outputs, source_mask),
      'attention': self.attention.initial_state(source_mask),
    }

  def recur(self, x, state, *, train=False):
    carries = state['carries']
    previous = carry_hidden(self.config, carries[-1]).astype(x.dtype)
    context, _, attention = self.attention(
      previous, state['memory'], state['attention'], train=train
    )
    context = context.astype(x.dtype)
    inputs = jnp.concatenate([x, context], axis=-1)
    _, carries = self.run_cells(inputs, carries, train=train)
    features = jnp.concatenate([previous, x, context], axis=-1)
    state = {**state, 'carries': carries, 'attention': attention}
    return features, state


class LuongDecoder(Decoder):
  """Attention from h_t, after the cell update (Luong et al. 2015).

  At step t, with h_t the top layer's new hidden state:

    h_t = cell([E y_{t-1}; h~_{t-1}], h_{t-1})     (input feeding)
    c_t = sum_j a_tj h_j,  a_t = align(score(h_t, h))
    h~_t = tanh(W_c [c_t; h_t]),  logits_t = W_s h~_t

  h~_0 = 0; the decoder starts from the encoder's final state (bridged if
  bidirectional). Without `input_feeding` the cell sees E y_{t-1} alone.
  """

  def setup(self):
    super().setup()
    config = self.config
    self.attention = _attention(config)
    self.combine = _dense(config.hidden_dim, config, use_bias=False)
    self.output_proj = _dense(config.target_vocab_size, config, 'vocab')

  def initial_state(self, encoded, source_mask):
    outputs, final_state = encoded
    batch = outputs.shape[0]
    return {
      'carries': final_state,
      'memory': self.attention.prepare(outputs, source_mask),
      'attention': self.attention.initial_state(source_mask),
      'attentional': jnp.zeros((batch, self.config.hidden_dim), jnp.float32),
    }

  def recur(self, x, state, *, train=False):
    inputs = x
    if self.config.input_feeding:
      feed = state['attentional'].astype(x.dtype)
      inputs = jnp.concatenate([x, feed], axis=-1)
    output, carries = self.run_cells(inputs, state['carries'], train=train)
    output = output.astype(x.dtype)
    context, _, attention = self.attention(
      output, state['memory'], state['attention'], train=train
    )
    combined = jnp.concatenate([context.astype(x.dtype), output], axis=-1)
    attentional = jnp.tanh(self.combine(combined))
    state = {
      **state,
      'carries': carries,
      'attention': attention,
      'attentional': attentional.astype(jnp.float32),
    }
    return attentional, state

  def readout(self, features, *, train=False):
    features = self.dropout(features, deterministic=not train)
    return self.output_proj(features)


DECODERS: dict[str, type[Decoder]] = {
  'sutskever': SutskeverDecoder,
  'cho': ChoDecoder,
  'bahdanau': BahdanauDecoder,
  'luong': LuongDecoder,
}
# The decoders with attention, and their default score functions.
ATTENTION_DECODERS = ('bahdanau', 'luong')
_DEFAULT_SCORES = {'bahdanau': 'additive', 'luong': 'general'}


# The model.


class Seq2Seq(nn.Module):
  """RNN encoder-decoder; the decoder is `DECODERS[config.decoder]`.

  `inputs` are right-padded source tokens; `source_lengths` (int `[batch]`)
  default to the number of non-PAD tokens of each row.
  """

  config: Seq2SeqConfig

  def setup(self):
    self.encoder = Encoder(self.config, name='encoder')
    self.decoder = DECODERS[self.config.decoder](self.config, name='decoder')

  def _lengths(self, inputs: Array, source_lengths: Array | None) -> Array:
    if source_lengths is None:
      return source_lengths_from(inputs, self.config.pad_id)
    return jnp.asarray(source_lengths, jnp.int32)

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
      train: enables dropout and the stochastic alignments (needs the
        'dropout' rng when `dropout_rate > 0` or the alignment is 'hard' or
        'monotonic').
      source_lengths: optional int `[batch]`.

    Returns:
      float32 logits `[batch, target_len, target_vocab_size]`; position t
      predicts `targets[:, t]`.
    """
    chex.assert_rank([inputs, targets], 2)
    chex.assert_type([inputs, targets], int)
    chex.assert_equal_shape_prefix([inputs, targets], 1)
    encoded = self.encode(inputs, train=train, source_lengths=source_lengths)
    state = self.initial_decoder_state(
      encoded, inputs, source_lengths=source_lengths
    )
    bos = jnp.full_like(targets[:, :1], self.config.bos_id)
    decoder_inputs = jnp.concatenate([bos, targets[:, :-1]], axis=1)
    return self.decoder(decoder_inputs, state, train=train)

  def encode(
    self,
    inputs: Array,
    *,
    train: bool = False,
    source_lengths: Array | None = None,
  ) -> tuple[Array, tuple[Carry, ...]]:
    """`(outputs [batch, source_len, encoder_dim], final_state)`."""
    lengths = self._lengths(inputs, source_lengths)
    return self.encoder(inputs, lengths, train=train)

  def initial_decoder_state(
    self,
    encoded: tuple[Array, tuple[Carry, ...]],
    inputs: Array,
    *,
    source_lengths: Array | None = None,
  ) -> State:
    """The decoder state before the first step (whose input is BOS).

    Args:
      encoded: the result of `encode`.
      inputs: the source tokens given to `encode`, for the source mask.
      source_lengths: the lengths given to `encode`, if any.
    """
    lengths = self._lengths(inputs, source_lengths)
    source_mask = masks.length_mask(lengths, inputs.shape[1])
    return self.decoder.initial_state(encoded, source_mask)

  @staticmethod
  def attention_weights(state: State) -> Array | None:
    """The attention weights `[batch, source_len]` of the step that gave
    `state` (None for a decoder without attention)."""
    attention = state.get('attention')
    return None if attention is None else attention['alignment']

  def decode_step(self, tokens: Array, state: State) -> tuple[Array, State]:
    """`(logits [batch, target_vocab_size] float32, state)` after feeding the
    previous tokens `[batch]` (no dropout)."""
    return self.decoder.step(tokens, state)
