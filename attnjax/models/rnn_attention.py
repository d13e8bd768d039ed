"""Attention of an RNN decoder over the encoder outputs, one step at a time.

`DecoderAttention` is the piece the attention decoders of
`attnjax.models.seq2seq` share: any registered score function under any
alignment scheme of `attnjax.attention`, evaluated for one decoder step:

- `soft`: softmax over the valid source positions (global attention);
- `hard`: one position; straight-through Gumbel-softmax when training,
  argmax otherwise (`attention.hard_weights`);
- `local_m`: softmax inside the window [p_t - D, p_t + D] around the target
  position p_t = t (clipped to the last source token);
- `local_p`: the same around a predicted p_t = S sigmoid(v_p^T tanh(W_p q)),
  times a Gaussian with sigma = D / 2 (weights sum to less than 1);
- `monotonic`: Raffel et al.'s expected alignment (with pre-sigmoid noise)
  when training, hard monotonic decoding otherwise;
- `location_aware`: softmax over scores that also see the previous step's
  alignment (Chorowski et al.; the `location_aware` score).

The work splits in two. `prepare(keys, mask)` runs once per source sequence
and computes everything that depends on the source alone, including the key
side of the score (k W_k of the additive family, k W^T of `general`): the
projections are hoisted out of the decoder's time loop. `__call__(query,
memory, state)` then runs at every step with the query and a small state
(the previous alignment and the step number).

Stochastic alignments (`hard`, `monotonic`) draw from the 'dropout' rng
stream when training, which the training loop already provides.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import attention as attn_lib
from attnjax import layers, masks, scores

Array = jax.Array
Dtype = Any
# Source-only tensors computed by `prepare`; a dict of arrays, batch first.
Memory = dict[str, Array]
# Per-step state: the previous alignment and the step number, batch first.
AttentionState = dict[str, Array]

ALIGNMENTS = (
  'soft',
  'hard',
  'local_m',
  'local_p',
  'monotonic',
  'location_aware',
)
# Scores that compare the query with the keys element-wise: equal widths.
SAME_WIDTH_SCORES = ('dot', 'scaled_dot', 'cosine')
# Scores whose key side is a linear map applied once per sequence.
_ADDITIVE = ('additive', 'normed_additive', 'location_aware')


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """What a decoder's attention computes; see `Seq2SeqConfig` for the fields.

  Attributes:
    score: a name in `attnjax.scores.SCORES`.
    alignment: one of `ALIGNMENTS`.
    query_dim: width of the decoder state that queries.
    key_dim: width of the encoder outputs.
    hidden: H of the additive family and of the local-p position predictor.
    max_source_len: most source positions (the `location` score's columns);
      0 if unknown.
    window: D of local attention.
    project_keys: map the encoder outputs to `query_dim` before scoring.
    noise_std: monotonic attention's pre-sigmoid noise when training.
    monotonic_bias: initial value of monotonic attention's score bias r.
    temperature: Gumbel-softmax temperature of hard attention.
    location_channels: filters of the location-aware convolution.
    location_kernel: odd width of the location-aware convolution.
  """

  score: str
  alignment: str
  query_dim: int
  key_dim: int
  hidden: int
  max_source_len: int = 0
  window: int = 4
  project_keys: bool = False
  noise_std: float = 1.0
  monotonic_bias: float = -2.0
  temperature: float = 1.0
  location_channels: int = 8
  location_kernel: int = 7

  def check(self) -> None:
    """Raises ValueError for a combination that cannot work."""
    scores.get(self.score)  # unknown names list the known ones
    if self.alignment not in ALIGNMENTS:
      raise ValueError(
        f'attention alignment must be one of {", ".join(ALIGNMENTS)}; got '
        f'{self.alignment!r}.'
      )
    if (self.alignment == 'location_aware') != (self.score == 'location_aware'):
      raise ValueError(
        'the location-aware alignment and the "location_aware" score go '
        f'together (got alignment={self.alignment!r}, '
        f'score={self.score!r}): set both, or neither.'
      )
    key_dim = self.query_dim if self.project_keys else self.key_dim
    if self.score in SAME_WIDTH_SCORES and key_dim != self.query_dim:
      raise ValueError(
        f'the {self.score!r} score compares the decoder state (width '
        f'{self.query_dim}) with the encoder outputs (width {key_dim}), '
        'which must be equally wide. Set project_keys=True (a learned map '
        'of the encoder outputs), make the encoder unidirectional, or use '
        'the "general" or "additive" score.'
      )
    if self.score == 'location' and self.max_source_len < 1:
      raise ValueError(
        'the "location" score needs max_source_len, the most source '
        'positions it can attend over (one weight column each); train.py '
        "sets it from the task's longest source."
      )
    if self.alignment in ('local_m', 'local_p'):
      least = 1 if self.alignment == 'local_p' else 0
      if not isinstance(self.window, int) or self.window < least:
        raise ValueError(
          f'{self.alignment} attention needs a window half-width D >= '
          f'{least}; got local_window={self.window!r}.'
        )
      if self.max_source_len and 2 * self.window + 1 > self.max_source_len:
        raise ValueError(
          f'local_window={self.window} spans 2D + 1 = {2 * self.window + 1} '
          f'source positions, more than the longest source '
          f'({self.max_source_len}): that is global attention. Use '
          f'local_window <= {(self.max_source_len - 1) // 2}, or '
          "alignment='soft'."
        )
    if self.alignment == 'location_aware':
      kernel, channels = self.location_kernel, self.location_channels
      if not isinstance(kernel, int) or kernel < 1 or kernel % 2 != 1:
        raise ValueError(
          f'location_kernel must be an odd integer >= 1; got {kernel!r}.'
        )
      if not isinstance(channels, int) or channels < 1:
        raise ValueError(
          f'location_channels must be an integer >= 1; got {channels!r}.'
        )
    if self.temperature <= 0:
      raise ValueError(
        f'the hard attention temperature must be > 0; got {self.temperature}.'
      )
    if self.noise_std < 0:
      raise ValueError(
        f'the monotonic attention noise must be >= 0; got {self.noise_std}.'
      )


def _kernel(axes):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


class DecoderAttention(nn.Module):
  """One decoder step's attention; see the module docstring.

  Call `prepare` once per source, `initial_state` once, then the module
  itself at every step. Weights are sown as
  `intermediates/attention_weights` (`[batch, source_len]` per step).
  """

  spec: AttentionSpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    spec = self.spec
    spec.check()
    key_dim = spec.key_dim
    if spec.project_keys:
      self.key_proj = nn.Dense(
        spec.query_dim,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=_kernel(('embed', 'mlp')),
      )
      key_dim = spec.query_dim
    # The location-aware score is the additive one plus location features.
    base = 'additive' if spec.score == 'location_aware' else spec.score
    self.score_params = layers.score_params(
      self,
      base,
      spec.query_dim,
      key_dim,
      hidden=spec.hidden,
      max_len=spec.max_source_len or None,
      param_dtype=self.param_dtype,
    )
    if spec.score == 'location_aware':
      self.conv = self.param(
        'score_conv',
        _kernel((None, None)),
        (spec.location_kernel, spec.location_channels),
        self.param_dtype,
      )
      self.w_f = self.param(
        'score_w_f',
        _kernel((None, 'score_hidden')),
        (spec.location_channels, spec.hidden),
        self.param_dtype,
      )
    if spec.alignment == 'monotonic':
      self.bias = self.param(
        'score_bias',
        nn.initializers.constant(spec.monotonic_bias),
        (),
        self.param_dtype,
      )
    if spec.alignment == 'local_p':
      self.w_p = self.param(
        'w_p',
        _kernel(('embed', 'score_hidden')),
        (spec.query_dim, spec.hidden),
        self.param_dtype,
      )
      self.v_p = self.param(
        'v_p',
        nn.with_logical_partitioning(
          nn.initializers.normal(spec.hidden**-0.5), ('score_hidden',)
        ),
        (spec.hidden,),
        self.param_dtype,
      )

  def prepare(self, keys: Array, mask: Array) -> Memory:
    """The source-only part of the attention, computed once per sequence.

    Args:
      keys: `[batch, source_len, key_dim]` encoder outputs (also the
        values).
      mask: bool `[batch, source_len]`, True at real tokens.

    Returns:
      A dict of arrays with the batch as leading dim, for `__call__`.
    """
    spec = self.spec
    source_len = keys.shape[1]
    if spec.score == 'location' and source_len > spec.max_source_len:
      raise ValueError(
        f'the "location" score was built for at most max_source_len='
        f'{spec.max_source_len} source positions but got {source_len}. '
        'Shorten the inputs, or train a model with a larger max_source_len.'
      )
    p = self.score_params
    projected = self.key_proj(keys) if spec.project_keys else keys
    if spec.score in _ADDITIVE:
      scored = projected @ p['w_k'].astype(projected.dtype)
    elif spec.score == 'general':
      scored = projected @ p['w'].T.astype(projected.dtype)
    elif spec.score == 'concat':
      w_k = p['w'][spec.query_dim :]
      scored = projected @ w_k.astype(projected.dtype)
    else:
      scored = projected
    return {'values': keys, 'keys': scored, 'mask': mask}

  def initial_state(self, mask: Array) -> AttentionState:
    """The state before the first step: the previous alignment (one-hot at
    the first position for monotonic attention, uniform over the source
    otherwise) and the step number 0."""
    if self.spec.alignment == 'monotonic':
      alignment = attn_lib.initial_alignment(mask.shape)
    else:
      alignment = attn_lib.uniform_alignment(mask)
    return {
      'alignment': alignment,
      'step': jnp.zeros(mask.shape[:1], jnp.int32),
    }

  def scores(self, query: Array, memory: Memory, previous: Array) -> Array:
    """Raw scores `[batch, source_len]` of the query `[batch, query_dim]`;
    equal to the registered score function on the unprojected keys."""
    spec = self.spec
    keys = memory['keys']
    # In the computation dtype, as flax casts a layer's parameters: float32
    # weights would promote 16-bit scores (and the additive family's
    # [batch, 1, source_len, hidden] activations) to float32.
    p = {name: w.astype(keys.dtype) for name, w in self.score_params.items()}
    q = query[:, None, :].astype(keys.dtype)
    if spec.score in _ADDITIVE:
      v = p['v']
      if spec.score == 'normed_additive':
        # Normalised in float32, then cast: a 16-bit ||v|| is coarse.
        raw_v, g = self.score_params['v'], self.score_params['g']
        v = g * raw_v * jax.lax.rsqrt(jnp.sum(raw_v * raw_v))
        v = v.astype(keys.dtype)
      if spec.score == 'location_aware':
        features = scores.location_features(previous[:, None, :], self.conv)
        keys = keys + (features[:, 0] @ self.w_f).astype(keys.dtype)
      out = scores.additive_from_projections(
        q @ p['w_q'].astype(q.dtype), keys, v, p.get('b')
      )
    elif spec.score == 'general':
      out = scores.dot(q, keys)
    elif spec.score == 'concat':
      w_q = p['w'][: spec.query_dim]
      out = (q @ w_q)[..., None] + keys[:, None, :]
    elif spec.score == 'location':
      out = scores.location(q, p['w'], keys.shape[1])
    else:
      out = scores.get(spec.score)(q, keys, **p)
    return out[:, 0]

  def __call__(
    self,
    query: Array,
    memory: Memory,
    state: AttentionState,
    *,
    train: bool = False,
  ) -> tuple[Array, Array, AttentionState]:
    """Attends from `query [batch, query_dim]`.

    Returns:
      `(context [batch, key_dim], weights [batch, source_len] float32, new
      state)`.
    """
    spec = self.spec
    mask = memory['mask']
    previous, step = state['alignment'], state['step']
    logits = self.scores(query, memory, previous).astype(jnp.float32)
    source_len = mask.shape[-1]
    if spec.alignment in ('soft', 'location_aware'):
      weights = masks.masked_softmax(logits, mask)
    elif spec.alignment == 'hard':
      rng = self.make_rng('dropout') if train else None
      weights = attn_lib.hard_weights(
        logits, mask, rng=rng, temperature=spec.temperature
      )
    elif spec.alignment in ('local_m', 'local_p'):
      last = jnp.sum(mask, axis=-1) - 1
      if spec.alignment == 'local_m':
        centers = jnp.clip(step, 0, jnp.maximum(last, 0))
      else:
        centers = attn_lib.predict_positions(
          query[:, None, :].astype(jnp.float32), self.w_p, self.v_p, last + 1
        )[:, 0]
      window = attn_lib.local_window_mask(
        centers[:, None], source_len, spec.window
      )[:, 0]
      weights = masks.masked_softmax(logits, mask & window)
      if spec.alignment == 'local_p':
        sigma = spec.window / 2
        gaussian = attn_lib.gaussian_window(centers[:, None], source_len, sigma)
        weights = weights * gaussian[:, 0]
    else:  # monotonic
      rng = self.make_rng('dropout') if train else None
      p_choose = attn_lib.choose_probabilities(
        logits + self.bias, noise_std=spec.noise_std, rng=rng
      )
      p_choose = jnp.where(mask, p_choose, 0.0)
      if train:
        weights = attn_lib.monotonic_alignment(p_choose, previous)
      else:
        weights = attn_lib.hard_monotonic_alignment(p_choose, previous, mask)
    values = memory['values']
    context = jnp.einsum('bs,bsd->bd', weights.astype(values.dtype), values)
    self.sow('intermediates', 'attention_weights', weights)
    return context, weights, {'alignment': weights, 'step': step + 1}
