"""The schedule description shared by the simulator and the real pipeline executor.

A schedule is, for every pipeline rank, an ordered list of actions. Compute actions name a
(micro-batch, stage) chunk; communication actions name one message of the pipeline's dataflow graph.
Both `frugalm.parallel.sim` and `frugalm.parallel.pipeline` walk exactly these lists with the same
rule, so the simulated picture is what runs:

* ``Send``/``Recv`` actions are *posted*, not waited for, where they appear. Everything posted since
  the previous compute action is launched as one batch (``batch_isend_irecv``) right before the next
  compute action. F, B and F&B slots first wait for every launched batch; a W slot needs no data, so
  it runs while its batch is in flight (the end of the list waits for everything). A batch finishes
  only when every message in it has met its partner, so a send also waits for the receiver to post
  its receive: this is NCCL's behaviour and the strictest one, so a schedule that runs in the
  simulator runs on gloo and NCCL alike.
* A message is identified by ``(payload, micro, src_stage)``: the activation leaving ``src_stage``
  or the gradient leaving it (towards ``src_stage - 1``). Between any two ranks, messages in one
  direction are received in the order they are sent (NCCL ignores tags); `validate` checks this.
* Edges between two stages that sit on the same rank (DualPipeV's turn at the last rank) carry no
  message: the executor hands the tensor over locally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

ComputeKind = Literal["F", "B", "W"]
Payload = Literal["act", "grad"]


@dataclass(frozen=True)
class Compute:
    """Forward (F), backward (B) or deferred weight-gradient (W) of one stage for one micro-batch.

    ``split_weight`` on a B means "input gradient only": the weight gradient is left for a later W of
    the same chunk, which is how zero-bubble schedules fill idle slots.
    """

    kind: ComputeKind
    micro: int
    stage: int
    split_weight: bool = False

    def __str__(self) -> str:
        tail = "*" if self.split_weight else ""
        return f"{self.kind}{self.micro}@s{self.stage}{tail}"


@dataclass(frozen=True)
class Overlapped:
    """A forward and a backward of different chunks run as one slot (DualPipe's "F&B").

    The slot needs both inputs before it starts and publishes both results when it ends, which is how
    a real overlapped kernel pair (attention/MLP of one chunk hiding the all-to-all of the other)
    behaves.
    """

    forward: Compute
    backward: Compute

    def __str__(self) -> str:
        return f"{self.forward}&{self.backward}"


@dataclass(frozen=True)
class Comm:
    """Post a send or a receive of one message; it is committed before the next compute action."""

    kind: Literal["send", "recv"]
    payload: Payload
    micro: int
    src_stage: int
    peer: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.payload, self.micro, self.src_stage)

    @property
    def dst_stage(self) -> int:
        return self.src_stage + 1 if self.payload == "act" else self.src_stage - 1

    def __str__(self) -> str:
        arrow = "->" if self.kind == "send" else "<-"
        return f"{self.kind}:{self.payload}{self.micro}@s{self.src_stage}{arrow}r{self.peer}"


Action = Union[Compute, Overlapped, Comm]


class ScheduleError(ValueError):
    """A schedule that cannot be built for these arguments, or that is internally inconsistent."""


@dataclass(frozen=True)
class PipelineSchedule:
    """Per-rank action lists plus where every (micro-batch, stage) chunk runs.

    ``placement[m][s]`` is the rank that runs stage ``s`` for micro-batch ``m``. For DualPipe a stage
    is held by two ranks (one per direction), so placement depends on the micro-batch.
    """

    name: str
    num_ranks: int
    num_stages: int
    num_micro: int
    placement: tuple[tuple[int, ...], ...]
    actions: tuple[tuple[Action, ...], ...]

    def rank_of(self, micro: int, stage: int) -> int:
        return self.placement[micro][stage]

    def stages_on(self, rank: int) -> tuple[int, ...]:
        """Stages whose parameters rank ``rank`` must hold (sorted)."""
        return tuple(sorted({s for row in self.placement for s, r in enumerate(row) if r == rank}))

    def holders(self, stage: int) -> tuple[int, ...]:
        """Ranks holding a copy of ``stage``; more than one means their gradients must be summed."""
        return tuple(sorted({row[stage] for row in self.placement}))

    def input_ranks(self) -> tuple[int, ...]:
        """Ranks that feed micro-batch inputs into stage 0."""
        return tuple(sorted({row[0] for row in self.placement}))

    def loss_ranks(self) -> tuple[int, ...]:
        """Ranks that run the last stage, hence need labels and compute the loss."""
        return tuple(sorted({row[-1] for row in self.placement}))

    def describe(self, rank: int) -> str:
        return " ".join(str(a) for a in self.actions[rank])


def compute_chunks(action: Action) -> tuple[Compute, ...]:
    """The compute units inside an action (two for an overlapped pair, none for communication)."""
    if isinstance(action, Compute):
        return (action,)
    if isinstance(action, Overlapped):
        return (action.forward, action.backward)
    return ()


def validate(schedule: PipelineSchedule) -> None:
    """Check that every rank's list is a complete, consistent program; raise ScheduleError if not.

    Checks: each chunk has one F and one B on its placed rank, every split B has exactly one later W;
    each compute finds its inputs earlier in the same list (a local producer or a posted receive);
    every cross-rank edge has one matching send and receive; and per (src, dst) rank pair, messages
    are received in send order. Deadlock freedom is the simulator's job (`frugalm.parallel.sim`).
    """
    S, M = schedule.num_stages, schedule.num_micro
    seen: dict[tuple[str, int, int], int] = {}
    sends: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    recvs: dict[tuple[int, int], list[tuple[str, int, int]]] = {}

    def err(rank: int, msg: str) -> ScheduleError:
        return ScheduleError(f"{schedule.name}: rank {rank}: {msg}")

    for rank, acts in enumerate(schedule.actions):
        done: set[tuple[str, int, int]] = set()
        posted: set[tuple[str, int, int]] = set()
        split: set[tuple[int, int]] = set()
        for action in acts:
            if isinstance(action, Comm):
                m, s = action.micro, action.src_stage
                if action.kind == "send":
                    if action.payload == "act" and ("F", m, s) not in done:
                        raise err(rank, f"{action} before its forward")
                    if action.payload == "grad" and ("B", m, s) not in done:
                        raise err(rank, f"{action} before its backward")
                    if schedule.rank_of(m, s) != rank or schedule.rank_of(m, action.dst_stage) != action.peer:
                        raise err(rank, f"{action} has wrong endpoints")
                    sends.setdefault((rank, action.peer), []).append(action.key)
                else:
                    if schedule.rank_of(m, action.dst_stage) != rank or schedule.rank_of(m, s) != action.peer:
                        raise err(rank, f"{action} has wrong endpoints")
                    recvs.setdefault((action.peer, rank), []).append(action.key)
                    posted.add(action.key)
                continue
            for c in compute_chunks(action):
                m, s = c.micro, c.stage
                if not (0 <= m < M and 0 <= s < S):
                    raise err(rank, f"{c} out of range")
                if c.kind != "W" and schedule.rank_of(m, s) != rank:
                    raise err(rank, f"{c} placed on rank {schedule.rank_of(m, s)}")
                if c.kind == "F" and s > 0:
                    local = schedule.rank_of(m, s - 1) == rank
                    if (local and ("F", m, s - 1) not in done) or (not local and ("act", m, s - 1) not in posted):
                        raise err(rank, f"{c} runs before its input arrives")
                if c.kind == "B":
                    if ("F", m, s) not in done:
                        raise err(rank, f"{c} before its forward")
                    if s < S - 1:
                        local = schedule.rank_of(m, s + 1) == rank
                        if (local and ("B", m, s + 1) not in done) or (not local and ("grad", m, s + 1) not in posted):
                            raise err(rank, f"{c} runs before its output gradient arrives")
                    if c.split_weight:
                        split.add((m, s))
                if c.kind == "W":
                    if (m, s) not in split:
                        raise err(rank, f"{c} without an earlier input-only backward")
                    split.discard((m, s))
                key = (c.kind, m, s)
                if key in seen:
                    raise err(rank, f"{c} appears twice")
                seen[key] = rank
                done.add(key)
        if split:
            raise err(rank, f"weight gradients never computed for {sorted(split)}")
    for m in range(M):
        for s in range(S):
            for kind in ("F", "B"):
                if (kind, m, s) not in seen:
                    raise ScheduleError(f"{schedule.name}: {kind}{m}@s{s} is never run")
    for pair in set(sends) | set(recvs):
        if sends.get(pair, []) != recvs.get(pair, []):
            raise ScheduleError(
                f"{schedule.name}: messages rank {pair[0]} -> rank {pair[1]} are received in a different "
                f"order than sent: sent {sends.get(pair, [])}, received {recvs.get(pair, [])}"
            )
