"""Results are keyed on the source that computed them: only what changed reruns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import initmi_utils.sources as sources
import initmi_utils.train as train_module
from initmi_utils.config import RunPaths, experiment
from initmi_utils.jobs import discover
from initmi_utils.pipeline import plan
from initmi_utils.train import StaleRun, train


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A temporary copy of the package that the source hashes read instead of the real one."""
    copy = tmp_path / "initmi_utils"
    shutil.copytree(sources.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sources, "PACKAGE_DIR", copy)
    return copy


def _keys(tmp_path) -> dict[str, str]:
    chains, finals = plan("smoke", ["normal"], [0], discover(), tmp_path / "root", {})
    keys = {}
    for job in [j for chain in chains for j in chain] + finals:  # dependency order
        keys[job.notebook.number] = job.compute_key()
    return keys


def _edit(package: Path, module: str) -> None:
    path = package / f"{module}.py"
    path.write_text(path.read_text() + "\n# an edit\n")


@pytest.mark.parametrize("module, rerun", [
    ("logit_lens", {"05", "07"}),  # an analysis module: the notebook that imports it, and the comparison after it
    ("offsets", {"03", "04", "07"}),  # one that several notebooks and the comparison import
    ("report", {"07"}),  # the report: the comparison only
    ("model", {"01", "02", "03", "04", "05", "06", "07"}),  # training code: training and all after it
])
def test_editing_a_module_reruns_only_the_notebooks_that_depend_on_it(package_copy, tmp_path, module, rerun):
    before = _keys(tmp_path)
    _edit(package_copy, module)
    after = _keys(tmp_path)
    assert {n for n in before if before[n] != after[n]} == rerun


def test_the_closure_follows_imports_transitively():
    closure = sources.module_closure({"initmi_utils.behavior"})
    assert {"initmi_utils.checkpoints", "initmi_utils.model", "initmi_utils.config"} <= closure
    assert "initmi_utils.train" not in closure and "initmi_utils.report" not in closure
    assert sources.notebook_imports(["%matplotlib inline\nfrom initmi_utils import plots\nimport initmi_utils.train"]) == \
        {"initmi_utils.plots", "initmi_utils.train"}


def test_a_run_trained_by_other_training_code_is_refused_unless_reused_knowingly(tmp_path, monkeypatch):
    cfg = experiment("smoke", "normal", 0).replace(train={"steps": 10, "threads": 1})
    first = train(cfg, tmp_path, progress=False)
    done = RunPaths.of(cfg, tmp_path).checkpoints / "done.json"
    assert json.loads(done.read_text())["source"] == train_module.training_source("normal")
    monkeypatch.setattr(train_module, "training_source", lambda scheme="": "edited0000000000")
    with pytest.raises(StaleRun, match=r"other training code.*stale=retrain.*stale='reuse'"):
        train(cfg, tmp_path, progress=False)
    assert train(cfg, tmp_path, progress=False, stale="reuse").equals(first)
    again = train(cfg, tmp_path, progress=False, stale="retrain")  # deleted and trained anew: same bytes
    assert again.equals(first)
    assert json.loads(done.read_text())["source"] == "edited0000000000"


def test_a_warm_kernel_started_before_an_edit_is_replaced(package_copy, monkeypatch):
    import initmi_utils.jobs as pipeline

    class FakeKernel:
        alive = True

        def is_alive(self):
            return self.alive

        def shutdown_kernel(self, now=False):
            self.alive = False

    started = []
    monkeypatch.setattr(pipeline.WarmKernel, "_run", lambda self, code: None)

    class FakeManager:
        def __init__(self, kernel_name, **kwargs):
            started.append(self)
            self.km = FakeKernel()

        def start_kernel(self, cwd):
            pass

        def is_alive(self):
            return self.km.alive

        def shutdown_kernel(self, now=False):
            self.km.alive = False

        def client(self):
            raise AssertionError("a kernel of edited code must not be reused")

    monkeypatch.setattr("jupyter_client.manager.KernelManager", FakeManager)
    warm = pipeline.WarmKernel("initmi", package_copy)
    first = warm.get()
    _edit(package_copy, "report")
    second = warm.get()
    assert len(started) == 2 and first is not second and not first.is_alive()
