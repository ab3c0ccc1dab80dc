"""Which package source a result depends on: import closures and their hashes.

A result is stale when the code that computed it changed. The package has no imports inside
functions (``tests/test_layers.py``), so a module's dependencies are its module-level
``initmi_utils`` imports, read here from the source with ``ast`` (importing would run the code,
and a stale kernel may hold other versions of the modules). ``closure_hash`` hashes the bytes of
every module in a closure plus the versions of torch and transformer_lens, the two libraries
whose numerics the results depend on. Hand-written because the import-linter's graph (grimp) is a
test dependency, and this is twenty lines of ``ast``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import threading
from importlib import metadata
from pathlib import Path
from typing import Iterable

PACKAGE = "initmi_utils"
PACKAGE_DIR = Path(__file__).resolve().parent
LIBRARIES = ("torch", "transformer-lens")


def _imported(tree: ast.AST) -> set[str]:
    """``initmi_utils`` modules imported anywhere in ``tree`` (``from initmi_utils import plots``
    counts as ``initmi_utils.plots``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            if node.module == PACKAGE:
                found |= {f"{PACKAGE}.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def _path(module: str, package_dir: Path) -> Path:
    name = module.split(".", 1)[1] if "." in module else "__init__"
    return package_dir / f"{name}.py"


def module_closure(modules: Iterable[str], package_dir: Path | None = None) -> set[str]:
    """``modules`` and every package module they import, transitively (plus the package's
    ``__init__``, which every import runs); read from ``package_dir`` (default ``PACKAGE_DIR``)."""
    package_dir = package_dir or PACKAGE_DIR
    todo, seen = list(modules) + [PACKAGE], set()
    while todo:
        m = todo.pop()
        path = _path(m, package_dir)
        if m in seen or not path.exists():  # e.g. `from initmi_utils import __version__`
            continue
        seen.add(m)
        todo += sorted(_parse_imports(path.read_text()) - seen)
    return seen


_PARSE = threading.Lock()


def _parse_imports(source: str) -> set[str]:
    """``_imported`` of a source text. One parse at a time: CPython 3.11's ``ast.parse`` can fail
    with "AST constructor recursion depth mismatch" when threads (the pipeline's workers) parse at
    once."""
    with _PARSE:
        return _imported(ast.parse(source))


def closure_hash(modules: Iterable[str], package_dir: Path | None = None) -> str:
    """sha256 of the closure's sources (name and bytes, sorted) and the library versions."""
    package_dir = package_dir or PACKAGE_DIR
    h = hashlib.sha256()
    for m in sorted(module_closure(modules, package_dir)):
        h.update(m.encode() + b"\0" + _path(m, package_dir).read_bytes() + b"\0")
    h.update(json.dumps({lib: _version(lib) for lib in LIBRARIES}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def package_hash(package_dir: Path | None = None) -> str:
    """``closure_hash`` of every module of the package: what a long-lived kernel has imported."""
    package_dir = package_dir or PACKAGE_DIR
    return closure_hash({f"{PACKAGE}.{p.stem}" for p in package_dir.glob("*.py") if p.stem != "__init__"}, package_dir)


def _version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "absent"


def notebook_imports(cells: Iterable[str]) -> set[str]:
    """The package modules a notebook's code cells import (IPython magics and shell lines are
    dropped before parsing; a cell that still does not parse is skipped)."""
    found = set()
    for source in cells:
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            found |= _parse_imports(code)
        except SyntaxError:
            continue
    return found


def machine() -> dict:
    """This machine: ``{"cpu": model name, "cores": logical cores}`` (Linux: /proc/cpuinfo; else
    ``platform``). Recorded with results and figures, which state the machine they came from."""
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine() or "unknown CPU", "cores": os.cpu_count()}
