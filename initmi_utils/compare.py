"""07_compare: the cross-scheme answers to RQ1-3 with seed statistics, in one report.

The comparison is split by question; this module assembles it:

- ``stats``: the statistics (arrays in, numbers out; numpy/scipy only) — t-intervals for means,
  order-statistic intervals for medians, permutation / log-rank / Kruskal–Wallis tests, Holm;
  its docstring gives every choice and the coverage it was measured at;
- ``inference``: the same on long tables — per-scheme summaries and the scheme comparison of one
  quantity (omnibus across schemes, then each scheme against the reference scheme ``normal`` with
  Holm within the base family and within the seeded family; all pairs to CSV only);
- ``study``: what was expected, what is there (``load_study``, ``run_status``), the section
  helpers and the residual-stream CKA cache;
- ``rq1`` (training, emergence), ``rq2`` (mechanisms at matched checkpoints, persistence of the
  seeded heads), ``rq3`` (geometry, early geometry vs emergence);
- ``findings``: the answers first, a few sentences per question written from those modules'
  tables, beside one figure each;
- here: ``overview`` (runs and data, how to read the statistics), ``headline`` (one row per
  scheme), ``head_browsers`` (each scheme's seed-0 run in the head browser of ``head_browser``),
  ``save_outputs`` (figures, CSVs, ``figures/<preset>/report.html``) and ``run_compare`` (all of
  it in one call).

The report opens with the findings and the head browsers; the evidence (runs and data, headline
numbers, RQ1-3 in full, persistence, the list of CSVs) follows in folded sections.

Notebook 07 calls ``load_study``, ``overview``, ``rq1``, ``rq2``, ``rq3``, ``persistence``,
``headline``, ``findings``, ``head_browsers`` and ``save_outputs`` through this module, which
re-exports them.

Statistics, in short (``inference.STATISTICS_TEXT`` is the report's version): means over seeds
carry a 95% t-interval; emergence steps, which are skewed and censored at the horizon, a median
with its order-statistic interval ([min, max] at n ≤ 5: level 1 − 2·0.5ⁿ, 93.75% at n = 5;
"not reached" when a run never emerged). Schemes are compared by an omnibus test first
(Kruskal–Wallis; for emergence a permutation one-way test on restricted means), then against the
reference scheme only (permutation test on means; log-rank with an exact permutation p for
emergence), Holm within a family (base schemes: 5 tests, best attainable Holm p at 5 v 5 seeds
5 × 2/252 ≈ 0.04; seeded: 1 test). A family's table is shown only when it can reach α; else one
sentence says why. All scheme pairs are in the CSVs only.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Sequence

import pandas as pd

from initmi_utils import plots
from initmi_utils.checkpoints import CheckpointError
from initmi_utils.config import experiment, resolve_root
from initmi_utils.findings import findings
from initmi_utils.head_browser import MAX_CHECKPOINTS, head_browser, stored_head_browser
from initmi_utils.inference import MEAN_CI, REFERENCE, STATISTICS_TEXT, format_ci, format_level
from initmi_utils.offsets import REPORT_ORDER
from initmi_utils.report import Section, words, write_report
from initmi_utils.rq1 import rq1
from initmi_utils.rq2 import persistence, rq2
from initmi_utils.rq3 import rq3
from initmi_utils.stats import ALPHA
from initmi_utils.study import Result, Study, expected_runs, load_study

__all__ = ["load_study", "overview", "rq1", "rq2", "rq3", "persistence", "headline", "findings", "head_browsers",
           "figures_dir", "save_outputs", "run_compare", "Result", "Study"]


def overview(study: Study) -> Result:
    sec = Section("Runs and data", folded=True)
    res = Result(sec, tables={"status": study.status})
    bad = study.status[study.status.status != "ok"]
    expected = expected_runs(study.preset, study.seeds)
    sec.text(f"Preset '{study.preset}': expected grid = {expected.scheme.nunique()} schemes × "
             f"{len(study.seeds)} seeds {list(study.seeds)} = {len(expected)} runs (every registered scheme × "
             f"the grid's seeds); training horizon {study.horizon} steps.")
    if len(bad):
        sec.note(f"{len(bad)} run(s) are not complete and are named here, not silently averaged away: " +
                 "; ".join(f"{r.run}: {r.status} ({r.detail})" for r in bad.itertuples()), "warning")
    else:
        sec.note("Every expected run is present and complete.")
    counts = pd.DataFrame([dict(table=n, runs=t.run.nunique(), rows=len(t), metrics=", ".join(sorted(t.metric.unique())[:12])
                                + (" …" if t.metric.nunique() > 12 else "")) for n, t in study.tables.items()])
    res.tables["table_counts"] = counts
    grid = study.status.pivot_table(index="scheme", columns="seed", values="status", aggfunc="first")
    grid = grid.reindex([s for s in study.schemes if s in grid.index]).reset_index()
    grid.columns = [c if c == "scheme" else f"seed {c}" for c in grid.columns]
    res.tables["status_grid"] = grid
    sec.table(grid, "Run status per scheme and seed (only runs whose training completed enter the statistics).")
    if len(bad):
        sec.table(bad[["run", "status", "detail"]], "What is wrong with each run that is not ok.")
    sec.table(counts, "Tables found (usable runs only).")
    sec.heading("How to read the statistics")
    sec.text(STATISTICS_TEXT)
    return res


def headline(study: Study, r1: Result, r2: Result) -> Result:
    """One row per scheme with the headline numbers: means with their 95% t-interval, the
    emergence step as median with its order-statistic interval, counts as k/n."""
    sec = Section("Headline numbers per scheme", folded=True)
    res = Result(sec)
    usable = study.status[study.status.run.isin(study.usable_runs)].groupby("scheme").size()
    rows = {s: {"scheme": s, "n": int(usable.get(s, 0))} for s in study.schemes}
    fin = r1.tables.get("final")
    if fin is not None:
        for r in fin.itertuples():
            rows[r.scheme][f"final {words(r.metric)} [{MEAN_CI}]"] = format_ci(r.mean, r.ci_low, r.ci_high)
    em = r1.tables.get("emergence_summary")
    if em is not None:
        for r in em.itertuples():
            rows[r.scheme]["emerged"] = f"{r.emerged}/{r.n}"
            rows[r.scheme]["median emergence step [order-statistic interval] (level)"] = (
                f"never (> {study.horizon})" if r.emerged == 0 else
                f"{format_ci(r.median, r.median_low, r.median_high)} ({format_level(r.median_level)})")
    mech = r2.tables.get("step_mechanism")
    if mech is not None and len(mech):
        # Headline localisation: per layer, mean ablation with held-out means (the copying layer and
        # layer 0 separately); zero ablation over all heads and patching stay as secondary columns.
        keep = [f for f in mech.feature.unique() if "top1_share" in f and (
            "top1_share_layer heldout_mean_ablation_logit_diff_delta" in f
            or ("zero_ablation" in f and "_layer" not in f) or "patching" in f)]
        for r in mech[mech.feature.isin(keep)].itertuples():
            rows[r.scheme][f"{words(r.feature)} (step-matched) [{MEAN_CI}]"] = format_ci(r.mean, r.ci_low, r.ci_high)
    counts = r2.tables.get("step_mechanism_labels")
    if counts is not None and len(counts):
        for s, g in counts.groupby("scheme"):
            k = g.mechanism.value_counts()
            rows[s]["copying mechanism (step-matched)"] = " · ".join(
                f"{words(m)} {int(k.get(m, 0))}" for m in REPORT_ORDER) + f" (n={len(g)})"
    roles = r2.tables.get("step_roles")
    if roles is not None and len(roles):
        for s, g in roles.groupby("scheme"):
            last = int(g.layer.max())
            k = g[(g.layer == last) & (g.role == "induction")].run.nunique()
            rows[s][f"runs with an L{last} induction head"] = f"{k}/{g.run.nunique()}"
    table = pd.DataFrame(list(rows.values()))
    res.tables["headline"] = table
    sec.table(table, f"Means over seeds with their {MEAN_CI} (mean ± t(n−1)·s/√n); the emergence step, which is "
                     f"skewed and censored, as median with the order-statistic interval [min, max] over seeds (level "
                     f"1 − 2·0.5ⁿ in brackets: 93.75% at n = 5; 'not reached' = a run never emerged); k/n = runs out of "
                     f"seeds analysed. Tests (omnibus, then each scheme against {REFERENCE}) are in the sections "
                     f"below.")
    return res


def head_browsers(study: Study, n_checkpoints: int = MAX_CHECKPOINTS) -> Result:
    """Each scheme's head browser (``head_browser``) for its seed-0 run (its lowest usable seed
    when seed 0 is not usable), one at a time behind a selector; a run whose checkpoints cannot
    be read is named instead."""
    sec = Section("Head browser · each head's attention across training", key="head-browser")
    res = Result(sec)
    usable = study.status[study.status.run.isin(study.usable_runs)]
    attention = study.table("attention")
    options, missing = {}, []
    for scheme in study.schemes:
        seeds = sorted(usable[usable.scheme == scheme].seed)
        if not seeds:
            continue
        seed = 0 if 0 in seeds else seeds[0]
        cfg = experiment(study.preset, scheme, seed)
        try:
            scores = attention[attention.run == cfg.run.name]
            fig = stored_head_browser(cfg, study.root, scores) if study.manifest is not None else \
                head_browser(cfg, study.root, scores=scores, n_checkpoints=n_checkpoints)
        except (CheckpointError, FileNotFoundError) as e:
            missing.append(f"{cfg.run.name}: {e}")
            continue
        options[f"{scheme} (seed {seed})"] = fig
        res.figures[f"head_browser_{scheme}"] = fig
    if options:
        sec.choice(options, "run", "Pick a run; in the figure, pick a head (dropdown) and a checkpoint (slider). Left: the "
                                   "head's attention on one fixed sequence BOS + B + B (B: random tokens; an induction "
                                   "head attends from each token of the second B to the token after its first "
                                   "occurrence), in % of each query's attention. Right: the head's previous-token, "
                                   "induction and duplicate-token scores at every analysed checkpoint (notebook 03), the "
                                   "shown checkpoint dashed. At most 8 checkpoints: the first, the last and those where "
                                   "the scores change most.")
    else:
        sec.note("No run's checkpoints could be read: no head browser.", "warning")
    if missing:
        sec.note("No head browser for: " + "; ".join(missing), "warning")
    return res


def figures_dir(preset: str, root: str | Path) -> Path:
    return resolve_root(root) / "figures" / preset


def _csv_section(study: Study, table_dir: Path, report_dir: Path, names: list[str]) -> Section:
    sec = Section("All tables (CSV)", folded=True, key="csv")
    rel = Path(os.path.relpath(table_dir, report_dir))
    sec.links([(f"{n}.csv", (rel / f"{n}.csv").as_posix()) for n in sorted(names)],
              f"Every table behind the report, one CSV each, in {table_dir} (each table shown above also links its own "
              f"CSV, in the report_tables folder beside the report). Tests of every scheme pair are in the *_all_pairs "
              f"files only.")
    return sec


def save_outputs(study: Study, results: list[Result], static: bool = True,
                 out_root: str | Path | None = None) -> dict[str, Path]:
    """Write every figure to ``figures/<preset>/07_<name>.html`` (+PNG/SVG when possible), every
    table to ``data/compare/<preset>/<name>.csv``, the main figures (those of ``findings``) as
    JSON for ``make figures``, and ``figures/<preset>/report.html``: the sections in the order of
    ``results``, then the list of CSVs. Under ``out_root`` (default: the study's root; another
    one when the study is read from published results)."""
    out_root = resolve_root(out_root) if out_root is not None else study.root
    out_dir = figures_dir(study.preset, out_root)
    table_dir = out_root / "data" / "compare" / study.preset
    table_dir.mkdir(parents=True, exist_ok=True)
    written, names, main = {}, [], {}
    for r in results:
        for name, fig in r.figures.items():
            if name.startswith("head_browser_"):
                continue  # shown in the report only (each is one run, not the comparison)
            written[name] = plots.save_figure(fig, out_dir / f"07_{name}", static=static, self_contained=True)[0]
            if name.startswith("finding_"):
                main[name] = fig
        for name, t in r.tables.items():
            t.to_csv(table_dir / f"{name}.csv", index=False)
            names.append(name)
    seeds = ",".join(str(k) for k in study.seeds)
    command = (f"python -m initmi_utils.results report --preset {shlex.quote(study.preset)}" if study.manifest else
               f"python -m initmi_utils.pipeline --preset {shlex.quote(study.preset)} --seeds {seeds}")
    study_text = (f"preset {study.preset}, schemes {', '.join(study.schemes)}, seeds {seeds}, "
                  f"{len(study.usable_runs)} usable runs")
    if main:
        written["main_figures"] = plots.save_main_figures(main, out_dir, study_text, command)
    meta = (f"preset {study.preset} · schemes {', '.join(study.schemes)} · seeds {list(study.seeds)}"
            f" · {len(study.usable_runs)} usable runs")
    sections = [r.section for r in results] + [_csv_section(study, table_dir, out_dir, names)]
    written["report"] = write_report(out_dir / "report.html", f"initmi · does initialisation change the mechanism? "
                                     f"({study.preset})", sections, meta)
    return written


def run_compare(preset: str, root: str | Path, emergence_threshold: float = 0.8, match_step: int = -1,
                loss_match_target: float = 0.0, role_threshold: float = 0.4, similar_loss_eps: float = 0.05,
                early_fraction: float = 0.1, cka: bool = True, n_boot: int | None = None,
                n_perm: int = 10_000, seed: int = 0, static: bool = True, seeds: Sequence[int] | None = None,
                reference: str = REFERENCE, alpha: float = ALPHA, out_root: str | Path | None = None
                ) -> tuple[list[Result], dict[str, Path]]:
    """The whole comparison in one call (what 07_compare runs, cell by cell).

    ``reference``: the scheme every other is tested against; ``alpha``: the family-wise level.
    ``n_boot`` is unused (no bootstrap intervals any more); it is accepted so that existing calls
    keep working. ``root`` may be published results (``results/<preset>``); ``out_root``: where
    the outputs go (default ``root``)."""
    study = load_study(preset, root, seeds)
    r0 = overview(study)
    r1 = rq1(study, emergence_threshold, n_perm=n_perm, seed=seed, reference=reference, alpha=alpha)
    r2 = rq2(study, match_step, loss_match_target, role_threshold, similar_loss_eps, cka=cka,
             n_perm=n_perm, seed=seed, reference=reference, alpha=alpha, emergence_threshold=emergence_threshold)
    r3 = rq3(study, r1.tables.get("emergence"), early_fraction, n_perm=n_perm, seed=seed, reference=reference,
             alpha=alpha)
    r4 = persistence(study)
    found = findings(study, r1, r2, r3, emergence_threshold, reference, alpha)
    results = [found, head_browsers(study), r0, headline(study, r1, r2), r1, r2, r3, r4]
    return results, save_outputs(study, results, static, out_root)
