"""Checkpoint folders: atomic writes, keep-last-K, sha256 verification, invalid ones refused or skipped."""

from __future__ import annotations

import json
import os

import pytest
import torch

from frugalm.train import checkpoint as ckpt
from frugalm.train.checkpoint import CheckpointError


def payload(step: int):
    gen = torch.Generator().manual_seed(step)
    tensors = {"model": {"w": torch.randn(64, 32, generator=gen), "b": torch.zeros(3, dtype=torch.bfloat16)},
               "rng": {"torch_cpu": torch.get_rng_state()}}
    return tensors, {"state": {"step": step, "sampler": {"epoch": 0, "cursor": step * 4}}}


def save(root, step, keep=None):
    tensors, objects = payload(step)
    return ckpt.save_checkpoint(root, step, tensors, objects, keep=keep)


def test_round_trip_is_exact_and_manifest_lists_every_file(tmp_path):
    path = save(tmp_path, 3)
    assert path.name == "step-000003"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "rng.safetensors", "state.json"}
    loaded = ckpt.load_checkpoint(path)
    tensors, objects = payload(3)
    assert loaded.step == 3 and loaded.json == objects
    for k, v in tensors["model"].items():
        assert torch.equal(loaded.tensors["model"][k], v) and loaded.tensors["model"][k].dtype == v.dtype
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_k(tmp_path):
    for step in (2, 4, 6, 8):
        save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000006", "step-000008"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_before_the_rename_leaves_only_a_tmp_folder(tmp_path, monkeypatch):
    good = save(tmp_path, 2)

    def crash(*args):
        raise OSError("simulated power loss")

    monkeypatch.setattr(ckpt.os, "rename", crash)
    with pytest.raises(OSError, match="power loss"):
        save(tmp_path, 4)
    monkeypatch.undo()
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert ckpt.latest_valid_checkpoint(tmp_path) == good


def test_a_leftover_tmp_folder_is_ignored_then_removed(tmp_path):
    good = save(tmp_path, 2)
    half = tmp_path / ".tmp-step-000004-deadbeef"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 100)
    assert ckpt.latest_valid_checkpoint(tmp_path) == good
    assert ckpt.remove_partial_writes(tmp_path) == [half]
    assert not half.exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"),
    ("flip", "corrupted"),
    ("manifest", "no manifest.json"),
    ("garbage_manifest", "manifest.json is corrupted"),
    ("delete", "missing state.json"),
])
def test_damaged_checkpoints_are_refused_with_the_file_named(tmp_path, damage, message):
    path = save(tmp_path, 5)
    model = path / "model.safetensors"
    if damage == "truncate":
        data = model.read_bytes()
        model.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(model.read_bytes())
        data[-10] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "manifest":
        (path / "manifest.json").unlink()
    elif damage == "garbage_manifest":
        (path / "manifest.json").write_text("{not json")
    else:
        (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match=message):
        ckpt.load_checkpoint(path)


def test_latest_valid_skips_and_quarantines_a_corrupt_newest(tmp_path):
    older = save(tmp_path, 2)
    newest = save(tmp_path, 4)
    with open(newest / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff\xff\xff")
    assert ckpt.latest_valid_checkpoint(tmp_path, quarantine=True) == older
    assert not newest.exists()
    assert len(list(tmp_path.glob("step-000004.invalid-*"))) == 1
    assert ckpt.list_checkpoints(tmp_path) == [older]


def test_no_valid_checkpoint_at_all_is_an_error_and_none_is_none(tmp_path):
    assert ckpt.latest_valid_checkpoint(tmp_path / "empty") is None
    path = save(tmp_path, 2)
    os.truncate(path / "state.json", 3)
    with pytest.raises(CheckpointError, match="no valid checkpoint to resume from"):
        ckpt.latest_valid_checkpoint(tmp_path)


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 2)
    tensors, objects = payload(2)
    objects["state"]["note"] = "second"
    path = ckpt.save_checkpoint(tmp_path, 2, tensors, objects)
    assert ckpt.load_checkpoint(path).json["state"]["note"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]


def test_run_dir_refuses_an_existing_run_unless_resumed_or_overwritten(tmp_path):
    from frugalm.config import ConfigError

    root = tmp_path / "checkpoints"
    ckpt.prepare_run_dir(tmp_path, root, resume=False, overwrite=False, what="a GRPO run")  # nothing there yet
    save(root, 3)
    (tmp_path / "final").mkdir()
    with pytest.raises(ConfigError, match=r"already holds a GRPO run \(step-000003\); pass --resume to continue it, "
                                          r"--overwrite to start again"):
        ckpt.prepare_run_dir(tmp_path, root, resume=False, overwrite=False, what="a GRPO run")
    ckpt.prepare_run_dir(tmp_path, root, resume=True, overwrite=False, what="a GRPO run")
    ckpt.prepare_run_dir(tmp_path, root, resume=False, overwrite=True, what="a GRPO run", clear=("final",),
                         delete=False)  # a rank that does not write: checks only
    assert (tmp_path / "final").is_dir() and ckpt.list_checkpoints(root)
    ckpt.prepare_run_dir(tmp_path, root, resume=False, overwrite=True, what="a GRPO run", clear=("final",))
    assert not root.exists() and not (tmp_path / "final").exists()


def test_resume_checkpoint_cleans_up_then_picks_the_newest_valid(tmp_path):
    said = []
    assert ckpt.resume_checkpoint(tmp_path, said.append) is None
    assert said == [f"resume: no checkpoint in {tmp_path}; starting from step 0"]
    good = save(tmp_path, 2)
    torn = save(tmp_path, 4)
    os.truncate(torn / "model.safetensors", 10)
    half = tmp_path / ".tmp-step-000006-deadbeef"
    half.mkdir()
    said.clear()
    assert ckpt.resume_checkpoint(tmp_path, said.append, clean=False) == good  # only looks
    assert half.exists() and torn.exists() and said == []
    assert ckpt.resume_checkpoint(tmp_path, said.append) == good
    assert said == ["resume: removed the unfinished checkpoint write .tmp-step-000006-deadbeef"]
    assert not half.exists() and not torn.exists() and len(list(tmp_path.glob("step-000004.invalid-*"))) == 1
