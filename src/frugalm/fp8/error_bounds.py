"""Worst-case error bounds of tile-scaled E4M3 quantization and of FP8 GEMMs built on it.

Tests and the error benchmark hold results to these instead of to hand-picked tolerances, so a bound
violation means the rounding, tiling or accumulation is wrong, not that a tolerance was unlucky.

Per element (see `frugalm.fp8.quantize`): ``|dq(q(x)) - x| <= u*|x| + t`` with ``u = 2^-4`` (3 mantissa
bits, round-to-nearest) and ``t = 2^-10 * scale`` (half the subnormal spacing of the element's tile),
plus ``2^-22*|x|`` for the two fp32 roundings around the cast.

Per GEMM entry, with ``a~ = a + da`` and ``b~ = b + db``:
``|sum a~ b~ - sum a b| <= sum |da||b| + |a||db| + |da||db|`` and FP32 summation of K terms adds at most
``K * 2^-24 * sum |a~||b~|``. The bound is attained only if every rounding errs maximally in the same
direction; on transformer-like inputs the largest elementwise error uses about a third of it
(``benchmarks/fp8_gemm_error.py`` prints the fraction).
"""

from __future__ import annotations

from torch import Tensor

from frugalm.fp8.quantize import ABS_ERR, REL_ERR, FP8Tensor, expand_scale

FP32_SLACK = 2.0 ** -22
FP32_EPS = 2.0 ** -24


def _abs_terms(x: Tensor, q: FP8Tensor) -> tuple[Tensor, Tensor]:
    """(``u*|x|`` and ``t``) per element, in float64."""
    xa = x.double().abs()
    scale = expand_scale(q.scale, q.tile, *q.shape[-2:])
    return (REL_ERR + FP32_SLACK) * xa, ABS_ERR * scale.double()


def quantization_error_bound(x: Tensor, q: FP8Tensor) -> Tensor:
    """Elementwise bound on ``|q.dequantize() - x|`` for ``q = quantize_tiles(x, ...)`` (float64)."""
    rel, absolute = _abs_terms(x, q)
    return rel + absolute


def gemm_error_bound(a: Tensor, a_q: FP8Tensor, b: Tensor, b_q: FP8Tensor) -> Tensor:
    """Elementwise bound on ``|gemm(a_q, b_q) - a @ b^T|`` for an FP32-accumulating FP8 GEMM (float64)."""
    da = quantization_error_bound(a, a_q)
    db = quantization_error_bound(b, b_q)
    aa, ba = a.double().abs(), b.double().abs()
    k = a.shape[-1]
    quant = da @ ba.t() + aa @ db.t() + da @ db.t()
    accum = k * FP32_EPS * (a_q.dequantize().double().abs() @ b_q.dequantize().double().abs().t())
    return quant + accum
