"""`DataConfig`: the `[data]` section of a run config (corpus, tokenizer, validation split, cache)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from frugalm.config import ConfigError

BuiltinCorpus = Literal["python-docs", "python-source"]

# Below this the byte alphabet (256) plus our special/reasoning tokens leave almost nothing for merges.
MIN_VOCAB_SIZE = 300


@dataclass
class DataConfig:
    """Where text comes from and how it becomes token shards.

    `path = None` selects the embedded corpus named by `builtin`, so `frugalm train` works offline with
    no arguments. `vocab_size` and `tokenizer_train_chars` only matter when `tokenizer` is None (a BPE
    tokenizer is then trained on the training split); an existing tokenizer's own vocabulary wins.
    """

    # A .txt/.jsonl/.parquet file, a folder (searched recursively), a glob, or a list of those.
    path: Optional[Union[str, list[str]]] = None
    builtin: BuiltinCorpus = "python-docs"
    # Cap on corpus characters, taken in discovery order (for quick experiments on big inputs).
    max_chars: Optional[int] = None
    # Field of each .jsonl object / column of each .parquet file holding the document text.
    text_field: str = "text"
    vocab_size: int = 4096
    # A directory with tokenizer.json (+ tokenizer_config.json); None trains a byte-level BPE.
    tokenizer: Optional[str] = None
    # BPE merges are learned from at most this many characters of the training split.
    tokenizer_train_chars: int = 50_000_000
    # Share of the corpus (by characters, whole documents) held out for validation.
    val_fraction: float = 0.05
    # Token shards and trained tokenizers are cached here, keyed by a hash of their inputs.
    # None means $XDG_CACHE_HOME/frugalm/data (default ~/.cache/frugalm/data).
    cache_dir: Optional[str] = None
    # Tokens per shard file (200 MB of uint16 at the default); windows never straddle two shards.
    shard_tokens: int = 100_000_000
    # Re-hash every shard when it is loaded; turn off only for very large corpora on trusted disks
    # (sizes are always checked, which catches truncation).
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.path, str):
            if not self.path.strip():
                problems.append("path must not be empty (omit it for the embedded corpus)")
        elif self.path is not None:
            if not self.path or not all(isinstance(p, str) and p.strip() for p in self.path):
                problems.append(f"path must be a non-empty string or list of them (got {self.path!r})")
        if self.builtin not in ("python-docs", "python-source"):
            problems.append(f"builtin {self.builtin!r} is not one of ['python-docs', 'python-source']")
        if self.max_chars is not None and self.max_chars <= 0:
            problems.append(f"max_chars must be > 0 or omitted (got {self.max_chars})")
        if not self.text_field:
            problems.append("text_field must not be empty")
        if not MIN_VOCAB_SIZE <= self.vocab_size < 2**32:
            problems.append(f"vocab_size must be in [{MIN_VOCAB_SIZE}, 2**32) (got {self.vocab_size})")
        if self.tokenizer_train_chars <= 0:
            problems.append(f"tokenizer_train_chars must be > 0 (got {self.tokenizer_train_chars})")
        if not 0.0 <= self.val_fraction <= 0.5:
            problems.append(f"val_fraction must be in [0, 0.5] (got {self.val_fraction})")
        if self.shard_tokens < 1024:
            problems.append(f"shard_tokens must be >= 1024 (got {self.shard_tokens})")
        if problems:
            raise ConfigError("invalid data config: " + "; ".join(problems))

    @property
    def paths(self) -> list[str]:
        """`path` as a list (empty for the embedded corpus)."""
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def resolved_cache_dir(self) -> Path:
        """The cache root: `cache_dir`, else the XDG cache location shared by all runs of this user."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "frugalm" / "data"
