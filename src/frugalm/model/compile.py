"""Opt-in `torch.compile` for the model: `compile_model(model)`.

Inductor cannot trace the experts' grouped GEMM as it is: on CPU (and for fp32 anywhere) the fake kernel
of `torch._grouped_mm` refuses the inputs, and its fallback loops over experts with a data-dependent
count. So the GEMM is registered as an opaque custom op (`frugalm::grouped_linear`, with a fake kernel
and its own backward op) and every `GroupedExperts` still on the default `linear_fn` is pointed at it;
everything around it (router, dispatch, RoPE, norms, SwiGLU, attention glue) is compiled. Experts
whose `linear_fn` was replaced from outside (FP8) are left alone.

The model's numbers do not change (same GEMMs, same fp32 math up to inductor's re-association of
element-wise ops). Compilation takes minutes on a small CPU; the eager model stays the default.
"""

from __future__ import annotations

import torch
from torch import nn

from frugalm.model.moe import GroupedExperts, grouped_linear, grouped_mm_backward, grouped_mm_forward


@torch.library.custom_op("frugalm::grouped_linear", mutates_args=())
def grouped_linear_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`frugalm.model.moe.grouped_linear` as one opaque op: x [N, in] sorted by expert, w [E, out, in]."""
    return grouped_mm_forward(x, w, offs)


@grouped_linear_op.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("frugalm::grouped_linear_backward", mutates_args=())
def grouped_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                               offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return grouped_mm_backward(dy, x, w, offs)


@grouped_linear_backward_op.register_fake
def _(dy, x, w, offs):
    return torch.empty_like(x), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dx, dw = grouped_linear_backward_op(dy, x, w, offs)
    return dx, dw, None


grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


def compilable_grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The experts' `linear_fn` under compile: autocast is applied outside the op (one dtype inside)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    elif x.dtype != w.dtype:
        x = x.to(w.dtype)
    return grouped_linear_op(x, w, offs)


def compile_model(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Point default-GEMM experts at the custom op and return `torch.compile(model, **compile_kwargs)`.

    The returned module shares parameters with `model` (train it, save `model`). Pass e.g.
    `dynamic=False` or `mode=...` through `compile_kwargs`.
    """
    for module in model.modules():
        if isinstance(module, GroupedExperts) and module.linear_fn is grouped_linear:
            module.linear_fn = compilable_grouped_linear
    return torch.compile(model, **compile_kwargs)
