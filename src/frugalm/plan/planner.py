"""The planner: tokens, model and fleet in; FLOPs, GPU-hours, days, dollars, energy, memory, comm out.

Two ways to state speed, because published runs and first-principles estimates need different ones:
- `mfu` (default 0.35, about what DeepSeek-V3 and Llama 3.1 405B imply by 6·N·D): the whole-run model
  FLOP utilisation against the dense BF16 peak. GPU-hours = total FLOPs / (peak · mfu). The step model
  below then says what that MFU demands: the compute efficiency needed once the pipeline bubble and the
  exposed communication of the chosen layout are paid, or that the fleet cannot reach it at all.
- `efficiency`: the fraction of peak the GPUs reach while computing (GEMMs at the FP8 peak with an FP8
  layout, attention core at BF16). Step time = compute + bubble + exposed communication, and the MFU
  and GPU-hours follow: this is how a slower interconnect (H800) or a slower chip (H20) shows up.
Without a layout the planner searches pp, ep, tp, schedule, ZeRO stage and recompute for the fastest
layout that fits in memory; `--layout k=v,...` fixes some of them and `--layout published` uses the
preset's published layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from frugalm.config import ConfigError
from frugalm.plan.arch import ModelShape
from frugalm.plan.chips import Catalogue, Chip, load_catalogue
from frugalm.plan.comm import CommConfig, CommEstimate, step_comm
from frugalm.plan.errors import PlanError
from frugalm.plan.flops import FLOPS_METHODS, flop_breakdown, mean_context, training_flops_per_token
from frugalm.plan.layout import LAYOUT_KEYS, LayoutConfig, make_layout, resolve_layout
from frugalm.plan.memory import MemoryEstimate, RankLoad, memory_from_loads, rank_loads, stages_of
from frugalm.plan.models import ResolvedModel, resolve_model
from frugalm.plan.pipeline import chunk_visits, pipeline_bubble, rank_stages, stage_share
from frugalm.plan.rules import classify

DEFAULT_MFU = 0.35
# Layout keys that the search varies; a layout that fixes them all is evaluated as given.
_STRUCTURAL = frozenset({"pp", "tp", "ep", "schedule", "zero", "recompute"})
DEFAULT_SEQ_LEN = 4096
DEFAULT_BATCH_TOKENS = 4 * 2 ** 20  # when neither the preset nor the user gives a batch
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_amount(text: Union[str, float, int], what: str = "tokens") -> float:
    """'14.8T' -> 1.48e13; also 300B, 2.5M, 15k, 1e12, 2_000_000."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = re.fullmatch(r"\s*([0-9][0-9_]*\.?[0-9]*(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgGtTpP]?)\s*", str(text))
    if not m:
        raise PlanError(f"cannot read {what} {text!r}: use a number with an optional k/M/B/T suffix, e.g. 14.8T")
    return float(m.group(1).replace("_", "")) * _SUFFIX.get(m.group(2).lower(), 1.0)


@dataclass
class PlanConfig:
    """`[plan]`: what to train on which fleet, and how fast it is assumed to run."""

    model: str = ""
    tokens: Union[float, str] = 0.0
    gpu: str = "h800"
    count: int = 0
    seq_len: int = 0  # 0: the model's (preset or run config), else 4096
    global_batch: int = 0  # sequences per optimizer step; 0: the preset's, else ~4M tokens
    mfu: Optional[float] = None  # whole-run MFU vs dense BF16 peak (default 0.35 when efficiency is unset)
    efficiency: Optional[float] = None  # fraction of peak while computing; the step model then predicts MFU
    flops_method: str = "detailed"  # detailed | 6nd | 6nd+attention: what MFU counts as model FLOPs
    n_active: Optional[float] = None  # override N for the 6nd methods (e.g. a paper's rounded 37e9)
    include_mtp: bool = True
    layout: str = "auto"  # auto (search) | published (the preset's layout)
    price_usd_per_hour: Optional[float] = None  # default: the catalogue's typical price
    pue: float = 1.0  # energy = chip TDP x hours x pue
    gpus_per_node: int = 0  # 0: the chip's scale-up domain
    reserved_gib: float = 3.0  # per-GPU memory kept for CUDA context, comm buffers, fragmentation
    chips: list[str] = field(default_factory=list)  # extra chip catalogue files

    def __post_init__(self) -> None:
        self.tokens = parse_amount(self.tokens) if self.tokens not in ("", None) else 0.0
        problems = []
        if self.mfu is not None and not 0 < self.mfu <= 1:
            problems.append(f"mfu must be in (0, 1] (got {self.mfu})")
        if self.efficiency is not None and not 0 < self.efficiency <= 1:
            problems.append(f"efficiency must be in (0, 1] (got {self.efficiency})")
        if self.mfu is not None and self.efficiency is not None:
            problems.append("give mfu or efficiency, not both")
        if self.flops_method not in FLOPS_METHODS:
            problems.append(f"flops_method must be one of {', '.join(FLOPS_METHODS)}")
        if self.layout not in ("auto", "published"):
            problems.append("plan.layout must be auto or published (put explicit values in [layout])")
        for name in ("count", "seq_len", "global_batch", "gpus_per_node"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.tokens < 0:
            problems.append("tokens must be >= 0")
        if self.pue < 1:
            problems.append("pue must be >= 1")
        if problems:
            raise ConfigError("invalid [plan]: " + "; ".join(problems))


@dataclass
class PlanResult:
    """Everything a plan reports; `to_dict()` is the `--json` object."""

    model: str
    model_source: str
    chip: str
    chip_name: str
    count: int
    tokens: float
    seq_len: int
    global_batch: int
    tokens_per_step: float
    steps: float
    flops_method: str
    flops_per_token: float
    total_flops: float
    forward_flops_breakdown: dict[str, float]  # per token, forward only, by op class
    n_active: float
    mode: str
    mfu: float
    busy_efficiency: Optional[float]
    peak_tflops_bf16: float
    gemm_precision: str
    gpu_hours: float
    days: float
    cost_usd: Optional[float]
    cost_range_usd: Optional[list[float]]
    price_usd_per_hour: Optional[float]
    price_date: Optional[str]
    price_source: str
    energy_mwh: float
    memory_per_gpu_gb: float
    hbm_gb: float
    fits: bool
    memory: dict[str, Any]
    layout: dict[str, Any]
    layout_mode: str
    micro_batches: int
    compute_seconds_per_step: Optional[float]
    bubble_seconds_per_step: Optional[float]
    bubble_fraction: float
    comm_seconds_per_step: float
    comm_exposed_seconds_per_step: Optional[float]
    step_seconds: float
    comm_hidden: bool
    comm: dict[str, Any]
    export: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- per-rank tables


@dataclass
class _RankTable:
    """One pipeline rank's memory load and its FLOPs per token of its DP replica (stage shares applied)."""

    load: RankLoad
    gemm_fwd: float  # forward GEMM FLOPs per token
    core_fwd: float
    recompute_fwd: dict[str, float]  # recompute mode -> extra forward FLOPs per token
    moe_visits: float
    layer_visits: float


def _rank_tables(shape: ModelShape, schedule: str, pp: int, seq_len: int) -> list[_RankTable]:
    sched = schedule if pp > 1 else "1f1b"
    stages = stages_of(shape, sched, pp)
    share = stage_share(sched) if pp > 1 else 1.0
    ctx = mean_context(seq_len)
    tables = []
    for held, load in zip(rank_stages(sched, pp), rank_loads(shape, sched, pp)):
        gemm = core = moe = nl = 0.0
        rec = {"none": 0.0, "selective": 0.0, "full": 0.0}
        for s in held:
            st = stages[s]
            layers = [shape.layers[i] for i in st.layers] + (list(shape.mtp) if st.last else [])
            g = sum(2.0 * l.gemm_macs for l in layers)
            c = sum(2.0 * l.attn_macs_per_key * ctx for l in layers)
            if st.last:
                g += 2.0 * shape.head_macs * (1 + len(shape.mtp)) + 2.0 * shape.mtp_extra_macs * len(shape.mtp)
            gemm += share * g
            core += share * c
            rec["selective"] += share * sum(2.0 * l.recompute_macs for l in layers)
            rec["full"] += share * (g + c)
            moe += share * sum(1 for l in layers if l.moe)
            nl += share * len(layers)
        tables.append(_RankTable(load, gemm, core, rec, moe, nl))
    return tables


# --------------------------------------------------------------------------- evaluation of one layout


def _distinct(tables: list[_RankTable]) -> list[_RankTable]:
    """Ranks with different communication loads (most ranks of a deep pipeline are identical)."""
    seen, out = set(), []
    for t in tables:
        key = (round(t.moe_visits, 6), round(t.layer_visits, 6), round(t.load.dense_params), round(t.load.expert_params))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


@dataclass
class _Eval:
    layout: LayoutConfig
    micro: int
    memory: MemoryEstimate
    comm: CommEstimate
    rank: int
    time_at_peak: float  # busy seconds per step at 100% efficiency on the busiest rank
    beta: float  # bubble / busy time
    bwd_share: float
    ep_hidden: bool

    def exposed(self, c: float) -> float:
        # DualPipe hides the all-to-all and the pipeline sends under the paired chunk's compute (V3 §3.2.1)
        if self.ep_hidden:
            hideable = self.comm.ep_s + self.comm.pp_s
            visible = max(0.0, hideable - c)
        else:
            visible = self.comm.ep_s + self.comm.pp_s
        # Data-parallel traffic overlaps with compute it does not depend on: ZeRO-0/1 reduce the gradients
        # once, under the last micro-batch's backward; ZeRO-2 reduce-scatters under every backward; ZeRO-3
        # also prefetches weights, so it can hide under all of the compute.
        bwd = c * self.bwd_share
        if self.layout.zero <= 1:
            window = bwd / max(self.micro * chunk_visits(self.layout.schedule), 1)
        elif self.layout.zero == 2:
            window = bwd
        else:
            window = c
        return visible + max(0.0, self.comm.dp_s - window) + self.comm.tp_s

    def step(self, c: float) -> float:
        return c * (1 + self.beta) + self.exposed(c)

    def solve_compute(self, step_s: float) -> Optional[float]:
        """Busy compute time c with step(c) = step_s (the largest, i.e. the least demanding); None if none."""
        if self.step(1e-12 * step_s) >= step_s:
            return None
        n = 256
        grid = [step_s * (i + 1) / n for i in range(n)]
        lo = 0.0
        for c in grid:
            if self.step(c) < step_s:
                lo = c
        hi = min(lo + step_s / n, step_s)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if self.step(mid) < step_s:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)


class _Context:
    """What every candidate layout of one plan shares."""

    def __init__(self, cfg: PlanConfig, model: ResolvedModel, chip: Chip, comm: CommConfig) -> None:
        self.cfg, self.model, self.chip, self.comm = cfg, model, chip, comm
        self.shape = model.shape
        self.count = cfg.count
        self.gpn = cfg.gpus_per_node or chip.scale_up_domain
        self.seq_len = cfg.seq_len or model.seq_len or DEFAULT_SEQ_LEN
        self.global_batch = cfg.global_batch or model.global_batch or max(1, round(DEFAULT_BATCH_TOKENS / self.seq_len))
        self.peak_bf16 = chip.peak_tflops("bf16") * 1e12
        self.tables: dict[tuple[str, int], tuple[list[_RankTable], list[_RankTable]]] = {}

    def rank_tables(self, schedule: str, pp: int) -> tuple[list[_RankTable], list[_RankTable]]:
        """All ranks' tables, and one per distinct communication load."""
        key = (schedule if pp > 1 else "1f1b", pp)
        if key not in self.tables:
            tables = _rank_tables(self.shape, key[0], pp, self.seq_len)
            self.tables[key] = (tables, _distinct(tables))
        return self.tables[key]

    def evaluate(self, layout: LayoutConfig) -> _Eval:
        lay, micro = resolve_layout(layout, self.shape, self.count, self.gpn, self.global_batch)
        if lay.precision == "fp8" and not self.chip.has("fp8"):
            raise PlanError(f"chip {self.chip.key!r} has no FP8 peak; use precision=bf16")
        sched = lay.schedule if lay.pp > 1 else "1f1b"
        tables, distinct = self.rank_tables(sched, lay.pp)
        memory = memory_from_loads([t.load for t in tables], lay, self.seq_len, micro, self.cfg.reserved_gib)
        peak_gemm = self.chip.peak_tflops(lay.precision) * 1e12
        tokens_replica = micro * lay.micro_batch * self.seq_len
        tokens_rank = tokens_replica / lay.tp
        best_rank, best_t = 0, -1.0
        for r, t in enumerate(tables):
            rec = t.recompute_fwd[lay.recompute]
            rec_core = t.core_fwd if lay.recompute == "full" else 0.0
            gemm_hw = 3 * t.gemm_fwd + rec - rec_core
            core_hw = 3 * t.core_fwd + rec_core
            secs = tokens_rank * (gemm_hw / peak_gemm + core_hw / self.peak_bf16)
            if secs > best_t:
                best_rank, best_t = r, secs
        t = tables[best_rank]
        fwd = t.gemm_fwd + t.core_fwd
        r_rec = t.recompute_fwd[lay.recompute] / fwd if fwd else 0.0
        visits = chunk_visits(sched)
        beta = 0.0
        if lay.pp > 1:
            unit = 1.0 / (micro * visits * (3 + r_rec))
            bubble = pipeline_bubble(sched, lay.pp, micro, unit, (2 + r_rec) * unit, unit)
            beta = bubble  # busy time is 1 in these units
        # Communication of the rank that moves the most (it need not be the one that computes the most).
        comm = max(
            (step_comm(
                self.shape, lay, self.chip, self.comm, gpus_per_node=self.gpn, tokens_per_replica=tokens_replica,
                moe_layer_visits=rt.moe_visits, layer_visits=rt.layer_visits, micro_batches=micro,
                chunk_visits=visits, seq_len=self.seq_len, dense_params_local=rt.load.dense_params / lay.tp,
                expert_params_local=rt.load.expert_params / lay.ep,
            ) for rt in distinct),
            key=lambda ce: ce.total_s,
        )
        overlap = self.comm.ep_overlap
        ep_hidden = overlap == "full" or (overlap == "auto" and sched in ("dualpipe", "dualpipev") and lay.pp > 1)
        return _Eval(lay, micro, memory, comm, best_rank, best_t, beta, (2 + r_rec) / (3 + r_rec), ep_hidden)


# --------------------------------------------------------------------------- layout search


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def _candidates(ctx: _Context, fixed: dict[str, Any]) -> list[LayoutConfig]:
    shape, count = ctx.shape, ctx.count
    base = {k: v for k, v in fixed.items()}
    tps = [fixed["tp"]] if "tp" in fixed else (
        [1] if shape.is_moe else [t for t in _powers_of_two(min(ctx.gpn, 8)) if shape.heads % t == 0]
    )
    out = []
    for tp in tps:
        if count % tp:
            continue
        pps = [fixed["pp"]] if "pp" in fixed else [p for p in _powers_of_two(min(shape.n_layers, count // tp)) if (count // tp) % p == 0]
        for pp in pps:
            dp = fixed.get("dp") or (count // (tp * pp) if count % (tp * pp) == 0 else 0)
            if not dp:
                continue
            if "ep" in fixed:
                eps = [fixed["ep"]]
            elif shape.is_moe:
                eps = [e for e in _powers_of_two(min(shape.n_routed_experts, dp * tp))
                       if shape.n_routed_experts % e == 0 and (dp * tp) % e == 0]
            else:
                eps = [1]
            scheds = [fixed["schedule"]] if "schedule" in fixed else (
                ["1f1b"] if pp == 1 else ["1f1b", "zb1p", "dualpipe", "dualpipev"]
            )
            zeros = [fixed["zero"]] if "zero" in fixed else ([1, 2, 3] if dp > 1 else [0])
            recs = [fixed["recompute"]] if "recompute" in fixed else ["none", "selective", "full"]
            for ep in eps:
                for sched in scheds:
                    for zero in zeros:
                        for rec in recs:
                            values = dict(base, tp=tp, pp=pp, dp=dp, ep=ep, schedule=sched, zero=zero, recompute=rec)
                            try:
                                out.append(LayoutConfig(**values))
                            except (ConfigError, TypeError):
                                continue
    return out


def _search(ctx: _Context, fixed: dict[str, Any], busy_eff: float) -> _Eval:
    tried = fits = 0
    best: Optional[tuple[tuple, _Eval]] = None
    smallest: Optional[_Eval] = None
    reasons: dict[str, int] = {}
    hbm = ctx.chip.hbm_gb
    for lay in _candidates(ctx, fixed):
        tried += 1
        try:
            ev = ctx.evaluate(lay)
        except PlanError as e:
            key = str(e).split(": ", 1)[-1][:120]
            reasons[key] = reasons.get(key, 0) + 1
            continue
        if smallest is None or ev.memory.total_gib < smallest.memory.total_gib:
            smallest = ev
        if ev.memory.total_gib > hbm:
            continue
        fits += 1
        step = ev.step(ev.time_at_peak / busy_eff)
        rec_rank = ("none", "selective", "full").index(ev.layout.recompute)
        key = (round(step, 9), ev.layout.pp, ev.layout.zero, rec_rank, ev.layout.ep)
        if best is None or key < best[0]:
            best = (key, ev)
    if best is not None:
        return best[1]
    if smallest is not None:
        m = smallest.memory
        raise PlanError(
            f"the model does not fit on {ctx.count} x {ctx.chip.key} ({hbm:g} GiB each) with any of {tried} layouts "
            f"searched: the smallest needs {m.total_gib:.1f} GiB per GPU ({smallest.layout.describe()}: "
            f"weights {m.weights_gib:.1f}, grads {m.grads_gib:.1f}, optimizer {m.optimizer_gib:.1f}, "
            f"activations {m.activations_gib:.1f}, logits {m.logits_gib:.1f}, reserve {m.reserved_gib:.1f}). "
            "Use more GPUs, a chip with more memory, or fix fewer layout keys."
        )
    why = "; ".join(sorted(reasons, key=reasons.get, reverse=True)[:3]) or "no candidate layouts"
    raise PlanError(f"no possible layout for {ctx.count} x {ctx.chip.key} with {fixed or 'no fixed keys'}: {why}")


# --------------------------------------------------------------------------- the plan


def plan_run(
    cfg: PlanConfig,
    layout: Union[LayoutConfig, dict[str, Any], None] = None,
    comm: Optional[CommConfig] = None,
    catalogue: Optional[Catalogue] = None,
    model: Optional[ResolvedModel] = None,
) -> PlanResult:
    """Plan one run. `layout`: a LayoutConfig (fixed), a dict of the keys to fix (the rest searched), or None."""
    catalogue = catalogue or load_catalogue(cfg.chips)
    chip = catalogue.get(cfg.gpu)
    model = model or resolve_model(cfg.model)
    comm = comm or CommConfig()
    if cfg.count <= 0:
        raise PlanError("the GPU count must be given and > 0 (--count)")
    if cfg.tokens <= 0:
        raise PlanError("the number of training tokens must be given and > 0 (--tokens, e.g. 14.8T)")
    ctx = _Context(cfg, model, chip, comm)
    warnings: list[str] = []
    mode = "efficiency" if cfg.efficiency is not None else "mfu"
    mfu_in = cfg.mfu if cfg.mfu is not None else (None if mode == "efficiency" else DEFAULT_MFU)
    if mode == "mfu" and cfg.mfu is None:
        warnings.append(f"no --mfu or --efficiency given: assumed MFU {DEFAULT_MFU:.0%} (DeepSeek-V3 and Llama 3.1 405B both imply ~34.5% by 6ND)")

    layout_mode = "auto"
    fixed: dict[str, Any] = {}
    if isinstance(layout, LayoutConfig):
        layout_mode, fixed = "explicit", layout.to_dict()
    elif layout:
        layout_mode, fixed = "partial", {k: v for k, v in layout.items()}
        unknown = [k for k in fixed if k not in LAYOUT_KEYS]
        if unknown:
            raise PlanError(f"unknown layout key(s) {', '.join(unknown)}; valid keys: {', '.join(LAYOUT_KEYS)}")
    if cfg.layout == "published":
        if not model.layout:
            raise PlanError(f"model {model.name!r} has no published layout; use --layout auto or give one")
        layout_mode, fixed = "published", {**model.layout, **fixed}

    busy_guess = cfg.efficiency or mfu_in
    if layout_mode in ("explicit", "published") or set(fixed) >= _STRUCTURAL:
        if layout_mode == "partial":
            layout_mode = "explicit"
        ev = ctx.evaluate(make_layout(fixed))
        if ev.memory.total_gib > chip.hbm_gb:
            m = ev.memory
            raise PlanError(
                f"does not fit: layout {ev.layout.describe()} needs {m.total_gib:.1f} GiB per GPU on rank {m.rank} "
                f"but {chip.key} has {chip.hbm_gb:g} GiB (weights {m.weights_gib:.1f}, grads {m.grads_gib:.1f}, "
                f"optimizer {m.optimizer_gib:.1f}, activations {m.activations_gib:.1f}, logits {m.logits_gib:.1f}, "
                f"reserve {m.reserved_gib:.1f}). Try more pp/ep, zero=2 or 3, recompute=selective or full, or more GPUs."
            )
    else:
        ev = _search(ctx, fixed, busy_guess)

    lay = ev.layout
    tokens_per_step = ev.micro * lay.micro_batch * lay.dp * ctx.seq_len
    if ev.micro * lay.micro_batch * lay.dp != ctx.global_batch:
        warnings.append(
            f"global batch rounded up from {ctx.global_batch} to {ev.micro * lay.micro_batch * lay.dp} sequences "
            f"({ev.micro} micro-batches of {lay.micro_batch} per data-parallel replica)"
        )
    fpt = training_flops_per_token(model.shape, ctx.seq_len, cfg.flops_method, include_mtp=cfg.include_mtp, n_active=cfg.n_active)
    total_flops = fpt * cfg.tokens
    step_model_flops = fpt * tokens_per_step
    steps = cfg.tokens / tokens_per_step

    if mode == "mfu":
        step_s = step_model_flops / (ctx.count * ctx.peak_bf16 * mfu_in)
        c = ev.solve_compute(step_s)
        mfu = mfu_in
        if c is None:
            busy = None
            warnings.append(
                f"communication alone ({ev.exposed(0.0):.3g} s/step exposed) exceeds the {step_s:.3g} s step that "
                f"MFU {mfu:.1%} allows on this fleet: that MFU is not reachable with layout {lay.describe()}"
            )
        else:
            busy = ev.time_at_peak / c
            if busy > 1:
                need = f"{busy:.0%}" if busy < 10 else "over 10x"
                warnings.append(f"MFU {mfu:.1%} needs the GPUs to compute at {need} of peak with this layout: not reachable")
    else:
        busy = cfg.efficiency
        c = ev.time_at_peak / busy
        step_s = ev.step(c)
        mfu = step_model_flops / (ctx.count * ctx.peak_bf16 * step_s)

    exposed = ev.exposed(c) if c is not None else None
    comm_hidden = exposed is not None and exposed <= 0.01 * step_s
    if exposed is not None and not comm_hidden:
        warnings.append(f"{exposed:.3g} s of communication per step is not hidden behind compute ({exposed / step_s:.0%} of the step)")

    gpu_hours = step_s * steps * ctx.count / 3600.0
    price = cfg.price_usd_per_hour if cfg.price_usd_per_hour is not None else chip.price_usd_per_hour
    price_source = "given" if cfg.price_usd_per_hour is not None else chip.sources.get("price", "")
    cost = gpu_hours * price if price is not None else None
    cost_range = None
    if cfg.price_usd_per_hour is None and chip.price_low is not None and chip.price_high is not None:
        cost_range = [gpu_hours * chip.price_low, gpu_hours * chip.price_high]
    if price is None:
        warnings.append(f"no public hourly price for {chip.key}: pass --price to get a cost")
    energy = gpu_hours * chip.tdp_w / 1e6 * cfg.pue  # MWh
    cls = classify(chip)

    return PlanResult(
        model=model.name, model_source=model.source, chip=chip.key, chip_name=chip.name, count=ctx.count,
        tokens=cfg.tokens, seq_len=ctx.seq_len, global_batch=ev.micro * lay.micro_batch * lay.dp,
        tokens_per_step=tokens_per_step, steps=steps, flops_method=cfg.flops_method, flops_per_token=fpt,
        total_flops=total_flops, forward_flops_breakdown=flop_breakdown(model.shape, ctx.seq_len).to_dict(),
        n_active=cfg.n_active or model.shape.n_active, mode=mode, mfu=mfu, busy_efficiency=busy,
        peak_tflops_bf16=ctx.peak_bf16 / 1e12, gemm_precision=lay.precision, gpu_hours=gpu_hours,
        days=step_s * steps / 86400.0, cost_usd=cost, cost_range_usd=cost_range, price_usd_per_hour=price,
        price_date=chip.price_date if cfg.price_usd_per_hour is None else None, price_source=price_source,
        energy_mwh=energy, memory_per_gpu_gb=ev.memory.total_gib, hbm_gb=chip.hbm_gb,
        fits=ev.memory.total_gib <= chip.hbm_gb, memory=ev.memory.to_dict(), layout=lay.to_dict(),
        layout_mode=layout_mode, micro_batches=ev.micro, compute_seconds_per_step=c,
        bubble_seconds_per_step=(c * ev.beta if c is not None else None),
        bubble_fraction=ev.beta / (1 + ev.beta), comm_seconds_per_step=ev.comm.total_s,
        comm_exposed_seconds_per_step=exposed, step_seconds=step_s, comm_hidden=comm_hidden,
        comm=ev.comm.to_dict(), export={"rule_2022": cls.rule_2022, "rule_2023": cls.rule_2023,
                                        "china_status": cls.china_status, "as_of": cls.as_of},
        warnings=warnings,
    )


def compare(
    cfg: PlanConfig, gpus: list[str], layout: Union[LayoutConfig, dict[str, Any], None] = None,
    comm: Optional[CommConfig] = None, catalogue: Optional[Catalogue] = None,
) -> list[Union[PlanResult, PlanError]]:
    """The same run on several fleets (same count); a fleet that cannot run it yields its PlanError."""
    catalogue = catalogue or load_catalogue(cfg.chips)
    model = resolve_model(cfg.model)
    for g in gpus:
        catalogue.get(g)  # an unknown chip is an input error for the whole comparison
    out: list[Union[PlanResult, PlanError]] = []
    for g in gpus:
        one = PlanConfig(**{**cfg.__dict__, "gpu": g})
        try:
            out.append(plan_run(one, layout, comm, catalogue, model))
        except PlanError as e:
            out.append(e)
    return out
