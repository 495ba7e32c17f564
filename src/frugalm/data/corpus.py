"""Finding the documents of a corpus: the embedded default, or the user's .txt/.jsonl/.parquet files.

A *document* is the unit that is never split between training and validation and that is framed by
BOS/EOS in the token stream: one ``.txt`` file, one ``.jsonl`` line, one ``.parquet`` row, one stdlib
module or reference topic. Every failure names the file (and line) so a bad record in a large corpus
can be found.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from frugalm.data.builtin import builtin_description, builtin_documents, builtin_fingerprint
from frugalm.data.config import DataConfig
from frugalm.data.errors import DataError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Document:
    id: str  # where it came from: "notes/a.txt", "data.jsonl:17", "stdlib:json/decoder.py"
    text: str


class Corpus:
    """A resolved corpus: either an embedded one or an ordered, de-duplicated list of input files.

    Resolution happens up front (in `from_config`) so a wrong path fails before any slow work starts.
    """

    def __init__(self, *, builtin: Optional[str] = None, files: tuple[Path, ...] = (), text_field: str = "text"):
        if (builtin is None) == (not files):
            raise ValueError("a Corpus is either builtin or a non-empty list of files")
        self.builtin = builtin
        self.files = tuple(files)
        self.text_field = text_field

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "Corpus":
        if cfg.path is None:
            return cls(builtin=cfg.builtin)
        return cls(files=tuple(resolve_files(cfg.paths)), text_field=cfg.text_field)

    def describe(self) -> str:
        if self.builtin is not None:
            return builtin_description(self.builtin)
        shown = ", ".join(str(p) for p in self.files[:3])
        more = f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
        return f"{len(self.files)} file(s): {shown}{more}"

    def fingerprint(self) -> str:
        """sha256 of the input bytes (and how they are read); the cache key's corpus part.

        Hashing raw bytes is far cheaper than parsing them, so a cache hit never parses the corpus.
        """
        if self.builtin is not None:
            return builtin_fingerprint(self.builtin)
        h = hashlib.sha256(f"files text_field={self.text_field}\n".encode())
        for path in self.files:
            h.update(_file_sha256(path))
        return h.hexdigest()

    def documents(self) -> Iterator[Document]:
        """Every non-blank document in a fixed order (file order, then position within the file)."""
        if self.builtin is not None:
            for doc_id, text in builtin_documents(self.builtin):
                yield Document(doc_id, text)
            return
        for path in self.files:
            suffix = path.suffix.lower()
            if suffix == ".txt":
                yield from _read_txt(path)
            elif suffix == ".jsonl":
                yield from _read_jsonl(path, self.text_field)
            else:
                yield from _read_parquet(path, self.text_field)


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand files, folders (recursive) and globs into a sorted, de-duplicated list of input files."""
    found: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(Path(m) for m in glob.glob(expanded, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"data.path: the pattern {pattern!r} matched no files")
            usable = [m for m in matches if m.suffix.lower() in SUPPORTED_SUFFIXES]
            if not usable:
                raise DataError(
                    f"data.path: the pattern {pattern!r} matched {len(matches)} file(s) but none is "
                    f"{'/'.join(SUPPORTED_SUFFIXES)} (e.g. {matches[0]})"
                )
            found.extend(usable)
        elif os.path.isdir(expanded):
            root = Path(expanded)
            usable = sorted(
                p for p in root.rglob("*")
                if p.suffix.lower() in SUPPORTED_SUFFIXES and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
            )
            if not usable:
                raise DataError(f"data.path: no {'/'.join(SUPPORTED_SUFFIXES)} files under the folder {pattern!r}")
            found.extend(usable)
        elif os.path.isfile(expanded):
            path = Path(expanded)
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise DataError(
                    f"data.path: {pattern!r} is not a {'/'.join(SUPPORTED_SUFFIXES)} file; "
                    "convert it or put the text in a .txt file"
                )
            found.append(path)
        else:
            raise DataError(f"data.path: no such file or folder: {pattern!r}")
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(os.path.realpath(p), p)
    return list(unique.values())


def _file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None


def _without_lone_surrogates(text: str) -> str:
    """JSON can escape half an emoji ("\\ud83d"); such text is not encodable UTF-8 and the tokenizer
    rejects it, so each lone surrogate becomes U+FFFD, as a UTF-8 decoder does with bad bytes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def _read_txt(path: Path) -> Iterator[Document]:
    text = _decode(path.read_bytes(), str(path))
    if text.startswith("\ufeff"):  # a BOM is an encoding artefact, not text
        text = text[1:]
    if text.strip():
        yield Document(str(path), text)


def _read_jsonl(path: Path, field: str) -> Iterator[Document]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where).strip()
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}")
            if field not in record:
                keys = ", ".join(sorted(record)[:10]) or "none"
                raise DataError(f"{where}: the object has no {field!r} field (its keys: {keys}); set data.text_field")
            text = record[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{where}: {field!r} must be a string, got {type(text).__name__}")
            if text.strip():
                yield Document(where, _without_lone_surrogates(text))


def _read_parquet(path: Path, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = pfile.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no {field!r} column (columns: {', '.join(names)}); set data.text_field")
    column_type = pfile.schema_arrow.field(field).type
    import pyarrow as pa

    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {field!r} must hold strings, not {column_type}")
    row = 0
    for batch in pfile.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None and text.strip():
                yield Document(f"{path}:row{row}", text)
            row += 1
