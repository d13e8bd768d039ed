"""Mixed-precision matrix products: bfloat16 operands, float32 results.

`bfloat16_dot_general` is a drop-in `dot_general` for `flax.linen.Dense` and
`DenseGeneral` (their `dot_general` attribute). Parameters, activations and
the optimizer stay float32; only the operands of the layer's products
(forward, and both products of its gradient) are rounded to bfloat16, and
every product accumulates and returns float32. No loss scale is needed:
bfloat16 has float32's exponent range. `torch.autocast` and `jmp`'s
policies go further: their products also return bfloat16, and they round
the attention products too.

Where it pays: accelerators with bfloat16 units (TPU, recent GPUs), and CPUs
with AMX or AVX512-BF16, where XLA hands such products to YNNPACK. On the
development machine (`lscpu`: amx_bf16) a `[3072, 256] x [256, 512]` product
runs ~4x faster than in float32; `bench/seq2seq_throughput.py
--models=transformer,transformer_bfloat16` measures a whole train step.

The dense products have a custom VJP, so they support reverse-mode
differentiation only (`jax.grad`, `jax.vjp`), not `jax.jvp` or `jacfwd`.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
DTypeLike = jax.typing.DTypeLike

_BF16 = jnp.bfloat16
_F32 = jnp.float32


def row_major_transpose(a: Array) -> Array:
  """`a.T` of a 2-D array, written so that XLA keeps it a real transpose.

  XLA's CPU compiler decides which bfloat16 products YNNPACK takes (the rest
  are recomputed in float32) before it assigns layouts, and only takes a
  product whose left operand contracts its last dim in a row-major layout.
  A plain `a.T` reaches that check as a column-major view of `a` and the
  product is recomputed in float32, ~4x slower. Transposing a 3-D view and
  merging two dims gives the same values in a row-major array.
  """
  rows, cols = a.shape
  # Any factor of the rows will do; a prime row count (no 3-D view) keeps
  # the plain transpose, and its product runs in float32.
  factor = next((f for f in range(2, math.isqrt(rows) + 1) if rows % f == 0), 0)
  if not factor:
    return a.T
  split = a.reshape(rows // factor, factor, cols)
  return split.transpose(2, 0, 1).reshape(cols, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x: Array, w: Array, x_dtype, w_dtype) -> Array:
  """`x [n, k] @ w [k, m]`; the dtypes (static) are those of the gradients."""
  del x_dtype, w_dtype
  return lax.dot(x.astype(_BF16), w.astype(_BF16), preferred_element_type=_F32)


def _matmul_fwd(x: Array, w: Array, x_dtype, w_dtype):
  del x_dtype, w_dtype
  xb, wb = x.astype(_BF16), w.astype(_BF16)
  return lax.dot(xb, wb, preferred_element_type=_F32), (xb, wb)


def _matmul_bwd(x_dtype, w_dtype, residuals, dy: Array):
  xb, wb = residuals
  dyb = dy.astype(_BF16)
  # dx = dy w^T: contracting the last dims of both is a supported layout.
  dx = lax.dot_general(
    dyb, wb, (((1,), (1,)), ((), ())), preferred_element_type=_F32
  )
  # dw = x^T dy, with x^T materialised row-major (see `row_major_transpose`).
  dw = lax.dot(row_major_transpose(xb), dyb, preferred_element_type=_F32)
  return dx.astype(x_dtype), dw.astype(w_dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def bfloat16_matmul(x: Array, w: Array) -> Array:
  """`x @ w` for `x [n, k]`, `w [k, m]` from bfloat16 operands, accumulated
  and returned in float32 (its gradients too, from bfloat16 operands)."""
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(
      f'bfloat16_matmul takes x [n, k] and w [k, m]; got {x.shape} and '
      f'{w.shape}.'
    )
  return _matmul(x, w, x.dtype, w.dtype)


def bfloat16_dot_general(
  lhs: Array,
  rhs: Array,
  dimension_numbers: tuple[
    tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]
  ],
  precision: lax.PrecisionLike = None,
  preferred_element_type: DTypeLike | None = None,
) -> Array:
  """`lax.dot_general` with bfloat16 operands and float32 accumulation.

  The result has `preferred_element_type`, else the operands' common dtype
  (float32 for float32 layers). The products of dense layers (the trailing
  dims of `lhs` against the same-sized leading dims of `rhs`, no batch dims)
  go through one 2-D `[n, k] x [k, m]` product with a hand-written gradient
  whose two products also take bfloat16 operands, and which XLA on CPU runs
  in bfloat16. Other dimension numbers use `lax.dot_general` on bfloat16
  operands and JAX's own gradient, which multiplies the float32 incoming
  gradient by the other bfloat16 operand and rounds the result to
  bfloat16. `precision` is ignored: the operands' precision is the point.
  """
  del precision
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  n_contract = len(lhs_contract)
  contracted = lhs.shape[lhs.ndim - n_contract :]
  dense = (
    not lhs_batch
    and not rhs_batch
    and 0 < n_contract <= min(lhs.ndim, rhs.ndim)
    and lhs_contract == tuple(range(lhs.ndim - n_contract, lhs.ndim))
    and rhs_contract == tuple(range(n_contract))
    and contracted == rhs.shape[:n_contract]
    and lhs.size > 0
    and rhs.size > 0
  )
  if not dense:
    out = lax.dot_general(
      lhs.astype(_BF16),
      rhs.astype(_BF16),
      dimension_numbers,
      preferred_element_type=_F32,
    )
    return out.astype(out_dtype)
  lead = lhs.shape[: lhs.ndim - n_contract]
  depth = math.prod(contracted)
  out = _matmul(
    lhs.reshape(-1, depth), rhs.reshape(depth, -1), lhs.dtype, rhs.dtype
  )
  return out.reshape(*lead, *rhs.shape[n_contract:]).astype(out_dtype)
