"""`frugalm grpo`: GRPO (or Dr. GRPO / DAPO) with rule-checked rewards on a task."""

from __future__ import annotations

import argparse

from frugalm.reason.commands.common import add_config_args, add_run_args, fail, load_config, load_task, progress_flag, save_config


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", required=True,
                        help="HF-format policy checkpoint (usually an SFT output) with tokenizer")
    add_config_args(parser)
    add_run_args(parser)


def run(args: argparse.Namespace) -> int:
    from frugalm.reason.stages import grpo_stage
    from frugalm.reason.tasks import TaskError

    cfg = load_config(args)
    try:
        task = load_task(cfg)
        save_config(cfg, args.out)
        s = grpo_stage(args.model, task, cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                       progress=progress_flag(args), handle_signals=True)
    except (TaskError, ValueError) as e:
        return fail("grpo", str(e))
    if s.interrupted:
        return 130
    print(f"done: {s.steps} steps in {s.wall_s:.0f} s; reward {s.first_reward} -> {s.last_reward}; "
          f"held-out pass@1 {s.first_eval_pass_at_1} -> {s.last_eval_pass_at_1}")
    print(f"model: {s.final_model}; curves: {s.plot}")
    return 0
