"""DeepSeekMoE: sigmoid router with aux-loss-free bias, group-limited top-k, shared + fine-grained experts.

Experts are stored stacked (`gate_up_proj [E, 2I, d]`, `down_proj [E, d, I]`, transformers 5.x's fused
layout) and computed by sorting the routed (token, expert) pairs by expert and running one grouped GEMM
per projection, so cost does not grow with a Python loop over 256 experts. The GEMM is the replaceable
attribute `GroupedExperts.linear_fn`, which is how FP8 (or any other kernel) is applied from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.model.config import ModelConfig


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------- grouped GEMM
def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm exists on CPU and sm90+ GPUs and needs 16-byte aligned row strides."""
    dev = x.device
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not (dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9)):
        return False
    return (w.shape[1] * x.element_size()) % 16 == 0 and (w.shape[2] * x.element_size()) % 16 == 0


def _split_sizes(offs: torch.Tensor) -> list[int]:
    return torch.diff(offs, prepend=offs.new_zeros(1)).tolist()


def grouped_mm_forward(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]^T``: one `torch._grouped_mm` where the device has it, else one
    GEMM per expert that received tokens (empty experts cost nothing). No autograd: see `_GroupedLinear`."""
    if _grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    out = x.new_zeros(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(_split_sizes(offs)):
        if n:
            torch.mm(x[start:start + n], w[e].t(), out=out[start:start + n])
            start += n
    return out


def grouped_mm_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor,
                        need_dx: bool = True, need_dw: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dx (grouped GEMM of dy with w) and dw (the 2-D x 2-D form over the same offsets; zeros for experts
    without rows). `torch._grouped_mm`'s own autograd rejects a non-contiguous or expanded dy, so dy is
    made contiguous first."""
    dy = dy.contiguous()
    if _grouped_mm_supported(x, w):
        dx = torch._grouped_mm(dy, w, offs=offs) if need_dx else None
        dw = torch._grouped_mm(dy.t(), x, offs=offs) if need_dw else None
        return dx, dw
    dx = torch.zeros_like(x) if need_dx else None
    dw = torch.zeros_like(w) if need_dw else None
    start = 0
    for e, n in enumerate(_split_sizes(offs)):
        if n:
            rows = slice(start, start + n)
            if dx is not None:
                torch.mm(dy[rows], w[e], out=dx[rows])
            if dw is not None:
                torch.mm(dy[rows].t(), x[rows], out=dw[e])
            start += n
    return dx, dw


class _GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e].T and both gradients (`grouped_mm_forward` / `_backward`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return grouped_mm_forward(x, w, offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dx, dw = grouped_mm_backward(dy, x, w, offs, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [N, in] sorted by expert, w [E, out, in], offs [E] int32 cumulative row ends -> [N, out]."""
    if torch.is_autocast_enabled(x.device.type):
        # Autocast does not reach inside an autograd Function's backward: cast once here instead, so both
        # passes see one dtype (the cast is differentiable, so FP32 master weights still get gradients).
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _GroupedLinear.apply(x.to(dtype), w.to(dtype), offs)
    return _GroupedLinear.apply(x, w, offs)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as two stacked weights; `forward` takes tokens already sorted by expert."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.linear_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = grouped_linear

    def forward(self, x_sorted: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fn(x_sorted, self.gate_up_proj, offs).chunk(2, dim=-1)
        return self.linear_fn(F.silu(gate) * up, self.down_proj, offs)


# ---------------------------------------------------------------------------------------- router
@dataclass
class Routing:
    """One MoE layer's routing decision for N tokens (kept for balancing statistics)."""

    indices: torch.Tensor  # [N, K] chosen experts
    weights: torch.Tensor  # [N, K] gate values (from unbiased scores, renormalised, scaled)
    scores: torch.Tensor  # [N, E] sigmoid affinities (fp32)


class Router(nn.Module):
    """`mlp.gate`: sigmoid affinities; the bias `e_score_correction_bias` only steers which experts win.

    The bias is a buffer updated by the trainer after each optimizer step (aux-loss-free balancing); it
    receives no gradient. Groups not among the `topk_group` best are filled with -inf so they can never be
    chosen, whatever the sign of the bias (the official behaviour; HF 4.x used 0.0).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E]
        biased = scores.detach() + self.e_score_correction_bias
        if cfg.n_group > 1 and cfg.topk_method != "greedy":
            grouped = biased.unflatten(-1, (cfg.n_group, -1))  # [N, G, S]
            size = grouped.shape[-1]
            # group score = sum of its two best (max, then max with that one knocked out: cheaper than topk(2))
            best, arg = grouped.max(-1)
            second = grouped.scatter(-1, arg.unsqueeze(-1), float("-inf")).amax(-1)
            keep = (best + second).topk(cfg.topk_group, dim=-1).indices  # [N, topk_group]
            # choose among the kept groups' experts only: the others can never be picked
            kept = grouped.gather(1, keep.unsqueeze(-1).expand(-1, -1, size)).flatten(1)
            local = kept.topk(cfg.num_experts_per_tok, dim=-1).indices
            indices = keep.gather(1, local // size) * size + local % size
        else:
            indices = biased.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(-1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(indices, weights * cfg.routed_scaling_factor, scores)


def sequence_balance_loss(routing: Routing, batch: int, cfg: ModelConfig) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise loss sum_i f_i P_i, averaged over sequences (times 1, not α)."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = routing.scores.view(batch, -1, E)
    T = scores.shape[1]
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
    hits = torch.zeros(batch, E, device=scores.device).scatter_add_(
        1, routing.indices.view(batch, -1), torch.ones(batch, T * K, device=scores.device)
    )
    f = hits * (E / (K * T))
    return (f * p).sum(-1).mean()


class _WeightedCombine(torch.autograd.Function):
    """y[t] = sum over rows r with token[r] == t of gate[r] * out[r]: the experts' outputs back to tokens.

    The same two ops as ``zeros.index_add_(0, token, out * gate)`` (same result bit for bit), but saving
    only ``out`` for backward: autograd's `index_add_` keeps its whole ``source`` (here the weighted copy,
    [tokens x top-k, d], 8 MiB per MoE layer on the benchmark's fine config) although its gradient needs
    only the index, and the product already keeps ``out``.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, gate: torch.Tensor, token: torch.Tensor, n_tokens: int) -> torch.Tensor:
        ctx.save_for_backward(out, gate, token)
        return out.new_zeros(n_tokens, out.shape[-1]).index_add_(0, token, out * gate.unsqueeze(-1))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        out, gate, token = ctx.saved_tensors
        g = dy.index_select(0, token)  # [rows, d]: each row's token gradient
        d_gate = (g * out).sum(-1) if ctx.needs_input_grad[1] else None
        d_out = g.mul_(gate.unsqueeze(-1)) if ctx.needs_input_grad[0] else None
        return d_out, d_gate, None, None


class MoE(nn.Module):
    """y = shared(x) + sum over the token's top-k experts of gate * expert(x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
            if cfg.n_shared_experts else None
        )
        # Set by forward for the trainer's balancing: the last batch's per-expert token counts and the
        # sequence-wise balance loss (only computed when cfg.aux_loss_alpha > 0 and training).
        self.last_expert_counts: Optional[torch.Tensor] = None
        self.last_balance_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.gate(flat)
        y = self.routed(flat, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training and self.cfg.aux_loss_alpha > 0 and x.dim() == 3:
            self.last_balance_loss = sequence_balance_loss(routing, shape[0], self.cfg)
        else:
            self.last_balance_loss = None
        return y.view(shape)

    def routed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Dispatch (sort by expert) -> grouped experts -> weighted combine (index_add back to tokens,
        `_WeightedCombine`)."""
        K = routing.indices.shape[-1]
        flat_expert = routing.indices.reshape(-1)
        order = flat_expert.argsort(stable=True)
        counts = flat_expert.new_zeros(self.cfg.n_routed_experts).scatter_add_(  # static shape (compile)
            0, flat_expert, torch.ones_like(flat_expert))
        self.last_expert_counts = counts.detach()
        offs = counts.cumsum(0, dtype=torch.int32)
        token = order.div(K, rounding_mode="floor")
        out = self.experts(x.index_select(0, token), offs)
        gate = routing.weights.reshape(-1).index_select(0, order).to(out.dtype)
        return _WeightedCombine.apply(out, gate, token, x.shape[0])
