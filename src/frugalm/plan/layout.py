"""`LayoutConfig`: how a training run is split over GPUs, and the checks that make a layout possible.

World = dp × pp × tp. Expert parallelism is carved out of the dp × tp ranks (DeepSeek-V3: 2048 = 16 PP
× 128 DP with EP 64), so routed experts are sharded over `ep` and replicated dp·tp/ep times, while all
other weights are replicated dp times. Every field is a `[layout]` key or a `--layout k=v,...` item.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from frugalm.config import ConfigError, from_dict, parse_value
from frugalm.plan.arch import ModelShape
from frugalm.plan.errors import PlanError
from frugalm.plan.pipeline import SCHEDULES, check_schedule

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
RECOMPUTE = ("none", "selective", "full")
# One FP32 scale per 128 elements, DeepSeek's 1x128 activation tiles.
FP8_BYTES = 1 + 4 / 128


@dataclass
class LayoutConfig:
    """A parallel layout and the precisions of the model states."""

    dp: int = 0  # data-parallel degree; 0 = count / (pp * tp)
    tp: int = 1  # tensor parallel (with sequence parallel), inside one scale-up domain
    pp: int = 1  # pipeline ranks
    ep: int = 1  # expert parallel, carved out of dp * tp
    schedule: str = "1f1b"  # 1f1b | zb1p | dualpipe | dualpipev (ignored when pp == 1)
    micro_batch: int = 1  # sequences per micro-batch
    zero: int = 1  # ZeRO stage 0-3 over data parallel (3 = FSDP)
    precision: str = "bf16"  # GEMM input precision: bf16 | fp8 (FP8 also caches GEMM inputs in FP8)
    param_dtype: str = "bf16"  # working copy of the weights
    grad_dtype: str = "bf16"
    master_dtype: str = "fp32"  # fp32 | bf16 | none (no separate master copy)
    optimizer_dtype: str = "fp32"  # Adam first and second moments
    recompute: str = "none"  # none | selective | full

    def __post_init__(self) -> None:
        problems = []
        for name in ("tp", "pp", "ep", "micro_batch"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.dp < 0:
            problems.append(f"dp must be >= 0 (got {self.dp}; 0 means count / (pp*tp))")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.zero not in (0, 1, 2, 3):
            problems.append(f"zero must be 0, 1, 2 or 3 (got {self.zero})")
        if self.precision not in ("bf16", "fp8"):
            problems.append(f"precision must be bf16 or fp8 (got {self.precision!r})")
        for name in ("param_dtype", "grad_dtype", "optimizer_dtype"):
            if getattr(self, name) not in ("fp32", "bf16", "fp16"):
                problems.append(f"{name} must be fp32, bf16 or fp16 (got {getattr(self, name)!r})")
        if self.master_dtype not in ("fp32", "bf16", "none"):
            problems.append(f"master_dtype must be fp32, bf16 or none (got {self.master_dtype!r})")
        if self.recompute not in RECOMPUTE:
            problems.append(f"recompute must be one of {', '.join(RECOMPUTE)} (got {self.recompute!r})")
        if problems:
            raise ConfigError("invalid layout: " + "; ".join(problems))

    @property
    def expert_dp(self) -> int:
        return self.dp * self.tp // self.ep

    def describe(self) -> str:
        parts = [f"dp={self.dp}", f"pp={self.pp}", f"ep={self.ep}", f"tp={self.tp}"]
        if self.pp > 1:
            parts.append(f"schedule={self.schedule}")
        parts += [f"zero={self.zero}", f"precision={self.precision}", f"recompute={self.recompute}"]
        return ",".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


LAYOUT_KEYS = tuple(f.name for f in fields(LayoutConfig))


def parse_layout(text: str) -> dict[str, Any]:
    """`dp=128,ep=64,pp=16,schedule=dualpipe` -> {"dp": 128, ...} (values parsed as TOML, bare words kept)."""
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise PlanError(f"layout item {item!r} is not key=value (keys: {', '.join(LAYOUT_KEYS)})")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in LAYOUT_KEYS:
            raise PlanError(f"unknown layout key {key!r}; valid keys: {', '.join(LAYOUT_KEYS)}")
        out[key] = parse_value(value)
    return out


def make_layout(values: dict[str, Any]) -> LayoutConfig:
    try:
        return from_dict(LayoutConfig, values, "layout")
    except ConfigError as e:
        raise PlanError(str(e)) from None


def resolve_layout(
    layout: LayoutConfig, shape: ModelShape, count: int, gpus_per_node: int, global_batch: int
) -> tuple[LayoutConfig, int]:
    """Fill dp from the GPU count, check the layout can exist, and return it with its micro-batch count.

    The micro-batch count per DP replica is rounded up when the global batch does not divide evenly.
    """
    lay = dataclasses.replace(layout)
    if lay.dp == 0:
        if count % (lay.pp * lay.tp):
            raise PlanError(f"count {count} is not divisible by pp*tp = {lay.pp}*{lay.tp}")
        lay.dp = count // (lay.pp * lay.tp)
    problems = []
    if lay.dp * lay.pp * lay.tp != count:
        problems.append(f"dp*pp*tp = {lay.dp}*{lay.pp}*{lay.tp} = {lay.dp * lay.pp * lay.tp} != count {count}")
    if lay.tp > gpus_per_node:
        problems.append(f"tp={lay.tp} spans more than one scale-up domain of {gpus_per_node} GPUs")
    if shape.heads % lay.tp or (shape.kv_heads >= lay.tp and shape.kv_heads % lay.tp):
        problems.append(f"tp={lay.tp} does not divide the attention heads ({shape.heads} q, {shape.kv_heads} kv)")
    stages = 2 * lay.pp if lay.schedule == "dualpipev" and lay.pp > 1 else lay.pp
    if stages > shape.n_layers:
        problems.append(f"{stages} pipeline stages for {shape.n_layers} layers")
    if lay.ep > 1:
        if not shape.is_moe:
            problems.append(f"ep={lay.ep} but the model has no routed experts")
        elif shape.n_routed_experts % lay.ep:
            problems.append(f"ep={lay.ep} does not divide the {shape.n_routed_experts} routed experts")
        if (lay.dp * lay.tp) % lay.ep:
            problems.append(f"ep={lay.ep} must divide dp*tp = {lay.dp * lay.tp}")
        if lay.ep > gpus_per_node and lay.ep % gpus_per_node:
            problems.append(f"ep={lay.ep} spans nodes of {gpus_per_node} GPUs unevenly")
    if problems:
        raise PlanError(f"impossible layout ({lay.describe()}): " + "; ".join(problems))
    micro = -(-global_batch // (lay.dp * lay.micro_batch))
    if lay.pp > 1:
        try:
            check_schedule(lay.schedule, lay.pp, micro)
        except ValueError as e:
            raise PlanError(f"impossible layout ({lay.describe()}): {e}") from None
    return lay, micro
