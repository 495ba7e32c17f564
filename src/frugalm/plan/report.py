"""Human-readable tables, JSON, and the PNG chart of a `--compare`.

Formatting only: every number shown comes from a result object of the planner's API, and `--json` is
that object's `to_dict()`, so the table and the JSON cannot disagree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union


def _num(x: Optional[float], unit: str = "", digits: int = 3) -> str:
    """Engineering-style short numbers: 2.66M, 3.29e24, 34.6%."""
    if x is None:
        return "n/a"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if unit == "%":
        return f"{100 * x:.1f}%"
    if unit == "$":
        return "$" + _num(x)
    ax = abs(x)
    if ax >= 1e15 or (0 < ax < 1e-3):
        return f"{x:.{digits - 1}e}"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if ax >= div:
            return f"{x / div:.{digits}g}{suffix}{unit}"
    return f"{x:.{digits}g}{unit}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """A plain aligned text table (no colour, so it pipes and diffs cleanly)."""
    allrows = ([list(header)] if header else []) + [list(r) for r in rows]
    widths = [max(len(str(r[i])) for r in allrows) for i in range(len(allrows[0]))]
    lines = []
    for j, r in enumerate(allrows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if header and j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


def format_plan(r) -> str:
    lay = r.layout
    layout_text = f"dp={lay['dp']} pp={lay['pp']} ep={lay['ep']} tp={lay['tp']}"
    if lay["pp"] > 1:
        layout_text += f" {lay['schedule']}"
    layout_text += f" zero={lay['zero']} {lay['precision']} recompute={lay['recompute']} ({r.layout_mode})"
    cost = _num(r.cost_usd, "$")
    if r.cost_range_usd:
        cost += f" (range {_num(r.cost_range_usd[0], '$')}-{_num(r.cost_range_usd[1], '$')})"
    if r.price_usd_per_hour is not None:
        cost += f" at ${r.price_usd_per_hour:.2f}/GPU-h" + (f", price of {r.price_date}" if r.price_date else "")
    speed = f"MFU {_num(r.mfu, '%')} vs BF16 peak"
    if r.mode == "mfu":
        speed += " (stated)" + (f"; needs {_num(r.busy_efficiency, '%')} of peak while computing" if r.busy_efficiency else "")
    else:
        speed += f" (predicted from {_num(r.busy_efficiency, '%')} compute efficiency)"
    comm = r.comm
    rows = [
        ("model", f"{r.model}  ({_num(r.n_active)} active params)"),
        ("fleet", f"{r.count} x {r.chip_name}  [export: 2022 {r.export['rule_2022']}, 2023 {r.export['rule_2023']}]"),
        ("tokens", f"{_num(r.tokens)} at seq {r.seq_len}, batch {r.global_batch} seq = {_num(r.tokens_per_step)} tokens/step, {_num(r.steps)} steps"),
        ("FLOPs/token", f"{_num(r.flops_per_token)} ({r.flops_method})  total {_num(r.total_flops)}"),
        ("speed", speed),
        ("GPU-hours", _num(r.gpu_hours)),
        ("wall time", f"{r.days:.1f} days"),
        ("cost", cost),
        ("energy", f"{r.energy_mwh:,.0f} MWh (chips at TDP)"),
        ("layout", layout_text),
        ("memory/GPU", f"{r.memory_per_gpu_gb:.1f} of {r.hbm_gb:g} GiB (weights {r.memory['weights_gib']:.1f}, grads {r.memory['grads_gib']:.1f}, "
                       f"optimizer {r.memory['optimizer_gib']:.1f}, activations {r.memory['activations_gib']:.1f}, logits {r.memory['logits_gib']:.1f}, reserve {r.memory['reserved_gib']:.1f})"),
        ("step", f"{r.step_seconds:.3g} s = compute {_num(r.compute_seconds_per_step, 's')} + bubble {_num(r.bubble_seconds_per_step, 's')} "
                 f"({_num(r.bubble_fraction, '%')}) + exposed comm {_num(r.comm_exposed_seconds_per_step, 's')}"),
        ("comm/step", f"{r.comm_seconds_per_step:.3g} s: " + (
            f"all-to-all {comm['ep_s']:.3g} s (scale-up {comm['ep_scale_up_s']:.3g} s at {comm['scale_up_gbs']:.0f} GB/s, "
            f"scale-out {comm['ep_scale_out_s']:.3g} s at {comm['scale_out_gbs']:.0f} GB/s, {comm['nodes_reached']:.2f} nodes/token), "
            if lay["ep"] > 1 else "no expert parallelism, ")
            + f"DP {comm['dp_s']:.3g} s ({comm['dp_link']}), PP {comm['pp_s']:.3g} s, TP {comm['tp_s']:.3g} s"),
        ("comm hidden", "yes" if r.comm_hidden else "no"),
    ]
    out = table(rows)
    if r.warnings:
        out += "\n" + "\n".join(f"note: {w}" for w in r.warnings)
    return out


def compare_rows(results: Iterable[Any]) -> list[list[str]]:
    rows = []
    for r in results:
        if isinstance(r, Exception):
            rows.append([getattr(r, "chip", "?"), "-", "-", "-", "-", "-", "-", f"cannot run: {r}"])
            continue
        rows.append([
            r.chip, _num(r.gpu_hours), f"{r.days:.1f}", _num(r.cost_usd, "$"), _num(r.mfu, "%"),
            f"{r.memory_per_gpu_gb:.0f}/{r.hbm_gb:g}", f"{r.step_seconds:.3g}",
            f"comm {r.comm_seconds_per_step:.3g}s ({'hidden' if r.comm_hidden else 'exposed ' + _num(r.comm_exposed_seconds_per_step, 's')}), "
            f"bubble {_num(r.bubble_fraction, '%')}, {r.export['rule_2023']}",
        ])
    return rows


def format_compare(results: Sequence[Any], gpus: Sequence[str]) -> str:
    for g, r in zip(gpus, results):
        if isinstance(r, Exception):
            setattr(r, "chip", g)
    header = ["chip", "GPU-hours", "days", "cost", "MFU", "mem GiB", "step s", "notes"]
    return table(compare_rows(results), header)


def compare_chart(results: Sequence[Any], gpus: Sequence[str], path: Union[str, Path], title: str = "") -> Path:
    """Four panels: GPU-hours, wall days, cost, and the step split into compute / bubble / exposed comm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [(g, r) for g, r in zip(gpus, results) if not isinstance(r, Exception)]
    if not ok:
        raise ValueError("no fleet could run the plan; nothing to draw")
    names = [g for g, _ in ok]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        (axes[0, 0], [r.gpu_hours / 1e6 for _, r in ok], "GPU-hours (millions)"),
        (axes[0, 1], [r.days for _, r in ok], "wall-clock days"),
        (axes[1, 0], [(r.cost_usd or 0) / 1e6 for _, r in ok], "cost (USD millions)"),
    ]
    priced = [r.cost_usd is not None for _, r in ok]
    for ax, values, label in panels:
        bars = ax.bar(names, values, color="#4C72B0")
        ax.set_title(label)
        texts = [f"{v:.3g}" for v in values]
        if ax is axes[1, 0]:
            texts = [t if p else "no price" for t, p in zip(texts, priced)]
        ax.bar_label(bars, labels=texts, fontsize=8)
        ax.tick_params(axis="x", rotation=30)
    ax = axes[1, 1]
    compute = [r.compute_seconds_per_step or 0 for _, r in ok]
    bubble = [r.bubble_seconds_per_step or 0 for _, r in ok]
    exposed = [r.comm_exposed_seconds_per_step or 0 for _, r in ok]
    ax.bar(names, compute, label="compute", color="#4C72B0")
    ax.bar(names, bubble, bottom=compute, label="pipeline bubble", color="#DD8452")
    ax.bar(names, exposed, bottom=[c + b for c, b in zip(compute, bubble)], label="exposed comm", color="#C44E52")
    ax.set_title("seconds per step")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=30)
    r0 = ok[0][1]
    fig.suptitle(title or f"{r0.model}: {_num(r0.tokens)} tokens on {r0.count} GPUs ({r0.mode} {_num(r0.mfu, '%') if r0.mode == 'mfu' else _num(r0.busy_efficiency, '%')})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_chips(rows: Sequence[dict[str, Any]], as_of: str) -> str:
    header = ["chip", "BF16 TF", "FP8 TF", "HBM GiB", "TB/s", "scale-up GB/s", "TPP", "PD", "Oct-2022", "Oct-2023", f"China ({as_of})"]
    body = []
    for r in rows:
        body.append([
            r["key"], f"{r['bf16_tflops']:g}", f"{r['fp8_tflops']:g}" if r["fp8_tflops"] else "-", f"{r['hbm_gb']:g}",
            f"{r['hbm_tbps']:g}", f"{r['scale_up_bidir_gbs']:g}", f"{r['tpp']:,.0f}",
            f"{r['performance_density']:.2f}" if r["performance_density"] is not None else "n/a",
            r["rule_2022"], r["rule_2023"], r["china_status"],
        ])
    return table(body, header)


def format_claim(c) -> str:
    lines = [f"{c.title}  [{c.source}]", ""]
    header = ["stage", "GPU-hours", "cost", "tokens", "MFU 6ND", "MFU +attn", "MFU detailed", "TFLOPS/GPU (6ND)", "GPU-h per 1T tok"]
    rows = []
    for s in c.stages:
        rows.append([
            s.name, _num(s.gpu_hours), _num(s.cost_usd, "$"), _num(s.tokens), _num(s.mfu_6nd, "%"),
            _num(s.mfu_with_attention, "%"), _num(s.mfu_detailed, "%"), _num(s.achieved_tflops_per_gpu_6nd),
            _num(s.gpu_hours_per_trillion_tokens),
        ])
    rows.append(["total", _num(c.total_gpu_hours), _num(c.cost_usd, "$"), "", "", "", "", "", ""])
    lines.append(table(rows, header))
    lines.append("")
    price = f"${c.price_usd_per_hour:.2f}/GPU-h ({c.price_source})" if c.price_usd_per_hour else "no price"
    lines.append(f"hardware: {c.count or 'unknown number of'} x {c.chip_name}, dense BF16 peak {c.peak_tflops_bf16:g} TFLOPS; {price}")
    if c.replanned_total_gpu_hours is not None:
        lines.append(f"re-planned at the implied MFU: {_num(c.replanned_total_gpu_hours)} GPU-hours, {_num(c.replanned_cost_usd, '$')} in total")
    head = next((s for s in c.stages if s.tokens), None)
    if head and head.mfu_6nd_of_fp8_peak is not None:
        lines.append(f"against the FP8 peak the 6ND MFU is {_num(head.mfu_6nd_of_fp8_peak, '%')}")
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)


def format_calibration(r) -> str:
    return table([
        ("metrics", r.metrics),
        ("model", f"{r.model} at seq {r.seq_len}: {_num(r.flops_per_token)} FLOPs/token (training)"),
        ("hardware", f"{r.count} x {r.chip}, peak {r.peak_tflops:g} TFLOPS ({r.peak_precision})"),
        ("throughput", f"{r.tokens_per_s:,.1f} tokens/s (median of {r.steps_used} of {r.steps_logged} logged steps)"),
        ("achieved", f"{r.achieved_tflops_per_gpu:.4g} TFLOPS per device"),
        ("MFU", _num(r.mfu, "%") + (f" (the trainer logged {_num(r.logged_mfu, '%')})" if r.logged_mfu is not None else "")),
    ])
