"""Rank bodies for the data/expert-parallel tests (run in forked gloo processes) and their references.

Not a test module: `test_dp_ep_*.py` import it and start its functions in child processes. The
single-process reference (`reference_run`) lives here too, so both sides share one definition of the
training step (loss = CE + 0.3 * MTP CE + alpha * sequence balance loss; AdamW; clip; aux-loss-free
bias update from the global expert load).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from frugalm.model.config import ModelConfig
from frugalm.model.moe import MoE
from frugalm.model.transformer import DeepSeekV3
from frugalm.parallel.checkpoint import (
    export_pretrained, full_grads, full_optimizer_state, full_state_dict, load_full_state_dict,
    local_optimizer_state, plain_model,
)
from frugalm.parallel.config import ParallelConfig
from frugalm.parallel.data_parallel import clip_grad_norm_, gradient_sync, no_gradient_sync, sync_gradients
from frugalm.parallel.expert_parallel import expert_parallel_modules, global_expert_counts
from frugalm.parallel.expert_placement import nodes_per_token, placement_for
from frugalm.parallel.mesh import ParallelMesh, init_distributed
from frugalm.parallel.parallelize import parallelize
from frugalm.train.balance import update_expert_bias
from frugalm.train.optim import AdamW, clip_gradients_

# 8 experts in 4 routing groups of 2, top-2 groups, top-2 experts: with ep=4 each rank owns one group,
# so topk_group=2 is the node limit M=2 (one rank per node).
MODEL = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=32, kv_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
    num_nextn_predict_layers=1, max_position_embeddings=64, aux_loss_alpha=1e-2,
)
GLOBAL_BATCH, SEQ = 8, 16
MICRO = (2, 1)  # micro-batches of step 1 and step 2 (step 1 accumulates, first micro-batch without sync)
# AdamW's eps is raised from 1e-8 to 1e-4: with 1e-8 an entry whose gradient is rounding noise (~1e-9)
# moves by ±lr with the noise's sign, so *any* two summation orders would end lr apart.
LR, EPS, GAMMA, CLIP = 1e-2, 1e-4, 1e-2, 0.5


def model_config() -> ModelConfig:
    return ModelConfig(**MODEL)


def batches() -> list[list[torch.Tensor]]:
    """Per step, per micro-batch: the global batch [GLOBAL_BATCH, SEQ+1] of token ids."""
    g = torch.Generator().manual_seed(7)
    return [[torch.randint(0, MODEL["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(m)]
            for m in MICRO]


def probe_input() -> torch.Tensor:
    return torch.randint(0, MODEL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(11))


def initial_state() -> dict[str, torch.Tensor]:
    return DeepSeekV3(model_config()).init_weights(seed=0).state_dict()


def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    inputs, labels = batch[:, :-1], batch[:, 1:]
    logits, mtp = model.forward_with_mtp(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss = loss + 0.3 * torch.stack([F.cross_entropy(lg.flatten(0, 1), labels[:, k:].flatten())
                                     for k, lg in enumerate(mtp, start=1)]).mean()
    balance = [m.last_balance_loss for m in model.modules() if isinstance(m, MoE) and m.last_balance_loss is not None]
    return loss + MODEL["aux_loss_alpha"] * torch.stack(balance).sum()


def _moe_by_name(model: torch.nn.Module) -> dict[str, MoE]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoE)}


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _add(acc: dict, new: dict) -> dict:
    return {k: acc[k] + v if k in acc else v.clone() for k, v in new.items()}


# ---------------------------------------------------------------------------------------- launching
def launch(target, world: int, args: tuple, tmp: Path, deadline_s: float) -> list[int]:
    """Run ``target(rank, world, store, tmp, *args)`` in ``world`` processes; kill any still running after
    ``deadline_s`` seconds in all. Returns the exit codes (negative: killed by that signal).

    forkserver: each rank is forked from a server that imported torch once (spawning would re-import it
    per rank, seconds each on 2 cores) and inherits no OpenMP/distributed state from pytest. Ranks meet
    through a file store in ``tmp``, so concurrent test runs never compete for a TCP port.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "dp_ep_workers"])
    store = str(tmp / "store")
    procs = [ctx.Process(target=target, args=(rank, world, store, str(tmp), *args)) for rank in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


# ---------------------------------------------------------------------------------------- reference
def reference_run() -> dict:
    """The same two steps on one process over the whole global batch."""
    model = DeepSeekV3(model_config())
    model.load_state_dict(initial_state())
    model.train()
    opt = AdamW(model.named_parameters(), lr=LR, eps=EPS)
    params = [p for p in model.parameters()]
    steps = []
    for micro in batches():
        total, counts = 0.0, {}
        for batch in micro:
            loss = loss_fn(model, batch) / len(micro)
            loss.backward()
            total += loss.item()
            counts = _add(counts, {n: m.last_expert_counts.to(torch.int64) for n, m in _moe_by_name(model).items()})
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        norm = clip_gradients_(params, CLIP).item()
        opt.step()
        update_expert_bias(_moe_by_name(model), counts, GAMMA)
        opt.zero_grad(set_to_none=True)
        steps.append({"loss": total, "grads": grads, "counts": counts, "norm": norm})
    model.eval()
    with torch.no_grad():
        logits = model(probe_input())
    return {"steps": steps, "state": {k: v.clone() for k, v in model.state_dict().items()}, "logits": logits,
            "optimizer": {k: v.clone() for k, v in opt.tensor_state().items()}}


# ---------------------------------------------------------------------------------------- ranks
def _child_setup() -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def _report_errors(out_dir: str, rank: int, fn, *args):
    try:
        return fn(*args)
    except BaseException:
        Path(out_dir, f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def distributed_run(mesh: ParallelMesh, cfg: ParallelConfig, out_dir: Path, layout: dict) -> dict:
    """Two training steps of the parallelized model on this rank's share of each global batch.

    Layout flags: ``explicit_sync`` -- every backward runs without sync and `sync_gradients` reduces
    afterwards (the path for backward passes that bypass autograd's accumulation hooks; otherwise only the
    last micro-batch syncs); ``export`` -- write a HF checkpoint; ``skewed_check`` -- `skewed_routing_check`."""
    explicit_sync = layout.get("explicit_sync", False)
    model = DeepSeekV3(model_config()).init_weights(seed=123)  # wrong weights on purpose: load must fix them
    parallelize(model, mesh, cfg)
    load_full_state_dict(model, initial_state(), mesh)
    model.train()
    opt = AdamW(model.named_parameters(), lr=LR, eps=EPS)
    group = mesh.group("dp_ep")
    share = GLOBAL_BATCH // mesh.data_parallel_size
    rows = slice(mesh.dp_ep_rank * share, (mesh.dp_ep_rank + 1) * share)
    placement = placement_for(model.config, cfg)
    steps, seen = [], []
    for m in model.modules():  # every routing decision, checked against the node limit afterwards
        if isinstance(m, MoE):
            m.gate.register_forward_hook(lambda mod, args, out: seen.append(nodes_per_token(out.indices, placement)))
    for micro in batches():
        total, counts = torch.zeros(()), {}
        for i, batch in enumerate(micro):
            loss = loss_fn(model, batch[rows]) / len(micro)
            if i < len(micro) - 1 or explicit_sync:
                with no_gradient_sync(model):
                    loss.backward()
            else:
                loss.backward()
            total += loss.detach()
            counts = _add(counts, global_expert_counts(model, group))
        if explicit_sync:
            sync_gradients(model)
        if group is not None:
            torch.distributed.all_reduce(total, group=group)
        grads = full_grads(model, mesh)
        norm = clip_grad_norm_(model, CLIP, mesh).item()
        opt.step()
        update_expert_bias(_moe_by_name(model), counts, GAMMA)
        opt.zero_grad(set_to_none=True)
        steps.append({"loss": total.item() / mesh.data_parallel_size, "grads": grads, "counts": counts, "norm": norm})
    sync = gradient_sync(model)
    overlap = (sync.launched_early, sync.launched_at_end) if sync is not None else None
    state = full_state_dict(model, mesh, to_cpu=True)
    opt_local = opt.tensor_state()
    opt_full = full_optimizer_state(opt_local, model, mesh)
    resumed = AdamW(model.named_parameters(), lr=LR, eps=EPS)  # full -> this rank's shards, as a resume does
    resumed.load_tensor_state(local_optimizer_state(opt_full, model, mesh), opt.scalar_state())
    back = resumed.tensor_state()
    opt_roundtrip = back.keys() == opt_local.keys() and all(
        torch.equal(_local(back[k]), _local(v)) for k, v in opt_local.items())
    model.eval()
    with torch.no_grad():
        logits = model(probe_input())
    if layout.get("export"):
        export_pretrained(model, mesh, out_dir / f"hf-{layout['name']}")
    skewed = skewed_routing_check(model, mesh) if layout.get("skewed_check") else None
    return {"skewed": skewed, "steps": steps, "state": state, "logits": logits, "max_nodes": int(torch.cat(seen).max()),
            "optimizer": opt_full, "optimizer_roundtrip": opt_roundtrip, "ddp_buckets": overlap,
            "node_bound": placement.max_nodes_per_token()}


def skewed_routing_check(model: torch.nn.Module, mesh: ParallelMesh) -> dict:
    """Route every token to experts 0 and 1 (router bias +10), so all ep ranks but the first receive no rows.

    Those ranks must still take part in both all-to-alls and the gradient reduction (nothing may hang),
    their experts get zero gradients, and loss and gradients equal a plain model's on the same weights.
    """
    state = full_state_dict(model, mesh, to_cpu=True)
    for key in state:
        if key.endswith("e_score_correction_bias"):
            state[key] = torch.zeros_like(state[key])
            state[key][:2] = 10.0
    load_full_state_dict(model, state, mesh)
    model.train()
    model.zero_grad(set_to_none=True)
    share = GLOBAL_BATCH // mesh.data_parallel_size
    batch = batches()[0][0]
    loss = loss_fn(model, batch[mesh.dp_ep_rank * share:(mesh.dp_ep_rank + 1) * share])
    loss.backward()
    loss = loss.detach()
    if mesh.group("dp_ep") is not None:
        torch.distributed.all_reduce(loss, group=mesh.group("dp_ep"))
    grads = full_grads(model, mesh)
    rows = [m.last_tokens_computed for m in expert_parallel_modules(model).values()]
    plain = plain_model(model.config, state).train()
    ref_loss = loss_fn(plain, batch)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    return {"rows_computed": rows, "loss": loss.item() / mesh.data_parallel_size, "ref_loss": ref_loss.item(),
            "grads": grads, "ref_grads": ref_grads}


def equivalence_worker(rank: int, world: int, store: str, out_dir: str, layouts: list[dict]) -> None:
    _child_setup()

    def body():
        for layout in layouts:
            cfg = ParallelConfig(**layout["parallel"])
            mesh = init_distributed(cfg, "cpu", init_method=f"file://{store}", rank=rank, world_size=world)
            t0 = time.perf_counter()
            result = distributed_run(mesh, cfg, Path(out_dir), layout)
            result["seconds"] = time.perf_counter() - t0
            torch.save(result, Path(out_dir) / f"{layout['name']}-rank{rank}.pt")

    _report_errors(out_dir, rank, body)


# ---------------------------------------------------------------------------------------- failures
def failure_worker(rank: int, world: int, store: str, out_dir: str, mode: str, layout: dict, timeout_s: float) -> None:
    """Rank 1 fails (``mode="crash"``: raises, so its process exits; ``"stall"``: stops talking) while rank 0
    runs a training step; rank 0 must end with an error, which it records with the time it took."""
    _child_setup()
    cfg = ParallelConfig(**layout, timeout_s=timeout_s)
    mesh = init_distributed(cfg, "cpu", init_method=f"file://{store}", rank=rank, world_size=world)
    model = parallelize(DeepSeekV3(model_config()).init_weights(seed=0), mesh, cfg)
    torch.distributed.barrier()
    if rank == 1:
        if mode == "crash":
            raise RuntimeError("rank 1: simulated failure")
        time.sleep(timeout_s * 3)  # silent for 3x the timeout: rank 0 must have given up long before
        return
    t0 = time.perf_counter()
    try:
        loss_fn(model, batches()[0][0][:4]).backward()
        outcome = "no error"
    except Exception as e:  # noqa: BLE001 - the test inspects what was raised
        outcome = f"{type(e).__name__}: {e}"
    Path(out_dir, "rank0.txt").write_text(f"{time.perf_counter() - t0:.3f}\n{outcome}")
    if outcome != "no error":
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------- mesh groups
def ep_backward_group_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    """Build a pp2·ep2 mesh without, then with, ``pipeline_overlap``; record the twin EP group each time."""
    import json

    _child_setup()

    def body():
        cfg = ParallelConfig(pp=2, ep=2)
        found = {}
        for overlap in (False, True):
            mesh = init_distributed(cfg, "cpu", init_method=f"file://{store}", rank=rank, world_size=world,
                                    pipeline_overlap=overlap)
            twin = mesh.ep_backward_group
            found[str(overlap)] = None if twin is None else {
                "ranks": torch.distributed.get_process_group_ranks(twin), "ep_ranks": mesh.ranks("ep"),
                "same_as_ep": twin is mesh.group("ep")}
        Path(out_dir, f"groups-rank{rank}.json").write_text(json.dumps(found))
        # No rank may exit (closing its sockets) while a peer is still connecting its last group: under load
        # an early exit made a peer's gloo connectFullMesh fail ("Connection closed by peer").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

    _report_errors(out_dir, rank, body)
