"""The papermill grid runner: bad input, committed notebooks, and one smoke run of the whole grid."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from initmi_utils.config import PRESET_SEEDS, RunPaths, experiment
from initmi_utils.pipeline import NOTEBOOK_DIR, discover, needs_donor
from initmi_utils.schemes import SCHEMES

REPO = Path(__file__).resolve().parent.parent


def corrupt_data(cfg, root):
    """Write the run's data set, then break its manifest hash: loading it must fail."""
    from initmi_utils.config import data_dir
    from initmi_utils.data import load_dataset

    load_dataset(cfg, root)
    (data_dir(cfg, root) / "manifest.json").write_text(json.dumps({"sha256": "0" * 64}))


def pipeline(*args, root):
    return subprocess.run([sys.executable, "-m", "initmi_utils.pipeline", *args, "--root", str(root)],
                          capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "smoke", "--schemes", "xavier,nope"], "unknown init scheme(s) ['nope']"),
        (["--preset", "tiny"], "unknown preset 'tiny'"),
        (["--preset", "smoke", "--notebooks", "01,99"], "unknown notebook number(s) ['99']"),
        (["--preset", "smoke", "--param", "learning_rate=3"], "unknown notebook parameter 'learning_rate'"),
        (["--preset", "smoke", "--seeds", "one"], "--seeds must be comma-separated integers"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, args, message):
    out = pipeline(*args, root=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_committed_notebooks_are_clean_and_parameterised():
    notebooks = discover()
    assert [nb.number for nb in notebooks][:1] == ["01"]
    for nb in notebooks:
        content = nbformat.read(nb.path, as_version=4)
        for cell in content.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{nb.path.name} has outputs"
        params = [c for c in content.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, nb.path.name
        # The parameters cell holds only annotated literals.
        for line in params[0].source.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                assert ":" in line.split("=")[0] and "(" not in line.split("#")[0], f"{nb.path.name}: {line}"
        assert set(("preset", "root")) <= set(nb.parameters)
        # papermill silently drops a parameter it cannot parse (e.g. an '=' in its comment).
        declared = [l.split(":")[0].strip() for l in params[0].source.splitlines() if l.strip() and not l.startswith("#")]
        assert declared == list(nb.parameters), f"{nb.path.name}: papermill sees {list(nb.parameters)}"


def test_a_failing_notebook_is_reported_and_the_other_runs_go_on(tmp_path):
    # A run whose training cannot start (its data file is corrupted) fails; the other run finishes.
    root = tmp_path / "root"
    bad = experiment("smoke", "normal", 0)
    corrupt_data(bad, root)
    out = pipeline("--preset", "smoke", "--schemes", "normal", "--notebooks", "01", root=root)
    assert out.returncode == 1
    executed = RunPaths.of(bad, root).notebooks / "01_train.ipynb"
    assert f"FAILED: 01_train.ipynb" in out.stderr and str(executed) in out.stderr
    assert executed.exists(), "the failing notebook's executed copy is kept for inspection"


def test_donors_are_scheduled_only_for_work_that_reads_them():
    by_number = {nb.number: nb for nb in discover()}
    assert not needs_donor(["normal", "xavier"], [by_number["01"], by_number["02"]])
    assert needs_donor(["seeded"], [by_number["01"]])  # the seeded run embeds its donor
    assert needs_donor(["normal"], [by_number["03"]])  # persistence scores every run against the donor
    assert not needs_donor(["seeded"], [by_number["07"]])  # the comparison only reads tables


def test_a_failing_donor_is_reported_with_its_seed(tmp_path):
    root = tmp_path / "root"
    corrupt_data(experiment("smoke", "seeded", 0), root)
    out = pipeline("--preset", "smoke", "--schemes", "seeded", "--notebooks", "01", root=root)
    assert out.returncode == 1
    assert "FAILED: donor of seed 0" in out.stderr and "manifest" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_smoke_grid_runs_every_notebook_for_every_scheme(tmp_path):
    out = pipeline("--preset", "smoke", "--workers", "2", root=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The donor is its own job, so no worker waits on its lock inside a notebook.
    assert "[    ok] donor seed=0" in out.stdout, out.stdout[-3000:]
    notebooks = discover()
    for scheme in SCHEMES:
        for seed in PRESET_SEEDS["smoke"]:
            paths = RunPaths.of(experiment("smoke", scheme, seed), tmp_path)
            for nb in (n for n in notebooks if n.per_run):
                assert (paths.notebooks / nb.path.name).exists(), (scheme, nb.path.name)
            assert (paths.checkpoints / "done.json").exists()
            assert (paths.tables / "metrics.parquet").exists()
    report = tmp_path / "figures" / "smoke" / "report.html"
    assert report.exists() and "RQ1" in report.read_text(encoding="utf-8")
    # The comparison is told which seeds the grid ran, so it can name the ones missing.
    compare_nb = nbformat.read(tmp_path / "data" / "runs" / "smoke" / "notebooks" / "07_compare.ipynb", as_version=4)
    injected = next(c for c in compare_nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert f"seeds = {list(PRESET_SEEDS['smoke'])}" in injected.source
    # A second run has nothing to do.
    again = pipeline("--preset", "smoke", "--workers", "2", root=tmp_path)
    assert again.returncode == 0 and " 0 ok," in again.stdout, again.stdout[-2000:]
