"""Verifiable tasks: built-in generators (addition, countdown, sort) and user tasks (JSONL, Python).

`load_task(cfg)` turns a `TaskConfig` (the ``[task]`` section, or ``--task``) into a `Task`.
"""

from __future__ import annotations

from pathlib import Path

from frugalm.reason.tasks.addition import AdditionTask
from frugalm.reason.tasks.base import SPLITS, Example, GeneratedTask, Task, TaskError
from frugalm.reason.tasks.countdown import CountdownTask
from frugalm.reason.tasks.sorting import SortTask
from frugalm.reason.tasks.user_tasks import JsonlTask, PythonTask, load_python_object

BUILTIN = {"addition": AdditionTask, "countdown": CountdownTask, "sort": SortTask}

__all__ = ["AdditionTask", "CountdownTask", "SortTask", "JsonlTask", "PythonTask", "Task", "Example",
           "GeneratedTask", "TaskError", "SPLITS", "BUILTIN", "load_task"]


def load_task(cfg) -> Task:
    """The task a `TaskConfig` names: a built-in name, ``FILE.jsonl``, ``FILE.py`` or ``FILE.py:NAME``."""
    name = cfg.name
    if name in BUILTIN:
        cls = BUILTIN[name]
        kwargs = {k: getattr(cfg, k) for k in ("min_size", "max_size", "heldout_size", "max_value")
                  if getattr(cfg, k) is not None}
        if cls is AdditionTask:
            kwargs.pop("max_value", None)
        if cfg.notation is not None:
            if cls not in (AdditionTask, SortTask):
                raise TaskError(f"task {name}: [task] notation applies to addition and sort only")
            kwargs["notation"] = cfg.notation
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise TaskError(f"task {name}: {e}") from None
    path_part = name.split(":", 1)[0]
    if path_part.endswith(".jsonl"):
        return JsonlTask(path_part, heldout_path=cfg.heldout_path, checker=cfg.checker)
    if path_part.endswith(".py"):
        if ":" in name:
            obj = load_python_object(name)
            task = obj() if isinstance(obj, type) else obj
            if not isinstance(task, Task) and not (hasattr(task, "examples") and hasattr(task, "check")):
                raise TaskError(f"{name} is not a Task (needs examples() and check())")
            return task
        return PythonTask(path_part)
    if Path(name).exists():
        raise TaskError(f"task file {name!r} must end in .jsonl or .py")
    raise TaskError(f"unknown task {name!r}; use one of {sorted(BUILTIN)}, a FILE.jsonl or a FILE.py")
