"""Pipeline schedules as per-rank action lists: one description for the simulator and the executor."""

from __future__ import annotations

from typing import Callable

from frugalm.parallel.schedules.actions import (
    Action,
    Comm,
    Compute,
    Overlapped,
    PipelineSchedule,
    ScheduleError,
    compute_chunks,
    validate,
)
from frugalm.parallel.schedules.dualpipe import dualpipe, dualpipev
from frugalm.parallel.schedules.one_f_one_b import one_f_one_b, zb1p

SCHEDULES: dict[str, Callable[[int, int], PipelineSchedule]] = {
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def build_schedule(name: str, pp: int, micro: int) -> PipelineSchedule:
    """The named schedule for ``pp`` pipeline ranks and ``micro`` micro-batches per step."""
    try:
        factory = SCHEDULES[name]
    except KeyError:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    return factory(pp, micro)


__all__ = [
    "Action", "Comm", "Compute", "Overlapped", "PipelineSchedule", "ScheduleError", "SCHEDULES",
    "build_schedule", "compute_chunks", "dualpipe", "dualpipev", "one_f_one_b", "validate", "zb1p",
]
