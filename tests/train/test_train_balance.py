"""Aux-loss-free balancing: b += γ·sign(mean − load) on hand-made loads, and it evens out a skewed router."""

from __future__ import annotations

import torch

from frugalm.model.config import ModelConfig
from frugalm.model.moe import MoE
from frugalm.train.balance import ExpertLoadTracker, load_imbalance, update_expert_bias


def moe_block(**kw) -> MoE:
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=None, kv_lora_rank=8,
                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, first_k_dense_replace=1)
    base.update(kw)
    m = MoE(ModelConfig(**base))
    torch.manual_seed(0)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


def test_bias_moves_by_gamma_towards_the_mean_load():
    m = moe_block()
    m.gate.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    before = m.gate.e_score_correction_bias.clone()
    load = torch.tensor([10, 2, 5, 5, 0, 9, 5, 4])  # mean 5
    update_expert_bias({"b": m}, {"b": load}, gamma=0.01)
    expected = before + 0.01 * torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 1.0])
    torch.testing.assert_close(m.gate.e_score_correction_bias, expected)
    assert m.gate.e_score_correction_bias.dtype == torch.float32
    assert not m.gate.e_score_correction_bias.requires_grad


def test_gamma_zero_and_missing_counts_leave_the_bias_alone():
    m = moe_block()
    update_expert_bias({"b": m}, {"b": torch.tensor([9, 0, 0, 0, 0, 0, 0, 7])}, gamma=0.0)
    update_expert_bias({"b": m}, {}, gamma=0.5)
    assert torch.count_nonzero(m.gate.e_score_correction_bias) == 0


def test_the_update_uses_counts_reduced_over_ranks():
    m = moe_block()
    local = torch.tensor([1, 1, 1, 1, 1, 1, 1, 9])  # locally expert 7 is overloaded...
    other_rank = torch.tensor([9, 9, 9, 9, 9, 9, 9, 1])  # ...but not globally: global loads are all 10
    update_expert_bias({"b": m}, {"b": local}, gamma=0.1, reduce=lambda c: c + other_rank)
    assert torch.count_nonzero(m.gate.e_score_correction_bias) == 0


def test_tracker_sums_counts_over_micro_batches():
    m = moe_block()
    tracker = ExpertLoadTracker({"b": m})
    total = torch.zeros(8, dtype=torch.int64)
    for seed in range(3):
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed))
        m(x)
        tracker.collect()
        total += m.last_expert_counts
    torch.testing.assert_close(tracker.counts["b"], total)
    assert int(total.sum()) == 3 * 2 * 5 * 2  # every token picks k = 2 experts
    tracker.reset()
    assert tracker.counts == {}


def test_bias_updates_alone_even_out_a_skewed_router():
    m = moe_block(n_group=1, topk_group=1)
    with torch.no_grad():
        m.gate.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        m.gate.weight[0] += 0.3  # tokens have positive features: experts 0 and 1 are favoured
        m.gate.weight[1] += 0.2
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0)).abs()
    m(x)
    start = load_imbalance(m.last_expert_counts)
    for _ in range(250):
        m(x)
        update_expert_bias({"b": m}, {"b": m.last_expert_counts}, gamma=0.002)
    m(x)
    end = load_imbalance(m.last_expert_counts)
    assert start > 3.0  # expert 0 takes 414 of 1024 slots (mean 128)
    assert end < 1.1


def test_load_imbalance():
    assert load_imbalance(torch.tensor([5, 5, 5, 5])) == 1.0
    assert load_imbalance(torch.tensor([8, 0, 0, 0])) == 4.0
