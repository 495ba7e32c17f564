"""Measured calibration from a frugalm run's metrics.jsonl and config.toml."""

import json
import statistics

import pytest

from frugalm.model.config import ModelConfig
from frugalm.plan.calibrate import calibrate, throughputs
from frugalm.plan.errors import PlanError
from frugalm.plan.flops import flops_per_token

MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
             topk_group=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=16, v_head_dim=16, num_nextn_predict_layers=1)
RATES = [900.0, 3100.0, 3000.0, 2950.0, 3050.0, 2990.0, 3020.0, 3010.0, 2980.0, 3005.0]  # first step: warm-up


def _write_run(root, rates=RATES, with_rate=True):
    toml_model = "\n".join(f"{k} = {v}" for k, v in MODEL.items())
    (root / "config.toml").write_text(f"[model]\n{toml_model}\n\n[train]\nseq_len = 128\nbatch_size = 8\nmax_steps = 10\n")
    # the trainer's first record (step 0) carries only the initial validation loss
    lines, tokens, t = [json.dumps({"step": 0, "tokens": 0, "lr": 0.0, "val_loss": 6.0})] if with_rate else [], 0, 0.0
    for step, rate in enumerate(rates, 1):
        tokens += 1024
        t += 1024 / rate
        row = {"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3, "tokens": tokens, "elapsed_s": t}
        if with_rate:
            row["tokens_per_s"] = rate
            row["mfu"] = rate * 1e-4
        lines.append(json.dumps(row))
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_achieved_mfu_from_a_run_folder(tmp_path):
    run = _write_run(tmp_path)
    r = calibrate(run, gpu="h100", count=2)
    steady = RATES[int(len(RATES) * 0.2):]
    fpt = flops_per_token(ModelConfig(**MODEL), 128)
    assert r.seq_len == 128 and r.steps_logged == 11 and r.steps_used == len(steady) and r.model == run.name
    assert r.tokens_per_s == statistics.median(steady)
    assert r.flops_per_token == fpt
    assert r.mfu == pytest.approx(statistics.median(steady) * fpt / (2 * 989.5e12))
    assert r.achieved_tflops_per_gpu == pytest.approx(r.mfu * 989.5)


def test_measured_peak_from_the_run_folder(tmp_path):
    run = _write_run(tmp_path)
    (run / "peak_flops.json").write_text(json.dumps({"cpu:x86_64:2threads|float32": 2.0e11}))
    r = calibrate(run)
    assert r.chip == "measured peak of cpu:x86_64:2threads|float32" and r.peak_tflops == 0.2
    assert r.peak_precision == "float32"
    assert r.mfu == pytest.approx(r.tokens_per_s * r.flops_per_token / 2.0e11)
    assert r.logged_mfu == pytest.approx(statistics.median(RATES[2:]) * 1e-4)
    (run / "peak_flops.json").write_text(json.dumps({"a|float32": 1.0, "b|bfloat16": 2.0}))
    with pytest.raises(PlanError, match="several measured peaks"):
        calibrate(run)


def test_custom_peak_per_gpu_rates_and_derived_throughput(tmp_path):
    run = _write_run(tmp_path)
    cpu = calibrate(run / "metrics.jsonl", peak_tflops=0.2, count=1, warmup_fraction=0.0)
    assert cpu.chip == "custom peak" and cpu.tokens_per_s == statistics.median(RATES)
    per_gpu = calibrate(run, peak_tflops=0.2, count=4, throughput_per_gpu=True)
    assert per_gpu.tokens_per_s == pytest.approx(4 * statistics.median(RATES[2:]))
    _write_run(tmp_path, with_rate=False)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert throughputs(rows) == pytest.approx(RATES[1:])  # Δtokens / Δtime between lines


def test_calibration_errors(tmp_path):
    with pytest.raises(PlanError, match="metrics file not found"):
        calibrate(tmp_path / "missing.jsonl", gpu="h100", model="deepseek-v3")
    run = _write_run(tmp_path)
    with pytest.raises(PlanError, match="--gpu NAME"):
        calibrate(run)
    with pytest.raises(PlanError, match="unknown chip"):
        calibrate(run, gpu="tpu-v9")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(PlanError, match="metrics.jsonl:2"):
        calibrate(run, gpu="h100")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1, "tokens": 10}\n')
    with pytest.raises(PlanError, match="no tokens_per_s"):
        calibrate(run, gpu="h100")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "metrics.jsonl").write_text('{"step": 1, "tokens_per_s": 5.0}\n')
    with pytest.raises(PlanError, match="no model"):
        calibrate(lone / "metrics.jsonl", gpu="h100")
