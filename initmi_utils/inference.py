"""Seed statistics on long tables: per-scheme intervals and the omnibus + reference-family tests.

``stats`` holds the arithmetic (arrays in, numbers out); this module applies it to the
comparison's long frames (one row per run, or per run and step) and writes the sentences the
report uses to name each method. The scheme comparison of one quantity is always the same three
steps (``scheme_tests``):

1. **Omnibus** across all schemes with at least 2 seeds: Kruskal–Wallis for scalar features,
   the permutation one-way test on restricted means (never = horizon) for emergence steps
   (``stats`` explains why not a k-sample log-rank).
2. **Reference families**: every scheme against one reference (default ``normal``), Holm within
   a family. The base schemes (xavier, kaiming, orthogonal, scaled_residual, mimetic: 5 tests,
   best attainable Holm p at 5 v 5 seeds 5 × 2/252 ≈ 0.04) form one family; the schemes that embed
   a trained donor (``seeded``) another (1 test). A pair is ``declared`` different when its
   Holm-adjusted p ≤ α *and* the omnibus p ≤ α (the omnibus gates its follow-ups; Holm alone
   already controls the family-wise error, the gate only removes rejections). Pairs use the
   permutation test on the difference of means (``method="mean"``) or the log-rank test with an
   exact permutation p (``method="logrank"``).
3. **All pairs** (every scheme pair, Holm over all of them) for the CSV only: with 21 pairs the
   best attainable Holm p at 5 seeds is 21 × 2/252 = 0.17, so they cannot be read as tests in the
   report.

A family's table goes into the report only when it can reach significance (``family_floor`` ≤
α); otherwise ``family_note`` gives the one sentence that says why (n per scheme, the floor).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import pandas as pd

from initmi_utils.stats import (ALPHA, family_floor, holm, kruskal_test, logrank_test, median_interval, p_floor,
                                permutation_oneway, permutation_test, t_interval, t_intervals)

REFERENCE = "normal"
DONOR_SCHEMES = ("seeded",)  # schemes that embed a trained donor: a family of their own

# The interval of every table, named where it is shown.
MEAN_CI = "95% t-interval"
MEDIAN_CI = "order-statistic interval"
MEAN_CI_SENTENCE = (f"mean [{MEAN_CI} of the mean over seeds, mean ± t(n−1)·s/√n]")
MEDIAN_CI_SENTENCE = ("median [order-statistic interval [min, max] over seeds, which covers the median with "
                      "probability 1 − 2·0.5ⁿ: 93.75% at n = 5, 87.5% at n = 4; an end on a run that never emerged "
                      "is 'not reached']")
STATISTICS_TEXT = (
    "How to read the statistics. Means over seeds carry a 95% t-interval (mean ± t(n−1)·s/√n). Simulated at "
    "n = 5 seeds it covers the true mean 95% of the time on normal data, 93% on gamma(shape 4) data and 88% on "
    "exponential data (skewed data make it too short on the long side); the percentile bootstrap used before "
    "covered only 84% even on normal data. Emergence steps are skewed (most runs emerge close together, some late, "
    "some never) and censored at the training horizon, so they are summarised by the median with the "
    "order-statistic interval [min, max] (level 1 − 2·0.5ⁿ: 93.75% at n = 5), whose upper end is 'not reached' "
    "when a run never emerged; their restricted mean (never = horizon) gets the t-interval. "
    "Schemes are compared in two steps: an omnibus test across all schemes first (Kruskal–Wallis for scalar "
    "features; for emergence a permutation one-way test on the restricted means, scipy's log-rank being "
    "two-sample only), then each scheme against the reference scheme only (permutation test on the difference of "
    "means, exact over all 252 relabellings at 5 v 5; for emergence the log-rank test with the same exact "
    "permutation p), Holm-corrected within a family: the base schemes form one family, schemes that embed a "
    "trained donor (seeded) another. A pair is declared different when its Holm p ≤ α and the omnibus p ≤ α. "
    "With n seeds per scheme no permutation p can be below 2 / C(2n, n) (0.0079 at n = 5), so a family of m "
    "tests cannot reach Holm p below m times that; a family's table is shown only when this is ≤ α, otherwise a "
    "sentence says why. Tests of every scheme pair are in the CSVs only (data/compare/<preset>/*_all_pairs.csv).")


# =============================================================================================
# Formatting.


def _fmt(v: float, digits: int) -> str:
    """``digits`` significant digits, but never an exponent for numbers below a million (a
    step of 2000 stays "2000"); +inf (a censored end) is "not reached"."""
    if v == math.inf:
        return "not reached"
    if 1 <= abs(v) < 1e6:
        digits = max(digits, int(math.log10(abs(v))) + 1)
    return f"{v:.{digits}g}"


def format_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    """``mean [lo, hi]`` with ``digits`` significant digits; no interval when there is none;
    ``inf`` (a censored end) as "not reached"."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def format_level(level: float) -> str:
    """An interval's coverage level as a percentage (0.9375 → '93.75%')."""
    return "—" if level is None or math.isnan(level) else f"{100 * level:.4g}%"


# =============================================================================================
# Per-scheme intervals.


def summarise(df: pd.DataFrame, by: str | list[str], value: str = "value", level: float = 0.95) -> pd.DataFrame:
    """Per group: n (non-missing values), mean, ci_low, ci_high (the t-interval of the mean)."""
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for keys, g in df.groupby(by, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        mean, lo, hi = t_interval(g[value], level)
        rows.append({**dict(zip(by, keys)), "n": int(g[value].notna().sum()), "mean": mean, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=by + ["n", "mean", "ci_low", "ci_high"])


def band_summary(df: pd.DataFrame, group: str = "scheme", unit: str = "seed", x: str = "step",
                 value: str = "value", extra: Sequence[str] = (), level: float = 0.95) -> pd.DataFrame:
    """Mean over ``unit`` (seeds) and its t-interval at every ``x``, per ``group`` (and ``extra``).

    Pointwise: at each x the interval of the mean of the seeds that have that point (``n`` says
    how many); fewer than 2 seeds give no interval.
    """
    rows = []
    for keys, g in df.groupby([group, *extra], sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        wide = g.pivot_table(index=unit, columns=x, values=value, aggfunc="mean")
        mean, lo, hi, n = t_intervals(wide.to_numpy(dtype=float), level, axis=0)
        part = pd.DataFrame({x: wide.columns, "mean": mean, "ci_low": lo, "ci_high": hi, "n": n})
        for k, val in zip([group, *extra], keys):
            part[k] = val
        rows.append(part)
    cols = [group, *extra, x, "mean", "ci_low", "ci_high", "n"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


# =============================================================================================
# Scheme tests.

OMNIBUS_NAME = {"kruskal": "Kruskal–Wallis", "permutation": "permutation one-way (means)"}
PAIR_NAME = {"mean": "permutation (difference of means)", "logrank": "log-rank, exact permutation p"}
OMNIBUS_COLUMNS = ["test", "k", "n per scheme", "statistic", "p", "significant"]
PAIR_COLUMNS = {"mean": ["mean_a", "mean_b", "difference"], "logrank": ["median_a", "median_b", "z", "p_asymptotic"]}


def scheme_families(schemes: Sequence[str], reference: str = REFERENCE) -> dict[str, list[str]]:
    """The reference-comparison families: {"base": the other schemes, "seeded": the donor-embedding
    ones}, each in ``schemes`` order, empty families dropped; {} when ``reference`` is absent."""
    if reference not in schemes:
        return {}
    others = [s for s in schemes if s != reference]
    fams = {"base": [s for s in others if s not in DONOR_SCHEMES],
            "seeded": [s for s in others if s in DONOR_SCHEMES]}
    return {k: v for k, v in fams.items() if v}


def _groups(df: pd.DataFrame, group: str, value: str, order: Sequence[str] | None) -> list[str]:
    """Groups in ``order`` (or first appearance) that have at least one non-missing value."""
    names = [g for g in (order or list(dict.fromkeys(df[group]))) if (df[group] == g).any()]
    return [g for g in names if df.loc[df[group] == g, value].notna().any()]


def _values(df: pd.DataFrame, group: str, value: str, name: str) -> np.ndarray:
    x = np.asarray(df.loc[df[group] == name, value], dtype=float)
    return x[~np.isnan(x)]


def omnibus_test(df: pd.DataFrame, group: str = "scheme", value: str = "value", order: Sequence[str] | None = None,
                 method: str = "kruskal", n_perm: int = 10_000, seed: int = 0, alpha: float = ALPHA) -> dict:
    """One omnibus test across every group with ≥ 2 values: Kruskal–Wallis (``method="kruskal"``)
    or the permutation one-way test on means (``method="permutation"``; for emergence it is given
    the restricted steps, never = horizon)."""
    names = _groups(df, group, value, order)
    samples = {g: _values(df, group, value, g) for g in names}
    if method == "permutation":
        stat, p = permutation_oneway(list(samples.values()), n_perm, seed)
    else:
        stat, p = kruskal_test(list(samples.values()))
    used = {g: len(v) for g, v in samples.items() if len(v) >= 2}
    return {"test": OMNIBUS_NAME[method], "k": len(used),
            "n per scheme": ", ".join(f"{g} {n}" for g, n in used.items()), "statistic": stat, "p": p,
            "significant": bool(p <= alpha) if not math.isnan(p) else False}


def _pair_row(xa: np.ndarray, xb: np.ndarray, method: str, n_perm: int, seed: int) -> dict:
    row = dict(n_a=len(xa), n_b=len(xb))
    if method == "logrank":
        z, p, p_asym = logrank_test(xa, xb, n_perm, seed)
        row.update(median_a=median_interval(xa)[0] if len(xa) else math.nan,
                   median_b=median_interval(xb)[0] if len(xb) else math.nan, z=z, p_asymptotic=p_asym, p=p)
    else:
        ma = xa.mean() if len(xa) else math.nan
        mb = xb.mean() if len(xb) else math.nan
        row.update(mean_a=ma, mean_b=mb, difference=ma - mb, p=permutation_test(xa, xb, n_perm, seed))
    row["p_floor"] = p_floor(len(xa), len(xb))
    return row


def pairwise_tests(df: pd.DataFrame, group: str = "scheme", value: str = "value", order: Sequence[str] | None = None,
                   n_perm: int = 10_000, seed: int = 0, method: str = "mean") -> pd.DataFrame:
    """Every pair of groups (for the CSV): n, means (or medians, z), p, Holm over all the pairs
    (``p_holm``), p_floor. Groups without a value are left out."""
    names = _groups(df, group, value, order)
    rows = [dict(a=a, b=b, **_pair_row(_values(df, group, value, a), _values(df, group, value, b), method, n_perm,
                                       seed)) for a, b in itertools.combinations(names, 2)]
    cols = ["a", "b", "n_a", "n_b", *PAIR_COLUMNS[method], "p", "p_holm", "p_floor"]
    out = pd.DataFrame(rows, columns=[c for c in cols if c != "p_holm"])
    out.insert(cols.index("p_holm"), "p_holm", holm(out["p"]) if len(out) else [])
    return out


def reference_tests(df: pd.DataFrame, reference: str = REFERENCE, group: str = "scheme", value: str = "value",
                    order: Sequence[str] | None = None, method: str = "mean", omnibus_p: float = math.nan,
                    n_perm: int = 10_000, seed: int = 0, alpha: float = ALPHA) -> pd.DataFrame:
    """Each scheme against ``reference`` (``a`` = scheme, ``b`` = reference), one family per
    ``scheme_families`` entry: p, ``p_holm`` (Holm within the family), ``p_floor`` and
    ``declared`` (Holm p ≤ α and ``omnibus_p`` ≤ α)."""
    names = _groups(df, group, value, order)
    cols = ["family", "a", "b", "n_a", "n_b", *PAIR_COLUMNS[method], "p", "p_holm", "p_floor", "declared"]
    if reference not in names:
        return pd.DataFrame(columns=cols)
    xb = _values(df, group, value, reference)
    parts = []
    for family, members in scheme_families(names, reference).items():
        rows = [dict(family=family, a=a, b=reference, **_pair_row(_values(df, group, value, a), xb, method, n_perm,
                                                                   seed)) for a in members]
        t = pd.DataFrame(rows)
        t["p_holm"] = holm(t["p"])
        t["declared"] = (t.p_holm <= alpha) & (omnibus_p <= alpha)
        parts.append(t)
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def scheme_tests(df: pd.DataFrame, schemes: Sequence[str], value: str = "value", method: str = "mean",
                 reference: str = REFERENCE, by: str | None = None, n_perm: int = 10_000, seed: int = 0,
                 alpha: float = ALPHA, omnibus: str = "kruskal", omnibus_value: str | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The whole scheme comparison of one quantity (per value of ``by``, e.g. ``feature``):
    (omnibus, reference families, all pairs), each with the ``by`` column first when given.

    ``method`` names the pair test ("mean": permutation on the difference of means; "logrank":
    ``value`` holds event times, +inf = censored), ``omnibus`` the k-sample test ("kruskal" or
    "permutation") and ``omnibus_value`` the column it reads (default ``value``; emergence passes
    the restricted steps)."""
    groups = [(None, df)] if by is None else list(df.groupby(by, sort=False))
    omni, ref, pairs = [], [], []
    for key, g in groups:
        o = omnibus_test(g, "scheme", omnibus_value or value, schemes, omnibus, n_perm, seed, alpha)
        r = reference_tests(g, reference, "scheme", value, schemes, method, o["p"], n_perm, seed, alpha)
        a = pairwise_tests(g, "scheme", value, schemes, n_perm, seed, method)
        if by is not None:
            o = {by: key, **o}
            r.insert(0, by, key)
            a.insert(0, by, key)
        omni.append(o)
        ref.append(r)
        pairs.append(a)
    lead = [by] if by is not None else []
    omni = pd.DataFrame(omni, columns=lead + OMNIBUS_COLUMNS)
    ref = pd.concat(ref, ignore_index=True) if ref else pd.DataFrame()
    pairs = pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame()
    return omni, ref, pairs


def can_reach(tests: pd.DataFrame, alpha: float = ALPHA) -> bool:
    """Whether a family of tests could reach Holm-adjusted significance: ``family_floor`` ≤ α."""
    f = family_floor(tests.p_floor) if len(tests) else math.nan
    return not math.isnan(f) and f <= alpha


def family_note(tests: pd.DataFrame, alpha: float = ALPHA, what: str = "") -> str | None:
    """The sentence shown instead of a family's table when it cannot reach significance (None
    when it can): the family, n per scheme and the floor."""
    if tests.empty or can_reach(tests, alpha):
        return None
    fam = str(tests.family.iloc[0]) if "family" in tests.columns else "pairs"
    m = len(tests)
    n = dict(zip(tests.a, tests.n_a))
    if "b" in tests.columns and len(set(tests.b)) == 1:
        n = {tests.b.iloc[0]: int(tests.n_b.iloc[0]), **n}
    best = float(np.nanmin(tests.p_floor))
    return (f"{what + ': ' if what else ''}family '{fam}' ({', '.join(tests.a.astype(str).unique())} vs "
            f"{', '.join(tests.b.astype(str).unique())}; {m} test{'s' if m > 1 else ''}) is not shown: with seeds per "
            f"scheme {', '.join(f'{k} {int(v)}' for k, v in n.items())} the smallest attainable permutation p is "
            f"{best:.3g}, and Holm over {m} test{'s' if m > 1 else ''} makes the best attainable adjusted p "
            f"{min(1.0, best * m):.3g} > α = {alpha}: no test in it can be significant, whatever the effect size. "
            f"Read the intervals, or run more seeds (preset 'full').")


def floor_note(tests: pd.DataFrame, alpha: float = ALPHA) -> str | None:
    """``family_note`` for one family (or a table of all pairs): None when it can reach α."""
    if tests.empty or can_reach(tests, alpha):
        return None
    return family_note(tests, alpha) if "family" in tests.columns else (
        f"With these seed counts the smallest attainable Holm-adjusted p over the {len(tests)} pairs is "
        f"{family_floor(tests.p_floor):.3g} > {alpha}: no pairwise difference can be declared significant, "
        f"whatever its size.")


__all__ = ["REFERENCE", "DONOR_SCHEMES", "MEAN_CI", "MEDIAN_CI", "MEAN_CI_SENTENCE", "MEDIAN_CI_SENTENCE",
           "STATISTICS_TEXT", "ALPHA", "format_ci", "format_level", "summarise", "band_summary", "scheme_families",
           "omnibus_test", "pairwise_tests", "reference_tests", "scheme_tests", "can_reach", "family_note",
           "floor_note", "PAIR_NAME", "OMNIBUS_NAME"]
