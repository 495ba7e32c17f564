"""Exact resume on CPU: a run interrupted (crash, SIGKILL during a checkpoint write) and resumed reproduces
the uninterrupted run's losses, validation losses and final weights bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frugalm.train.metrics import read_metrics
from frugalm.train.trainer import Trainer

VARIANTS = {
    "plain": {},
    # more state to restore: several micro-batches, BF16 moments, the WSD schedule
    "accum-bf16moments-wsd": {"grad_accum": 2, "bf16_moments": True, "schedule": "wsd", "decay_fraction": 0.5},
}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def metric_series(out: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(out / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def uninterrupted(run_config, tmp_path_factory):
    """The reference: each variant run from step 0 to the end without interruption."""
    runs = {}
    for name, train in VARIANTS.items():
        out = tmp_path_factory.mktemp(f"ref-{name}")
        summary = Trainer(run_config(**train), out, progress=False).fit()
        runs[name] = (summary, out)
    return runs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_crash_then_resume_is_bitwise_identical(variant, run_config, uninterrupted, tmp_path):
    ref, ref_out = uninterrupted[variant]
    cfg = run_config(**VARIANTS[variant])
    # Crash after step 5: nothing written at the stop, so the last checkpoint is step 4.
    first = Trainer(cfg, tmp_path, progress=False).fit(stop_after=5, checkpoint_on_stop=False)
    assert first.interrupted and first.steps == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    resumed_trainer = Trainer(cfg, tmp_path, resume=True, progress=False)
    assert resumed_trainer.step == 4
    resumed = resumed_trainer.fit()
    assert list(resumed.losses) == [5, 6]
    for step in range(1, 6):
        assert first.losses[step] == ref.losses[step]
    for step in (5, 6):
        assert resumed.losses[step] == ref.losses[step]  # exact float equality, not approx
    assert resumed.val_losses[6] == ref.val_losses[6]
    assert_same_weights(final_weights(tmp_path), final_weights(ref_out))
    # The metrics file reads as if the run had never stopped (no duplicated steps 5).
    for key in ("loss", "val_loss", "lr"):
        assert metric_series(tmp_path, key) == metric_series(ref_out, key)


KILLER = textwrap.dedent('''
    """Train, but SIGKILL this process while checkpoint step {step} is half written."""
    import os, signal, sys
    import torch
    from frugalm.train import checkpoint
    from frugalm.train.config import load_run_config
    from frugalm.train.trainer import Trainer

    original = checkpoint.write_tensor_file

    def write_then_die(path, tensors):
        original(path, tensors)
        if path.name == "optimizer.safetensors" and ".tmp-step-{step:06d}" in str(path.parent):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.write_tensor_file = write_then_die
    torch.set_num_threads(1)  # as the in-process reference: CPU reductions split by thread count
    Trainer(load_run_config(sys.argv[1]), sys.argv[2], progress=False).fit()
''')


def test_sigkill_during_a_checkpoint_write_then_resume_is_exact(config_file, uninterrupted, run_config, tmp_path):
    ref, ref_out = uninterrupted["plain"]
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(step=4))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(config_file()), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = out / "checkpoints"
    half = [p.name for p in root.iterdir() if p.name.startswith(".tmp-step-000004")]
    assert len(half) == 1 and (root / half[0] / "model.safetensors").is_file()
    assert not (root / half[0] / "manifest.json").exists()
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == ["step-000002"]

    resumed_trainer = Trainer(run_config(), out, resume=True, progress=False)
    assert resumed_trainer.step == 2
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # the half write was cleaned up
    resumed = resumed_trainer.fit()
    assert resumed.losses == {s: ref.losses[s] for s in range(3, 7)}
    assert_same_weights(final_weights(out), final_weights(ref_out))


def test_resume_skips_a_corrupted_newest_checkpoint(run_config, uninterrupted, tmp_path):
    ref, _ = uninterrupted["plain"]
    cfg = run_config()
    Trainer(cfg, tmp_path, progress=False).fit(stop_after=4, checkpoint_on_stop=False)
    newest = tmp_path / "checkpoints" / "step-000004"
    with open(newest / "model.safetensors", "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\x00" * 16)
    messages: list[str] = []
    trainer = Trainer(cfg, tmp_path, resume=True, progress=False, log_fn=messages.append)
    assert trainer.step == 2
    assert any("step-000002" in m for m in messages)
    resumed = trainer.fit()
    assert resumed.losses == {s: ref.losses[s] for s in range(3, 7)}
