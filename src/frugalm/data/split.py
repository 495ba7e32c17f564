"""Choosing the held-out validation documents, deterministically and without reading the text twice.

Validation loss is only honest if no validation text was trained on, so the split is by *document*
and keyed on each document's content hash: exact duplicates always land on the same side, the choice
does not depend on file names or order, and it is the same on every machine. Documents are visited
in hash order and taken while they fit in the character budget (`val_fraction` of the corpus).

A corpus whose documents are all bigger than that budget (one large .txt file, say) would get no
validation set at all; its largest document then gives up its tail instead, cut at a paragraph break.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class DocStat:
    """What the first pass over the corpus remembers about one document."""

    sha256: str
    chars: int


@dataclass(frozen=True)
class SplitPlan:
    val_docs: frozenset[int]  # indices of documents that go to validation whole
    carve_doc: Optional[int]  # a document whose tail goes to validation instead ...
    carve_chars: int  # ... about this many characters of it
    target_chars: int

    def is_val(self, index: int) -> bool:
        return index in self.val_docs


def plan_split(stats: Sequence[DocStat], val_fraction: float) -> SplitPlan:
    total = sum(s.chars for s in stats)
    target = int(total * val_fraction)
    if val_fraction <= 0 or not stats:
        return SplitPlan(frozenset(), None, 0, 0)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(stats):
        groups.setdefault(s.sha256, []).append(i)
    val: set[int] = set()
    val_chars = 0
    for digest in sorted(groups):
        members = groups[digest]
        size = sum(stats[i].chars for i in members)
        if val_chars + size <= target and len(val) + len(members) < len(stats):
            val.update(members)
            val_chars += size
    if val:
        return SplitPlan(frozenset(val), None, 0, target)
    largest = min(range(len(stats)), key=lambda i: (-stats[i].chars, stats[i].sha256, i))
    return SplitPlan(frozenset(), largest, max(1, target), target)


def carve_point(text: str, tail_chars: int) -> int:
    """Where to cut `text` so that about `tail_chars` characters follow: a paragraph break if one is
    near, else a line break, else exactly there. Always leaves text on both sides (len >= 2)."""
    ideal = min(max(1, len(text) - tail_chars), len(text) - 1)
    window = max(1, tail_chars // 4)
    lo, hi = max(1, ideal - window), min(len(text) - 1, ideal + window)
    for sep in ("\n\n", "\n"):
        best = None
        start = lo
        while True:
            j = text.find(sep, start, hi + len(sep))
            if j < 0:
                break
            cut = j + len(sep)
            if lo <= cut <= hi and (best is None or abs(cut - ideal) < abs(best - ideal)):
                best = cut
            start = j + 1
        if best is not None:
            return best
    return ideal
