"""`frugalm pipeline-sim`: simulate a pipeline schedule, print its bubble and memory, draw its timeline."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", required=True, choices=["1f1b", "zb1p", "dualpipe", "dualpipev"])
    parser.add_argument("--pp", type=int, required=True,
                        help="pipeline ranks (devices); DualPipeV runs 2*pp stages on them")
    parser.add_argument("--micro", type=int, required=True, help="micro-batches per step (DualPipe: both directions)")
    parser.add_argument("--f", type=float, default=1.0, help="forward chunk time (default 1)")
    parser.add_argument("--b", type=float, default=2.0, help="full backward chunk time, W included (default 2)")
    parser.add_argument("--w", type=float, default=1.0, help="weight-gradient part of a backward (default 1)")
    parser.add_argument("--fb", type=float, default=None, help="overlapped forward+backward pair (default f+b)")
    parser.add_argument("--comm", type=float, default=0.0, help="latency of one P2P batch (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--png", default=None, metavar="PATH", help="draw the timeline to this PNG")
    parser.add_argument("--actions", action="store_true", help="also print every rank's action list")


def run(args: argparse.Namespace) -> int:
    from frugalm.config import ConfigError
    from frugalm.parallel.schedules import ScheduleError, build_schedule
    from frugalm.parallel.sim import ChunkTimes, in_table_regime, plot_timeline, simulate, table_bubble

    try:
        times = ChunkTimes(args.f, args.b, args.w, args.fb, args.comm)
        schedule = build_schedule(args.schedule, args.pp, args.micro)
    except (ScheduleError, ValueError) as e:
        raise ConfigError(str(e)) from None
    result = simulate(schedule, times)
    summary = result.summary()
    summary["table_bubble"] = table_bubble(args.schedule, args.pp, times)
    summary["table_regime"] = in_table_regime(args.schedule, times)
    if args.png:
        title = (f"{args.schedule}  pp={args.pp}  micro={args.micro}  f={times.f:g} b={times.b:g} "
                 f"w={times.w:g} fb={times.overlapped:g}  bubble={result.bubble:g}")
        summary["png"] = str(plot_timeline(result.spans, args.png, title))
    if args.actions:
        summary["actions"] = [schedule.describe(r) for r in range(schedule.num_ranks)]

    if args.json:
        print(json.dumps(summary))
        return 0
    note = "" if summary["table_regime"] else " (outside the regime where the table formula is exact)"
    lines = [
        f"schedule       {args.schedule}: {schedule.num_ranks} ranks, {schedule.num_stages} stages, "
        f"{schedule.num_micro} micro-batches",
        f"chunk times    F={times.f:g} B={times.b:g} W={times.w:g} F&B={times.overlapped:g} comm={times.comm:g}",
        f"bubble         {result.bubble:g}  (DualPipe table formula: {summary['table_bubble']:g}{note})",
        f"bubble share   {result.bubble_fraction:.1%} of a {result.makespan:g} step",
        f"idle per rank  {' '.join(f'{x:g}' for x in result.idle)}",
        f"activations    peak {max(result.peak_activations)} micro-batch x stage activations per rank "
        f"(per rank: {' '.join(map(str, result.peak_activations))})",
        f"parameters     {max(result.param_copies)} stage copies per rank"
        + (" (every stage held twice in the pipeline)" if args.schedule == "dualpipe" else ""),
    ]
    if args.png:
        lines.append(f"timeline       {summary['png']}")
    if args.actions:
        lines += [f"rank {r}: {text}" for r, text in enumerate(summary["actions"])]
    print("\n".join(lines))
    return 0
