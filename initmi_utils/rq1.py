"""RQ1: does the init scheme change how fast, and whether, induction emerges?

- *Training curves*: the mean over seeds per scheme at every evaluated step with its pointwise
  95% t-interval (``inference.band_summary``).
- *Emergence step*: the first evaluated step with ``val_acc_induction`` ≥ the threshold; a run
  that never gets there is **censored at the horizon**, not dropped. Emergence steps are skewed
  (most seeds close together, some late, some never), so each scheme is summarised by its
  **median with the order-statistic interval** ``[min, max]`` (level 1 - 2·0.5ⁿ: 93.75% at
  n = 5; an end on a never-emerged run is "not reached"), next to the *restricted mean* (never =
  horizon) with its t-interval and the fraction emerged. The survival-style curve (fraction
  emerged by step t) is the Kaplan–Meier estimate (``scipy.stats.ecdf``), never-emerged seeds
  staying in the denominator.
- *Tests on emergence*: an omnibus permutation one-way test on the restricted steps across all
  schemes, then every scheme against the reference scheme (default ``normal``) with the
  log-rank test (exact permutation p), Holm within the base family and within the seeded family.
  All scheme pairs go to ``emergence_tests_all_pairs.csv`` only.
- *Extended runs*: a run that had not emerged by the horizon may have been trained on (``train``'s
  ``extend_to``). Emergence then reads the whole metrics table up to the extension's end (the
  *emergence horizon*), but only where that censors every run alike (``common_censoring``): a
  definition under which some run without an event by the horizon was not followed further (it
  emerged under the headline definition, so it was not extended) is read up to the horizon.
  Everything else is step-matched and cut at the horizon (``study.load_study``).
- *End of training* (``val_loss``, ``val_acc_induction``, ``val_logit_diff`` at each run's last
  step up to the horizon): mean with t-interval; Kruskal–Wallis across schemes, then the reference families with
  permutation tests on the difference of means.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from initmi_utils import plots
from initmi_utils.behavior import (EMERGENCE_DEFINITIONS, HEADLINE_METRIC, emergence_step, emergence_steps,
                                   evaluation_grid)
from initmi_utils.inference import (MEAN_CI, MEAN_CI_SENTENCE, MEDIAN_CI_SENTENCE, PAIR_NAME, REFERENCE, band_summary,
                                    format_ci, format_level, scheme_tests, summarise)
from initmi_utils.config import PRESETS, experiment
from initmi_utils.model import flops_per_token
from initmi_utils.report import Section
from initmi_utils.seeded import DonorMissing, donor_compute
from initmi_utils.stats import ALPHA, emerged_fraction, median_interval, t_interval
from initmi_utils.study import Result, Study, final_values, section_table, show_scheme_tests

CURVE_METRICS = ("val_loss", "train_loss", "val_acc_induction", "rep_acc_induction", "val_logit_diff", "induction_score")
FINAL_METRICS = ("val_loss", "val_acc_induction", "val_logit_diff")
BAND_LEGEND = "scheme (band: 95% t-interval of the mean over seeds)"


def emergence(metrics: pd.DataFrame, threshold: float, horizon: int, metric: str = HEADLINE_METRIC) -> pd.DataFrame:
    """Per run: emergence step (nan = never), ``emerged``, ``restricted`` (never = horizon) and
    ``time`` (never = +inf: censored, the form the log-rank test and the median read)."""
    rows = []
    for (run, scheme, seed), g in metrics[metrics.metric == metric].sort_values("step").groupby(
            ["run", "scheme", "seed"], sort=False):
        step = emergence_step(g.step.tolist(), g.value.tolist(), threshold)
        never = math.isnan(step)
        rows.append(dict(run=run, scheme=scheme, seed=int(seed), emergence_step=step, emerged=not never,
                         restricted=horizon if never else step, time=math.inf if never else step))
    return pd.DataFrame(rows, columns=["run", "scheme", "seed", "emergence_step", "emerged", "restricted", "time"])


def emergence_by_definition(metrics: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """``emergence``'s columns plus ``definition``, one block per definition of
    ``behavior.EMERGENCE_DEFINITIONS`` (thresholds 0.5 / 0.8 / 0.9 on unambiguous targets, 0.8 on all
    targets, and the threshold-free sigmoid midpoint); never = censored at the horizon."""
    rows = []
    for (run, scheme, seed), g in metrics.groupby(["run", "scheme", "seed"], sort=False):
        for name, step in emergence_steps(g, horizon).items():
            never = math.isnan(step)
            rows.append(dict(definition=name, run=run, scheme=scheme, seed=int(seed), emergence_step=step,
                             emerged=not never, restricted=horizon if never else step,
                             time=math.inf if never else step))
    return pd.DataFrame(rows, columns=["definition", "run", "scheme", "seed", "emergence_step", "emerged", "restricted",
                                       "time"])


def common_censoring(em: pd.DataFrame, last_step: dict[str, int], horizon: int, extended_to: int
                     ) -> tuple[pd.DataFrame, int]:
    """``(em, h)``: emergence rows (``emergence`` / one definition of ``emergence_by_definition``,
    computed on the whole metrics table) read up to a horizon ``h`` at which every run is censored
    alike. ``h = extended_to`` when every run without an event by ``horizon`` was followed to
    ``extended_to`` (``last_step``: each run's last evaluated step); otherwise ``h = horizon`` and
    events after it become censored. The censored form (``time = +inf``, ``restricted = h``)
    means "censored at h" for every run, which the log-rank test and the Kaplan–Meier curve read."""
    if extended_to <= horizon or em.empty:
        return em.assign(restricted=em.restricted.clip(upper=horizon)), horizon
    late = em[~em.emerged | (em.emergence_step > horizon)]
    if all(last_step.get(r, 0) >= extended_to for r in late.run):
        return em.assign(restricted=np.where(em.emerged, em.emergence_step, extended_to)), extended_to
    cut = em.emerged & (em.emergence_step > horizon)
    out = em.copy()
    out.loc[cut, "emergence_step"] = math.nan
    out.loc[cut, "emerged"] = False
    out["restricted"] = np.where(out.emerged, out.emergence_step, horizon)
    out["time"] = np.where(out.emerged, out.emergence_step, math.inf)
    return out, horizon


def scheme_order(summary: pd.DataFrame) -> list[str]:
    """Schemes from first to last to emerge: by median step (Kaplan–Meier median: with every
    censoring at the horizon it is the plain median with never = +inf), ties by restricted mean."""
    return list(summary.sort_values(["median", "restricted_mean"], kind="mergesort").scheme)


def ordering_swaps(summaries: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Pairs of schemes that two definitions order oppositely *with non-overlapping intervals in
    both*: under one, a's order-statistic interval lies entirely before b's, under the other
    entirely after. That is what "the definition decides the answer" means; a swap of two schemes
    whose intervals overlap is noise. Empty = the ordering holds under every definition."""
    def before(s: pd.DataFrame, a: str, b: str) -> bool | None:
        ra, rb = s.set_index("scheme").loc[a], s.set_index("scheme").loc[b]
        if ra.median_high < rb.median_low:
            return True
        if rb.median_high < ra.median_low:
            return False
        return None

    rows = []
    names = list(summaries)
    for i, d1 in enumerate(names):
        for d2 in names[i + 1:]:
            s1, s2 = summaries[d1], summaries[d2]
            common = [s for s in s1.scheme if s in set(s2.scheme)]
            for j, a in enumerate(common):
                for b in common[j + 1:]:
                    x, y = before(s1, a, b), before(s2, a, b)
                    if x is not None and y is not None and x != y:
                        rows.append(dict(definition_a=d1, definition_b=d2, scheme_a=a, scheme_b=b))
    return pd.DataFrame(rows, columns=["definition_a", "definition_b", "scheme_a", "scheme_b"])


def _times(g: pd.DataFrame) -> np.ndarray:
    return np.where(g.emerged.to_numpy(bool), g.emergence_step.to_numpy(float), np.inf)


def emergence_summary(em: pd.DataFrame, schemes: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """Per scheme: n, emerged k, fraction emerged; the median emergence step (inf = not reached:
    half or more never emerged) with its order-statistic interval (``median_low``,
    ``median_high``: inf = not reached; ``median_level``: its coverage, 1 - 2·0.5ⁿ for [min, max]);
    the restricted mean (never = horizon) and the mean step of the emerged runs, each with its
    t-interval."""
    rows = []
    for s in schemes:
        g = em[em.scheme == s]
        if g.empty:
            continue
        med = median_interval(_times(g), level)
        m_e = t_interval(g.loc[g.emerged, "emergence_step"], level)
        m_r = t_interval(g["restricted"], level)
        rows.append(dict(scheme=s, n=len(g), emerged=int(g.emerged.sum()), fraction_emerged=g.emerged.mean(),
                         median=med[0], median_low=med[1], median_high=med[2], median_level=med[3],
                         restricted_mean=m_r[0], restricted_low=m_r[1], restricted_high=m_r[2],
                         mean_emerged=m_e[0], mean_emerged_low=m_e[1], mean_emerged_high=m_e[2]))
    return pd.DataFrame(rows)


def survival_curves(em: pd.DataFrame, horizon: int, schemes: Sequence[str]) -> pd.DataFrame:
    """Kaplan–Meier fraction of each scheme's seeds emerged by step t (``stats.emerged_fraction``;
    never-emerged seeds are censored at the horizon and stay counted)."""
    rows = []
    for s in schemes:
        g = em[em.scheme == s]
        if g.empty:
            continue
        steps = sorted({0, horizon, *g.loc[g.emerged, "emergence_step"].astype(int)})
        frac = emerged_fraction(_times(g), steps, horizon)
        for t, f in zip(steps, frac):
            rows.append(dict(scheme=s, step=t, fraction_emerged=float(f), n=len(g), n_never=int((~g.emerged).sum())))
    return pd.DataFrame(rows, columns=["scheme", "step", "fraction_emerged", "n", "n_never"])


def emergence_tests(em: pd.DataFrame, schemes: Sequence[str], reference: str = REFERENCE, n_perm: int = 10_000,
                    seed: int = 0, alpha: float = ALPHA) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(omnibus, reference families, all pairs) for the emergence step: permutation one-way test
    on the restricted steps, then log-rank (exact permutation p) against ``reference``."""
    return scheme_tests(em, schemes, value="time", method="logrank", reference=reference, n_perm=n_perm, seed=seed,
                        alpha=alpha, omnibus="permutation", omnibus_value="restricted")


def final_tests(metrics: pd.DataFrame, schemes: Sequence[str], reference: str = REFERENCE, n_perm: int = 10_000,
                seed: int = 0, alpha: float = ALPHA) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(summary per metric and scheme with t-intervals, omnibus, reference families, all pairs)
    for the end-of-training values of ``FINAL_METRICS``; empty frames when none is there."""
    fv = pd.concat([final_values(metrics, m).assign(metric=m) for m in FINAL_METRICS], ignore_index=True)
    fv = fv[fv.value.notna()]
    if fv.empty:
        return pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    rank = {s: i for i, s in enumerate(schemes)}
    summ = pd.concat([summarise(g.sort_values("scheme", key=lambda c: c.map(rank)), "scheme").assign(metric=m)
                      for m, g in fv.groupby("metric", sort=False)], ignore_index=True)
    omni, ref, pairs = scheme_tests(fv, schemes, by="metric", reference=reference, n_perm=n_perm, seed=seed,
                                    alpha=alpha)
    return summ, omni, ref, pairs


def compute_matched(study: Study, em: pd.DataFrame) -> pd.DataFrame:
    """The seeded runs' emergence against total compute: the student's emergence step plus the
    steps of its chosen donor (``seeded.donor_compute``), and the same in training FLOPs
    (``model.flops_per_token`` x tokens; the donor's and the student's per-step FLOPs differ).
    Rows only for seeded runs whose donor choice is on disk (or in the published results'
    manifest); ``total_steps_all_candidates`` adds the donors tried and not chosen (the policy's
    whole cost)."""
    rows = []
    for r in em[em.scheme == "seeded"].itertuples(index=False):
        cfg = experiment(study.preset, "seeded", int(r.seed))
        if study.manifest is not None:  # published results: the donor recorded at publication
            d = study.manifest["runs"].get(r.run, {}).get("donor")
            if not d:
                continue
        else:
            try:
                d = donor_compute(cfg, study.root)
            except DonorMissing:
                continue
        student = flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.batch_size * cfg.data.seq_len
        step = r.emergence_step
        rows.append(dict(run=r.run, seed=int(r.seed), donor_seed=d["donor_seed"], donor_steps=d["steps"],
                         emergence_step=step, total_steps=d["steps"] + step,
                         total_steps_all_candidates=d["total_steps"] + step,
                         total_flops=d["flops"] + step * student, student_flops_per_step=student))
    return pd.DataFrame(rows, columns=["run", "seed", "donor_seed", "donor_steps", "emergence_step", "total_steps",
                                       "total_steps_all_candidates", "total_flops", "student_flops_per_step"])


def _robustness(study: Study, sec: Section, res: Result, metrics: pd.DataFrame, last_step: dict[str, int]) -> None:
    """Emergence under every definition, the scheme order under each, and whether any two schemes
    with non-overlapping intervals swap between definitions."""
    raw = emergence_by_definition(metrics, study.emergence_horizon)
    parts, horizons = [], {}
    for d in EMERGENCE_DEFINITIONS:
        part, horizons[d] = common_censoring(raw[raw.definition == d], last_step, study.horizon,
                                             study.emergence_horizon)
        parts.append(part.assign(horizon=horizons[d]))
    byd = pd.concat(parts, ignore_index=True)
    summaries = {d: emergence_summary(byd[byd.definition == d], study.schemes) for d in EMERGENCE_DEFINITIONS}
    swaps = ordering_swaps(summaries)
    table = pd.concat([s.assign(definition=d) for d, s in summaries.items()], ignore_index=True)
    res.tables.update(emergence_definitions=byd, emergence_definition_summary=table, emergence_ordering_swaps=swaps)
    sec.heading("Does the definition of emergence decide the answer?")
    rows = [{"definition": d, "read up to step": horizons[d], "order (first to emerge → last)": " < ".join(scheme_order(s)),
             **{sch: format_ci(*r) for sch, r in zip(s.scheme, s[["median", "median_low", "median_high"]].values)}}
            for d, s in summaries.items()]
    sec.table(pd.DataFrame(rows), f"Median emergence step [order-statistic interval] per scheme under each definition "
                                  f"(the first is the headline); 'not reached' = half or more of the seeds never emerged.")
    if swaps.empty:
        sec.text("No two schemes whose intervals do not overlap swap order between any two definitions: the "
                 "ordering holds under every definition.")
    else:
        sec.text(f"{len(swaps)} pair(s) of schemes swap order between definitions with non-overlapping intervals in "
                 f"both: the definition decides part of the answer.")
        sec.table(swaps, "Swaps between definitions (schemes whose intervals do not overlap under either).")


def rq1(study: Study, emergence_threshold: float = 0.8, n_boot: int | None = None, n_perm: int = 10_000,
        seed: int = 0, reference: str = REFERENCE, alpha: float = ALPHA) -> Result:
    """RQ1's section. ``n_boot`` is unused (intervals are t- and order-statistic intervals now);
    it is accepted so that existing calls keep working."""
    sec = Section("RQ1 · Training and emergence", folded=True)
    res = Result(sec)
    metrics = section_table(study, sec, "metrics", ["val_loss", "val_acc_induction"], "Runs with completed training")
    if metrics.empty:
        return res

    present = [m for m in CURVE_METRICS if (metrics.metric == m).any()]
    curves = band_summary(metrics[metrics.metric.isin(present)], extra=["metric"])
    res.tables["curves"] = curves
    fig = plots.band_grid(curves, f"Training curves per scheme ({study.preset})", panels=present, colors=study.colors)
    fig.update_layout(legend_title=BAND_LEGEND)
    res.figures["rq1_curves"] = fig
    sec.figure(fig, f"Mean over seeds per scheme; band = pointwise {MEAN_CI} of the mean over the seeds evaluated at "
                    f"that step; legend gives n seeds.")

    if (metrics.metric == HEADLINE_METRIC).any():
        # every run's evaluation steps, past the horizon for runs trained on (extended)
        grid = evaluation_grid(study.extended_metrics, PRESETS[study.preset].train.eval_every)
        last_step = grid.groupby("run").step.max().to_dict()
        em, horizon = common_censoring(emergence(grid, emergence_threshold, study.emergence_horizon), last_step,
                                       study.horizon, study.emergence_horizon)
        em = em.assign(horizon=horizon)
        summ = emergence_summary(em, study.schemes)
        surv = survival_curves(em, horizon, study.schemes)
        # A seeded run starts from a trained donor: its student steps are not comparable, so it
        # is left out of the step-matched emergence tests (its donor's compute is not counted).
        tested = [s for s in study.schemes if s != "seeded"]
        omni, tests, pairs = emergence_tests(em[em.scheme.isin(tested)], tested, reference, n_perm, seed, alpha)
        res.tables.update(emergence=em, emergence_summary=summ, survival=surv, emergence_omnibus=omni,
                          emergence_tests=tests, emergence_tests_all_pairs=pairs)
        sec.heading(f"Emergence: first evaluated step with induction accuracy ≥ {emergence_threshold} on unambiguous "
                    f"targets (the query token occurs once before it)")
        ext = study.extended_runs
        if len(ext):
            ext = ext.merge(em[["run", "emergence_step"]], on="run", how="left")
            res.tables["extended_runs"] = ext
            sec.text(f"{len(ext)} run(s) had not emerged by the horizon ({study.horizon} steps) and were trained on to "
                     f"step {study.emergence_horizon}: " + ", ".join(
                         f"{r.run} ({'emerged at ' + str(int(r.emergence_step)) if r.emergence_step == r.emergence_step else 'never'})"
                         for r in ext.itertuples()) + f". Emergence is read up to step {horizon}; every other view "
                     f"stops at the horizon.")
        fig = plots.survival_figure(surv, f"Fraction of seeds emerged by step t (threshold {emergence_threshold})",
                                    study.colors)
        res.figures["rq1_survival"] = fig
        sec.figure(fig, "Kaplan–Meier fraction emerged by step t: runs that never emerged are censored at the horizon "
                        "and stay in the denominator (legend: n, never).")
        pts = em.assign(value=em.restricted)
        drawn = summ.assign(mean=summ["median"].clip(upper=horizon), ci_low=summ.median_low,
                            ci_high=summ.median_high.clip(upper=horizon))
        fig = plots.interval_figure(drawn, f"Emergence step per scheme: median and order-statistic interval "
                                           f"(never = horizon {horizon})", "emergence step",
                                    colors=study.colors, points=pts)
        fig.for_each_trace(lambda t: t.update(name=t.name.replace("mean, 95% CI", "median, [min, max]")))
        res.figures["rq1_emergence"] = fig
        sec.figure(fig, f"Emergence steps are skewed and censored: diamond = median, bar = order-statistic interval "
                        f"[min, max] over seeds (level 1 − 2·0.5ⁿ, 93.75% at n = 5); a bar or median drawn at the "
                        f"horizon {horizon} is 'not reached' (a run never emerged); dots are seeds (never = "
                        f"horizon).")
        show = summ.assign(
            **{"emerged (k/n)": summ.emerged.astype(str) + "/" + summ.n.astype(str),
               "median step [order-statistic interval]": [format_ci(*r) for r in
                                                          summ[["median", "median_low", "median_high"]].values],
               "interval level": [format_level(v) for v in summ.median_level],
               f"restricted mean (never = horizon) [{MEAN_CI}]": [
                   format_ci(*r) for r in summ[["restricted_mean", "restricted_low", "restricted_high"]].values],
               f"mean step of emerged [{MEAN_CI}]": [
                   format_ci(*r) for r in summ[["mean_emerged", "mean_emerged_low", "mean_emerged_high"]].values]}
        )[["scheme", "n", "emerged (k/n)", "median step [order-statistic interval]", "interval level",
           f"restricted mean (never = horizon) [{MEAN_CI}]", f"mean step of emerged [{MEAN_CI}]"]]
        sec.table(show, f"Emergence step per scheme. The step is skewed, so the headline is the {MEDIAN_CI_SENTENCE}; "
                        f"the means carry the {MEAN_CI} (restricted mean: never-emerged seeds count as the horizon).")
        show_scheme_tests(sec, omni, tests, "Emergence step (seeded runs excluded: their donor's steps are not "
                          "counted)", PAIR_NAME["logrank"] + "; z < 0: the scheme emerges later than the reference",
                          "emergence_tests_all_pairs", alpha)
        _robustness(study, sec, res, grid, last_step)
        cm = compute_matched(study, em)
        if len(cm):
            res.tables["seeded_compute"] = cm
            sec.heading("Seeded runs against total compute")
            sec.table(cm, "A seeded student starts from a trained donor: its emergence step plus its chosen donor's "
                          "training steps (and all donors tried), and the same in training FLOPs. Compare "
                          "total_steps with the other schemes' emergence steps; the FLOPs differ per step.")

    summ, omni, ref, pairs = final_tests(metrics, study.schemes, reference, n_perm, seed, alpha)
    if len(summ):
        res.tables.update(final=summ, final_omnibus=omni, final_tests=ref, final_tests_all_pairs=pairs)
        sec.heading("End of training")
        sec.table(summ.assign(**{f"mean [{MEAN_CI}]": [format_ci(*r) for r in summ[["mean", "ci_low", "ci_high"]].values]})
                  [["metric", "scheme", "n", f"mean [{MEAN_CI}]"]],
                  f"End of training, per scheme: {MEAN_CI_SENTENCE}.")
        show_scheme_tests(sec, omni, ref, "End of training", PAIR_NAME["mean"], "final_tests_all_pairs", alpha,
                          by="metric")
    return res
