"""Run metrics: ``metrics.jsonl`` (the record), TensorBoard (the live view) and the end-of-run PNG.

``metrics.jsonl`` holds one JSON object per logged step and is the source of truth: the PNG is drawn
from it alone, so it can be redrawn for any run folder (`plot_run`). On resume the records after the
checkpoint's step are dropped, so the file reads as if the run had never been interrupted.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"


def write_above_progress(message: str) -> None:
    """A status line on stderr that does not break a live tqdm bar (the bar is redrawn below it)."""
    import sys

    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only records with ``step <= last_step`` (atomic rewrite)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so every line stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLogger:
    """Appends records to ``<out>/metrics.jsonl`` and mirrors their scalars to TensorBoard (``<out>/tb``)."""

    def __init__(self, out_dir: str | Path, *, resume_step: Optional[int] = None, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_metrics(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a stripped install should still train
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(_tb_tag(key), value, step)

    def sync(self) -> None:
        """Make everything logged so far durable (called with each checkpoint)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tb_tag(key: str) -> str:
    if "loss" in key:
        return f"loss/{key}"
    if key in ("tokens_per_s", "mfu", "step_time_s"):
        return f"perf/{key}"
    if key.startswith("load") or key.startswith("bias"):
        return f"balance/{key}"
    return f"train/{key}"


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def mean_expert_load(records: list[dict[str, Any]]) -> tuple[list[str], list[list[float]]]:
    """Per MoE block, each expert's load relative to the mean, averaged over the given records' intervals."""
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for r in records:
        for name, loads in (r.get("expert_load") or {}).items():
            acc = sums.setdefault(name, [0.0] * len(loads))
            if len(acc) != len(loads):
                continue
            for i, v in enumerate(loads):
                acc[i] += float(v)
            counts[name] = counts.get(name, 0) + 1
    names = list(sums)
    return names, [[v / counts[n] for v in sums[n]] for n in names]


def plot_run(out_dir: str | Path, png: Optional[str | Path] = None) -> Optional[Path]:
    """Draw loss curves (train, val, MTP), load imbalance and the layers x experts load heatmap."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    records = read_metrics(out_dir / METRICS_FILE)
    if not records:
        return None
    png = Path(png) if png else out_dir / PLOT_FILE
    with_load = [r for r in records if r.get("expert_load")]
    tenth = max(1, len(with_load) // 10)
    names, early = mean_expert_load(with_load[:tenth])
    late_names, late = mean_expert_load(with_load[-tenth:])
    fig, axes = plt.subplots(1, 4 if names else 1, figsize=(22 if names else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for key, label, style in (("loss", "train loss", "-"), ("mtp_loss", "MTP loss (depth mean)", ":"),
                              ("val_loss", "val loss", "o-")):
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if names:
        ax = axes[0][1]
        xs, ys = _series(records, "load_imbalance")
        ax.plot(xs, ys, "-", color="tab:red")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("max / mean expert load (worst layer)")
        ax.set_title("expert-load imbalance")
        ax.grid(alpha=0.3)
        first_steps = f"steps {with_load[0]['step']}-{with_load[tenth - 1]['step']}"
        last_steps = f"steps {with_load[-tenth]['step']}-{with_load[-1]['step']}"
        for ax, rows, label, grid in ((axes[0][2], names, first_steps, early), (axes[0][3], late_names, last_steps, late)):
            im = ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=0.0, vmax=2.0, interpolation="nearest")
            ax.set_yticks(range(len(rows)))
            ax.set_yticklabels([_short(n) for n in rows], fontsize=7)
            ax.set_xlabel("expert")
            ax.set_title(f"expert load / mean, {label}")
        fig.colorbar(im, ax=axes[0][3])
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _short(name: str) -> str:
    """model.layers.3.mlp -> L3, mtp.0.block.mlp -> MTP0."""
    parts = name.split(".")
    if parts[0] == "mtp":
        return f"MTP{parts[1]}"
    if "layers" in parts:
        return f"L{parts[parts.index('layers') + 1]}"
    return name
