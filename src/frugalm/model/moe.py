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


class _Padded:
    """Rows sorted by expert laid into a zero-padded [E, C, ·] batch (C = the busiest expert's rows).

    On CPU one batched GEMM over that layout beats torch._grouped_mm several-fold, and its 2-D x 2-D
    (weight-gradient) form is pathologically slow there (about 40x in our measurements); padding costs
    at most `max_pad` x the real rows, beyond which we fall back (see `_use_padded`).
    """

    def __init__(self, offs: torch.Tensor, n_rows: int):
        counts = torch.diff(offs.long(), prepend=offs.new_zeros(1, dtype=torch.long))
        self.capacity = int(counts.max()) if counts.numel() else 0
        self.expert = torch.repeat_interleave(torch.arange(counts.numel(), device=offs.device), counts)
        starts = torch.repeat_interleave(offs.long() - counts, counts)
        self.slot = torch.arange(n_rows, device=offs.device) - starts
        self.n_experts = counts.numel()

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        out = rows.new_zeros(self.n_experts, self.capacity, rows.shape[-1])
        out[self.expert, self.slot] = rows
        return out

    def unpad(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[self.expert, self.slot]


def _use_padded(x: torch.Tensor, offs: torch.Tensor, max_pad: float = 2.0) -> Optional[_Padded]:
    if x.device.type != "cpu" or x.shape[0] == 0:
        return None
    layout = _Padded(offs, x.shape[0])
    return layout if layout.n_experts * layout.capacity <= max_pad * x.shape[0] else None


class _GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e].T with all three GEMMs batched per expert.

    Two layouts: torch._grouped_mm over the sorted rows (GPUs), or one bmm over a padded [E, C, ·]
    batch (CPU, when padding is cheap). torch._grouped_mm's own backward is not implemented on every
    device (it fails on CPU in torch 2.13), so the backward is spelled out.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, layout: Optional[_Padded]) -> torch.Tensor:
        ctx.layout = layout
        ctx.save_for_backward(x, w, offs)
        if layout is not None:
            return layout.unpad(torch.bmm(layout.pad(x), w.transpose(1, 2)))
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        layout: Optional[_Padded] = ctx.layout
        dy = dy.contiguous()
        dx = dw = None
        if layout is not None:
            dy_pad = layout.pad(dy)
            if ctx.needs_input_grad[0]:
                dx = layout.unpad(torch.bmm(dy_pad, w))
            if ctx.needs_input_grad[1]:
                dw = torch.bmm(dy_pad.transpose(1, 2), layout.pad(x))
            return dx, dw, None, None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(dy, w, offs=offs)
        if ctx.needs_input_grad[1]:
            if x.device.type == "cpu":  # the 2-D x 2-D grouped GEMM is very slow on CPU: one mm per busy expert
                dw = torch.zeros_like(w)
                start = 0
                for e, n in enumerate(_split_sizes(offs)):
                    if n:
                        torch.mm(dy[start:start + n].t(), x[start:start + n], out=dw[e])
                        start += n
            else:
                dw = torch._grouped_mm(dy.t(), x, offs=offs)
        return dx, dw, None, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [N, in] sorted by expert, w [E, out, in], offs [E] int32 cumulative row ends -> [N, out]."""
    if torch.is_autocast_enabled(x.device.type):
        # Autocast does not reach inside an autograd Function's backward: cast once here instead, so both
        # passes see one dtype (the cast is differentiable, so FP32 master weights still get gradients).
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return grouped_linear(x.to(dtype), w.to(dtype), offs)
    layout = _use_padded(x, offs) if x.dtype == w.dtype else None
    if layout is not None or _grouped_mm_supported(x, w):
        return _GroupedLinear.apply(x, w, offs, layout)
    # Fallback: one GEMM per expert that received tokens (empty experts cost nothing).
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(_split_sizes(offs)):
        if n:
            out[start:start + n] = x[start:start + n] @ w[e].t()
            start += n
    return out


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
            grouped = biased.unflatten(-1, (cfg.n_group, -1))
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = group_score.topk(cfg.topk_group, dim=-1).indices
            group_mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).flatten(-2)
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
        """Dispatch (sort by expert) -> grouped experts -> weighted combine (index_add back to tokens)."""
        K = routing.indices.shape[-1]
        flat_expert = routing.indices.reshape(-1)
        order = flat_expert.argsort(stable=True)
        counts = torch.bincount(flat_expert, minlength=self.cfg.n_routed_experts)
        self.last_expert_counts = counts.detach()
        offs = counts.cumsum(0).to(torch.int32)
        token = order // K
        out = self.experts(x[token], offs)
        out = out * routing.weights.reshape(-1, 1)[order].to(out.dtype)
        return torch.zeros(x.shape, dtype=out.dtype, device=x.device).index_add_(0, token, out)
