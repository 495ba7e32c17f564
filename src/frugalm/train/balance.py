"""DeepSeek-V3's expert balancing from the trainer's side: per-step expert loads and the bias update.

The router adds `e_score_correction_bias` to its scores only to *choose* experts (DeepSeek-V3 §2.1.2),
so nudging it shifts load without touching gradients: after every optimizer step each expert's bias
moves by γ towards the mean load, ``b += γ·sign(mean_load − load)``, using the load of the whole global
batch (all micro-batches; all ranks once `reduce` is a collective). The optional sequence-wise balance
loss is the model's `last_balance_loss`; the trainer only weights it by α.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from frugalm.model.moe import MoE


def moe_modules(model: nn.Module) -> dict[str, MoE]:
    """Every MoE block by qualified name, main layers first, then MTP blocks (each has its own router bias)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


class ExpertLoadTracker:
    """Sums each MoE block's `last_expert_counts` over the micro-batches of one optimizer step."""

    def __init__(self, modules: dict[str, MoE]):
        self.modules = modules
        self.counts: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.counts = {}

    def collect(self) -> None:
        """Call after each micro-batch's forward."""
        for name, m in self.modules.items():
            c = m.last_expert_counts
            if c is None:
                continue
            c = c.detach().to(torch.int64)
            self.counts[name] = self.counts[name] + c if name in self.counts else c.clone()

    def balance_loss(self, alpha: float) -> Optional[torch.Tensor]:
        """α · Σ over MoE blocks of their sequence-wise balance loss of the last forward (None if off)."""
        if alpha <= 0:
            return None
        losses = [m.last_balance_loss for m in self.modules.values() if m.last_balance_loss is not None]
        return alpha * torch.stack(losses).sum() if losses else None


@torch.no_grad()
def update_expert_bias(
    modules: dict[str, MoE],
    counts: dict[str, torch.Tensor],
    gamma: float,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> None:
    """``b_i += γ·sign(mean_load − load_i)`` for every block with counts; `reduce` sums counts over ranks.

    An expert exactly at the mean load keeps its bias (sign 0). The comparison is done in integers
    (``sign(total − E·load_i)`` has the sign of ``mean − load_i``) so it is exact at any token count.
    """
    if gamma == 0:
        return
    for name, module in modules.items():
        if name not in counts:
            continue
        load = counts[name]
        if reduce is not None:
            load = reduce(load)
        bias = module.gate.e_score_correction_bias
        load = load.to(device=bias.device, dtype=torch.int64)
        direction = torch.sign(load.sum() - load.numel() * load).to(bias.dtype)
        bias.add_(direction, alpha=gamma)


def load_imbalance(counts: torch.Tensor) -> float:
    """max/mean of one block's expert loads: 1.0 is perfect balance, E/k means one expert takes everything."""
    mean = counts.double().mean()
    return float(counts.double().max() / mean) if mean > 0 else float("nan")
