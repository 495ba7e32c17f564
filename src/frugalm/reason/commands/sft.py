"""`frugalm sft`: supervised fine-tuning on a task's reference reasoning (loss on assistant tokens only)."""

from __future__ import annotations

import argparse

from frugalm.reason.commands.common import add_config_args, add_run_args, run_flags, run_stage


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", required=True, help="HF-format checkpoint to fine-tune (with tokenizer)")
    add_config_args(parser)
    add_run_args(parser)


def run(args: argparse.Namespace) -> int:
    from frugalm.reason.stages import sft_stage

    cfg, s, status = run_stage("sft", args, lambda task, cfg: sft_stage(
        args.model, task, cfg, args.out, **run_flags(args)))
    if status is not None:
        return status
    print(f"done: {s.get('steps')} steps on {s['examples']} examples ({s['dropped_too_long']} too long, dropped); "
          f"loss {s.get('final_loss')}; val loss (assistant tokens) {s.get('final_val_loss', s.get('val_losses'))}")
    print(f"model: {s.get('final_model')}  (frugalm eval-task --model {s.get('final_model')} --task {cfg.task.name})")
    return 0
