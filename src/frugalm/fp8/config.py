"""`FP8Config`: the ``[fp8]`` section of a run config (which modules compute in FP8, and how).

Loaded with `frugalm.config.from_dict` (strict keys), so ``--set fp8.enabled=true`` and
``--set fp8.backend=emulated`` work from the command line. Optimizer options such as BF16 AdamW moments
belong to the trainer's section, not here: they are independent of which GEMMs run in FP8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Modules DeepSeek-V3 keeps in BF16/FP32: the embedding, the output head, the MoE router
# (``mlp.gate``; the dense MLP's ``gate_proj`` is not matched) and normalization layers. Patterns are
# matched against qualified module names (see `frugalm.fp8.apply.name_matches`).
DEFAULT_HIGH_PRECISION = ("embed_tokens", "lm_head", "mlp.gate", "*norm*")

# The three GEMMs of a linear layer (TransformerEngine's names): Fprop y = x W^T, Dgrad dx = dy W,
# Wgrad dW = dy^T x. DeepSeek-V3 runs all three in FP8.
GEMM_NAMES = ("fprop", "dgrad", "wgrad")


@dataclass
class FP8Config:
    """Which modules run DeepSeek-V3's FP8 recipe and with which GEMM backend.

    Patterns are shell-style globs (``fnmatch``) against qualified module names such as
    ``model.layers.3.self_attn.o_proj``; a pattern also matches any dotted suffix, so ``o_proj`` means
    every ``*.o_proj``. A module is converted if it matches ``include`` and neither ``exclude`` nor
    ``keep_high_precision``.
    """

    enabled: bool = False
    # auto: block-wise cuBLAS on H100/H200, else K-sliced row-wise FP8 GEMMs, else emulation.
    backend: Literal["auto", "blockwise", "sliced", "emulated"] = "auto"
    # Round scales up to powers of two (DeepSeek's ue8m0 / o_proj-input choice); exact rescaling, ~half range.
    power_of_two_scales: bool = False
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    keep_high_precision: list[str] = field(default_factory=lambda: list(DEFAULT_HIGH_PRECISION))
    # Set `linear_fn` on MoE expert modules (stacked expert weights) to the FP8 grouped GEMM.
    experts: bool = True
    # Which of a converted layer's GEMMs take FP8 operands; the others run in the layer's high precision
    # (the autocast dtype, else the input's dtype, as `nn.Linear` would). For ablations: the recipe is all
    # three, ``["fprop"]`` keeps the backward pass in high precision, ``[]`` keeps only the FP8 layers' code
    # path (a control that must match the unconverted model up to FP32 summation order).
    gemms: list[str] = field(default_factory=lambda: list(GEMM_NAMES))

    def __post_init__(self) -> None:
        allowed = ("auto", "blockwise", "sliced", "emulated")
        if self.backend not in allowed:
            raise ValueError(f"fp8.backend must be one of {list(allowed)}, got {self.backend!r}")
        check_gemms(self.gemms)


def check_gemms(gemms) -> frozenset[str]:
    """``gemms`` as a frozenset after checking each is one of `GEMM_NAMES`, once (ValueError otherwise)."""
    if isinstance(gemms, str):
        raise ValueError(f"fp8.gemms must be a list of {list(GEMM_NAMES)}, got the string {gemms!r}")
    gemms = list(gemms)
    unknown = [g for g in gemms if g not in GEMM_NAMES]
    if unknown:
        raise ValueError(f"fp8.gemms: unknown GEMM(s) {unknown}; choose from {list(GEMM_NAMES)}")
    if len(set(gemms)) != len(gemms):
        raise ValueError(f"fp8.gemms lists a GEMM twice: {gemms}")
    return frozenset(gemms)
