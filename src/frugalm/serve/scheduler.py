"""Continuous batching: which sequences run this step, and how many tokens each feeds.

Each step has a token budget. Running sequences go first, in arrival order: a decoding sequence feeds
its newest token plus its draft tokens, a sequence still prefilling feeds the next chunk of its prompt.
Then waiting sequences are admitted while budget, `max_num_seqs` and free blocks allow, each starting
after its longest cached prefix. Decodes and prefill chunks share a step (as in vLLM V1), so a long
prompt delays running streams by at most one budget's worth of work.

When a running sequence needs a block and none is free, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed later (its full blocks
usually survive in the prefix cache, so recomputing is cheap).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from frugalm.serve.block_manager import BlockManager
from frugalm.serve.config import EngineConfig
from frugalm.serve.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: `token_ids` are fed at positions start, start+1, ..."""

    seq: Sequence
    start: int
    token_ids: list[int]
    decode: bool  # True: absorbed attention over the cache (newest token + drafts); False: prefill chunk
    num_drafts: int = 0

    @property
    def samples(self) -> bool:
        """Whether this step ends at the sequence's newest token, so its logits pick the next one."""
        return self.start + len(self.token_ids) >= len(self.seq.token_ids)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.num_computed = 0
        seq.drafts = []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ one step
    def schedule(self) -> list[ScheduledSeq]:
        cfg = self.config
        bm = self.block_manager
        budget = cfg.max_num_batched_tokens
        out: list[ScheduledSeq] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.is_decoding:
                drafts = seq.drafts[: budget - 1]
                tokens = [seq.token_ids[-1]] + drafts
                decode = True
            else:
                remaining = len(seq.token_ids) - seq.num_computed
                q = min(remaining, budget) if cfg.enable_chunked_prefill else remaining
                if q > budget and out:
                    break
                tokens = seq.token_ids[seq.num_computed: seq.num_computed + q]
                drafts = []
                decode = False
            preempted_self = False
            while not bm.ensure(seq, seq.num_computed + len(tokens)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    preempted_self = True
                    break
            if preempted_self:
                break
            seq.drafts = drafts
            out.append(ScheduledSeq(seq, seq.num_computed, tokens, decode, len(drafts)))
            budget -= len(tokens)
            i += 1

        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            hits, hashes = bm.match_prefix(seq.token_ids)
            cached = len(hits) * bm.block_size
            remaining = len(seq.token_ids) - cached
            if cfg.enable_chunked_prefill:
                q = min(remaining, budget)
            else:
                if remaining > budget and out:
                    break
                q = remaining
            if not bm.can_admit(hits, cached + q):
                break
            self.waiting.popleft()
            bm.admit(seq, hits, hashes, cached + q)
            seq.status = SequenceStatus.RUNNING
            seq.drafts = []
            self.running.append(seq)
            out.append(ScheduledSeq(seq, cached, seq.token_ids[cached: cached + q], False))
            budget -= q
        return out

    def find(self, request_id: str) -> Optional[Sequence]:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None
