"""The findings: sentences written from the comparison's tables say "no difference" on a planted
null study, name the one planted difference when there is one, and say "not supported" when the
seeds cannot support a test.

The studies are ``test_compare``'s synthetic tables with the planted answers replaced: every
run's emergence step is drawn from one distribution for every scheme (the null), plus 3000 steps
for ``orthogonal`` only (the planted difference); every run uses classic induction. The
synthetic geometry follows each run's emergence step (``test_compare``), a per-run effect that the
early-geometry correlation finds in either study. One fixed draw each; how often the
procedure declares something under the null over many draws is checked in ``tests/test_stats.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_compare as TC  # noqa: E402  (the synthetic study's table builders)

from initmi_utils import compare  # noqa: E402
from initmi_utils.config import PRESET_SEEDS  # noqa: E402
from initmi_utils.findings import findings, p_text  # noqa: E402
from initmi_utils.schemes import SCHEMES  # noqa: E402

PLANTED = "orthogonal"
SHIFT = 3000  # steps: every planted run emerges after every reference run (complete separation)


def planted_study(root: Path, monkeypatch, shift: dict[str, int], rng_seed: int = 3, seeds=None) -> Path:
    """``test_compare.make_synthetic_study`` with emergence steps 1000 + 250·U{0..8} for every
    scheme (+ ``shift[scheme]``), no missing run, classic induction everywhere."""
    rng = np.random.default_rng(rng_seed)
    draws = {(s, k): 1000 + 250 * int(rng.integers(0, 9)) for s in SCHEMES for k in range(5)}
    monkeypatch.setattr(TC, "planted_emergence", lambda scheme, seed: draws[(scheme, seed)] + shift.get(scheme, 0))
    monkeypatch.setattr(TC, "RECALL", ("none", ()))
    monkeypatch.setattr(TC, "SHIFTED", ("none", ()))
    return TC.make_synthetic_study(root, drop=("none", -1), truncate=("none", -1),
                                   seeds=seeds or PRESET_SEEDS[TC.PRESET])


def answer(root: Path) -> dict[str, list[str]]:
    """Each question's sentences, from the comparison's own functions (CKA off)."""
    study = compare.load_study(TC.PRESET, root)
    r1 = compare.rq1(study, n_perm=500)
    r2 = compare.rq2(study, cka=False, n_perm=500)
    r3 = compare.rq3(study, r1.tables["emergence"], early_fraction=500 / TC.HORIZON, n_perm=500)
    res = findings(study, r1, r2, r3)
    blocks = [b for b in res.section.blocks if b.kind == "finding"]
    assert [b.title.split(" ·")[0] for b in blocks] == ["RQ1", "RQ2", "RQ3"]
    assert all(b.content is not None for b in blocks), "each question has its figure"
    assert set(res.figures) == {"finding_rq1", "finding_rq2", "finding_rq3"}
    return {b.title.split(" ·")[0]: b.data for b in blocks}


CLAIM = re.compile(r"\b(differs?|later|earlier|higher|lower)\b")  # a difference between schemes


def test_a_planted_null_study_says_no_difference(tmp_path, monkeypatch):
    found = answer(planted_study(tmp_path, monkeypatch, {}))
    text = {q: " ".join(s) for q, s in found.items()}
    assert "No difference in the emergence step across schemes" in text["RQ1"]
    assert "No difference across schemes in the end-of-training" in text["RQ1"]
    assert "No difference across schemes in the mechanism features" in text["RQ2"]
    assert "classic induction in 35 of 35 runs, whatever the scheme" in text["RQ2"]
    assert "No difference across schemes in geometry at the end of training" in text["RQ3"]
    assert "No difference across schemes in early geometry" in text["RQ3"]
    claims = [s for ss in found.values() for s in ss if CLAIM.search(s.replace("No difference", ""))
              and "none of the" not in s]
    assert not claims, claims
    # What is planted per run, not per scheme, is still found: the early residual norm is the
    # emergence step / 1000 in every run, whatever its scheme.
    assert "Early residual norm layer 0 (step 500) predicts the emergence step across runs" in text["RQ3"]
    # The sentences carry the test, its p and n, and the emergence intervals.
    assert re.search(r"permutation one-way \(means\), p = 0\.\d+; 6 schemes, 5 seeds each", text["RQ1"])
    assert re.search(r"median step \d+ \[\d+, \d+\], 5/5 seeds", text["RQ1"])


def test_a_planted_difference_is_named_and_nothing_else_about_emergence(tmp_path, monkeypatch):
    found = answer(planted_study(tmp_path, monkeypatch, {PLANTED: SHIFT}))
    rq1 = " ".join(found["RQ1"])
    assert "The emergence step differs across schemes" in rq1
    assert re.search(rf"Against the reference normal, median step \d+ .*: {PLANTED} later, \d+ \(Holm p = 0\.04, "
                     rf"n = 5 v 5\)", rq1), rq1
    assert f"emerges first under" in rq1 and f"last under {PLANTED}" in rq1
    for other in set(SCHEMES) - {PLANTED, "normal", "seeded"}:
        assert f"{other} later" not in rq1 and f"{other} earlier" not in rq1


def test_one_seed_per_scheme_supports_no_claim(tmp_path, monkeypatch):
    found = answer(planted_study(tmp_path, monkeypatch, {PLANTED: SHIFT}, seeds=(0,)))
    rq1 = " ".join(found["RQ1"])
    assert "No test of the emergence step across schemes" in rq1 and "not supported" in rq1
    assert f"{PLANTED} later" not in rq1
    assert all("not supported" in s for s in found["RQ3"] if "geometry" in s and "across schemes" in s)


def test_p_values_read_as_words():
    assert p_text(0.0412) == "p = 0.041" and p_text(0.0004) == "p < 0.001" and p_text(1.0) == "p = 1"
    assert p_text(float("nan")) == "p not computed"
