"""`frugalm train`: run the embedded default, a named embedded config or a TOML file, or resume a run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE|NAME",
                        help="TOML run config, or the name of an embedded one (tiny, small, medium, deepseek-v3); "
                             "default: tiny, or the run's own config.toml with --resume")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field, e.g. --set train.max_steps=50 (repeatable)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest valid checkpoint")
    parser.add_argument("--resume-from", metavar="CHECKPOINT",
                        help="continue from this checkpoint folder (OUT/checkpoints/step-N)")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing run in --out and start again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def _config_name(source: str | None) -> str:
    from frugalm.train.config import DEFAULT_CONFIG

    return Path(source).stem if source else DEFAULT_CONFIG


def run(args: argparse.Namespace) -> int:
    from frugalm.train.config import load_run_config
    from frugalm.train.trainer import CONFIG_FILE, NonFiniteLossError, train

    out = Path(args.out) if args.out else Path("runs") / _config_name(args.config)
    resume = Path(args.resume_from) if args.resume_from else bool(args.resume)
    source = args.config
    if resume and source is None and (out / CONFIG_FILE).is_file():
        source = str(out / CONFIG_FILE)  # a resumed run keeps its own config unless told otherwise
    cfg = load_run_config(source, args.overrides)
    try:
        summary = train(cfg, out, resume=resume, overwrite=args.overwrite,
                        progress=False if args.no_progress else None, handle_signals=True)
    except NonFiniteLossError as e:
        print(f"frugalm train: error: {e}", file=sys.stderr)
        return 1
    if summary.interrupted:
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun the first rank reports for all
        return 0
    print(f"done: {summary.steps} steps, {summary.tokens:,} tokens in {summary.wall_s:.0f} s "
          f"({summary.tokens_per_s:,.0f} tokens/s while training)")
    if summary.final_loss is not None:
        print(f"train loss {summary.final_loss:.3f}", end="")
        if summary.final_val_loss is not None:
            first = f" (from {summary.first_val_loss:.3f})" if summary.first_val_loss is not None else ""
            print(f", val loss {summary.final_val_loss:.3f}{first}", end="")
        print()
    if summary.skipped_steps:
        print(f"skipped steps (non-finite): {summary.skipped_steps}")
    print(f"run folder: {summary.out_dir}  (metrics.jsonl, tb/, {Path(summary.plot).name if summary.plot else 'no plot'})")
    if summary.final_model:
        print(f"model: {summary.final_model}  (frugalm generate --model {summary.final_model} --prompt ...)")
    if summary.sample is not None:
        print(f"sample: {cfg.train.sample_prompt!r} -> {cfg.train.sample_prompt + summary.sample!r}")
    return 0
