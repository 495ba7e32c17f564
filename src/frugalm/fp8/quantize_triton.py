"""`quantize_tiles` as one Triton kernel: each program reads a block of the input once and writes its E4M3
codes and tile scales, instead of the ~8 eager passes (upcast, pad, abs, max, divide, clamp, cast) that
cost more than the FP8 GEMM they feed on an H100 (BENCHMARKS.md, "GPU figures (one H100)").

Same arithmetic as the eager path, element for element: max-abs per tile, ``scale = amax / 448`` (1 for an
all-zero tile, at least the smallest normal float, optionally rounded up to a power of two by bit
arithmetic), ``clamp(x / scale, +-448)`` with a correctly rounded division, rounded to E4M3 (nearest,
ties to even) in fp32 arithmetic and encoded by integer arithmetic; a non-finite input poisons its tile.
The three recipe tilings map to blocks of whole tiles: 1x128 -> 32 rows x 128 columns, 128x1 -> 128 rows
x 64 columns, 128x128 -> one tile. Edge tiles are masked loads (zeros do not change a max-abs). Leading
dimensions are separate matrices.

Import only where Triton is installed (`frugalm.fp8.quantize` checks that, and which tiles fit); runs on
CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests check it
without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_FP8_MAX = tl.constexpr(448.0)
_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)  # a NaN anywhere makes the tile's amax NaN


@triton.jit
def _tile_scale(amax, POW2: tl.constexpr):
    scale = amax / _FP8_MAX  # same fp32 division as the eager path
    scale = tl.where(amax == 0.0, 1.0, tl.maximum(scale, _TINY))
    scale = tl.where(amax != amax, amax, scale)  # NaN amax stays NaN
    if POW2:
        bits = scale.to(tl.int32, bitcast=True)
        exponent = bits & 0x7F800000
        up = tl.where((bits & 0x007FFFFF) != 0, exponent + 0x00800000, exponent)  # round up to 2^k
        pow2 = up.to(tl.float32, bitcast=True)
        finite = (bits & 0x7F800000) != 0x7F800000
        scale = tl.where(finite, pow2, scale)
    return scale


@triton.jit
def _round_to_e4m3(y):
    """Round fp32 to the nearest E4M3 value (ties to even) in fp32 arithmetic, so the final cast only has to
    convert exact values: the fp32 adder rounds ``|y| + 2^(e+20)`` at E4M3's spacing 2^(e-3) for the binade
    e of |y| (2^-9 below 2^-6, the subnormals); the sign is put back bit-exactly (-0 stays -0)."""
    bits = y.to(tl.int32, bitcast=True)
    ay = tl.abs(y)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    c = ((e + 20 + 127) << 23).to(tl.float32, bitcast=True)
    r = (ay + c) - c
    return tl.where(bits < 0, -r, r)


@triton.jit
def _e4m3_code(r, sign_bits):
    """The E4M3 (fn) byte of an exactly representable fp32 value ``r``, by integer arithmetic (no converter:
    Triton's CPU interpreter gets carries, -0 and NaN wrong): sign | exponent+7 << 3 | 3 mantissa bits for
    normals, ``|r| / 2^-9`` for subnormals, 0x7F for NaN (positive, as CUDA's and the CPU's division give)."""
    rb = r.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    exp = (rb >> 23) - 127
    normal = ((exp + 7) << 3) | ((rb >> 20) & 0x7)
    sub = (tl.abs(r) * 512.0).to(tl.int32)
    code = tl.where(exp >= -6, normal, sub) | ((sign_bits >> 24) & 0x80)
    return tl.where(r != r, 0x7F, code).to(tl.uint8)


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, s_ptr,
    rows, cols,
    sx_b, sx_r, sx_c,  # input strides (any layout)
    sq_b,  # output codes: contiguous [B, rows, cols]
    ss_b, ss_r,  # scales: contiguous [B, ceil(rows/TR), ceil(cols/TC)]
    TR: tl.constexpr, TC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, POW2: tl.constexpr,
):
    pid_r, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = pid_r * BR + tl.arange(0, BR)
    c = pid_c * BC + tl.arange(0, BC)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    x = tl.load(x_ptr + b * sx_b + r[:, None] * sx_r + c[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    if TR == 1:  # 1 x TC tiles: one per row of the block (BC == TC)
        amax = tl.reduce(ax, 1, _nan_max)
        scale = _tile_scale(amax, POW2)
        y = tl.math.div_rn(x, scale[:, None])
        tl.store(s_ptr + b * ss_b + r * ss_r + pid_c, scale, mask=r < rows)
    elif TC == 1:  # TR x 1 tiles: one per column of the block (BR == TR)
        amax = tl.reduce(ax, 0, _nan_max)
        scale = _tile_scale(amax, POW2)
        y = tl.math.div_rn(x, scale[None, :])
        tl.store(s_ptr + b * ss_b + pid_r * ss_r + c, scale, mask=c < cols)
    else:  # one TR x TC tile (BR == TR, BC == TC)
        amax = tl.reduce(tl.reduce(ax, 1, _nan_max), 0, _nan_max)
        scale = _tile_scale(amax, POW2)
        y = tl.math.div_rn(x, scale)
        tl.store(s_ptr + b * ss_b + pid_r * ss_r + pid_c, scale)
    y = tl.clamp(y, -_FP8_MAX, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    code = _e4m3_code(_round_to_e4m3(y), y.to(tl.int32, bitcast=True))
    tl.store(q_ptr + b * sq_b + r[:, None] * cols + c[None, :], code, mask=mask)


def _block(tile: tuple[int, int]) -> tuple[int, int]:
    tr, tc = tile
    if tr == 1:
        return 32, tc
    if tc == 1:
        return tr, 64
    return tr, tc


def quantize_tiles_triton(x: Tensor, tile: tuple[int, int], power_of_two: bool) -> tuple[Tensor, Tensor]:
    """``(codes, scales)`` of `frugalm.fp8.quantize.quantize_tiles` for ``x`` with two or more dimensions."""
    tr, tc = tile
    *lead, rows, cols = x.shape
    batch = 1
    for d in lead:
        batch *= d
    x3 = x.reshape(batch, rows, cols)  # a view when it can be: strides go to the kernel
    q = torch.empty(batch, rows, cols, dtype=torch.uint8, device=x.device)
    srows, scols = triton.cdiv(rows, tr), triton.cdiv(cols, tc)
    s = torch.empty(batch, srows, scols, dtype=torch.float32, device=x.device)
    if x3.numel():
        br, bc = _block(tile)
        grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc), batch)
        _quantize_kernel[grid](
            x3, q, s, rows, cols, x3.stride(0), x3.stride(1), x3.stride(2), rows * cols, srows * scols, scols,
            TR=tr, TC=tc, BR=br, BC=bc, POW2=power_of_two,
        )
    return q.view(torch.float8_e4m3fn).reshape(*lead, rows, cols), s.reshape(*lead, srows, scols)
