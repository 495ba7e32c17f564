"""`torchrun -m frugalm train` under data- and expert-parallel layouts, against single-process runs.

The sampler splits each global batch into per-rank slices (rank r reads windows ``[r*b, (r+1)*b)`` of the
global batch), so ``batch_size=2`` on 2 ranks sees exactly the data of ``batch_size=4`` on one process
and the logged (all-reduced) losses must agree within fp32 summation-order tolerance. The schedule is
WSD with no decay so the learning rate of a step does not depend on ``max_steps`` (a 2-step run resumed
to 3 steps follows the 3-step reference).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from frugalm.config import ConfigError, dump_toml
from frugalm_testing import TINY_RUN_MODEL

pytestmark = pytest.mark.multiproc

VOCAB = 320
MODEL = dict(TINY_RUN_MODEL)
TRAIN = dict(
    max_steps=3, seed=7, batch_size=4, seq_len=16, lr=3e-3, min_lr=3e-4, warmup_steps=2, schedule="wsd",
    decay_fraction=0.0, eval_every=0, checkpoint_every=0, log_every=1, sample_tokens=0, device="cpu",
    bias_update_gamma=0.01, num_threads=1,
)
RTOL = 2e-5  # fp32: only the summation order of gradients/losses differs
# The logged gradient norm is computed two ways: single-process as the fp32 norm of per-parameter norms,
# distributed as an fp32 sum of squares over ranks; on the tiny config the two differ by up to ~3e-5
# relative for the same gradients (the sum of squares matches fp64 to 1e-8).
GRAD_NORM_RTOL = 1e-4


def _env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frugalm", "train", "--no-progress", *args],
                          capture_output=True, text=True, timeout=240, env=_env())


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "frugalm", "train", "--no-progress", *args],
                          capture_output=True, text=True, timeout=240, env=_env())


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"metrics.jsonl written by more than one rank: steps {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pydoc_data import topics

    root = tmp_path_factory.mktemp("torchrun")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, key in enumerate(sorted(topics.topics)[:40]):
        (corpus / f"{i:03d}.txt").write_text(topics.topics[key][:2500])
    config = root / "tiny.toml"
    config.write_text(dump_toml({
        "model": MODEL,
        "data": {"path": str(corpus), "vocab_size": VOCAB, "val_fraction": 0.1, "cache_dir": str(root / "cache")},
        "train": TRAIN,
    }))
    ref = root / "single"  # its step-2 checkpoint is resumed under pp2 below
    proc = _single("--config", str(config), "--out", str(ref), "--set", "train.checkpoint_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(ref)
    assert sorted(losses) == [1, 2, 3]
    return root, config, losses


def test_ep2_matches_single_process_and_resumes_single_process(setup):
    root, config, ref = setup
    out = root / "ep2"
    proc = _torchrun(2, "--config", str(config), "--out", str(out), "--set", "parallel.ep=2",
                     "--set", "train.batch_size=2", "--set", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done: 2 steps") == 1  # only rank 0 reports
    losses = _losses(out)
    assert sorted(losses) == [1, 2]
    for step in (1, 2):
        assert math.isclose(losses[step], ref[step], rel_tol=RTOL), (step, losses[step], ref[step])
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-000002"]
    assert (out / "final" / "config.json").is_file()  # HF export of the gathered (full) model

    # The ep2 checkpoint holds full tensors: a single process continues it to step 3 like the reference.
    proc = _single("--out", str(out), "--resume", "--set", "parallel.ep=1", "--set", "train.batch_size=4",
                   "--set", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuing from" in proc.stderr and "step 2" in proc.stderr
    resumed = _losses(out)
    assert sorted(resumed) == [1, 2, 3]
    assert math.isclose(resumed[3], ref[3], rel_tol=RTOL), (resumed[3], ref[3])


def test_dp2_matches_single_process(setup):
    root, config, ref = setup
    out = root / "dp2"
    proc = _torchrun(2, "--config", str(config), "--out", str(out), "--set", "parallel.dp=2",
                     "--set", "train.batch_size=2", "--set", "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = _losses(out)
    assert sorted(losses) == [1]
    assert math.isclose(losses[1], ref[1], rel_tol=RTOL), (losses[1], ref[1])


def test_pipeline_parallel_needs_enough_processes(tmp_path):
    from frugalm.train.config import load_run_config
    from frugalm.train.trainer import Trainer

    cfg = load_run_config("tiny", ["parallel.pp=2"])
    with pytest.raises(ConfigError, match="not divisible by ep\\*pp"):
        Trainer(cfg, tmp_path / "run")


def _records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                                   if line.strip()) if "loss" in r}


def _check_against_reference(root: Path, out: Path, steps: list[int]) -> None:
    """Every logged loss part and the global gradient norm (a check of the gradients) match the reference."""
    ref, got = _records(root / "single"), _records(out)
    assert sorted(got) == steps
    for step in steps:
        for key in ("loss", "mtp_loss", "balance_loss", "total_loss", "grad_norm"):
            tol = GRAD_NORM_RTOL if key == "grad_norm" else RTOL
            assert math.isclose(got[step][key], ref[step][key], rel_tol=tol), (step, key, got[step][key], ref[step][key])


@pytest.mark.parametrize("schedule, micro", [("1f1b", 2), ("dualpipev", 4)])
def test_pp2_matches_single_process_and_resumes_single_process(setup, schedule, micro):
    root, config, ref = setup
    out = root / f"pp2-{schedule}"
    proc = _torchrun(2, "--config", str(config), "--out", str(out), "--set", "parallel.pp=2",
                     "--set", f"pipeline.schedule={schedule}", "--set", f"pipeline.micro_batches={micro}",
                     "--set", "train.max_steps=2", "--set", "train.eval_every=2", "--set", "train.eval_batches=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done: 2 steps") == 1
    _check_against_reference(root, out, [1, 2])
    _check_held_parameters(proc.stderr)
    # forward-only evaluation through the pipeline = single-process evaluation of the gathered HF export
    val, export_val = _records(out)[2]["val_loss"], _val_loss_of_export(root, config, out / "final")
    assert math.isclose(val, export_val, rel_tol=RTOL), (val, export_val)
    # the pp2 checkpoint is the single-process one: continue it on one process to step 3
    proc = _single("--out", str(out), "--resume", "--set", "parallel.pp=1", "--set", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuing from" in proc.stderr and "step 2" in proc.stderr
    resumed = _losses(out)
    assert math.isclose(resumed[3], ref[3], rel_tol=RTOL), (resumed[3], ref[3])


def _check_held_parameters(log: str) -> None:
    """Each pipeline rank holds less than the whole model (the other stages' weights were released)."""
    match = re.search(r"parameter MB held per pp rank \[([^\]]+)\] \(whole model ([0-9.]+) MB\)", log)
    assert match, log[-3000:]
    held, whole = [float(x) for x in match.group(1).split(",")], float(match.group(2))
    assert max(held) < whole <= sum(held) + 1e-3, (held, whole)


def _val_loss_of_export(root: Path, config: Path, model_dir: Path) -> float:
    """What single-process `Trainer.evaluate` computes with ``eval_batches=1``, from an HF export."""
    import torch
    import torch.nn.functional as F

    from frugalm.data.prepare import prepare_data
    from frugalm.model.checkpoint import from_pretrained
    from frugalm.train.config import load_run_config

    cfg = load_run_config(str(config), [])
    data = prepare_data(cfg.data, None, progress=False)
    model = from_pretrained(model_dir, device="cpu").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.val_batches(cfg.train.eval_batch_size or cfg.train.batch_size, cfg.train.seq_len,
                                      max_batches=1):
            logits = model(batch[:, :-1])
            total += float(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            count += batch[:, 1:].numel()
    return total / count


def test_single_process_checkpoint_resumes_under_pp2(setup):
    """single -> pp2: the pp2 run takes its stages' shards of a single-process checkpoint, continues like the
    reference, evaluates through the pipeline what a single process computes on the exported weights."""
    root, config, ref = setup
    out = root / "single-to-pp2"
    shutil.copytree(root / "single", out)  # the reference run, cut back to its step-2 checkpoint
    shutil.rmtree(out / "checkpoints" / "step-000003")
    shutil.rmtree(out / "final")  # written again by the pp2 run
    proc = _torchrun(2, "--out", str(out), "--resume", "--set", "parallel.pp=2", "--set", "pipeline.schedule=1f1b",
                     "--set", "pipeline.micro_batches=2", "--set", "train.max_steps=3", "--set", "train.eval_every=3",
                     "--set", "train.eval_batches=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "continuing from" in proc.stderr and "step 2" in proc.stderr
    _check_held_parameters(proc.stderr)
    got = _records(out)
    assert math.isclose(got[3]["loss"], ref[3], rel_tol=RTOL), (got[3]["loss"], ref[3])
    val = _val_loss_of_export(root, config, out / "final")  # the export is gathered from both stages
    assert math.isclose(got[3]["val_loss"], val, rel_tol=RTOL), (got[3]["val_loss"], val)


def test_dp2_ep2_on_four_processes_matches_single_process(setup):
    root, config, ref = setup
    out = root / "dp2ep2"
    proc = _torchrun(4, "--config", str(config), "--out", str(out), "--set", "parallel.dp=2",
                     "--set", "parallel.ep=2", "--set", "train.batch_size=1", "--set", "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = _losses(out)
    assert sorted(losses) == [1]
    assert math.isclose(losses[1], ref[1], rel_tol=RTOL), (losses[1], ref[1])


@pytest.mark.parametrize("axis", ["dp", pytest.param("ep", marks=pytest.mark.slow)])
def test_pp2_times_dp2_or_ep2_on_four_processes_matches_single_process(setup, axis):
    root, config, ref = setup
    out = root / f"pp2{axis}2"
    proc = _torchrun(4, "--config", str(config), "--out", str(out), "--set", "parallel.pp=2",
                     "--set", f"parallel.{axis}=2", "--set", "pipeline.schedule=1f1b", "--set", "pipeline.micro_batches=2",
                     "--set", "train.batch_size=2", "--set", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_against_reference(root, out, [1, 2])


def _single_batch8(root: Path, config: Path) -> Path:
    """The single-process reference on batches of 8 (DualPipe(V) needs >= 4 micro-batches), run once."""
    ref = root / "single-b8"
    if not ref.exists():
        proc = _single("--config", str(config), "--out", str(ref), "--set", "train.batch_size=8",
                       "--set", "train.max_steps=2", "--set", "train.checkpoint_every=2")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return ref


def test_pp2_ep2_dualpipev_with_overlapped_forward_backward_matches_single_process(setup):
    """DualPipeV with `pipeline.overlap`: each F&B slot's forward and backward run at once on two threads,
    each with expert-parallel all-to-alls (forward over the ep group, backward over its twin group).
    Losses and gradient norms equal a single process on the same 8-sequence batches."""
    root, config, _ = setup
    ref = _single_batch8(root, config)
    out = root / "pp2ep2-dualpipev-overlap"
    proc = _torchrun(4, "--config", str(config), "--out", str(out), "--set", "parallel.pp=2", "--set", "parallel.ep=2",
                     "--set", "pipeline.schedule=dualpipev", "--set", "pipeline.micro_batches=4",
                     "--set", "pipeline.overlap=true", "--set", "train.batch_size=4", "--set", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "F&B overlapped on two threads" in proc.stdout + proc.stderr
    want, got = _records(ref), _records(out)
    assert sorted(got) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            tol = GRAD_NORM_RTOL if key == "grad_norm" else RTOL
            assert math.isclose(got[step][key], want[step][key], rel_tol=tol), (step, key, got[step][key], want[step][key])


def test_pipeline_overlap_refuses_fsdp(tmp_path):
    from frugalm.train.config import load_run_config
    from frugalm.train.trainer import Trainer

    cfg = load_run_config("tiny", ["parallel.pp=2", "parallel.dp_mode=fsdp", "pipeline.overlap=true"])
    with pytest.raises(ConfigError, match="overlap = true needs"):
        Trainer(cfg, tmp_path / "run")


# ---------------------------------------------------------------------------------------- pp x FSDP2
# Weights and AdamW moments of a distributed run's checkpoint against the single-process one. The fp32
# gradients differ only in summation order (~1e-7 relative), but AdamW divides by sqrt(v) + 1e-8, so an
# entry whose gradient is rounding noise moves by up to ~lr with the noise's sign: one such entry of the
# tiny model ends ~8e-6 off after two steps, identically under pp2·dp2 DDP -- hence atol 1e-5 on weights.
WEIGHT_TOL, MOMENT_TOL = dict(rtol=1e-4, atol=1e-5), dict(rtol=1e-4, atol=1e-8)


def _check_checkpoint_against(want: Path, got: Path) -> None:
    import torch

    from frugalm.train import checkpoint as ckpt

    ref, run = ckpt.load_checkpoint(want), ckpt.load_checkpoint(got)
    for part, tol in (("model", WEIGHT_TOL), ("optimizer", MOMENT_TOL)):
        assert set(run.tensors[part]) == set(ref.tensors[part]), part
        for name, w in ref.tensors[part].items():
            torch.testing.assert_close(run.tensors[part][name], w, **tol, msg=lambda m: f"{part} {name}: {m}")


def _fsdp_pp2dp2(*args: str) -> subprocess.CompletedProcess:
    return _torchrun(4, "--set", "parallel.pp=2", "--set", "parallel.dp=2", "--set", "parallel.dp_mode=fsdp",
                     "--set", "train.batch_size=2", *args)


def _check_sharded(log: str) -> None:
    """Each pp2·dp2 FSDP rank stores about half of its stages' weights (its dp shard)."""
    match = re.search(r"parameter MB held per pp rank \[([^\]]+)\] \(whole model ([0-9.]+) MB\)", log)
    assert match, log[-3000:]
    held, whole = [float(x) for x in match.group(1).split(",")], float(match.group(2))
    assert sum(held) < 0.7 * whole, (held, whole)
    assert "pipeline: FSDP2 over dp x ep = 2 ranks per stage" in log


def test_pp2_times_dp2_fsdp_matches_single_process_and_resumes_single_process(setup):
    """pp2 x FSDP2 (1F1B, resharding after forward): losses, gradient norms, weights and moments of two
    steps equal the single-process run; the checkpoint continues on one process; HF export and pipeline
    evaluation agree."""
    root, config, ref = setup
    out = root / "pp2dp2-fsdp"
    proc = _fsdp_pp2dp2("--config", str(config), "--out", str(out), "--set", "pipeline.schedule=1f1b",
                        "--set", "pipeline.micro_batches=2", "--set", "train.max_steps=2",
                        "--set", "train.checkpoint_every=2", "--set", "train.eval_every=2", "--set", "train.eval_batches=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done: 2 steps") == 1
    assert "reshard_after_forward=True" in proc.stderr
    _check_sharded(proc.stderr)
    _check_against_reference(root, out, [1, 2])
    _check_checkpoint_against(root / "single" / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    val, export_val = _records(out)[2]["val_loss"], _val_loss_of_export(root, config, out / "final")
    assert math.isclose(val, export_val, rel_tol=RTOL), (val, export_val)
    proc = _single("--out", str(out), "--resume", "--set", "parallel.pp=1", "--set", "parallel.dp=0",
                   "--set", "parallel.dp_mode=ddp", "--set", "train.batch_size=4", "--set", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuing from" in proc.stderr and "step 2" in proc.stderr
    assert math.isclose(_losses(out)[3], ref[3], rel_tol=RTOL), (_losses(out)[3], ref[3])


def test_single_process_checkpoint_resumes_under_pp2_dp2_fsdp_zero_bubble(setup):
    """single -> pp2 x FSDP2 under ZB1P (deferred weight gradients: parameters stay gathered for the step):
    each rank loads its shard of its stages, and step 3 (loss, gradient norm, weights, moments) is the
    single-process step 3."""
    root, config, ref = setup
    out = root / "single-to-pp2dp2-fsdp"
    shutil.copytree(root / "single", out)
    shutil.rmtree(out / "checkpoints" / "step-000003")
    shutil.rmtree(out / "final")
    proc = _fsdp_pp2dp2("--out", str(out), "--resume", "--set", "pipeline.schedule=zb1p",
                        "--set", "pipeline.micro_batches=2", "--set", "train.max_steps=3", "--set", "train.checkpoint_every=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "continuing from" in proc.stderr and "step 2" in proc.stderr
    assert "reshard_after_forward=False" in proc.stderr
    _check_against_reference(root, out, [1, 2, 3])  # steps 1-2 are the copied reference's own records
    _check_checkpoint_against(root / "single" / "checkpoints" / "step-000003", out / "checkpoints" / "step-000003")
    assert (out / "final" / "config.json").is_file()


@pytest.mark.slow  # two 4-process runs and their own single-process reference, ~1.5 min on 2 cores
@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_pp2_times_dp2_fsdp_dualpipe_matches_single_process(setup, schedule):
    """DualPipe (mirrored stage copies exchange gathered gradients before the reduce-scatter) and DualPipeV
    need >= 4 micro-batches: 4 sequences per rank against a single process on batches of 8."""
    root, config, _ = setup
    ref = _single_batch8(root, config)
    out = root / f"pp2dp2-fsdp-{schedule}"
    proc = _fsdp_pp2dp2("--config", str(config), "--out", str(out), "--set", f"pipeline.schedule={schedule}",
                        "--set", "pipeline.micro_batches=4", "--set", "train.batch_size=4", "--set", "train.max_steps=2",
                        "--set", "train.checkpoint_every=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    want, got = _records(ref), _records(out)
    for step in (1, 2):
        for key in ("loss", "mtp_loss", "balance_loss", "total_loss", "grad_norm"):
            tol = GRAD_NORM_RTOL if key == "grad_norm" else RTOL
            assert math.isclose(got[step][key], want[step][key], rel_tol=tol), (step, key, got[step][key], want[step][key])
    _check_checkpoint_against(ref / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")


def test_pp_fsdp_refuses_tied_embeddings(tmp_path):
    from frugalm.train.config import load_run_config
    from frugalm.train.trainer import Trainer

    cfg = load_run_config("tiny", ["parallel.pp=2", "parallel.dp_mode=fsdp", "model.tie_word_embeddings=true"])
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        Trainer(cfg, tmp_path / "run")
