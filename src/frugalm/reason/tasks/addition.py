"""Multi-digit addition with carries; the size knob is the number of digits of the longer operand.

Training problems have a longer operand of min_size..max_size digits; held-out problems have
`heldout_size` digits, more than training ever shows. (Small rotary-position models do not extrapolate
to unseen digit positions, see BENCHMARKS.md: addition is the hard, honest test of that.)

The reference reasoning adds column by column from the right, writing the carry into each step
("7+3+1=11"), which is the procedure a small model can execute token by token; the answer is then
the sum read back. Digits are single tokens in frugalm's tokenizer, so every step is a few tokens.
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping, Optional

from frugalm.reason.tasks.base import Example, GeneratedTask

_INT = re.compile(r"[+]?\d+")


def column_steps(a: int, b: int) -> str:
    """Right-to-left column additions with the incoming carry, e.g. 58 + 67 -> "8+7=15, 5+6+1=12"."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return ", ".join(steps)


class AdditionTask(GeneratedTask):
    name = "addition"

    def __init__(self, min_size: int = 1, max_size: int = 3, heldout_size: int = 4):
        super().__init__(min_size, max_size, heldout_size)

    def sample(self, rng: random.Random, size: int) -> Example:
        def number(digits: int) -> int:
            return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)

        a = number(size)
        b = number(rng.randint(1, size))
        if rng.random() < 0.5:
            a, b = b, a
        return Example(prompt=f"{a}+{b}=?", answer=str(a + b), columns={"a": a, "b": b},
                       reasoning=column_steps(a, b))

    def check(self, answer: Optional[str], row: Mapping[str, Any]) -> bool:
        if answer is None:
            return False
        s = answer.strip()
        if not _INT.fullmatch(s):
            return False
        return int(s) == int(row["answer"])
