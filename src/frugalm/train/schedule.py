"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state.

Both start with a linear warmup to `lr`. "cosine" then follows half a cosine down to `min_lr` at
`max_steps`. "wsd" (warmup-stable-decay, the shape DeepSeek-V3's 14.8T-token schedule approximates:
long constant phase, decay at the end) holds `lr` and decays linearly to `min_lr` over the final
`decay_fraction` of the steps; its constant phase lets a run be extended without re-warming.
"""

from __future__ import annotations

import math

from frugalm.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `cfg.max_steps`-step run."""
    total = cfg.max_steps
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    decay_steps = int(round(cfg.decay_fraction * total))
    decay_start = max(cfg.warmup_steps, total - decay_steps)
    if step < decay_start or decay_steps == 0:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    return cfg.lr + (cfg.min_lr - cfg.lr) * progress
