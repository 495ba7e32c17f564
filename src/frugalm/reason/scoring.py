"""Sample-based metrics: the unbiased pass@k estimator and majority voting (maj@k / cons@k)."""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from frugalm.reason.response_format import normalize_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct), given c correct.

    Chen et al. (2021)'s estimator 1 - C(n-c, k) / C(n, k), computed as a product so it never
    overflows. Unbiased for pass@k whenever n >= k.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n (got c={c}, n={n})")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n (got k={k}, n={n})")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority_answer(answers: Sequence[Optional[str]]) -> Optional[str]:
    """The most frequent answer after normalisation (None answers do not vote); ties go to the answer
    seen first. Returns the first original spelling of the winner, or None if nobody answered."""
    keyed = [(normalize_answer(a), a) for a in answers if a is not None]
    if not keyed:
        return None
    counts = Counter(k for k, _ in keyed)
    best = max(counts.values())
    for k, original in keyed:
        if counts[k] == best:
            return original
    return None  # unreachable
