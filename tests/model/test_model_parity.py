"""Logit parity with transformers' own DeepseekV3 in fp32, both directions.

The configs exercise what a subtle bug would break: group-limited routing with a non-zero (partly
negative) correction bias, YaRN at positions past the original context, no-q-LoRA, and the FP8 form.
"""

from __future__ import annotations

import json

import pytest
import torch

from frugalm_testing import tiny_config
from frugalm import from_pretrained
from frugalm.model.transformer import DeepSeekV3

transformers = pytest.importorskip("transformers")

YARN = {
    "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
}
CASES = {
    "group_bias": dict(),
    "yarn_long": dict(rope_scaling=YARN, max_position_embeddings=64),
    "yarn_mscale_only": dict(rope_scaling={**YARN, "mscale_all_dim": 0.707, "mscale": 0.707}, max_position_embeddings=64),
    "no_q_lora_wide_groups": dict(q_lora_rank=None, n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=3),
}
TOL = 2e-5  # fp32; a wrong RoPE pair layout, mscale or masked group moves logits by >1e-2


def _ours(cfg, seed=0) -> DeepSeekV3:
    model = DeepSeekV3(cfg).init_weights(seed)
    # A bias large enough to change which experts win, negative for some, so -inf vs 0 masking matters.
    gen = torch.Generator().manual_seed(seed + 1)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * 0.6)
    return model.eval()


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_transformers(tmp_path, case):
    cfg = tiny_config(**CASES[case])
    ours = _ours(cfg)
    ours.save_pretrained(tmp_path)
    hf = _hf_load(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (2, 40, cfg.vocab_size)
    assert (got - ref).abs().max().item() < TOL


@pytest.mark.parametrize("case", ["group_bias", "yarn_long"])
def test_transformers_to_ours(tmp_path, case):
    cfg = tiny_config(**CASES[case])
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",)})
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.05) if "norm" not in name else p.uniform_(0.5, 1.5)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < TOL


def test_fp8_checkpoint_parity(tmp_path):
    """Official FP8 form (E4M3 + weight_scale_inv, partial edge blocks) dequantizes to what transformers computes."""
    cfg = tiny_config(hidden_size=160, intermediate_size=200, moe_intermediate_size=136)  # edge blocks 160 = 128 + 32
    ours = _ours(cfg)
    ours.save_pretrained(tmp_path / "fp8", fp8=True)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.gate_proj.weight")
        s = f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.shape == (2, 2)
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32  # router not quantized
    loaded = from_pretrained(tmp_path / "fp8")
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ours(ids)
        rel = ((loaded(ids) - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.15  # quantization really happened (E4M3 ~3% per weight) and stayed bounded
    loaded.save_pretrained(tmp_path / "deq")
    hf = _hf_load(tmp_path / "deq")
    with torch.no_grad():
        assert (loaded(ids) - hf(ids).logits).abs().max().item() < TOL
