"""prepare_data end to end: shards + manifest, the validation split, the cache, and damaged shards."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from frugalm.data import DataConfig, DataError, TokenSplit, load_tokenizer, prepare_data, verify_shards
from frugalm.data import prepare as prepare_module
from frugalm.data.shards import ShardWriter, token_dtype
from frugalm.data.split import DocStat, carve_point, plan_split

VOCAB = 512


def write_corpus(folder, n_docs=60):
    """Real text (reference topics), one per file, each tagged with a unique marker line."""
    from pydoc_data import topics

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(topics.topics)[:n_docs]
    for i, key in enumerate(keys):
        (folder / f"{i:03d}.txt").write_text(f"DOCMARK{i:03d}\n{topics.topics[key][:3000]}")
    return folder


def config(tmp_path, corpus, **kw):
    kw.setdefault("vocab_size", VOCAB)
    return DataConfig(path=str(corpus), cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    corpus = write_corpus(root / "corpus")
    cfg = config(root, corpus, val_fraction=0.1, shard_tokens=4096)
    return cfg, prepare_data(cfg, root / "run", progress=False), root


def split_text(prepared, name):
    tok = load_tokenizer(prepared.tokenizer_dir)
    split = TokenSplit.open(prepared.manifest_path, name)
    return tok, np.concatenate(split.shards)


def test_manifest_and_shards(built):
    cfg, prepared, root = built
    manifest = json.loads(prepared.manifest_path.read_text())
    assert manifest["dtype"] == "uint16" and manifest["byteorder"] == "little"
    assert manifest["tokenizer"]["bos_id"] == 0 and manifest["tokenizer"]["eos_id"] == 1
    assert manifest["source"]["num_documents"] == 60
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 1, "shard_tokens=4096 should roll over to several files"
    assert all(s["num_tokens"] <= 4096 for s in train["shards"])
    for s in train["shards"]:
        assert (prepared.manifest_path.parent / s["file"]).stat().st_size == 2 * s["num_tokens"]
    assert prepared.train_tokens == train["num_tokens"] and prepared.vocab_size == VOCAB
    assert prepared.train_documents + prepared.val_documents == 60
    # the run folder has a loadable copy of the tokenizer and a summary
    assert load_tokenizer(root / "run" / "tokenizer").sha256 == manifest["tokenizer"]["sha256"]
    assert json.loads((root / "run" / "data.json").read_text())["cache_key"] == prepared.cache_key


def test_documents_are_framed_by_bos_and_eos(built):
    _, prepared, _ = built
    tok, stream = split_text(prepared, "train")
    assert stream[0] == tok.bos_id and stream[-1] == tok.eos_id
    starts = np.flatnonzero(stream == tok.bos_id)
    assert len(starts) == prepared.train_documents
    assert np.array_equal(np.flatnonzero(stream == tok.eos_id), np.append(starts[1:] - 1, len(stream) - 1))
    first = tok.decode(stream[1:starts[1] - 1].tolist())
    assert re.fullmatch(r"DOCMARK\d{3}\n.*", first, flags=re.S)


def test_validation_split_is_disjoint_by_document(built):
    _, prepared, _ = built
    marks = {}
    for name in ("train", "val"):
        tok, stream = split_text(prepared, name)
        marks[name] = set(re.findall(r"DOCMARK\d{3}", tok.decode(stream.tolist())))
    assert marks["train"].isdisjoint(marks["val"])
    assert len(marks["train"] | marks["val"]) == 60
    assert len(marks["val"]) == prepared.val_documents > 0


def test_cache_is_reused_and_keyed_by_inputs(built, tmp_path):
    cfg, prepared, root = built
    shard = prepared.manifest_path.parent / "train-00000.bin"
    mtime = shard.stat().st_mtime_ns
    again = prepare_data(cfg, tmp_path / "run2", progress=False)
    assert again.from_cache and again.cache_key == prepared.cache_key and shard.stat().st_mtime_ns == mtime
    # the same folder moved elsewhere hashes the same; an edited document does not
    moved = write_corpus(tmp_path / "moved")
    assert prepare_data(config(root, moved, val_fraction=0.1, shard_tokens=4096), None).from_cache
    (moved / "007.txt").write_text("DOCMARK007\nedited")
    changed = prepare_data(config(root, moved, val_fraction=0.1, shard_tokens=4096), None, progress=False)
    assert not changed.from_cache and changed.cache_key != prepared.cache_key


def test_existing_tokenizer_is_used_as_is(built, tmp_path):
    cfg, prepared, _ = built
    other = prepare_data(
        DataConfig(path=cfg.path, tokenizer=str(prepared.tokenizer_dir), vocab_size=4096,
                   cache_dir=str(tmp_path / "c"), val_fraction=0.1, shard_tokens=4096),
        tmp_path / "run", progress=False,
    )
    assert other.vocab_size == VOCAB and other.cache_key == prepared.cache_key


def test_corrupt_truncated_and_missing_shards_are_refused(tmp_path):
    cfg = config(tmp_path, write_corpus(tmp_path / "corpus", n_docs=12), val_fraction=0.2)
    prepared = prepare_data(cfg, None, progress=False)
    shard = prepared.manifest_path.parent / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-00000.bin is corrupt"):
        prepare_data(cfg, None)
    with pytest.raises(DataError, match="corrupt"):
        TokenSplit.open(prepared.manifest_path, "train")
    TokenSplit.open(prepared.manifest_path, "train", verify_checksums=False)  # sizes still match
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="train-00000.bin is truncated"):
        TokenSplit.open(prepared.manifest_path, "train", verify_checksums=False)
    shard.unlink()
    with pytest.raises(DataError, match="train-00000.bin is missing"):
        verify_shards(prepared.manifest_path)
    prepared.manifest_path.write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not a frugalm.token_shards v1 manifest"):
        TokenSplit.open(prepared.manifest_path, "val")


def test_crash_while_writing_leaves_no_cache_entry(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", n_docs=12)
    cfg = config(tmp_path, corpus)

    def explode(self, ids, num_documents=1):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", explode)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, None, progress=False)
    assert list((tmp_path / "cache" / "shards").iterdir()) == []
    monkeypatch.undo()
    assert not prepare_data(cfg, None, progress=False).from_cache


def test_concurrent_publish_keeps_the_first(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "manifest.json").write_text("{}")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "manifest.json").write_text('{"late": true}')
    prepare_module._publish(tmp, final, complete=final / "manifest.json")
    assert (final / "manifest.json").read_text() == "{}"


def test_single_document_gives_up_its_tail(tmp_path):
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics)[:30])
    (tmp_path / "one.txt").write_text(text)
    prepared = prepare_data(config(tmp_path, tmp_path / "one.txt", val_fraction=0.1), None, progress=False)
    manifest = json.loads(prepared.manifest_path.read_text())
    assert manifest["split"]["carved_document"].endswith("one.txt")
    assert 0.07 < manifest["split"]["actual_val_fraction"] < 0.13
    tok, val = split_text(prepared, "val")
    _, train = split_text(prepared, "train")
    val_text, train_text = tok.decode(val[1:-1].tolist()), tok.decode(train[1:-1].tolist())
    assert train_text + val_text == text and train_text.endswith("\n")


def test_plan_split_rules():
    stats = [DocStat(f"{i:064x}", 100) for i in range(20)] + [DocStat(f"{3:064x}", 100)]  # doc 20 duplicates doc 3
    plan = plan_split(stats, 0.1)
    assert plan.carve_doc is None and len(plan.val_docs) in (1, 2)
    assert plan.is_val(3) == plan.is_val(20), "exact duplicates must land in the same split"
    assert plan_split(stats, 0.1) == plan
    assert plan_split(stats, 0.0).val_docs == frozenset()
    assert carve_point("aaaa\n\nbbbb", 4) == 6
    assert carve_point("abcdefghij", 3) == 7


def test_token_dtype_and_capped_builtin_default(tmp_path):
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    cfg = DataConfig(max_chars=120_000, vocab_size=VOCAB, cache_dir=str(tmp_path))
    prepared = prepare_data(cfg, None, progress=False)  # the embedded default, capped for speed
    manifest = json.loads(prepared.manifest_path.read_text())
    assert manifest["source"]["num_chars"] == 120_000
    assert manifest["source"]["description"].startswith("python-docs: pydoc_data.topics")
    assert prepared.val_tokens > 0 and prepared.train_tokens > 10 * prepared.val_tokens


def test_frugalm_data_command(tmp_path, capsys):
    import argparse

    from frugalm.data import commands

    corpus = write_corpus(tmp_path / "corpus", n_docs=12)
    parser = argparse.ArgumentParser()
    commands.configure(parser)
    args = parser.parse_args([
        "--set", f"data.path={corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.vocab_size=400",
        "--out", str(tmp_path / "run"), "--json",
    ])
    assert commands.run(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["vocab_size"] == 400 and (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
