"""Arguments every reasoning command shares, and turning them into a `ReasonConfig` and a task.

Kept free of torch imports: `frugalm --help` imports every command's `configure`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional


def add_config_args(parser: argparse.ArgumentParser, *, task: bool = True, recipe: Optional[str] = None) -> None:
    on_top = (f" on top of the embedded {recipe} recipe (frugalm/reason/recipes/{recipe}.toml; --task naming "
              "another task drops the recipe's task sizes and notation)") if recipe else ""
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML with [task] [sft] [grpo] [distill] [eval] [r1] sections (all optional){on_top}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field, e.g. --set grpo.group_size=8 (repeatable)")
    if task:
        parser.add_argument("--task", metavar="NAME|FILE",
                            help="addition, countdown, sort, FILE.jsonl ({prompt, answer} rows) or FILE.py "
                                 "(examples + check); default: [task] name, else addition")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", required=True, help="run folder (the model lands in DIR/final)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_config(args: argparse.Namespace, recipe: Optional[str] = None) -> Any:
    """The resolved config: the embedded recipe (if any), file, then --set, then --task (which wins for
    the task name)."""
    from frugalm.reason.config import load_reason_config, recipe_sections

    overrides = list(args.overrides)
    base = recipe_sections(recipe) if recipe else None
    if getattr(args, "task", None):
        overrides.append(f"task.name={json.dumps(args.task)}")
        if base and base.get("task", {}).get("name") != args.task:
            # the recipe's sizes and notation belong to its own task: another task starts from its defaults,
            # keeping the recipe's response contract (instruction, response_prefix), which is not the task's
            kept = {k: v for k, v in base.pop("task", {}).items() if k in ("instruction", "response_prefix")}
            if kept:
                base["task"] = kept
            for key in ("grpo_min_size", "grpo_max_size"):
                base.get("r1", {}).pop(key, None)
    return load_reason_config(args.config, overrides, base=base)


def load_task(cfg: Any) -> Any:
    from frugalm.reason.tasks import load_task as _load

    return _load(cfg.task)


def save_config(cfg: Any, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "reason_config.toml")


def fail(command: str, message: str) -> int:
    print(f"frugalm {command}: error: {message}", file=sys.stderr)
    return 2


def progress_flag(args: argparse.Namespace) -> Any:
    return False if getattr(args, "no_progress", False) else None


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The stage keywords that `add_run_args`'s flags stand for (resume, overwrite, progress), plus
    signal handling, which every command-line stage turns on so Ctrl-C leaves a resumable checkpoint."""
    return {"resume": args.resume, "overwrite": args.overwrite, "progress": progress_flag(args), "handle_signals": True}


def run_stage(command: str, args: argparse.Namespace, stage: Callable[[Any, Any], Any], *,
              needs_task: bool = True) -> tuple[Any, Any, Optional[int]]:
    """What `sft`, `grpo` and `distill` all do around their stage: resolve the config, load the task,
    save the resolved config into --out, run ``stage(task, cfg)``, turn a task or value error into
    ``frugalm COMMAND: error: ...`` with exit status 2, and an interrupted stage (Ctrl-C, SIGTERM; its
    summary says ``interrupted``) into exit status 130.

    Returns ``(cfg, summary, None)`` when the stage ran to its end, else ``(cfg, summary or None,
    exit_status)``. Kept in one place so the three commands cannot drift in what they save, which
    errors they report rather than raise, or how they exit. ``needs_task=False`` skips the task
    (distillation from traces may have none).
    """
    from frugalm.reason.tasks import TaskError

    cfg = load_config(args)
    try:
        task = load_task(cfg) if needs_task else None
        save_config(cfg, args.out)
        summary = stage(task, cfg)
    except (TaskError, ValueError) as e:
        return cfg, None, fail(command, str(e))
    # sft/distill summarise in a dict, grpo in a dataclass.
    interrupted = summary.get("interrupted") if isinstance(summary, dict) else summary.interrupted
    return cfg, summary, (130 if interrupted else None)
