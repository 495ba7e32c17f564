"""The next-token training loss, in one place: the trainer, SFT (through its cross-entropy) and the
pipeline's last stage all compute it with `next_token_losses`, so a pipeline run's loss is the
single-process loss by construction rather than by two copies kept in step. The evaluation loss is
shared the same way (`eval_cross_entropy_sum`)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

CrossEntropy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE of ``logits [B, T, V]`` against ``labels [B, T]``, in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def eval_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed (not mean) CE of ``logits [B, T, V]`` against ``labels [B, T]``, computed in float32 and
    returned in float64: the evaluation loss (`Trainer.evaluate`, single-process and the pipeline's last
    stage) adds it over batches and ranks, then divides by the token count once."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").double()


def next_token_losses(logits: torch.Tensor, mtp_logits: Sequence[torch.Tensor], labels: torch.Tensor,
                      mtp_weight: float, ce: CrossEntropy = cross_entropy
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """main CE + λ · (mean over MTP depths k of CE against ``labels[:, k:]``), and its parts (detached):
    ``loss`` (main) and, with MTP, ``mtp_loss`` (λ-free). The balance loss is added by the caller."""
    main = ce(logits, labels)
    total, parts = main, {"loss": main.detach()}
    if mtp_logits:
        mtp = torch.stack([ce(lg, labels[:, k:]) for k, lg in enumerate(mtp_logits, start=1)]).mean()
        total = total + mtp_weight * mtp
        parts["mtp_loss"] = mtp.detach()
    return total, parts
