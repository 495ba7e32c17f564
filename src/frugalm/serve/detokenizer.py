"""Output text: incremental decoding, stop strings, and what is safe to stream.

Byte-level BPE can split one character over several tokens, and a stop string can arrive one token at a
time; streaming either too early would send text that later has to be taken back. So the streamable
text is the decoded output minus a trailing incomplete character and minus any tail that could still
grow into a stop string.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

REPLACEMENT = "\ufffd"


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> Optional[int]:
    """Index of the earliest occurrence of any stop string in text[start:], or None."""
    best = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters must wait: a partial UTF-8 character or a possible stop-string prefix."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    n = len(text)
    while n > 0 and text[n - 1] == REPLACEMENT:
        n -= 1
    return max(hold, len(text) - n)


def decode(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def truncate_at_stop(tokenizer: Any, ids: Sequence[int], stops: Sequence[str], first: int,
                     skip_special_tokens: bool = True) -> tuple[int, str]:
    """Fewest output tokens (at least `first`) whose text contains a stop string, and that text cut before it.

    Called once per stopped request, when the stop string has already been seen in the full text.
    """
    for m in range(max(first, 1), len(ids) + 1):
        text = decode(tokenizer, ids[:m], skip_special_tokens)
        i = find_stop(text, stops)
        if i is not None:
            return m, text[:i]
    text = decode(tokenizer, ids, skip_special_tokens)  # unreachable when the caller saw a stop string
    i = find_stop(text, stops)
    return len(ids), text if i is None else text[:i]
