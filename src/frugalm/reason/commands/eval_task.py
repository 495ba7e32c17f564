"""`frugalm eval-task`: pass@1 (greedy and sampled), unbiased pass@k, maj@k, format rate, mean length."""

from __future__ import annotations

import argparse
import json

from frugalm.reason.commands.common import add_config_args, fail, load_config, load_task


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", required=True, help="HF-format checkpoint with tokenizer")
    add_config_args(parser)
    parser.add_argument("--split", choices=["train", "test", "heldout"], help="default: [eval] split (heldout)")
    parser.add_argument("--n", type=int, help="problems (default: [eval] n)")
    parser.add_argument("--k", type=int, help="samples per problem for pass@k / maj@k (default: [eval] k)")
    parser.add_argument("--seed", type=int, help="sampling seed (the problems depend on [task] seed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from frugalm.reason.stages import eval_stage
    from frugalm.reason.tasks import TaskError

    cfg = load_config(args)
    for name in ("n", "k"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            return fail("eval-task", f"--{name} must be > 0")
    try:
        task = load_task(cfg)
        r = eval_stage(args.model, task, cfg, split=args.split, n=args.n, k=args.k, seed=args.seed)
    except (TaskError, ValueError) as e:
        return fail("eval-task", str(e))
    if args.json:
        print(json.dumps(r.to_dict(with_samples=False)))
        return 0
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"
    print(f"{r.task} / {r.split}: {r.n} problems, k = {r.k}, T = {r.temperature}, top-p = {r.top_p}  ({r.seconds:.1f} s)")
    print(f"  pass@1 greedy  {pct(r.pass_at_1)}    pass@1 sampled {pct(r.pass_at_1_sampled)}")
    print(f"  pass@{r.k}         {pct(r.pass_at_k)}    maj@{r.k}          {pct(r.maj_at_k)}")
    print(f"  format rate    {pct(r.format_rate)}    mean length    {r.mean_length:.1f} tokens"
          f"    truncated {pct(r.truncated_rate)}")
    for s in r.samples[:3]:
        print(f"  e.g. {s['prompt']!r} -> {s['completion']!r} ({'ok' if s['correct'] else 'wrong'}, answer {s['answer']})")
    return 0
