"""Each notebook has one source: the ``.ipynb`` and its jupytext ``py:percent`` pair agree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from initmi_utils.config import ROOT_ENV, RunPaths, data_dir, experiment, project_root
from initmi_utils.train import train

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


@pytest.mark.slow
def test_papermill_from_any_directory_finds_the_project_by_default(tmp_path, monkeypatch):
    # What a user types: papermill straight from a shell, no root given, from the repo root or
    # anywhere else. The run lives in the project's own checkpoints/ (seed 917 of the smoke
    # preset: a folder no study uses, removed afterwards).
    monkeypatch.delenv(ROOT_ENV, raising=False)
    project = NOTEBOOKS.parent
    assert project_root() == project
    cfg = experiment("smoke", "xavier", 917)
    paths = RunPaths.of(cfg)
    made_data = not data_dir(cfg).exists()
    papermill = Path(sys.executable).with_name("papermill")
    try:
        train(cfg, progress=False)
        for cwd, notebook in ((project, "notebooks/02_behavior.ipynb"), (tmp_path, str(NOTEBOOKS / "02_behavior.ipynb"))):
            out = subprocess.run([str(papermill), notebook, str(tmp_path / "out.ipynb"), "-p", "scheme", "xavier",
                                  "-p", "seed", "917", "-p", "preset", "smoke", "-k", "initmi"],
                                 cwd=cwd, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != ROOT_ENV})
            assert out.returncode == 0, f"from {cwd}: {out.stderr[-2000:]}"
            assert (paths.tables / "behavior.parquet").exists()
            (paths.tables / "behavior.parquet").unlink()
    finally:
        for folder in (paths.checkpoints, paths.tables, paths.figures):
            shutil.rmtree(folder, ignore_errors=True)
        if made_data:
            shutil.rmtree(data_dir(cfg), ignore_errors=True)
