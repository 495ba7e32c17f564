"""Arguments every reasoning command shares, and turning them into a `ReasonConfig` and a task.

Kept free of torch imports: `frugalm --help` imports every command's `configure`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_config_args(parser: argparse.ArgumentParser, *, task: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="TOML with [task] [sft] [grpo] [distill] [eval] [r1] sections (all optional)")
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


def load_config(args: argparse.Namespace) -> Any:
    """The resolved config: file, then --set, then --task (which wins for the task name)."""
    from frugalm.reason.config import load_reason_config

    overrides = list(args.overrides)
    if getattr(args, "task", None):
        overrides.append(f"task.name={json.dumps(args.task)}")
    return load_reason_config(args.config, overrides)


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
