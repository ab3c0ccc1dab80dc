"""The study a comparison reads: which runs were expected, which are there, and their tables.

``load_study`` reads every table of a preset through ``tables.read_table`` (one schema),
classifies each expected run (``run_status``: ok, missing, incomplete, failed notebook, partial)
and keeps only the runs whose training completed. Runs that had not emerged by the horizon may be
trained on (``train``'s ``extend_to``): every table is cut at the horizon, so that every
step-matched view compares runs at the same steps, and only emergence and survival read the
whole metrics table (``Study.extended_metrics``, ``Study.extended_runs``); the ``rq1``-``rq3`` modules are plain
functions of the ``Study`` it returns, so the notebook is a list of calls and the report shows
exactly what they return.

Also here, because more than one question uses them:

- ``Result`` (a report section with the figures and tables behind it) and the section helpers
  that name what is missing (``seeds_note``, ``section_table``) and write a scheme comparison
  into a section (``show_scheme_tests``: omnibus table, then each reference family's table only
  when it can reach significance, else the sentence that says why; see ``inference``);
- ``final_values`` and ``feature_table``, the long-table reshapes shared by RQ1-3;
- heads are unordered within a layer (run A's head 2 has no relation to run B's head 2), so
  every cross-run comparison is invariant to permuting heads within a layer; representation
  similarity between runs reads the probes notebook 06 stores (``probes.ProbeCache``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

import initmi_utils.seeded  # noqa: F401  (registers the `seeded` scheme, which the study orders last)
from initmi_utils import plots
from initmi_utils.config import PRESET_SEEDS, PRESETS, RunPaths, resolve_root
from initmi_utils.inference import can_reach, family_note
from initmi_utils.report import Section
from initmi_utils.schemes import SCHEMES
from initmi_utils.stats import ALPHA
from initmi_utils.tables import COLUMNS, read_table

TABLES = ("metrics", "ladder", "behavior", "attention", "ablation", "patching", "logit_lens", "geometry", "circuits",
          "gaussianity", "persistence", "offsets", "paths", "evidence")
TRAINING_TABLES = ("metrics", "ladder")  # written by training (notebook 01)
ANALYSIS_TABLES = tuple(t for t in TABLES if t not in TRAINING_TABLES)  # written by notebooks 02-06
SPARSE_TABLES = ("paths",)  # no rows for a run without a copying head: absence is not a missing analysis
MANIFEST = "manifest.json"  # published results (``results.publish``): the runs, their sources and facts


def read_manifest(root: str | Path) -> dict | None:
    """The manifest of published results in ``root`` (``results/<preset>``), or None when ``root``
    is a working tree (its runs' checkpoints and stamps say what is finished)."""
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


# =============================================================================================
# Runs: what was expected, what is there.


def grid_seeds(preset: str, seeds: Sequence[int] | None = None) -> tuple[int, ...]:
    """The seeds a comparison expects: ``seeds`` when given (``pipeline --seeds``), else the preset's."""
    return tuple(int(k) for k in seeds) if seeds else tuple(PRESET_SEEDS[preset])


def expected_runs(preset: str, seeds: Sequence[int] | None = None) -> pd.DataFrame:
    """The grid a preset promises: every registered scheme x its seeds (``grid_seeds``)."""

    rows = [dict(run=f"{s}-s{k}", scheme=s, seed=int(k)) for s in SCHEMES for k in grid_seeds(preset, seeds)]
    return pd.DataFrame(rows, columns=["run", "scheme", "seed"])


def run_status(preset: str, root: str | Path, tables: dict[str, pd.DataFrame],
               seeds: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per expected (and any extra) run: ``status`` and a ``detail`` naming what is wrong.

    - ``missing``: no metrics table (never trained, or training failed before its first eval);
    - ``incomplete``: training did not reach the preset's last step / has no ``done.json``;
    - ``failed notebook``: an executed notebook in the run's folder has no success stamp
      (the pipeline writes the executed copy either way and a stamp only on success);
    - ``partial``: trained, but some analysis tables that other runs have are absent;
    - ``ok``.
    Only runs whose training completed enter the statistics; the others are named in the report.

    In published results (a ``MANIFEST`` in ``root``) there are no checkpoints or stamps: a run is
    finished when the manifest lists it (``publish`` lists only runs whose notebooks were all up to
    date), and missing otherwise.
    """
    horizon = PRESETS[preset].train.steps
    manifest = read_manifest(resolve_root(root))
    exp = expected_runs(preset, seeds).assign(expected=True)
    seen = pd.concat([t[["run", "scheme", "seed"]] for t in tables.values() if len(t)], ignore_index=True) \
        if any(len(t) for t in tables.values()) else pd.DataFrame(columns=["run", "scheme", "seed"])
    seen = seen.drop_duplicates("run")
    extra = seen[~seen.run.isin(exp.run)].assign(expected=False)
    runs = pd.concat([exp, extra], ignore_index=True)
    present_tables = [n for n, t in tables.items() if len(t)]
    rows = []
    for r in runs.itertuples(index=False):
        problems, status = [], "ok"
        m = tables.get("metrics", pd.DataFrame(columns=COLUMNS))
        m = m[m.run == r.run]
        paths = RunPaths(resolve_root(root), preset, r.scheme, int(r.seed))
        if m.empty:
            status = "missing"
            problems.append("no metrics table: train it (notebook 01)")
        else:
            last = int(m.step.max())
            done = r.run in manifest["runs"] if manifest else (paths.checkpoints / "done.json").exists()
            if manifest and not done:
                status = "incomplete"
                problems.append("tables present but the run is not in the results' manifest (not published)")
            elif last < horizon:
                status = "incomplete"
                problems.append(f"training stopped at step {last} of {horizon}")
            elif not done and paths.checkpoints.exists() and not manifest:
                status = "incomplete"
                problems.append("checkpoints have no done.json")
        failed = sorted(p.stem for p in paths.notebooks.glob("[0-9]*.ipynb")  # not the runner's hidden temp files
                        if not p.with_suffix(".ok.json").exists()) if paths.notebooks.exists() and not manifest else []
        if failed:
            status = "failed notebook" if status == "ok" else status
            problems.append(f"notebook(s) without success stamp: {', '.join(failed)}")
        absent = [n for n in present_tables
                  if n not in TRAINING_TABLES and n not in SPARSE_TABLES and not (tables[n].run == r.run).any()]
        if absent and status != "missing":
            status = "partial" if status == "ok" else status
            problems.append(f"tables absent: {', '.join(absent)}")
        if not r.expected:
            problems.append("not in the preset's grid (extra run)")
        rows.append(dict(run=r.run, scheme=r.scheme, seed=int(r.seed), expected=bool(r.expected), status=status,
                         detail="; ".join(problems)))
    return pd.DataFrame(rows, columns=["run", "scheme", "seed", "expected", "status", "detail"])


@dataclass
class Study:
    """Every table of one preset, restricted to runs whose training completed."""

    preset: str
    root: Path
    tables: dict[str, pd.DataFrame]
    status: pd.DataFrame
    schemes: list[str] = field(default_factory=list)
    seeds: tuple[int, ...] = ()  # the seeds the grid promises (``grid_seeds``)
    extended_metrics: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=COLUMNS))
    manifest: dict | None = None  # published results: the runs' facts (``results.publish``); None in a working tree

    @property
    def horizon(self) -> int:
        """The preset's training steps: every step-matched view reads steps up to here."""
        return PRESETS[self.preset].train.steps

    @property
    def extended_runs(self) -> pd.DataFrame:
        """Runs trained past the horizon (not emerged by it): ``run, scheme, seed, last_step``."""
        m = self.extended_metrics
        last = m.groupby(["run", "scheme", "seed"], as_index=False).step.max().rename(columns={"step": "last_step"})
        return last[last.last_step > self.horizon].reset_index(drop=True)

    @property
    def emergence_horizon(self) -> int:
        """The last step any run was trained to: the horizon, or the extension's end."""
        m = self.extended_metrics
        return max(self.horizon, int(m.step.max()) if len(m) else 0)

    @property
    def colors(self) -> dict[str, str]:
        return plots.scheme_colors(self.schemes)

    def table(self, name: str) -> pd.DataFrame:
        return self.tables.get(name, pd.DataFrame(columns=COLUMNS))

    def has(self, name: str, metric: str | None = None) -> bool:
        t = self.table(name)
        return len(t) > 0 and (metric is None or (t.metric == metric).any())

    @property
    def usable_runs(self) -> list[str]:
        return self.status[self.status.status.isin(["ok", "partial", "failed notebook"])].run.tolist()


def load_study(preset: str, root: str | Path, seeds: Sequence[int] | None = None) -> Study:
    """Read every table of ``preset`` (one reader), classify the runs, keep the usable ones.

    ``seeds``: the seeds the grid was run with (``pipeline --seeds``); default the preset's. Runs
    of other seeds found on disk are used too and marked as extra."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    root = resolve_root(root)
    raw = {name: read_table(preset, name, root) for name in TABLES}
    status = run_status(preset, root, raw, seeds)
    usable = set(status[status.status.isin(["ok", "partial", "failed notebook"])].run)
    horizon = PRESETS[preset].train.steps
    tables = {n: t[t.run.isin(usable) & (t.step <= horizon)].reset_index(drop=True) for n, t in raw.items()}
    extended = raw["metrics"][raw["metrics"].run.isin(usable)].reset_index(drop=True)

    present = set(status.scheme)
    schemes = [s for s in SCHEMES if s in present] + sorted(present - set(SCHEMES))
    return Study(preset, root, tables, status, schemes, grid_seeds(preset, seeds), extended, read_manifest(root))



# =============================================================================================
# Result containers.


@dataclass
class Result:
    """One research question's answer: a report section plus the figures and tables behind it."""

    section: Section
    figures: dict[str, object] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def runs_of(df: pd.DataFrame) -> pd.DataFrame:
    return df[["run", "scheme", "seed"]].drop_duplicates()


def missing_note(study: Study, name: str, metrics: Sequence[str] = ()) -> str | None:
    """A sentence when a table / metric the section needs is absent (None when all is there)."""
    t = study.table(name)
    if t.empty:
        return (f"Table '{name}' was not found for any usable run of preset '{study.preset}': the part "
                f"of this section that needs it is skipped. Run the notebook that writes it.")
    absent = [m for m in metrics if not (t.metric == m).any()]
    if absent:
        return f"Table '{name}' has no metric(s) {', '.join(absent)}: the parts that need them are skipped."
    return None


def section_table(study: Study, sec: Section, name: str, metrics: Sequence[str], what: str) -> pd.DataFrame:
    """A section's main table; the section gets a warning naming what is absent and, when the
    table has rows, the seeds per scheme behind it."""
    note = missing_note(study, name, metrics)
    if note:
        sec.note(note, "warning")
    table = study.table(name)
    if not table.empty:
        sec.text(seeds_note(study, table, what))
    return table


def seeds_note(study: Study, df: pd.DataFrame, what: str) -> str:
    """'n seeds per scheme' for ``df``, naming schemes with fewer than the preset promises."""
    expected = len(study.seeds)
    have = runs_of(df).groupby("scheme").seed.nunique().reindex(study.schemes, fill_value=0) if len(df) else \
        pd.Series(0, index=study.schemes)
    short = [f"{s} ({n}/{expected})" for s, n in have.items() if n < expected]
    text = f"{what}: seeds per scheme " + ", ".join(f"{s} {n}" for s, n in have.items()) + "."
    if short:
        text += f" Fewer seeds than the preset's {expected}: {', '.join(short)} (see the run status table)."
    return text


# =============================================================================================
# Long-table reshapes shared by the questions.


def final_values(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each run's value of ``metric`` at its last step (run, scheme, seed, step, value)."""
    t = table[table.metric == metric]
    if t.empty:
        return pd.DataFrame(columns=["run", "scheme", "seed", "step", "value"])
    t = t.groupby(["run", "scheme", "seed", "step"], as_index=False).value.mean()
    return t.sort_values("step").groupby("run", as_index=False).tail(1).reset_index(drop=True)


def feature_table(df: pd.DataFrame, label_columns: Sequence[str] = (), keep_layer: Sequence[str] = (),
                  prefix: str = "") -> pd.DataFrame:
    """Long table with a ``feature`` label per series, averaged over everything the label omits.

    The label is ``prefix`` + the metric + the values of ``label_columns`` (e.g. ``matrix`` →
    ``effective_rank W_QK``) + the layer for metrics in ``keep_layer`` (``L0``; layer -1, the
    embedding, as ``embed``); values are then averaged over the remaining layers/heads within
    (run, step, feature). Other descriptive columns (``top_head`` …) are ignored on purpose:
    they describe a value, they do not define a series.
    """
    cols = ["run", "scheme", "seed", "step", "feature", "metric", "value"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    label = prefix + df.metric.astype(str)
    for c in label_columns:
        if c in df.columns:
            v = df[c].astype(str)
            ok = df[c].notna() & ~v.isin(["", "-1", "nan", "None", "<NA>"])
            label = label.where(~ok, label + " " + v)
    keep_l = df.metric.isin(keep_layer)
    layer = df.layer.astype(int)
    label = label.where(~keep_l, label + np.where(layer >= 0, " L" + layer.astype(str), " embed"))
    return df.assign(feature=label).groupby(cols[:-1], as_index=False, sort=False).value.mean()[cols]


def at_matched(table: pd.DataFrame, matched: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``table`` at each run's matched step."""
    m = matched.dropna(subset=["step"])[["run", "step"]].astype({"step": int})
    return table.merge(m, on=["run", "step"])


# =============================================================================================
# Writing a scheme comparison into a section.


def show_scheme_tests(sec: Section, omnibus: pd.DataFrame, ref: pd.DataFrame, what: str, method: str,
                      csv: str, alpha: float = ALPHA, by: str | None = None,
                      only_significant_omnibus: bool = False) -> None:
    """The omnibus table, then each reference family's table, shown only where the family can
    reach Holm-adjusted significance (``inference.can_reach``); where it cannot, one sentence
    says why (n per scheme, the floor). ``csv`` names the table holding every scheme pair.

    ``by`` (e.g. ``feature``): one family per value; with ``only_significant_omnibus`` the
    family rows of a value are shown only when its omnibus was significant (many features)."""
    if omnibus.empty:
        return
    if omnibus.p.isna().all():
        sec.note(f"{what}: no test across schemes: fewer than 2 schemes have ≥ 2 seeds (one seed has no spread to "
                 f"test against).", "warning")
        return
    sec.table(omnibus, f"{what}: omnibus test across schemes ({omnibus.test.iloc[0]}; schemes with ≥ 2 seeds; "
                       f"significant = p ≤ α = {alpha}" + (f"; each {by} is its own question, no correction "
                                                           f"across {by}s" if by else "") + ").")
    if ref.empty:
        sec.text(f"{what}: no reference scheme among the schemes, so no reference-family tests.")
        return
    keys = [by] if by else []
    shown, notes = [], []
    for fam, f in ref.groupby("family", sort=False):
        parts = list(f.groupby(keys, sort=False)) if keys else [(None, f)]
        reach = [t for _, t in parts if can_reach(t, alpha)]
        if only_significant_omnibus and by:
            sig = set(omnibus.loc[omnibus.significant, by])
            reach = [t for t in reach if t[by].iloc[0] in sig]
        shown += reach
        cannot = [t for _, t in parts if not can_reach(t, alpha)]
        if cannot:
            label = what if not by else f"{what} ({len(cannot)} of {len(parts)} {by}s)"
            notes.append(family_note(cannot[0], alpha, label))
    if shown:
        table = pd.concat(shown, ignore_index=True)
        extra = (" Rows only for features whose omnibus is significant; every feature is in the CSV."
                 if only_significant_omnibus and by else "")
        sec.table(table, f"{what}: each scheme against the reference {table.b.iloc[0]} ({method}), Holm within "
                         f"each family (base schemes; seeded); declared = Holm p ≤ α and omnibus p ≤ α; p_floor = "
                         f"smallest p the seed counts allow.{extra} Every scheme pair: {csv}.csv (not a test "
                         f"the report relies on).")
    elif only_significant_omnibus and by and not notes:
        sec.text(f"{what}: no {by} has a significant omnibus test, so no reference-family rows are shown "
                 f"(all are in the CSV).")
    for n in notes:
        sec.note(n, "warning")
