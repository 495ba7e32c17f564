"""`frugalm distill`: rejection-sample verified traces from a teacher (or read a JSONL), SFT a student."""

from __future__ import annotations

import argparse
import json

from frugalm.reason.commands.common import add_config_args, add_run_args, fail, run_flags, run_stage


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", metavar="DIR", help="teacher checkpoint that samples the traces")
    parser.add_argument("--traces", metavar="FILE.jsonl",
                        help="black-box traces {prompt, completion[, answer]} instead of a teacher")
    parser.add_argument("--student", metavar="DIR",
                        help="student checkpoint (frugalm or any transformers causal LM); default: a fresh, "
                             "smaller frugalm model from [distill] student_config")
    add_config_args(parser)
    add_run_args(parser)


def run(args: argparse.Namespace) -> int:
    from frugalm.reason.stages import distill_stage

    if not args.teacher and not args.traces:
        return fail("distill", "give --teacher DIR (rejection sampling) or --traces FILE.jsonl")
    _, s, status = run_stage("distill", args, lambda task, cfg: distill_stage(
        task, cfg, args.out, teacher=args.teacher, student=args.student, traces_path=args.traces, **run_flags(args)),
        needs_task=bool(args.task or args.teacher or args.config))
    if status is not None:
        return status
    print("traces: " + json.dumps(s["traces"]))
    print(f"student ({s['student_kind']}): {s.get('final_model')}")
    return 0
