"""The papermill grid runner: bad input, committed notebooks, and one smoke run of the whole grid."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from initmi_utils.config import PRESET_SEEDS, RunPaths, experiment
import initmi_utils.jobs as jobs_module
from initmi_utils.jobs import DonorJob, Progress, discover, needs_donor
from initmi_utils.pipeline import plan
from initmi_utils.results import compare_differences
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


def test_a_donor_job_runs_the_donor_policy_and_logs_the_chosen_donor(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        ok = "  seed 1: step 8000, accuracy 0.020, not emerged\nchosen: donor xavier-s201 (seeds tried 1, 201): step 2400"
        return subprocess.CompletedProcess(cmd, 0, stdout=ok + "\n", stderr="UserWarning: something\n  warnings.warn(\n")

    monkeypatch.setattr(jobs_module.subprocess, "run", fake_run)
    donor = DonorJob("quick", 1, tmp_path)
    assert donor.run()
    assert calls[0][1:] == ["-m", "initmi_utils.donor", "--preset", "quick", "--seed", "1", "--root", str(tmp_path)]
    line = donor.log_line()
    assert line.startswith("[    ok] donor seed=1 (") and line.endswith(
        ": chosen: donor xavier-s201 (seeds tried 1, 201): step 2400"), line  # stdout's last line, not stderr's


def test_a_failing_donor_is_reported_with_its_seed(tmp_path):
    root = tmp_path / "root"
    corrupt_data(experiment("smoke", "seeded", 0), root)
    out = pipeline("--preset", "smoke", "--schemes", "seeded", "--notebooks", "01", root=root)
    assert out.returncode == 1
    assert "FAILED: donor of seed 0" in out.stderr and "manifest" in out.stderr, out.stderr[-2000:]


def test_analyses_depend_on_their_run_s_training_only_and_the_comparison_on_every_run(tmp_path):
    notebooks = discover()
    chains, finals = plan("smoke", ["normal", "xavier"], [0], notebooks, tmp_path, {})
    for chain in chains:
        assert chain[0].notebook.number == "01" and chain[0].depends == []
        assert all(job.depends == [chain[0]] for job in chain[1:])
    assert [j.notebook.number for j in finals] == ["07"]
    assert finals[0].depends == [j for c in chains for j in c]


def test_a_job_s_key_does_not_depend_on_which_other_notebooks_are_selected(tmp_path):
    # 06 run alone (``--notebooks 06``) must be up to date for the whole grid afterwards, and the
    # other way round: its key is the same, training included, whatever else was selected.
    notebooks = discover()
    chains, _ = plan("smoke", ["normal"], [0], notebooks, tmp_path, {})
    keys = {j.notebook.number: j.compute_key() for j in chains[0]}
    alone, _ = plan("smoke", ["normal"], [0], [n for n in notebooks if n.number == "06"], tmp_path, {},
                    all_notebooks=notebooks)
    assert [j.notebook.number for j in alone[0]] == ["06"]
    assert alone[0][0].compute_key() == keys["06"]
    assert alone[0][0].depends[0].notebook.number == "01"  # keyed on it, not run
    # a different training changes it: the dependency is real
    other, _ = plan("smoke", ["normal"], [0], [n for n in notebooks if n.number == "06"], tmp_path,
                    {"extend_to": 0}, all_notebooks=notebooks)
    assert other[0][0].compute_key() != keys["06"]


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
    # Executed notebooks are trusted for the user who ran the grid: JupyterLab runs their
    # circuitsvis scripts. A notebook edited afterwards is not.
    from nbformat.sign import NotebookNotary
    executed = RunPaths.of(experiment("smoke", "normal", 0), tmp_path).notebooks / "03_attention.ipynb"
    nb = nbformat.read(executed, as_version=4)
    notary = NotebookNotary()
    assert notary.check_signature(nb)
    nb.cells[0].source += " "
    assert not notary.check_signature(nb)
    # The comparison is told which seeds the grid ran, so it can name the ones missing.
    compare_nb = nbformat.read(tmp_path / "data" / "runs" / "smoke" / "notebooks" / "07_compare.ipynb", as_version=4)
    injected = next(c for c in compare_nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert f"seeds = {list(PRESET_SEEDS['smoke'])}" in injected.source
    # A second run has nothing to do.
    again = pipeline("--preset", "smoke", "--workers", "2", root=tmp_path)
    assert again.returncode == 0 and " 0 ok," in again.stdout, again.stdout[-2000:]

    # Published: every run's tables and a manifest; the report regenerates from them alone.
    results = tmp_path / "published" / "smoke"
    out = _results("publish", "--preset", "smoke", "--root", str(tmp_path), "--dest", str(results))
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((results / "manifest.json").read_text())
    assert set(manifest["runs"]) == {f"{s}-s0" for s in SCHEMES} and manifest["libraries"]["torch"]
    run = manifest["runs"]["normal-s0"]
    assert run["machine"]["cores"] and set(run["seconds"]) == {nb.path.stem for nb in notebooks if nb.per_run}
    assert isinstance(manifest["runs"]["seeded-s0"]["donor"]["donor_seed"], int)  # the donor the run used
    src = RunPaths.of(experiment("smoke", "normal", 0), tmp_path).tables
    dst = RunPaths.of(experiment("smoke", "normal", 0), results).tables
    kept = sorted(p.name for p in [*src.glob("*.parquet"), *src.glob("*.safetensors")])
    assert sorted(p.name for p in dst.iterdir()) == kept and {"probe.safetensors", "browser.safetensors"} <= set(kept)
    assert not (results / "checkpoints").exists() and not list(results.rglob("step_*.safetensors"))  # no checkpoint
    assert not list(results.rglob("*.ipynb"))
    out = _results("report", "--preset", "smoke", "--results", str(results), "--root", str(tmp_path / "elsewhere"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (tmp_path / "elsewhere" / "figures" / "smoke" / "report.html").exists()
    assert not (results / "data" / "synthetic").exists() and not (results / "figures").exists()  # runs only read
    doc = (tmp_path / "elsewhere" / "docs" / "findings_smoke.md").read_text()
    sentences = pd.read_csv(tmp_path / "data" / "compare" / "smoke" / "findings.csv").sentence
    assert all(f"- {s}" in doc for s in sentences) and "(smoke preset)" in doc
    for table in ("emergence", "final", "findings"):
        again_t = pd.read_csv(tmp_path / "elsewhere" / "data" / "compare" / "smoke" / f"{table}.csv")
        pd.testing.assert_frame_equal(again_t, pd.read_csv(tmp_path / "data" / "compare" / "smoke" / f"{table}.csv"))
    # The comparison's tables are published beside the results, rounded, and checkable against a
    # fresh comparison: agreeing with the one from checkpoints, and a changed value is named.
    published = results / "compare"
    assert (published / "findings.csv").exists() and not (published / "geometry_features.csv").exists()
    assert compare_differences(tmp_path / "data" / "compare" / "smoke", published) == []
    final = pd.read_csv(published / "final.csv")
    column = next(c for c in final.columns if pd.api.types.is_float_dtype(final[c]) and final[c].notna().any())
    final.loc[final[column].notna().idxmax(), column] += 1.0
    final.to_csv(published / "final.csv", index=False)
    assert [d.split(":")[0] for d in compare_differences(tmp_path / "data" / "compare" / "smoke", published)] \
        == ["final.csv"]
    # Not one source: refused, naming what changed, and nothing written.
    before = (results / "manifest.json").read_text()
    manifest["notebooks"]["05_logit_lens"] = "0" * 16
    (results / "manifest.json").write_text(json.dumps(manifest))
    out = _results("publish", "--preset", "smoke", "--root", str(tmp_path), "--dest", str(results))
    assert out.returncode == 2 and "changed since: 05_logit_lens" in out.stderr
    (results / "manifest.json").write_text(before)
    stamp = RunPaths.of(experiment("smoke", "xavier", 0), tmp_path).notebooks / "04_ablation_patching.ok.json"
    stamp.unlink()
    out = _results("publish", "--preset", "smoke", "--root", str(tmp_path), "--dest", str(results))
    assert out.returncode == 2 and "xavier-s0: 04_ablation_patching not up to date" in out.stderr
    assert (results / "manifest.json").read_text() == before


def _results(*args):
    return subprocess.run([sys.executable, "-m", "initmi_utils.results", *args], capture_output=True, text=True, cwd=REPO)


def test_the_progress_line_counts_jobs_and_measures_its_eta():
    now = [0.0]
    p = Progress(["donor", "training", "training", "analysis", "analysis", "comparison"], workers=2,
                 clock=lambda: now[0])
    p.start("donor s0", "donor")
    p.start("01 normal-s0", "training")
    now[0] = 30.0
    assert p.line().startswith("[progress] 0/6 done; running: donor s0 0m30s, 01 normal-s0 0m30s; elapsed 0m30s")
    assert p.line().endswith("ETA after the first donor")  # nothing of that kind measured yet
    p.finish("donor s0", "donor", 30.0)
    now[0] = 100.0
    p.finish("01 normal-s0", "training", 100.0)
    assert p.line().endswith("ETA 0m50s + the analysis, comparison (not measured yet)")  # one training of 100 s left
    p.start("01 xavier-s0", "training")
    p.start("02 normal-s0", "analysis")
    now[0] = 110.0
    p.finish("02 normal-s0", "analysis", 10.0)
    p.start("02 xavier-s0", "analysis")
    p.start("07", "comparison")
    p.finish("07", "comparison", None)  # skipped: no measurement
    now[0] = 120.0
    # left: the running training (100 s mean, 20 s in: 80 s), the running analysis (10 s mean, 10 s
    # in: 0 s) and nothing else; the comparison was skipped, so it needs no measurement.
    assert p.line() == "[progress] 4/6 done; running: 01 xavier-s0 0m20s, 02 xavier-s0 0m10s; elapsed 2m00s; ETA 0m40s"


def test_progress_counts_a_job_once_whatever_order_its_start_and_finish_arrive_in():
    # A worker's start event travels apart from its result: it may arrive after the finish.
    now = [0.0]
    p = Progress(["training", "training"], workers=1, clock=lambda: now[0])
    p.finish("01 normal-s0", "training", 10.0)
    p.start("01 normal-s0", "training")  # late: ignored
    assert p.line().startswith("[progress] 1/2 done; running: none;")
    p.start("01 xavier-s0", "training")
    p.start("01 xavier-s0", "training")  # twice (a retried task announces itself again): once
    now[0] = 4.0
    assert p.line() == "[progress] 1/2 done; running: 01 xavier-s0 0m04s; elapsed 0m04s; ETA 0m06s"
