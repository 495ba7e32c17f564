"""Tasks users bring: a JSONL file of ``{prompt, answer}`` rows, or a Python file with a checker.

JSONL rows need ``prompt`` (the question) and ``answer``; an optional ``reasoning`` becomes the SFT
chain of thought, an optional ``split`` (train/test/heldout) assigns the row, and every other key is
passed to rewards as a column. Without a ``split`` column, rows are assigned to train/test by a hash
of the prompt and the held-out split comes from `heldout_path`.

The default checker compares the normalised answer exactly (``"007"`` == ``"7"``); a custom one is
``FILE.py:function`` with signature ``check(answer: str | None, row: dict) -> bool``.

A Python task file defines ``examples(split, n, seed) -> list[dict]`` (rows as above) and
``check(answer, row) -> bool``; ``FILE.py:NAME`` instead names a `Task` subclass or instance in it.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from frugalm.reason.response_format import normalize_answer
from frugalm.reason.tasks.base import SPLITS, Example, Task, TaskError, check_split, in_test_partition

Checker = Callable[[Optional[str], Mapping[str, Any]], bool]


def exact_match(answer: Optional[str], row: Mapping[str, Any]) -> bool:
    """Normalised exact match against ``row["answer"]`` (whitespace collapsed, numbers canonical)."""
    return answer is not None and normalize_answer(answer) == normalize_answer(str(row["answer"]))


def load_python_object(spec: str, default_name: Optional[str] = None) -> Any:
    """``path/to/file.py:name`` -> that object (the module is imported from the file, not from sys.path)."""
    path_text, _, name = spec.partition(":")
    name = name or default_name
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise TaskError(f"no such Python file: {path}")
    module_name = f"frugalm_user_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        spec_obj = importlib.util.spec_from_file_location(module_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise TaskError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec_obj)
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:  # user code: report what failed, where
            raise TaskError(f"importing {path} failed: {type(e).__name__}: {e}") from e
        sys.modules[module_name] = module
    if name is None:
        return module
    if not hasattr(module, name):
        raise TaskError(f"{path} defines no {name!r}")
    return getattr(module, name)


def load_checker(spec: Optional[str]) -> Checker:
    if not spec:
        return exact_match
    fn = load_python_object(spec, "check")
    if not callable(fn):
        raise TaskError(f"checker {spec!r} is not callable")
    return fn


def row_to_example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("prompt", "answer") if k not in row]
    if missing:
        raise TaskError(f"{where}: missing {', '.join(missing)} (rows need 'prompt' and 'answer')")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise TaskError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(row["answer"], (str, int, float)) or isinstance(row["answer"], bool):
        raise TaskError(f"{where}: 'answer' must be a string or a number")
    reasoning = row.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        raise TaskError(f"{where}: 'reasoning' must be a string")
    columns = {k: v for k, v in row.items() if k not in ("prompt", "answer", "reasoning", "split")}
    return Example(prompt=row["prompt"], answer=str(row["answer"]), columns=columns, reasoning=reasoning)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a line that is not JSON is an error naming the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"no such JSONL file: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    if not rows:
        raise TaskError(f"{path} has no rows")
    return rows


class JsonlTask(Task):
    def __init__(self, path: str | Path, *, heldout_path: Optional[str | Path] = None, checker: Optional[str] = None):
        self.path = Path(path)
        self.name = self.path.stem
        self._checker = load_checker(checker)
        self.checker_spec = checker
        self.splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for i, row in enumerate(read_jsonl(self.path), start=1):
            ex = row_to_example(row, f"{self.path}:{i}")
            split = row.get("split")
            if split is None:
                split = "test" if in_test_partition(ex.prompt) else "train"
            elif split not in SPLITS:
                raise TaskError(f"{self.path}:{i}: split {split!r} is not one of {list(SPLITS)}")
            self.splits[split].append(ex)
        if heldout_path is not None:
            hp = Path(heldout_path)
            self.splits["heldout"] += [row_to_example(r, f"{hp}:{i}") for i, r in enumerate(read_jsonl(hp), start=1)]

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        check_split(split)
        pool = self.splits[split]
        if not pool:
            hint = " (add rows with \"split\": \"heldout\" or set task.heldout_path)" if split == "heldout" else ""
            raise TaskError(f"{self.path} has no {split} rows{hint}")
        order = list(range(len(pool)))
        random.Random(f"{self.name}:{split}:{seed}").shuffle(order)
        return [pool[i] for i in order[:n]]

    def check(self, answer: Optional[str], row: Mapping[str, Any]) -> bool:
        return bool(self._checker(answer, row))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "checker": self.checker_spec,
                **{f"{s}_rows": len(v) for s, v in self.splits.items()}}


class PythonTask(Task):
    """A task defined by ``examples(split, n, seed)`` and ``check(answer, row)`` in a user's Python file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.stem
        module = load_python_object(str(self.path))
        for fn in ("examples", "check"):
            if not callable(getattr(module, fn, None)):
                raise TaskError(f"{self.path} must define {fn}(...) (see frugalm.reason.tasks.user_tasks)")
        self._examples, self._check = module.examples, module.check

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        check_split(split)
        rows = self._examples(split, n, seed)
        return [row_to_example(r if isinstance(r, dict) else getattr(r, "__dict__", r), f"{self.path} row {i}")
                for i, r in enumerate(rows)]

    def check(self, answer: Optional[str], row: Mapping[str, Any]) -> bool:
        return bool(self._check(answer, row))
