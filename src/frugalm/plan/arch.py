"""Per-layer cost inventory of a model: parameters, GEMM MACs, attention MACs and saved activations.

FLOPs, memory and communication all need the same per-layer numbers, and a pipeline stage is a slice of
layers, so every other planner module works from one `ModelShape` instead of re-deriving sizes from the
config. Both `ModelConfig` (MLA + DeepSeekMoE + MTP) and `DenseModelConfig` (GQA + SwiGLU) map onto it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from frugalm.model.config import ModelConfig
from frugalm.plan.dense import DenseModelConfig

AnyModelConfig = Union[ModelConfig, DenseModelConfig]


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer, per token. MACs are multiply-accumulates (1 MAC = 2 FLOPs)."""

    moe: bool
    dense_params: int  # replicated over data parallel: attention, norms, dense MLP, shared experts, router
    expert_params: int  # routed experts, sharded over expert parallel
    gemm_macs: int  # forward, every GEMM a token passes through (activated experts only)
    attn_gemm_macs: int  # the attention projections' share of gemm_macs
    attn_macs_per_key: int  # forward QK^T + PV per attended key
    recompute_macs: int  # GEMM MACs that selective recompute runs again (MLA up-projections)
    act_lowp: int  # saved-for-backward elements the FP8 recipe caches in FP8: GEMM and SwiGLU inputs
    act_other: int  # other saved elements, BF16: norm inputs, attention q/k/v, router scores
    act_lowp_selective: int  # part of act_lowp that selective recompute drops
    act_other_selective: int  # part of act_other that selective recompute drops


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model; built by `shape_of(cfg)`."""

    family: str  # "mla-moe" or "dense"
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    layers: tuple[LayerShape, ...]
    mtp: tuple[LayerShape, ...]  # the decoder block of each MTP module
    mtp_extra_params: int  # per MTP module: eh_proj + its norms
    mtp_extra_macs: int  # per MTP module: eh_proj
    embed_params: int
    head_params: int  # 0 when tied to the embedding
    final_norm_params: int
    n_active: int  # activated parameters without MTP: the N of 6·N·D
    n_total: int  # total parameters without MTP
    n_mtp: int
    n_routed_experts: int = 0
    top_k: int = 0
    n_group: int = 1
    topk_group: int = 1

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def head_macs(self) -> int:
        return self.hidden * self.vocab

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0


def _mla_attention(cfg: ModelConfig) -> dict[str, int]:
    d, H = cfg.hidden_size, cfg.num_attention_heads
    dqk, dv, rkv, drope = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    rq = cfg.q_lora_rank
    if rq:
        q_down, q_up = d * rq, rq * H * dqk
        q_params = q_down + rq + q_up  # + q_a_layernorm
    else:
        q_down, q_up = 0, d * H * dqk
        q_params = q_up
    kv_down, kv_up = d * (rkv + drope), rkv * H * (cfg.qk_nope_head_dim + dv)
    o = H * dv * d
    params = q_params + kv_down + rkv + kv_up + o + 2 * d  # + kv_a_layernorm, both block norms
    # Saved for backward: block input and norm output; the q/kv latents and their norms; per-head q, k, v
    # (FlashAttention inputs); attention output (o_proj input); the fp32 softmax statistics (2 elements/head).
    lowp = d + rkv + H * dv + (rq if rq else 0)
    other = d + (rkv + drope) + H * (2 * dqk + dv) + 2 * H + (rq if rq else 0)
    # Selective recompute (DeepSeek-V3 §3.2.3): RMSNorm outputs and the MLA up-projections are recomputed,
    # so the norm outputs and the per-head q/k/v are not kept.
    sel_lowp = d + rkv + (rq if rq else 0)
    sel_other = H * (2 * dqk + dv)
    return {
        "params": params, "gemm": q_down + q_up + kv_down + kv_up + o, "attn_per_key": H * (dqk + dv),
        "recompute": q_up + kv_up, "act_lowp": lowp, "act_other": other,
        "sel_lowp": sel_lowp, "sel_other": sel_other,
    }


def _swiglu_acts(inter: int, copies: int) -> tuple[int, int]:
    """(saved, selective-dropped) low-precision elements of `copies` gated MLPs of width `inter`.

    The SwiGLU inputs (gate and up outputs) are kept; its output, the down-projection input, is kept too
    unless selective recompute rebuilds it from them (DeepSeek-V3 §3.3.3 caches the inputs, recomputes
    the output). Routing weights are applied before the down projection, so expert outputs are not kept.
    """
    return copies * 3 * inter, copies * inter


def _mla_moe_shape(cfg: ModelConfig) -> ModelShape:
    d = cfg.hidden_size
    att = _mla_attention(cfg)
    layers = []
    expert_params = 3 * d * cfg.moe_intermediate_size
    k, E, ns = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.n_shared_experts

    def block(moe: bool) -> LayerShape:
        if moe:
            mlp_dense = ns * expert_params + E * d + E  # shared experts + router weight + correction bias
            mlp_expert = E * expert_params
            mlp_gemm = (k + ns) * expert_params + E * d
            g, sg = _swiglu_acts(cfg.moe_intermediate_size, k + ns)
            # norm input; norm output (router and shared-expert input); k dispatched copies (expert
            # inputs); fp32 router scores (2 elements each).
            act_lowp, act_other, sel_lowp = d + k * d + g, d + 2 * E, d + sg
        else:
            mlp_dense, mlp_expert = 3 * d * cfg.intermediate_size, 0
            mlp_gemm = mlp_dense
            g, sg = _swiglu_acts(cfg.intermediate_size, 1)
            act_lowp, act_other, sel_lowp = d + g, d, d + sg
        return LayerShape(
            moe=moe, dense_params=att["params"] + mlp_dense, expert_params=mlp_expert,
            gemm_macs=att["gemm"] + mlp_gemm, attn_gemm_macs=att["gemm"], attn_macs_per_key=att["attn_per_key"],
            recompute_macs=att["recompute"], act_lowp=att["act_lowp"] + act_lowp,
            act_other=att["act_other"] + act_other, act_lowp_selective=att["sel_lowp"] + sel_lowp,
            act_other_selective=att["sel_other"],
        )

    layers = tuple(block(cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
    mtp_block = block(cfg.n_routed_experts > 0)
    counts = cfg.param_counts()
    embed = cfg.vocab_size * d
    return ModelShape(
        family="mla-moe", hidden=d, vocab=cfg.vocab_size, heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads, layers=layers, mtp=(mtp_block,) * cfg.num_nextn_predict_layers,
        mtp_extra_params=3 * d + 2 * d * d, mtp_extra_macs=2 * d * d, embed_params=embed,
        head_params=0 if cfg.tie_word_embeddings else embed, final_norm_params=d,
        n_active=counts["activated"], n_total=counts["total"], n_mtp=counts["mtp"],
        n_routed_experts=E, top_k=k if E else 0, n_group=cfg.n_group, topk_group=cfg.topk_group,
    )


def _dense_shape(cfg: DenseModelConfig) -> ModelShape:
    d, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn_params = d * H * hd + 2 * d * KV * hd + H * hd * d
    mlp = cfg.mlp_matrices * d * cfg.intermediate_size
    if cfg.mlp_matrices == 3:
        g, sg = _swiglu_acts(cfg.intermediate_size, 1)
    else:  # plain MLP: pre-activation and activation output (the down input)
        g, sg = 2 * cfg.intermediate_size, cfg.intermediate_size
    layer = LayerShape(
        moe=False, dense_params=attn_params + mlp + 2 * d, expert_params=0, gemm_macs=attn_params + mlp,
        attn_gemm_macs=attn_params,
        attn_macs_per_key=H * 2 * hd, recompute_macs=0,
        # block input, norm output (q/k/v input), q, k, v, attention output (o input), softmax stats,
        # then the MLP block's input, norm output and MLP internals.
        act_lowp=d + H * hd + d + g, act_other=d + (H + 2 * KV) * hd + 2 * H + d,
        act_lowp_selective=2 * d + sg, act_other_selective=0,
    )
    counts = cfg.param_counts()
    embed = cfg.vocab_size * d
    return ModelShape(
        family="dense", hidden=d, vocab=cfg.vocab_size, heads=H, kv_heads=KV,
        layers=(layer,) * cfg.num_hidden_layers, mtp=(), mtp_extra_params=0, mtp_extra_macs=0,
        embed_params=embed, head_params=0 if cfg.tie_word_embeddings else embed, final_norm_params=d,
        n_active=counts["activated"], n_total=counts["total"], n_mtp=0,
    )


def shape_of(cfg: AnyModelConfig) -> ModelShape:
    """The per-layer inventory of either model family."""
    if isinstance(cfg, ModelConfig):
        return _mla_moe_shape(cfg)
    if isinstance(cfg, DenseModelConfig):
        return _dense_shape(cfg)
    raise TypeError(f"expected ModelConfig or DenseModelConfig, got {type(cfg).__name__}")
