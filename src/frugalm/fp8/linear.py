"""FP8 linear layers whose three GEMMs (Fprop, Dgrad, Wgrad) all take E4M3 inputs, as in DeepSeek-V3.

For ``y = x W^T`` with ``x [M, K]`` (M tokens) and ``W [N, K]``:

* Fprop ``y = x W^T``: x in 1x128 tiles, W in 128x128 blocks (both scaled along K).
* Dgrad ``dx = dy W``: dy in 1x128 tiles along N; W's 128x128 blocks are square, so the FP8 weight
  made for Fprop is reused transposed and both passes see the identical quantized weight.
* Wgrad ``dW = dy^T x``: contracts over tokens, so dy and x are quantized in 128x1 tiles (128 tokens,
  one channel) -- the recipe's re-tiling.

Every GEMM accumulates in FP32 (see `frugalm.fp8.backends`); outputs are in the input's dtype -- or, under
``torch.autocast``, in the autocast dtype (BF16 outputs, as in the recipe) -- input gradients in the input's
dtype and weight gradients in the weight's dtype (FP32 master weights give FP32 gradients to accumulate).
Autocast is switched off inside the Functions: every operand's dtype is chosen here, and letting autocast
recast them (``torch.cat`` of float8 tensors fails under it; the emulated GEMM's FP32 matmul would silently
become a BF16 one) would break the numerics contract.

What is saved for backward is FP8 only: x in the 128x1 Wgrad tiling (quantized straight from the
high-precision input, so it is not rounded twice) and the FP8 weight, each with its fp32 tile scales,
about 1.03 bytes per element instead of 2 (BF16) or 4 (FP32). A tensor that no gradient needs is not
saved at all. (With ``gemms`` -- `FP8Config.gemms`, an ablation knob -- a GEMM left out of FP8 runs in the
output dtype as `nn.Linear` would, and its operand is saved in that precision instead.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from frugalm.fp8.backends import GemmBackend, resolve_backend
from frugalm.fp8.config import GEMM_NAMES, check_gemms
from frugalm.fp8.quantize import (
    WEIGHT_TILE,
    WGRAD_TILE,
    FP8Tensor,
    quantize_activation,
    quantize_for_wgrad,
    quantize_weight,
)


ALL_GEMMS = frozenset(GEMM_NAMES)


def _output_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on for ``x``'s device (what ``nn.Linear`` would return), else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _no_autocast(device_type: str) -> torch.autocast:
    return torch.autocast(device_type, enabled=False)


def _autocast_off(backward: Callable[[Any, Tensor], tuple]) -> Callable[[Any, Tensor], tuple]:
    """Run an autograd Function's ``backward(ctx, dy)`` with autocast off on dy's device.

    Both FP8 Functions pick every operand's dtype themselves (see the module docstring); the backward
    pass can run under an enclosing autocast region too, so each needs this and one wrapper keeps
    them alike. Use under ``@staticmethod``.
    """
    @functools.wraps(backward)
    def wrapped(ctx: Any, dy: Tensor) -> tuple:
        with _no_autocast(dy.device.type):
            return backward(ctx, dy)

    return wrapped


def _weight_for_fprop_and_dgrad(
    weight: Tensor, fp8_gemms: frozenset, keep_for_dgrad: bool, power_of_two: bool
) -> tuple[Optional[FP8Tensor], tuple[Optional[Tensor], Optional[Tensor]]]:
    """The FP8 weight (made once, only if Fprop or a needed Dgrad takes FP8) and what backward keeps of
    the weight for Dgrad: ``(data, scale)`` of that same FP8 weight, ``(weight, None)`` when Dgrad is
    left out of FP8 by ``gemms``, or ``(None, None)`` when no input gradient is needed.

    Dense and grouped (``[E, out, in]``) weights follow the same rule, so it is written once.
    """
    fp8_dgrad = keep_for_dgrad and "dgrad" in fp8_gemms
    wq = quantize_weight(weight, power_of_two=power_of_two) if "fprop" in fp8_gemms or fp8_dgrad else None
    if not keep_for_dgrad:
        return wq, (None, None)
    return wq, ((wq.data, wq.scale) if fp8_dgrad else (weight.detach(), None))


class _FP8LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) with FP8 Fprop/Dgrad/Wgrad; see the module docstring for the tilings.

    ``fp8_gemms`` names the GEMMs that take FP8 operands (all three in the recipe); any other runs in
    ``out_dtype`` (the autocast dtype, else x's dtype -- what `nn.Linear` would use) and then saves the
    high-precision operand it needs instead of the FP8 copy.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        gemm: GemmBackend,
        power_of_two: bool,
        keep_for_wgrad: bool,
        keep_for_dgrad: bool,
        out_dtype: torch.dtype,
        fp8_gemms: frozenset = ALL_GEMMS,
    ) -> Tensor:
        out_features, in_features = weight.shape
        if x.shape[-1] != in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the weight expects {in_features}")
        x2 = x.reshape(-1, in_features)
        wq, w_saved = _weight_for_fprop_and_dgrad(weight, fp8_gemms, keep_for_dgrad, power_of_two)
        if "fprop" in fp8_gemms:
            y = gemm.gemm(quantize_activation(x2, power_of_two=power_of_two), wq, torch.float32)
        else:
            y = torch.matmul(x2.to(out_dtype), weight.to(out_dtype).t()).float()
        if bias is not None:
            y = y + bias.float()
        x_saved = (None, None)
        if keep_for_wgrad:
            if "wgrad" in fp8_gemms:
                xw = quantize_for_wgrad(x2, power_of_two=power_of_two)
                x_saved = (xw.data, xw.scale)
            else:
                x_saved = (x2.detach().to(out_dtype), None)
        ctx.save_for_backward(*x_saved, *w_saved)
        ctx.gemm, ctx.power_of_two, ctx.fp8_gemms, ctx.hp_dtype = gemm, power_of_two, fp8_gemms, out_dtype
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.to(out_dtype).reshape(*x.shape[:-1], out_features)

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        x_a, x_b, w_a, w_b = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dy2 = dy.reshape(-1, dy.shape[-1])
        hp = ctx.hp_dtype
        dx = dw = db = None
        if need_dx:
            if "dgrad" in ctx.fp8_gemms:
                wq = FP8Tensor(w_a, w_b, WEIGHT_TILE)
                dyq = quantize_activation(dy2, power_of_two=ctx.power_of_two)
                dx = ctx.gemm.gemm(dyq, wq.t(), ctx.x_dtype)
            else:
                dx = torch.matmul(dy2.to(hp), w_a.to(hp)).to(ctx.x_dtype)
            dx = dx.reshape(ctx.x_shape)
        if need_dw:
            if "wgrad" in ctx.fp8_gemms:
                xw = FP8Tensor(x_a, x_b, WGRAD_TILE)
                dyw = quantize_for_wgrad(dy2, power_of_two=ctx.power_of_two)
                dw = ctx.gemm.gemm(dyw.t(), xw.t(), ctx.w_dtype)
            else:
                dw = torch.matmul(dy2.to(hp).t(), x_a).to(ctx.w_dtype)
        if need_db and ctx.has_bias:
            db = dy2.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None


def fp8_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    backend: str | GemmBackend = "auto",
    power_of_two_scales: bool = False,
    gemms: tuple[str, ...] | list[str] | frozenset = GEMM_NAMES,
) -> Tensor:
    """``x @ weight.T + bias`` with DeepSeek-V3's FP8 recipe in forward and backward.

    ``backend`` is a name from `frugalm.fp8.backends.BACKEND_NAMES` (resolved for ``x.device``) or a
    backend object. Under ``torch.autocast`` the result is in the autocast dtype (like ``nn.Linear``),
    while the GEMMs themselves stay FP8 with FP32 accumulation. ``gemms`` (a subset of
    ``("fprop", "dgrad", "wgrad")``, all by default) picks which GEMMs take FP8 operands; the others run
    in the output dtype, as ``nn.Linear`` would (an ablation knob: `FP8Config.gemms`).
    """
    fp8_gemms = check_gemms(gemms)
    gemm = resolve_backend(backend, x.device)
    grad_on = torch.is_grad_enabled()
    keep_for_wgrad = grad_on and weight.requires_grad
    keep_for_dgrad = grad_on and x.requires_grad
    out_dtype = _output_dtype(x)
    with _no_autocast(x.device.type):
        return _FP8LinearFunction.apply(
            x, weight, bias, gemm, power_of_two_scales, keep_for_wgrad, keep_for_dgrad, out_dtype, fp8_gemms
        )


class FP8Linear(nn.Linear):
    """`nn.Linear` computing with `fp8_linear`; same parameters and names, so state_dict keys are unchanged.

    Parameters stay in their own (master) dtype; quantization happens on the fly each forward, as
    DeepSeek's online scaling requires, so optimizers and checkpoints never see FP8.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        backend: str = "auto",
        power_of_two_scales: bool = False,
        gemms: tuple[str, ...] | list[str] = GEMM_NAMES,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = backend
        self.power_of_two_scales = power_of_two_scales
        self.gemms = tuple(g for g in GEMM_NAMES if g in check_gemms(gemms))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, backend: str = "auto", power_of_two_scales: bool = False,
        gemms: tuple[str, ...] | list[str] = GEMM_NAMES,
    ) -> "FP8Linear":
        """An FP8Linear that shares ``linear``'s Parameter objects (no copy, optimizer state stays valid)."""
        new = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
            dtype=linear.weight.dtype, backend=backend, power_of_two_scales=power_of_two_scales, gemms=gemms,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(
            x, self.weight, self.bias, backend=self.backend, power_of_two_scales=self.power_of_two_scales,
            gemms=self.gemms,
        )

    def extra_repr(self) -> str:
        pow2 = ", power_of_two_scales=True" if self.power_of_two_scales else ""
        gemms = f", fp8_gemms={list(self.gemms)}" if self.gemms != GEMM_NAMES else ""
        return f"{super().extra_repr()}, fp8_backend={self.backend!r}{pow2}{gemms}"


# ----------------------------------------------------------------------------- MoE experts
def _group_bounds(offs: Tensor, n_experts: int, n_rows: int) -> list[tuple[int, int]]:
    ends = [int(e) for e in offs.tolist()]
    if len(ends) != n_experts:
        raise ValueError(f"offs has {len(ends)} entries for {n_experts} experts")
    starts = [0] + ends[:-1]
    if any(e < s for s, e in zip(starts, ends)) or (ends and ends[-1] > n_rows):
        raise ValueError(f"offs must be non-decreasing cumulative row ends <= {n_rows}, got {ends}")
    return list(zip(starts, ends))


def _grouped_gemm(
    gemm: GemmBackend, a: FP8Tensor, b: FP8Tensor, bounds: list[tuple[int, int]], out: Tensor, transpose_b: bool
) -> Tensor:
    """``out[s:t] = a[s:t] @ b[e]^T`` (``b[e]`` if ``transpose_b``) for each expert's rows ``s:t``; a backend
    with its own ``grouped_gemm`` (see `GemmBackend`) does it its way."""
    grouped = getattr(gemm, "grouped_gemm", None)
    if grouped is not None:
        return grouped(a, b, bounds, out, transpose_b)
    for e, (s, t) in enumerate(bounds):
        if t > s:
            out[s:t] = gemm.gemm(a.rows(s, t), b[e].t() if transpose_b else b[e], out.dtype)
    return out


class _FP8GroupedLinearFunction(torch.autograd.Function):
    """Per-expert ``y[rows_e] = x[rows_e] @ w[e]^T`` with the same FP8 tilings as `_FP8LinearFunction`.

    Activation tiles are per token, so x and dy are quantized once for all experts; Wgrad's 128-token
    tiles are cut per expert so that no tile mixes two experts' tokens (each expert's Wgrad is its own
    contraction over its own tokens). ``fp8_gemms`` works as for `_FP8LinearFunction`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w: Tensor,
        offs: Tensor,
        gemm: GemmBackend,
        power_of_two: bool,
        keep_for_wgrad: bool,
        keep_for_dgrad: bool,
        out_dtype: torch.dtype,
        fp8_gemms: frozenset = ALL_GEMMS,
    ) -> Tensor:
        if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
            raise ValueError(f"expected x [N, in] and w [E, out, in], got {tuple(x.shape)} and {tuple(w.shape)}")
        n_experts, out_features, _ = w.shape
        bounds = _group_bounds(offs, n_experts, x.shape[0])
        wq, w_saved = _weight_for_fprop_and_dgrad(w, fp8_gemms, keep_for_dgrad, power_of_two)
        y = torch.zeros(x.shape[0], out_features, dtype=out_dtype, device=x.device)
        if "fprop" in fp8_gemms:
            _grouped_gemm(gemm, quantize_activation(x, power_of_two=power_of_two), wq, bounds, y, transpose_b=False)
        else:
            _grouped_hp(x.to(out_dtype), w.to(out_dtype), bounds, y, transpose_b=False)
        x_a = x_b = None
        if keep_for_wgrad:
            if "wgrad" in fp8_gemms:
                parts = [quantize_for_wgrad(x[s:t], power_of_two=power_of_two) for s, t in bounds if t > s]
                if parts:
                    x_a = torch.cat([p.data for p in parts])
                    x_b = torch.cat([p.scale for p in parts])
            else:
                x_a = x.detach().to(out_dtype)
        ctx.save_for_backward(x_a, x_b, *w_saved)
        ctx.bounds, ctx.gemm, ctx.power_of_two = bounds, gemm, power_of_two
        ctx.fp8_gemms, ctx.hp_dtype = fp8_gemms, out_dtype
        ctx.x_shape, ctx.x_dtype, ctx.w_shape, ctx.w_dtype = x.shape, x.dtype, w.shape, w.dtype
        return y

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        x_a, x_b, w_a, w_b = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        device, hp = dy.device, ctx.hp_dtype
        dx = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=device) if need_dx else None
        dw = torch.zeros(ctx.w_shape, dtype=ctx.w_dtype, device=device) if need_dw else None
        if need_dx:
            if "dgrad" in ctx.fp8_gemms:
                wq = FP8Tensor(w_a, w_b, WEIGHT_TILE)
                dyq = quantize_activation(dy, power_of_two=ctx.power_of_two)
                _grouped_gemm(ctx.gemm, dyq, wq, ctx.bounds, dx, transpose_b=True)
            else:
                _grouped_hp(dy.to(hp), w_a.to(hp), ctx.bounds, dx, transpose_b=True)
        if not need_dw:
            return dx, dw, None, None, None, None, None, None, None
        fp8_wgrad = "wgrad" in ctx.fp8_gemms
        dy_hp = None if fp8_wgrad else dy.to(hp)
        scale_row = 0
        for e, (s, t) in enumerate(ctx.bounds):
            if t == s:
                continue
            if fp8_wgrad:
                tiles = math.ceil((t - s) / WGRAD_TILE[0])
                xw = FP8Tensor(x_a[s:t], x_b[scale_row: scale_row + tiles], WGRAD_TILE)
                scale_row += tiles
                dyw = quantize_for_wgrad(dy[s:t], power_of_two=ctx.power_of_two)
                dw[e] = ctx.gemm.gemm(dyw.t(), xw.t(), ctx.w_dtype)
            else:
                dw[e] = torch.mm(dy_hp[s:t].t(), x_a[s:t]).to(ctx.w_dtype)
        return dx, dw, None, None, None, None, None, None, None


def _grouped_hp(a: Tensor, b: Tensor, bounds: list[tuple[int, int]], out: Tensor, transpose_b: bool) -> Tensor:
    """High-precision ``out[s:t] = a[s:t] @ b[e]^T`` (``b[e]`` if ``transpose_b``): a GEMM kept out of FP8."""
    for e, (s, t) in enumerate(bounds):
        if t > s:
            out[s:t] = torch.mm(a[s:t], b[e] if transpose_b else b[e].t())
    return out


def fp8_grouped_linear(
    x: Tensor,
    w: Tensor,
    offs: Tensor,
    *,
    backend: str | GemmBackend = "auto",
    power_of_two_scales: bool = False,
    gemms: tuple[str, ...] | list[str] | frozenset = GEMM_NAMES,
) -> Tensor:
    """MoE experts' ``linear_fn`` in FP8: rows ``offs[e-1]:offs[e]`` of ``x [N, in]`` times ``w[e]^T``.

    ``w`` is the stacked ``[E, out, in]`` expert weight and ``offs`` the int cumulative row ends (tokens
    already sorted by expert), as for ``torch._grouped_mm``. Rows past ``offs[-1]`` get zeros. ``gemms``
    as for `fp8_linear`.
    """
    fp8_gemms = check_gemms(gemms)
    gemm = resolve_backend(backend, x.device)
    grad_on = torch.is_grad_enabled()
    out_dtype = _output_dtype(x)
    with _no_autocast(x.device.type):
        return _FP8GroupedLinearFunction.apply(
            x, w, offs, gemm, power_of_two_scales, grad_on and w.requires_grad, grad_on and x.requires_grad,
            out_dtype, fp8_gemms,
        )


@dataclass(frozen=True)
class FP8GroupedLinear:
    """`fp8_grouped_linear` with its options bound: what `apply_fp8` assigns to ``experts.linear_fn``.

    A plain callable (not an nn.Module), so assigning it does not add a submodule or state_dict keys.
    """

    backend: str = "auto"
    power_of_two_scales: bool = False
    gemms: tuple[str, ...] = GEMM_NAMES

    def __call__(self, x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
        return fp8_grouped_linear(
            x, w, offs, backend=self.backend, power_of_two_scales=self.power_of_two_scales, gemms=self.gemms
        )
