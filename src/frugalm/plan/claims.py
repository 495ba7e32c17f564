"""Checking a published training run: the MFU its GPU-hours imply, its cost, and a re-plan that must agree.

"How accurate are the cost estimates?" reduces to arithmetic anyone can redo: FLOPs = tokens × FLOPs
per token (by 6·N·D, with the attention term, or by the detailed count), achieved = FLOPs / GPU-seconds,
MFU = achieved / dense BF16 peak. A run that implies an implausible MFU is the red flag; DeepSeek-V3
(34.6% by 6ND) and Llama 3.1 405B (34.5%) sit side by side, so V3's ~11x fewer GPU-hours per token come
from 37B vs 405B active parameters, not from extraordinary utilisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from frugalm.plan.chips import Catalogue, load_catalogue
from frugalm.plan.errors import PlanError
from frugalm.plan.flops import training_flops_per_token
from frugalm.plan.models import load_presets, resolve_model
from frugalm.plan.planner import PlanConfig, plan_run


@dataclass
class StageClaim:
    name: str
    gpu_hours: float
    tokens: Optional[float] = None
    seq_len: Optional[int] = None


@dataclass
class ClaimPreset:
    key: str
    title: str
    model: str
    gpu: str
    count: int
    n_active: Optional[float]
    price_usd_per_hour: Optional[float]
    source: str
    stages: list[StageClaim]


def claim_presets() -> dict[str, ClaimPreset]:
    out = {}
    for key, c in load_presets().get("claims", {}).items():
        out[key] = ClaimPreset(
            key=key, title=c["title"], model=c["model"], gpu=c["gpu"], count=int(c.get("count", 0)),
            n_active=c.get("n_active"), price_usd_per_hour=c.get("price_usd_per_hour"), source=c["source"],
            stages=[StageClaim(**s) for s in c["stages"]],
        )
    return out


@dataclass
class StageCheck:
    name: str
    gpu_hours: float
    cost_usd: Optional[float]
    tokens: Optional[float] = None
    seq_len: Optional[int] = None
    mfu_6nd: Optional[float] = None
    mfu_with_attention: Optional[float] = None
    mfu_detailed: Optional[float] = None
    mfu_6nd_of_fp8_peak: Optional[float] = None
    achieved_tflops_per_gpu_6nd: Optional[float] = None
    tokens_per_s_per_gpu: Optional[float] = None
    gpu_hours_per_trillion_tokens: Optional[float] = None
    days_on_cluster: Optional[float] = None
    replanned_gpu_hours: Optional[float] = None
    replanned_cost_usd: Optional[float] = None


@dataclass
class ClaimCheck:
    """`to_dict()` is the `plan claim --json` object; the headline MFUs are those of the first stage with tokens."""

    preset: str
    title: str
    source: str
    gpu: str
    chip_name: str
    count: int
    peak_tflops_bf16: float
    price_usd_per_hour: Optional[float]
    price_source: str
    stages: list[StageCheck]
    total_gpu_hours: float
    cost_usd: Optional[float]
    mfu_6nd: Optional[float]
    mfu_with_attention: Optional[float]
    mfu_detailed: Optional[float]
    replanned_total_gpu_hours: Optional[float]
    replanned_cost_usd: Optional[float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["stages"] = [dict(s.__dict__) for s in self.stages]
        return d


def check_claim(preset: str, catalogue: Optional[Catalogue] = None) -> ClaimCheck:
    """Implied MFUs and cost of a published run, then the planner re-run at those MFUs (it must agree)."""
    presets = claim_presets()
    if preset.lower() not in presets:
        raise PlanError(f"unknown claim preset {preset!r}; known: {', '.join(sorted(presets))}")
    p = presets[preset.lower()]
    catalogue = catalogue or load_catalogue()
    chip = catalogue.get(p.gpu)
    model = resolve_model(p.model)
    peak = chip.peak_tflops("bf16") * 1e12
    price = p.price_usd_per_hour if p.price_usd_per_hour is not None else chip.price_usd_per_hour
    price_source = "the claim's own assumption" if p.price_usd_per_hour is not None else chip.sources.get("price", "")
    notes: list[str] = []
    if p.price_usd_per_hour is None:
        notes.append(
            f"cost uses the catalogue's {chip.key} rental price ({chip.price_date}), not the owner's cost" if price
            else f"no price for {chip.key}: cost not computed"
        )
    stages = []
    for s in p.stages:
        check = StageCheck(name=s.name, gpu_hours=s.gpu_hours, cost_usd=s.gpu_hours * price if price else None,
                           tokens=s.tokens, seq_len=s.seq_len)
        if s.tokens:
            seq = s.seq_len or model.seq_len or 4096
            seconds = s.gpu_hours * 3600.0
            f6 = training_flops_per_token(model.shape, seq, "6nd", n_active=p.n_active)
            fa = training_flops_per_token(model.shape, seq, "6nd+attention", n_active=p.n_active)
            fd = training_flops_per_token(model.shape, seq, "detailed")
            check.mfu_6nd = f6 * s.tokens / seconds / peak
            check.mfu_with_attention = fa * s.tokens / seconds / peak
            check.mfu_detailed = fd * s.tokens / seconds / peak
            if chip.has("fp8"):
                check.mfu_6nd_of_fp8_peak = f6 * s.tokens / seconds / (chip.peak_tflops("fp8") * 1e12)
            check.achieved_tflops_per_gpu_6nd = f6 * s.tokens / seconds / 1e12
            check.tokens_per_s_per_gpu = s.tokens / seconds
            check.gpu_hours_per_trillion_tokens = s.gpu_hours / (s.tokens / 1e12)
            if p.count:
                check.days_on_cluster = s.gpu_hours / p.count / 24.0
                # The planner, given the implied (detailed) MFU, must land on the published GPU-hours.
                replan = plan_run(
                    PlanConfig(model=p.model, tokens=s.tokens, gpu=p.gpu, count=p.count, seq_len=seq,
                               mfu=min(check.mfu_detailed, 1.0), flops_method="detailed",
                               price_usd_per_hour=p.price_usd_per_hour,
                               layout="published" if model.layout else "auto"),
                    catalogue=catalogue, model=model,
                )
                check.replanned_gpu_hours = replan.gpu_hours
                check.replanned_cost_usd = replan.cost_usd
        stages.append(check)
    head = next((s for s in stages if s.tokens), None)
    total_h = sum(s.gpu_hours for s in stages)
    replanned_total = None
    replanned_cost = None
    if head is not None and head.replanned_gpu_hours is not None:
        replanned_total = total_h - head.gpu_hours + head.replanned_gpu_hours
        replanned_cost = replanned_total * price if price else None
    return ClaimCheck(
        preset=p.key, title=p.title, source=p.source, gpu=chip.key, chip_name=chip.name, count=p.count,
        peak_tflops_bf16=peak / 1e12, price_usd_per_hour=price, price_source=price_source, stages=stages,
        total_gpu_hours=total_h, cost_usd=total_h * price if price else None,
        mfu_6nd=head.mfu_6nd if head else None, mfu_with_attention=head.mfu_with_attention if head else None,
        mfu_detailed=head.mfu_detailed if head else None, replanned_total_gpu_hours=replanned_total,
        replanned_cost_usd=replanned_cost, notes=notes,
    )
