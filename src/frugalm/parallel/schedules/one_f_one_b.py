"""1F1B and its zero-bubble variant ZB1P: one stage per rank, micro-batches flow from rank 0 down.

1F1B (PipeDream-Flush / Megatron): rank r runs ``PP-1-r`` warm-up forwards, then alternates one
forward with one backward, then drains the remaining backwards. At most ``PP`` micro-batches of
activations are alive on rank 0, and the idle time of every rank is ``(PP-1)(F+B)``.

ZB1P (ZB-H1 of "Zero Bubble Pipeline Parallelism", Qi et al. 2023): the same order, but every B
computes only the input gradient, which is what the next rank waits for; the weight gradient W is
run later. Rank r holds back its first ``r`` W's and spends them in the drain phase, where 1F1B would
sit idle. Memory stays that of 1F1B, the idle time drops to ``(PP-1)(F+B-2W)``.
"""

from __future__ import annotations

from frugalm.parallel.schedules.actions import PipelineSchedule, ScheduleError
from frugalm.parallel.schedules.builder import RankProgram


def _check(name: str, pp: int, micro: int) -> None:
    if pp < 1:
        raise ScheduleError(f"{name}: need at least 1 pipeline rank, got pp={pp}")
    if micro < 1:
        raise ScheduleError(f"{name}: need at least 1 micro-batch, got micro={micro}")


def _linear_schedule(name: str, pp: int, micro: int, zero_bubble: bool) -> PipelineSchedule:
    _check(name, pp, micro)
    placement = tuple(tuple(range(pp)) for _ in range(micro))
    programs = []
    for rank in range(pp):
        prog = RankProgram(rank, placement, [rank], [list(range(micro))])
        warmup = min(pp - 1 - rank, micro)
        held_back = rank if zero_bubble else 0  # W's this rank keeps for its drain phase
        for _ in range(warmup):
            prog.recv_forward(0)
            prog.forward(0)
            prog.send_forward(0)
        for _ in range(micro - warmup):
            prog.recv_forward(0)
            prog.forward(0)
            prog.send_forward(0)
            prog.recv_backward(0)
            prog.backward(0, split_weight=zero_bubble)
            prog.send_backward(0)
            if zero_bubble and prog.deferred_weights > held_back:
                prog.weight()
        for _ in range(warmup):
            prog.recv_backward(0)
            prog.backward(0, split_weight=zero_bubble)
            prog.send_backward(0)
            if zero_bubble and prog.deferred_weights > held_back:
                prog.weight()
        while prog.deferred_weights:
            prog.weight()
        programs.append(tuple(prog.actions))
    return PipelineSchedule(name, pp, pp, micro, placement, tuple(programs))


def one_f_one_b(pp: int, micro: int) -> PipelineSchedule:
    """1F1B over ``pp`` ranks (= stages) and ``micro`` micro-batches."""
    return _linear_schedule("1f1b", pp, micro, zero_bubble=False)


def zb1p(pp: int, micro: int) -> PipelineSchedule:
    """ZB1P (ZB-H1) over ``pp`` ranks (= stages) and ``micro`` micro-batches."""
    return _linear_schedule("zb1p", pp, micro, zero_bubble=True)
