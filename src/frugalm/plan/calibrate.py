"""Measured calibration: the MFU a frugalm run actually achieved, from its `metrics.jsonl`.

The trainer writes one JSON object per logged step (at least step, loss, lr, tokens, and tokens_per_s)
and OUT/config.toml with the run's [model] and [train] sections. Throughput is the median over the
logged steps after a warm-up share (compilation, allocator growth and the first data loads make the
first steps unrepresentative), FLOPs per token come from the same counter the planner uses, and the
peak from the chip catalogue, or `peak_tflops`, or else the matmul peak the trainer measured on the run's
own device (OUT/peak_flops.json), which is what a CPU or an uncatalogued accelerator needs.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from frugalm.plan.chips import Catalogue, load_catalogue
from frugalm.plan.errors import PlanError
from frugalm.plan.flops import training_flops_per_token
from frugalm.plan.models import ResolvedModel, resolve_model

_TIME_KEYS = ("elapsed_s", "elapsed", "time_s", "time", "wall_s")
PEAK_FILE = "peak_flops.json"  # written by frugalm.train.perf: {"<device>|<dtype>": FLOP/s}


def measured_peak(run_dir: Path) -> Optional[tuple[str, float]]:
    """(device|dtype, TFLOPS) from the run's measured-peak cache, when it holds exactly one entry."""
    path = run_dir / PEAK_FILE
    if not path.is_file():
        return None
    try:
        cache = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cache, dict) or not cache:
        return None
    if len(cache) > 1:
        raise PlanError(f"{path} holds several measured peaks ({', '.join(cache)}); pick one with --peak-tflops")
    (key, value), = cache.items()
    return str(key), float(value) / 1e12


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl file (blank lines skipped; a bad line is an error naming it)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"metrics file not found: {path}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}:{i}: not a JSON object: {e}") from None
        if not isinstance(row, dict):
            raise PlanError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise PlanError(f"{path}: no metrics lines")
    return rows


def throughputs(rows: list[dict[str, Any]]) -> list[float]:
    """Tokens/s per logged step: the logged `tokens_per_s`, else Δtokens/Δtime between lines."""
    logged = [float(r["tokens_per_s"]) for r in rows if isinstance(r.get("tokens_per_s"), (int, float)) and r["tokens_per_s"] > 0]
    if logged:
        return logged
    key = next((k for k in _TIME_KEYS if all(k in r for r in rows)), None)
    if key is None or not all("tokens" in r for r in rows):
        raise PlanError(
            "metrics have no tokens_per_s field, and no cumulative tokens with a time field "
            f"({', '.join(_TIME_KEYS)}) to derive it from"
        )
    out = []
    for a, b in zip(rows, rows[1:]):
        dt, dn = float(b[key]) - float(a[key]), float(b["tokens"]) - float(a["tokens"])
        if dt > 0 and dn > 0:
            out.append(dn / dt)
    if not out:
        raise PlanError("metrics do not advance in tokens and time: cannot measure throughput")
    return out


@dataclass
class CalibrationResult:
    metrics: str
    model: str
    chip: str
    count: int
    seq_len: int
    steps_logged: int
    steps_used: int
    tokens_per_s: float  # whole run, all GPUs
    flops_per_token: float
    achieved_tflops_per_gpu: float
    peak_tflops: float
    peak_precision: str
    mfu: float
    logged_mfu: Optional[float]  # median of the trainer's own `mfu` field over the same steps, if logged

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def calibrate(
    metrics: str | Path,
    *,
    model: str | ResolvedModel | None = None,
    config: str | Path | None = None,
    gpu: Optional[str] = None,
    count: int = 1,
    peak_tflops: Optional[float] = None,
    precision: str = "bf16",
    seq_len: Optional[int] = None,
    warmup_fraction: float = 0.2,
    throughput_per_gpu: bool = False,
    flops_method: str = "detailed",
    catalogue: Optional[Catalogue] = None,
) -> CalibrationResult:
    """Achieved MFU of a run. `metrics` is a metrics.jsonl file or a run folder holding it and config.toml.

    tokens_per_s is taken as the whole run's throughput unless `throughput_per_gpu` (then × count).
    """
    path = Path(metrics)
    if path.is_dir():
        config = config or (path / "config.toml")
        path = path / "metrics.jsonl"
    rows = read_metrics(path)
    if model is None:
        if config is None:
            config = path.with_name("config.toml")
        if not Path(config).is_file():
            raise PlanError(f"no model: pass --model, or keep the run's config.toml next to {path.name} (looked for {config})")
        model = str(config)
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    seq = seq_len or resolved.seq_len
    if not seq:
        raise PlanError("sequence length unknown: the run config has no [train] seq_len; pass --seq-len")
    if count <= 0:
        raise PlanError("--count must be > 0")
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise PlanError("--peak-tflops must be > 0")
        peak, chip_name = peak_tflops, "custom peak"
    elif gpu:
        chip = (catalogue or load_catalogue()).get(gpu)
        peak, chip_name = chip.peak_tflops(precision), chip.key
    elif (found := measured_peak(path.parent)) is not None:
        chip_name, peak = f"measured peak of {found[0]}", found[1]
        precision = found[0].rsplit("|", 1)[-1]
    else:
        raise PlanError(
            f"say what the run ran on: --gpu NAME (catalogue) or --peak-tflops X; no {PEAK_FILE} in {path.parent}"
        )
    if not 0 <= warmup_fraction < 1:
        raise PlanError("warmup fraction must be in [0, 1)")
    rates = throughputs(rows)
    skip = int(len(rates) * warmup_fraction) if len(rates) > 2 else 0
    steady = rates[skip:] or rates
    logged = [float(r["mfu"]) for r in rows if isinstance(r.get("mfu"), (int, float)) and r["mfu"] == r["mfu"]]
    logged_mfu = statistics.median(logged[int(len(logged) * warmup_fraction) if len(logged) > 2 else 0:]) if logged else None
    tps = statistics.median(steady) * (count if throughput_per_gpu else 1)
    fpt = training_flops_per_token(resolved.shape, int(seq), flops_method)
    achieved = tps * fpt / count
    return CalibrationResult(
        metrics=str(path), model=resolved.name, chip=chip_name, count=count, seq_len=int(seq),
        steps_logged=len(rows), steps_used=len(steady), tokens_per_s=tps, flops_per_token=fpt,
        achieved_tflops_per_gpu=achieved / 1e12, peak_tflops=peak, peak_precision=precision,
        mfu=achieved / (peak * 1e12), logged_mfu=logged_mfu,
    )
