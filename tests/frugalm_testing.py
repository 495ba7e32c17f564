"""Tiny DeepSeek-V3 configs for tests that still exercise every routing path.

Kept out of conftest.py: several test folders have their own conftest.py, and `from conftest import ...`
would then depend on collection order.
"""

from __future__ import annotations

from frugalm.model.config import ModelConfig

# A DeepSeek-V3 shape in miniature for trainer runs (vocab 320 = the test corpus' tokenizer): q-LoRA MLA,
# 1 dense + 2 MoE layers, 8 experts in 4 groups (top-2 of the best 2 groups), one shared expert, one MTP
# depth, sequence-balance loss on.
TINY_RUN_MODEL = dict(
    vocab_size=320, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, num_nextn_predict_layers=1,
    max_position_embeddings=64, aux_loss_alpha=1e-3,
)

def tiny_config(**overrides) -> ModelConfig:
    """3 layers (1 dense, then MoE), 8 experts in 4 groups (top-2 groups, top-2 experts), q-LoRA, one MTP depth."""
    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=128, routed_scaling_factor=2.5,
    )
    base.update(overrides)
    return ModelConfig(**base)
