"""SFT batches for frugalm's trainer: chat-formatted (prompt, response) pairs, packed, with a loss mask.

The trainer consumes ``[B, T+1]`` LongTensors (inputs ``[:, :-1]``, labels ``[:, 1:]``). To carry the
loss mask through that interface unchanged, a token that must *not* be predicted (prompt, padding) is
stored as ``-1 - id``; `split_masked` turns a batch back into inputs and labels with ``-100`` (ignored)
there. One function encodes and one decodes, so the convention lives in this module only.

Packing puts several whole examples into each row, in an order reshuffled every epoch (examples are
never cut; one that does not fit in ``seq_len + 1`` tokens is dropped with a warning). Packed
examples can attend to earlier ones in the same row (the model takes no document mask), the usual
trade-off of packing; each starts with BOS, which marks the boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from frugalm.reason.response_format import build_prompt_ids, strip_response_prefix

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
STATE_VERSION = 1


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # ends with EOS

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def tokenize_pair(tokenizer: Any, question: str, response: str, instruction: str,
                  response_prefix: str = "") -> SFTExample:
    """The chat-formatted prompt and the assistant response (plus EOS, as the chat template ends a turn).

    `response` is the whole response; with a `response_prefix` the prompt ends with that prefix and the
    trained-on response is the rest, exactly what generation sees and produces."""
    prompt = build_prompt_ids(tokenizer, question, instruction, response_prefix)
    response = strip_response_prefix(response_prefix, response)
    response_ids = list(tokenizer.encode(response, add_special_tokens=False)) + [tokenizer.eos_id]
    return SFTExample(tuple(prompt), tuple(response_ids))


def encode_row(examples: Sequence[SFTExample], width: int, pad_id: int, completion_only: bool) -> np.ndarray:
    """One row of `width` tokens: the examples back to back, then padding; not-to-predict tokens negated."""
    row = np.full(width, -1 - pad_id, dtype=np.int64)
    pos = 0
    for ex in examples:
        prompt = np.asarray(ex.prompt_ids, dtype=np.int64)
        resp = np.asarray(ex.response_ids, dtype=np.int64)
        row[pos:pos + len(prompt)] = (-1 - prompt) if completion_only else prompt
        # The first prompt token (BOS) is never a target: nothing before it predicts it.
        if not completion_only:
            row[pos] = -1 - prompt[0]
        pos += len(prompt)
        row[pos:pos + len(resp)] = resp
        pos += len(resp)
    return row


def split_masked(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed ``[B, T+1]`` batch -> (inputs ``[B, T]``, labels ``[B, T]`` with IGNORE_INDEX where masked)."""
    ids = torch.where(batch < 0, -1 - batch, batch)
    labels = torch.where(batch[:, 1:] < 0, torch.full_like(batch[:, 1:], IGNORE_INDEX), batch[:, 1:])
    return ids[:, :-1], labels


def pack(examples: Sequence[SFTExample], width: int, packing: bool) -> list[list[int]]:
    """Indices of the examples in each row: greedy in the given order, a new row when the next one
    does not fit (or one example per row without packing)."""
    rows: list[list[int]] = []
    used = width + 1
    for i, ex in enumerate(examples):
        if not packing or used + len(ex) > width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += len(ex)
    return rows


class SFTData:
    """The trainer's data interface (`train_sampler`, `val_batches`, `load_tokenizer`, sizes) over SFT pairs."""

    def __init__(self, tokenizer: Any, train: Sequence[SFTExample], val: Sequence[SFTExample], seq_len: int, *,
                 packing: bool = True, completion_only: bool = True, source: str = "sft"):
        self.tokenizer = tokenizer
        self.width = seq_len + 1
        self.packing = packing
        self.completion_only = completion_only
        self.source = source
        self.train, dropped = self._fit(train)
        self.val, dropped_val = self._fit(val)
        if dropped or dropped_val:
            log.warning("SFT: dropped %d train / %d val examples longer than seq_len + 1 = %d tokens",
                        dropped, dropped_val, self.width)
        if not self.train:
            raise ValueError(f"no SFT example fits in seq_len + 1 = {self.width} tokens; raise sft.seq_len")
        self.vocab_size = tokenizer.vocab_size
        self.train_tokens = sum(len(e) for e in self.train)
        self.val_tokens = sum(len(e) for e in self.val)
        self.dropped = dropped
        h = hashlib.sha256()
        for e in self.train:
            h.update(json.dumps([e.prompt_ids, e.response_ids]).encode())
        h.update(json.dumps([self.width, packing, completion_only]).encode())
        self.fingerprint = h.hexdigest()[:16]

    def _fit(self, examples: Sequence[SFTExample]) -> tuple[list[SFTExample], int]:
        kept = [e for e in examples if len(e) <= self.width]
        return kept, len(examples) - len(kept)

    def load_tokenizer(self) -> Any:
        return self.tokenizer

    def rows(self, examples: Sequence[SFTExample], order: Sequence[int]) -> np.ndarray:
        ordered = [examples[i] for i in order]
        groups = pack(ordered, self.width, self.packing)
        return np.stack([encode_row([ordered[i] for i in g], self.width, self.tokenizer.pad_id, self.completion_only)
                         for g in groups])

    def train_sampler(self, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1) -> "SFTSampler":
        if seq_len + 1 != self.width:
            raise ValueError(f"SFT data was packed for seq_len {self.width - 1}, the trainer asks for {seq_len}")
        return SFTSampler(self, batch_size, seed, rank, world_size)

    def val_batches(self, batch_size: int, seq_len: int, max_batches: Optional[int] = None, rank: int = 0,
                    world_size: int = 1) -> Iterator[torch.Tensor]:
        if not self.val:
            return iter(())
        rows = self.rows(self.val, range(len(self.val)))[rank::world_size]
        if max_batches is not None:
            rows = rows[: max_batches * batch_size]
        return (torch.from_numpy(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size))


class SFTSampler:
    """Endless batches of packed rows; each epoch reshuffles the examples (seed, epoch) and packs anew.

    Resumable like the pre-training sampler: its position (epoch, cursor) goes into checkpoints.
    """

    def __init__(self, data: SFTData, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.data = data
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.cursor = 0
        self._rows: Optional[np.ndarray] = None
        self._rows_epoch = -1

    def _epoch_rows(self) -> np.ndarray:
        if self._rows_epoch != self.epoch:
            order = list(range(len(self.data.train)))
            random.Random(f"sft:{self.seed}:{self.epoch}").shuffle(order)
            self._rows = self.data.rows(self.data.train, order)
            self._rows_epoch = self.epoch
        return self._rows

    def __iter__(self) -> "SFTSampler":
        return self

    def __next__(self) -> torch.Tensor:
        rows = self._epoch_rows()
        take = self.batch_size * self.world_size
        if self.cursor + take > len(rows):
            if self.cursor == 0:  # fewer rows than one batch: repeat them
                reps = -(-take // len(rows))
                rows = np.concatenate([rows] * reps)
            else:
                self.epoch += 1
                self.cursor = 0
                rows = self._epoch_rows()
                if take > len(rows):
                    rows = np.concatenate([rows] * -(-take // len(rows)))
        start = self.cursor + self.rank * self.batch_size
        batch = rows[start:start + self.batch_size]
        self.cursor += take
        return torch.from_numpy(np.ascontiguousarray(batch))

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "sft", "seed": self.seed, "fingerprint": self.data.fingerprint,
                "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "sft" or state.get("version") != STATE_VERSION:
            raise ValueError("the checkpoint's data position is not an SFT sampler's (resume with the same command)")
        for key in ("seed", "fingerprint"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"cannot resume SFT: the {key} of the data changed since the checkpoint "
                                 "(same task, examples, seq_len and packing are needed)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
