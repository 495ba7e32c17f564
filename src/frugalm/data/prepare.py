"""`prepare_data`: from a `[data]` config to a tokenizer and verified token shards, reusing the cache.

Steps, each skipped when its cached result exists (cache keys hash every input, so a hit is safe):

1. resolve the corpus (bad paths fail here, before any slow work) and hash its raw bytes;
2. tokenizer: the configured one, or a byte-level BPE trained on the training split, cached under
   ``<cache>/tokenizers/<key>``;
3. token shards under ``<cache>/shards/<key>``: scan documents (hash + length), choose the validation
   documents, tokenize both splits with BOS/EOS framing, write shards and the manifest. Built in a
   temporary folder and renamed into place, so a crash or a concurrent rank never leaves a half cache.

The run folder gets a copy of the tokenizer (so checkpoints are self-contained) and ``data.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

import frugalm
from frugalm.data.config import DataConfig
from frugalm.data.corpus import Corpus, Document
from frugalm.data.errors import DataError
from frugalm.data.sampler import TrainSampler, ValBatches
from frugalm.data.shards import (
    MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, SPLITS, ShardWriter, TokenSplit, token_dtype, verify_shards,
    write_manifest,
)
from frugalm.data.split import DocStat, SplitPlan, carve_point, plan_split
from frugalm.data.tokenizer import (
    CHAT_TEMPLATE_FILE, CONFIG_FILE, SPECIAL_MAP_FILE, TOKENIZER_FILE, Tokenizer, load_tokenizer, train_tokenizer,
)

log = logging.getLogger(__name__)

# Bump when the shard layout, framing, split rule or tokenizer recipe changes: old cache entries then miss.
CACHE_VERSION = 1
# The first pass keeps document texts in memory up to this many characters, sparing a second read.
_IN_MEMORY_CHARS = 200_000_000
# Characters per encode_batch call: large enough for the library's threads, small enough for memory.
_ENCODE_BATCH_CHARS = 4_000_000
RUN_DATA_FILE = "data.json"
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_MAP_FILE, CHAT_TEMPLATE_FILE)


@dataclass(frozen=True)
class PreparedData:
    """What the trainer needs: the tokenizer folder, the shard manifest and the sizes."""

    tokenizer_dir: Path
    manifest_path: Path
    vocab_size: int  # ids used by the tokenizer: the model's vocab_size must be at least this
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    cache_key: str
    from_cache: bool
    source: str

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_dir)

    def split(self, name: str) -> TokenSplit:
        # prepare_data has just verified the checksums; sizes are re-checked on every open.
        return TokenSplit.open(self.manifest_path, name, verify_checksums=False)

    def train_sampler(
        self, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> TrainSampler:
        return TrainSampler(self.split("train"), batch_size, seq_len, seed, rank=rank, world_size=world_size)

    def val_batches(
        self, batch_size: int, seq_len: int, max_batches: Optional[int] = None, rank: int = 0, world_size: int = 1
    ) -> ValBatches:
        return ValBatches(self.split("val"), batch_size, seq_len, max_batches, rank=rank, world_size=world_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokenizer_dir"] = str(self.tokenizer_dir)
        d["manifest_path"] = str(self.manifest_path)
        return d


def prepare_data(cfg: DataConfig, out_dir: str | Path | None, *, progress: Optional[bool] = None) -> PreparedData:
    """Make (or reuse) the tokenizer and token shards for `cfg`; copy the tokenizer into ``out_dir``.

    `progress` None shows progress bars only on a terminal. Safe to call from every rank at once
    (cache entries are published by rename, run-folder files by atomic replace), though letting rank 0
    prepare first and the others follow after a barrier avoids training the tokenizer on every rank.
    """
    corpus = Corpus.from_config(cfg)
    cache = cfg.resolved_cache_dir()
    fingerprint = corpus.fingerprint()
    corpus_key = _hash({
        "cache_version": CACHE_VERSION, "corpus": fingerprint,
        "max_chars": cfg.max_chars, "val_fraction": cfg.val_fraction,
    })
    scan = _CorpusScan(corpus, cfg.max_chars, cfg.val_fraction, progress)

    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = _cached_tokenizer(cache, corpus_key, cfg, scan, progress)

    key = _hash({"corpus_key": corpus_key, "tokenizer": tokenizer.sha256, "shard_tokens": cfg.shard_tokens})
    shard_dir = cache / "shards" / key
    manifest_path = shard_dir / MANIFEST_FILE
    from_cache = manifest_path.is_file()
    if from_cache:
        log.info("data: reusing token shards in %s", shard_dir)
        manifest = verify_shards(manifest_path, checksums=cfg.verify_checksums)
    else:
        manifest = _build_shards(shard_dir, key, scan, tokenizer, corpus, fingerprint, cfg, progress)
    if manifest["tokenizer"]["sha256"] != tokenizer.sha256:
        raise DataError(f"token shards in {shard_dir} were made with another tokenizer; delete the folder")

    tokenizer_dir = Path(tokenizer.path)
    if out_dir is not None:
        out = Path(out_dir)
        tokenizer_dir = _copy_tokenizer(tokenizer_dir, out / "tokenizer")
    splits = manifest["splits"]
    prepared = PreparedData(
        tokenizer_dir=tokenizer_dir,
        manifest_path=manifest_path,
        vocab_size=tokenizer.vocab_size,
        train_tokens=splits["train"]["num_tokens"],
        val_tokens=splits["val"]["num_tokens"],
        train_documents=splits["train"]["num_documents"],
        val_documents=splits["val"]["num_documents"],
        cache_key=key,
        from_cache=from_cache,
        source=manifest["source"]["description"],
    )
    if prepared.train_tokens == 0:
        raise DataError(f"the training split of {prepared.source} is empty")
    if out_dir is not None:
        _write_atomic(Path(out_dir) / RUN_DATA_FILE, (json.dumps(prepared.to_dict(), indent=2) + "\n").encode())
    return prepared


# ---------------------------------------------------------------------- corpus passes
class _CorpusScan:
    """The corpus as documents with known hashes: one scanning pass, then any number of re-reads.

    The split needs every document's hash and length before the first token is written, so the
    corpus is read twice; small corpora (all of the embedded ones) are simply kept in memory.
    """

    def __init__(self, corpus: Corpus, max_chars: Optional[int], val_fraction: float, progress: Optional[bool]):
        self.corpus = corpus
        self.max_chars = max_chars
        self.val_fraction = val_fraction
        self.progress = progress
        self.stats: list[DocStat] = []
        self.ids: list[str] = []
        self._texts: Optional[list[str]] = None
        self._plan: Optional[SplitPlan] = None

    def _capped(self) -> Iterator[Document]:
        remaining = self.max_chars
        for doc in self.corpus.documents():
            if remaining is not None:
                if remaining <= 0:
                    return
                if len(doc.text) > remaining:
                    doc = Document(doc.id, doc.text[:remaining])
                remaining -= len(doc.text)
            yield doc

    def plan(self) -> SplitPlan:
        if self._plan is None:
            texts: Optional[list[str]] = []
            chars = 0
            bar = tqdm(self._capped(), desc="data: reading documents", unit="doc", disable=_no_bar(self.progress))
            for doc in bar:
                self.stats.append(DocStat(_text_sha256(doc.text), len(doc.text)))
                self.ids.append(doc.id)
                chars += len(doc.text)
                if texts is not None:
                    texts.append(doc.text)
                    if chars > _IN_MEMORY_CHARS:
                        texts = None
            if not self.stats:
                raise DataError(f"no non-empty documents in {self.corpus.describe()}")
            self._texts = texts
            self._plan = plan_split(self.stats, self.val_fraction)
        return self._plan

    def _texts_again(self) -> Iterator[str]:
        if self._texts is not None:
            yield from self._texts
            return
        count = 0
        for index, doc in enumerate(self._capped()):
            if index >= len(self.stats) or _text_sha256(doc.text) != self.stats[index].sha256:
                raise DataError(f"the corpus changed while it was being prepared (at {doc.id}); run again")
            count += 1
            yield doc.text
        if count != len(self.stats):
            raise DataError("the corpus changed while it was being prepared (fewer documents); run again")

    def split_texts(self) -> Iterator[tuple[str, str]]:
        """(split, text) for every document, the carved document contributing to both splits."""
        plan = self.plan()
        for index, text in enumerate(self._texts_again()):
            if plan.carve_doc == index:
                cut = carve_point(text, plan.carve_chars)
                yield "train", text[:cut]
                yield "val", text[cut:]
            else:
                yield ("val" if plan.is_val(index) else "train"), text

    def train_texts(self, max_chars: int) -> Iterator[str]:
        remaining = max_chars
        for split, text in self.split_texts():
            if split != "train":
                continue
            if remaining <= 0:
                return
            yield text[:remaining]
            remaining -= len(text)


# ---------------------------------------------------------------------- tokenizer
def _cached_tokenizer(
    cache: Path, corpus_key: str, cfg: DataConfig, scan: _CorpusScan, progress: Optional[bool]
) -> Tokenizer:
    import tokenizers

    key = _hash({
        "corpus_key": corpus_key, "vocab_size": cfg.vocab_size,
        "tokenizer_train_chars": cfg.tokenizer_train_chars, "tokenizers": tokenizers.__version__,
    })
    final = cache / "tokenizers" / key
    if (final / TOKENIZER_FILE).is_file() and (final / CONFIG_FILE).is_file():
        log.info("data: reusing tokenizer in %s", final)
        return load_tokenizer(final)
    scan.plan()
    tmp = _tmp_dir(final)
    try:
        log.info("data: training a %d-token byte-level BPE", cfg.vocab_size)
        show = sys.stderr.isatty() if progress is None else progress
        train_tokenizer(scan.train_texts(cfg.tokenizer_train_chars), cfg.vocab_size, tmp, show_progress=show)
        _publish(tmp, final, complete=final / CONFIG_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(final)


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            if src.resolve() != dst.resolve():
                _write_atomic(dst / name, (src / name).read_bytes())
        elif (dst / name).exists():
            (dst / name).unlink()  # a stale file from an earlier run would override ours
    return dst


# ---------------------------------------------------------------------- shards
def _build_shards(
    shard_dir: Path, key: str, scan: _CorpusScan, tokenizer: Tokenizer, corpus: Corpus, fingerprint: str,
    cfg: DataConfig, progress: Optional[bool],
) -> dict[str, Any]:
    plan = scan.plan()
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = _tmp_dir(shard_dir)
    try:
        writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in SPLITS}
        chars = {s: 0 for s in SPLITS}
        prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        suffix = [tokenizer.eos_id]
        pending: list[tuple[str, str]] = []

        def flush() -> None:
            # Pre-training text is data, not markup: a literal "<|eos|>" in it stays plain characters.
            encoded = tokenizer.encode_batch([t for _, t in pending], add_special_tokens=False, split_special_tokens=True)
            for split in SPLITS:
                parts = [np.array(prefix + ids + suffix, dtype=np.int64)
                         for (s, _), ids in zip(pending, encoded) if s == split]
                if parts:
                    writers[split].write(np.concatenate(parts), num_documents=len(parts))
            pending.clear()

        pending_chars = 0
        parts_total = len(scan.stats) + (plan.carve_doc is not None)
        bar = tqdm(total=parts_total, desc="data: tokenizing", unit="doc", disable=_no_bar(progress))
        for split, text in scan.split_texts():
            pending.append((split, text))
            chars[split] += len(text)
            pending_chars += len(text)
            bar.update(1)
            if pending_chars >= _ENCODE_BATCH_CHARS:
                flush()
                pending_chars = 0
        if pending:
            flush()
        bar.close()
        entries = {s: w.close() for s, w in writers.items()}
        members = {
            "train": [i for i in range(len(scan.stats)) if not plan.is_val(i)],
            "val": sorted(set(plan.val_docs) | ({plan.carve_doc} if plan.carve_doc is not None else set())),
        }
        for split in SPLITS:
            entries[split]["num_chars"] = chars[split]
            # Order-free hash of the split's source documents (the carved one counts in both).
            entries[split]["documents_sha256"] = _hash(sorted(scan.stats[i].sha256 for i in members[split]))
        total_chars = sum(s.chars for s in scan.stats)
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "dtype": dtype.name,
            "byteorder": "little",
            "packing": "each document is BOS + tokens + EOS; documents are concatenated in corpus order",
            "tokenizer": {
                "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            },
            "source": {
                "description": corpus.describe(),
                "input_sha256": fingerprint,
                "content_sha256": _hash([s.sha256 for s in scan.stats]),
                "num_documents": len(scan.stats),
                "num_chars": total_chars,
                "max_chars": cfg.max_chars,
                "python": f"{platform.python_implementation()} {platform.python_version()}",
            },
            "split": {
                "rule": "whole documents in sha256 order while they fit in val_fraction of the characters; "
                        "if none fits, the tail of the largest document",
                "val_fraction": cfg.val_fraction,
                "actual_val_fraction": chars["val"] / max(1, chars["train"] + chars["val"]),
                "carved_document": None if plan.carve_doc is None else scan.ids[plan.carve_doc],
            },
            "splits": entries,
            "cache_key": key,
            "created_by": f"frugalm {frugalm.__version__}",
        }
        write_manifest(tmp, manifest)
        _publish(tmp, shard_dir, complete=shard_dir / MANIFEST_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("data: wrote %d train / %d val tokens to %s", entries["train"]["num_tokens"],
             entries["val"]["num_tokens"], shard_dir)
    return verify_shards(shard_dir / MANIFEST_FILE, checksums=False)


# ---------------------------------------------------------------------- helpers
def _tmp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, final: Path, complete: Path) -> None:
    """Rename a finished temp folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if complete.is_file():
            return
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover (manifest deleted by hand)
        os.rename(tmp, final)


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers (and other ranks writing the same bytes) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _no_bar(progress: Optional[bool]) -> Optional[bool]:
    """tqdm's `disable`: None lets tqdm decide (off when stderr is not a terminal)."""
    return None if progress is None else not progress
