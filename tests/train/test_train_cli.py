"""`frugalm train/generate/eval` end to end, and bad input turned into one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from frugalm.cli import main
from frugalm.train.metrics import read_metrics


def frugalm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "frugalm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cli_run(config_file, tmp_path_factory):
    """One real `frugalm train` process over the tiny config."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = frugalm("train", "--config", str(config_file()), "--out", str(out), "--no-progress",
                   "--set", "train.max_steps=8", "--set", "train.eval_every=4", "--set", "train.num_threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_train_writes_metrics_plot_config_and_final_model(cli_run):
    out, proc = cli_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(0, 9))
    for r in records[1:]:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu", "load_imbalance", "expert_load"} <= set(r)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]  # evaluated at steps 0, 4, 8 and falling
    assert records[-1]["tokens"] == 8 * 4 * 16
    assert (out / "training.png").stat().st_size > 10_000
    assert (out / "tb").is_dir() and any((out / "tb").iterdir())
    assert "[train]" in (out / "config.toml").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_model"] == str(out / "final")
    assert "sample:" in proc.stdout and "val loss" in proc.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "final" / name).is_file()


def test_final_model_loads_in_transformers_with_identical_logits(cli_run):
    transformers = pytest.importorskip("transformers")
    import frugalm as fm

    final = cli_run[0] / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ids = tok("def main(argv):", return_tensors="pt").input_ids
    ours = fm.from_pretrained(final)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_generate_is_reproducible_with_a_seed(cli_run, capsys):
    final = str(cli_run[0] / "final")
    args = ["generate", "--model", final, "--prompt", "The ", "--max-new-tokens", "6", "--seed", "3",
            "--top-k", "20", "--top-p", "0.9"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("The ")


def test_eval_reports_loss_and_perplexity(cli_run, corpus_dir, capsys):
    final = str(cli_run[0] / "final")
    assert main(["eval", "--model", final, "--data", str(corpus_dir), "--seq-len", "16", "--max-tokens", "2000",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 2000 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    assert 0 < result["loss"] < 6.0  # below uniform over the 320-token vocabulary (5.77) only if it learned


def test_bad_config_key_is_one_line_exit_2_without_traceback(config_file, tmp_path):
    proc = frugalm("train", "--config", str(config_file()), "--out", str(tmp_path / "x"),
                   "--set", "train.max_stepz=3")
    assert proc.returncode == 2
    assert "max_stepz" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv_tail, needle", [
    (["--set", "data.path=/no/such/corpus"], "no such file or folder"),
    (["--set", "model.vocab_size=100"], "vocab_size"),
    (["--set", "train.lr=-1"], "lr"),
    (["--set", "bogus.key=1"], "unknown section"),
])
def test_bad_input_gives_exit_2_and_a_clear_message(config_file, tmp_path, capsys, argv_tail, needle):
    code = main(["train", "--config", str(config_file()), "--out", str(tmp_path / "x"), "--no-progress", *argv_tail])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.startswith("frugalm train: error:")


def test_corrupt_checkpoints_and_existing_runs_are_refused(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = str(config_file(max_steps=4, eval_every=0, sample_tokens=0))
    assert main(["train", "--config", cfg, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", cfg, "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    for step_dir in (out / "checkpoints").iterdir():
        with open(step_dir / "optimizer.safetensors", "r+b") as f:
            f.truncate(100)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no valid checkpoint" in err and "truncated" in err
    bad = next(p for p in (out / "checkpoints").iterdir())
    assert main(["train", "--out", str(out), "--resume-from", str(bad), "--no-progress"]) == 2
    assert "truncated" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--out", str(out), "--overwrite", "--no-progress"]) == 0


def test_generate_and_eval_bad_paths(cli_run, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["eval", "--model", str(cli_run[0] / "final"), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
