"""Synthetic tensors with the statistics that make FP8 hard, for error tests and benchmarks.

Transformer activations are not Gaussian: a handful of channels carry values tens to hundreds of times
larger than the rest ("massive activations"/outlier features), the body is heavy-tailed, and the
magnitude varies from token to token. Gradients are tiny (far below E4M3's smallest normal without
scaling) and vary over orders of magnitude between tokens. A per-tensor scale is dominated by the
outliers and flushes the small values; per-tile scales confine that damage to the outlier's own tile.
These generators reproduce those properties deterministically from a seed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _student_t(shape: tuple[int, ...], dof: int, generator: torch.Generator) -> Tensor:
    """Student-t with integer ``dof``; chi^2 is built from squared normals so one generator drives all."""
    normal = torch.randn(shape, generator=generator)
    chi2 = torch.randn((dof, *shape), generator=generator).pow(2).sum(0)
    return normal / torch.sqrt(chi2 / dof)


def activations_with_outliers(
    tokens: int,
    channels: int,
    *,
    seed: int = 0,
    outlier_channels: int = 4,
    outlier_scale: float = 60.0,
    spike_tokens: float = 0.005,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[tokens, channels]`` activations: Student-t(4) body, a few outlier channels, rare token spikes."""
    g = torch.Generator().manual_seed(seed)
    x = _student_t((tokens, channels), 4, g)
    x *= torch.exp(0.5 * torch.randn(tokens, 1, generator=g))  # per-token magnitude varies ~e^{+-0.5}
    idx = torch.randperm(channels, generator=g)[:outlier_channels]
    x[:, idx] *= outlier_scale * (0.5 + torch.rand(outlier_channels, generator=g))
    spikes = torch.rand(tokens, generator=g) < spike_tokens
    x[spikes] *= 20.0
    return x.to(dtype)


def gradients_like(tokens: int, channels: int, *, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[tokens, channels]`` output gradients: ~1e-6 magnitude, per-token scale spread over 1e-2..1e2."""
    g = torch.Generator().manual_seed(seed)
    dy = _student_t((tokens, channels), 3, g)
    dy *= 10.0 ** (4 * torch.rand(tokens, 1, generator=g) - 2)
    return (1e-6 * dy).to(dtype)


def weights_like(out_features: int, in_features: int, *, seed: int = 2, std: float = 0.02,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """``[out, in]`` weights: Student-t(5) entries of standard deviation ~``std`` (trained weights are heavier-tailed than init)."""
    g = torch.Generator().manual_seed(seed)
    w = _student_t((out_features, in_features), 5, g) * (std / (5.0 / 3.0) ** 0.5)
    return w.to(dtype)
