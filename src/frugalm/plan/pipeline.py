"""Pipeline-parallel schedules in closed form: bubble, stage placement and in-flight activations.

The bubble formulas are those of the DualPipe README table (training-frameworks.md §1): F is one
stage chunk's forward, B its full backward (including the weight-gradient part W), F&B an overlapped
forward+backward pair. `pp` is always the number of pipeline RANKS. For DualPipeV ("cut in half") the
model is cut into 2·pp stages, two per rank, so the table's PP (stages) is 2·pp and its bubble
(PP/2 − 1)(F&B + B − 3W) becomes (pp − 1)(F&B + B − 3W), with F/B/W the times of one (half-size) stage.
The pipeline simulator (frugalm parallel) is tested against these functions.
"""

from __future__ import annotations

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def check_schedule(schedule: str, pp: int, micro: int) -> None:
    """Raise ValueError naming the broken constraint (from the schedules' own requirements)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    if pp < 1:
        raise ValueError(f"pp must be >= 1 (got {pp})")
    if micro < 1:
        raise ValueError(f"the number of micro-batches must be >= 1 (got {micro})")
    if schedule == "zb1p" and micro < pp:
        raise ValueError(f"zb1p needs at least pp micro-batches (pp={pp}, micro={micro})")
    if schedule == "dualpipe":
        if pp % 2 or pp < 2:
            raise ValueError(f"dualpipe needs an even number of pipeline ranks >= 2 (pp={pp})")
        if micro % 2 or micro < 2 * pp:
            raise ValueError(f"dualpipe needs an even number of micro-batches >= 2*pp (pp={pp}, micro={micro})")
    if schedule == "dualpipev" and micro < 2 * pp:
        raise ValueError(f"dualpipev needs at least 2*pp micro-batches (pp={pp}, micro={micro})")


def pipeline_bubble(
    schedule: str, pp: int, micro: int, f: float, b: float, w: float, fb: float | None = None
) -> float:
    """Idle time of a pipeline rank per step, in the units of f/b/w.

    1F1B: (pp−1)(F+B); ZB1P: (pp−1)(F+B−2W); DualPipe: (pp/2−1)(F&B+B−3W); DualPipeV: (pp−1)(F&B+B−3W),
    where B includes W and F&B defaults to F+B (no gain from overlapping). None grows with `micro`,
    which only has to satisfy the schedule's constraints (see `check_schedule`).
    """
    check_schedule(schedule, pp, micro)
    if min(f, b, w) < 0 or w > b:
        raise ValueError(f"need f, b, w >= 0 and w <= b (W is part of B); got f={f}, b={b}, w={w}")
    fb = f + b if fb is None else fb
    if schedule == "1f1b":
        return (pp - 1) * (f + b)
    if schedule == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    if schedule == "dualpipe":
        return (pp // 2 - 1) * (fb + b - 3 * w)
    return (pp - 1) * (fb + b - 3 * w)


def chunk_visits(schedule: str) -> int:
    """How many stage chunks of a rank one micro-batch passes through (DualPipeV's V visits each rank twice)."""
    return 2 if schedule == "dualpipev" else 1


def pipeline_bubble_fraction(
    schedule: str, pp: int, micro: int, f: float, b: float, w: float, fb: float | None = None
) -> float:
    """Bubble / (busy + bubble) for one rank, busy being micro × visits × (F + B).

    For 1F1B this is the classic (pp−1)/(m+pp−1).
    """
    bubble = pipeline_bubble(schedule, pp, micro, f, b, w, fb)
    busy = micro * chunk_visits(schedule) * (f + b)
    total = busy + bubble
    return bubble / total if total > 0 else 0.0


def num_stages(schedule: str, pp: int) -> int:
    return 2 * pp if schedule == "dualpipev" else pp


def rank_stages(schedule: str, pp: int) -> list[tuple[int, ...]]:
    """The stages each rank holds: DualPipe rank r holds r and pp−1−r (two parameter copies of every
    stage); DualPipeV rank r holds r and 2pp−1−r; 1F1B/ZB1P one stage each."""
    if schedule == "dualpipe" and pp > 1:
        return [(r, pp - 1 - r) for r in range(pp)]
    if schedule == "dualpipev":
        return [(r, 2 * pp - 1 - r) for r in range(pp)]
    return [(r,) for r in range(pp)]


def stage_share(schedule: str) -> float:
    """Fraction of all micro-batches that pass through each stage a rank holds (DualPipe splits the
    micro-batches between its two directions, so each of a rank's two stages sees half of them)."""
    return 0.5 if schedule == "dualpipe" else 1.0


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, balanced layer ranges per stage (earlier stages take the remainder)."""
    if n_stages > n_layers:
        raise ValueError(f"cannot cut {n_layers} layers into {n_stages} pipeline stages")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def in_flight_chunks(schedule: str, pp: int, micro: int) -> float:
    """Stage-chunk activations the busiest rank (the first) holds at once, in units of one micro-batch
    through one of its stages: 1F1B/ZB1P min(pp, m); DualPipe pp+1; DualPipeV 2·pp+1 half-size chunks."""
    if pp == 1:
        return 1.0
    if schedule in ("1f1b", "zb1p"):
        return float(min(pp, micro))
    if schedule == "dualpipe":
        return float(pp + 1)
    return float(2 * pp + 1)


def param_copies(schedule: str) -> int:
    """Parameter copies relative to 1F1B at the same number of stages (the table's column)."""
    return 2 if schedule in ("dualpipe", "dualpipev") else 1
