"""Training checkpoints: atomic folders of safetensors + JSON with a sha256 manifest, verified on load.

Layout of ``<root>/step-000123/``: one ``*.safetensors`` file per tensor group (model, optimizer, RNG),
one ``*.json`` file per JSON group (trainer/sampler/RNG state) and ``manifest.json`` (format, step,
size and sha256 of every file), written last. A checkpoint is built in ``<root>/.tmp-step-000123-*``,
every file and the folder are fsync'ed, and only then is it renamed to ``step-000123``: a crash at any
moment leaves either the complete checkpoint or a ``.tmp-*`` folder that resume ignores and deletes.
No pickle anywhere: a checkpoint can be loaded from an untrusted source without running code.
`prepare_run_dir` and `resume_checkpoint` are the run-folder rules every loop that writes these uses
(the trainer, GRPO, the transformers-student SFT): refuse an existing run, clear it on --overwrite,
resume from the newest valid checkpoint after deleting unfinished writes and quarantining invalid ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from frugalm.config import ConfigError

log = logging.getLogger(__name__)

FORMAT = "frugalm.train_checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete, truncated or corrupted; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]  # file stem -> tensors
    json: dict[str, Any]  # file stem -> object
    manifest: dict[str, Any]


def replace_dir(tmp: Path, final: Path) -> Path:
    """Move a fully written folder into place, replacing an existing one, so readers never see half of it."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    return final


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ---------------------------------------------------------------------------------------- writing
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename or file creation in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, contiguous CPU copies, fsync'ed before returning."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path))
    _fsync_file(path)


def write_json_file(path: Path, obj: Any) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    root: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    json_objects: dict[str, Any],
    *,
    keep: Optional[int] = None,
) -> Path:
    """Write ``<root>/step-NNNNNN`` atomically and return it; then keep only the newest `keep` checkpoints.

    `tensors` maps a file stem ("model") to a flat tensor dict, `json_objects` a file stem ("state") to
    a JSON-serialisable object. An existing checkpoint of the same step is replaced (atomically).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stems = list(tensors) + list(json_objects)
    if len(set(stems)) != len(stems) or "manifest" in stems:
        raise ValueError(f"checkpoint file stems must be unique and not 'manifest': {stems}")
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        for stem, group in tensors.items():
            path = tmp / f"{stem}.safetensors"
            write_tensor_file(path, group)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for stem, obj in json_objects.items():
            path = tmp / f"{stem}.json"
            write_json_file(path, obj)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "created": time.time(), "files": files}
        write_json_file(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resuming from an older one): swap atomically
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune_checkpoints(root, keep)
    return final


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (by step); returns the deleted folders."""
    steps = list_checkpoints(root)
    doomed = steps[:-keep] if keep > 0 else steps
    for path in doomed:
        # Rename first so a crash mid-delete never leaves a half-deleted step-N that looks like a checkpoint.
        trash = path.parent / f".del-{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def remove_partial_writes(root: str | Path) -> list[Path]:
    """Delete leftovers of interrupted writes/deletes (``.tmp-*``, ``.old-*``, ``.del-*``) under `root`."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith((".tmp-", ".old-", ".del-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------- run folders
def prepare_run_dir(out_dir: str | Path, root: str | Path, *, resume: Any, overwrite: bool, what: str,
                    clear: tuple[str, ...] = (), delete: bool = True) -> None:
    """Refuse to start a new run over one that has checkpoints in `root`, unless resuming or overwriting.

    ``overwrite`` deletes `root` and the outputs named in `clear` (relative to `out_dir`); ``delete=False``
    (a rank other than the writing one) only checks. `what` names the run in the message ("a GRPO run").
    """
    existing = list_checkpoints(root)
    if resume or not existing:
        return
    if not overwrite:
        raise ConfigError(f"{out_dir} already holds {what} ({existing[-1].name}); pass --resume to continue it, "
                          f"--overwrite to start again, or choose another --out")
    if delete:
        shutil.rmtree(root)
        for name in clear:
            shutil.rmtree(Path(out_dir) / name, ignore_errors=True)


def resume_checkpoint(root: str | Path, say: Callable[[str], None], *, clean: bool = True) -> Optional[Path]:
    """The checkpoint a resumed run continues from, or None (said) when `root` holds none.

    With `clean` (the writing process) leftovers of writes a crash interrupted are deleted and invalid
    checkpoints quarantined first (`latest_valid_checkpoint`); other ranks only look, after it did.
    """
    if clean:
        for p in remove_partial_writes(root):
            say(f"resume: removed the unfinished checkpoint write {p.name}")
    path = latest_valid_checkpoint(root, quarantine=clean)
    if path is None:
        say(f"resume: no checkpoint in {root}; starting from step 0")
    return path


# ---------------------------------------------------------------------------------------- reading
def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete-looking ``step-N`` folders under `root`, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check the manifest and every file's size and sha256; return the manifest or raise CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST} (interrupted while writing?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupted ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a {FORMAT} v{VERSION} manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists no files")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        size = f.stat().st_size
        if size != info.get("bytes"):
            what = "truncated" if size < info.get("bytes", 0) else "larger than recorded"
            raise CheckpointError(f"checkpoint file {f} is {what} ({size} bytes, manifest says {info.get('bytes')})")
        if _sha256(f) != info.get("sha256"):
            raise CheckpointError(f"checkpoint file {f} is corrupted (sha256 differs from {MANIFEST})")
    return manifest


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Verify and read a checkpoint folder (tensors onto `device`)."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    objects: dict[str, Any] = {}
    for name in manifest["files"]:
        f = path / name
        try:
            if name.endswith(".safetensors"):
                tensors[name[: -len(".safetensors")]] = load_file(str(f), device=str(device))
            elif name.endswith(".json"):
                objects[name[: -len(".json")]] = json.loads(f.read_text(encoding="utf-8"))
        except (SafetensorError, json.JSONDecodeError, OSError) as e:
            raise CheckpointError(f"checkpoint file {f} cannot be read: {e}") from None
    return Checkpoint(path, int(manifest["step"]), tensors, objects, manifest)


def latest_valid_checkpoint(root: str | Path, *, quarantine: bool = False) -> Optional[Path]:
    """The newest checkpoint under `root` that verifies, or None if there is none at all.

    Invalid ones are logged with the reason and skipped; with `quarantine` they are renamed to
    ``step-N.invalid-<time>`` (kept for inspection, never picked again, and out of the way of the
    resumed run's own step-N). Raises CheckpointError if checkpoints exist but none is valid.
    """
    candidates = list_checkpoints(root)
    problems = []
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            problems.append(str(e))
            log.warning("skipping invalid checkpoint: %s", e)
            if quarantine:
                os.rename(path, path.with_name(f"{path.name}.invalid-{int(time.time())}"))
    if problems:
        raise CheckpointError("no valid checkpoint to resume from: " + "; ".join(problems))
    return None
