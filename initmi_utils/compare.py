"""07_compare: the cross-scheme answers to RQ1-3, with seed statistics.

Everything reads the per-run tables through ``tables.read_table`` (one schema) and is a plain
function of those frames, so the notebook is a list of calls and the report shows exactly what
the functions return.

Statistics (the same everywhere):

- *mean ± 95% CI over seeds*: percentile bootstrap of the mean (``bootstrap_ci``). With 5 seeds
  a percentile bootstrap is somewhat too narrow (it cannot see beyond the 5 values it resamples);
  the seeds are always drawn next to it and n is always printed, so a reader can judge.
- *scheme vs scheme*: two-sided permutation test on the difference of means, exact (every
  relabelling enumerated) when that is at most ``n_perm`` relabellings, which it is for 5 v 5
  seeds (252); Holm's step-down correction over all pairs of one question. With n seeds per
  scheme the smallest attainable p is 2 / C(2n, n) (0.0079 for n = 5); ``p_floor`` in every test
  table says so, because after Holm over m pairs the floor is m times that (0.079 for the 10
  pairs of 5 schemes, 0.17 for the 21 pairs of 7): *5 seeds cannot make a pairwise difference
  significant at 0.05 across 5 or more schemes*, whatever the effect size. ``floor_note`` puts
  that sentence into the report whenever it applies.
- *runs that never emerge* are counted: the survival curve keeps them in the denominator, and the
  restricted mean (never = the training horizon, the "restricted mean survival time") keeps them
  in the mean. Under the null of equal distributions the horizon-censored values are still
  exchangeable, so the permutation test on it stays exact.

Heads are unordered within a layer: run A's head 2 has no relation to run B's head 2. Every
cross-run comparison of heads is therefore invariant to permuting heads within a layer
(profiles sorted within layer, roles compared as counts per layer).

RQ2 opens with the copying mechanism of every run at the matched checkpoint
(``offsets.mechanism_labels``: classic induction, shifted induction, long-offset recall or none) and induction accuracy
on short vs long copies (``behavior.copy_distance_stats``): two runs can reach the same loss by
different circuits, and these two numbers tell which.

RQ2's residual-stream similarity is linear CKA (``geometry.linear_cka``) computed here:
TransformerLens has no representation-similarity measure, and linear CKA is five lines.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.stats import rankdata
from torch import Tensor
from transformer_lens.utilities import get_act_name

import initmi_utils.seeded  # noqa: F401  (registers the `seeded` scheme, which the study orders last)
from initmi_utils import plots
from initmi_utils.behavior import emergence_step
from initmi_utils.checkpoints import CheckpointError, list_checkpoints
from initmi_utils.config import PRESET_SEEDS, PRESETS, RunPaths, experiment, resolve_root
from initmi_utils.data import load_dataset
from initmi_utils.donor_persistence import seeded_slots
from initmi_utils.geometry import linear_cka
from initmi_utils.model import to_bridge
from initmi_utils.offsets import REPORT_ORDER, mechanism_labels
from initmi_utils.report import Section, write_report
from initmi_utils.schemes import SCHEMES
from initmi_utils.tables import COLUMNS, read_table

TABLES = ("metrics", "behavior", "attention", "ablation", "patching", "logit_lens", "geometry", "circuits",
          "persistence", "offsets", "paths")
ANALYSIS_TABLES = TABLES[1:]  # written by notebooks 02-06 (metrics by 01)
SPARSE_TABLES = ("paths",)  # no rows for a run without a copying head: absence is not a missing analysis


# =============================================================================================
# Statistics.


def _clean(values) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[~np.isnan(x)]


def bootstrap_ci(values, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` (NaNs dropped) and its percentile-bootstrap CI.

    One value has no interval: (value, nan, nan) rather than a fake zero-width one.
    """
    x = _clean(values)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return mean, float(lo), float(hi)


def summarise(df: pd.DataFrame, by: str | list[str], value: str = "value", n_boot: int = 10_000,
              seed: int = 0) -> pd.DataFrame:
    """Per group: n (non-missing values), mean, ci_low, ci_high."""
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for keys, g in df.groupby(by, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        mean, lo, hi = bootstrap_ci(g[value], n_boot, seed=seed)
        rows.append({**dict(zip(by, keys)), "n": int(g[value].notna().sum()), "mean": mean, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=by + ["n", "mean", "ci_low", "ci_high"])


def band_summary(df: pd.DataFrame, group: str = "scheme", unit: str = "seed", x: str = "step",
                 value: str = "value", extra: Sequence[str] = (), n_boot: int = 2_000, seed: int = 0) -> pd.DataFrame:
    """Mean over ``unit`` (seeds) and its bootstrap CI at every ``x``, per ``group`` (and ``extra``).

    Seeds are resampled as whole curves (one index draw per bootstrap sample for all x), so the
    band is the CI of the mean curve, not of unrelated pointwise means. Missing points are
    skipped (``n`` says how many seeds each point has).
    """
    rows = []
    rng = np.random.default_rng(seed)
    for keys, g in df.groupby([group, *extra], sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        wide = g.pivot_table(index=unit, columns=x, values=value, aggfunc="mean")
        v = wide.to_numpy(dtype=float)  # [units, x]
        n = (~np.isnan(v)).sum(0)
        with warnings.catch_warnings():  # all-NaN columns (a step no seed has) are expected
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(v, axis=0)
            if v.shape[0] > 1:
                boot = np.nanmean(v[rng.integers(0, v.shape[0], size=(n_boot, v.shape[0]))], axis=1)
                lo, hi = np.nanquantile(boot, [0.025, 0.975], axis=0)
            else:
                lo = hi = np.full(v.shape[1], np.nan)
        lo, hi = np.where(n > 1, lo, np.nan), np.where(n > 1, hi, np.nan)
        part = pd.DataFrame({x: wide.columns, "mean": mean, "ci_low": lo, "ci_high": hi, "n": n})
        for k, val in zip([group, *extra], keys):
            part[k] = val
        rows.append(part)
    cols = [group, *extra, x, "mean", "ci_low", "ci_high", "n"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


def permutation_test(a, b, n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided permutation p-value for a difference of means between samples ``a`` and ``b``.

    Exact (all C(n_a + n_b, n_a) relabellings, observed included) when there are at most
    ``n_perm`` of them; otherwise Monte Carlo with the (1 + count) / (1 + n_perm) estimate,
    which is never 0. NaNs are dropped; an empty sample gives nan.
    """
    a, b = _clean(a), _clean(b)
    if len(a) == 0 or len(b) == 0:
        return math.nan
    pooled, k = np.concatenate([a, b]), len(a)
    n, total = len(pooled), pooled.sum()
    observed = abs(a.mean() - b.mean())
    tol = 1e-12 * max(1.0, float(np.abs(pooled).max()))
    if math.comb(n, k) <= n_perm:
        idx = np.array(list(itertools.combinations(range(n), k)))
        sa = pooled[idx].sum(1)
        diffs = np.abs(sa / k - (total - sa) / (n - k))
        return float((diffs >= observed - tol).mean())
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, n)), axis=1)[:, :k]
    sa = pooled[perms].sum(1)
    diffs = np.abs(sa / k - (total - sa) / (n - k))
    return float((1 + (diffs >= observed - tol).sum()) / (1 + n_perm))


def p_floor(n_a: int, n_b: int) -> float:
    """Smallest two-sided p an exact permutation test can return for these sample sizes."""
    if n_a < 1 or n_b < 1:
        return math.nan
    return (2.0 if n_a == n_b else 1.0) / math.comb(n_a + n_b, n_a)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaNs stay NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


def pairwise_tests(df: pd.DataFrame, group: str = "scheme", value: str = "value", order: Sequence[str] | None = None,
                   n_perm: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Every pair of groups: means, difference (a - b), permutation p, Holm-adjusted p, p_floor."""
    groups = [g for g in (order or list(dict.fromkeys(df[group]))) if (df[group] == g).any()]
    groups = [g for g in groups if df.loc[df[group] == g, value].notna().any()]  # nothing to test without data
    rows = []
    for a, b in itertools.combinations(groups, 2):
        xa, xb = _clean(df.loc[df[group] == a, value]), _clean(df.loc[df[group] == b, value])
        rows.append(dict(a=a, b=b, n_a=len(xa), n_b=len(xb), mean_a=xa.mean() if len(xa) else math.nan,
                         mean_b=xb.mean() if len(xb) else math.nan,
                         difference=(xa.mean() - xb.mean()) if len(xa) and len(xb) else math.nan,
                         p=permutation_test(xa, xb, n_perm, seed), p_floor=p_floor(len(xa), len(xb))))
    out = pd.DataFrame(rows, columns=["a", "b", "n_a", "n_b", "mean_a", "mean_b", "difference", "p", "p_floor"])
    out.insert(len(out.columns) - 1, "p_holm", holm(out["p"]) if len(out) else [])
    return out


def floor_note(tests: pd.DataFrame, alpha: float = 0.05) -> str | None:
    """A sentence for the report when the seed counts make Holm-adjusted significance impossible."""
    if tests.empty:
        return None
    best = float(np.nanmin(tests.p_floor)) * len(tests)
    if best <= alpha:
        return None
    return (f"With these seed counts the smallest attainable Holm-adjusted p over the {len(tests)} pairs is "
            f"{min(best, 1.0):.3g} > {alpha}: no pairwise difference can be declared significant, whatever its "
            f"size; read the effect sizes and CIs, or run more seeds (preset 'full').")


def spearman_permutation(x, y, strata=None, n_perm: int = 10_000, seed: int = 0) -> tuple[float, float, int]:
    """(rho, two-sided permutation p, n) for the rank correlation of ``x`` and ``y``.

    With ``strata`` (e.g. the scheme of each run) the ranks are centred within each stratum and
    ``y`` is permuted only within strata: the correlation *inside* schemes, with scheme
    differences removed (a scheme that is both fast and, say, high-norm cannot create it).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    s = None if strata is None else np.asarray(strata)[keep]
    n = len(x)
    rx, ry = rankdata(x), rankdata(y)
    if s is not None:
        for level in np.unique(s):
            m = s == level
            rx[m] -= rx[m].mean()
            ry[m] -= ry[m].mean()

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # row-wise Pearson of b's rows with a
        a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
        with np.errstate(all="ignore"):
            return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))

    rho = float(corr(rx, ry))
    if n < 3 or not np.isfinite(rho):
        return (rho if np.isfinite(rho) else math.nan), math.nan, n
    rng = np.random.default_rng(seed)
    if s is None:
        yp = ry[np.argsort(rng.random((n_perm, n)), axis=1)]
    else:  # shuffle within strata: sort random keys offset by stratum, so blocks stay in place
        codes = np.unique(s, return_inverse=True)[1]
        grouped = np.argsort(codes, kind="stable")
        order = np.argsort(codes[None] * 2.0 + rng.random((n_perm, n)), axis=1)
        yp = np.empty((n_perm, n))
        yp[:, grouped] = ry[order]
    r = corr(rx[None], yp)
    count = int((np.abs(r) >= abs(rho) - 1e-12).sum())
    return rho, (1 + count) / (1 + n_perm), n


def format_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    """``mean [lo, hi]`` with ``digits`` significant digits; no interval when there is none."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    f = lambda v: f"{v:.{digits}g}"  # noqa: E731
    return f(mean) if (lo is None or math.isnan(lo)) else f"{f(mean)} [{f(lo)}, {f(hi)}]"


# =============================================================================================
# Linear CKA on residual streams.


def residual_streams(model, tokens) -> dict[str, Float[Tensor, "n d_model"]]:
    """The residual stream after the embedding and after every layer, flattened over
    (sequence, position) with position 0 dropped: BOS is the same input at the same position in
    every sequence, a single high-norm point that would otherwise dominate the CKA of both runs.

    One ``run_with_cache`` on the ``TransformerBridge`` view; keys are the hook names.
    """
    bridge = to_bridge(model)
    names = [get_act_name("resid_pre", 0)] + [get_act_name("resid_post", l) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n][:, 1:].reshape(-1, cache[n].shape[-1]).detach() for n in names}


class ResidualCache:
    """Residual streams of (run, step) checkpoints on one fixed token set, loaded on demand.

    ``get`` returns None (and records why in ``errors``) when a checkpoint is not there, so a
    missing checkpoint leaves a CKA cell empty instead of stopping the comparison.
    """

    def __init__(self, preset: str, root: str | Path, n_sequences: int = 128):
        self.preset, self.root, self.n_sequences = preset, resolve_root(root), n_sequences
        self._acts: dict[tuple[str, int], dict | None] = {}
        self._tokens = None
        self.errors: dict[str, str] = {}

    def tokens(self, cfg):
        if self._tokens is None:
            self._tokens = load_dataset(cfg, self.root).val.tokens[: self.n_sequences]
        return self._tokens

    def get(self, scheme: str, seed: int, step: int) -> dict | None:
        key = (f"{scheme}-s{seed}", int(step))
        if key not in self._acts:
            try:
                cfg = experiment(self.preset, scheme, int(seed))
                ckpts = list_checkpoints(cfg, self.root, require_done=False)
                if int(step) not in ckpts.steps:
                    raise CheckpointError(f"no checkpoint at step {step} in {ckpts.folder}")
                model, _ = ckpts.load(int(step))
                self._acts[key] = residual_streams(model, self.tokens(cfg))
            except Exception as e:  # missing/corrupt checkpoint, unknown scheme: report, go on
                self.errors[f"{key[0]}@{key[1]}"] = f"{type(e).__name__}: {e}"
                self._acts[key] = None
        return self._acts[key]

    def cka(self, a: tuple[str, int, int], b: tuple[str, int, int]) -> dict[str, float]:
        """Per-hook linear CKA between two (scheme, seed, step) checkpoints (empty if unavailable)."""
        xa, xb = self.get(*a), self.get(*b)
        if xa is None or xb is None:
            return {}
        return {name: linear_cka(xa[name], xb[name]) for name in xa if name in xb}


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
    """
    horizon = PRESETS[preset].train.steps
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
            done = (paths.checkpoints / "done.json").exists()
            if last < horizon:
                status = "incomplete"
                problems.append(f"training stopped at step {last} of {horizon}")
            elif not done and paths.checkpoints.exists():
                status = "incomplete"
                problems.append("checkpoints have no done.json")
        failed = sorted(p.stem for p in paths.notebooks.glob("[0-9]*.ipynb")  # not the runner's hidden temp files
                        if not p.with_suffix(".ok.json").exists()) if paths.notebooks.exists() else []
        if failed:
            status = "failed notebook" if status == "ok" else status
            problems.append(f"notebook(s) without success stamp: {', '.join(failed)}")
        absent = [n for n in present_tables
                  if n != "metrics" and n not in SPARSE_TABLES and not (tables[n].run == r.run).any()]
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

    @property
    def horizon(self) -> int:
        return PRESETS[self.preset].train.steps

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
    tables = {n: t[t.run.isin(usable)].reset_index(drop=True) for n, t in raw.items()}

    present = set(status.scheme)
    schemes = [s for s in SCHEMES if s in present] + sorted(present - set(SCHEMES))
    return Study(preset, root, tables, status, schemes, grid_seeds(preset, seeds))


# =============================================================================================
# Result containers.


@dataclass
class Result:
    """One research question's answer: a report section plus the figures and tables behind it."""

    section: Section
    figures: dict[str, object] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def _runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[["run", "scheme", "seed"]].drop_duplicates()


def _missing_note(study: Study, name: str, metrics: Sequence[str] = ()) -> str | None:
    """A sentence when a table / metric the section needs is absent (None when all is there)."""
    t = study.table(name)
    if t.empty:
        return (f"Table '{name}' was not found for any usable run of preset '{study.preset}': the part "
                f"of this section that needs it is skipped. Run the notebook that writes it.")
    absent = [m for m in metrics if not (t.metric == m).any()]
    if absent:
        return f"Table '{name}' has no metric(s) {', '.join(absent)}: the parts that need them are skipped."
    return None


def _section_table(study: Study, sec: Section, name: str, metrics: Sequence[str], what: str) -> pd.DataFrame:
    """A section's main table; the section gets a warning naming what is absent and, when the
    table has rows, the seeds per scheme behind it."""
    note = _missing_note(study, name, metrics)
    if note:
        sec.note(note, "warning")
    table = study.table(name)
    if not table.empty:
        sec.text(seeds_note(study, table, what))
    return table


def seeds_note(study: Study, df: pd.DataFrame, what: str) -> str:
    """'n seeds per scheme' for ``df``, naming schemes with fewer than the preset promises."""
    expected = len(study.seeds)
    have = _runs(df).groupby("scheme").seed.nunique().reindex(study.schemes, fill_value=0) if len(df) else \
        pd.Series(0, index=study.schemes)
    short = [f"{s} ({n}/{expected})" for s, n in have.items() if n < expected]
    text = f"{what}: seeds per scheme " + ", ".join(f"{s} {n}" for s, n in have.items()) + "."
    if short:
        text += f" Fewer seeds than the preset's {expected}: {', '.join(short)} (see the run status table)."
    return text


# =============================================================================================
# RQ1: training and emergence.

CURVE_METRICS = ("val_loss", "train_loss", "val_acc_induction", "rep_acc_induction", "val_logit_diff", "induction_score")


def emergence(metrics: pd.DataFrame, threshold: float, horizon: int, metric: str = "val_acc_induction") -> pd.DataFrame:
    """Per run: emergence step (nan = never), ``emerged``, and ``restricted`` (never = horizon)."""
    rows = []
    for (run, scheme, seed), g in metrics[metrics.metric == metric].sort_values("step").groupby(
            ["run", "scheme", "seed"], sort=False):
        step = emergence_step(g.step.tolist(), g.value.tolist(), threshold)
        rows.append(dict(run=run, scheme=scheme, seed=int(seed), emergence_step=step,
                         emerged=not math.isnan(step), restricted=horizon if math.isnan(step) else step))
    return pd.DataFrame(rows, columns=["run", "scheme", "seed", "emergence_step", "emerged", "restricted"])


def emergence_summary(em: pd.DataFrame, schemes: Sequence[str], n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per scheme: n, emerged k, fraction emerged, mean step of the emerged runs [CI], restricted
    mean (never = horizon) [CI] and the median emergence step (inf if half never emerged)."""
    rows = []
    for s in schemes:
        g = em[em.scheme == s]
        if g.empty:
            continue
        m_e = bootstrap_ci(g.loc[g.emerged, "emergence_step"], n_boot, seed=seed)
        m_r = bootstrap_ci(g["restricted"], n_boot, seed=seed)
        steps = np.sort(np.where(g.emerged, g.emergence_step, np.inf))
        median = float(np.median(steps)) if len(steps) else math.nan
        rows.append(dict(scheme=s, n=len(g), emerged=int(g.emerged.sum()), fraction_emerged=g.emerged.mean(),
                         mean_emerged=m_e[0], mean_emerged_low=m_e[1], mean_emerged_high=m_e[2],
                         restricted_mean=m_r[0], restricted_low=m_r[1], restricted_high=m_r[2], median=median))
    return pd.DataFrame(rows)


def survival_curves(em: pd.DataFrame, horizon: int, schemes: Sequence[str]) -> pd.DataFrame:
    """Fraction of each scheme's seeds emerged by step t (never-emerged seeds stay counted)."""
    rows = []
    for s in schemes:
        g = em[em.scheme == s]
        if g.empty:
            continue
        steps = sorted({0, horizon, *g.loc[g.emerged, "emergence_step"].astype(int)})
        for t in steps:
            rows.append(dict(scheme=s, step=t, fraction_emerged=float((g.emerged & (g.emergence_step <= t)).mean()),
                             n=len(g), n_never=int((~g.emerged).sum())))
    return pd.DataFrame(rows, columns=["scheme", "step", "fraction_emerged", "n", "n_never"])


def final_values(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each run's value of ``metric`` at its last step (run, scheme, seed, step, value)."""
    t = table[table.metric == metric]
    if t.empty:
        return pd.DataFrame(columns=["run", "scheme", "seed", "step", "value"])
    t = t.groupby(["run", "scheme", "seed", "step"], as_index=False).value.mean()
    return t.sort_values("step").groupby("run", as_index=False).tail(1).reset_index(drop=True)


def rq1(study: Study, emergence_threshold: float = 0.8, n_boot: int = 10_000, n_perm: int = 10_000,
        seed: int = 0) -> Result:
    sec = Section("RQ1 · Training and emergence")
    res = Result(sec)
    metrics = _section_table(study, sec, "metrics", ["val_loss", "val_acc_induction"], "Runs with completed training")
    if metrics.empty:
        return res

    present = [m for m in CURVE_METRICS if (metrics.metric == m).any()]
    curves = band_summary(metrics[metrics.metric.isin(present)], extra=["metric"], n_boot=min(n_boot, 2000), seed=seed)
    res.tables["curves"] = curves
    fig = plots.band_grid(curves, f"Training curves per scheme ({study.preset})", panels=present, colors=study.colors)
    res.figures["rq1_curves"] = fig
    sec.figure(fig, "Mean over seeds per scheme; band = 95% bootstrap CI of the mean curve (seeds resampled as "
                    "whole curves); legend gives n seeds.")

    if (metrics.metric == "val_acc_induction").any():
        em = emergence(metrics, emergence_threshold, study.horizon)
        summ = emergence_summary(em, study.schemes, n_boot, seed)
        surv = survival_curves(em, study.horizon, study.schemes)
        tests = pairwise_tests(em, value="restricted", order=study.schemes, n_perm=n_perm, seed=seed)
        res.tables.update(emergence=em, emergence_summary=summ, survival=surv, emergence_tests=tests)
        sec.heading(f"Emergence: first evaluated step with val_acc_induction ≥ {emergence_threshold}")
        fig = plots.survival_figure(surv, f"Fraction of seeds emerged by step t (threshold {emergence_threshold})",
                                    study.colors)
        res.figures["rq1_survival"] = fig
        sec.figure(fig, "Survival-style curve: runs that never emerged stay in the denominator (legend: n, never).")
        pts = em.assign(value=em.restricted)
        s2 = summ.rename(columns={"restricted_mean": "mean", "restricted_low": "ci_low", "restricted_high": "ci_high"})
        fig = plots.interval_figure(s2, f"Emergence step per scheme (never = horizon {study.horizon})",
                                    "emergence step (restricted)", colors=study.colors, points=pts)
        res.figures["rq1_emergence"] = fig
        sec.figure(fig, "Restricted mean emergence step (never-emerged seeds count as the horizon) with 95% "
                        "bootstrap CI; dots are seeds.")
        show = summ.assign(
            **{"emerged (k/n)": summ.emerged.astype(str) + "/" + summ.n.astype(str),
               "mean step of emerged [95% CI]": [format_ci(*r) for r in
                                                  summ[["mean_emerged", "mean_emerged_low", "mean_emerged_high"]].values],
               "restricted mean [95% CI]": [format_ci(*r) for r in
                                            summ[["restricted_mean", "restricted_low", "restricted_high"]].values]}
        )[["scheme", "n", "emerged (k/n)", "mean step of emerged [95% CI]", "restricted mean [95% CI]", "median"]]
        sec.table(show, "Emergence step per scheme (median = inf when half or more never emerged).")
        sec.table(tests, "Pairwise permutation tests on the restricted emergence step (Holm-corrected over pairs; "
                         "p_floor = smallest p the seed counts allow).")
        if floor_note(tests):
            sec.note(floor_note(tests), "warning")

    finals = []
    for m in ("val_loss", "val_acc_induction", "val_logit_diff"):
        fv = final_values(metrics, m)
        if len(fv):
            s = summarise(fv, "scheme", n_boot=n_boot, seed=seed).assign(metric=m)
            finals.append(s)
            res.tables[f"final_{m}_tests"] = pairwise_tests(fv, order=study.schemes, n_perm=n_perm, seed=seed)
    if finals:
        f = pd.concat(finals, ignore_index=True)
        res.tables["final"] = f
        sec.table(f.assign(**{"mean [95% CI]": [format_ci(*r) for r in f[["mean", "ci_low", "ci_high"]].values]})
                  [["metric", "scheme", "n", "mean [95% CI]"]], "End of training, per scheme.")
        if "final_val_loss_tests" in res.tables:
            sec.table(res.tables["final_val_loss_tests"], "Pairwise permutation tests on final val_loss (Holm).")
    return res


# =============================================================================================
# RQ2: mechanisms at step- and loss-matched checkpoints.

ROLE_METRICS = {"induction": "induction_score", "prev_token": "prev_token_score",
                "duplicate": "duplicate_score", "bos": "bos_score"}


def candidate_steps(*tables: pd.DataFrame) -> pd.DataFrame:
    """(run, step) pairs analysed in every given table that has the run (the checkpoints we can
    read mechanisms at)."""
    sets: dict[str, set[int]] = {}
    for t in tables:
        if t.empty:
            continue
        for run, g in t[t.step >= 0].groupby("run"):
            s = set(g.step.astype(int))
            sets[run] = sets[run] & s if run in sets else s
    return pd.DataFrame([(r, s) for r, ss in sets.items() for s in sorted(ss)], columns=["run", "step"])


def _val_loss(metrics: pd.DataFrame) -> pd.DataFrame:
    vl = metrics[metrics.metric == "val_loss"]
    return vl.groupby(["run", "scheme", "seed", "step"], as_index=False).value.mean().rename(columns={"value": "val_loss"})


def step_matched(candidates: pd.DataFrame, metrics: pd.DataFrame, step: int = -1) -> tuple[pd.DataFrame, int | None]:
    """Every run at the same step: ``step``, or with -1 the last step all runs have analysed.

    Returns (run, scheme, seed, step, val_loss) with ``step`` nan where a run lacks it, and the
    step used (None if no step is common to all runs).
    """
    runs = _runs(metrics)
    if candidates.empty or runs.empty:
        return runs.assign(step=np.nan, val_loss=np.nan), None
    if step < 0:
        common = set.intersection(*[set(g.step) for _, g in candidates.groupby("run")])
        step = max(common) if common else None
    if step is None:
        return runs.assign(step=np.nan, val_loss=np.nan), None
    have = set(candidates[candidates.step == step].run)
    out = runs.assign(step=[step if r in have else np.nan for r in runs.run])
    vl = _val_loss(metrics)
    out = out.merge(vl[["run", "step", "val_loss"]], on=["run", "step"], how="left")
    return out.reset_index(drop=True), int(step)


def auto_loss_target(metrics: pd.DataFrame) -> float:
    """The largest per-scheme median final val loss: the typical run of every scheme reaches it."""
    fv = final_values(metrics, "val_loss")
    return float(fv.groupby("scheme").value.median().max()) if len(fv) else math.nan


def loss_matched(candidates: pd.DataFrame, metrics: pd.DataFrame, target: float) -> pd.DataFrame:
    """For each run the first analysed checkpoint with val loss <= ``target`` (``reached`` False and
    step nan for runs that never get there)."""
    vl = _val_loss(metrics).merge(candidates, on=["run", "step"])
    rows = []
    for run, scheme, seed in _runs(metrics).itertuples(index=False):
        g = vl[(vl.run == run) & (vl.val_loss <= target)].sort_values("step")
        if len(g):
            rows.append(dict(run=run, scheme=scheme, seed=int(seed), step=int(g.step.iloc[0]),
                             val_loss=float(g.val_loss.iloc[0]), reached=True))
        else:
            rows.append(dict(run=run, scheme=scheme, seed=int(seed), step=np.nan, val_loss=np.nan, reached=False))
    return pd.DataFrame(rows, columns=["run", "scheme", "seed", "step", "val_loss", "reached"])


def at_matched(table: pd.DataFrame, matched: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``table`` at each run's matched step."""
    m = matched.dropna(subset=["step"])[["run", "step"]].astype({"step": int})
    return table.merge(m, on=["run", "step"])


def head_roles(attention: pd.DataFrame, threshold: float = 0.4) -> pd.DataFrame:
    """Each head's role: the role whose score is highest among those >= ``threshold``, else
    'other' (ties go to the order of ``ROLE_METRICS``: induction first)."""
    a = attention[attention.metric.isin(ROLE_METRICS.values()) & (attention["head"] >= 0)]
    if a.empty:
        return pd.DataFrame(columns=["run", "scheme", "seed", "step", "layer", "head", "role", "score"])
    wide = a.pivot_table(index=["run", "scheme", "seed", "step", "layer", "head"], columns="metric",
                         values="value", aggfunc="mean").reset_index()
    names = [r for r, m in ROLE_METRICS.items() if m in wide.columns]
    scores = wide[[ROLE_METRICS[r] for r in names]].to_numpy(dtype=float)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    best = scores.argmax(1)
    top = scores[np.arange(len(scores)), best]
    wide["role"] = np.where(top >= threshold, np.array(names)[best], "other")
    wide["score"] = np.where(np.isfinite(top), top, np.nan)
    return wide[["run", "scheme", "seed", "step", "layer", "head", "role", "score"]]


def role_strings(roles: pd.DataFrame) -> pd.DataFrame:
    """One line per run: ``L0: prev_token · bos · other | L1: induction · …`` (heads by index)."""
    rows = []
    for (run, scheme, seed, step), g in roles.groupby(["run", "scheme", "seed", "step"], sort=False):
        parts = [f"L{l}: " + " · ".join(h.sort_values("head").role) for l, h in g.groupby("layer")]
        rows.append(dict(run=run, scheme=scheme, seed=seed, step=step, roles=" | ".join(parts)))
    return pd.DataFrame(rows, columns=["run", "scheme", "seed", "step", "roles"])


def _runs_with(df: pd.DataFrame, schemes: Sequence[str], conditions: dict) -> pd.DataFrame:
    """Per scheme: ``n`` runs and, per named condition (a function of the scheme's rows giving a
    row mask), the runs with at least one row meeting it, as "k/n"."""
    rows = []
    for s in schemes:
        g = df[df.scheme == s]
        if g.empty:
            continue
        n = g.run.nunique()
        rows.append(dict(scheme=s, n=n, **{name: f"{g[cond(g)].run.nunique()}/{n}" for name, cond in conditions.items()}))
    return pd.DataFrame(rows, columns=["scheme", "n", *conditions])


def role_summary(roles: pd.DataFrame, schemes: Sequence[str]) -> pd.DataFrame:
    """Per scheme, for every (layer, role) but 'other': runs with at least one such head (k/n)."""
    if roles.empty:
        return pd.DataFrame(columns=["scheme", "n"])
    kinds = [(l, r) for l in sorted(roles.layer.unique()) for r in ROLE_METRICS]
    return _runs_with(roles, schemes, {f"L{l} {r}": (lambda g, l=l, r=r: (g.layer == l) & (g.role == r))
                                       for l, r in kinds})


def ablation_profiles(ablation: pd.DataFrame, metric: str) -> dict[str, np.ndarray]:
    """Per run: the per-head ablation effects sorted (descending) within each layer, layers in
    order, as one vector — head labels removed, so two runs that differ only by which index the
    induction head got have the same profile."""
    a = ablation[(ablation.metric == metric) & (ablation["head"] >= 0)]
    out = {}
    for run, g in a.groupby("run"):
        g = g.groupby(["layer", "head"]).value.mean().reset_index()
        out[run] = np.concatenate([np.sort(h.value.to_numpy())[::-1] for _, h in g.groupby("layer")])
    return out


def profile_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Cosine distance (1 - cos) between two sorted ablation profiles; 0 = same shape of effects,
    1 = orthogonal. nan when shapes differ or a profile is all zero."""
    if p.shape != q.shape:
        return math.nan
    d = np.linalg.norm(p) * np.linalg.norm(q)
    return float(1 - p @ q / d) if d > 0 else math.nan


def role_counts(roles: pd.DataFrame) -> pd.Series:
    """Number of heads per (layer, role) of one run: its role assignment up to relabelling heads."""
    return roles.groupby(["layer", "role"]).size()


def role_disagreement(a: pd.DataFrame | pd.Series, b: pd.DataFrame | pd.Series) -> float:
    """Fraction of heads whose role must change to turn run a's role assignment into run b's,
    under the best matching of heads within each layer: sum over layers of
    (1/2) sum_role |count_a - count_b|, divided by the number of heads. Takes role tables or
    their ``role_counts``."""
    ca = a if isinstance(a, pd.Series) else role_counts(a)
    cb = b if isinstance(b, pd.Series) else role_counts(b)
    n = ca.sum()
    if not n or cb.sum() != n:
        return math.nan
    return float(ca.subtract(cb, fill_value=0).abs().sum() / 2 / n)


def similar_loss_pairs(matched: pd.DataFrame, roles: pd.DataFrame, profiles: dict[str, np.ndarray], eps: float,
                       cka: Callable[[tuple, tuple], dict[str, float]] | None = None) -> pd.DataFrame:
    """Pairs of runs whose matched val losses differ by less than ``eps``, with how different
    their mechanisms are: ablation-profile distance, head-role disagreement and residual CKA
    (final layer and mean over layers; ``cka`` gives per-hook values for two (scheme, seed, step)).
    Same-scheme pairs are kept: they are the seed-to-seed baseline for the cross-scheme ones."""
    m = matched.dropna(subset=["step", "val_loss"]).sort_values("run").reset_index(drop=True)
    counts = {run: role_counts(g) for run, g in roles.groupby("run")} if len(roles) else {}
    rows = []
    for i, j in itertools.combinations(range(len(m)), 2):
        a, b = m.iloc[i], m.iloc[j]
        gap = abs(a.val_loss - b.val_loss)
        if gap >= eps:
            continue
        ra, rb = counts.get(a.run), counts.get(b.run)
        pa, pb = profiles.get(a.run), profiles.get(b.run)
        c = cka((a.scheme, int(a.seed), int(a.step)), (b.scheme, int(b.seed), int(b.step))) if cka else {}
        rows.append(dict(run_a=a.run, run_b=b.run, same_scheme=a.scheme == b.scheme, step_a=int(a.step),
                         step_b=int(b.step), loss_gap=gap,
                         ablation_distance=profile_distance(pa, pb) if pa is not None and pb is not None else math.nan,
                         role_disagreement=role_disagreement(ra, rb) if ra is not None and rb is not None else math.nan,
                         cka_final=list(c.values())[-1] if c else math.nan,
                         cka_mean=float(np.mean(list(c.values()))) if c else math.nan))
    cols = ["run_a", "run_b", "same_scheme", "step_a", "step_b", "loss_gap", "ablation_distance",
            "role_disagreement", "cka_final", "cka_mean"]
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["ablation_distance", "role_disagreement"], ascending=False, na_position="last") \
        .reset_index(drop=True)


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


def induction_circuit(attention: pd.DataFrame, circuits: pd.DataFrame) -> pd.DataFrame:
    """Per run and step, the last layer's strongest induction head (by induction score) and what
    feeds it: its induction score, its OV copying score, its largest K-composition z-score over
    the previous layer's heads, and whether that K-composition partner is the previous layer's
    strongest previous-token head (1/0) — the two-head induction circuit, read per run."""
    cols = ["run", "scheme", "seed", "step", "feature", "metric", "value"]
    a = attention[attention.metric.isin(["induction_score", "prev_token_score"]) & (attention["head"] >= 0)]
    if a.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (run, scheme, seed, step), g in a.groupby(["run", "scheme", "seed", "step"], sort=False):
        last = int(g.layer.max())
        ind = g[(g.metric == "induction_score") & (g.layer == last)]
        if ind.empty:
            continue
        top = ind.loc[ind.value.idxmax()]
        head = int(top["head"])
        out = {"induction head: induction_score": float(top.value)}
        c = circuits[(circuits.run == run) & (circuits.step == step) & (circuits.layer == last) & (circuits["head"] == head)] \
            if len(circuits) else circuits
        ov = c[c.metric == "ov_copying_score"]
        if len(ov):
            out["induction head: ov_copying_score"] = float(ov.value.mean())
        kz = c[(c.metric == "k_composition_z")]
        if len(kz) and "source_head" in kz.columns:
            best = kz.loc[kz.value.idxmax()]
            out["induction head: max k_composition_z"] = float(best.value)
            prev = g[(g.metric == "prev_token_score") & (g.layer == last - 1)]
            if len(prev):
                p = prev.loc[prev.value.idxmax()]
                out["K-partner is the prev-token head"] = float(int(best.source_head) == int(p["head"])
                                                               and int(best.source_layer) == int(p.layer))
        for f, v in out.items():
            rows.append(dict(run=run, scheme=scheme, seed=seed, step=step, feature=f, metric=f, value=v))
    return pd.DataFrame(rows, columns=cols)


def mechanism_scalars(study: Study, matched: pd.DataFrame) -> pd.DataFrame:
    """One number per run and feature at its matched checkpoint: localisation indices (ablation,
    patching), the logit lens's first rank-1 layer and the induction-circuit profile."""
    parts = []
    abl = at_matched(study.table("ablation"), matched)
    parts.append(feature_table(abl[abl.metric.str.startswith("localisation")], ["source"], prefix="ablation: "))
    pat = at_matched(study.table("patching"), matched)
    parts.append(feature_table(pat[pat.metric.str.startswith("localisation")], ["source"], prefix="patching: "))
    ll = at_matched(study.table("logit_lens"), matched)
    parts.append(feature_table(ll[ll.metric == "first_rank1_layer"], ["dataset", "position_type"], prefix="logit lens: "))
    parts.append(induction_circuit(at_matched(study.table("attention"), matched), at_matched(study.table("circuits"), matched)))
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["run", "scheme", "seed", "step", "feature", "value"])


def _scalar_tests(scalars: pd.DataFrame, schemes: Sequence[str], n_boot: int, n_perm: int, seed: int
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per feature: summary per scheme and pairwise tests (pairs with an empty side dropped before
    Holm; features with no value in any run dropped entirely)."""
    scalars = scalars[scalars.groupby("feature").value.transform(lambda v: v.notna().any())]
    summ = summarise(scalars, ["feature", "scheme"], n_boot=n_boot, seed=seed)
    tests = pd.concat([pairwise_tests(g, order=schemes, n_perm=n_perm, seed=seed).assign(feature=f)
                       for f, g in scalars.groupby("feature", sort=False)], ignore_index=True)
    return summ, tests[["feature"] + [c for c in tests.columns if c != "feature"]]


MECHANISM_SENTENCE = (
    "Three copying mechanisms reach similar losses: classic induction, where a layer-0 previous-token head lets a "
    "layer-1 induction head attend to the token right after the earlier copy of the current token and copy it; "
    "shifted induction, where the layer-1 head attends one token further (+2) and reads the token to copy there "
    "through a layer-0 head that looks one back; "
    "and long-offset recall, where a layer-0 head looking ~12-14 positions back lets a layer-1 head attend ~12-14 "
    "positions after the earlier copy, read the tokens around it and keep the one that is not recent, which "
    "fails when the two copies are fewer than ~12 positions apart.")
COPY_DISTANCE_METRICS = {"val_acc_induction_short": "short copies (< 12 apart)",
                         "val_acc_induction_long": "long copies (≥ 12 apart)"}


def mechanism_counts(labels: pd.DataFrame, schemes: Sequence[str]) -> pd.DataFrame:
    """Per scheme: n runs and, for every label of ``offsets.MECHANISMS``, runs with it (k/n)."""
    return _runs_with(labels, schemes, {m: (lambda g, m=m: g.mechanism == m)
                                        for m in REPORT_ORDER})


def copy_distance_accuracy(behavior: pd.DataFrame) -> pd.DataFrame:
    """Per run: induction accuracy on short and long copies and their gap (long − short), long
    format (run, scheme, seed, step, metric, value); the gap is ~0 for classic induction and large
    for long-offset recall."""
    b = behavior[behavior.metric.isin(list(COPY_DISTANCE_METRICS))]
    cols = ["run", "scheme", "seed", "step", "metric", "value"]
    if b.empty:
        return pd.DataFrame(columns=cols)
    b = b.groupby(cols[:-1], as_index=False).value.mean()
    wide = b.pivot_table(index=cols[:4], columns="metric", values="value").reset_index()
    gap = wide.assign(metric="val_acc_induction_long_minus_short",
                      value=wide.get("val_acc_induction_long", np.nan) - wide.get("val_acc_induction_short", np.nan))
    return pd.concat([b, gap[cols]], ignore_index=True)[cols]


def path_summary(paths: pd.DataFrame) -> pd.DataFrame:
    """Per run (``paths`` rows at one step): the copying head's mechanism and, per input Q, K, V,
    the largest loss of induction accuracy when one earlier head is removed from that input alone,
    with that head (``ablation.path_ablation_effects``)."""
    acc = paths[paths.metric.str.match(r"path_[qkv]_acc_delta")] if len(paths) else paths
    cols = ["run", "scheme", "seed", "step", "mechanism", "head"] + [f"{c} {w}" for c in "QKV" for w in ("Δacc", "via")]
    if acc.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (run, scheme, seed, step), g in acc.groupby(["run", "scheme", "seed", "step"], sort=True):
        row = dict(run=run, scheme=scheme, seed=seed, step=step, mechanism=g.mechanism.iloc[0],
                   head=f"L{int(g.ablated_layer.iloc[0])}H{int(g.ablated_head.iloc[0])}")
        for c in "qkv":
            worst = g[g.metric == f"path_{c}_acc_delta"].nsmallest(1, "value")
            row[f"{c.upper()} Δacc"] = float(worst.value.iloc[0]) if len(worst) else math.nan
            row[f"{c.upper()} via"] = f"L{int(worst.layer.iloc[0])}H{int(worst['head'].iloc[0])}" if len(worst) else "—"
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _mechanism_view(study: Study, sec: Section, res: Result, key: str, label: str, matched: pd.DataFrame,
                    n_boot: int, seed: int) -> None:
    """The copying mechanism of every run at its matched checkpoint (``offsets.mechanism_labels``),
    counts per scheme, and induction accuracy on short vs long copies per scheme (mean [95% CI])."""

    labels = mechanism_labels(at_matched(study.table("offsets"), matched))
    paths = path_summary(at_matched(study.table("paths"), matched))
    acc = copy_distance_accuracy(at_matched(study.table("behavior"), matched))
    if labels.empty and acc.empty:
        return
    sec.text(MECHANISM_SENTENCE)
    if len(labels):
        per_run = labels.assign(
            head=[f"L{r.layer}H{r.head}" + (f" via L{r.source_layer}H{r.source_head}" if r.source_head >= 0 else "")
                  if r.layer >= 0 else "—" for r in labels.itertuples()])
        if len(acc):
            wide = acc.pivot_table(index="run", columns="metric", values="value").reset_index()
            per_run = per_run.merge(wide, on="run", how="left")
        shown = ["run", "scheme", "seed", "step", "mechanism", "head", "score"] + \
            [c for c in ("val_acc_induction_short", "val_acc_induction_long") if c in per_run.columns]
        res.tables[f"{key}_mechanism_labels"] = per_run[shown]
        res.tables[f"{key}_mechanism_counts"] = mechanism_counts(labels, study.schemes)
        sec.table(res.tables[f"{key}_mechanism_counts"],
                  f"{label}: copying mechanism per scheme, runs with each label (k/n; offsets.classify_mechanism: "
                  f"classic_induction = a layer-1 head with ≥ 0.3 attention on +1 from the earlier copy; "
                  f"shifted_induction = else a layer-1 head with ≥ 0.3 on +2 and ≥ 0.25 on offsets 0/+1 when rolled "
                  f"back through a layer-0 head; "
                  f"long_offset_recall = else a layer-1 head with < 0.1 within ±3 of the copy and ≥ 0.25 on offsets "
                  f"0/+1 when rolled back through a layer-0 head).")
        sec.table(res.tables[f"{key}_mechanism_labels"],
                  f"{label}: mechanism per run, the deciding head and its score (attention mass), with the run's "
                  f"induction accuracy on short and long copies.")
    if len(paths):
        res.tables[f"{key}_mechanism_paths"] = paths
        sec.table(paths, f"{label}: which input of its copying head each run's layer-0 heads act through: per input, "
                         f"the largest drop of induction accuracy on BOS + A + A when one layer-0 head is mean-ablated "
                         f"in that input alone, and that head (ablation.path_ablation_effects; notebook 04 measures "
                         f"the final checkpoint only). K carries the match with the earlier copy; a large V drop means "
                         f"the copied token is read from a layer-0 head's output, not from the embedding.")
    if len(acc):
        summ = summarise(acc, ["metric", "scheme"], n_boot=n_boot, seed=seed)
        res.tables[f"{key}_copy_distance_accuracy"] = summ
        names = {**COPY_DISTANCE_METRICS, "val_acc_induction_long_minus_short": "long − short"}
        wide = summ.assign(what=summ.metric.map(names),
                           cell=[format_ci(*r) + f" (n={n})" for r, n in
                                 zip(summ[["mean", "ci_low", "ci_high"]].values, summ.n)]) \
            .pivot_table(index="scheme", columns="what", values="cell", aggfunc="first")
        wide = wide.reindex([s for s in study.schemes if s in wide.index])
        wide = wide[[c for c in names.values() if c in wide.columns]].reset_index()
        wide.columns.name = None
        sec.table(wide, f"{label}: validation induction accuracy by distance between the two copies, mean [95% "
                        f"bootstrap CI] over seeds (n). Long-offset recall fails on short copies; classic induction "
                        f"does not.")


def _rq2_view(study: Study, sec: Section, res: Result, key: str, label: str, matched: pd.DataFrame, role_threshold: float,
              eps: float, ablation_metric: str, cka_cache: ResidualCache | None, n_boot: int, n_perm: int,
              seed: int) -> None:
    res.tables[f"{key}_matched"] = matched
    _mechanism_view(study, sec, res, key, label, matched, n_boot, seed)
    att = at_matched(study.table("attention"), matched)
    roles = head_roles(att, role_threshold)
    res.tables[f"{key}_roles"] = roles
    if len(roles):
        sec.table(role_summary(roles, study.schemes),
                  f"{label}: runs with at least one head of each role (score ≥ {role_threshold}), per layer.")
        sec.table(role_strings(roles), f"{label}: head roles per run (heads in index order).")
        for metric in ("induction_score", "prev_token_score"):
            sub = att[(att.metric == metric) & (att["head"] >= 0)]
            if len(sub):
                fig = plots.heatmap_grid(sub, f"{label}: {metric} per head (rows: scheme, columns: seed)",
                                         colorscale="Viridis", zmid=None, zrange=(0, 1))
                res.figures[f"rq2_{key}_{metric}"] = fig
                sec.figure(fig)
    elif study.has("attention"):
        sec.note(f"{label}: no attention rows at the matched checkpoints (or no role scores "
                 f"{', '.join(ROLE_METRICS.values())}).", "warning")

    abl = at_matched(study.table("ablation"), matched)
    sub = abl[(abl.metric == ablation_metric) & (abl["head"] >= 0)]
    if len(sub):
        fig = plots.heatmap_grid(sub, f"{label}: {ablation_metric} per head (rows: scheme, columns: seed)")
        res.figures[f"rq2_{key}_ablation"] = fig
        sec.figure(fig, "Ablation effect matrices side by side (red: ablating the head hurts).")
    scalars = mechanism_scalars(study, matched)
    if len(scalars):
        summ, tests = _scalar_tests(scalars, study.schemes, n_boot, n_perm, seed)
        res.tables[f"{key}_mechanism"] = summ
        res.tables[f"{key}_mechanism_tests"] = tests
        wide = summ.assign(cell=[format_ci(*r) + f" (n={n})" for r, n in
                                 zip(summ[["mean", "ci_low", "ci_high"]].values, summ.n)]) \
            .pivot_table(index="feature", columns="scheme", values="cell", aggfunc="first", sort=False)
        wide = wide[[s for s in study.schemes if s in wide.columns]].reset_index()
        sec.table(wide, f"{label}: localisation indices (top-1 share and entropy of |effects|), logit-lens first "
                        f"rank-1 layer and the induction circuit per scheme, mean [95% CI] (n seeds).")
        sec.table(tests, f"{label}: pairwise permutation tests per feature (Holm within each feature).")

    profiles = ablation_profiles(abl, ablation_metric)
    cka = cka_cache.cka if cka_cache is not None else None
    pairs = similar_loss_pairs(matched, roles, profiles, eps, cka)
    res.tables[f"{key}_similar_loss_pairs"] = pairs
    if len(pairs):
        sec.table(pairs, f"{label}: similar loss, different minds — run pairs with |Δ val loss| < {eps}, most "
                         f"different ablation profiles first (cosine distance of within-layer-sorted effects; role "
                         f"disagreement = fraction of heads to relabel under the best within-layer matching; "
                         f"CKA = linear CKA of residual streams on the same validation tokens).")
        within = pairs.groupby("same_scheme")[["ablation_distance", "role_disagreement", "cka_final"]].mean()
        sec.table(within.reset_index(), f"{label}: mean mechanism distance for same-scheme (seed baseline) vs "
                                        f"cross-scheme pairs.")
    else:
        sec.note(f"{label}: no pair of runs has val losses within {eps} of each other at these checkpoints.")


def rq2(study: Study, match_step: int = -1, loss_match_target: float = 0.0, role_threshold: float = 0.4,
        similar_loss_eps: float = 0.05, ablation_metric: str = "zero_ablation_loss_delta",
        cka_sequences: int = 128, n_boot: int = 10_000, n_perm: int = 10_000, seed: int = 0) -> Result:
    sec = Section("RQ2 · Mechanisms at step- and loss-matched checkpoints")
    res = Result(sec)
    for name, mets in (("attention", list(ROLE_METRICS.values())), ("ablation", [ablation_metric]),
                       ("patching", ["localisation_top1_share"]), ("logit_lens", ["first_rank1_layer"]),
                       ("circuits", ["ov_copying_score", "k_composition_z"]),
                       ("offsets", ["copy_offset_plus1", "composed_copy_mass"]),
                       ("behavior", list(COPY_DISTANCE_METRICS))):
        note = _missing_note(study, name, mets)
        if note:
            sec.note(note, "warning")
    metrics = study.table("metrics")
    candidates = candidate_steps(study.table("attention"), study.table("ablation"))
    if candidates.empty or metrics.empty:
        sec.note("No attention or ablation table (or no metrics): RQ2 cannot be answered for this preset.", "warning")
        return res
    used = pd.concat([study.table("attention"), study.table("ablation")])
    sec.text(seeds_note(study, used, "Runs with mechanism tables"))
    cka_cache = ResidualCache(study.preset, study.root, cka_sequences) if cka_sequences > 0 else None

    sm, step = step_matched(candidates, metrics, match_step)
    sec.heading(f"Step-matched: every run at step {step}" if step is not None else "Step-matched")
    if step is None:
        sec.note("No checkpoint step is analysed in every run; step-matched view skipped.", "warning")
    else:
        lacking = sm[sm.step.isna()].run.tolist()
        if lacking:
            sec.note(f"Runs without an analysed checkpoint at step {step}: {', '.join(lacking)}.", "warning")
        _rq2_view(study, sec, res, "step", f"Step-matched (step {step})", sm, role_threshold, similar_loss_eps,
                  ablation_metric, cka_cache, n_boot, n_perm, seed)

    target = loss_match_target if loss_match_target > 0 else auto_loss_target(metrics)
    lm = loss_matched(candidates, metrics, target)
    how = "given" if loss_match_target > 0 else "automatic: the largest per-scheme median final val loss"
    sec.heading(f"Loss-matched: first checkpoint with val loss ≤ {target:.4g} ({how})")
    never = lm[~lm.reached].run.tolist()
    if never:
        sec.note(f"Never reached val loss ≤ {target:.4g} at an analysed checkpoint: {', '.join(never)}.", "warning")
    sec.table(lm, "Loss-matched checkpoint per run.")
    _rq2_view(study, sec, res, "loss", f"Loss-matched (val loss ≤ {target:.4g})", lm, role_threshold, similar_loss_eps,
              ablation_metric, cka_cache, n_boot, n_perm, seed)
    if cka_cache is not None and cka_cache.errors:
        sec.note("CKA left empty where a checkpoint could not be read: " +
                 "; ".join(f"{k}: {v}" for k, v in list(cka_cache.errors.items())[:10]), "warning")
    res.tables["loss_target"] = pd.DataFrame([dict(target=target, how=how)])
    return res


# =============================================================================================
# RQ3: geometry.

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


def rq3(study: Study, em: pd.DataFrame | None, early_fraction: float = 0.1, n_boot: int = 2_000,
        n_perm: int = 10_000, seed: int = 0) -> Result:
    sec = Section("RQ3 · Geometry")
    res = Result(sec)
    geo = _section_table(study, sec, "geometry", ["resid_norm", "effective_rank", "drift"], "Runs with a geometry table")
    if geo.empty:
        return res
    feats = feature_table(geo[(geo.step >= 0) & geo.metric.isin(GEOMETRY_METRICS)], ["matrix"], GEOMETRY_LAYERED)
    res.tables["geometry_features"] = feats
    for metric, g in feats.groupby("metric", sort=False):
        summ = band_summary(g, extra=["feature"], n_boot=n_boot, seed=seed)
        panels = list(dict.fromkeys(g.feature))
        fig = plots.band_grid(summ, f"{metric} over training per scheme", panel="feature", panels=panels,
                              colors=study.colors, n_cols=min(3, len(panels)))
        res.figures[f"rq3_{metric}"] = fig
        sec.figure(fig, f"{metric}: mean over seeds with 95% bootstrap CI band (averaged over heads/layers unless "
                        f"the panel names one).")
    if em is None or em.empty:
        sec.note("No emergence steps (metrics table missing): the early-geometry correlation is skipped.", "warning")
        return res
    early = early_values(feats, study.horizon, early_fraction)
    corr = early_geometry_correlation(early, em, n_perm=n_perm, seed=seed)
    res.tables["early_correlation"] = corr
    steps = sorted(early.step.unique())
    sec.heading(f"Early geometry ({early_fraction:.0%} of training, steps used: {steps}) vs emergence step")
    sec.table(corr, "Spearman ρ between each early geometry feature and the restricted emergence step (never = "
                    "horizon), pooled over runs and within schemes (ranks centred per scheme, permutations within "
                    "schemes); p from permutations, Holm over features.")
    top = corr.dropna(subset=["rho"]).head(4).feature.tolist()
    if top:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

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


PERSISTENCE_METRICS = ("pattern_similarity_to_donor", "ablation_share", "cka_to_donor")


def persistence(study: Study, n_boot: int = 2_000, seed: int = 0) -> Result:
    """Do the `seeded` head slots keep the donor's role? The same slots under the other schemes
    are the baseline (their similarity to a donor they never saw is what chance looks like)."""

    sec = Section("Persistence · do the seeded head slots keep the donor's role?")
    res = Result(sec)
    table = _section_table(study, sec, "persistence", PERSISTENCE_METRICS, "Runs with a persistence table")
    if table.empty:
        return res
    slots = (seeded_slots(table)
             .groupby(["scheme", "seed", "run", "step", "layer", "metric"], as_index=False).value.mean()
             .assign(panel=lambda d: d.metric + ", layer " + d.layer.astype(str)))
    summary = band_summary(slots, extra=["panel"], n_boot=n_boot, seed=seed)
    panels = sorted(slots.panel.unique())
    fig = plots.band_grid(summary, "Seeded head slots vs the donor over training (mean over seeds, 95% CI)",
                          panel="panel", panels=panels, colors=study.colors, n_cols=min(3, len(panels)))
    res.figures["persistence"] = fig
    sec.figure(fig, "Pattern similarity (1 − Jensen–Shannon) of each seeded slot to its donor head, the slots' share "
                    "of the total |ablation effect| on induction loss, and linear CKA between the donor's residual "
                    "stream and the student's seeded subspace; mean over a layer's seeded slots. Under schemes other "
                    "than `seeded` the same slots are the baseline.")
    final = slots[slots.step == slots.groupby("run").step.transform("max")]
    res.tables["persistence_final"] = summarise(final, by=["metric", "layer", "scheme"], n_boot=n_boot, seed=seed)
    sec.table(res.tables["persistence_final"], "At each run's last scored checkpoint: mean over seeds with 95% "
                                               "bootstrap CI (n = seeds).")
    return res


# =============================================================================================
# Overview, headline, output.


def overview(study: Study) -> Result:
    sec = Section("Runs and data")
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
    return res


def headline(study: Study, r1: Result, r2: Result) -> Result:
    """One row per scheme with the headline numbers, mean [95% CI] (n seeds)."""
    sec = Section("Headline numbers per scheme")
    res = Result(sec)
    usable = study.status[study.status.run.isin(study.usable_runs)].groupby("scheme").size()
    rows = {s: {"scheme": s, "n": int(usable.get(s, 0))} for s in study.schemes}
    fin = r1.tables.get("final")
    if fin is not None:
        for r in fin.itertuples():
            rows[r.scheme][f"final {r.metric}"] = format_ci(r.mean, r.ci_low, r.ci_high)
    em = r1.tables.get("emergence_summary")
    if em is not None:
        for r in em.itertuples():
            rows[r.scheme]["emerged"] = f"{r.emerged}/{r.n}"
            rows[r.scheme]["emergence step (never = horizon)"] = (
                f"never (> {study.horizon})" if r.emerged == 0 else format_ci(r.restricted_mean, r.restricted_low, r.restricted_high))
    mech = r2.tables.get("step_mechanism")
    if mech is not None and len(mech):
        keep = [f for f in mech.feature.unique() if "top1_share" in f and ("zero_ablation" in f or "patching" in f)]
        for r in mech[mech.feature.isin(keep)].itertuples():
            rows[r.scheme][f"{r.feature} (step-matched)"] = format_ci(r.mean, r.ci_low, r.ci_high)
    counts = r2.tables.get("step_mechanism_labels")
    if counts is not None and len(counts):
        for s, g in counts.groupby("scheme"):
            k = g.mechanism.value_counts()
            rows[s]["copying mechanism (step-matched)"] = " · ".join(
                f"{m} {int(k.get(m, 0))}" for m in REPORT_ORDER) + f" (n={len(g)})"
    roles = r2.tables.get("step_roles")
    if roles is not None and len(roles):
        for s, g in roles.groupby("scheme"):
            last = int(g.layer.max())
            k = g[(g.layer == last) & (g.role == "induction")].run.nunique()
            rows[s][f"runs with an L{last} induction head"] = f"{k}/{g.run.nunique()}"
    table = pd.DataFrame(list(rows.values()))
    res.tables["headline"] = table
    sec.table(table, "mean [95% bootstrap CI] over seeds; k/n = runs out of seeds analysed. Pairwise tests are in "
                     "the sections below.")
    return res


def figures_dir(preset: str, root: str | Path) -> Path:
    return resolve_root(root) / "figures" / preset


def save_outputs(study: Study, results: list[Result], static: bool = True) -> dict[str, Path]:
    """Write every figure to ``figures/<preset>/07_<name>.html`` (+PNG/SVG when possible), every
    table to ``data/compare/<preset>/<name>.csv``, and ``figures/<preset>/report.html``."""
    out_dir = figures_dir(study.preset, study.root)
    table_dir = study.root / "data" / "compare" / study.preset
    table_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for r in results:
        for name, fig in r.figures.items():
            written[name] = plots.save_figure(fig, out_dir / f"07_{name}", static=static, self_contained=True)[0]
        for name, t in r.tables.items():
            t.to_csv(table_dir / f"{name}.csv", index=False)
    meta = (f"preset {study.preset} · schemes {', '.join(study.schemes)} · seeds {list(study.seeds)}"
            f" · {len(study.usable_runs)} usable runs")
    written["report"] = write_report(out_dir / "report.html", f"initmi · does initialisation change the mechanism? "
                                     f"({study.preset})", [r.section for r in results], meta)
    return written


def run_compare(preset: str, root: str | Path, emergence_threshold: float = 0.8, match_step: int = -1,
            loss_match_target: float = 0.0, role_threshold: float = 0.4, similar_loss_eps: float = 0.05,
            early_fraction: float = 0.1, cka_sequences: int = 128, n_boot: int = 10_000, n_perm: int = 10_000,
            seed: int = 0, static: bool = True, seeds: Sequence[int] | None = None) -> tuple[list[Result], dict[str, Path]]:
    """The whole comparison in one call (what 07_compare runs, cell by cell)."""
    study = load_study(preset, root, seeds)
    r0 = overview(study)
    r1 = rq1(study, emergence_threshold, n_boot, n_perm, seed)
    r2 = rq2(study, match_step, loss_match_target, role_threshold, similar_loss_eps, cka_sequences=cka_sequences,
             n_boot=n_boot, n_perm=n_perm, seed=seed)
    r3 = rq3(study, r1.tables.get("emergence"), early_fraction, min(n_boot, 2000), n_perm, seed)
    r4 = persistence(study, min(n_boot, 2000), seed)
    results = [r0, headline(study, r1, r2), r1, r2, r3, r4]
    return results, save_outputs(study, results, static)
