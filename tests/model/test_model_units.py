"""Model pieces in isolation: config validation, routing rules, grouped experts, checkpoint format."""

from __future__ import annotations

import json

import pytest
import torch

from frugalm_testing import tiny_config
from frugalm import from_pretrained
from frugalm.config import ConfigError
from frugalm.model import moe as moe_mod
from frugalm.model.config import ModelConfig
from frugalm.model.transformer import DeepSeekV3


def test_config_rejects_inconsistent_fields():
    with pytest.raises(ConfigError, match="n_routed_experts .* divisible by n_group"):
        tiny_config(n_routed_experts=10, n_group=4)
    with pytest.raises(ConfigError, match="unknown key.*not_a_field"):
        ModelConfig.from_dict({"hidden_size": 64, "not_a_field": 1})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=2)
    with pytest.raises(ConfigError, match="cannot supply"):
        tiny_config(topk_group=1, num_experts_per_tok=3)


def test_config_reads_both_rope_spellings_and_null_q_lora():
    yarn = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0}
    v4 = ModelConfig.from_dict({"rope_theta": 5e4, "rope_scaling": yarn, "q_lora_rank": None, "model_type": "deepseek_v3"})
    v5 = ModelConfig.from_dict({"rope_parameters": {**{k: v for k, v in yarn.items() if k != "type"},
                                                   "rope_type": "yarn", "rope_theta": 5e4}, "q_lora_rank": None})
    assert v4.rope_theta == v5.rope_theta == 5e4 and v4.rope_type == v5.rope_type == "yarn"
    assert v4.q_lora_rank is None
    # V3's YaRN mscale: (0.1 ln 40 + 1)^2 / sqrt(192)
    assert abs(ModelConfig(rope_scaling=yarn).softmax_scale() - 0.13523) < 1e-4
    assert ModelConfig.from_dict(ModelConfig().to_hf_dict()) == ModelConfig()


def test_v3_sizes():
    cfg = ModelConfig(num_nextn_predict_layers=1)
    counts = cfg.param_counts()
    assert abs(counts["total"] / 1e9 - 671) < 1 and abs(counts["activated"] / 1e9 - 37) < 1
    assert cfg.kv_cache_bytes_per_token(2) == 61 * 576 * 2


def test_router_never_picks_masked_groups():
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    router = moe_mod.Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    # Strongly negative biases: with a 0.0 fill a masked group's experts would outrank these.
    router.e_score_correction_bias.fill_(-5.0)
    x = torch.randn(64, cfg.hidden_size)
    r = router(x)
    scores = r.scores + router.e_score_correction_bias
    group_score = scores.view(64, 4, 4).topk(2, -1).values.sum(-1)
    allowed = group_score.topk(2, -1).indices
    chosen_groups = r.indices // 4
    assert all(set(chosen_groups[i].tolist()) <= set(allowed[i].tolist()) for i in range(64))
    # and the choice is exactly the top-k of the biased scores with every other group set to -inf
    masked = scores.view(64, 4, 4).clone()
    masked[torch.ones(64, 4, dtype=torch.bool).scatter_(1, allowed, False)] = float("-inf")
    expected = masked.flatten(1).topk(cfg.num_experts_per_tok, -1).indices
    assert torch.equal(r.indices.sort(-1).values, expected.sort(-1).values)
    assert torch.allclose(r.weights.sum(-1), torch.full((64,), cfg.routed_scaling_factor))
    # weights come from the unbiased scores
    raw = r.scores.gather(-1, r.indices)
    assert torch.allclose(r.weights, raw / raw.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


def test_bias_changes_selection_not_weights_gradient():
    cfg = tiny_config()
    router = moe_mod.Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(32, cfg.hidden_size)
    before = router(x).indices
    popular = torch.bincount(before.flatten(), minlength=cfg.n_routed_experts).argmax()
    router.e_score_correction_bias[popular] -= 10.0  # the most chosen expert can no longer win
    after = router(x)
    assert (before == popular).any() and not (after.indices == popular).any()
    after.weights.sum().backward()
    assert router.weight.grad is not None and router.e_score_correction_bias.grad is None


@pytest.mark.parametrize("path", ["grouped_mm", "per_expert_loop"])
def test_grouped_gemm_paths_match_per_expert_reference(monkeypatch, path):
    """Both forms of the expert GEMM (torch._grouped_mm, loop) give the same values and grads; experts
    without rows get a zero weight gradient, and an expanded (stride-0) output gradient is accepted."""
    torch.manual_seed(0)
    x = torch.randn(50, 24, requires_grad=True)
    w = torch.randn(6, 12, 24, requires_grad=True)
    counts = torch.tensor([7, 0, 13, 20, 0, 10])
    offs = counts.cumsum(0).to(torch.int32)
    if path == "per_expert_loop":
        monkeypatch.setattr(moe_mod, "_grouped_mm_supported", lambda *a: False)
    ref = torch.cat([xe @ we.t() for xe, we in zip(x.split(counts.tolist()), w)])
    y = moe_mod.grouped_linear(x, w, offs)
    assert torch.allclose(y, ref, atol=1e-5)
    for g in (torch.randn_like(y), torch.randn(1, y.shape[1]).expand_as(y)):
        dx, dw = torch.autograd.grad(y, (x, w), g, retain_graph=True)
        rdx, rdw = torch.autograd.grad(ref, (x, w), g, retain_graph=True)
        assert torch.allclose(dx, rdx, atol=1e-4) and torch.allclose(dw, rdw, atol=1e-4)
        assert not dw[1].any() and not dw[4].any()


def test_moe_matches_dense_reference():
    """The sort/grouped path equals a direct per-token sum over chosen experts."""
    cfg = tiny_config()
    model = DeepSeekV3(cfg).init_weights(1)
    moe = model.moe_layers()[0]
    x = torch.randn(2, 5, cfg.hidden_size)
    y = moe(x)
    flat = x.view(-1, cfg.hidden_size)
    r = moe.gate(flat)
    ref = moe.shared_experts(flat)
    for t in range(flat.shape[0]):
        for k in range(cfg.num_experts_per_tok):
            e = r.indices[t, k]
            gate, up = (moe.experts.gate_up_proj[e] @ flat[t]).chunk(2)
            ref[t] += r.weights[t, k] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    assert torch.allclose(y.view(-1, cfg.hidden_size), ref, atol=1e-5)
    assert moe.last_expert_counts.sum().item() == 10 * cfg.num_experts_per_tok


def test_moe_combine_saves_one_expert_output_and_matches_index_add():
    """The routed experts keep two [tokens x top-k, d] activations for backward (the gathered expert
    input and the unweighted expert output), not a third weighted copy (autograd's `index_add_` saves
    its source); values and gradients equal the plain `zeros.index_add_(token, out * gate)` exactly."""
    cfg = tiny_config(n_shared_experts=0, moe_intermediate_size=24)  # 2 x 24 != hidden 64: sizes tell apart
    moe = DeepSeekV3(cfg).init_weights(2).moe_layers()[0]
    params = {p.untyped_storage().data_ptr() for p in moe.parameters()}
    x = torch.randn(12, cfg.hidden_size, requires_grad=True)
    rows = x.shape[0] * cfg.num_experts_per_tok
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = moe(x)
    row_sized = [n for n in saved.values() if n == rows * cfg.hidden_size * 4]
    assert len(row_sized) == 2, sorted(saved.values())

    # reference: the same dispatch with autograd's own mul + index_add_
    routing = moe.gate(x)
    order = routing.indices.reshape(-1).argsort(stable=True)
    token = order.div(cfg.num_experts_per_tok, rounding_mode="floor")
    counts = torch.bincount(routing.indices.reshape(-1), minlength=cfg.n_routed_experts)
    out = moe.experts(x.index_select(0, token), counts.cumsum(0, dtype=torch.int32))
    ref = torch.zeros_like(x).index_add_(0, token, out * routing.weights.reshape(-1)[order].unsqueeze(-1))
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    wrt = (x, moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj)
    for a, b in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(ref, wrt, g)):
        assert torch.equal(a, b)


def test_checkpoint_names_mtp_and_sharding(tmp_path):
    cfg = tiny_config()
    model = DeepSeekV3(cfg).init_weights(0)
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    L = cfg.num_hidden_layers
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                "mlp.experts.7.down_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{L}.{key}" in index, key
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in index
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with_mtp = from_pretrained(tmp_path, with_mtp=True)
    plain = from_pretrained(tmp_path)
    assert len(with_mtp.mtp) == 1 and len(plain.mtp) == 0
    for (n, p), (_, q) in zip(model.named_parameters(), with_mtp.named_parameters()):
        assert torch.equal(p, q), n
    with torch.no_grad():
        assert torch.equal(plain(ids), model(ids))


def test_corrupt_or_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nope")
    cfg = tiny_config()
    DeepSeekV3(cfg).init_weights(0).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="unreadable safetensors"):
        from_pretrained(tmp_path)


def test_moe_trains_under_bf16_autocast():
    """Forward and backward of the MoE under CPU bf16 autocast, with FP32 weights receiving FP32 grads."""
    cfg = tiny_config()
    model = DeepSeekV3(cfg).init_weights(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, mtp = model.forward_with_mtp(ids)
        loss = logits.float().logsumexp(-1).mean() + mtp[0].float().logsumexp(-1).mean()
    loss.backward()
    w = model.moe_layers()[0].experts.gate_up_proj
    assert w.dtype == torch.float32 and w.grad is not None and w.grad.dtype == torch.float32
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_compile_custom_op_matches_the_eager_grouped_gemm():
    """`frugalm::grouped_linear` (what `compile_model` gives the experts) has the eager path's values and
    grads, and its fake kernel / autograd registration pass torch's own op checks (no compile needed)."""
    from frugalm.model.compile import grouped_linear_op

    torch.manual_seed(0)
    x = torch.randn(50, 24, requires_grad=True)
    w = torch.randn(6, 12, 24, requires_grad=True)
    offs = torch.tensor([7, 0, 13, 20, 0, 10]).cumsum(0).to(torch.int32)
    y, ref = grouped_linear_op(x, w, offs), moe_mod.grouped_linear(x, w, offs)
    assert torch.allclose(y, ref, atol=1e-6)
    g = torch.randn_like(y)
    got, want = torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
    torch.library.opcheck(grouped_linear_op, (x, w, offs))


def test_compiled_model_matches_eager_under_aot_eager():
    """CI's compile check (the inductor one below is opt-in): `compile_model` with torch's ``aot_eager``
    backend -- dynamo + AOTAutograd, no code generation, a few seconds -- must capture the whole model
    (``fullgraph``: no graph breaks), route the experts through ``frugalm::grouped_linear`` in the forward
    graph and its backward op in the backward graph, and give the eager loss and gradients."""
    import functools

    from frugalm.model.compile import compile_model

    graphs: list[set[str]] = []

    def recording(gm, example_inputs):  # aot_eager's own no-op compiler, after noting the graph's ops
        from torch._dynamo.backends.debugging import boxed_nop

        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return boxed_nop(gm, example_inputs)

    backend = functools.partial(torch._dynamo.lookup_backend("aot_eager"), fw_compiler=recording,
                                bw_compiler=recording)
    cfg = tiny_config()
    model = DeepSeekV3(cfg).init_weights(0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    ref_loss = ref.logsumexp(-1).mean()
    ref_loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    try:
        out = compile_model(model, backend=backend, fullgraph=True)(ids)
        loss = out.logsumexp(-1).mean()
        loss.backward()
    finally:
        torch._dynamo.reset()  # drop the compiled code and guards: nothing carries over to other tests
    assert len(graphs) == 2, graphs  # one forward graph, one backward graph
    assert "frugalm.grouped_linear.default" in graphs[0]
    assert "frugalm.grouped_linear_backward.default" in graphs[1]
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("FRUGALM_TEST_COMPILE"),
                    reason="inductor compiles the whole model for minutes on a 2-core CPU; set FRUGALM_TEST_COMPILE=1")
def test_compiled_model_matches_eager():
    from frugalm.model.compile import compile_model

    cfg = tiny_config()
    model = DeepSeekV3(cfg).init_weights(0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    ref.logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = compile_model(model)(ids)
    out.logsumexp(-1).mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)
