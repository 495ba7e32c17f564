"""Rotary position embedding for MLA's decoupled key/query part, with YaRN context extension.

Only `qk_rope_head_dim` channels per head are rotated, as adjacent pairs (0,1), (2,3), ...: that is the
layout the official DeepSeek checkpoint's rope columns were trained with, so official weights load
unchanged. Frequencies and YaRN's cos/sin "attention factor" follow transformers' definitions, so the
same config gives the same numbers in both libraries; YaRN's softmax mscale lives in
`ModelConfig.softmax_scale()`.
"""

from __future__ import annotations

import math

import torch

from frugalm.model.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] (fp32) and the factor cos/sin are multiplied by."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.rope_type != "yarn":
        return inv_freq.float(), 1.0
    rs = cfg.rope_scaling
    orig = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or cfg.max_position_embeddings / orig
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The rotary dimension whose wavelength completes `rotations` turns over the original context.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    # ramp 0: fast-rotating dims keep their frequency (extrapolate); ramp 1: slow dims are interpolated.
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq.float(), float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """Produces cos/sin for arbitrary positions on the fly (serving needs non-contiguous positions)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] (int) -> cos, sin [..., T, rope_dim/2] in fp32."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, T, H, D] by cos/sin [B or 1, T, D/2]; keeps the layout.

    Pair (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) is the complex product (x0 + i x1)(cos + i sin):
    one multiply in fp32 instead of a dozen element-wise ops (forward and backward).
    """
    if torch.compiler.is_compiling():  # inductor has no complex codegen; it fuses the real form instead
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
    return rotate_pairs(x.contiguous(), torch.complex(cos, sin).unsqueeze(-2))  # broadcast over heads


def rotate_pairs(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Adjacent channel pairs of x [..., D] times the complex factors rot [..., D/2] (broadcast), in fp32,
    returned in x's dtype: the core of `apply_rope`, also called by the serving engine with factors it
    builds once per step. x may be a slice at an even channel offset (no copy is made for a complex view);
    casts that would be no-ops are skipped, since at decode sizes every dispatched op counts."""
    fp32 = x.dtype == torch.float32
    xc = torch.view_as_complex((x if fp32 else x.float()).unflatten(-1, (-1, 2)))
    out = torch.view_as_real(xc * rot).flatten(-2)
    return out if fp32 else out.to(x.dtype)
