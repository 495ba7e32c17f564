"""Reward functions: plain callables ``f(prompts, completions, **columns) -> list[float | None]``.

That is TRL's signature, so reward functions written for `GRPOTrainer` work here unchanged. Columns
are the task's row fields (``answer``, ``numbers``, ``target`` ...) as lists aligned with the
completions, plus ``completion_ids`` (token ids) and ``truncated``. ``None`` means "does not apply to
this sample" and is skipped when rewards are combined (TRL's convention); a sample every function
skips is an error, because it would silently get reward 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from frugalm.reason.response_format import extract_answer, format_ok

RewardFunc = Callable[..., list[Optional[float]]]


def accuracy_reward(task: Any) -> RewardFunc:
    """1.0 when the answer parsed from ``<answer>`` (or ``\\boxed{}``) passes the task's checker, else 0.0."""

    def accuracy(prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[Optional[float]]:
        rows = _rows(prompts, columns)
        return [1.0 if task.check(extract_answer(c), row) else 0.0 for c, row in zip(completions, rows)]

    return accuracy


def format_reward(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[Optional[float]]:
    """1.0 for ``<think>…</think><answer>…</answer>`` and nothing else, else 0.0 (R1-Zero's format reward)."""
    return [1.0 if format_ok(c) else 0.0 for c in completions]


def overlong_penalty(max_completion_length: int, buffer: int) -> RewardFunc:
    """DAPO's soft overlong punishment: 0 up to ``max - buffer`` tokens, then linearly down to -1 at ``max``."""
    if not 0 < buffer < max_completion_length:
        raise ValueError(f"need 0 < buffer < max_completion_length (got {buffer}, {max_completion_length})")

    def overlong(prompts: Sequence[str], completions: Sequence[str], *, completion_ids: Sequence[Sequence[int]],
                 **columns: Any) -> list[Optional[float]]:
        free = max_completion_length - buffer
        return [max(-1.0, min(0.0, (free - len(ids)) / buffer)) for ids in completion_ids]

    return overlong


def _rows(prompts: Sequence[str], columns: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-sample rows from column lists; non-column keywords (TRL also passes `trainer_state` and logging
    callables) are ignored."""
    n = len(prompts)
    keys = [k for k, v in columns.items() if k not in ("completion_ids", "truncated")
            and isinstance(v, (list, tuple)) and len(v) == n]
    return [{"prompt": p, **{k: columns[k][i] for k in keys}} for i, p in enumerate(prompts)]


@dataclass
class RewardResult:
    total: list[float]  # weighted sum per completion
    per_func: dict[str, list[float]]  # each function's raw values (NaN where it returned None)


class RewardModel:
    """Named reward functions with weights; `score` runs them all and combines."""

    def __init__(self, funcs: Mapping[str, RewardFunc], weights: Optional[Sequence[float]] = None):
        if not funcs:
            raise ValueError("at least one reward function is needed")
        self.funcs = dict(funcs)
        weights = [1.0] * len(self.funcs) if weights is None else list(weights)
        if len(weights) != len(self.funcs):
            raise ValueError(f"{len(weights)} reward weights for {len(self.funcs)} reward functions")
        self.weights = dict(zip(self.funcs, (float(w) for w in weights)))

    def score(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> RewardResult:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        per: dict[str, list[float]] = {}
        for name, fn in self.funcs.items():
            values = fn(list(prompts), list(completions), **columns)
            if not isinstance(values, (list, tuple)) or len(values) != n:
                got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
                raise ValueError(f"reward function {name!r} returned {got} values for {n} completions "
                                 "(it must return a list with one float or None per completion)")
            row = []
            for v in values:
                if v is None:
                    row.append(math.nan)
                elif isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"reward function {name!r} returned {v!r}; rewards are floats or None")
                else:
                    row.append(float(v))
            per[name] = row
        total = []
        for i in range(n):
            parts = [(self.weights[k] * per[k][i]) for k in per if not math.isnan(per[k][i])]
            if not parts:
                raise ValueError(f"every reward function returned None for completion {i}; "
                                 "at least one must score each completion")
            total.append(sum(parts))
        return RewardResult(total=total, per_func=per)


def build_reward_model(task: Any, names: Sequence[str], weights: Optional[Sequence[float]] = None, *,
                       max_completion_length: int = 64, overlong_buffer: int = 16,
                       extra: Optional[Mapping[str, RewardFunc]] = None) -> RewardModel:
    """The built-in rewards by name (accuracy, format, overlong) plus any custom callables in `extra`."""
    funcs: dict[str, RewardFunc] = {}
    for name in names:
        if name == "accuracy":
            funcs[name] = accuracy_reward(task)
        elif name == "format":
            funcs[name] = format_reward
        elif name == "overlong":
            funcs[name] = overlong_penalty(max_completion_length, overlong_buffer)
        else:
            raise ValueError(f"unknown built-in reward {name!r}; use accuracy, format, overlong or pass a callable")
    for name, fn in (extra or {}).items():
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        funcs[name] = fn
    if weights is not None and extra:
        weights = list(weights) + [1.0] * (len(funcs) - len(weights))
    return RewardModel(funcs, weights)
