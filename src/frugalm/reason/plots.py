"""PNGs drawn from the run records alone (metrics.jsonl, report.json), so they can be redrawn any time."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from frugalm.train.metrics import METRICS_FILE, read_metrics


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


GRPO_PANELS = (
    ("reward", [("reward", "reward (mean)"), ("rewards/accuracy", "accuracy"), ("rewards/format", "format"),
                ("eval_pass_at_1", "held-out pass@1 (greedy)")]),
    ("spread", [("reward_std", "reward std (group mean)"), ("frac_reward_zero_std", "zero-std groups")]),
    ("completion length (tokens)", [("completion_length", "mean"), ("completion_length_max", "max")]),
    ("entropy / KL", [("entropy", "entropy (nats)"), ("kl", "KL k3")]),
    ("clip ratio", [("clip_ratio/low", "low"), ("clip_ratio/high", "high")]),
)


def plot_grpo(out_dir: str | Path, png: Optional[str | Path] = None) -> Optional[Path]:
    """Reward, held-out pass@1, zero-std fraction, length, entropy/KL and clip ratios per step."""
    records = read_metrics(Path(out_dir) / METRICS_FILE)
    if not records:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(GRPO_PANELS), figsize=(5 * len(GRPO_PANELS), 4))
    for ax, (title, keys) in zip(axes, GRPO_PANELS):
        for key, label in keys:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, "o-" if key == "eval_pass_at_1" else "-", label=label, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(png) if png else Path(out_dir) / "grpo.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_comparison(runs: Mapping[str, str | Path], png: str | Path,
                    keys: Sequence[str] = ("reward", "completion_length", "eval_pass_at_1")) -> Path:
    """Several GRPO runs (e.g. grpo vs dr_grpo vs dapo) on shared axes, one panel per metric that any run
    logged (runs without periodic evaluation get no empty pass@1 panel)."""
    plt = _pyplot()
    records = {label: read_metrics(Path(folder) / METRICS_FILE) for label, folder in runs.items()}
    series = {key: {label: _series(recs, key) for label, recs in records.items()} for key in keys}
    keys = [k for k in keys if any(xs for xs, _ in series[k].values())] or list(keys)[:1]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, (xs, ys) in series[key].items():
            if xs:
                ax.plot(xs, ys, "o-" if key == "eval_pass_at_1" else "-", label=label, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


def plot_stages(stages: Mapping[str, Mapping[str, Any]], png: str | Path, title: str = "") -> Path:
    """Bars of greedy pass@1, sampled pass@1, pass@k and maj@k after each stage of the R1 recipe."""
    plt = _pyplot()
    names = list(stages)
    metrics = [("pass_at_1", "pass@1 (greedy)"), ("pass_at_1_sampled", "pass@1 (sampled)"),
               ("pass_at_k", "pass@k"), ("maj_at_k", "maj@k"), ("format_rate", "format rate")]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(names)), 4.5))
    width = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics):
        vals = [stages[n].get(key) for n in names]
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [v if isinstance(v, (int, float)) else 0.0 for v in vals], width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of problems solved")
    ax.set_title(title or "held-out accuracy after each stage")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
