"""DualPipe vs 1F1B (and ZB1P, DualPipeV) step time at equal PP and micro-batches, on CPU with gloo.

Claim under test (DualPipe README table): at the same number of ranks and micro-batches, DualPipe's
pipeline bubble is (PP/2-1)(F&B+B-3W) against 1F1B's (PP-1)(F+B). This script runs the real executor
(`frugalm.parallel.pipeline`) on PP local processes, one thread each, over the same model (``--blocks``
residual MLP blocks cut into the schedule's stages; DualPipeV cuts it into 2*PP smaller stages), and
prints for every schedule:

* the median step time (and its min-max over the timed steps) and the median of the *paired* ratios
  to 1F1B: step i of every schedule runs right after step i of the others (round-robin), so a burst of
  load from other processes hits neighbouring steps alike and the per-step ratio cancels most of it;
  the min-max of those ratios is printed as the spread;
* the mean CPU time / wall time of the ranks during that step (well below 1 - idle fraction means other
  processes took the cores: the timings are then not clean);
* the measured idle fraction (largest per-rank idle time / makespan, from the executor's own timeline);
* the same fraction predicted by the table formula and by the simulator, both fed with the chunk
  times (F, B, W, F&B) measured in this run.

By default an "overlapped" F&B pair runs its forward and backward back to back; a schedule named
``<name>+overlap`` (e.g. ``dualpipev+overlap``) runs them at once, the backward on a second thread
(`PipelineConfig.overlap`), and the script also prints how much of the F&B slots' time both halves were
running ("both"). The input/weight split of a backward costs some extra graph work on CPU, so the
measured F&B and B_in+W are used as they are. Keep ``--pp`` at or below the number of free cores:
with more processes than cores, one rank's bubble is filled by another rank's work and the idle
fraction means nothing.

    python benchmarks/pipeline_schedules.py --pp 2 --micro 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def _build_stage(stage: int, num_stages: int, blocks: int, dim: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.up = nn.Linear(dim, 4 * dim)
            self.down = nn.Linear(4 * dim, dim)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))

    if blocks % num_stages:
        raise SystemExit(f"--blocks {blocks} must be divisible by the {num_stages} stages")
    torch.manual_seed(100 + stage)
    return nn.Sequential(*[Block() for _ in range(blocks // num_stages)])


def _worker(rank: int, world: int, store: str, out: str, args: dict) -> None:
    import torch
    import torch.distributed as dist

    from frugalm.parallel.pipeline import PipelineRunner
    from frugalm.parallel.schedules import build_schedule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    micro, dim, tokens = args["micro"], args["dim"], args["tokens"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(micro, tokens, dim, generator=g)
    y = torch.randn(micro, tokens, dim, generator=g)
    plans = {}
    for name in args["schedules"]:
        sched = build_schedule(name.removesuffix("+overlap"), world, micro)
        stages = {s: _build_stage(s, sched.num_stages, args["blocks"], dim) for s in sched.stages_on(rank)}
        runner = PipelineRunner(sched, stages, hidden_shape=(1, tokens, dim), hidden_dtype=torch.float32,
                                device="cpu", timeout_s=300, overlap=name.endswith("+overlap"))
        plans[name] = (runner, stages)
    results: dict[str, list] = {name: [] for name in plans}
    # round-robin over schedules so a burst of load from other processes hits all of them alike
    for step in range(args["warmup"] + args["steps"]):
        for name, (runner, stages) in plans.items():
            for m in stages.values():
                m.zero_grad(set_to_none=True)
            trace: list = []
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            runner.step(x, y, torch.nn.functional.mse_loss, trace=trace)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            # F&B slots run on two threads: seconds both halves ran at once, and the slots' total
            both = sum(max(0.0, min(f1, b1) - max(f0, b0)) for f0, f1, b0, b1 in runner.last_overlap)
            slots = sum(max(f1, b1) - min(f0, b0) for f0, f1, b0, b1 in runner.last_overlap)
            stats = torch.tensor([wall, cpu / wall])
            dist.all_reduce(stats[:1], op=dist.ReduceOp.MAX)
            dist.all_reduce(stats[1:], op=dist.ReduceOp.SUM)
            if step >= args["warmup"]:
                results[name].append({"wall": stats[0].item(), "cpu_share": stats[1].item() / world,
                                      "both_s": both, "slots_s": slots,
                                      "spans": [(s.kind, s.label, s.start, s.end, s.stage) for s in trace]})
    for runner, _ in plans.values():
        runner.close()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _spans_to_timeline(per_rank: list[list], rank_ids: list[int]):
    from frugalm.parallel.sim import Span

    return [[Span(r, label, kind, a, b, 0, stage) for kind, label, a, b, stage in spans]
            for r, spans in zip(rank_ids, per_rank)]


def _measure(timeline) -> dict[str, float]:
    """Idle fraction and mean chunk times of one measured step (same definitions as the simulator)."""
    spans = [s for row in timeline for s in row]
    t0, t1 = min(s.start for s in spans), max(s.end for s in spans)
    makespan = t1 - t0
    idle = [makespan - sum(s.end - s.start for s in row) for row in timeline]

    def mean(kind: str, split: bool | None = None, skip_first_stage: bool = False) -> float:
        xs = [s.end - s.start for s in spans
              if s.kind == kind and (split is None or s.label.endswith("*") == split)
              and not (skip_first_stage and s.stage == 0)]
        return statistics.fmean(xs) if xs else float("nan")

    # stage 0 has no input gradient: its split backward is empty and its W is a whole backward, so
    # the input/weight split is measured on the other stages
    return {"makespan": makespan, "bubble": max(idle), "fraction": max(idle) / makespan,
            "F": mean("F"), "B": mean("B", False), "B_in": mean("B", True, True), "W": mean("W", None, True),
            "FB": mean("FB")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--blocks", type=int, default=8, help="residual MLP blocks in the whole model")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256, help="tokens per micro-batch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--png-dir", default=None, help="draw each schedule's measured timeline here")
    p.add_argument("--json", default=None, help="also write the per-schedule summary here")
    args = p.parse_args()
    cfg = {k: getattr(args, k) for k in ("micro", "blocks", "dim", "tokens", "steps", "warmup")}
    cfg["schedules"] = [s for s in args.schedules.split(",") if s]

    from frugalm.parallel.schedules import build_schedule
    from frugalm.parallel.sim import ChunkTimes, plot_timeline, simulate, table_bubble

    for name in cfg["schedules"]:
        build_schedule(name.removesuffix("+overlap"), args.pp, args.micro)  # fail fast on constraint errors
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "frugalm.parallel.pipeline"])
        procs = [ctx.Process(target=_worker, args=(r, args.pp, f"{tmp}/store", tmp, cfg)) for r in range(args.pp)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            raise SystemExit(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
        per_rank = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.pp)]

    print(f"pp={args.pp} micro={args.micro} blocks={args.blocks} dim={args.dim} tokens/micro={args.tokens} "
          f"steps={args.steps} (median), gloo, 1 thread per rank")
    header = (f"{'schedule':10} {'step s':>8} {'(min-max)':>13} {'vs 1f1b':>8} {'(min-max)':>13} {'cpu/wall':>8} "
              f"{'idle meas':>10} {'formula':>8} {'sim':>6}   chunk ms: F / B / B_in / W / F&B")
    print(header)
    base = None
    summary = {}
    for name in cfg["schedules"]:
        walls = [per_rank[0][name][i]["wall"] for i in range(args.steps)]
        base_walls = [per_rank[0]["1f1b"][i]["wall"] for i in range(args.steps)] if "1f1b" in cfg["schedules"] else None
        median_i = sorted(range(args.steps), key=lambda i: walls[i])[args.steps // 2]
        timeline = _spans_to_timeline([per_rank[r][name][median_i]["spans"] for r in range(args.pp)],
                                      list(range(args.pp)))
        m = _measure(timeline)
        b_full = m["B"] if m["B"] == m["B"] else m["B_in"] + m["W"]  # NaN check: no full B in this schedule
        w = m["W"] if m["W"] == m["W"] else 0.0
        fb = m["FB"] if m["FB"] == m["FB"] else None
        times = ChunkTimes(f=m["F"], b=max(b_full, w), w=w, fb=fb)
        base_name = name.removesuffix("+overlap")
        sched = build_schedule(base_name, args.pp, args.micro)
        busy = m["makespan"] - m["bubble"]
        formula = table_bubble(base_name, args.pp, times)
        sim = simulate(sched, times)
        step = statistics.median(walls)
        base = step if name == "1f1b" else base
        ratios = [w / b for w, b in zip(walls, base_walls)] if base_walls else []
        ratio = f"{statistics.median(ratios):8.3f}" if ratios else f"{'-':>8}"
        spread = f"({min(ratios):.3f}-{max(ratios):.3f})" if ratios else "-"
        ms = " / ".join("-" if v != v else f"{1e3 * v:.1f}" for v in (m["F"], m["B"], m["B_in"], m["W"], m["FB"]))
        share = per_rank[0][name][median_i]["cpu_share"]
        both = sum(per_rank[r][name][i]["both_s"] for r in range(args.pp) for i in range(args.steps))
        slots = sum(per_rank[r][name][i]["slots_s"] for r in range(args.pp) for i in range(args.steps))
        overlap = f"   both {both / slots:.0%} of F&B slot time" if slots else ""
        print(f"{name:10} {step:8.3f} {f'({min(walls):.3f}-{max(walls):.3f})':>13} {ratio} {spread:>13} {share:8.2f} "
              f"{m['fraction']:10.1%} {formula / (formula + busy):8.1%} {sim.bubble_fraction:6.1%}   {ms}{overlap}")
        summary[name] = {"step_s": step, "step_min_max": [min(walls), max(walls)],
                         "paired_ratio_median": statistics.median(ratios) if ratios else None,
                         "paired_ratio_min_max": [min(ratios), max(ratios)] if ratios else None,
                         "idle_measured": m["fraction"], "idle_formula": formula / (formula + busy),
                         "idle_sim": sim.bubble_fraction, "cpu_share": share,
                         "fb_both_running": both / slots if slots else None}
        if args.png_dir:
            out = plot_timeline(timeline, Path(args.png_dir) / f"measured-{name}-pp{args.pp}-m{args.micro}.png",
                                f"measured {name} pp={args.pp} micro={args.micro} (gloo, CPU)")
            print(f"{'':10} timeline: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "schedules": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
