"""The task contract: examples with a reference answer, an exact checker, and (when known) a reference
chain of thought for SFT.

A task is anything with `examples(split, n, seed)` and `check(answer, row)`. Splits:

* ``train``   – what SFT and GRPO sample from;
* ``test``    – the same distribution, disjoint from ``train`` (problems are assigned to one of the two by
  a hash of the problem, so the split holds whatever ``n`` or seed is used);
* ``heldout`` – *longer* operands than ``train`` ever shows, to measure generalisation rather than recall.

Rows reach reward functions as keyword columns (TRL's convention): ``prompt`` (the question text),
``answer`` (the reference) plus any task-specific columns (``numbers``, ``target`` ...).
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

SPLITS = ("train", "test", "heldout")


class TaskError(ValueError):
    """A task that cannot be built or sampled (bad spec, bad file, impossible size); the message says why."""


@dataclass(frozen=True)
class Example:
    """One problem: `prompt` is the question (the instruction and chat template are added later)."""

    prompt: str
    answer: str
    columns: Mapping[str, Any] = field(default_factory=dict)
    reasoning: Optional[str] = None  # a reference chain of thought, when the task can write one

    def row(self) -> dict[str, Any]:
        """The columns a reward function receives for this example."""
        return {"prompt": self.prompt, "answer": self.answer, **dict(self.columns)}


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    return split


class Task(ABC):
    """A verifiable task. Subclasses implement `examples` and `check`."""

    name: str = "task"

    @abstractmethod
    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` examples of `split`, the same ones for the same (split, n, seed)."""

    @abstractmethod
    def check(self, answer: Optional[str], row: Mapping[str, Any]) -> bool:
        """Whether a parsed answer (None when the completion had none) solves the row's problem."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (Python's `hash` of str is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def in_test_partition(key: str, test_share: int = 10) -> bool:
    """Problems whose hash falls in 1/`test_share` of the space belong to ``test``, the rest to ``train``."""
    return stable_hash(key) % test_share == 0


class GeneratedTask(Task):
    """A task drawn from a seeded generator with a size knob (digits, list length, count of numbers).

    ``train`` and ``test`` draw sizes in [min_size, max_size]; ``heldout`` uses `heldout_size`, which must
    be larger than `max_size`.
    """

    def __init__(self, min_size: int, max_size: int, heldout_size: int):
        if not 1 <= min_size <= max_size:
            raise TaskError(f"{self.name}: need 1 <= min_size <= max_size (got {min_size}, {max_size})")
        if heldout_size <= max_size:
            raise TaskError(f"{self.name}: heldout_size ({heldout_size}) must exceed max_size ({max_size}): "
                            "the held-out split measures longer operands than training")
        self.min_size, self.max_size, self.heldout_size = min_size, max_size, heldout_size

    @abstractmethod
    def sample(self, rng: random.Random, size: int) -> Example:
        """One random problem of the given size."""

    def key(self, example: Example) -> str:
        return example.prompt

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        check_split(split)
        if n < 0:
            raise TaskError(f"n must be >= 0 (got {n})")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: list[Example] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise TaskError(f"{self.name}: could only draw {len(out)} distinct {split} problems of {n}; "
                                "widen the size range")
            size = self.heldout_size if split == "heldout" else rng.randint(self.min_size, self.max_size)
            ex = self.sample(rng, size)
            k = self.key(ex)
            if k in seen:
                continue
            if split != "heldout" and in_test_partition(k) != (split == "test"):
                continue
            seen.add(k)
            out.append(ex)
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "min_size": self.min_size, "max_size": self.max_size,
                "heldout_size": self.heldout_size}
