"""`--model`: presets, HF config.json files and folders, and TOML run configs."""

import json

import pytest

from frugalm.model.config import ModelConfig
from frugalm.plan.dense import DenseModelConfig
from frugalm.plan.errors import PlanError
from frugalm.plan.models import model_presets, resolve_model
from frugalm.plan.planner import PlanConfig, plan_run


def test_presets_resolve_with_their_training_facts():
    assert {"deepseek-v3", "llama-3.1-405b", "llama-3.1-70b", "llama-3.1-8b", "moonlight-16b-a3b"} <= set(model_presets())
    v3 = resolve_model("DeepSeek-V3")
    assert isinstance(v3.config, ModelConfig) and v3.config.num_nextn_predict_layers == 1
    assert (v3.seq_len, v3.global_batch, v3.layout["pp"], v3.layout["ep"]) == (4096, 15360, 16, 64)
    moon = resolve_model("moonlight-16b-a3b")
    assert moon.config.q_lora_rank is None and moon.shape.n_total == pytest.approx(16e9, rel=0.1)
    assert moon.shape.n_active == pytest.approx(3e9, rel=0.15)


def test_hf_config_json_file_and_folder(tmp_path):
    cfg = ModelConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4,
                      n_group=4, topk_group=2, first_k_dense_replace=1, vocab_size=1000)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg.save_json(folder / "config.json")
    for spec in (str(folder), str(folder / "config.json")):
        m = resolve_model(spec)
        assert m.config == ModelConfig.from_json(folder)
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                 "vocab_size": 128256, "rope_theta": 500000.0, "torch_dtype": "bfloat16"}))
    dense = resolve_model(str(llama))
    assert isinstance(dense.config, DenseModelConfig)
    assert dense.shape.n_active == resolve_model("llama-3.1-8b").shape.n_active
    other = tmp_path / "bert.json"
    other.write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(PlanError, match="model_type 'bert' is not supported"):
        resolve_model(str(other))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        resolve_model(str(broken))


def test_toml_run_config_and_dense_section(tmp_path):
    run = tmp_path / "tiny.toml"
    run.write_text("[model]\nhidden_size = 128\nintermediate_size = 256\nmoe_intermediate_size = 64\nnum_hidden_layers = 2\n"
                   "num_attention_heads = 2\nnum_key_value_heads = 2\nn_routed_experts = 8\nnum_experts_per_tok = 2\n"
                   "n_group = 4\ntopk_group = 2\nvocab_size = 512\n\n[train]\nseq_len = 256\nbatch_size = 16\n")
    m = resolve_model(str(run))
    assert m.seq_len == 256 and m.global_batch == 16 and m.config.hidden_size == 128
    result = plan_run(PlanConfig(model=str(run), tokens="1B", gpu="h100", count=1, mfu=0.3))
    assert result.seq_len == 256 and result.global_batch == 16 and result.fits
    dense = tmp_path / "dense.toml"
    dense.write_text("[dense_model]\nhidden_size = 512\nintermediate_size = 1024\nnum_hidden_layers = 4\n"
                     "num_attention_heads = 8\nnum_key_value_heads = 8\nvocab_size = 1000\n")
    assert isinstance(resolve_model(str(dense)).config, DenseModelConfig)
    typo = tmp_path / "typo.toml"
    typo.write_text("[model]\nhiden_size = 5\n")
    with pytest.raises(Exception, match="hiden_size"):
        resolve_model(str(typo))
    empty = tmp_path / "empty.toml"
    empty.write_text("[train]\nseq_len = 5\n")
    with pytest.raises(PlanError, match=r"no \[model\]"):
        resolve_model(str(empty))
