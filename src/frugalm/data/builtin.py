"""The embedded default corpora: English documentation and code that ship with every CPython install.

Training must work offline with no download, so the default text is the interpreter's own library:

* ``python-docs`` - the reference manual's topic pages (``pydoc_data.topics``, what ``help("if")``
  prints) followed by a *documentation view* of each stdlib module: its module, class and function
  docstrings with the ``class``/``def`` lines they belong to, copied verbatim from the source.
  About 2 MB of mostly English prose, small enough that a CPU model sees it several times in a few
  minutes, regular enough (reST conventions, signatures) that its loss falls visibly.
* ``python-source`` - the same stdlib modules as complete source files (about 10 MB).

Both exclude the parts that Linux distributions split into optional packages (tests, tkinter, IDLE,
lib2to3, distutils, ...) so that two machines with the same Python version see the same text. Patch
releases do edit docstrings, which is why the cache key hashes the actual file bytes and the shard
manifest records the interpreter version.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import platform
import sysconfig
from pathlib import Path
from typing import Iterator

from frugalm.data.errors import DataError

BUILTIN_CORPORA = ("python-docs", "python-source")

# Directories (anywhere in a stdlib path) and files left out: tests, GUI and tooling that Debian/Ubuntu
# and others ship as separate packages, packaging metadata, and the topics module we read separately.
_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip",
    "site-packages", "dist-packages", "__pycache__", "pydoc_data", "lib-dynload", "__phello__",
})
_EXCLUDED_FILES = frozenset({"turtle.py", "_sysconfigdata.py"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(relative: Path) -> bool:
    dirs = relative.parts[:-1]
    if any(d in _EXCLUDED_DIRS or d.startswith("config-") for d in dirs):
        return True
    name = relative.name
    return name in _EXCLUDED_FILES or name.startswith("_sysconfigdata")


def stdlib_files() -> list[Path]:
    """The stdlib's portable ``.py`` files, sorted by their path relative to the stdlib root."""
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(f"the Python standard library was not found at {root}; set data.path to your own text")
    files: list[Path] = []
    # os.walk with pruning: site-packages (often GBs of third-party code) lives under the stdlib root.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".py") and not _excluded(path.relative_to(root)) and path.is_file():
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _topics_file() -> Path:
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or not spec.origin:
        raise DataError("pydoc_data.topics is missing from this Python; use builtin = 'python-source' or data.path")
    return Path(spec.origin)


def _input_files(name: str) -> list[Path]:
    files = stdlib_files()
    return [_topics_file(), *files] if name == "python-docs" else files


def builtin_fingerprint(name: str) -> str:
    """sha256 over the bytes of every file the corpus is read from (cheap next to parsing them)."""
    _check_name(name)
    root = stdlib_root()
    h = hashlib.sha256(f"builtin:{name}\n".encode())
    for path in _input_files(name):
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        h.update(f"{rel}\n".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def builtin_description(name: str) -> str:
    _check_name(name)
    what = {
        "python-docs": "pydoc_data.topics + docstring view of the stdlib",
        "python-source": "stdlib source files",
    }[name]
    # No local paths here: the description goes into manifests that should match across machines.
    return f"{name}: {what} of {platform.python_implementation()} {platform.python_version()}"


def builtin_documents(name: str) -> Iterator[tuple[str, str]]:
    """Yield ``(document id, text)`` pairs in a fixed order; one document per topic or module."""
    _check_name(name)
    root = stdlib_root()
    if name == "python-docs":
        yield from _pydoc_topics()
    for path in stdlib_files():
        rel = path.relative_to(root).as_posix()
        source = path.read_bytes().decode("utf-8", errors="replace")
        if name == "python-docs":
            try:
                text = docstring_view(source)
            except SyntaxError:  # a file this interpreter cannot parse carries no usable docstrings
                continue
        else:
            text = source
        if text.strip():
            yield f"stdlib:{rel}", text


def _pydoc_topics() -> Iterator[tuple[str, str]]:
    from pydoc_data import topics

    for key in sorted(topics.topics):
        text = topics.topics[key]
        if text.strip():
            yield f"pydoc_data.topics:{key}", text


def _docstring_expr(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr):
        value = body[0].value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return body[0]
    return None


def _definitions(body: list[ast.stmt]) -> Iterator[ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every class/def in a statement list, nested ones included, without visiting expressions
    (which are most of a syntax tree; `ast.walk` would spend its time there)."""
    for stmt in body:
        if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield stmt
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            child = getattr(stmt, field, None)
            if isinstance(child, list):
                yield from _definitions([c for c in child if isinstance(c, (ast.stmt, ast.excepthandler, ast.match_case))])


def docstring_view(source: str) -> str:
    """The module with everything but docstrings and their ``class``/``def`` lines removed.

    Lines are copied verbatim (no re-formatting), so the result is the library's own text; kept blocks
    are separated by one blank line. Class headers are always kept so methods keep their context.
    A module without any docstring gives "".
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    spans: list[tuple[int, int]] = []  # [start, end) line indices, 0-based
    has_docstring = False
    doc = _docstring_expr(tree)
    if doc is not None:
        spans.append((doc.lineno - 1, doc.end_lineno))
        has_docstring = True
    for node in _definitions(tree.body):
        doc = _docstring_expr(node)
        if doc is not None:
            spans.append((node.lineno - 1, doc.end_lineno))
            has_docstring = True
        elif isinstance(node, ast.ClassDef):
            spans.append((node.lineno - 1, max(node.lineno, node.body[0].lineno - 1)))
    if not has_docstring:
        return ""
    spans.sort()
    merged: list[list[int]] = [list(spans[0])]
    for start, end in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    blocks = ["\n".join(lines[s:e]).rstrip() for s, e in merged]
    return "\n\n".join(b for b in blocks if b) + "\n"


def _check_name(name: str) -> None:
    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown builtin corpus {name!r}; choose one of {list(BUILTIN_CORPORA)}")
