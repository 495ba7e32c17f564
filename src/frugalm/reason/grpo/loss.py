"""The GRPO objective, token by token, and its three aggregations (GRPO, Dr. GRPO, DAPO).

Per completion token t of completion i (the policy ratio ρ = π_θ / π_old):

    ℓ_it = −min(ρ·Â_i, clip(ρ, 1 − ε_low, 1 + ε_high)·Â_i) + β·KL_k3(π_θ ‖ π_ref)
    KL_k3 = π_ref/π_θ − log(π_ref/π_θ) − 1            (unbiased, ≥ 0; Schulman's k3)

Aggregation over a batch of B completions with masks m_it (truncated completions can be masked out):

* ``grpo``    – Σ_i (Σ_t m ℓ / |o_i|) / B: each completion's mean, then the mean (length-biased: a long
  wrong answer is penalised less per token, the bias Dr. GRPO points out);
* ``dr_grpo`` – Σ_it m ℓ / (B · max_completion_length): a constant normaliser, no length bias;
* ``dapo``    – Σ_it m ℓ / Σ_it m: every token of the batch weighs the same.

`token_weights` expresses each as a per-token weight over the *whole* batch, so splitting the batch
into micro-batches (for memory) and summing their weighted losses gives exactly the full-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(target) per position: logits [B, T, V], targets [B, T] -> [B, T] (in float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position: [B, T, V] -> [B, T] (nats)."""
    return _entropy(torch.log_softmax(logits.float(), dim=-1))


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` (differentiable) and `token_entropy` (detached, for logging) from one log-softmax:
    the [B, T, V] float tensor is the largest the policy update makes, so it is built once per micro-batch."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        entropy = _entropy(logp.detach())
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(ref − logp) − (ref − logp) − 1 per token: ≥ 0, zero iff the two agree on the sampled token."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


@dataclass
class SurrogateStats:
    low_clipped: torch.Tensor  # [B, T] bool: ratio below 1 − ε_low with Â < 0 (the clip binds)
    high_clipped: torch.Tensor  # [B, T] bool: ratio above 1 + ε_high with Â > 0
    ratio: torch.Tensor  # [B, T]


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, SurrogateStats]:
    """−min(ρÂ, clip(ρ)Â) per token; `advantages` is [B] (one per completion) or [B, T]."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    stats = SurrogateStats(
        low_clipped=(ratio < 1.0 - epsilon_low) & (adv < 0),
        high_clipped=(ratio > 1.0 + epsilon_high) & (adv > 0),
        ratio=ratio.detach(),
    )
    return loss, stats


def token_weights(mask: torch.Tensor, loss_type: str, *, batch_size: int, total_tokens: float,
                  max_completion_length: int) -> torch.Tensor:
    """Weights [B, T] such that Σ weights·ℓ over all micro-batches is the batch loss of `loss_type`.

    `mask` is this micro-batch's [B_mb, T] completion mask; `batch_size` and `total_tokens` (Σ mask)
    are over the whole batch.
    """
    m = mask.float()
    if loss_type == "grpo":
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * batch_size)
    if loss_type == "dr_grpo":
        return m / (batch_size * max_completion_length)
    if loss_type == "dapo":
        return m / max(float(total_tokens), 1.0)
    raise ValueError(f"loss_type {loss_type!r} is not one of {list(LOSS_TYPES)}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              loss_type: str, epsilon_low: float, epsilon_high: float, beta: float = 0.0,
              ref_logp: torch.Tensor | None = None, batch_size: int | None = None,
              total_tokens: float | None = None, max_completion_length: int = 1
              ) -> tuple[torch.Tensor, SurrogateStats, torch.Tensor | None]:
    """The (micro-)batch loss; without `batch_size`/`total_tokens` the given tensors are the whole batch.

    Returns (loss, clip statistics, per-token KL or None when β = 0).
    """
    per_token, stats = clipped_surrogate(logp, old_logp, advantages, epsilon_low, epsilon_high)
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probabilities")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    w = token_weights(mask, loss_type, batch_size=batch_size or mask.shape[0],
                      total_tokens=float(mask.sum()) if total_tokens is None else total_tokens,
                      max_completion_length=max_completion_length)
    return (per_token * w).sum(), stats, kl
