"""The published study: ``docs/findings.md`` is what the code writes from ``results/full``, and the
README's quoted findings are in it (both checked once the full study's results are committed;
publishing and the report from results are tested on a smoke grid in ``tests/test_pipeline.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from initmi_utils import compare
from initmi_utils.results import findings_markdown
from initmi_utils.study import read_manifest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results" / "full"
FINDINGS = REPO / "docs" / "findings.md"
published = pytest.mark.skipif(read_manifest(RESULTS) is None, reason="the full study's results are not published yet")


def readme_quotes() -> list[str]:
    """The README's quoted findings: the ``> `` lines of its "Findings" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Findings\n(.*?)(?=^## )", text, flags=re.S | re.M)
    return [line[2:].strip() for line in section.group(1).splitlines() if line.startswith("> ")] if section else []


@published
@pytest.mark.slow
def test_findings_doc_is_regenerated_from_the_published_results(tmp_path):
    results, _ = compare.run_compare("full", RESULTS, static=False, out_root=tmp_path)
    found = next(r for r in results if "findings" in r.tables).tables["findings"]
    assert findings_markdown(found, read_manifest(RESULTS), "results/full") == FINDINGS.read_text(encoding="utf-8")


@published
def test_the_readme_quotes_three_findings_word_for_word():
    quotes = readme_quotes()
    doc = FINDINGS.read_text(encoding="utf-8")
    assert len(quotes) == 3, quotes
    for q in quotes:
        assert q in doc, q
