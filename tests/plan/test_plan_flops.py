"""FLOPs per token: DeepSeek's published 250 GFLOP/token, 6·N·D, and a count of a real forward pass."""

import subprocess
import sys

import pytest

from frugalm.model.config import ModelConfig
from frugalm.plan.arch import shape_of
from frugalm.plan.dense import DenseModelConfig
from frugalm.plan.flops import (
    attention_flops_per_token, flop_breakdown, flops_per_token, mean_context, six_n_flops_per_token,
    training_flops_per_token,
)
from frugalm.plan.models import resolve_model

V3 = ModelConfig(num_nextn_predict_layers=1)


def test_v3_at_4k_matches_deepseeks_250_gflop_per_token():
    # ISCA'25 (arXiv 2505.09343) Table 2: 250 GFLOP per token for V3 training at 4K, MTP not included.
    assert flops_per_token(V3, 4096, include_mtp=False) == pytest.approx(250e9, rel=0.01)


def test_v3_attention_term_and_six_n():
    # 2·n_h·s·(d_qk + d_v)·L forward ≈ 20.5 GFLOP non-causal; halved by causality, ×3 for training ≈ 30.7.
    assert attention_flops_per_token(V3, 4096, causal=False, training=False) == pytest.approx(20.47e9, rel=0.002)
    assert attention_flops_per_token(V3, 4096) == pytest.approx(30.7e9, rel=0.003)
    assert six_n_flops_per_token(V3) == pytest.approx(6 * V3.param_counts()["activated"])
    # The detailed count is 6·N minus the embedding lookup (not a GEMM) plus the attention core.
    detailed = flops_per_token(V3, 4096, include_mtp=False)
    expected = 6 * (V3.param_counts()["activated"] - V3.vocab_size * V3.hidden_size) + attention_flops_per_token(V3, 4096)
    assert detailed == pytest.approx(expected, rel=0.002)  # the remainder is norm weights (not GEMMs)
    assert training_flops_per_token(V3, 4096, "6nd", n_active=37e9) == 6 * 37e9
    assert training_flops_per_token(V3, 4096, "6nd+attention", n_active=37e9) == pytest.approx(6 * 37e9 + 30.7e9, rel=0.001)


def test_training_is_three_forwards_and_mtp_adds_one_block():
    fwd = flops_per_token(V3, 4096, training=False)
    assert flops_per_token(V3, 4096) == pytest.approx(3 * fwd)
    b = flop_breakdown(V3, 4096)
    # one MTP module ≈ one MoE layer + eh_proj + the shared head, forward
    moe_layer = 2 * shape_of(V3).layers[-1].gemm_macs
    assert b.mtp_gemm == pytest.approx(moe_layer + 2 * 2 * 7168 ** 2 + b.lm_head, rel=1e-9)
    assert b.forward(True) - b.forward(False) == pytest.approx(b.mtp_gemm + b.mtp_attention_core)


def test_causal_mean_context_and_seq_dependence():
    assert mean_context(4096) == 2048.5
    assert mean_context(4096, causal=False) == 4096
    short, long = flops_per_token(V3, 4096, include_mtp=False), flops_per_token(V3, 32768, include_mtp=False)
    core = attention_flops_per_token(V3, 4096)
    assert long - short == pytest.approx(core * (32769 / 4097 - 1), rel=1e-9)
    with pytest.raises(ValueError):
        flops_per_token(V3, 0)


def test_parameter_inventory_matches_model_param_counts():
    for cfg in (V3, ModelConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                               n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                               qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, vocab_size=101,
                               num_nextn_predict_layers=2, tie_word_embeddings=True)):
        s = shape_of(cfg)
        counts = cfg.param_counts()
        total = sum(l.dense_params + l.expert_params for l in s.layers) + s.embed_params + s.head_params + s.final_norm_params
        assert total == counts["total"]
        assert sum(m.dense_params + m.expert_params for m in s.mtp) + len(s.mtp) * s.mtp_extra_params == counts["mtp"]
    assert V3.param_counts()["activated"] == pytest.approx(37.5e9, rel=0.01)


def test_dense_llama_405b_preset():
    m = resolve_model("llama-3.1-405b")
    assert isinstance(m.config, DenseModelConfig)
    assert m.shape.n_active == pytest.approx(405.8e9, rel=0.002)
    detailed = flops_per_token(m.config, 8192)
    palm = six_n_flops_per_token(m.config) + attention_flops_per_token(m.config, 8192)
    assert detailed == pytest.approx(palm, rel=0.01)
    # GQA: attention GEMMs use 8 KV heads, so the projections are far below 4·d² per layer
    d = 16384
    assert shape_of(m.config).layers[0].attn_gemm_macs == 2 * d * d + 2 * d * 8 * 128


def test_flops_module_stays_light():
    code = "import sys, frugalm.plan.flops; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _tiny(moe: bool, mtp: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8 if moe else 0,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=64,
        num_nextn_predict_layers=mtp,
    )


@pytest.mark.parametrize("moe", [False, True])
def test_counter_matches_torch_flop_counter_on_the_real_model(moe):
    """Count the GEMMs a real forward pass runs (torch's FlopCounterMode) and compare, op class by op class."""
    torch = pytest.importorskip("torch")
    transformer = pytest.importorskip("frugalm.model.transformer")
    from torch.utils.flop_counter import FlopCounterMode

    def grouped_mm(a, b, *args, out_shape=None, **kwargs):  # [M, K] x [G, K, N]: every row once
        return 2 * a[0] * a[1] * b[-1]

    cfg = _tiny(moe, mtp=1)
    model = transformer.DeepSeekV3(cfg).eval()
    batch, seq = 2, 32
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mapping = {torch.ops.aten._grouped_mm: grouped_mm} if hasattr(torch.ops.aten, "_grouped_mm") else {}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model.forward_with_mtp(ids)
    counted = counter.get_total_flops()
    # torch counts SDPA as full (non-causal) QK^T and PV; depth-1 MTP runs on seq-1 positions.
    main = flop_breakdown(cfg, seq, causal=False)
    mtp = flop_breakdown(cfg, seq - 1, causal=False)
    expected = batch * (seq * main.forward(include_mtp=False) + (seq - 1) * (mtp.mtp_gemm + mtp.mtp_attention_core))
    assert counted == pytest.approx(expected, rel=1e-9)
