"""Group-relative outcome advantages (DeepSeekMath §4.1.2) and the scaling variants.

Every token of completion i gets Â_i = (r_i − mean(group)) / scale, where the group is the G
completions of the same prompt. `scale_rewards`:

* ``group`` – the group's standard deviation (GRPO as published);
* ``batch`` – the standard deviation over the whole batch (keeps the group mean as the baseline but
  stops easy/hard prompts from being up-weighted, the Dr. GRPO concern; TRL's "batch");
* ``none``  – no division (Dr. GRPO).

Standard deviations are Bessel-corrected (``torch.std``), as in TRL, and `eps` keeps a zero-std group
finite: its rewards all equal their mean, so its advantages are exactly 0 and it teaches nothing,
which is why the fraction of such groups is logged and dynamic sampling drops them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALES = ("group", "batch", "none")


@dataclass
class AdvantageStats:
    group_mean: torch.Tensor  # [num_groups]
    group_std: torch.Tensor  # [num_groups]
    zero_std: torch.Tensor  # [num_groups] bool

    @property
    def frac_zero_std(self) -> float:
        return float(self.zero_std.float().mean()) if self.zero_std.numel() else 0.0


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, AdvantageStats]:
    """rewards [N] (N = groups × G, grouped consecutively) -> advantages [N] and per-group statistics."""
    if scale_rewards not in SCALES:
        raise ValueError(f"scale_rewards {scale_rewards!r} is not one of {list(SCALES)}")
    if group_size < 2:
        raise ValueError("group_size must be >= 2")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form whole groups of {group_size}")
    r = rewards.double().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    centred = r - mean
    if scale_rewards == "group":
        adv = centred / (std + eps)
    elif scale_rewards == "batch":
        adv = centred / (rewards.double().std() + eps) if rewards.numel() > 1 else centred
    else:
        adv = centred
    zero = std.squeeze(1) < 1e-8
    return adv.flatten().to(rewards.dtype), AdvantageStats(mean.squeeze(1), std.squeeze(1), zero)
