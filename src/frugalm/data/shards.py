"""Token shards on disk: writing them once, and memory-mapping them back after checking they are intact.

A split (train or val) is a sequence of flat binary files of little-endian token ids (uint16 while the
vocabulary fits, else uint32), each the concatenation of ``BOS document EOS`` frames. ``manifest.json``
beside them records the dtype, token/document counts, each file's sha256, the tokenizer's hash and
where the text came from; it is written last, so a directory with a manifest is complete.

Loading refuses a manifest of an unknown format, a missing or truncated shard and (unless told not to
hash) a shard whose bytes changed, each with a message naming the file, because training on silently
damaged tokens wastes a whole run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from frugalm.data.errors import DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "frugalm.token_shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type holding every id: uint16 halves disk and page-cache use."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class ShardWriter:
    """Appends token ids to ``{split}-NNNNN.bin`` files of at most `shard_tokens` ids, hashing as it goes."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory = Path(directory)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.num_documents = 0
        self._file: Any = None
        self._hash: Any = None
        self._count = 0

    def write(self, ids: np.ndarray, num_documents: int = 1) -> None:
        """Append framed documents (a document may continue into the next shard)."""
        ids = np.asarray(ids)
        self.num_documents += num_documents
        start = 0
        while start < len(ids):
            if self._file is None or self._count == self.shard_tokens:
                self._roll()
            take = min(len(ids) - start, self.shard_tokens - self._count)
            data = ids[start:start + take].astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            start += take

    def _roll(self) -> None:
        self._finish_shard()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self._count = 0
        self.shards.append({"file": name})

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(num_tokens=self._count, sha256=self._hash.hexdigest())
        self._file = None

    def close(self) -> dict[str, Any]:
        """Finish the last shard; return this split's manifest entry."""
        self._finish_shard()
        return {
            "num_documents": self.num_documents,
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "shards": self.shards,
        }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json atomically (temp file, fsync, rename): its presence marks the shards complete."""
    path = Path(directory) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"token shards: no manifest at {path}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"token shards: {path} is not valid JSON ({e}); delete the folder to rebuild it") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise DataError(
            f"token shards: {path} is not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
        )
    return manifest


def _manifest_dtype(manifest: dict[str, Any]) -> np.dtype:
    """Shard files are little-endian whatever machine reads them."""
    name = manifest.get("dtype")
    if name not in ("uint16", "uint32") or manifest.get("byteorder", "little") != "little":
        raise DataError(f"token shards: unsupported dtype {name!r} / byteorder {manifest.get('byteorder')!r}")
    return np.dtype(name).newbyteorder("<")


def verify_shards(manifest_path: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Check every shard of every split exists with the recorded size (and hash); return the manifest."""
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    directory = manifest_path.parent if manifest_path.is_file() else manifest_path
    itemsize = _manifest_dtype(manifest).itemsize
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            _check_shard(directory / shard["file"], shard, itemsize, checksums)
    return manifest


def _check_shard(path: Path, shard: dict[str, Any], itemsize: int, checksum: bool) -> None:
    hint = "delete the shard folder (or the whole data cache) to rebuild it"
    if not path.is_file():
        raise DataError(f"token shards: {path} is missing; {hint}")
    expected = shard["num_tokens"] * itemsize
    size = path.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "longer than recorded"
        raise DataError(f"token shards: {path} is {what} ({size} bytes, manifest says {expected}); {hint}")
    if checksum:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != shard["sha256"]:
            raise DataError(f"token shards: {path} is corrupt (sha256 differs from the manifest); {hint}")


class TokenSplit:
    """One split's shards, memory-mapped read-only: the sampler's random access to the token stream.

    Training reads fixed windows of ``seq_len + 1`` tokens that start every ``seq_len`` tokens (so each
    token is a label exactly once per epoch); windows never cross a shard boundary.
    """

    def __init__(self, name: str, shards: list[np.ndarray], num_documents: int, fingerprint: str, manifest: dict):
        self.name = name
        self.shards = shards
        self.num_documents = num_documents
        self.fingerprint = fingerprint
        self.manifest = manifest
        self.num_tokens = int(sum(len(s) for s in shards))

    @classmethod
    def open(cls, manifest_path: str | Path, split: str, verify_checksums: bool = True) -> "TokenSplit":
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        manifest_path = Path(manifest_path)
        if manifest_path.is_dir():
            manifest_path = manifest_path / MANIFEST_FILE
        manifest = read_manifest(manifest_path)
        dtype = _manifest_dtype(manifest)
        entry = manifest["splits"][split]
        arrays = []
        for shard in entry["shards"]:
            path = manifest_path.parent / shard["file"]
            _check_shard(path, shard, dtype.itemsize, verify_checksums)
            if shard["num_tokens"]:
                arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["num_tokens"],)))
        fingerprint = hashlib.sha256("".join(s["sha256"] for s in entry["shards"]).encode()).hexdigest()
        return cls(split, arrays, entry["num_documents"], fingerprint, manifest)

    def windows_per_shard(self, seq_len: int) -> np.ndarray:
        return np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)

    def num_windows(self, seq_len: int) -> int:
        return int(self.windows_per_shard(seq_len).sum())

    def windows(self, indices: np.ndarray, seq_len: int, _cumulative: Optional[np.ndarray] = None) -> np.ndarray:
        """Windows ``indices`` (global numbering over shards) as an int64 array ``[len, seq_len + 1]``."""
        cumulative = _cumulative if _cumulative is not None else np.cumsum(self.windows_per_shard(seq_len))
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= cumulative[-1]):
            raise IndexError(f"window index out of range [0, {int(cumulative[-1])})")
        shard_of = np.searchsorted(cumulative, indices, side="right")
        out = np.empty((len(indices), seq_len + 1), dtype=np.int64)
        for row, (index, shard) in enumerate(zip(indices.tolist(), shard_of.tolist())):
            local = index - (int(cumulative[shard - 1]) if shard else 0)
            start = local * seq_len
            out[row] = self.shards[shard][start:start + seq_len + 1]
        return out
