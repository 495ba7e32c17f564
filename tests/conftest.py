"""Shared fixtures: tiny DeepSeek-V3 configs that still exercise every routing path."""

from __future__ import annotations

import pytest
import torch

from frugalm.model.config import ModelConfig

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**overrides) -> ModelConfig:
    """2 dense-then-MoE layers, 8 experts in 4 groups (top-2 groups, top-2 experts), q-LoRA, one MTP depth."""
    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=128, routed_scaling_factor=2.5,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()
