"""Checks of the data/expert-parallel plumbing: config, mesh layout, expert placement (single process,
except the 4-rank gloo check of which groups a pp·ep mesh builds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from frugalm.config import ConfigError, from_dict
from frugalm.model.transformer import DeepSeekV3
from frugalm.parallel.checkpoint import _param_name, full_state_dict, load_full_state_dict
from frugalm.parallel.config import ParallelConfig
from frugalm.parallel.expert_placement import ep_rank_loads, nodes_per_token, placement_for
from frugalm.parallel.mesh import ParallelMesh, axis_ranks, init_distributed, local_device, select_backend
from frugalm.parallel.parallelize import parallelize

import dp_ep_workers as workers
from frugalm_testing import tiny_config


# ---------------------------------------------------------------------------------------- config
def test_config_loads_strictly_and_resolves_the_world() -> None:
    cfg = from_dict(ParallelConfig, {"ep": 2, "dp_mode": "fsdp", "timeout_s": 60}, "parallel")
    assert cfg.resolve(8) == (1, 4, 2)  # dp inferred
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ParallelConfig, {"ep": 2, "tp": 2}, "parallel")
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(ParallelConfig, {"dp_mode": "zero3"}, "parallel")


@pytest.mark.parametrize("fields, world, message", [
    ({"ep": 3}, 4, "not divisible by ep\\*pp"),
    ({"dp": 2, "ep": 2}, 6, "does not equal the world size 6"),
    ({"dp": 2, "ep": 2, "pp": 2}, 4, "launch 8 processes"),
])
def test_layouts_that_do_not_fit_the_world_are_refused(fields: dict, world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**fields).resolve(world)


@pytest.mark.parametrize("fields, message", [
    ({"ep": 4, "ep_ranks_per_node": 3}, "multiple of ep_ranks_per_node"),
    ({"timeout_s": 0}, "timeout_s must be > 0"),
    ({"ep": 0}, "ep must be >= 1"),
])
def test_invalid_fields_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**fields)


# ---------------------------------------------------------------------------------------- mesh
def test_axis_groups_follow_row_major_pp_dp_ep() -> None:
    # rank = (pp_rank * dp + dp_rank) * ep + ep_rank, as init_device_mesh((pp, dp, ep)) lays it out
    assert axis_ranks(2, 2, 2, "ep") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert axis_ranks(2, 2, 2, "dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert axis_ranks(2, 2, 2, "dp_ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert axis_ranks(2, 2, 2, "pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for axis in ("ep", "dp", "dp_ep", "pp"):  # each axis partitions the world
        assert sorted(r for g in axis_ranks(2, 2, 2, axis) for r in g) == list(range(8))
    mesh = ParallelMesh(pp=2, dp=2, ep=2, rank=6, device=torch.device("cpu"))
    assert (mesh.pp_rank, mesh.dp_rank, mesh.ep_rank, mesh.dp_ep_rank) == (1, 1, 0, 2)
    assert mesh.ranks("dp") == [4, 6] and mesh.ranks("ep") == [6, 7] and mesh.ranks("pp") == [2, 6]
    assert mesh.data_parallel_size == 4



@pytest.mark.multiproc
def test_twin_ep_backward_group_exists_only_with_pipeline_overlap(tmp_path: Path) -> None:
    """pp2·ep2 on 4 gloo ranks: the second EP group (overlapped F&B backward) costs a communicator, so
    `init_distributed` builds it only when asked (``[pipeline] overlap``), over the rank's own ep ranks."""
    codes = workers.launch(workers.ep_backward_group_worker, 4, (), tmp_path, deadline_s=120)
    errors = "\n".join(p.read_text() for p in tmp_path.glob("error-rank*.txt"))
    assert codes == [0] * 4, f"exit codes {codes}\n{errors}"
    for rank in range(4):
        found = json.loads((tmp_path / f"groups-rank{rank}.json").read_text())
        assert found["False"] is None, (rank, found)
        twin = found["True"]
        assert twin is not None and not twin["same_as_ep"], (rank, found)
        assert twin["ranks"] == twin["ep_ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1], (rank, found)

def test_backend_and_device_come_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_backend("auto", torch.device("cpu")) == "gloo"
    assert select_backend("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        select_backend("nccl", torch.device("cpu"))
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert local_device(torch.device("cpu")) == torch.device("cpu")


def test_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    mesh = init_distributed(ParallelConfig(), "cpu")
    assert mesh.world_size == 1 and mesh.group("dp_ep") is None and mesh.backend == "gloo"
    model = DeepSeekV3(tiny_config()).init_weights(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert parallelize(model, mesh, ParallelConfig()) is model
    after = full_state_dict(model, mesh)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    load_full_state_dict(model, DeepSeekV3(tiny_config()).init_weights(seed=1).state_dict(), mesh)
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
    with pytest.raises(ValueError, match="expected"):
        bad = dict(before, **{"lm_head.weight": before["lm_head.weight"][:1]})
        load_full_state_dict(model, bad, mesh)


def test_optimizer_slots_map_to_their_parameter() -> None:
    names = {"model.layers.1.mlp.experts.gate_up_proj", "lm_head.weight"}
    assert _param_name("model.layers.1.mlp.experts.gate_up_proj.exp_avg_sq", names) == \
        "model.layers.1.mlp.experts.gate_up_proj"
    assert _param_name("lm_head.weight", names) == "lm_head.weight"
    assert _param_name("nothing.here", names) is None


# ---------------------------------------------------------------------------------------- placement
def test_node_limited_routing_maps_groups_to_nodes() -> None:
    model = tiny_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    p = placement_for(model, ParallelConfig(ep=4, max_nodes_per_token=2))
    assert [list(p.experts_of_rank(r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert p.groups_align_with_nodes and p.max_nodes_per_token() == 2
    assert "routing group(s) 3" in p.describe()
    two_nodes = placement_for(model, ParallelConfig(ep=4, ep_ranks_per_node=2, max_nodes_per_token=2))
    assert two_nodes.nodes == 2 and two_nodes.node_of_expert(5) == 1
    idx = torch.tensor([[0, 1], [0, 7], [2, 5]])
    assert nodes_per_token(idx, p).tolist() == [1, 2, 2]
    assert nodes_per_token(idx, two_nodes).tolist() == [1, 2, 2]
    assert ep_rank_loads(torch.arange(8), 4).tolist() == [1, 5, 9, 13]


@pytest.mark.parametrize("model_fields, parallel, message", [
    ({"n_routed_experts": 8, "n_group": 4, "topk_group": 3, "num_experts_per_tok": 4}, {"ep": 4, "max_nodes_per_token": 2},
     "topk_group = 3 groups per token"),
    ({"n_routed_experts": 8, "n_group": 2, "topk_group": 1}, {"ep": 4, "max_nodes_per_token": 1},
     "do not line up with the 4 nodes"),
    ({"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "topk_method": "greedy"},
     {"ep": 4, "max_nodes_per_token": 1}, "does not limit groups"),
    ({"n_routed_experts": 8}, {"ep": 3}, "does not divide model.n_routed_experts"),
])
def test_node_limits_that_routing_cannot_guarantee_are_refused(model_fields: dict, parallel: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        placement_for(tiny_config(**model_fields), ParallelConfig(**parallel))


def test_router_output_respects_the_node_limit() -> None:
    """The guarantee is the router's: topk_group groups = nodes, checked on random tokens and biases."""
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    p = placement_for(cfg, ParallelConfig(ep=8, ep_ranks_per_node=2, max_nodes_per_token=2))
    moe = DeepSeekV3(cfg).init_weights(seed=0).moe_layers()[0]
    moe.gate.e_score_correction_bias.normal_(0, 1)
    routing = moe.gate(torch.randn(512, cfg.hidden_size))
    reached = nodes_per_token(routing.indices, p)
    assert int(reached.max()) == 2  # the limit is reached but never exceeded
