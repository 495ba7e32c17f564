"""`apply_fp8` on the project's DeepSeekV3 model: the right modules convert, and the model still trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformer = pytest.importorskip("frugalm.model.transformer", reason="the DeepSeekV3 model module is not present")

from frugalm.fp8 import FP8Config, FP8GroupedLinear, FP8Linear, apply_fp8  # noqa: E402
from frugalm.model.config import ModelConfig  # noqa: E402


def _tiny_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        intermediate_size=256, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=64,
        num_nextn_predict_layers=0,
    )


def test_deepseek_v3_converts_projections_and_experts_and_trains():
    torch.manual_seed(0)
    model = transformer.DeepSeekV3(_tiny_config()).init_weights(seed=0)
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    keys = list(model.state_dict())
    apply_fp8(model, FP8Config(enabled=True, backend="emulated"))
    converted = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert converted == linears - {"lm_head"}
    assert any(n.endswith("self_attn.o_proj") for n in converted)
    experts = [m for n, m in model.named_modules() if hasattr(m, "linear_fn") and not isinstance(m, nn.Linear)]
    assert experts and all(isinstance(m.linear_fn, FP8GroupedLinear) for m in experts)
    assert list(model.state_dict()) == keys
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
