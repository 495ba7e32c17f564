"""Training tokens/s with 1, 2 and 4 processes per data/expert-parallel layout, on this CPU (gloo).

Each layout runs the real stack -- `init_distributed`, `parallelize` (DDP-style replication or FSDP2,
expert parallelism with all-to-all dispatch), the trainer's AdamW, `clip_grad_norm_` and the
aux-loss-free bias update from `global_expert_counts` -- on a small DeepSeek-V3 (the shape of the
embedded ``tiny`` config: d=128, 4 layers, 16 routed experts top-2 in 4 groups, MLA, one MTP depth).
Scaling is weak: every rank processes ``--batch`` sequences of ``--seq`` tokens per step, so the global
batch grows with the process count; tokens/s = global tokens per step / median step time (a step ends
when the slowest rank ends it).

Pipeline layouts (``pp2 ...``) run what `Trainer._setup_pipeline`/`_pipeline_step` run: the model cut into
stages (`split_model`), each rank keeping only its stages' weights, `PipelineRunner` with the named
schedule and 4 micro-batches, then the shared-embedding sum and the dp sync of held parameters. The ranks
of one pipeline read the same batch, so a ``pp2`` step processes ``--batch`` sequences on 2 processes
(tokens per step = data-parallel ranks x batch x seq); ``pp2·dp2 fsdp`` shards each rank's stages over
its dp pair (`frugalm.parallel.pipeline_fsdp`). The last column is the parameter storage held by
the largest rank after setup (``--json`` also records every rank's and its VmHWM).

Every process gets one thread (as under torchrun). ``cpu/wall`` is each rank's CPU time divided by
its wall time over the timed steps, averaged: with more processes than free cores it falls well below 1
and tokens/s measures contention, not the parallel scheme. ``tokens per CPU-second`` divides by the CPU
time the ranks actually got, which makes the communication/synchronisation overhead of each layout
visible even on a busy machine (compare with the single 1-thread row). The single-process rows are given with
1 thread and with ``--threads-single`` threads so the baseline is the machine, not one core.

    python benchmarks/scaling_cpu.py [--steps 6] [--warmup 2] [--batch 4] [--seq 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

LAYOUTS: list[tuple[str, int, dict]] = [
    # (name, processes, [parallel] fields)
    ("dp2 ddp", 2, {"dp": 2}),
    ("dp2 fsdp", 2, {"dp": 2, "dp_mode": "fsdp"}),
    ("ep2", 2, {"ep": 2}),
    ("dp4 ddp", 4, {"dp": 4}),
    ("dp2·ep2 ddp", 4, {"dp": 2, "ep": 2}),
    ("dp2·ep2 fsdp", 4, {"dp": 2, "ep": 2, "dp_mode": "fsdp"}),
    ("ep4", 4, {"ep": 4}),
    # pipeline layouts: the model's stages over pp ranks (`[pipeline]` schedule, micro-batches per step)
    ("pp2 1f1b", 2, {"pp": 2, "schedule": "1f1b", "micro": 4}),
    ("pp2 dualpipev", 2, {"pp": 2, "schedule": "dualpipev", "micro": 4}),
    ("pp2·dp2 1f1b", 4, {"pp": 2, "dp": 2, "schedule": "1f1b", "micro": 4}),
    ("pp2·dp2 fsdp 1f1b", 4, {"pp": 2, "dp": 2, "dp_mode": "fsdp", "schedule": "1f1b", "micro": 4}),
]

MODEL = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
    max_position_embeddings=256, aux_loss_alpha=1e-4,
)


def _rank(rank: int, world: int, store: str, out: str, fields: dict, args: dict, threads: int) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    from frugalm.model.config import ModelConfig
    from frugalm.model.moe import MoE
    from frugalm.model.transformer import DeepSeekV3
    from frugalm.parallel.config import ParallelConfig
    from frugalm.parallel.data_parallel import clip_grad_norm_
    from frugalm.parallel.expert_parallel import global_expert_counts
    from frugalm.parallel.mesh import init_distributed, shutdown_distributed
    from frugalm.parallel.parallelize import parallelize
    from frugalm.train.balance import update_expert_bias
    from frugalm.train.optim import AdamW

    fields = dict(fields)
    schedule_name, micro = fields.pop("schedule", None), fields.pop("micro", None)
    cfg = ParallelConfig(**fields, timeout_s=120)
    mesh = init_distributed(cfg, "cpu", init_method=f"file://{store}", rank=rank, world_size=world)
    pp_fsdp = mesh.pp > 1 and cfg.dp_mode == "fsdp"  # FSDP shards the held stages only, after the split
    model = parallelize(DeepSeekV3(ModelConfig(**MODEL)).init_weights(seed=0), mesh, cfg, data_parallel=not pp_fsdp)
    model.train()
    pipe = _pipeline(model, mesh, schedule_name, micro, args, fsdp=pp_fsdp) if mesh.pp > 1 else None
    named = list(model.named_parameters())
    if pipe is not None:  # this rank's stages only (the others were released to meta)
        held = pipe["replicas"].held_names()
        named = [(n, p) for n, p in named if n in held]
    opt = AdamW(named, lr=1e-3)
    moe = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
    gen = torch.Generator().manual_seed(1000 + mesh.dp_ep_rank)  # the ranks of one pipeline read the same
    group = mesh.group("dp_ep")
    everyone = torch.distributed.group.WORLD if world > 1 else None
    times, cpu = [], []
    for step in range(args["warmup"] + args["steps"]):
        batch = torch.randint(0, MODEL["vocab_size"], (args["batch"], args["seq"] + 1), generator=gen)
        if everyone is not None:
            torch.distributed.barrier(group=everyone)
        t0, c0 = time.perf_counter(), time.process_time()
        if pipe is not None:
            counts = _pipeline_step(pipe, model, mesh, batch)
            clip_grad_norm_(model, 1.0, mesh, pipe["replicas"].copies)
        else:
            inputs, labels = batch[:, :-1], batch[:, 1:]
            logits, mtp = model.forward_with_mtp(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss = loss + 0.3 * F.cross_entropy(mtp[0].flatten(0, 1), labels[:, 1:].flatten())
            loss = loss + MODEL["aux_loss_alpha"] * sum(m.last_balance_loss for m in moe.values())
            loss.backward()
            counts = global_expert_counts(model, group)
            clip_grad_norm_(model, 1.0, mesh)
        opt.step()
        update_expert_bias(moe, counts, 1e-3)
        opt.zero_grad(set_to_none=True)
        elapsed = torch.tensor(time.perf_counter() - t0)
        if everyone is not None:  # the step ends when the slowest rank ends it
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX, group=everyone)
        if step >= args["warmup"]:
            times.append(elapsed.item())
            cpu.append((time.process_time() - c0) / max(1e-9, time.perf_counter() - t0))
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]  # FSDP: own shard
    param_bytes = sum(t.numel() * t.element_size() for t in local if t.device.type != "meta")
    hwm_kb = next((int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:")), None) if Path("/proc/self/status").exists() else None
    Path(out, f"rank{rank}.json").write_text(json.dumps({"times": times, "cpu": cpu, "param_bytes": param_bytes,
                                                         "vm_hwm_kb": hwm_kb}))
    shutdown_distributed()


def _pipeline(model, mesh, schedule_name: str, micro: int, args: dict, fsdp: bool = False) -> dict:
    """What `Trainer._setup_pipeline` builds: stages, this rank's runner, released weights, held-only dp sync
    (or, with ``fsdp``, FSDP2 over the held stages)."""
    import contextlib

    import torch

    from frugalm.parallel.data_parallel import restrict_gradient_sync, set_gradient_sync
    from frugalm.parallel.pipeline import PipelineRunner
    from frugalm.parallel.pipeline_model import PipelineReplicas, split_model
    from frugalm.parallel.schedules import build_schedule

    schedule = build_schedule(schedule_name, mesh.pp, micro)
    stages = split_model(model, schedule, mtp_weight=0.3, autocast=contextlib.nullcontext)
    mine = {s: stages[s] for s in schedule.stages_on(mesh.pp_rank)}
    runner = PipelineRunner(schedule, mine, hidden_shape=(args["batch"] // micro, args["seq"], MODEL["hidden_size"]),
                            hidden_dtype=torch.float32, device="cpu", group=mesh.group("pp"), timeout_s=120)
    replicas = PipelineReplicas(model, stages, schedule, mesh.pp_rank, mesh.group("pp"))
    replicas.release_unheld()
    sharded = None
    if fsdp:
        from frugalm.parallel.pipeline_fsdp import shard_pipeline_stages

        sharded = shard_pipeline_stages(model, mine, mesh, schedule)
        replicas.rebind(model, (mesh.data_parallel_size, mesh.dp_ep_rank))
    else:
        set_gradient_sync(model, False)
        restrict_gradient_sync(model, set(replicas.held))
    return {"schedule": schedule, "mine": mine, "runner": runner, "replicas": replicas,
            "last": next((m for m in mine.values() if m.last), None), "fsdp": sharded}


def _pipeline_step(pipe: dict, model, mesh, batch) -> dict:
    """Forward+backward of one batch through the pipeline, shared/dp gradient sums; the global expert counts."""
    import torch

    from frugalm.model.moe import MoE
    from frugalm.parallel.data_parallel import sync_gradients
    from frugalm.parallel.expert_parallel import all_reduce_counts

    for stage in pipe["mine"].values():
        stage.reset()
        stage.grad_scale = 1.0 / pipe["schedule"].num_micro
    criterion = pipe["last"].loss if pipe["last"] is not None else None
    if pipe["fsdp"] is not None:
        pipe["fsdp"].begin_step()
    pipe["runner"].step(batch[:, :-1], batch, criterion)
    if pipe["fsdp"] is not None:
        pipe["fsdp"].finish_step()
    pipe["replicas"].reduce_shared_grads()
    sync_gradients(model)
    local: dict = {}
    for stage in pipe["mine"].values():
        for name, c in stage.counts.items():
            local[name] = local[name] + c if name in local else c
    full = {n: local.get(n, torch.zeros(m.cfg.n_routed_experts, dtype=torch.int64))
            for n, m in model.named_modules() if isinstance(m, MoE)}
    return all_reduce_counts(all_reduce_counts(full, mesh.group("pp")), mesh.group("dp_ep"))


def run_layout(name: str, world: int, fields: dict, args: dict, threads: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(r, world, f"{tmp}/store", tmp, fields, args, threads))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"{name}: exit codes {[p.exitcode for p in procs]}")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    step = statistics.median(ranks[0]["times"])
    data_ranks = world // fields.get("pp", 1)  # the ranks of one pipeline share their tokens
    tokens = data_ranks * args["batch"] * args["seq"]
    cpu_per_wall = statistics.mean(c for r in ranks for c in r["cpu"])
    return {"layout": name, "processes": world, "threads_per_process": threads, "step_s": step,
            "tokens_per_s": tokens / step, "tokens_per_step": tokens, "cpu_per_wall": cpu_per_wall,
            # tokens per second of CPU the run actually got (all ranks): less sensitive to other jobs
            "tokens_per_cpu_s": tokens / (step * world * cpu_per_wall),
            "param_mb_per_rank": [r["param_bytes"] / 2**20 for r in ranks],
            "vm_hwm_mb_per_rank": [r["vm_hwm_kb"] / 1024 if r["vm_hwm_kb"] else None for r in ranks]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads-single", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only", nargs="*", help="layout names to run (default: all)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    args = {"steps": a.steps, "warmup": a.warmup, "batch": a.batch, "seq": a.seq}
    plan = [("single", 1, {}, 1)]
    if a.threads_single > 1:
        plan.append(("single", 1, {}, a.threads_single))
    plan += [(n, w, f, 1) for n, w, f in LAYOUTS]
    if a.only:
        plan = [x for x in plan if x[0] in a.only]
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"gloo; {a.batch}x{a.seq} tokens per rank per step, median of {a.steps} steps after {a.warmup} warm-up")
    print("| layout | processes | threads/proc | step (s) | tokens/s | speed-up vs single 1-thread | cpu/wall "
          "| tokens per CPU-second | parameter MB on the largest rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows, base = [], None
    for name, world, fields, threads in plan:
        r = run_layout(name, world, fields, args, threads)
        base = base or (r["tokens_per_s"] if threads == 1 and world == 1 else None)
        speedup = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {name} | {world} | {threads} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {speedup} | "
              f"{r['cpu_per_wall']:.2f} | {r['tokens_per_cpu_s']:,.0f} | "
              f"{max(r['param_mb_per_rank']):.2f} |", flush=True)
        rows.append(r)
    if a.json:
        a.json.write_text(json.dumps({"args": args, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
