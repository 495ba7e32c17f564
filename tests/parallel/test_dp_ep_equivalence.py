"""Multi-process (gloo, CPU) data/expert-parallel training equals single-process training.

Layouts: dp2, ep2 (2 processes); dp2·ep2, ep4 (4 processes); each under DDP-style replication and under
FSDP2. Every layout runs two optimizer steps of a tiny DeepSeek-V3 (MLA, 8 experts in 4 groups, MTP,
sequence balance loss) from weights loaded with `load_full_state_dict`, the first step accumulating two
micro-batches (the first without gradient sync; in ``explicit_sync`` layouts neither syncs and
`sync_gradients` reduces afterwards), and is compared with `reference_run`, one process on the same
global batches.

Tolerances (fp32). The distributed run differs only in summation order (gradient all-reduce, tokens of
several ranks in one expert GEMM, FSDP's reduce-scatter), so:
* step 1 gradients (identical weights): ``rtol=1e-5, atol=1e-7`` (max abs errors seen ~1e-8);
* step 2 gradients, final weights and logits (after updates): ``rtol=1e-4, atol=1e-6``;
* losses and the global gradient norm: relative 1e-6 / 1e-5;
* AdamW moments after two steps: ``rtol=1e-4, atol=1e-8`` (second moments are ~grad^2);
* global expert counts: exactly equal; and every rank ends with the same full weights.

Two layouts then route every token to experts 0-1 (`skewed_routing_check`), so most EP ranks receive no
rows at all: they must still take part in every collective, and loss/gradients must match.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dp_ep_workers as workers

pytestmark = pytest.mark.multiproc

LAYOUTS = {
    2: [
        # 64 KiB buckets: ~20 all-reduces, most launched while the backward is still running
        {"name": "dp2-ddp", "parallel": {"dp": 2, "bucket_mb": 0.0625}},
        {"name": "ep2-ddp", "parallel": {"ep": 2}, "explicit_sync": True},
        {"name": "dp2-fsdp", "parallel": {"dp": 2, "dp_mode": "fsdp"}},
        {"name": "ep2-fsdp", "parallel": {"ep": 2, "dp_mode": "fsdp"}},
    ],
    4: [
        {"name": "dp2ep2-ddp", "parallel": {"dp": 2, "ep": 2, "bucket_mb": 0.0625}, "export": True},
        {"name": "dp2ep2-fsdp", "parallel": {"dp": 2, "ep": 2, "dp_mode": "fsdp"}, "skewed_check": True},
        # one 2-expert routing group per rank: topk_group = 2 is node-limited routing with M = 2
        {"name": "ep4-ddp", "parallel": {"ep": 4, "max_nodes_per_token": 2}, "explicit_sync": True,
         "skewed_check": True},
        {"name": "ep4-fsdp-2nodes", "parallel": {"ep": 4, "ep_ranks_per_node": 2, "max_nodes_per_token": 2,
                                                 "dp_mode": "fsdp"}},
    ],
}


@pytest.fixture(scope="module")
def reference() -> dict:
    return workers.reference_run()


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, rtol: float, atol: float) -> None:
    assert set(got) == set(want), f"{what}: names differ: {sorted(set(got) ^ set(want))[:5]}"
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_training_matches_single_process(world: int, tmp_path: Path, reference: dict) -> None:
    codes = workers.launch(workers.equivalence_worker, world, (LAYOUTS[world],), tmp_path, deadline_s=300)
    errors = "\n".join(p.read_text() for p in tmp_path.glob("error-rank*.txt"))
    assert codes == [0] * world, f"exit codes {codes}\n{errors}"
    for layout in LAYOUTS[world]:
        name = layout["name"]
        results = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(world)]
        got = results[0]
        for i, (step, ref) in enumerate(zip(got["steps"], reference["steps"])):
            assert step["loss"] == pytest.approx(ref["loss"], rel=1e-6), (name, i)
            assert step["norm"] == pytest.approx(ref["norm"], rel=1e-5), (name, i)
            for block, counts in ref["counts"].items():
                assert torch.equal(step["counts"][block], counts), (name, i, block)
            tol = (1e-5, 1e-7) if i == 0 else (1e-4, 1e-6)
            _close(step["grads"], ref["grads"], f"{name} step {i + 1} grad", *tol)
        _close(got["state"], reference["state"], f"{name} final weights", 1e-4, 1e-6)
        torch.testing.assert_close(got["logits"], reference["logits"], rtol=1e-4, atol=1e-5)
        # optimizer state gathers to the single-process names/shapes and cuts back to the same shards
        _close(got["optimizer"], reference["optimizer"], f"{name} AdamW state", 1e-4, 1e-8)
        assert all(r["optimizer_roundtrip"] for r in results), name
        for other in results[1:]:  # every rank holds the same model (replicas in sync, biases updated alike)
            _close(other["state"], got["state"], f"{name} rank consistency", 0, 0)
        assert got["max_nodes"] <= got["node_bound"], name
        if layout["parallel"].get("max_nodes_per_token"):
            assert got["node_bound"] <= layout["parallel"]["max_nodes_per_token"]
        if layout["parallel"].get("bucket_mb"):  # buckets were all-reduced while the backward still ran
            early, at_end = got["ddp_buckets"]
            assert early >= 2, (name, early, at_end)
        if layout.get("export"):
            _check_export(tmp_path / f"hf-{name}", got)
        if layout.get("skewed_check"):
            _check_skewed(name, results, layout["parallel"]["ep"])


def _check_skewed(name: str, results: list[dict], ep: int) -> None:
    """All tokens on experts 0-1: ep ranks > 0 compute no rows, get zero expert gradients, nothing hangs."""
    for rank, r in enumerate(results):
        sk = r["skewed"]
        assert all((n > 0) == (rank % ep == 0) for n in sk["rows_computed"]), (name, rank, sk["rows_computed"])
        assert sk["loss"] == pytest.approx(sk["ref_loss"], rel=1e-6), name
        _close(sk["grads"], sk["ref_grads"], f"{name} skewed-routing grad", 1e-5, 1e-7)
        experts = [g for n, g in sk["grads"].items() if n.endswith("experts.gate_up_proj")]
        assert experts and all(g[2:].abs().max() == 0 for g in experts), name


def _check_export(path: Path, got: dict) -> None:
    """The dp2·ep2 checkpoint reloads single-process with the same weights and logits."""
    from frugalm.model.checkpoint import from_pretrained
    from frugalm.parallel.checkpoint import plain_model

    loaded = from_pretrained(path, with_mtp=True)
    _close(loaded.state_dict(), got["state"], "exported weights", 0, 0)
    direct = plain_model(loaded.config, got["state"]).eval()
    with torch.no_grad():
        logits = loaded(workers.probe_input())
        assert torch.equal(logits, direct(workers.probe_input()))
    torch.testing.assert_close(logits, got["logits"], rtol=1e-5, atol=1e-6)
