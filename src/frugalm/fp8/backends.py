"""Three interchangeable FP8 GEMMs with one numerics contract, and the run-time choice between them.

The contract: given E4M3 operands ``a [M, K]`` and ``b [N, K]`` whose scales run along K in tiles of the
same width (128), return ``sum_k dq(a)[m, k] * dq(b)[n, k]`` with FP32 accumulation, promoted to FP32
at least once per 128-wide K slice, cast to ``out_dtype`` only at the end. This is what DeepSeek's
kernels compute (H800 tensor cores keep ~14 bits, so they move partial sums to FP32 every 128 K).

* ``blockwise``: one ``torch.nn.functional.scaled_mm`` call with cuBLAS's 1x128 / 128x128 block
  scaling. Only CUDA SM 9.0 (H100/H200) with CUDA >= 12.9 has it.
* ``sliced``: K cut into 128-wide slices, each a real FP8 ``torch._scaled_mm`` with row-wise scales
  (the per-slice scale of every row), summed in FP32. Runs on CPU and on SM 9.0.
* ``emulated``: both operands dequantized to FP32 and multiplied in FP32; works everywhere.

The three differ only by FP32 summation order, so they agree to ~K * 2^-24 of ``|a| @ |b|^T``
(`agreement_bound`). The emulated result is also the definition every other path is tested against.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from frugalm.fp8.quantize import FP8_DTYPE, TILE, FP8Tensor

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "blockwise", "sliced", "emulated")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this device; the message says why."""


class GemmBackend(Protocol):
    """``gemm(a, b, out_dtype) -> a @ b^T``, for ``a [M, K]``, ``b [N, K]`` tiled along K alike."""

    name: str

    def gemm(self, a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype) -> Tensor: ...

    # Optional: ``grouped_gemm(a, b, bounds, out, transpose_b) -> out`` for stacked experts ``b [E, ...]``
    # (``out[s:t] = a[s:t] @ b[e]^T`` per expert's rows); without it `fp8.linear` calls `gemm` per expert.


def _check_operands(a: FP8Tensor, b: FP8Tensor) -> tuple[int, int, int]:
    if a.data.dim() != 2 or b.data.dim() != 2:
        raise ValueError(f"FP8 GEMM operands must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.data.dtype != FP8_DTYPE or b.data.dtype != FP8_DTYPE:
        raise ValueError(f"FP8 GEMM operands must be {FP8_DTYPE}, got {a.data.dtype} and {b.data.dtype}")
    (m, k), (n, k2) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if a.tile[1] != b.tile[1]:
        raise ValueError(f"operands are tiled differently along K: {a.tile} vs {b.tile}")
    return m, n, k


def _row_scales(t: FP8Tensor) -> Tensor:
    """``[rows, K-tiles]`` fp32: each row's scale in each K tile (a 128-row block repeats its scale)."""
    s = t.scale.float()
    if t.tile[0] > 1:
        s = s.repeat_interleave(t.tile[0], dim=0)[: t.shape[0]]
    return s


def _pad2d(x: Tensor, rows: int, cols: int) -> Tensor:
    """Zero-pad a (possibly float8) matrix to ``[rows, cols]``; zeros add nothing to a product."""
    if tuple(x.shape) == (rows, cols):
        return x
    out = x.new_zeros(rows, cols)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class EmulatedGemm:
    """Dequantize to FP32 and multiply in FP32: the reference the other backends must reproduce.

    Exact in the sense that matters: the FP8 rounding and the scales are real, only the multiply runs on
    FP32 units. (On a GPU with TF32 matmuls enabled this would lose precision; we leave that switch to
    the caller rather than flipping process-wide state here.)
    """

    name: str = "emulated"

    def gemm(self, a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype) -> Tensor:
        m, n, k = _check_operands(a, b)
        if min(m, n, k) == 0:
            return torch.zeros(m, n, dtype=out_dtype, device=a.data.device)
        return torch.matmul(a.dequantize(torch.float32), b.dequantize(torch.float32).t()).to(out_dtype)

    def grouped_gemm(self, a: FP8Tensor, b: FP8Tensor, bounds: list[tuple[int, int]], out: Tensor,
                     transpose_b: bool) -> Tensor:
        """Per-expert products with ``a`` and the stacked ``b`` dequantized once, not once per expert:
        dequantization is elementwise (each element times its own tile's scale), so the operands are the
        ones `gemm` multiplies expert by expert (products equal up to the FP32 kernel's summation order)."""
        a32, b32 = a.dequantize(torch.float32), b.dequantize(torch.float32)
        for e, (s, t) in enumerate(bounds):
            if t > s:
                out[s:t] = torch.mm(a32[s:t], b32[e] if transpose_b else b32[e].t())
        return out


@dataclass(frozen=True)
class SlicedGemm:
    """Real FP8 GEMMs per 128-wide K slice with row-wise scales, accumulated in FP32.

    Within one K slice every row of ``a`` and of ``b`` has a single scale, which is exactly the row-wise
    scaling ``torch._scaled_mm`` accepts (on CPU too), so the block-scaled product is a sum of row-scaled
    ones. Slices are zero-padded to a multiple of 16 (cuBLAS's alignment rule; free on CPU).
    """

    name: str = "sliced"

    def gemm(self, a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype) -> Tensor:
        m, n, k = _check_operands(a, b)
        device = a.data.device
        if min(m, n, k) == 0:
            return torch.zeros(m, n, dtype=out_dtype, device=device)
        width = a.tile[1]
        sa, sb = _row_scales(a), _row_scales(b)
        n_pad = _round_up(n, 16) if device.type == "cuda" else n
        acc = torch.zeros(m, n_pad, dtype=torch.float32, device=device)
        for kb in range(math.ceil(k / width)):
            k0, k1 = kb * width, min(k, (kb + 1) * width)
            kw = _round_up(k1 - k0, 16)
            a_sl = _pad2d(a.data[:, k0:k1], m, kw).contiguous()
            b_sl = _pad2d(b.data[:, k0:k1], n_pad, kw).contiguous()
            # 1-D contiguous first: a [rows, 1] slice counts as contiguous whatever its strides.
            scale_a = sa[:, kb].contiguous().view(m, 1)
            scale_b = _pad2d(sb[:, kb].contiguous().view(n, 1), n_pad, 1).view(1, n_pad)
            acc += torch._scaled_mm(a_sl, b_sl.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
        return acc[:, :n].to(out_dtype)


@dataclass(frozen=True)
class BlockwiseGemm:
    """One cuBLAS block-scaled FP8 GEMM (``F.scaled_mm`` with ``BlockWise1x128``/``BlockWise128x128``).

    cuBLAS wants K and 128x128-blocked dimensions in whole 128s, 1x128 scales stored outer-dimension-major
    and 128x128 scales padded to a multiple of 4 K-blocks; operands are zero-padded to fit, which changes
    no product. Only H100/H200-class GPUs (SM 9.0) with CUDA >= 12.9 accept these recipes.
    """

    name: str = "blockwise"

    def gemm(self, a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype) -> Tensor:
        m, n, k = _check_operands(a, b)
        if min(m, n, k) == 0:
            return torch.zeros(m, n, dtype=out_dtype, device=a.data.device)
        if a.tile != (1, TILE) or b.tile not in ((1, TILE), (TILE, TILE)):
            raise ValueError(f"block-wise FP8 GEMM supports 1x128 x (1x128 | 128x128) tiles, got {a.tile} x {b.tile}")
        kp = _round_up(k, TILE)
        kb = kp // TILE
        mp = _round_up(m, 16)
        a_data = _pad2d(a.data, mp, kp)
        a_scale = _pad2d(a.scale.float(), mp, kb)
        a_scale = a_scale.t().contiguous().t()  # [M, K/128] with strides (1, M)
        if b.tile == (1, TILE):
            np_ = _round_up(n, 16)
            b_data = _pad2d(b.data, np_, kp)
            b_scale = _pad2d(b.scale.float(), np_, kb).t().contiguous().t()
            recipe_b = F.ScalingType.BlockWise1x128
        else:
            np_ = _round_up(n, TILE)
            b_data = _pad2d(b.data, np_, kp)
            l4 = _round_up(kb, 4)
            b_scale = torch.ones(np_ // TILE, l4, dtype=torch.float32, device=b.scale.device)
            b_scale[: b.scale.shape[0], : b.scale.shape[1]] = b.scale
            b_scale = b_scale.t()  # [L4, N/128] with strides (1, L4)
            recipe_b = F.ScalingType.BlockWise128x128
        # cuBLAS accumulates in FP32 and rounds once on output, so asking it for BF16 directly is the same
        # as FP32-then-cast, without writing and re-reading an FP32 matrix (~25% of a 4096^3 GEMM's time).
        direct = out_dtype in (torch.float32, torch.bfloat16)
        out = F.scaled_mm(
            a_data.contiguous(), b_data.contiguous().t(),
            a_scale, F.ScalingType.BlockWise1x128, b_scale, recipe_b,
            output_dtype=out_dtype if direct else torch.float32,
        )
        out = out[:m, :n]
        return out if direct else out.to(out_dtype)


# ----------------------------------------------------------------------------- selection
def _has_sm90(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def _cuda_at_least(major: int, minor: int) -> bool:
    version = torch.version.cuda
    if not version:
        return False
    got = tuple(int(p) for p in version.split(".")[:2])
    return got >= (major, minor)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None if it can."""
    device = torch.device(device)
    if name == "emulated":
        return None
    if name == "sliced":
        if not hasattr(torch, "_scaled_mm"):
            return "this torch has no torch._scaled_mm"
        if device.type == "cpu":
            return None
        if _has_sm90(device):
            return None
        return f"row-wise FP8 GEMMs with FP32 output need CPU or a CUDA SM 9.0 GPU, not {device}"
    if name == "blockwise":
        if not hasattr(F, "scaled_mm") or not hasattr(getattr(F, "ScalingType", None), "BlockWise128x128"):
            return "this torch has no torch.nn.functional.scaled_mm with block-wise scaling"
        if not _has_sm90(device):
            return f"block-wise FP8 GEMMs need a CUDA SM 9.0 GPU (H100/H200), not {device}"
        if not _cuda_at_least(12, 9):
            return f"block-wise FP8 GEMMs need CUDA >= 12.9, this torch has CUDA {torch.version.cuda}"
        return None
    raise ValueError(f"unknown FP8 backend {name!r}; choose one of {list(BACKEND_NAMES)}")


_BACKENDS = {"blockwise": BlockwiseGemm, "sliced": SlicedGemm, "emulated": EmulatedGemm}


def select_backend(name: str, device: torch.device | str) -> GemmBackend:
    """The backend to run FP8 GEMMs on ``device``: ``name``, or the fastest one available for "auto".

    An explicitly named backend that cannot run is an error rather than a silent fallback, so a
    benchmark never reports one backend's numbers under another's name. The choice is logged.
    """
    device = torch.device(device)
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown FP8 backend {name!r}; choose one of {list(BACKEND_NAMES)}")
    if name == "auto":
        skipped = []
        for candidate in ("blockwise", "sliced", "emulated"):
            reason = unavailable_reason(candidate, device)
            if reason is None:
                log.debug("fp8 backend auto -> %s on %s%s", candidate, device,
                          f" (skipped: {'; '.join(skipped)})" if skipped else "")
                return _BACKENDS[candidate]()
            skipped.append(f"{candidate}: {reason}")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"FP8 backend {name!r} cannot run: {reason}")
    log.debug("fp8 backend %s on %s", name, device)
    return _BACKENDS[name]()


def resolve_backend(backend: "str | GemmBackend", device: torch.device | str) -> GemmBackend:
    """Accept a backend object as is, or select one by name for ``device``."""
    if isinstance(backend, str):
        return select_backend(backend, device)
    return backend


def agreement_bound(a: FP8Tensor, b: FP8Tensor) -> Tensor:
    """Elementwise bound on how far two backends' FP32 results may differ: 2 * K * 2^-24 * |a||b|^T.

    Each backend's FP32 sum of K products errs by at most ~K*2^-24 of the sum of absolute products
    (the classical gamma_K bound); two different summation orders differ by at most twice that.
    """
    k = a.shape[1]
    return (2 * k * 2.0 ** -24) * (a.dequantize().abs() @ b.dequantize().abs().t())
