"""The published study: ``docs/findings.md`` and the comparison's tables in ``results/full/compare``
are what the code writes from the run tables in ``results/full``, and the README's quoted findings
are in it (checked once every run of the full study is published; publishing and the report from
results are tested on a smoke grid in ``tests/test_pipeline.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from initmi_utils import compare
from initmi_utils.config import PRESET_SEEDS
from initmi_utils.results import COMPARE_DIR, compare_differences, findings_markdown
from initmi_utils.schemes import SCHEMES
from initmi_utils.study import read_manifest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results" / "full"
FINDINGS = REPO / "docs" / "findings.md"


def missing_runs() -> list[tuple[str, int]]:
    """The full study's runs (every built-in scheme x the full preset's seeds) not yet in
    ``results/full``: it is published seed by seed, and its findings are written once it is whole."""
    manifest = read_manifest(RESULTS) or {"runs": {}}
    have = {(r["scheme"], r["seed"]) for r in manifest["runs"].values()}
    design = [(name, seed) for name, s in SCHEMES.items() if not s.source for seed in PRESET_SEEDS["full"]]
    return [run for run in design if run not in have]


published = pytest.mark.skipif(bool(missing_runs()), reason="the full study's results are not all published yet")


def test_published_runs_are_runs_of_the_study():
    # What is published so far belongs to the design, so that the skip above ends when it is whole.
    manifest = read_manifest(RESULTS) or {"runs": {}}
    design = {(name, seed) for name, s in SCHEMES.items() if not s.source for seed in PRESET_SEEDS["full"]}
    assert {(r["scheme"], r["seed"]) for r in manifest["runs"].values()} <= design


def readme_quotes() -> list[str]:
    """The README's quoted findings: the ``> `` lines of its "Findings" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Findings\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    return [line[2:].strip() for line in section.group(1).splitlines() if line.startswith("> ")] if section else []


@published
@pytest.mark.slow
def test_findings_doc_is_regenerated_from_the_published_results(tmp_path):
    results, _ = compare.run_compare("full", RESULTS, static=False, out_root=tmp_path)
    found = next(r for r in results if "findings" in r.tables).tables["findings"]
    assert findings_markdown(found, read_manifest(RESULTS), "results/full") == FINDINGS.read_text(encoding="utf-8")
    assert compare_differences(tmp_path / "data" / "compare" / "full", RESULTS / COMPARE_DIR) == []


@published
def test_the_readme_quotes_three_findings_word_for_word():
    quotes = readme_quotes()
    doc = FINDINGS.read_text(encoding="utf-8")
    assert len(quotes) == 3, quotes
    for q in quotes:
        assert q in doc, q
