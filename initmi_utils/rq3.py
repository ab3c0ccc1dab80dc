"""RQ3: does the init scheme change the geometry, and does early geometry predict emergence?

- *Trajectories*: each geometry feature (residual norm and attention entropy per layer;
  effective rank, drift, weight std and kurtosis per matrix, averaged over layers/heads) over
  training, mean over seeds per scheme with a pointwise 95% t-interval band.
- *Scheme differences* at the early checkpoint (``early_fraction`` of training) and at each
  run's last analysed step: per feature a Kruskal–Wallis test across schemes, then each scheme
  against the reference scheme (permutation test on the difference of means, exact at 5 v 5),
  Holm within the base family and within the seeded family (``inference``). With ~40 features
  the report lists reference-family rows only for features whose omnibus is significant; every
  feature and every scheme pair is in the CSVs.
- *Early geometry vs emergence*: Spearman ρ between each feature's early value and the
  restricted emergence step (never = horizon) across runs, pooled and within schemes (ranks
  centred per scheme, permutations within schemes: ``stats.spearman_permutation``); Holm over
  features.
- *Gaussianity of the weights* (table ``gaussianity``, ``initmi_utils.gaussianity``): the three
  parts of the claim "trained weights are Gaussian whatever the init; ΔW = W − W₀ is i.i.d.
  Gaussian noise; ΔW's std grows with depth", per scheme and matrix family with t-intervals over
  seeds (``gaussianity.claims``), and a verdict per part (``gaussianity_verdicts``; thresholds
  below, each tested on planted matrices in ``tests/test_rq3_gaussianity.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from initmi_utils import plots
from initmi_utils.gaussianity import claims, depth_trend, distance_curves
from initmi_utils.gaussianity_plots import distance_figure
from initmi_utils.inference import MEAN_CI, PAIR_NAME, REFERENCE, band_summary, format_ci, scheme_tests, summarise
from initmi_utils.report import Section
from initmi_utils.stats import ALPHA, holm, spearman_permutation, t_interval
from initmi_utils.study import Result, Study, feature_table, section_table, seeds_note, show_scheme_tests

BAND_LEGEND = "scheme (band: 95% t-interval of the mean over seeds)"

GEOMETRY_METRICS = ("resid_norm", "attn_entropy", "effective_rank", "drift", "weight_std", "weight_kurtosis")
GEOMETRY_LAYERED = ("resid_norm", "attn_entropy")  # shown per layer; the others per matrix, averaged over layers/heads


def early_values(features: pd.DataFrame, horizon: int, fraction: float = 0.1) -> pd.DataFrame:
    """Each run's feature values at the analysed step nearest to ``fraction * horizon`` (ties:
    the earlier step). Steps analysed in every run are preferred, so that all runs are read at
    the same step (adaptive checkpoints differ between runs); the ``step`` column says which."""
    if features.empty:
        return features
    target = fraction * horizon
    per_run = {run: set(g.step.unique()) for run, g in features.groupby("run")}
    common = set.intersection(*per_run.values())
    rows = []
    for run, g in features.groupby("run"):
        steps = np.array(sorted(common or per_run[run]))
        s = int(steps[np.argmin(np.abs(steps - target) + 1e-9 * steps)])
        rows.append(g[g.step == s])
    return pd.concat(rows, ignore_index=True)


def early_geometry_correlation(early: pd.DataFrame, em: pd.DataFrame, n_perm: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per geometry feature: Spearman correlation of its early value with the restricted emergence
    step across runs (pooled), and within schemes; permutation p-values, Holm over features."""
    d = early.merge(em[["run", "restricted"]], on="run")
    rows = []
    for f, g in d.groupby("feature", sort=False):
        rho, p, n = spearman_permutation(g.value, g.restricted, n_perm=n_perm, seed=seed)
        rho_w, p_w, _ = spearman_permutation(g.value, g.restricted, strata=g.scheme, n_perm=n_perm, seed=seed)
        rows.append(dict(feature=f, step=int(g.step.median()), n=n, rho=rho, p=p, rho_within=rho_w, p_within=p_w))
    out = pd.DataFrame(rows, columns=["feature", "step", "n", "rho", "p", "rho_within", "p_within"])
    out.insert(5, "p_holm", holm(out.p) if len(out) else [])
    out["p_within_holm"] = holm(out.p_within) if len(out) else []
    return out.sort_values("p", na_position="last").reset_index(drop=True)


def last_values(features: pd.DataFrame) -> pd.DataFrame:
    """Each run's feature values at its last analysed step."""
    if features.empty:
        return features
    return features[features.step == features.groupby("run").step.transform("max")].reset_index(drop=True)


def geometry_tests(values: pd.DataFrame, schemes, reference: str = REFERENCE, n_perm: int = 10_000, seed: int = 0,
                   alpha: float = ALPHA) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per feature, at one checkpoint per run: (summary per scheme with t-intervals, Kruskal–Wallis
    omnibus, reference families, all pairs)."""
    values = values[values.groupby("feature").value.transform(lambda v: v.notna().any())]
    summ = summarise(values, ["feature", "scheme"])
    omni, ref, pairs = scheme_tests(values, schemes, by="feature", reference=reference, n_perm=n_perm, seed=seed,
                                    alpha=alpha)
    return summ, omni, ref, pairs


def _geometry_view(study: Study, sec: Section, res: Result, key: str, label: str, values: pd.DataFrame,
                   reference: str, n_perm: int, seed: int, alpha: float) -> None:
    summ, omni, ref, pairs = geometry_tests(values, study.schemes, reference, n_perm, seed, alpha)
    res.tables.update({f"geometry_{key}": summ, f"geometry_{key}_omnibus": omni, f"geometry_{key}_tests": ref,
                       f"geometry_{key}_tests_all_pairs": pairs})
    steps = sorted(int(s) for s in values.step.unique())
    sec.heading(f"Geometry per scheme, {label} (steps used: {steps})")
    wide = summ.assign(cell=[format_ci(*r) + f" (n={n})" for r, n in
                             zip(summ[["mean", "ci_low", "ci_high"]].values, summ.n)]) \
        .pivot_table(index="feature", columns="scheme", values="cell", aggfunc="first", sort=False)
    wide = wide[[s for s in study.schemes if s in wide.columns]].reset_index()
    sec.table(wide, f"Geometry features {label}: mean [{MEAN_CI} of the mean over seeds] (n seeds).")
    show_scheme_tests(sec, omni, ref, f"Geometry {label}", PAIR_NAME["mean"], f"geometry_{key}_tests_all_pairs",
                      alpha, by="feature", only_significant_omnibus=True)


# =============================================================================================
# Gaussianity of the weights: the claim's parts and their verdicts.

GAUSSIAN_KS_REL = 2.0
"""Entries count as Gaussian when their KS distance to the fitted Gaussian is at most twice a
Gaussian sample's of the same size (``ks_rel <= 2``). A Gaussian sample's ``ks_rel`` has mean 1
and a spread of about 0.3, so 2 is about three spreads above it; uniform entries give 6-23 at the
study's sizes, Student-t with 10 degrees of freedom (excess kurtosis 1) about 6."""
MP_KS_REL_IID = 2.0
"""A spectrum counts as Marchenko-Pastur when its KS distance to MP is at most twice an i.i.d.
Gaussian matrix's of the same shape (``mp_ks_rel <= 2``)."""
MP_EDGE_SPIKE = 1.2
"""A matrix has a low-rank part standing out of the noise when its largest MP eigenvalue exceeds
the MP edge by 20% (``mp_edge_ratio > 1.2``). An i.i.d. matrix of the study's shapes sits at
0.9-1.0 (the edge fluctuates by about ``p^(-2/3)``, 4% at p = 128); a rank-one part above the
detection threshold lifts it to 1.5 and more."""
DEPTH_ALL = "all layered"  # the depth trend pooled over a run's layered families (mean of their slopes)


def _above_below(mean: float, lo: float, hi: float, n: int, threshold: float) -> str:
    """``below`` when the value is at most ``threshold`` (its whole 95% interval, or the value
    itself with one seed), ``above`` when it exceeds it likewise, ``unclear`` when the interval
    holds the threshold."""
    if n < 2 or not math.isfinite(lo):
        return "below" if mean <= threshold else "above" if mean > threshold else "unclear"
    return "below" if hi <= threshold else "above" if lo > threshold else "unclear"


def depth_by_scheme(table: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """The depth part pooled over families: per run, the mean over its layered families of
    ``gaussianity.depth_trend``'s slope of log2(ΔW std) on the layer, at its last checkpoint; per
    scheme its t-interval over seeds and the verdict ``grows`` / ``shrinks`` / ``no clear trend`` /
    ``one seed``, as ``gaussianity.claims`` gives per family. Rows as ``claims``, ``matrix`` is
    ``DEPTH_ALL``."""
    t = table[(table.weights == "dW") & (table.metric == "std") & (table.layer >= 0)]
    t = t[t.step == t.groupby("run").step.transform("max")]
    slopes = []
    for (scheme, run), g in t.groupby(["scheme", "run"], sort=True):
        per_family = [depth_trend(f.layer, f.value)[0] for _, f in g.groupby("matrix")]
        slopes.append(dict(scheme=scheme, run=run, step=int(g.step.max()), slope=float(np.nanmean(per_family)),
                           n_layers=int(g.layer.nunique())))
    rows = []
    for scheme, g in pd.DataFrame(slopes, columns=["scheme", "run", "step", "slope", "n_layers"]).groupby("scheme"):
        mean, lo, hi = t_interval(g.slope.values, level)
        verdict = ("one seed" if not math.isfinite(lo) else "grows" if lo > 0 else "shrinks" if hi < 0
                   else "no clear trend")
        rows.append(dict(claim="dW_std_depth", scheme=scheme, matrix=DEPTH_ALL, metric="depth_slope", when="final",
                         step=int(g.step.max()), mean=mean, ci_low=lo, ci_high=hi, n=int(g.slope.notna().sum()),
                         n_layers=int(g.n_layers.max()), verdict=verdict))
    return pd.DataFrame(rows, columns=["claim", "scheme", "matrix", "metric", "when", "step", "mean", "ci_low",
                                       "ci_high", "n", "n_layers", "verdict"])


def gaussianity_verdicts(claim_rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (part, scheme, matrix family): does that part of the claim hold there?

    Parts (``claims`` rows they read, verdicts ``holds`` / ``fails`` / ``unclear``):

    - ``W_gaussian_init``, ``W_gaussian``: W's ``ks_rel`` at step 0 / at the last checkpoint is at
      most ``GAUSSIAN_KS_REL`` (its 95% interval over seeds below it: holds; above: fails);
    - ``dW_gaussian``: the same of ΔW at the last checkpoint;
    - ``dW_iid``: ΔW's spectrum is Marchenko-Pastur: fails when ``mp_edge_ratio``'s interval lies
      above ``MP_EDGE_SPIKE`` or ``mp_ks_rel``'s above ``MP_KS_REL_IID``; holds when both lie below;
    - ``dW_std_depth``: ``grows`` / ``shrinks`` / ``no clear trend`` / ``one seed``, the verdict of
      the depth slope (per family from ``claims``, pooled over families from ``depth_by_scheme``).

    Columns ``part, scheme, matrix, verdict, value, ci_low, ci_high, n, step`` (``value`` the
    deciding metric's mean: ks_rel, mp_edge_ratio or the depth slope).
    """
    columns = ["part", "scheme", "matrix", "verdict", "value", "ci_low", "ci_high", "n", "step"]
    if claim_rows.empty:
        return pd.DataFrame(columns=columns)
    c = claim_rows.set_index(["claim", "scheme", "matrix", "metric", "when"])
    rows = []
    for part, claim, weights_when in (("W_gaussian_init", "W_gaussian", "init"), ("W_gaussian", "W_gaussian", "final"),
                                      ("dW_gaussian", "dW_gaussian", "final")):
        sel = claim_rows[(claim_rows.claim == claim) & (claim_rows.metric == "ks_rel") & (claim_rows.when == weights_when)]
        for r in sel.itertuples(index=False):
            side = _above_below(r.mean, r.ci_low, r.ci_high, r.n, GAUSSIAN_KS_REL)
            rows.append(dict(part=part, scheme=r.scheme, matrix=r.matrix,
                             verdict={"below": "holds", "above": "fails"}.get(side, "unclear"), value=r.mean,
                             ci_low=r.ci_low, ci_high=r.ci_high, n=r.n, step=r.step))
    edges = claim_rows[(claim_rows.claim == "dW_iid") & (claim_rows.metric == "mp_edge_ratio")]
    for r in edges.itertuples(index=False):
        edge = _above_below(r.mean, r.ci_low, r.ci_high, r.n, MP_EDGE_SPIKE)
        key = ("dW_iid", r.scheme, r.matrix, "mp_ks_rel", "final")
        ks = _above_below(*c.loc[key, ["mean", "ci_low", "ci_high", "n"]], MP_KS_REL_IID) if key in c.index \
            else "unclear"
        verdict = "fails" if "above" in (edge, ks) else "holds" if edge == ks == "below" else "unclear"
        rows.append(dict(part="dW_iid", scheme=r.scheme, matrix=r.matrix, verdict=verdict, value=r.mean,
                         ci_low=r.ci_low, ci_high=r.ci_high, n=r.n, step=r.step))
    depth = claim_rows[(claim_rows.claim == "dW_std_depth") & (claim_rows.metric == "depth_slope")]
    rows += [dict(part="dW_std_depth", scheme=r.scheme, matrix=r.matrix, verdict=r.verdict, value=r.mean,
                  ci_low=r.ci_low, ci_high=r.ci_high, n=r.n, step=r.step) for r in depth.itertuples(index=False)]
    return pd.DataFrame(rows, columns=columns)


def _gaussianity_view(study: Study, sec: Section, res: Result) -> None:
    table = study.table("gaussianity")
    sec.heading("Gaussianity of the weights (W, and ΔW = W − W₀)")
    if table.empty:
        sec.note("No gaussianity table (notebook 06 writes it): the Gaussianity claim is not tested here.", "warning")
        return
    sec.text(seeds_note(study, table, "Runs with a gaussianity table"))
    c = claims(table)
    c = pd.concat([c, depth_by_scheme(table)], ignore_index=True)
    verdicts = gaussianity_verdicts(c)
    res.tables.update({"gaussianity_claims": c, "gaussianity_verdicts": verdicts})
    curves = distance_curves(table, "ks_rel", by="scheme")
    fig = distance_figure(curves, "Distance to the fitted Gaussian over training, per scheme and matrix family",
                          colors=study.colors)
    res.figures["rq3_gaussianity_ks"] = fig
    sec.figure(fig, f"KS distance of the entries to their fitted Gaussian, as a multiple of a Gaussian sample's of the "
                    f"same size (1, dashed: as Gaussian as Gaussian noise; the verdicts use ≤ {GAUSSIAN_KS_REL:g}); "
                    f"mean over layers, then over seeds with a {MEAN_CI} band.")
    counts = (verdicts[verdicts.matrix != DEPTH_ALL].groupby(["part", "scheme"]).verdict
              .agg(lambda v: ", ".join(f"{k} {n}" for k, n in v.value_counts().items())).unstack("scheme"))
    counts = counts.reindex(columns=[s for s in study.schemes if s in counts.columns]).reset_index()
    sec.table(counts, "Verdicts per part of the claim: number of matrix families per verdict, per scheme.")
    sec.table(verdicts, "Every verdict: part, scheme, matrix family, the deciding value (ks_rel, mp_edge_ratio or "
                        "the log2 slope of ΔW's std per layer) with its 95% t-interval over seeds.")


def rq3(study: Study, em: pd.DataFrame | None, early_fraction: float = 0.1, n_boot: int | None = None,
        n_perm: int = 10_000, seed: int = 0, reference: str = REFERENCE, alpha: float = ALPHA) -> Result:
    """RQ3's section. ``n_boot`` is unused (intervals are t-intervals now); it is accepted so
    that existing calls keep working."""
    sec = Section("RQ3 · Geometry", folded=True)
    res = Result(sec)
    geo = section_table(study, sec, "geometry", ["resid_norm", "effective_rank", "drift"], "Runs with a geometry table")
    if geo.empty:
        return res
    feats = feature_table(geo[(geo.step >= 0) & geo.metric.isin(GEOMETRY_METRICS)], ["matrix"], GEOMETRY_LAYERED)
    res.tables["geometry_features"] = feats
    for metric, g in feats.groupby("metric", sort=False):
        summ = band_summary(g, extra=["feature"])
        panels = list(dict.fromkeys(g.feature))
        fig = plots.band_grid(summ, f"{metric} over training per scheme", panel="feature", panels=panels,
                              colors=study.colors, n_cols=min(3, len(panels)))
        fig.update_layout(legend_title=BAND_LEGEND)
        res.figures[f"rq3_{metric}"] = fig
        sec.figure(fig, f"{metric}: mean over seeds with a pointwise {MEAN_CI} band (averaged over heads/layers "
                        f"unless the panel names one).")
    early = early_values(feats, study.horizon, early_fraction)
    _geometry_view(study, sec, res, "early", f"early ({early_fraction:.0%} of training)", early, reference, n_perm,
                   seed, alpha)
    _geometry_view(study, sec, res, "final", "at each run's last analysed step", last_values(feats), reference,
                   n_perm, seed, alpha)
    _gaussianity_view(study, sec, res)
    if em is None or em.empty:
        sec.note("No emergence steps (metrics table missing): the early-geometry correlation is skipped.", "warning")
        return res
    corr = early_geometry_correlation(early, em, n_perm=n_perm, seed=seed)
    res.tables["early_correlation"] = corr
    steps = sorted(int(s) for s in early.step.unique())
    sec.heading(f"Early geometry ({early_fraction:.0%} of training, steps used: {steps}) vs emergence step")
    sec.table(corr, "Spearman ρ between each early geometry feature and the restricted emergence step (never = "
                    "horizon), pooled over runs and within schemes (ranks centred per scheme, permutations within "
                    "schemes); p from permutations, Holm over features.")
    top = corr.dropna(subset=["rho"]).head(4).feature.tolist()
    if top:
        d = early.merge(em[["run", "restricted", "emerged"]], on="run")
        fig = make_subplots(rows=1, cols=len(top), subplot_titles=top)
        for i, f in enumerate(top):
            for s, g in d[d.feature == f].groupby("scheme", sort=False):
                fig.add_trace(go.Scatter(x=g.value, y=g.restricted, mode="markers", name=s, legendgroup=s,
                                         showlegend=i == 0, marker=dict(color=study.colors.get(s), size=9,
                                                                        symbol=np.where(g.emerged, "circle", "x"))),
                              row=1, col=i + 1)
        fig.update_yaxes(title_text="emergence step (x: never)", col=1)
        fig.update_layout(template=plots.TEMPLATE, title="Early geometry vs emergence (strongest features)")
        res.figures["rq3_early_vs_emergence"] = fig
        sec.figure(fig)
    return res


