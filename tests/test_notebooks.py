"""Each notebook has one source: the ``.ipynb`` and its jupytext ``py:percent`` pair agree."""

from __future__ import annotations

from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
IPYNB = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    """What a reader and papermill see of a notebook: each cell's type, source and tags."""
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def test_every_notebook_has_its_pair_and_nothing_else_is_paired():
    assert IPYNB, "no notebooks found"
    assert {p.stem for p in IPYNB} == {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py")}


@pytest.mark.parametrize("ipynb", IPYNB, ids=lambda p: p.stem)
def test_the_pair_is_in_sync(ipynb: Path):
    py = ipynb.with_suffix(".py")
    a, b = cells(jupytext.read(ipynb)), cells(jupytext.read(py, fmt="py:percent"))
    assert len(a) == len(b), (
        f"{ipynb.name} has {len(a)} cells, {py.name} {len(b)}: run `jupytext --sync notebooks/{ipynb.name}` "
        f"(the newer file wins) or save it in JupyterLab")
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"cell {i} differs between {ipynb.name} and {py.name}: run `jupytext --sync notebooks/{ipynb.name}`"


def test_the_pairing_is_configured_for_jupyterlab():
    config = (NOTEBOOKS / "jupytext.toml").read_text()
    assert 'formats = "ipynb,py:percent"' in config
