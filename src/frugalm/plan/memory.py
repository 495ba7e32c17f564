"""Memory per GPU of a training layout: model states, activations, logits, and a fixed reserve.

Formulas, named so a reader can check them:
- model states (ZeRO, Rajbhandari et al. 2020): weights P·b_w, gradients P·b_g, optimizer P·(b_master +
  2·b_moment); ZeRO-1 divides the optimizer by the data-parallel degree, ZeRO-2 also the gradients,
  ZeRO-3/FSDP also the weights. Routed experts are sharded over EP first and ZeRO-sharded over the expert
  data-parallel degree dp·tp/ep. Mixed-precision Adam in BF16 gives the classic 2+2+12 = 16 B/param.
- activations: the per-layer saved-element inventory of `arch.py` (FlashAttention, so no s² term; the
  spirit of Korthikanti et al. 2022 for MLA/MoE) × tokens per micro-batch ÷ tp (sequence parallel),
  × the chunks in flight on the busiest rank (DualPipe table: PP for 1F1B, PP+1 for DualPipe).
  FP8 caches GEMM and SwiGLU inputs at 1 byte + a scale per 128 (V3 §3.3.3); selective recompute drops norm outputs, MLA
  up-projections and SwiGLU products; full recompute keeps only each layer's input plus one layer's
  working set.
- logits: the rank holding the LM head keeps one micro-batch of FP32 logits (×(1 + MTP modules)).
- reserve: CUDA context, communication buffers and allocator fragmentation, a fixed `reserved_gib`.
All sizes are GiB (2^30 bytes); vendors' HBM capacities ("80 GB") are binary, so they compare directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from frugalm.plan.arch import LayerShape, ModelShape
from frugalm.plan.layout import DTYPE_BYTES, FP8_BYTES, LayoutConfig
from frugalm.plan.pipeline import in_flight_chunks, num_stages, rank_stages, split_layers

GIB = 2.0 ** 30

FORMULAS = {
    "model_states": "ZeRO (Rajbhandari et al. 2020): P*(b_weight + b_grad + b_master + 2*b_moment); ZeRO-1/2/3 shard "
                    "optimizer / +grads / +weights over dp (experts over dp*tp/ep after EP sharding)",
    "activations": "per-layer saved elements (frugalm.plan.arch, FlashAttention: no s^2 term) x micro-batch tokens / tp "
                   "x in-flight chunks (DualPipe table: PP for 1F1B, PP+1 for DualPipe)",
    "logits": "FP32 logits of one micro-batch on the rank holding the LM head (and MTP heads)",
    "reserve": "fixed per-GPU reserve: CUDA context, communication buffers, fragmentation",
}


@dataclass(frozen=True)
class StageContents:
    """What one pipeline stage holds: layer indices and whether it carries the embedding / head / MTP."""

    layers: tuple[int, ...]
    first: bool
    last: bool


def stages_of(shape: ModelShape, schedule: str, pp: int) -> list[StageContents]:
    n = num_stages(schedule, pp) if pp > 1 else 1
    ranges = split_layers(shape.n_layers, n)
    return [StageContents(tuple(r), i == 0, i == n - 1) for i, r in enumerate(ranges)]


def stage_params(shape: ModelShape, stage: StageContents) -> tuple[float, float]:
    """(dense, expert) parameters of a stage; MTP modules sit with the head, as DeepSeek places them."""
    dense = sum(shape.layers[i].dense_params for i in stage.layers)
    expert = sum(shape.layers[i].expert_params for i in stage.layers)
    if stage.first:
        dense += shape.embed_params
    if stage.last:
        dense += shape.head_params + shape.final_norm_params
        for m in shape.mtp:
            dense += m.dense_params + shape.mtp_extra_params
            expert += m.expert_params
    return dense, expert


def layer_activation_bytes(layer: LayerShape, layout: LayoutConfig, hidden: int) -> float:
    """Bytes saved for backward per token of one layer under the layout's recompute and precision."""
    g = FP8_BYTES if layout.precision == "fp8" else 2.0
    if layout.recompute == "full":
        return 2.0 * hidden
    lowp, other = layer.act_lowp, layer.act_other
    if layout.recompute == "selective":
        lowp -= layer.act_lowp_selective
        other -= layer.act_other_selective
    return lowp * g + other * 2.0


def _full_working_set(layer: LayerShape, layout: LayoutConfig) -> float:
    g = FP8_BYTES if layout.precision == "fp8" else 2.0
    return layer.act_lowp * g + layer.act_other * 2.0


@dataclass
class MemoryEstimate:
    """Memory of the fullest GPU of the layout (GiB)."""

    rank: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    reserved_gib: float
    total_gib: float
    params_local: float  # parameters whose weights this rank keeps (before ZeRO-3 sharding)
    in_flight_chunks: float

    def to_dict(self) -> dict:
        return {**asdict(self), "formulas": FORMULAS}


_PROBES = {(rc, pr): LayoutConfig(recompute=rc, precision=pr) for rc in ("none", "selective", "full") for pr in ("bf16", "fp8")}


@dataclass(frozen=True)
class RankLoad:
    """What one pipeline rank holds, per token of one micro-batch, before the TP split."""

    dense_params: float
    expert_params: float
    act_bytes: dict  # (recompute, precision) -> saved bytes per token, summed over the rank's stage chunks
    working: dict  # precision -> one layer's full activations per token (full recompute's working set)
    logits_per_token: float  # FP32 logit bytes per token when the rank holds the head (and MTP heads)
    held: int  # stage chunks on the rank


def rank_loads(shape: ModelShape, schedule: str, pp: int) -> list[RankLoad]:
    """Per-rank parameters and activation bytes for every recompute/precision choice at once."""
    sched = schedule if pp > 1 else "1f1b"
    stages = stages_of(shape, sched, pp)
    out = []
    for held in rank_stages(sched, pp):
        dense = expert = logits = 0.0
        act = {key: 0.0 for key in _PROBES}
        working = {"bf16": 0.0, "fp8": 0.0}
        for s in held:
            st = stages[s]
            d, e = stage_params(shape, st)
            dense, expert = dense + d, expert + e
            layers = [shape.layers[i] for i in st.layers] + (list(shape.mtp) if st.last else [])
            for key, probe in _PROBES.items():
                act[key] += sum(layer_activation_bytes(l, probe, shape.hidden) for l in layers)
            for pr in working:
                if layers:
                    working[pr] = max(working[pr], max(_full_working_set(l, _PROBES[("none", pr)]) for l in layers))
            if st.last:
                logits += shape.vocab * 4.0 * (1 + len(shape.mtp))
        out.append(RankLoad(dense, expert, act, working, logits, len(held)))
    return out


def memory_from_loads(
    loads: list[RankLoad], layout: LayoutConfig, seq_len: int, micro_batches: int, reserved_gib: float = 3.0
) -> MemoryEstimate:
    """The fullest rank's memory under `layout` (dp resolved), from `rank_loads` of its schedule and pp."""
    b_w, b_g = DTYPE_BYTES[layout.param_dtype], DTYPE_BYTES[layout.grad_dtype]
    b_opt = (0 if layout.master_dtype == "none" else DTYPE_BYTES[layout.master_dtype]) + 2 * DTYPE_BYTES[layout.optimizer_dtype]
    dp, edp = layout.dp, layout.expert_dp
    schedule = layout.schedule if layout.pp > 1 else "1f1b"
    tokens = layout.micro_batch * seq_len / layout.tp
    best: MemoryEstimate | None = None
    for rank, load in enumerate(loads):
        dense, expert = load.dense_params / layout.tp, load.expert_params / layout.ep
        if schedule in ("1f1b", "zb1p"):
            chunks = float(min(layout.pp - rank, micro_batches))
        else:
            chunks = in_flight_chunks(schedule, layout.pp, micro_batches) / load.held
        activations = chunks * tokens * load.act_bytes[(layout.recompute, layout.precision)]
        if layout.recompute == "full":
            activations += tokens * load.working[layout.precision]
        logits = tokens * load.logits_per_token
        weights = b_w * (dense / (dp if layout.zero >= 3 else 1) + expert / (edp if layout.zero >= 3 else 1))
        grads = b_g * (dense / (dp if layout.zero >= 2 else 1) + expert / (edp if layout.zero >= 2 else 1))
        opt = b_opt * (dense / (dp if layout.zero >= 1 else 1) + expert / (edp if layout.zero >= 1 else 1))
        total = (weights + grads + opt + activations + logits) / GIB + reserved_gib
        if best is None or total > best.total_gib:
            best = MemoryEstimate(
                rank=rank, weights_gib=weights / GIB, grads_gib=grads / GIB, optimizer_gib=opt / GIB,
                activations_gib=activations / GIB, logits_gib=logits / GIB, reserved_gib=reserved_gib,
                total_gib=total, params_local=dense + expert, in_flight_chunks=chunks * load.held,
            )
    assert best is not None
    return best


def memory_per_gpu(
    shape: ModelShape, layout: LayoutConfig, seq_len: int, micro_batches: int, reserved_gib: float = 3.0
) -> MemoryEstimate:
    """Memory of every pipeline rank under `layout` (dp already resolved); returns the fullest one."""
    return memory_from_loads(rank_loads(shape, layout.schedule, layout.pp), layout, seq_len, micro_batches, reserved_gib)
