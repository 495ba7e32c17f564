"""Corpus discovery: the embedded default, user files of each format, and clear errors for bad input."""

from __future__ import annotations

import json
import sys

import pytest

from frugalm.config import ConfigError, from_dict
from frugalm.data import Corpus, DataConfig, DataError
from frugalm.data.builtin import builtin_documents, builtin_fingerprint, docstring_view, stdlib_files, stdlib_root


def corpus_texts(tmp_path, path, **kw):
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)
    return [(d.id, d.text) for d in Corpus.from_config(cfg).documents()]


def test_txt_folder_is_recursive_sorted_and_skips_hidden_and_blank(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second document")
    (tmp_path / "a.txt").write_text("\ufefffirst document")
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "notes.md").write_text("ignored in folders")
    docs = corpus_texts(tmp_path, tmp_path)
    assert [t for _, t in docs] == ["first document", "second document"]


def test_jsonl_and_glob(tmp_path):
    rows = [{"text": "alpha"}, {"text": "beta", "meta": 1}, {"text": ""}, {"text": None}, {"text": "half \ud83d"}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "y.txt").write_text("gamma")
    docs = corpus_texts(tmp_path, tmp_path / "*")
    assert [t for _, t in docs] == ["alpha", "beta", "half \ufffd", "gamma"]  # a lone surrogate is replaced
    assert docs[1][0].endswith("x.jsonl:2")


def test_jsonl_custom_field(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "delta"}) + "\n")
    assert corpus_texts(tmp_path, tmp_path / "x.jsonl", text_field="content") == [(f"{tmp_path}/x.jsonl:1", "delta")]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", None, "two"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert [t for _, t in corpus_texts(tmp_path, tmp_path / "d.parquet")] == ["one", "two"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="no 'text' column.*body"):
        corpus_texts(tmp_path, tmp_path / "bad.parquet")


def test_parquet_without_pyarrow_says_so(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        corpus_texts(tmp_path, tmp_path / "d.parquet")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"body": "no text here"}\n', r"x\.jsonl:2: the object has no 'text' field \(its keys: body\)"),
        ('{"text": "ok"}\n{not json}\n', r"x\.jsonl:2: not valid JSON"),
        ('["a list"]\n', r"x\.jsonl:1: expected a JSON object"),
        ('{"text": 5}\n', r"x\.jsonl:1: 'text' must be a string"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        corpus_texts(tmp_path, tmp_path / "x.jsonl")


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        corpus_texts(tmp_path, tmp_path / "missing")
    with pytest.raises(DataError, match="matched no files"):
        corpus_texts(tmp_path, tmp_path / "*.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt/.jsonl/.parquet files under the folder"):
        corpus_texts(tmp_path, tmp_path / "empty")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="is not a .txt/.jsonl/.parquet file"):
        corpus_texts(tmp_path, tmp_path / "a.csv")
    with pytest.raises(DataError, match="none is .txt/.jsonl/.parquet"):
        corpus_texts(tmp_path, tmp_path / "*.csv")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not valid UTF-8"):
        corpus_texts(tmp_path, tmp_path / "latin1.txt")


def test_fingerprint_follows_content_not_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("same text")
    (tmp_path / "b" / "y.txt").write_text("same text")
    fp = [Corpus.from_config(DataConfig(path=str(tmp_path / d))).fingerprint() for d in ("a", "b")]
    assert fp[0] == fp[1]
    (tmp_path / "b" / "y.txt").write_text("other text")
    assert Corpus.from_config(DataConfig(path=str(tmp_path / "b"))).fingerprint() != fp[0]


def test_data_config_is_strict():
    cfg = from_dict(DataConfig, {"path": ["a.txt", "b/*.jsonl"], "vocab_size": 512}, "data")
    assert cfg.paths == ["a.txt", "b/*.jsonl"]
    with pytest.raises(ConfigError, match=r"\[data\] unknown key\(s\) vocab"):
        from_dict(DataConfig, {"vocab": 512}, "data")
    with pytest.raises(ConfigError, match="val_fraction"):
        DataConfig(val_fraction=0.9)
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(DataConfig, {"builtin": "wikipedia"}, "data")
    with pytest.raises(ConfigError, match="vocab_size"):
        DataConfig(vocab_size=100)


def test_docstring_view_keeps_only_docstrings_and_their_headers():
    source = '''"""Module doc."""
import os

X = 1


class A(Base):
    attr = 2

    def documented(self, x):
        """Method doc."""
        return x


def helper():
    return 3


async def fetch(url,
                timeout=1):
    """Fetch doc
    over two lines."""
    pass
'''
    assert docstring_view(source) == (
        '"""Module doc."""\n\nclass A(Base):\n\n    def documented(self, x):\n        """Method doc."""\n\n'
        'async def fetch(url,\n                timeout=1):\n    """Fetch doc\n    over two lines."""\n'
    )
    assert docstring_view("class A:\n    x = 1\n") == ""


def test_builtin_corpus_is_real_portable_text():
    files = stdlib_files()
    rel = [p.relative_to(stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel) and "json/decoder.py" in rel
    assert not any(r.startswith(("test/", "tkinter/", "idlelib/", "site-packages/")) for r in rel)
    docs = builtin_documents("python-docs")
    first = [next(docs) for _ in range(3)]
    assert all(doc_id.startswith("pydoc_data.topics:") and len(text) > 100 for doc_id, text in first)
    assert builtin_fingerprint("python-docs") == builtin_fingerprint("python-docs")
    assert builtin_fingerprint("python-docs") != builtin_fingerprint("python-source")
