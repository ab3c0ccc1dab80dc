"""The package is layered: no import cycles, no imports hidden in functions, the contract holds."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parent.parent / "initmi_utils"


def test_the_import_linter_layers_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_no_module_imports_another_that_imports_it_back():
    # The contract lets modules of one layer (":") import one another; none may form a cycle.
    graph = grimp.build_graph("initmi_utils")
    modules = sorted(m for m in graph.modules if m != "initmi_utils")
    cycles = [(a, b) for a, b in itertools.combinations(modules, 2)
              if graph.find_shortest_chain(a, b) and graph.find_shortest_chain(b, a)]
    assert not cycles, f"import cycles between {cycles}"


def test_no_package_import_is_hidden_inside_a_function():
    # An import placed in a function to dodge a cycle is still a cycle, only one that fails at
    # call time instead of at import time.
    hidden = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("initmi_utils"):
                    hidden.append(f"{path.name}:{node.lineno} from {node.module}")
                if isinstance(node, ast.Import) and any(a.name.startswith("initmi_utils") for a in node.names):
                    hidden.append(f"{path.name}:{node.lineno} import {node.names[0].name}")
    assert not hidden, hidden
