"""`[fp8] enabled = true` puts the model's Linear layers and expert GEMMs in FP8 from outside and still trains."""

from __future__ import annotations

import dataclasses
import math

from frugalm.fp8.config import FP8Config
from frugalm.fp8.linear import FP8GroupedLinear, FP8Linear
from frugalm.train.trainer import Trainer


def test_fp8_section_converts_the_model_and_training_runs(run_config, tmp_path):
    cfg = run_config(max_steps=2, eval_every=0, checkpoint_every=0, sample_tokens=0)
    cfg = dataclasses.replace(cfg, fp8=FP8Config(enabled=True))
    trainer = Trainer(cfg, tmp_path, progress=False, log_fn=lambda m: None)
    fp8_linears = [n for n, m in trainer.model.named_modules() if isinstance(m, FP8Linear)]
    assert any(n.endswith("self_attn.o_proj") for n in fp8_linears)
    assert not any("lm_head" in n or "embed" in n or n.endswith("mlp.gate") for n in fp8_linears)
    assert all(isinstance(m.experts.linear_fn, FP8GroupedLinear) for m in trainer.moe.values())
    summary = trainer.fit()
    assert summary.steps == 2 and summary.skipped_steps == 0 and math.isfinite(summary.final_loss)
    assert (tmp_path / "final" / "model.safetensors").is_file()  # same parameter names: HF export unchanged


def test_fp8_trains_under_the_trainers_bf16_autocast(run_config, tmp_path, monkeypatch):
    """`train.precision = "bf16"` + `[fp8]`: DeepSeek's setup (FP8 GEMMs, the rest in BF16, FP32 master weights)."""
    # The MFU log column would time 2048^3 BF16 matmuls, minutes on a CPU without BF16 units; not under test.
    monkeypatch.setattr("frugalm.train.perf.peak_flops", lambda *args: 1e12)
    cfg = run_config(max_steps=2, eval_every=2, checkpoint_every=0, sample_tokens=0, precision="bf16")
    cfg = dataclasses.replace(cfg, fp8=FP8Config(enabled=True, backend="emulated"))
    trainer = Trainer(cfg, tmp_path, progress=False, log_fn=lambda m: None)
    assert trainer.autocast_dtype is not None
    summary = trainer.fit()
    assert summary.steps == 2 and summary.skipped_steps == 0
    assert math.isfinite(summary.final_loss) and math.isfinite(summary.final_val_loss)
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in trainer.params)  # FP32 masters
