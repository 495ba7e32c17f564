"""Multi-digit addition with carries; the size knob is the number of digits of the longer operand.

Training problems have a longer operand of min_size..max_size digits; held-out problems have
`heldout_size` digits, more than training ever shows.

Four notations (``notation``):

* ``"plain"`` (default) -- ``357+29=?``, reasoning ``7+9=16, 5+2+1=8, 3+0=3``, answer ``386``. A small model
  learns it within the training lengths but scores 0% one digit longer (BENCHMARKS.md).
* ``"hinted"`` -- every digit carries an *index hint*, a letter naming its place value:
  ``e3d5c7+D2C9=?`` is 357 + 29 (first operand lower-case, second upper-case, the same letter for
  the same place value). The letters start at a random offset in ``a..z`` per problem, so every letter
  is seen at every place value during training. The reference reasoning adds column by column from
  the least significant digit, each step restating its hint, both digits and the carry in, and the
  two-digit column sum: ``c7+C9+0=16d5+D2+1=08e3+E0+0=03`` (a final ``+0+1=01`` step when a carry is
  left). The answer is the sum with its hints, most significant digit first: ``e3d8c6`` (= 386).
  Every step is meant to be position-free: the next hint is the successor of the last one, a digit is
  found by matching its hint, the carry is a fixed distance back (the index-hint recipe for length
  generalisation). Measured so far (BENCHMARKS.md): after 600 SFT steps on 1-3 digits the tiny model
  solves 24.5% of unseen <= 3-digit problems and 0% of 4-digit ones; after 720 steps on 1-6 digits, 11%
  of unseen 1-6-digit problems and 0% of 7-digit ones (it writes 6 columns). So it is not the default.

* ``"padded"`` -- both operands zero-padded to one width, ``heldout_size + 1`` digits, in every split
  (``0000357+0000029=?`` for 1-5-digit training and 6-digit held-out problems); the reasoning is one
  fixed-length step per column, units first, ``<x>+<y>+<carry>=<two-digit sum>,``
  (``7+9+0=16,5+2+1=08,3+0+0=03,0+0+0=00,...``), and the answer is the zero-padded sum (``0000386``; the
  checker also accepts ``386``). Every problem has the same token layout, so nothing in it is longer on
  held-out problems: what is new there is a significant digit in a column that training only ever
  filled with 0. This is extrapolation in the numbers, not in sequence length; the notations above
  test the latter (and a tiny model fails it).

Digits and letters are single tokens in frugalm's tokenizer (and no spaces are used, which would merge
with letters), so each hinted step is ten tokens.

* ``"scratch"`` -- the prompt is plain (``357+29=?``); the reasoning is a scratchpad of lines, each
  ``<carry>:<remaining digit pairs>;<sum digits so far>|``. The first line lists the two operands' digits
  as aligned pairs, units first, the shorter operand padded with 0 (``0:79,52,30,;|``). Each next line
  adds the FIRST remaining pair and the carry, writes the new carry, re-copies the remaining pairs minus
  the first, and prepends the new digit to the digits so far: ``1:52,30,;6|0:30,;86|``. An empty list is
  written ``-``; a carry left over gives one more line (``1:-;000|0:-;1000|``), and the loop ends on the
  line ``0:-;<sum>|``, whose digits the answer copies: ``386``. Whole trace for 357+29:
  ``0:79,52,30,;|1:52,30,;6|0:30,;86|0:-;386|``. Every step reads only the line before it (its first
  pair, its carry, a copy of the rest), and the stop is the content ``0:-``, not a count. Every symbol
  is one token; an n-digit problem's trace is (n+1)(2n+4)+O(n) tokens (quadratic), at most 125 at n = 6.
  Measured (BENCHMARKS.md): after 1,000 SFT steps on 1-5 digits the tiny model solves 71.5% of unseen
  1-5-digit problems and 0% of 6-digit ones (pass@8 0%). The loop itself is nearly exact in range, but the
  first line (the aligned pairs, fetched from the prompt by position) has exactly 5 pairs for 198 of 200
  6-digit problems, and with the right 6-pair line forced in, the loop fails too (0/200): copying a list
  longer than any trained line is not content-based either. So it is not the default.
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping, Optional

from frugalm.reason.tasks.base import Example, GeneratedTask, TaskError

_INT = re.compile(r"[+]?\d+")
_HINTED = re.compile(r"(?:[a-z]\d)+")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NOTATIONS = ("hinted", "padded", "plain", "scratch")


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


def padded_steps(a: int, b: int, width: int) -> str:
    """Every one of `width` columns, units first, as ``<x>+<y>+<carry>=<two-digit sum>,``: fixed-length steps."""
    aligned = pairs(a, b)
    steps, carry = [], 0
    for x, y in aligned + [(0, 0)] * (width - len(aligned)):
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s:02d},")
        carry = s // 10
    return "".join(steps)


def hinted(n: int, offset: int, upper: bool = False) -> str:
    """`n` with a place-value letter before each digit, the units digit lettered ``LETTERS[offset]``."""
    digits = str(n)[::-1]
    if offset < 0 or offset + len(digits) > len(LETTERS):
        raise TaskError(f"hint offset {offset} leaves no letter for {len(digits)} digits")
    letters = LETTERS.upper() if upper else LETTERS
    return "".join(letters[offset + i] + d for i, d in reversed(list(enumerate(digits))))


def hinted_steps(a: int, b: int, offset: int) -> str:
    """Units-first column sums, each ``<hint><x>+<HINT><y>+<carry>=<two-digit sum>``, plus a carry-out step."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry, i = [], 0, 0
    while i < max(len(da), len(db)) or carry:
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{LETTERS[offset + i]}{x}+{LETTERS[offset + i].upper()}{y}+{carry}={s:02d}")
        carry = s // 10
        i += 1
    return "".join(steps)


def pairs(a: int, b: int) -> list[tuple[int, int]]:
    """The operands' digits aligned as (digit of a, digit of b), units first, the shorter padded with 0."""
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    return [(int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0) for i in range(n)]


def scratch_line(carry: int, remaining: list[tuple[int, int]], digits: str) -> str:
    """One scratchpad line: ``<carry>:<pairs, or - when none>;<sum digits so far>|``."""
    listed = "".join(f"{x}{y}," for x, y in remaining) or "-"
    return f"{carry}:{listed};{digits}|"


def scratch_steps(a: int, b: int) -> str:
    """The "scratch" trace: consume the first remaining pair per line until ``0:-;<sum>|``."""
    remaining, carry, digits = pairs(a, b), 0, ""
    lines = [scratch_line(carry, remaining, digits)]
    while remaining or carry:
        x, y = remaining[0] if remaining else (0, 0)
        s = x + y + carry
        remaining, carry, digits = remaining[1:], s // 10, str(s % 10) + digits
        lines.append(scratch_line(carry, remaining, digits))
    return "".join(lines)


def parse_hinted(text: str) -> Optional[tuple[int, int]]:
    """``"e3d8c6"`` -> (386, offset of the units letter); None unless the letters count down by one."""
    if not _HINTED.fullmatch(text):
        return None
    letters = [LETTERS.index(c) for c in text[0::2]]
    if any(p - q != 1 for p, q in zip(letters, letters[1:])):
        return None
    return int(text[1::2]), letters[-1]


class AdditionTask(GeneratedTask):
    name = "addition"

    def __init__(self, min_size: int = 1, max_size: int = 3, heldout_size: int = 4, notation: str = "plain"):
        super().__init__(min_size, max_size, heldout_size)
        if notation not in NOTATIONS:
            raise TaskError(f"addition: unknown notation {notation!r}; choose one of {list(NOTATIONS)}")
        if notation == "hinted" and heldout_size + 1 > len(LETTERS):
            raise TaskError(f"addition: hinted notation has {len(LETTERS)} letters, enough for at most "
                            f"{len(LETTERS) - 1} digits (heldout_size {heldout_size})")
        self.notation = notation
        # padded: both splits share one width, with room for the held-out sum's carry-out digit
        self.width = heldout_size + 1

    def sample(self, rng: random.Random, size: int) -> Example:
        def number(digits: int) -> int:
            return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)

        a = number(size)
        b = number(rng.randint(1, size))
        if rng.random() < 0.5:
            a, b = b, a
        if self.notation == "padded":
            w = self.width
            return Example(prompt=f"{a:0{w}d}+{b:0{w}d}=?", answer=f"{a + b:0{w}d}", columns={"a": a, "b": b},
                           reasoning=padded_steps(a, b, w))
        if self.notation in ("plain", "scratch"):
            steps = column_steps(a, b) if self.notation == "plain" else scratch_steps(a, b)
            return Example(prompt=f"{a}+{b}=?", answer=str(a + b), columns={"a": a, "b": b}, reasoning=steps)
        # room for every digit of the sum (size + 1 places)
        offset = rng.randint(0, len(LETTERS) - (size + 1))
        return Example(prompt=f"{hinted(a, offset)}+{hinted(b, offset, upper=True)}=?",
                       answer=hinted(a + b, offset), columns={"a": a, "b": b, "offset": offset},
                       reasoning=hinted_steps(a, b, offset))

    def key(self, example: Example) -> str:
        # the numbers, not the letters: a test problem is a sum never trained on, whatever its hints
        return f"{example.columns['a']}+{example.columns['b']}"

    def check(self, answer: Optional[str], row: Mapping[str, Any]) -> bool:
        """The sum, as a plain integer or (hinted notation) with the problem's hints, units letter last."""
        if answer is None:
            return False
        s = answer.strip()
        if _HINTED.fullmatch(s):
            offset = row.get("offset")
            if offset is None:  # a row with the reference answer only (e.g. a JSONL of traces)
                reference = parse_hinted(str(row.get("answer", "")).strip())
                offset = None if reference is None else reference[1]
            parsed = parse_hinted(s)
            return offset is not None and parsed is not None and parsed[1] == int(offset) and parsed[0] == _value(row)
        if not _INT.fullmatch(s):
            return False
        return int(s) == _value(row)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "notation": self.notation}


def _value(row: Mapping[str, Any]) -> int:
    if "a" in row and "b" in row:
        return int(row["a"]) + int(row["b"])
    answer = str(row["answer"])
    parsed = parse_hinted(answer)
    return parsed[0] if parsed else int(answer)
