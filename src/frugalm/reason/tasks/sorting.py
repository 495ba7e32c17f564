"""Sort a short list of distinct integers ascending; the size knob is the list length.

With the default values 0..9 every number is one token and the lists are permutations of distinct
digits, so each output step is a comparison of token *contents* ("the smallest number above the last
one written"), which a small model can learn without counting positions. The reference reasoning is
the chain of comparisons, e.g. ``1<3<7``.
Larger `max_value` gives multi-token numbers (harder); lists stay distinct while they can.

Notation ``"marks"`` replaces that chain with a counting sort: one step per possible value, in order,
marking whether the list holds it (``0-1+2-3+4-5-6-7+8-9-`` for ``7 1 3``; ``v+`` repeats for a duplicate).
The trace has the same length for every list, each step is a membership test of one value against
the prompt (content, not position), and the answer lists the marked values. The chain notation stops
after as many numbers as the longest training list (BENCHMARKS.md); this one has no such count.
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping, Optional

from frugalm.reason.tasks.base import Example, GeneratedTask, TaskError

_LIST = re.compile(r"\s*-?\d+(\s*[,\s]\s*-?\d+)*\s*")


NOTATIONS = ("marks", "plain")


def marks(numbers: list[int], max_value: int) -> str:
    """The counting-sort trace: every value 0..max_value in order, ``+`` once per occurrence, else ``-``."""
    return "".join(f"{v}+" * numbers.count(v) if v in numbers else f"{v}-" for v in range(max_value + 1))


def parse_int_list(text: Optional[str]) -> Optional[list[int]]:
    """"3, 7 19" -> [3, 7, 19]; anything that is not only integers and separators -> None."""
    if text is None or not _LIST.fullmatch(text):
        return None
    return [int(x) for x in re.findall(r"-?\d+", text)]


class SortTask(GeneratedTask):
    name = "sort"

    def __init__(self, min_size: int = 3, max_size: int = 5, heldout_size: int = 7, max_value: int = 9,
                 notation: str = "plain"):
        super().__init__(min_size, max_size, heldout_size)
        if max_value < 1:
            raise TaskError(f"sort: max_value must be >= 1 (got {max_value})")
        if notation not in NOTATIONS:
            raise TaskError(f"sort: unknown notation {notation!r}; choose one of {list(NOTATIONS)}")
        self.max_value = max_value
        self.notation = notation

    def sample(self, rng: random.Random, size: int) -> Example:
        if size <= self.max_value + 1:
            xs = rng.sample(range(self.max_value + 1), size)
        else:
            xs = [rng.randint(0, self.max_value) for _ in range(size)]
        ys = sorted(xs)
        reasoning = "<".join(map(str, ys)) if self.notation == "plain" else marks(xs, self.max_value)
        return Example(prompt="Sort ascending: " + " ".join(map(str, xs)), answer=" ".join(map(str, ys)),
                       columns={"numbers": xs}, reasoning=reasoning)

    def check(self, answer: Optional[str], row: Mapping[str, Any]) -> bool:
        got = parse_int_list(answer)
        numbers = row.get("numbers")
        expected = sorted(numbers) if numbers is not None else parse_int_list(str(row["answer"]))
        return got is not None and got == expected

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_value": self.max_value, "notation": self.notation}
