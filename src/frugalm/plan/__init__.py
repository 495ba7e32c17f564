"""Planner: cost, time, memory and communication of a training run, and export classification of chips.

The Python API behind `frugalm plan` (each name below is importable without torch or matplotlib):
- `flops_per_token(cfg, seq_len, training=True, include_mtp=True)`: the FLOP counter the trainer's MFU uses;
- `plan_run(PlanConfig(...), layout, comm)` / `compare(...)`: GPU-hours, days, cost, energy, memory, comm;
- `pipeline_bubble(...)` / `pipeline_bubble_fraction(...)`: the DualPipe table's closed forms;
- `load_catalogue()`, `classify(chip)`, `tpp(chip)`: the chip catalogue and the export rules;
- `check_claim("deepseek-v3")`: implied MFU and cost of a published run;
- `calibrate("OUT/metrics.jsonl", gpu=..., count=...)`: achieved MFU of a frugalm run.
"""

from __future__ import annotations

from frugalm.plan.errors import PlanError
from frugalm.plan.flops import flop_breakdown, flops_per_token, training_flops_per_token
from frugalm.plan.pipeline import pipeline_bubble, pipeline_bubble_fraction

__all__ = [
    "PlanError", "flop_breakdown", "flops_per_token", "training_flops_per_token", "pipeline_bubble",
    "pipeline_bubble_fraction", "plan_run", "compare", "PlanConfig", "load_catalogue", "classify", "tpp",
    "check_claim", "calibrate",
]


def __getattr__(name: str):
    """Lazy access to the heavier entry points, so `import frugalm.plan` stays cheap for the trainer."""
    if name in ("plan_run", "compare", "PlanConfig"):
        from frugalm.plan import planner

        return getattr(planner, name)
    if name == "load_catalogue":
        from frugalm.plan.chips import load_catalogue

        return load_catalogue
    if name in ("classify", "tpp"):
        from frugalm.plan import rules

        return getattr(rules, name)
    if name == "check_claim":
        from frugalm.plan.claims import check_claim

        return check_claim
    if name == "calibrate":
        from frugalm.plan.calibrate import calibrate

        return calibrate
    raise AttributeError(f"module 'frugalm.plan' has no attribute {name!r}")
