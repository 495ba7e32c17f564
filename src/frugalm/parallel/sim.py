"""Event simulator for pipeline schedules: timelines, bubble, activation and parameter memory.

It executes the very action lists the real executor runs (`frugalm.parallel.schedules`), with the
executor's communication rule (see `frugalm.parallel.schedules.actions`): what was posted since the
last compute is launched as one batch before the next compute; F, B and F&B wait for all launched
batches, W does not; a batch ends when every message in it has met its partner, ``comm`` time units
after the later of the two launch times. Compute actions take fixed times:

* F: ``f``; a full B: ``b``; a B whose weight gradient is deferred: ``b - w``; W: ``w``;
* an overlapped F&B slot: ``fb`` (default ``f + b``), less ``w`` if its B defers the weight part.

**Bubble.** A rank's idle time is the step's makespan (first start to last end, over all ranks) minus
the time that rank spends computing; the reported ``bubble`` is the largest per-rank idle time
(``makespan - min busy``), in the time units of ``f``/``b``/``w``. This is the quantity of the
DualPipe README table. Like the table it does not depend on the number of micro-batches once the
pipe reaches its steady state (1F1B/ZB1P: ``micro >= PP``; DualPipe/V: any count they accept). With
``F, B, W, F&B`` the chunk times and ``PP`` the number of *stages*, the table reads

* 1F1B ``(PP-1)(F+B)``: reproduced for all times;
* ZB1P ``(PP-1)(F+B-2W)``: reproduced when ``W <= F`` and ``W <= B-W``;
* DualPipe ``(PP/2-1)(F&B+B-3W)`` and DualPipeV on ``PP/2`` ranks, the same: reproduced when
  ``F = B-W`` (a forward costs what the input-gradient half of a backward costs), ``W <= F`` and
  ``F&B >= B``, the regime the published schedule figure was drawn for (F=1, B=2, W=1, F&B=3).

Outside those regimes the fixed chunk order of a schedule leaves different gaps and the formula is
only an approximation; the simulator reports what the schedule actually does (tests check both).
``bubble_fraction`` is bubble / makespan, i.e. the idle share of the busiest-waiting rank.

**Memory.** A chunk's activations are counted alive on its rank from the start of its forward to the
end of its backward (deferred-W state is not counted, as in the table), and ``peak_activations`` is
the maximum over time, in units of "one stage's activations for one micro-batch". ``param_copies`` is
the number of stage modules a rank holds (1 for 1F1B/ZB1P, 2 for DualPipe/V).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from frugalm.parallel.schedules.actions import Comm, Compute, Overlapped, PipelineSchedule, ScheduleError


@dataclass(frozen=True)
class ChunkTimes:
    """Durations of one stage's work on one micro-batch, in any unit (all results use the same unit)."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None
    comm: float = 0.0

    def __post_init__(self) -> None:
        if min(self.f, self.b, self.w, self.comm) < 0:
            raise ValueError(f"chunk times must be >= 0, got {self}")
        if self.w > self.b:
            raise ValueError(f"w (weight part of a backward) cannot exceed b (full backward): w={self.w} b={self.b}")
        if self.fb is not None and self.fb < 0:
            raise ValueError(f"fb must be >= 0, got {self.fb}")

    @property
    def overlapped(self) -> float:
        return self.f + self.b if self.fb is None else self.fb

    def duration(self, action: Compute | Overlapped) -> float:
        if isinstance(action, Overlapped):
            return self.overlapped - (self.w if action.backward.split_weight else 0.0)
        if action.kind == "F":
            return self.f
        if action.kind == "W":
            return self.w
        return self.b - self.w if action.split_weight else self.b


@dataclass(frozen=True)
class Span:
    """One compute slot on a rank's timeline."""

    rank: int
    label: str
    kind: str  # "F", "B", "W" or "FB"
    start: float
    end: float
    micro: int
    stage: int


@dataclass
class SimResult:
    """Timelines and the figures derived from them; ``bubble`` and ``bubble_fraction`` as defined above."""

    schedule: PipelineSchedule
    times: ChunkTimes
    spans: list[list[Span]]
    makespan: float
    busy: list[float]
    idle: list[float]
    peak_activations: list[int]
    param_copies: list[int]
    bubble: float = field(init=False)
    bubble_fraction: float = field(init=False)

    def __post_init__(self) -> None:
        self.bubble = max(self.idle)
        self.bubble_fraction = self.bubble / self.makespan if self.makespan > 0 else 0.0

    def summary(self) -> dict[str, object]:
        """A JSON-friendly digest (what ``frugalm pipeline-sim --json`` prints)."""
        s = self.schedule
        return {
            "schedule": s.name,
            "pp": s.num_ranks,
            "stages": s.num_stages,
            "micro": s.num_micro,
            "times": {"f": self.times.f, "b": self.times.b, "w": self.times.w,
                      "fb": self.times.overlapped, "comm": self.times.comm},
            "bubble": self.bubble,
            "bubble_fraction": self.bubble_fraction,
            "makespan": self.makespan,
            "idle_per_rank": self.idle,
            "peak_activations": max(self.peak_activations),
            "peak_activations_per_rank": self.peak_activations,
            "param_copies": max(self.param_copies),
            "param_copies_per_rank": self.param_copies,
        }


def simulate(schedule: PipelineSchedule, times: ChunkTimes = ChunkTimes()) -> SimResult:
    """Run every rank's action list against the others; raise ScheduleError on a deadlock."""
    R = schedule.num_ranks
    acts = schedule.actions
    posted: dict[tuple[str, tuple[str, int, int]], float] = {}  # (send|recv, message key) -> launch time
    state = [_RankState() for _ in range(R)]
    spans: list[list[Span]] = [[] for _ in range(R)]

    def partner_time(op: Comm) -> float | None:
        return posted.get(("recv" if op.kind == "send" else "send", op.key))

    def launch(st: _RankState) -> None:
        if st.pending:
            for op in st.pending:
                posted[(op.kind, op.key)] = st.clock
            st.in_flight.append((st.pending, st.clock))
            st.pending = []

    def wait_all(st: _RankState) -> bool:
        end = st.clock
        for ops, launched in st.in_flight:
            for op in ops:
                other = partner_time(op)
                if other is None:
                    return False
                end = max(end, max(launched, other) + times.comm)
        st.clock = end
        st.in_flight = []
        return True

    def step(r: int) -> bool:
        """Advance rank r as far as it can go; return whether it moved."""
        st, moved = state[r], False
        while st.pc <= len(acts[r]):
            if st.pc == len(acts[r]):
                launch(st)
                if not wait_all(st):
                    return moved
                st.pc += 1
                return True
            action = acts[r][st.pc]
            if isinstance(action, Comm):
                st.pending.append(action)
            else:
                launch(st)
                needs_data = not (isinstance(action, Compute) and action.kind == "W")
                if needs_data and not wait_all(st):
                    return moved
                _run(st, r, action, times, spans[r])
            st.pc += 1
            moved = True
        return moved

    while any(st.pc <= len(acts[r]) for r, st in enumerate(state)):
        if not any([step(r) for r in range(R)]):
            stuck = {
                r: [str(op) for ops, _ in st.in_flight for op in ops if partner_time(op) is None]
                for r, st in enumerate(state) if st.pc <= len(acts[r])
            }
            raise ScheduleError(f"{schedule.name}: deadlock; ranks waiting on unmatched messages: {stuck}")

    starts = [s.start for row in spans for s in row]
    t0 = min(starts, default=0.0)
    makespan = max(st.clock for st in state) - t0 if starts else 0.0
    busy = [sum(s.end - s.start for s in row) for row in spans]
    idle = [makespan - b for b in busy]
    copies = [len(schedule.stages_on(r)) for r in range(R)]
    return SimResult(schedule, times, spans, makespan, busy, idle, [st.peak for st in state], copies)


@dataclass
class _RankState:
    pc: int = 0
    clock: float = 0.0
    pending: list[Comm] = field(default_factory=list)  # posted since the last compute
    in_flight: list[tuple[list[Comm], float]] = field(default_factory=list)  # launched batches, not waited
    live: int = 0
    peak: int = 0


def _run(st: _RankState, rank: int, action: Compute | Overlapped, times: ChunkTimes, out: list[Span]) -> None:
    """Execute one compute slot on a rank: advance its clock, record the span, track live activations."""
    start, dur = st.clock, times.duration(action)
    if isinstance(action, Overlapped):
        # the forward's activations exist before the backward's are freed
        st.peak = max(st.peak, st.live + 1)
        out.append(Span(rank, str(action), "FB", start, start + dur, action.forward.micro, action.forward.stage))
    else:
        if action.kind == "F":
            st.live += 1
            st.peak = max(st.peak, st.live)
        elif action.kind == "B":
            st.live -= 1
        out.append(Span(rank, str(action), action.kind, start, start + dur, action.micro, action.stage))
    st.clock = start + dur


def table_bubble(name: str, pp: int, times: ChunkTimes) -> float:
    """The DualPipe README table's bubble for ``pp`` pipeline *ranks* (DualPipeV: 2·pp stages)."""
    f, b, w, fb = times.f, times.b, times.w, times.overlapped
    if name == "1f1b":
        return (pp - 1) * (f + b)
    if name == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    if name == "dualpipe":
        return (pp / 2 - 1) * (fb + b - 3 * w)
    if name == "dualpipev":
        return (pp - 1) * (fb + b - 3 * w)
    raise ScheduleError(f"no table entry for schedule {name!r}")


def in_table_regime(name: str, times: ChunkTimes) -> bool:
    """Whether ``times`` lie where the simulated schedule reproduces `table_bubble` exactly (no comm cost)."""
    f, b, w, fb = times.f, times.b, times.w, times.overlapped
    eps = 1e-9 * max(1.0, f, b)
    if times.comm > 0:
        return False
    if name == "1f1b":
        return True
    if name == "zb1p":
        return w <= f + eps and w <= b - w + eps
    if name in ("dualpipe", "dualpipev"):
        return abs((b - w) - f) <= eps and w <= f + eps and fb >= b - eps
    raise ScheduleError(f"no table entry for schedule {name!r}")


_COLORS = {"F": "#4C72B0", "B": "#55A868", "B*": "#A6D8B0", "W": "#C4AD66", "FB": "#8172B2"}
_LEGEND = {"F": "forward", "B": "backward", "B*": "backward, input grad only", "W": "weight grad", "FB": "F&B overlapped"}


def plot_timeline(spans: list[list[Span]], path: str | Path, title: str = "") -> Path:
    """Draw per-rank timelines (one row per rank, one box per compute slot) as a PNG.

    Takes spans rather than a SimResult so measured timelines from the real executor are drawn the
    same way as simulated ones. Boxes are labelled with micro-batch ids (``7&13``: forward of 7
    overlapped with backward of 13).
    """
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranks = len(spans)
    all_spans = [s for row in spans for s in row]
    t0 = min((s.start for s in all_spans), default=0.0)
    t1 = max((s.end for s in all_spans), default=1.0)
    longest = max((len(row) for row in spans), default=1)
    fig, ax = plt.subplots(figsize=(min(40.0, max(8.0, 0.22 * longest)), 0.55 * ranks + 2.0))
    for row in spans:
        for s in row:
            kind = "B*" if s.kind == "B" and s.label.endswith("*") else s.kind
            ax.barh(s.rank, s.end - s.start, left=s.start - t0, height=0.8,
                    color=_COLORS.get(kind, "#999999"), edgecolor="black", linewidth=0.4)
            text = re.sub(r"@s\d+|\*|[FBW]", "", s.label)
            if s.end - s.start > 0.01 * (t1 - t0):
                ax.text((s.start + s.end) / 2 - t0, s.rank, text, ha="center", va="center", fontsize=5.5,
                        color="black", clip_on=True)
    ax.set_yticks(range(ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlim(0, t1 - t0)
    ax.set_xlabel("time")
    ax.set_title(title, fontsize=9)
    used = {("B*" if s.kind == "B" and s.label.endswith("*") else s.kind) for s in all_spans}
    handles = [Patch(color=c, label=_LEGEND[k]) for k, c in _COLORS.items() if k in used]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
