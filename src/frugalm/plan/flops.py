"""FLOPs per token of a model, from its config: the one counter behind both the planner and the trainer's MFU.

Conventions (stated because published MFU figures differ on them):
- a multiply-accumulate is 2 FLOPs; training is 3x forward (backward computes input and weight grads);
- GEMMs count activated parameters only (k routed + shared experts for MoE) plus the LM head; the
  embedding lookup is not a GEMM and counts nothing, although 6·N·D counts it through N;
- the attention core (QK^T and PV) uses MLA's up-projected head dims (d_qk = 192, d_v = 128 for V3)
  and, with `causal=True`, the exact causal pair count: a query at position i attends i+1 keys, so the
  mean context is (s+1)/2 (PaLM's 12·L·H·Q·T term ignores the mask; DeepSeek's 250 GFLOP/token halves it);
- recomputation is not counted (these are model FLOPs, the MFU numerator; the planner adds recompute to
  hardware time separately);
- MTP modules (eh_proj, one decoder block, the shared head) count when `include_mtp=True`.
Pure Python with no torch or matplotlib import, so the trainer can import it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from frugalm.plan.arch import AnyModelConfig, LayerShape, ModelShape, shape_of


def mean_context(seq_len: int, causal: bool = True) -> float:
    """Average number of keys a query attends to in a packed sequence of `seq_len` tokens."""
    return (seq_len + 1) / 2 if causal else float(seq_len)


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs per token by op class; training is 3x these."""

    attention_gemm: float  # q/kv projections (down and up for MLA) and the output projection
    attention_core: float  # QK^T and PV, seq-dependent
    mlp_gemm: float  # dense MLPs, shared and activated routed experts, router
    lm_head: float
    mtp_gemm: float  # MTP modules: eh_proj, their block's GEMMs and the head
    mtp_attention_core: float

    def forward(self, include_mtp: bool = True) -> float:
        return self.gemm(include_mtp) + self.core(include_mtp)

    def gemm(self, include_mtp: bool = True) -> float:
        """The part that runs as GEMMs (FP8-eligible); the rest is the attention core."""
        return self.attention_gemm + self.mlp_gemm + self.lm_head + (self.mtp_gemm if include_mtp else 0.0)

    def core(self, include_mtp: bool = True) -> float:
        return self.attention_core + (self.mtp_attention_core if include_mtp else 0.0)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _as_shape(cfg: AnyModelConfig | ModelShape) -> ModelShape:
    return cfg if isinstance(cfg, ModelShape) else shape_of(cfg)


def layer_forward_flops(layer: LayerShape, seq_len: int, causal: bool = True) -> tuple[float, float]:
    """(GEMM, attention-core) forward FLOPs per token of one layer."""
    return 2.0 * layer.gemm_macs, 2.0 * layer.attn_macs_per_key * mean_context(seq_len, causal)


def flop_breakdown(cfg: AnyModelConfig | ModelShape, seq_len: int, *, causal: bool = True) -> FlopBreakdown:
    """Forward FLOPs per token of each op class for sequences of `seq_len` tokens."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0 (got {seq_len})")
    shape = _as_shape(cfg)
    ctx = mean_context(seq_len, causal)
    attn_gemm = sum(2.0 * l.attn_gemm_macs for l in shape.layers)
    mlp_gemm = sum(2.0 * (l.gemm_macs - l.attn_gemm_macs) for l in shape.layers)
    core = sum(2.0 * l.attn_macs_per_key * ctx for l in shape.layers)
    mtp_gemm = sum(2.0 * (m.gemm_macs + shape.mtp_extra_macs + shape.head_macs) for m in shape.mtp)
    mtp_core = sum(2.0 * m.attn_macs_per_key * ctx for m in shape.mtp)
    return FlopBreakdown(
        attention_gemm=attn_gemm, attention_core=core, mlp_gemm=mlp_gemm, lm_head=2.0 * shape.head_macs,
        mtp_gemm=mtp_gemm, mtp_attention_core=mtp_core,
    )


def flops_per_token(
    cfg: AnyModelConfig | ModelShape, seq_len: int, *, training: bool = True, include_mtp: bool = True,
    causal: bool = True,
) -> float:
    """Model FLOPs per token (no recompute): forward, or forward + backward when `training`.

    For DeepSeek-V3 at 4K without MTP this is ~250 GFLOP/token, DeepSeek's own figure (ISCA'25, Table 2).
    """
    fwd = flop_breakdown(cfg, seq_len, causal=causal).forward(include_mtp)
    return 3.0 * fwd if training else fwd


def six_n_flops_per_token(cfg: AnyModelConfig | ModelShape, n_active: float | None = None) -> float:
    """Kaplan's 6·N per token (N = activated parameters without MTP, embedding included)."""
    return 6.0 * (n_active if n_active is not None else _as_shape(cfg).n_active)


def attention_flops_per_token(
    cfg: AnyModelConfig | ModelShape, seq_len: int, *, training: bool = True, causal: bool = True
) -> float:
    """The seq-dependent attention-core term alone (PaLM's 12·L·H·Q·T, halved by causality when `causal`)."""
    core = flop_breakdown(cfg, seq_len, causal=causal).attention_core
    return 3.0 * core if training else core


FLOPS_METHODS = ("detailed", "6nd", "6nd+attention")


def training_flops_per_token(
    cfg: AnyModelConfig | ModelShape, seq_len: int, method: str = "detailed", *, include_mtp: bool = True,
    n_active: float | None = None,
) -> float:
    """Training FLOPs per token by one of the three conventions published MFUs use.

    "detailed": this module's op-by-op count; "6nd": 6·N; "6nd+attention": 6·N plus the causal attention term
    (the PaLM-style MFU numerator). `n_active` overrides N (e.g. a paper's rounded 37e9).
    """
    if method == "detailed":
        return flops_per_token(cfg, seq_len, training=True, include_mtp=include_mtp)
    if method == "6nd":
        return six_n_flops_per_token(cfg, n_active)
    if method == "6nd+attention":
        return six_n_flops_per_token(cfg, n_active) + attention_flops_per_token(cfg, seq_len)
    raise ValueError(f"unknown FLOP method {method!r}; one of {FLOPS_METHODS}")
