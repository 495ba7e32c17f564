"""Batches for training and evaluation, in an order that is a pure function of (seed, epoch, position).

Exact resume needs the *data position* to be a couple of integers, not an RNG's internal state, and
the order must not change with numpy or torch versions. So each epoch's order of windows is defined
here: window i gets the key splitmix64(i XOR salt(seed, epoch)), a bijection, and the epoch visits
windows by ascending key. The sampler's state is then just (epoch, cursor).

Data parallelism: a *global* batch is ``batch_size * world_size`` consecutive windows of that order and
rank r takes the r-th slice of ``batch_size``, so ranks see disjoint windows and world_size 1 is the
plain stream. The last windows of an epoch that cannot fill a global batch are skipped (they come up
at other positions in later epochs).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch

from frugalm.data.errors import DataError
from frugalm.data.shards import TokenSplit

_MASK64 = (1 << 64) - 1
STATE_VERSION = 1


def _splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 on uint64 (numpy wraps on overflow, which is the intended mod 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_order(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of window indices visited in `epoch` (int64, length `num_windows`)."""
    salt = _splitmix64_int((seed & _MASK64) ^ _splitmix64_int(epoch & _MASK64))
    with np.errstate(over="ignore"):
        keys = _splitmix64_array(np.arange(num_windows, dtype=np.uint64) ^ np.uint64(salt))
    return np.argsort(keys, kind="stable").astype(np.int64)


def _check_geometry(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be > 0 (got {batch_size}, {seq_len})")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size (got rank={rank}, world_size={world_size})")


class TrainSampler:
    """Endless iterator of training batches: LongTensor ``[batch_size, seq_len + 1]`` per call.

    Use ``batch[:, :-1]`` as inputs and ``batch[:, 1:]`` as labels. `batch_size` is per rank.
    """

    def __init__(
        self, split: TokenSplit, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        _check_geometry(batch_size, seq_len, rank, world_size)
        self.split = split
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self._cumulative = np.cumsum(split.windows_per_shard(seq_len))
        self.num_windows = int(self._cumulative[-1]) if len(self._cumulative) else 0
        if self.num_windows < self.global_batch:
            raise DataError(
                f"the {split.name} split has {self.num_windows} windows of {seq_len + 1} tokens "
                f"({split.num_tokens} tokens), fewer than one global batch of {self.global_batch}; "
                "use more data or a smaller batch_size/seq_len"
            )
        self.epoch = 0
        self.cursor = 0  # index into this epoch's order of the next global batch
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    def __iter__(self) -> "TrainSampler":
        return self

    def __next__(self) -> torch.Tensor:
        if self.cursor + self.global_batch > self.num_windows:
            self.epoch += 1
            self.cursor = 0
        if self._order_epoch != self.epoch:
            self._order = epoch_order(self.num_windows, self.seed, self.epoch)
            self._order_epoch = self.epoch
        start = self.cursor + self.rank * self.batch_size
        indices = self._order[start:start + self.batch_size]
        self.cursor += self.global_batch
        return torch.from_numpy(self.split.windows(indices, self.seq_len, self._cumulative))

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, as JSON-serializable ints/strings (stored in checkpoints)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_windows": self.num_windows,
            "data_fingerprint": self.split.fingerprint,
            "epoch": self.epoch,
            "cursor": self.cursor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the next batch equals the one the saving sampler would have produced.

        The seed, window length and data must match (else the position means something else). Batch
        size and world size may change (the position is counted in windows), but then the continuation
        is no longer identical to the uninterrupted run.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(f"sampler state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "seq_len", "num_windows", "data_fingerprint"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot resume the data stream: {key} was {state.get(key)!r} when saved, now {mine[key]!r}"
                )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= self.num_windows:
            raise DataError(f"sampler state has an invalid position (epoch={epoch}, cursor={cursor})")
        self.epoch, self.cursor = epoch, cursor


class ValBatches:
    """The validation windows in file order, ``batch_size`` per batch: the same batches on every pass.

    Windows are dealt round-robin over ranks; `max_batches` caps the batches per rank (evaluation on a
    fixed prefix keeps eval time bounded on large validation sets). The last batch may be smaller.
    """

    def __init__(
        self,
        split: TokenSplit,
        batch_size: int,
        seq_len: int,
        max_batches: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_geometry(batch_size, seq_len, rank, world_size)
        if max_batches is not None and max_batches <= 0:
            raise ValueError(f"max_batches must be > 0 or None (got {max_batches})")
        self.split = split
        self.batch_size = batch_size
        self.seq_len = seq_len
        self._cumulative = np.cumsum(split.windows_per_shard(seq_len))
        total = int(self._cumulative[-1]) if len(self._cumulative) else 0
        if total == 0:
            raise DataError(
                f"the {split.name} split has {split.num_tokens} tokens, fewer than one window of {seq_len + 1}; "
                "raise data.val_fraction or lower seq_len"
            )
        if max_batches is not None:
            total = min(total, max_batches * batch_size * world_size)
        self.indices = np.arange(rank, total, world_size, dtype=np.int64)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    @property
    def num_label_tokens(self) -> int:
        return len(self.indices) * self.seq_len

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start:start + self.batch_size]
            yield torch.from_numpy(self.split.windows(chunk, self.seq_len, self._cumulative))
