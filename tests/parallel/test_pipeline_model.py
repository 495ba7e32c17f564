"""Cutting DeepSeek-V3 into pipeline stages (one process): layout, shared parameters, and that the stages
chained in order compute exactly the trainer's per-micro-batch loss and gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from frugalm.config import ConfigError
from frugalm.model.transformer import DeepSeekV3
from frugalm.parallel.pipeline_model import PipelineReplicas, layer_split, split_model
from frugalm.parallel.schedules import build_schedule
from frugalm_testing import tiny_config


def test_layer_split_balances_layers_and_mtp_units():
    assert layer_split(3, 1, 1) == [[0, 1, 2]]
    assert layer_split(3, 1, 2) == [[0, 1], [2]]
    assert layer_split(3, 1, 4) == [[0], [1], [2], []]  # the last stage runs head + MTP only
    assert layer_split(4, 1, 4) == [[0, 1], [2], [3], []]
    assert layer_split(8, 0, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ConfigError, match="need at least"):
        layer_split(2, 1, 4)
    with pytest.raises(ConfigError, match="need at least"):
        layer_split(3, 0, 4)


def _model(**overrides) -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(tiny_config(aux_loss_alpha=1e-2, **overrides)).init_weights(3)


@pytest.mark.parametrize("name, pp, shared, copies", [
    ("1f1b", 2, ["model.embed_tokens.weight"], 2),  # embedding on the first and (for MTP) the last rank
    ("dualpipe", 2, [], 2),  # every stage twice; the embedding's two holders are summed by the executor
    ("dualpipev", 2, [], 1),  # stage 0 and the last stage are both on rank 0
])
def test_replicas_know_where_every_parameter_lives(name, pp, shared, copies):
    model = _model()
    sched = build_schedule(name, pp, 2 * pp)
    stages = split_model(model, sched, mtp_weight=0.3, autocast=contextlib.nullcontext)
    reps = [PipelineReplicas(model, stages, sched, r, None) for r in range(pp)]
    assert [reps[0].names[p] for p in reps[0].shared] == shared
    embed = model.model.embed_tokens.weight
    assert reps[0].copies[embed] == copies
    held = [set(r.held) for r in reps]
    assert set().union(*held) == set(model.parameters())
    if name == "dualpipev":
        assert model.lm_head.weight in held[0] and model.lm_head.weight not in held[1]


def test_stages_in_order_reproduce_the_trainer_loss_and_gradients():
    """Loss and every gradient of embedding -> stages -> `loss` equal `forward_with_mtp` + CE + MTP + α·balance."""
    from frugalm.train.balance import ExpertLoadTracker, moe_modules

    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    ref_model = _model()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits, mtp_logits = ref_model.forward_with_mtp(inputs)
    loads = ExpertLoadTracker(moe_modules(ref_model))
    loads.collect()
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + 0.3 * F.cross_entropy(
        mtp_logits[0].flatten(0, 1), labels[:, 1:].flatten()) + loads.balance_loss(1e-2)
    ref.backward()

    model = _model()
    sched = build_schedule("dualpipev", 2, 4)  # 4 stages: [L0], [L1], [L2], [head + MTP]
    stages = split_model(model, sched, mtp_weight=0.3, autocast=contextlib.nullcontext)
    h = inputs
    for stage in stages:
        h = stage(h)
    loss = stages[-1].loss(h, tokens)
    loss.backward()
    # earlier stages' balance losses reach the gradient through `_AttachLoss`, the value through `sums`
    attached = sum(s.sums["balance_loss"] for s in stages[:-1] if "balance_loss" in s.sums)
    torch.testing.assert_close(loss.detach() + attached, ref.detach(), rtol=1e-6, atol=1e-7)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
    counts = {}
    for s in stages:
        counts.update(s.counts)
    assert sorted(counts) == sorted(loads.counts)
    for k in counts:
        assert torch.equal(counts[k], loads.counts[k])


@pytest.mark.parametrize("name", ["1f1b", "dualpipev"])
def test_each_rank_keeps_only_the_weights_of_its_stages(name):
    """`release_unheld` moves every parameter of the other ranks' stages to meta: names, shapes and the
    state dict's keys stay, the rank's own stages still run, and the bytes held drop below the whole model."""
    from frugalm.train.trainer import parameter_bytes

    whole = parameter_bytes(_model())
    sched = build_schedule(name, 2, 4)
    held_bytes = []
    for rank in range(2):
        model = _model()
        keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        stages = split_model(model, sched, mtp_weight=0.3, autocast=contextlib.nullcontext)
        rep = PipelineReplicas(model, stages, sched, rank, None)
        freed = rep.release_unheld()
        held = set(rep.held)
        for n, p in model.named_parameters():
            assert (p.device.type == "meta") == (p not in held), n
        assert parameter_bytes(model) + freed == whole
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
        assert set(rep.owned_names()) <= rep.held_names()
        held_bytes.append(parameter_bytes(model))
        for s in sched.stages_on(rank):  # the rank's own stages still compute
            x = torch.randint(0, 97, (2, 8)) if s == 0 else torch.randn(2, 8, model.config.hidden_size)
            assert torch.isfinite(stages[s](x)).all()
    assert max(held_bytes) < whole <= sum(held_bytes)


def test_gradient_sync_restricted_to_held_parameters_reduces_only_those(monkeypatch):
    """Under pp the dp gradient sync all-reduces only the parameters the rank holds (no zeros for the rest)."""
    import torch.distributed as dist
    from torch import nn

    from frugalm.parallel.data_parallel import GradientSync

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
        sync = GradientSync([(dist.group.WORLD, list(net.named_parameters()))], bucket_bytes=1)
        keep = set(net[1].parameters())
        sync.restrict(keep)
        assert {p for b in sync.buckets for p in b.params} == keep
        reduced = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (reduced.append(t.numel()), real(t, *a, **k))[1])
        sync.enabled = False
        net(torch.randn(2, 3)).sum().backward()
        before = {p: p.grad.clone() for p in net.parameters()}
        sync.sync_now()
        # one flag per parameter rides along with each bucket
        assert sum(reduced) == sum(p.numel() + 1 for p in keep)
        for p in net.parameters():  # world of one: averaging leaves every gradient as it was
            torch.testing.assert_close(p.grad, before[p])
    finally:
        dist.destroy_process_group()


def test_fsdp_rebind_and_shard_shapes_of_shared_gradients():
    """pp x FSDP: `rebind` follows parameters replaced by name, and a rank that does not hold the shared
    embedding contributes zeros shaped like FSDP's dim-0 shard of it (1F1B, pp4: ranks 1-2 hold no embedding)."""
    model = _model()
    sched = build_schedule("1f1b", 4, 4)
    stages = split_model(model, sched, mtp_weight=0.3, autocast=contextlib.nullcontext)
    embed = model.model.embed_tokens.weight  # [97, 64]
    middle = PipelineReplicas(model, stages, sched, 1, None)
    assert [middle.names[p] for p in middle.shared] == ["model.embed_tokens.weight"] 
    assert all(p is not embed for p in middle.held)
    middle.rebind(model, (3, 2))
    assert middle._local_grad(embed).shape == (97 - 2 * 33, 64)  # torch.chunk(97, 3) -> 33, 33, 31
    middle.rebind(model, (128, 100))
    assert middle._local_grad(embed).shape == (0, 64)  # past the last chunk: an empty shard
    first = PipelineReplicas(model, stages, sched, 0, None)
    replacement = torch.nn.Parameter(embed.detach().clone())
    model.model.embed_tokens.weight = replacement  # what fully_shard does (a new parameter object)
    first.rebind(model, (2, 0))
    assert len(first.shared) == 1 and first.shared[0] is replacement and first.copies[replacement] == 2
    assert any(p is replacement for p in first.held) and first.names[replacement] == "model.embed_tokens.weight"
    replacement.grad = torch.ones_like(replacement)
    assert torch.equal(first._local_grad(replacement), replacement.grad)
