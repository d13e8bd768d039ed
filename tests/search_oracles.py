"""What the searches must return, computed without them.

A model, as the oracles see it, has `rows`, `max_len`, `vocab`, a bool
`source_mask [rows, src_len]` (or None) and

  next_log_probs(row, prefix) -> [vocab] float64, the log-probs of the token
    after `prefix` (a tuple of tokens, BOS not included);
  next_attention(row, prefix) -> [src_len] or None, the attention of the step
    that gives them.

`enumerate_nbest` scores every sequence, `reference_nbest` runs a plain beam
search in numpy, and `TeacherForced` builds such a model from a real model's
teacher-forced pass (no cache, no search). `decode_model_and_beam` exposes
the beam search result behind `decoding.decode_model`'s tokens, to be checked
against them.
"""

import itertools
from unittest import mock

import numpy as np

from attnjax import decoding
from attnjax.data.vocab import BOS_ID, EOS_ID, PAD_ID

TINY = np.finfo(np.float32).tiny


def hypothesis(model, row, tokens, alpha=0.0, coverage_weight=0.0):
  """(score, log_prob, tokens, attention [len, src] or None) of a sequence,
  scored as GNMT does (Wu et al., 2016):

    log P / ((5 + len) / 6) ** alpha
      + coverage_weight * sum over real source positions of
        log(min(total attention, 1)), floored at float32's tiny.
  """
  log_prob = sum(
    model.next_log_probs(row, tokens[:t])[y] for t, y in enumerate(tokens)
  )
  score = log_prob / ((5 + len(tokens)) / 6) ** alpha
  attention = [
    model.next_attention(row, tokens[:t]) for t in range(len(tokens))
  ]
  attention = None if attention[0] is None else np.stack(attention)
  if coverage_weight:
    coverage = np.log(np.clip(attention.sum(0), TINY, 1.0))
    score += coverage_weight * coverage[model.source_mask[row]].sum()
  return score, log_prob, tuple(tokens), attention


def enumerate_nbest(model, row, n, **penalties):
  """The n best of ALL sequences: ended ones first, then truncated ones."""
  letters = range(EOS_ID + 1, model.vocab)
  ended = [
    (*body, EOS_ID)
    for length in range(model.max_len)
    for body in itertools.product(letters, repeat=length)
  ]
  truncated = list(itertools.product(letters, repeat=model.max_len))
  ranked = []
  for group in (ended, truncated):
    hyps = [hypothesis(model, row, seq, **penalties) for seq in group]
    ranked.append(
      sorted([h for h in hyps if h[0] > -np.inf], key=lambda h: -h[0])
    )
  return (ranked[0] + ranked[1])[:n]


def reference_nbest(model, row, beam, n, **penalties):
  """Plain beam search in numpy that always runs max_len steps; PAD and BOS
  are never emitted."""
  live, ended = [((), 0.0)], []
  for _ in range(model.max_len):
    candidates = [
      (log_prob + lp, k * model.vocab + y, (*tokens, y))
      for k, (tokens, log_prob) in enumerate(live)
      for y, lp in enumerate(model.next_log_probs(row, tokens))
      if np.isfinite(lp) and y not in (PAD_ID, BOS_ID)
    ]
    candidates.sort(key=lambda c: (-c[0], c[1]))
    ended += [c[2] for c in candidates[:beam] if c[2][-1] == EOS_ID]
    live = [(c[2], c[0]) for c in candidates if c[2][-1] != EOS_ID][:beam]

  def best(group):
    hyps = [hypothesis(model, row, seq, **penalties) for seq in group]
    return sorted(hyps, key=lambda h: -h[0])

  return (best(ended)[:n] + best([t for t, _ in live]))[:n]


def assert_matches(result, expected_per_row, max_len, rtol=1e-5, atol=1e-6):
  """`result` (a BeamResult) holds the expected hypotheses of every row;
  `atol` bounds the attention's error."""
  for row, expected in enumerate(expected_per_row):
    scores, log_probs, tokens, attention = zip(*expected, strict=True)
    np.testing.assert_array_equal(
      result.tokens[row],
      [t + (PAD_ID,) * (max_len - len(t)) for t in tokens],
      err_msg=f'row {row}',
    )
    np.testing.assert_array_equal(result.lengths[row], [len(t) for t in tokens])
    np.testing.assert_allclose(result.scores[row], scores, rtol=rtol)
    np.testing.assert_allclose(result.log_probs[row], log_probs, rtol=rtol)
    if result.attention is not None:
      padded = [np.pad(a, ((0, max_len - len(a)), (0, 0))) for a in attention]
      np.testing.assert_allclose(result.attention[row], padded, atol=atol)


class TeacherForced:
  """A sequence-to-sequence model seen through its teacher-forced pass.

  `forward(targets [rows, max_len]) -> (logits [rows, max_len, vocab],
  attention [rows, max_len, src_len] or None)` runs the model on fixed
  sources. The pass is causal, so the outputs at position len(prefix) of
  `prefix` followed by PAD are those after the prefix; each prefix costs one
  pass, for every row at once.
  """

  def __init__(self, forward, rows, max_len, vocab, source_mask=None):
    self.forward = forward
    self.rows, self.max_len, self.vocab = rows, max_len, vocab
    self.source_mask = None if source_mask is None else np.asarray(source_mask)
    self._passes = {}

  def _pass(self, prefix):
    if prefix not in self._passes:
      targets = np.full((self.rows, self.max_len), PAD_ID, np.int32)
      targets[:, : len(prefix)] = prefix
      logits, attention = self.forward(targets)
      logits = np.asarray(logits, np.float64)
      shifted = logits - logits.max(-1, keepdims=True)
      log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
      if attention is not None:
        attention = np.asarray(attention, np.float64)
      self._passes[prefix] = log_probs, attention
    return self._passes[prefix]

  def next_log_probs(self, row, prefix):
    return self._pass(tuple(prefix))[0][row, len(prefix)]

  def next_attention(self, row, prefix):
    attention = self._pass(tuple(prefix))[1]
    return None if attention is None else attention[row, len(prefix)]


def decode_model_and_beam(model, **kwargs):
  """`(variables, inputs) -> (tokens, BeamResult)`, to be jitted:
  `decoding.decode_model(model, variables, inputs, **kwargs)`'s tokens and
  the beam search result (one hypothesis per row) it took them from, with
  the scores and log-probs it does not return. The search is recorded as it
  is traced, so both come from one compiled program."""
  beam_search = decoding.beam_search

  def run(variables, inputs):
    results = []

    def recorded(*args, **search_kwargs):
      results.append(beam_search(*args, **search_kwargs))
      return results[-1]

    with mock.patch.object(decoding, 'beam_search', recorded):
      tokens = decoding.decode_model(model, variables, inputs, **kwargs)
    (result,) = results
    return tokens, result

  return run
