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
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from initmi_utils import plots
from initmi_utils.inference import MEAN_CI, PAIR_NAME, REFERENCE, band_summary, format_ci, scheme_tests, summarise
from initmi_utils.report import Section
from initmi_utils.stats import ALPHA, holm, spearman_permutation
from initmi_utils.study import Result, Study, feature_table, section_table, show_scheme_tests

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


