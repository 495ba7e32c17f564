"""`frugalm r1`: pre-trained base -> SFT -> GRPO -> distillation at toy scale, with a report and a PNG."""

from __future__ import annotations

import argparse
import sys

from frugalm.reason.commands.common import add_config_args, fail, load_config, progress_flag


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, recipe="r1")
    parser.add_argument("--out", metavar="DIR", required=True,
                        help="writes DIR/sft, DIR/grpo, DIR/student, DIR/report.json and DIR/r1.png; running "
                             "again on the same DIR skips the stages already done")
    parser.add_argument("--base-model", metavar="DIR",
                        help="pre-trained checkpoint (default: [r1] base_model, else the default main job's, "
                             "trained first if missing)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import json

    from frugalm.reason.pipeline import run_r1
    from frugalm.reason.tasks import TaskError

    if args.base_model:
        args.overrides.append(f"r1.base_model={json.dumps(args.base_model)}")
    cfg = load_config(args, recipe="r1")
    try:
        report = run_r1(cfg, args.out, progress=progress_flag(args))
    except (TaskError, ValueError) as e:
        return fail("r1", str(e))
    def f(v):
        return f"{v:8.3f}" if isinstance(v, (int, float)) else f"{'-':>8}"
    for key in [k for k in report if k.startswith("stages")]:
        split = cfg.eval.split if key == "stages" else key[len("stages_"):]
        print(f"{split:<12}{'pass@1':>8}{'sampled':>9}{'pass@k':>8}{'maj@k':>8}{'format':>8}{'length':>8}")
        for name, s in report[key].items():
            print(f"  {name:<10}{f(s['pass_at_1'])}{f(s.get('pass_at_1_sampled'))} {f(s.get('pass_at_k'))}"
                  f"{f(s.get('maj_at_k'))}{f(s.get('format_rate'))}{f(s.get('mean_length'))}")
    for v in (report.get("verdict") or {}).values():
        print(v["summary"])
    print(f"report: {args.out}/report.json   plot: {report.get('plot')}")
    for stage, message in (report.get("errors") or {}).items():
        print(f"frugalm r1: error: {stage}: {message}", file=sys.stderr)
    return 1 if report.get("errors") else 0
