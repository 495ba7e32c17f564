"""DualPipe and DualPipeV (DeepSeek-V3 report §3.2.1; deepseek-ai/DualPipe), written as action lists.

DualPipe: ``PP`` ranks (even), ``PP`` stages. Rank r holds stage r for the *down* stream (micro-batches
``0..M/2-1`` enter at rank 0) and a copy of stage ``PP-1-r`` for the *up* stream (micro-batches
``M/2..M-1`` enter at rank ``PP-1``). Both copies of a stage must end a step with the summed gradient.

DualPipeV ("cut-in-half"): ``PP`` ranks, ``2·PP`` stages folded into a V. Rank r holds stage r (on the
way down) and stage ``2·PP-1-r`` (on the way back up); every micro-batch enters and leaves at rank 0,
and the turn at rank ``PP-1`` is a local hand-over.

Both run the same eight phases per rank, parameterised by ``n`` (ranks per direction: PP/2 for
DualPipe, PP for V), ``h`` (this rank's distance from the nearest end of its half) and ``c`` (micro-
batches per stream). "Slot 0" is the stream a rank meets first and "slot 1" the other one:

1. ``2(n-h-1)`` forwards of slot 0 fill the pipe from this rank's end;
2. ``h+1`` forward pairs (slot 0, slot 1) start the second stream;
3. ``n-h-1`` rounds of B(slot 1, weight deferred), W, F(slot 1) - the zero-bubble trick fills the gap
   before the first gradients of slot 0 come back;
4. the steady state: pairs of overlapped F&B slots, (F0 & B1) then (F1 & B0), ``c - 2n + h + 1`` times;
5. ``n-h-1`` rounds of B(slot 1), (F1 & B0) drain the forwards;
6. ``h+1`` pairs of B(slot 1), B(slot 0), the second half with weights deferred;
7. ``n-h-1`` rounds of W, B(slot 0, weight deferred);
8. the remaining ``h+1`` W's.

The order of receives and sends inside each phase matters: they are committed in batches before the
next compute, and a batch completes only when both ends have posted their half, so the posting points
below are chosen so that every batch meets its partner without a deadlock (the simulator checks
this for every schedule it runs). The ranks that meet in the middle (DualPipe: ranks PP/2-1 and PP/2;
DualPipeV: the turn at rank PP-1) run the first steady-state pair unoverlapped to shorten the bubble.
"""

from __future__ import annotations

from frugalm.parallel.schedules.actions import PipelineSchedule, ScheduleError
from frugalm.parallel.schedules.builder import RankProgram


def _eight_phases(prog: RankProgram, n: int, h: int, c: int, meets_middle: bool, v_shape: bool) -> None:
    """Append the eight DualPipe phases for one rank to ``prog`` (see the module docstring)."""
    # 1. fill from this rank's end
    for _ in range(2 * (n - h - 1)):
        prog.recv_forward(0)
        prog.forward(0)
        prog.send_forward(0)

    # 2. forwards of both slots, interleaved. The slot-0 receive for the next forward is posted
    # before the slot-1 forward so it rides in the same batch.
    prog.recv_forward(0)
    for i in range(h + 1):
        prog.forward(0)
        send_f0_now = meets_middle and not v_shape
        if send_f0_now:
            prog.send_forward(0)
        prog.recv_forward(0)
        prog.recv_forward(1)
        prog.forward(1)
        if (not meets_middle) or i < h:
            prog.send_forward(1)
        if not send_f0_now:
            prog.send_forward(0)

    # 3. B1 with deferred W, then W fills the wait, then the next F1
    for _ in range(n - h - 1):
        prog.recv_backward(1)
        prog.backward(1, split_weight=True)
        prog.send_backward(1)
        prog.recv_forward(1)
        prog.weight()
        prog.forward(1)
        prog.send_forward(1)

    # 4. steady state: (F0 & B1), (F1 & B0)
    for i in range(c - 2 * n + h + 1):
        if i == 0 and meets_middle:
            prog.forward(0)  # its receive was posted in phase 2
            prog.send_forward(1)  # the slot-1 output held back at the end of phase 2
            prog.recv_backward(1)
            prog.backward(1)
            prog.send_forward(0)
            prog.send_backward(1)
        else:
            if i > 0:
                prog.recv_forward(0)
            prog.recv_backward(1)
            prog.overlapped(0, 1)
            prog.send_forward(0)
            prog.send_backward(1)
        prog.recv_forward(1)
        prog.recv_backward(0)
        prog.overlapped(1, 0)
        prog.send_forward(1)
        prog.send_backward(0)

    # 5. drain the forwards
    for _ in range(n - h - 1):
        prog.recv_backward(1)
        prog.backward(1)
        prog.send_backward(1)
        prog.recv_forward(1)
        prog.recv_backward(0)
        prog.overlapped(1, 0)
        prog.send_forward(1)
        prog.send_backward(0)

    # 6. backward pairs; from the middle one on, weights are deferred to fill the tail
    split = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        prog.recv_backward(1)
        prog.backward(1, split_weight=split)
        prog.send_backward(1)
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        prog.recv_backward(0)
        prog.backward(0, split_weight=split)
        prog.send_backward(0)

    # 7. W, B0 (deferred)
    for _ in range(n - h - 1):
        prog.weight()
        prog.recv_backward(0)
        prog.backward(0, split_weight=True)
        prog.send_backward(0)

    # 8. the remaining weight gradients
    while prog.deferred_weights:
        prog.weight()


def dualpipe(pp: int, micro: int) -> PipelineSchedule:
    """DualPipe over ``pp`` ranks (= stages; even) and ``micro`` micro-batches (even, >= 2·pp)."""
    if pp < 2 or pp % 2:
        raise ScheduleError(f"dualpipe: the number of pipeline ranks must be even and >= 2, got pp={pp}")
    if micro % 2 or micro < 2 * pp:
        raise ScheduleError(
            f"dualpipe: the number of micro-batches must be even and >= 2*pp = {2 * pp} "
            f"(half enter at each end), got micro={micro}"
        )
    half = micro // 2
    down = tuple(range(pp))
    up = tuple(pp - 1 - s for s in range(pp))
    placement = tuple(down if m < half else up for m in range(micro))
    n = pp // 2
    programs = []
    for rank in range(pp):
        second_half = rank >= n
        # slot 0 is the stream entering at this rank's end of the pipe
        streams = [list(range(half)), list(range(half, micro))]
        stages = [rank, pp - 1 - rank]
        order = [1, 0] if second_half else [0, 1]
        prog = RankProgram(rank, placement, [stages[d] for d in order], [streams[d] for d in order])
        h = min(rank, pp - 1 - rank)
        _eight_phases(prog, n, h, half, meets_middle=h == n - 1, v_shape=False)
        programs.append(tuple(prog.actions))
    return PipelineSchedule("dualpipe", pp, pp, micro, placement, tuple(programs))


def dualpipev(pp: int, micro: int) -> PipelineSchedule:
    """DualPipeV over ``pp`` ranks (2·pp stages) and ``micro`` micro-batches (>= 2·pp)."""
    if pp < 1:
        raise ScheduleError(f"dualpipev: need at least 1 pipeline rank, got pp={pp}")
    if micro < 2 * pp:
        raise ScheduleError(
            f"dualpipev: the number of micro-batches must be >= 2*pp = {2 * pp}, got micro={micro}"
        )
    num_stages = 2 * pp
    row = tuple(s if s < pp else num_stages - 1 - s for s in range(num_stages))
    placement = tuple(row for _ in range(micro))
    programs = []
    for rank in range(pp):
        micros = list(range(micro))
        prog = RankProgram(rank, placement, [rank, num_stages - 1 - rank], [micros, list(micros)])
        _eight_phases(prog, pp, rank, micro, meets_middle=rank == pp - 1, v_shape=True)
        programs.append(tuple(prog.actions))
    return PipelineSchedule("dualpipev", pp, num_stages, micro, placement, tuple(programs))
