"""`frugalm grpo`: GRPO (or Dr. GRPO / DAPO) with rule-checked rewards on a task."""

from __future__ import annotations

import argparse

from frugalm.reason.commands.common import add_config_args, add_run_args, run_flags, run_stage


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", required=True,
                        help="HF-format policy checkpoint (usually an SFT output) with tokenizer")
    add_config_args(parser)
    add_run_args(parser)


def run(args: argparse.Namespace) -> int:
    from frugalm.reason.stages import grpo_stage

    _, s, status = run_stage("grpo", args, lambda task, cfg: grpo_stage(
        args.model, task, cfg, args.out, **run_flags(args)))
    if status is not None:
        return status
    print(f"done: {s.steps} steps in {s.wall_s:.0f} s; reward {s.first_reward} -> {s.last_reward}; "
          f"held-out pass@1 {s.first_eval_pass_at_1} -> {s.last_eval_pass_at_1}")
    print(f"model: {s.final_model}; curves: {s.plot}")
    return 0
