"""A small helper that writes one rank's action list, deriving messages from the placement.

Schedules differ in the order of their chunks and in *where* they post receives and sends; which
rank a message goes to never needs to be spelled out, because the placement table says where the
neighbouring stage of each micro-batch runs. Keeping that bookkeeping here lets each schedule module
read like the schedule's paper description.
"""

from __future__ import annotations

from collections import deque

from frugalm.parallel.schedules.actions import Action, Comm, Compute, Overlapped


class RankProgram:
    """Builds the action list of one rank, with per-slot FIFO counters for chunks and messages.

    A *slot* is one of the stage modules the rank holds (1F1B: one; DualPipe/V: two). Inside a slot the
    rank processes micro-batches in a fixed order (``slot_micros``); every call below takes the next
    micro-batch of that slot for its kind of work, so forward, backward, receive and send counters
    advance independently, as in a hand-written schedule.
    """

    def __init__(
        self,
        rank: int,
        placement: tuple[tuple[int, ...], ...],
        slot_stage: list[int],
        slot_micros: list[list[int]],
    ) -> None:
        self.rank = rank
        self.placement = placement
        self.num_stages = len(placement[0])
        self.slot_stage = slot_stage
        self.slot_micros = slot_micros
        self.actions: list[Action] = []
        names = ("f", "b", "recv_f", "send_f", "recv_b", "send_b")
        self._next = {n: [0] * len(slot_stage) for n in names}
        self._pending_w: deque[Compute] = deque()

    def _take(self, counter: str, slot: int) -> tuple[int, int]:
        i = self._next[counter][slot]
        self._next[counter][slot] += 1
        return self.slot_micros[slot][i], self.slot_stage[slot]

    def _peer(self, micro: int, stage: int) -> int | None:
        """Rank running (micro, stage), or None if it is off the pipe's ends or on this rank."""
        if not 0 <= stage < self.num_stages:
            return None
        peer = self.placement[micro][stage]
        return None if peer == self.rank else peer

    def recv_forward(self, slot: int) -> None:
        m, s = self._take("recv_f", slot)
        peer = self._peer(m, s - 1)
        if peer is not None:
            self.actions.append(Comm("recv", "act", m, s - 1, peer))

    def send_forward(self, slot: int) -> None:
        m, s = self._take("send_f", slot)
        peer = self._peer(m, s + 1)
        if peer is not None:
            self.actions.append(Comm("send", "act", m, s, peer))

    def recv_backward(self, slot: int) -> None:
        m, s = self._take("recv_b", slot)
        peer = self._peer(m, s + 1)
        if peer is not None:
            self.actions.append(Comm("recv", "grad", m, s + 1, peer))

    def send_backward(self, slot: int) -> None:
        m, s = self._take("send_b", slot)
        peer = self._peer(m, s - 1)
        if peer is not None:
            self.actions.append(Comm("send", "grad", m, s, peer))

    def _forward(self, slot: int) -> Compute:
        m, s = self._take("f", slot)
        return Compute("F", m, s)

    def _backward(self, slot: int, split_weight: bool) -> Compute:
        m, s = self._take("b", slot)
        chunk = Compute("B", m, s, split_weight)
        if split_weight:
            self._pending_w.append(Compute("W", m, s))
        return chunk

    def forward(self, slot: int) -> None:
        self.actions.append(self._forward(slot))

    def backward(self, slot: int, split_weight: bool = False) -> None:
        self.actions.append(self._backward(slot, split_weight))

    def overlapped(self, f_slot: int, b_slot: int) -> None:
        self.actions.append(Overlapped(self._forward(f_slot), self._backward(b_slot, False)))

    def weight(self) -> None:
        """Run the oldest deferred weight gradient (FIFO, like DualPipe's WeightGradStore)."""
        self.actions.append(self._pending_w.popleft())

    @property
    def deferred_weights(self) -> int:
        return len(self._pending_w)
