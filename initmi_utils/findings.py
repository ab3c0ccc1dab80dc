"""The answers first: a few sentences per research question, written from the comparison's tables.

``findings(study, r1, r2, r3)`` reads what ``rq1``, ``rq2`` and ``rq3`` returned (their summary
tables with intervals and n, their omnibus and reference tests) and writes, per question, a few
sentences beside the one figure that shows the answer; it computes no interval and no test of its
own. What a sentence may claim:

- *a difference between schemes* only where the comparison's tests show one: the omnibus test
  across schemes is significant — after Holm over the measures one sentence reads together (the
  three end-of-training measures, the mechanism features, the geometry features; a single
  measure such as the emergence step is its own family) — and the scheme's test against the
  reference is declared (Holm within its family and omnibus p ≤ α, ``inference.reference_tests``);
- *"no difference"*, with the test and its p, when the omnibus test does not show one;
- *"not supported"* when the seeds cannot support a test at all: one seed per scheme, or a
  family whose best attainable Holm p is above α (``inference.can_reach``).

Numbers carry their interval and n: means with the 95% t-interval over seeds, emergence steps as
median with the order-statistic interval, counts as k/n. What it writes on the planted study of
``tests/test_findings.py``, where one scheme emerges 3000 steps late::

    The emergence step differs across schemes (permutation one-way (means), p = 0.002; 6 schemes,
    5 seeds each). Against the reference normal, median step 1250 (log-rank, exact permutation p,
    Holm within the family): orthogonal later, 4250 (Holm p = 0.04, n = 5 v 5); xavier, kaiming,
    scaled_residual and mimetic show no difference (Holm p ≥ 0.98).

and on its null study, where every scheme's emergence is drawn alike::

    No difference in the emergence step across schemes (permutation one-way (means), p = 0.79;
    6 schemes, 5 seeds each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
import plotly.graph_objects as go

from initmi_utils import plots
from initmi_utils.behavior import HEADLINE_METRIC
from initmi_utils.inference import DONOR_SCHEMES, PAIR_NAME, REFERENCE, can_reach, format_ci
from initmi_utils.offsets import REPORT_ORDER
from initmi_utils.report import Section, words
from initmi_utils.rq1 import FINAL_METRICS, scheme_order
from initmi_utils.rq2 import LADDER_NAMES
from initmi_utils.rq3 import DEPTH_ALL, GAUSSIAN_KS_REL, MP_EDGE_SPIKE, last_values
from initmi_utils.stats import ALPHA, family_floor, holm
from initmi_utils.study import Result, Study

MECHANISM_WORDS = {"classic_induction": "classic induction", "shifted_induction": "shifted induction",
                   "long_offset_recall": "long-offset recall", "partial": "a partial pattern (accuracy below the floor)",
                   "none": "no copying mechanism"}
RULE = ("How these sentences are written: a difference between schemes is claimed only where the tests in the details "
        "show one (omnibus test across schemes, Holm over the measures a sentence reads together, then each scheme "
        "against the reference with Holm within its family); otherwise the sentence says \"no difference\", or \"not "
        "supported\" when the seeds cannot support a test. Means carry their 95% t-interval over seeds, emergence steps "
        "the median with its order-statistic interval, counts k/n runs.")


@dataclass
class Finding:
    """One question's answer: its sentences and the one figure that shows it."""

    question: str
    sentences: list[str]
    figure: go.Figure | None = None
    caption: str = ""


# =============================================================================================
# Words for numbers.


def p_text(p: float) -> str:
    """``p = 0.04``, ``p < 0.001``; two significant digits."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p not computed"
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def joined(items: Sequence[str], last: str = "and") -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {last} " + items[-1]


def n_text(omnibus_row: pd.Series) -> str:
    """``5 seeds each`` or ``4–5 seeds per scheme``, from the omnibus row's 'n per scheme'."""
    parts = [p.rsplit(" ", 1) for p in str(omnibus_row["n per scheme"]).split(", ") if p]
    counts = [int(n) for _, n in parts]
    if not counts:
        return "no seeds"
    lo, hi = min(counts), max(counts)
    return f"{lo} seeds each" if lo == hi else f"{lo}–{hi} seeds per scheme"


def _interval(summary: pd.DataFrame, key: dict, scheme: str) -> str:
    """``mean [low, high]`` of ``scheme`` in a summary table (columns of ``key``, scheme, mean,
    ci_low, ci_high)."""
    sel = summary[summary.scheme == scheme]
    for col, value in key.items():
        sel = sel[sel[col] == value]
    if sel.empty:
        return "—"
    r = sel.iloc[0]
    return format_ci(r["mean"], r["ci_low"], r["ci_high"])


def _not_reachable(tests: pd.DataFrame, alpha: float) -> str | None:
    """The sentence for a reference comparison no family of which can reach α (None if one can)."""
    if tests.empty:
        return None
    fams = [f for _, f in tests.groupby("family", sort=False)] if "family" in tests.columns else [tests]
    if any(can_reach(f, alpha) for f in fams):
        return None
    best = min(family_floor(f.p_floor) for f in fams)
    return (f"which scheme differs from the reference is not supported: with these seeds no comparison with it can "
            f"reach significance (best attainable Holm p {best:.2g} > α = {alpha})")


# =============================================================================================
# One quantity, or a group of measures, compared across schemes.


def compare_sentences(what: str, omnibus: pd.DataFrame, tests: pd.DataFrame, effect: "Effect",
                      test_name: str, reference: str = REFERENCE, alpha: float = ALPHA, by: str | None = None,
                      label: Callable[[str], str] = words, limit: int = 2) -> list[str]:
    """Sentences on ``what`` from its omnibus table (one row, or one per value of ``by``: a group
    of measures, Holm over them) and its reference tests: "no difference" with the smallest p, or
    which measures differ and, within them, the schemes the reference tests declare (``effect``
    words the reference's value and each declared scheme's direction and value)."""
    if omnibus is None or omnibus.empty:
        return []
    valid = omnibus[omnibus.p.notna()]
    if valid.empty:
        return [f"No test of {what} across schemes: fewer than 2 schemes have 2 or more seeds, so a difference "
                f"between schemes is not supported by these runs."]
    m = len(valid)
    valid = valid.assign(p_adj=holm(valid.p) if m > 1 else valid.p.to_numpy()).sort_values("p", kind="mergesort")
    test = str(valid.test.iloc[0])
    differ = valid[valid.p_adj <= alpha]
    name = (lambda r: label(str(r[by]))) if by else (lambda r: what)
    holm_m = lambda r: f", Holm over {m} measures {p_text(r.p_adj)}" if m > 1 else ""  # noqa: E731
    if differ.empty:
        best = valid.iloc[0]
        if m == 1:
            return [f"No difference in {what} across schemes ({test}, {p_text(best.p)}; {int(best.k)} schemes, "
                    f"{n_text(best)})."]
        return [f"No difference across schemes in {what}: none of the {m} measures differs (smallest: {name(best)}, "
                f"{test} {p_text(best.p)}{holm_m(best)}; {int(best.k)} schemes, {n_text(best)})."]
    out = []
    if m > 1:
        out.append(f"{len(differ)} of the {m} measures of {what} differ across schemes (Holm over the measures):")
    for _, row in differ.head(limit).iterrows():
        t = tests[tests[by] == row[by]] if by and len(tests) else tests
        head = f"{name(row)[0].upper()}{name(row)[1:]} differs across schemes ({test}, {p_text(row.p)}{holm_m(row)}; " \
               f"{int(row.k)} schemes, {n_text(row)})"
        declared = t[t.declared.astype(bool)] if len(t) else t
        if len(declared):
            parts = [f"{effect.scheme(r)} (Holm {p_text(r.p_holm)}, n = {int(r.n_a)} v {int(r.n_b)})"
                     for _, r in declared.iterrows()]
            rest = t[~t.declared.astype(bool)]
            tail = ""
            if len(rest):
                lo = rest.p_holm.min()
                tail = (f"; {joined(list(rest.a))} {'shows' if len(rest) == 1 else 'show'} no difference "
                        f"(Holm p {'=' if lo == rest.p_holm.max() else '≥'} {lo:.2g})")
            out.append(f"{head}. Against the reference {reference}, {effect.reference(declared.iloc[0])} ({test_name}, "
                       f"Holm within the family): {', '.join(parts)}{tail}.")
        else:
            why = _not_reachable(t, alpha) if len(t) else f"there is no reference scheme {reference} to test against"
            if why is None:
                best = t.loc[t.p_holm.idxmin()]
                why = (f"no scheme differs from the reference {reference} after Holm within its family (smallest: "
                       f"{best.a}, Holm {p_text(best.p_holm)})")
            out.append(f"{head}, but {why}.")
    if len(differ) > limit:
        out.append(f"{len(differ) - limit} more measure{'s' if len(differ) - limit > 1 else ''} of {what} "
                   f"differ{'' if len(differ) - limit > 1 else 's'}: every test is in the details.")
    return out


@dataclass
class Effect:
    """How one quantity's reference comparison is worded: ``reference(row)`` gives the
    reference's value, ``scheme(row)`` a declared scheme's direction and value (row: one reference
    test)."""

    reference: Callable[[pd.Series], str]
    scheme: Callable[[pd.Series], str]


def mean_effect(summary: pd.DataFrame, key_column: str | None, reference: str) -> Effect:
    """Means with their t-interval, from the summary table: "0.95 [0.94, 0.96]", "xavier lower,
    0.9 [0.88, 0.92]"."""
    key = lambda r: {key_column: r[key_column]} if key_column else {}  # noqa: E731
    return Effect(lambda r: _interval(summary, key(r), reference),
                  lambda r: f"{r.a} {'higher' if r.difference > 0 else 'lower'}, {_interval(summary, key(r), r.a)}")


def emergence_effect() -> Effect:
    """Median emergence steps: "median step 1500", "orthogonal later, 3000"; a tie of medians
    is ordered by the log-rank z (z < 0: later than the reference)."""
    def scheme(r: pd.Series) -> str:
        later = r.median_a > r.median_b or (r.median_a == r.median_b and r.z < 0)
        return f"{r.a} {'later' if later else 'earlier'}, {format_ci(r.median_a, math.nan, math.nan)}"
    return Effect(lambda r: f"median step {format_ci(r.median_b, math.nan, math.nan)}", scheme)


# =============================================================================================
# RQ1.


def _emergence_words(r: pd.Series, horizon: int) -> str:
    n, k = int(r.n), int(r.emerged)
    if k == 0:
        return f"never within {horizon} steps, 0/{n} seeds"
    return f"median step {format_ci(r['median'], r.median_low, r.median_high)}, {k}/{n} seeds"


def rq1_finding(study: Study, r1: Result, threshold: float = 0.8, reference: str = REFERENCE,
                alpha: float = ALPHA) -> Finding:
    """RQ1 in sentences: which scheme emerges first and last, which never, the emergence test,
    and the end-of-training measures."""
    q = "RQ1 · Does the init scheme change training and when induction emerges?"
    out: list[str] = []
    summ = r1.tables.get("emergence_summary")
    if summ is None or summ.empty:
        out.append(f"Emergence is not measured: no run has the curve {HEADLINE_METRIC} (table metrics), so RQ1's "
                   f"emergence question is not answered here.")
    else:
        em = r1.tables.get("emergence")
        horizon = int(em.horizon.max()) if em is not None and "horizon" in em and len(em) else study.horizon
        tested = summ[~summ.scheme.isin(DONOR_SCHEMES)]
        order = scheme_order(tested)
        rows = tested.set_index("scheme")
        what = f"induction accuracy ≥ {threshold} on unambiguous targets"
        if tested.emerged.sum() == 0:
            out.append(f"Induction ({what}) does not emerge within {horizon} steps in any run "
                       f"({', '.join(order)}).")
        elif len(order) == 1:
            out.append(f"Induction ({what}) emerges under {order[0]} "
                       f"({_emergence_words(rows.loc[order[0]], horizon)}).")
        else:
            first, last = order[0], order[-1]
            out.append(f"Induction ({what}) emerges first under {first} "
                       f"({_emergence_words(rows.loc[first], horizon)}) and last under {last} "
                       f"({_emergence_words(rows.loc[last], horizon)}).")
        never = [f"{s} in {int(r.n - r.emerged)}/{int(r.n)} seeds" for s, r in rows.loc[order].iterrows()
                 if 0 < r.n - r.emerged and r.emerged > 0]
        if never:
            out.append(f"Induction does not emerge within {horizon} steps for {joined(never)} (survival curve).")

        effect = emergence_effect()
        out += compare_sentences("the emergence step", r1.tables.get("emergence_omnibus"),
                                 r1.tables.get("emergence_tests", pd.DataFrame()), effect, PAIR_NAME["logrank"],
                                 reference, alpha)
        ext = r1.tables.get("extended_runs")
        if ext is not None and len(ext):
            emerged = ext.emergence_step.notna()
            out.append(f"{len(ext)} run(s) without induction by step {study.horizon} were trained on to step "
                       f"{int(ext.last_step.max())}; {int(emerged.sum())} of them emerged there "
                       f"({joined([f'{r.run} at {int(r.emergence_step)}' for r in ext[emerged].itertuples()]) or 'none'}).")
        seeded = summ[summ.scheme.isin(DONOR_SCHEMES)]
        for _, r in seeded.iterrows():
            out.append(f"{r.scheme} starts from a trained donor and is left out of these tests "
                       f"({_emergence_words(r, horizon)}; its donor's steps are not counted).")

    final = r1.tables.get("final")
    if final is not None and len(final):
        vl = final[final.metric == "val_loss"]
        if len(vl) > 1:
            lo, hi = vl.loc[vl["mean"].idxmin()], vl.loc[vl["mean"].idxmax()]
            out.append(f"After {study.horizon} steps the mean validation loss ranges from "
                       f"{format_ci(lo['mean'], lo.ci_low, lo.ci_high)} ({lo.scheme}) to "
                       f"{format_ci(hi['mean'], hi.ci_low, hi.ci_high)} ({hi.scheme}).")
        effect = mean_effect(final, "metric", reference)
        present = [words(m) for m in FINAL_METRICS if (final.metric == m).any()]
        out += compare_sentences(f"the end-of-training {joined(present, 'and')}", r1.tables.get("final_omnibus"),
                                 r1.tables.get("final_tests", pd.DataFrame()), effect, PAIR_NAME["mean"], reference,
                                 alpha, by="metric", limit=1)
    fig = r1.figures.get("rq1_survival") or r1.figures.get("rq1_curves")
    caption = ("Fraction of each scheme's seeds emerged by step t (Kaplan–Meier; never-emerged seeds stay in the "
               "denominator)." if "rq1_survival" in r1.figures else "Training curves per scheme.")
    return Finding(q, out, fig, caption)


# =============================================================================================
# RQ2.

VIEW_ORDER = ("induction_loss", "loss", "step")


def _view(r2: Result) -> tuple[str, str, pd.DataFrame] | None:
    """The preferred matched view: loss on induction targets, then val loss, then step."""
    targets = r2.tables.get("loss_target", pd.DataFrame(columns=["view", "loss", "target"])).set_index("view")
    for key in VIEW_ORDER:
        matched = r2.tables.get(f"{key}_matched")
        if matched is None or (f"{key}_mechanism_labels" not in r2.tables and f"{key}_mechanism" not in r2.tables):
            continue
        if key == "step":
            step = matched.step.dropna()
            where = f"At step {int(step.iloc[0])} (every run at the same step)" if len(step) else "At a common step"
        else:
            which = targets.loc[key, "loss"] if key in targets.index else ("val_loss_induction" if key == "induction_loss"
                                                                           else "val_loss")
            level = float(targets.loc[key, "target"]) if key in targets.index else math.nan
            where = f"At matched {LADDER_NAMES[which]} (each run at its first checkpoint with it ≤ {level:.3g})"
        return key, where, matched
    return None


def mechanism_sentence(labels: pd.DataFrame) -> str:
    """The most common copying mechanism over runs (k/N) and, per scheme, the runs that differ."""
    n = len(labels)
    top = labels.mechanism.value_counts()
    main = max(top.index, key=lambda m: (top[m], -REPORT_ORDER.index(m) if m in REPORT_ORDER else 0))
    others = []
    for s, g in labels.groupby("scheme", sort=False):
        k = g.mechanism.value_counts()
        others += [f"{s} {MECHANISM_WORDS.get(m, m)} in {int(c)}/{len(g)}" for m, c in k.items() if m != main]
    text = (f"no run has a copying mechanism ({int(top[main])} of {n} runs)" if main == "none" else
            f"the copying mechanism is {MECHANISM_WORDS.get(main, main)} in {int(top[main])} of {n} runs")
    return text + ("; the others: " + ", ".join(others) if others else ", whatever the scheme") + " (counts of runs)"


def rq2_finding(study: Study, r2: Result, reference: str = REFERENCE, alpha: float = ALPHA) -> Finding:
    """RQ2 in sentences, at the preferred matched view: the copying mechanism per scheme and the
    mechanism features (localisation, induction heads, the circuit) compared across schemes."""
    q = "RQ2 · At similar loss, do the schemes use different mechanisms?"
    view = _view(r2)
    if view is None:
        return Finding(q, ["No mechanism tables (attention, ablation) at a matched checkpoint: RQ2 is not answered "
                           "here; the details say what is missing."])
    key, where, matched = view
    out = []
    labels = r2.tables.get(f"{key}_mechanism_labels")
    if labels is not None and len(labels):
        out.append(f"{where}, {mechanism_sentence(labels)}.")
    else:
        out.append(f"{where}: no copying-mechanism labels (table offsets).")
    if "reached" in matched.columns and not matched.reached.astype(bool).all():
        missed = matched[~matched.reached.astype(bool)]
        per = [f"{s} {len(g)}/{int((matched.scheme == s).sum())}" for s, g in missed.groupby("scheme", sort=False)]
        out.append(f"Runs that never reach this loss are not matched: {', '.join(per)}.")
    summ = r2.tables.get(f"{key}_mechanism")
    if summ is not None and len(summ):
        effect = mean_effect(summ, "feature", reference)
        out += compare_sentences("the mechanism features (localisation, induction heads, the induction circuit)",
                                 r2.tables.get(f"{key}_mechanism_omnibus"), r2.tables.get(f"{key}_mechanism_tests",
                                                                                        pd.DataFrame()),
                                 effect, PAIR_NAME["mean"], reference, alpha, by="feature")
    fig = None
    if labels is not None and len(labels):
        counts = labels.groupby(["scheme", "mechanism"]).size().rename("runs").reset_index()
        order = [s for s in study.schemes if s in set(counts.scheme)]
        fig = plots.stacked_counts(counts, "scheme", "mechanism", "runs", f"Copying mechanism per scheme: {where.removeprefix('At ')}",
                                   x_order=order, color_order=[m for m in REPORT_ORDER if m in set(counts.mechanism)],
                                   names=MECHANISM_WORDS)
    return Finding(q, out, fig, "Runs per scheme by copying mechanism at the matched checkpoint "
                                "(offsets.classify_mechanism; definitions in the details).")


# =============================================================================================
# RQ3.


def rq3_finding(study: Study, r3: Result, reference: str = REFERENCE, alpha: float = ALPHA) -> Finding:
    """RQ3 in sentences: geometry differences at the end of training and early, and whether
    early geometry predicts the emergence step."""
    q = "RQ3 · Does the init scheme change the geometry, and does early geometry predict emergence?"
    out: list[str] = []
    if "geometry_final" not in r3.tables:
        return Finding(q, ["No geometry table: RQ3 is not answered here (notebook 06 writes it)."])
    shown = None
    for key, what in (("final", "geometry at the end of training"), ("early", "early geometry")):
        summ = r3.tables.get(f"geometry_{key}")
        omni = r3.tables.get(f"geometry_{key}_omnibus")
        if summ is None or summ.empty:
            continue
        corr = r3.tables.get("early_correlation")
        if key == "early" and corr is not None and len(corr):
            what = f"early geometry (step {int(corr.step.median())})"
        effect = mean_effect(summ, "feature", reference)
        out += compare_sentences(what, omni, r3.tables.get(f"geometry_{key}_tests", pd.DataFrame()), effect,
                                 PAIR_NAME["mean"], reference, alpha, by="feature", limit=1)
        if key == "final" and omni is not None and omni.p.notna().any():
            shown = omni.loc[omni.p.idxmin(), "feature"]
    corr = r3.tables.get("early_correlation")
    fig, caption = None, ""
    if corr is None or corr.empty or corr.rho.isna().all():
        out.append("Whether early geometry predicts the emergence step is not tested (no emergence steps or no early "
                   "geometry).")
    else:
        c = corr.dropna(subset=["rho"])
        m = len(c)
        sig = c[c.p_holm <= alpha].sort_values("p_holm", kind="mergesort")
        if len(sig):
            r = sig.iloc[0]
            if math.isnan(r.rho_within):
                within = "; within schemes ρ is not computable (no spread within a scheme)."
            elif r.p_within_holm <= alpha:
                within = f"; within schemes ρ = {r.rho_within:.2f} (Holm {p_text(r.p_within_holm)})."
            else:
                within = (f"; within schemes ρ = {r.rho_within:.2f} (Holm {p_text(r.p_within_holm)}): within a scheme "
                          f"it does not predict which seed emerges first, so the pooled correlation may only reflect "
                          f"differences between schemes.")
            out.append(f"Early {words(r.feature)} (step {int(r.step)}) predicts the emergence step across runs: Spearman "
                       f"ρ = {r.rho:.2f} (permutation {p_text(r.p)}, Holm over the {m} features {p_text(r.p_holm)}, "
                       f"n = {int(r.n)} runs){within}")
            fig = r3.figures.get("rq3_early_vs_emergence")
            caption = "Early geometry against the emergence step (x: never emerged), strongest features."
        else:
            r = c.sort_values("p", kind="mergesort").iloc[0]
            out.append(f"No early geometry feature predicts the emergence step: the strongest, {words(r.feature)} "
                       f"(step {int(r.step)}), has Spearman ρ = {r.rho:.2f} (permutation {p_text(r.p)}, Holm over the "
                       f"{m} features {p_text(r.p_holm)}, n = {int(r.n)} runs).")
    out += gaussianity_sentences(study, r3)
    if fig is None and shown is not None:
        feats = last_values(r3.tables["geometry_features"])
        f_summ = r3.tables["geometry_final"]
        f_summ = f_summ[f_summ.feature == shown]
        fig = plots.interval_figure(f_summ, f"{words(shown)} at each run's last analysed step", words(shown),
                                    colors=study.colors, points=feats[feats.feature == shown])
        caption = (f"{words(shown)} per scheme at the end of training: mean and 95% t-interval over seeds, dots are "
                   f"seeds (the geometry feature with the smallest omnibus p).")
    return Finding(q, out, fig, caption)


def _family_counts(v: pd.DataFrame, part: str, schemes: Sequence[str], worst: str = "max", unit: str = "×") -> str:
    """``normal 9/9, xavier 4/9 (farthest: W_E 5.1× [4.2, 6.0])``: per scheme, the families where
    ``part`` holds, and the farthest failing one."""
    out = []
    for s in schemes:
        g = v[(v.part == part) & (v.scheme == s)]
        if g.empty:
            continue
        text = f"{s} {int((g.verdict == 'holds').sum())}/{len(g)}"
        bad = g[g.verdict != "holds"]
        if len(bad):
            r = bad.loc[bad.value.idxmax() if worst == "max" else bad.value.idxmin()]
            text += f" (farthest: {r.matrix} {format_ci(r.value, r.ci_low, r.ci_high)}{unit})"
        out.append(text)
    return joined(out)


def gaussianity_sentences(study: Study, r3: Result) -> list[str]:
    """The Gaussianity claim in four sentences, one per part, from ``rq3``'s verdicts: per scheme
    the matrix families where the part holds (95% intervals over seeds), the farthest family, and
    the depth verdict per scheme."""
    v = r3.tables.get("gaussianity_verdicts")
    c = r3.tables.get("gaussianity_claims")
    if v is None or v.empty:
        return ["The Gaussianity claim is not tested here (no gaussianity table; notebook 06 writes it)."]
    schemes = [s for s in study.schemes if (v.scheme == s).any()]
    final_step = int(v[v.part == "W_gaussian"].step.max())
    criterion = (f"KS distance to the fitted Gaussian at most {GAUSSIAN_KS_REL:g}× a Gaussian sample's of the same size, "
                 f"95% t-interval over seeds")
    out = [f"Are trained weights Gaussian whatever the init? W's entries are Gaussian-like ({criterion}) in this many "
           f"matrix families at init: {_family_counts(v, 'W_gaussian_init', schemes)}; and at the last checkpoint "
           f"(step {final_step}): {_family_counts(v, 'W_gaussian', schemes)}."]
    init_bad = v[(v.part == "W_gaussian_init") & (v.verdict == "fails")]
    if len(init_bad) and c is not None:
        r = init_bad.loc[init_bad.value.idxmax()]
        k = c[(c.claim == "W_gaussian") & (c.scheme == r.scheme) & (c.matrix == r.matrix) & (c.metric == "kurtosis")]
        at = {w: k[k.when == w] for w in ("init", "final")}
        if all(len(x) for x in at.values()):
            i, f = at["init"].iloc[0], at["final"].iloc[0]
            out[-1] += (f" The least Gaussian init, {r.scheme}'s {r.matrix}, moves from excess kurtosis "
                        f"{format_ci(i['mean'], i.ci_low, i.ci_high)} at init to {format_ci(f['mean'], f.ci_low, f.ci_high)} "
                        f"by step {int(f.step)} (0 Gaussian, −1.2 uniform).")
    out.append(f"Is what training added, ΔW = W − W₀, Gaussian? ΔW's entries are Gaussian-like in: "
               f"{_family_counts(v, 'dW_gaussian', schemes)} families.")
    iid = v[v.part == "dW_iid"]
    spiked = iid[iid.verdict == "fails"]
    out.append(f"Is ΔW i.i.d. noise? Its singular-value spectrum matches Marchenko–Pastur (largest eigenvalue within "
               f"{MP_EDGE_SPIKE:g}× the MP edge and the KS distance to MP within 2× an i.i.d. matrix's) in: "
               f"{_family_counts(v, 'dW_iid', schemes)} families"
               + (f"; where it does not, a low-rank part stands out of the noise ({len(spiked)} of {len(iid)} "
                  f"scheme × family pairs)." if len(spiked) else "."))
    depth = v[(v.part == "dW_std_depth") & (v.matrix == DEPTH_ALL)]
    if len(depth):
        groups = {verdict: [f"{r.scheme} ({format_ci(r.value, r.ci_low, r.ci_high)})" for r in g.itertuples()]
                  for verdict, g in depth.groupby("verdict", sort=False)}
        n_layers = int(c[c.claim == "dW_std_depth"].n_layers.max()) if c is not None and len(c) else 0
        parts = [f"{verdict} in {len(items)} of {len(depth)} schemes ({joined(items)})"
                 for verdict, items in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
        out.append("Does ΔW's std grow with depth? Its log2 slope over layers (mean over the layered families, 95% "
                   "t-interval over seeds) " + "; ".join(parts) + "."
                   + (" With 2 layers this is one comparison per run (layer 0 vs layer 1); the 4-layer presets "
                      "(quick4, full4) speak about depth." if n_layers == 2 else ""))
    return out


# =============================================================================================
# The section.


def study_sentence(study: Study) -> str:
    """What the answers rest on: usable runs of the expected grid, and the ones that are not."""
    status = study.status
    expected = status[status.expected.astype(bool)]
    usable = set(study.usable_runs)
    bad = status[status.status != "ok"]
    text = (f"Preset {study.preset}: {len(usable & set(expected.run))} of {len(expected)} expected runs are usable "
            f"({expected.scheme.nunique()} schemes × {len(study.seeds)} seed{'s' if len(study.seeds) != 1 else ''}, "
            f"{study.horizon} training steps each)")
    if len(bad):
        text += "; not complete: " + ", ".join(f"{r.run} ({r.status})" for r in bad.itertuples())
    extra = status[~status.expected.astype(bool)]
    if len(extra):
        text += f"; {len(extra)} extra run(s) outside the grid are used too"
    return text + ". The details below name what is wrong with each run and hold every table and test."


def findings(study: Study, r1: Result, r2: Result, r3: Result, emergence_threshold: float = 0.8,
             reference: str = REFERENCE, alpha: float = ALPHA) -> Result:
    """The report's opening section: the study in one sentence, then RQ1-3, each a few sentences
    beside its figure. Figures are returned as ``finding_rq1`` … (the report's main figures)."""
    sec = Section("Findings", key="findings")
    res = Result(sec)
    sec.text(study_sentence(study))
    items = (("rq1", rq1_finding(study, r1, emergence_threshold, reference, alpha)),
             ("rq2", rq2_finding(study, r2, reference, alpha)), ("rq3", rq3_finding(study, r3, reference, alpha)))
    rows = []
    for name, f in items:
        sec.finding(f.question, f.sentences, f.figure, f.caption)
        if f.figure is not None:
            res.figures[f"finding_{name}"] = f.figure
        rows += [dict(question=f.question, sentence=s) for s in f.sentences]
    sec.note(RULE)
    res.tables["findings"] = pd.DataFrame(rows, columns=["question", "sentence"])
    return res


__all__ = ["Finding", "findings", "rq1_finding", "rq2_finding", "rq3_finding", "compare_sentences", "p_text",
           "mechanism_sentence", "study_sentence", "RULE"]
