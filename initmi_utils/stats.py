"""Statistics for comparing init schemes over a handful of seeds: pure functions of arrays.

The bottom layer of the comparison (numpy and scipy only; ``inference`` applies these to the
long tables, ``rq1``-``rq3`` to the study). Each choice below is made for what the study has:
5 seeds per scheme (preset ``full``), 7 schemes, emergence steps censored at the horizon.

Intervals
---------
- *Means over seeds* get the **t-interval** ``mean ± t(n-1) · s / √n`` (``t_interval``,
  ``scipy.stats.t``). Its coverage of the nominal 95% at n = 5, simulated with 10⁶ samples of 5:
  **0.950** on normal data, **0.932** on gamma(shape 4) data, **0.883** on exponential data
  (strong skew: the interval is too short on the side of the long tail). The percentile
  bootstrap compare used before (``percentile_bootstrap_ci``, kept only for this comparison)
  covers **0.838** on *normal* data at n = 5 (40,000 samples, 2000 resamples each): resampling 5
  values cannot see beyond them, so it is too narrow everywhere. ``tests/test_stats.py``
  re-measures all four with 4000 samples and requires ≥ 0.93 (normal) and ≥ 0.91 (gamma 4),
  which the t-interval meets and the percentile bootstrap fails.
- *Skewed quantities* (emergence steps: most runs emerge within a few hundred steps of one
  another, some late, some never) get the **median** with the **order-statistic interval**
  ``[x(k), x(n-k+1)]`` (``median_interval``), which needs no distributional assumption: it
  covers the population median with probability ``1 - 2·P(Binomial(n, ½) ≤ k-1)``
  (``order_statistic_level``). At n ≤ 5 only k = 1 is possible, i.e. ``[min, max]`` with level
  ``1 - 2·0.5ⁿ`` = **93.75% at n = 5** (87.5% at 4, 75% at 3); for larger n the narrowest k that
  keeps the level ≥ 95% is used. Censored values (never emerged by the horizon) enter as ``+inf``:
  their true step is only known to be beyond the horizon, so an end that falls on one is "not
  reached" (the interval stays valid, with an unknown upper end).

Tests
-----
- *Two samples, means*: ``permutation_test`` (``scipy.stats.permutation_test`` on |difference of
  means|), exact (every relabelling enumerated) when there are at most ``n_perm`` relabellings,
  which there are for 5 v 5 seeds (C(10, 5) = 252). The smallest attainable two-sided p is
  ``p_floor`` = 2 / C(2n, n) (0.0079 at 5 v 5); after Holm over m tests the best attainable
  adjusted p is m times that.
- *Two samples, emergence (censored)*: the **log-rank** statistic (``logrank_z``, vectorised by
  hand and cross-checked against ``scipy.stats.logrank`` in ``tests/test_stats.py``) with its
  p-value from the same exact permutation distribution (``logrank_test``): the normal
  approximation ``scipy.stats.logrank`` reports (returned as ``p_asymptotic``) is unreliable at
  5 v 5 and can fall below the exact floor. Under the null the horizon-censored runs are
  exchangeable (all are censored at the same step), so the permutation p is exact.
- *k samples (omnibus)*: **Kruskal–Wallis** (``kruskal_test``, ``scipy.stats.kruskal``, χ²
  approximation with the tie correction; its size at 7 × 5 normal draws is checked in the tests)
  for scalar features; for emergence, whose values are censored, a **permutation one-way test on
  the restricted means** (never = horizon; ``permutation_oneway``, statistic = between-scheme sum
  of squares, Monte Carlo over ``n_perm`` relabellings). ``scipy.stats.logrank`` is two-sample
  only, so the log-rank test is used for the pairs and not as the omnibus.
- *Multiplicity*: ``holm`` (step-down, family-wise error; scipy has none); ``family_floor`` gives
  the best attainable Holm-adjusted p of a family (``p_floor`` × tests), the test that decides
  whether a family's table can show anything.
- *Correlation*: ``spearman_permutation``, the rank correlation with a permutation p, optionally
  *within strata* (ranks centred and y permuted within each scheme); scipy has no stratified
  version, so this one is written here (its unstratified case is checked against
  ``scipy.stats.spearmanr`` and ``scipy.stats.permutation_test``).

Survival
--------
``emerged_fraction``: the Kaplan–Meier estimate of the fraction emerged by step t
(``scipy.stats.ecdf`` on ``scipy.stats.CensoredData``); with every censoring at the horizon it
equals the plain fraction of seeds emerged, never-emerged seeds staying in the denominator.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import stats as st

ALPHA = 0.05


def clean(values) -> np.ndarray:
    """``values`` as a flat float array without NaNs (``inf`` is kept: it marks a censored value)."""
    x = np.asarray(values, dtype=float).ravel()
    return x[~np.isnan(x)]


# =============================================================================================
# Intervals.


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` (NaNs dropped) and its t-interval.

    ``mean ± t_{(1+level)/2}(n-1) · s / √n``. One value has no interval: (value, nan, nan) rather
    than a fake zero-width one. Coverage at n = 5 (nominal 95%): 0.95 normal, 0.93 gamma(4),
    0.88 exponential (see the module docstring).
    """
    x = clean(values)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(st.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def t_intervals(values: np.ndarray, level: float = 0.95, axis: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``t_interval`` along ``axis`` of an array with NaNs for missing values: (mean, low, high, n).

    Where fewer than 2 values are present the interval is NaN (and with none, the mean too).
    """
    v = np.moveaxis(np.asarray(values, dtype=float), axis, 0)
    ok = ~np.isnan(v)
    n = ok.sum(0)
    with np.errstate(all="ignore"):
        mean = np.where(ok, v, 0.0).sum(0) / n
        sd = np.sqrt(np.where(ok, (v - mean) ** 2, 0.0).sum(0) / (n - 1))
        half = st.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(n)
    mean = np.where(n > 0, mean, np.nan)
    lo, hi = np.where(n > 1, mean - half, np.nan), np.where(n > 1, mean + half, np.nan)
    return mean, lo, hi, n


def order_statistic_level(n: int, k: int = 1) -> float:
    """Probability that ``[x(k), x(n-k+1)]`` of n draws covers the population median:
    ``1 - 2·P(Binomial(n, ½) ≤ k-1)``; for k = 1 (``[min, max]``) ``1 - 2·0.5ⁿ``."""
    if n < 2 * k:
        return 0.0
    return float(1 - 2 * st.binom.cdf(k - 1, n, 0.5))


def median_interval(values, level: float = 0.95) -> tuple[float, float, float, float]:
    """(median, low, high, achieved level): the median and its order-statistic interval.

    ``values`` may hold ``+inf`` for censored values (never emerged: only known to be beyond the
    horizon); an end or median that is ``inf`` is "not reached". The interval is
    ``[x(k), x(n-k+1)]`` with the largest k whose level (``order_statistic_level``) is still ≥
    ``level``; when even ``[min, max]`` falls short (n ≤ 5 at 95%) it is ``[min, max]`` and the
    achieved level is reported (0.9375 at n = 5). Fewer than 2 values: no interval.
    """
    x = np.sort(clean(values))
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    median = float(np.median(x)) if np.isfinite(x).all() else float(_median_with_inf(x))
    if n < 2:
        return median, math.nan, math.nan, math.nan
    k = 1
    while order_statistic_level(n, k + 1) >= level:
        k += 1
    return median, float(x[k - 1]), float(x[n - k]), order_statistic_level(n, k)


def _median_with_inf(x: np.ndarray) -> float:
    """Median of sorted values some of which are +inf (no inf - inf warnings)."""
    n = len(x)
    lo, hi = x[(n - 1) // 2], x[n // 2]
    return float(hi if not np.isfinite(hi) else (lo + hi) / 2)


def percentile_bootstrap_ci(values, n_boot: int = 10_000, level: float = 0.95, seed: int = 0,
                            axis: int = -1) -> tuple:
    """The percentile bootstrap of the mean (``scipy.stats.bootstrap``, ``method="percentile"``).

    Not used for any reported interval: it is what this project used before the t-interval,
    kept so that ``tests/test_stats.py`` can measure its coverage next to the t-interval's (0.84
    instead of 0.95 on normal data at n = 5). 1-D ``values`` give (mean, low, high) with NaNs
    dropped; a 2-D array gives arrays, one interval per row along ``axis`` (no NaNs allowed).
    """
    x = np.asarray(values, dtype=float)
    if x.ndim == 1:
        x = clean(x)
        if len(x) < 2:
            return (float(x.mean()) if len(x) else math.nan), math.nan, math.nan
    res = st.bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                       axis=axis, vectorized=True, rng=np.random.default_rng(seed), batch=1000)
    lo, hi = res.confidence_interval
    mean = x.mean(axis=axis)
    if x.ndim == 1:
        return float(mean), float(lo), float(hi)
    return mean, lo, hi


# =============================================================================================
# Two-sample tests.


def p_floor(n_a: int, n_b: int) -> float:
    """Smallest two-sided p an exact permutation test can return for these sample sizes."""
    if n_a < 1 or n_b < 1:
        return math.nan
    return (2.0 if n_a == n_b else 1.0) / math.comb(n_a + n_b, n_a)


def _permutation_p(samples: list[np.ndarray], statistic, n_perm: int, seed: int) -> float:
    """p of ``scipy.stats.permutation_test`` (independent samples, large statistic = evidence):
    exact when there are at most ``n_perm`` distinct relabellings, else Monte Carlo with the
    (1 + count) / (1 + n_perm) estimate, which is never 0. A 1-value sample (which scipy refuses)
    is tested by enumerating its relabellings here, with scipy's tie tolerance."""
    if len(samples) == 2 and min(len(s) for s in samples) < 2:
        # scipy needs 2 values per sample; 1 v n has only n + 1 relabellings: enumerate them
        pooled, k = np.concatenate(samples), len(samples[0])
        idx = np.array(list(itertools.combinations(range(len(pooled)), k)))
        rest = np.array([np.setdiff1d(np.arange(len(pooled)), i) for i in idx])
        null = statistic(pooled[idx], pooled[rest], axis=-1)
        observed = statistic(samples[0], samples[1], axis=-1)
        return float(np.mean(null >= observed - np.abs(observed) * 100 * np.finfo(float).eps))
    res = st.permutation_test(samples, statistic, permutation_type="independent", vectorized=True,
                              n_resamples=n_perm, alternative="greater", rng=np.random.default_rng(seed))
    return float(res.pvalue)


def _abs_mean_difference(x, y, axis=-1):
    return np.abs(np.mean(x, axis=axis) - np.mean(y, axis=axis))


def permutation_test(a, b, n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided permutation p-value for a difference of means between samples ``a`` and ``b``.

    ``scipy.stats.permutation_test`` on |mean(a) - mean(b)|: exact (all C(n_a + n_b, n_a)
    relabellings, observed included) when there are at most ``n_perm`` of them; otherwise Monte
    Carlo with the (1 + count) / (1 + n_perm) estimate. NaNs are dropped; an empty sample gives
    nan. The values are centred first so that ties between mirrored relabellings are exact.
    """
    a, b = clean(a), clean(b)
    if len(a) == 0 or len(b) == 0:
        return math.nan
    c = float(np.median(np.concatenate([a, b])))
    return _permutation_p([a - c, b - c], _abs_mean_difference, n_perm, seed)


def logrank_z(x, y, axis: int = -1) -> np.ndarray:
    """The log-rank statistic Z_x = (O_x - E_x) / √V of sample ``x`` against ``y`` (the signed
    square root of the usual χ²; the sign and value of ``scipy.stats.logrank``'s ``statistic``).

    Times are event times; ``+inf`` marks a censored value (never emerged: at risk at every event
    time). Vectorised over leading axes (every row one relabelling), which is what makes an exact
    permutation p cheap. With no events, or no variance, Z is 0 (no evidence either way).
    """
    x = np.moveaxis(np.asarray(x, dtype=float), axis, -1)
    y = np.moveaxis(np.asarray(y, dtype=float), axis, -1)
    t = np.concatenate([x, y], axis=-1)
    events = np.unique(t[np.isfinite(t)])
    if events.size == 0:
        return np.zeros(t.shape[:-1])
    at_risk = t[..., None] >= events  # [..., n, J]
    died = t[..., None] == events
    n_x = x.shape[-1]
    N, O = at_risk.sum(-2), died.sum(-2)  # [..., J]
    N_x, O_x = at_risk[..., :n_x, :].sum(-2), died[..., :n_x, :].sum(-2)
    with np.errstate(all="ignore"):
        E = O * N_x / N
        V = np.where(N > 1, E * (N - O) / N * (N - N_x) / (N - 1), 0.0)
        E = np.where(N > 0, E, 0.0)
        num, var = (O_x - E).sum(-1), V.sum(-1)
        return np.where(var > 0, num / np.sqrt(var), 0.0)


def _abs_logrank(x, y, axis=-1):
    return np.abs(logrank_z(x, y, axis=axis))


def censored_data(values, at: float) -> st.CensoredData:
    """``values`` (+inf = censored) as ``scipy.stats.CensoredData``, the censored ones
    right-censored at ``at``, which must be ≥ every finite value of every sample compared (the
    horizon): at risk at every event time, which is what +inf means to ``logrank_z``."""
    values = clean(values)
    finite = values[np.isfinite(values)]
    return st.CensoredData(uncensored=finite, right=np.full(int((~np.isfinite(values)).sum()), float(at)))


def logrank_test(a, b, n_perm: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(Z, p, p_asymptotic): the log-rank test of two samples of event times (+inf = censored).

    ``p``: two-sided, from the permutation distribution of |Z| (``scipy.stats.permutation_test``,
    exact when there are at most ``n_perm`` relabellings: always at 5 v 5), floor ``p_floor``.
    ``p_asymptotic``: the normal approximation of ``scipy.stats.logrank``, for reference only.
    NaNs are dropped; an empty sample gives nan; no event in either sample gives Z 0, p 1.
    """
    a, b = clean(a), clean(b)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan, math.nan
    z = float(logrank_z(a, b))
    pooled = np.concatenate([a, b])
    if not np.isfinite(pooled).any():
        return 0.0, 1.0, 1.0
    p = _permutation_p([a, b], _abs_logrank, n_perm, seed)
    at = float(pooled[np.isfinite(pooled)].max())
    with np.errstate(all="ignore"):
        p_asym = float(st.logrank(censored_data(a, at), censored_data(b, at)).pvalue) if z != 0 else 1.0
    return z, p, p_asym


# =============================================================================================
# k-sample (omnibus) tests.


def kruskal_test(groups) -> tuple[float, float]:
    """(H, p): Kruskal–Wallis across ``groups`` (``scipy.stats.kruskal``, χ² approximation with the
    tie correction). NaNs dropped; groups with fewer than 2 values are left out (one value per
    group makes H a constant); fewer than 2 groups left gives nan; all values equal gives (0, 1)."""
    gs = [g for g in (clean(g) for g in groups) if len(g) >= 2]
    if len(gs) < 2:
        return math.nan, math.nan
    if np.ptp(np.concatenate(gs)) == 0:
        return 0.0, 1.0
    res = st.kruskal(*gs)
    return float(res.statistic), float(res.pvalue)


def _between_ss(*samples, axis=-1):
    n = np.array([s.shape[axis] for s in samples], dtype=float)
    means = np.stack([np.mean(s, axis=axis) for s in samples])
    grand = (means * n.reshape((-1,) + (1,) * (means.ndim - 1))).sum(0) / n.sum()
    return ((means - grand) ** 2 * n.reshape((-1,) + (1,) * (means.ndim - 1))).sum(0)


def permutation_oneway(groups, n_perm: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """(statistic, p): permutation one-way test of equal means across ``groups``.

    Statistic: the between-group sum of squares Σ n_g (mean_g - mean)² (equivalent to F under
    relabelling, the total sum of squares being fixed); p from ``scipy.stats.permutation_test``
    (exact when there are at most ``n_perm`` relabellings, else Monte Carlo, floor 1 / (1 +
    n_perm)). Same group rules as ``kruskal_test``.
    """
    gs = [g for g in (clean(g) for g in groups) if len(g) >= 2]
    if len(gs) < 2:
        return math.nan, math.nan
    stat = float(_between_ss(*gs))
    c = float(np.median(np.concatenate(gs)))
    return stat, _permutation_p([g - c for g in gs], _between_ss, n_perm, seed)


# =============================================================================================
# Multiplicity.


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


def family_floor(p_floors) -> float:
    """The smallest Holm-adjusted p a family of tests can reach: its smallest ``p_floor`` times
    the number of tests (capped at 1). A family is worth showing only when this is ≤ α."""
    f = np.asarray(p_floors, dtype=float)
    f = f[~np.isnan(f)]
    return math.nan if len(f) == 0 else float(min(1.0, f.min() * len(f)))


# =============================================================================================
# Correlation.


def spearman_permutation(x, y, strata=None, n_perm: int = 10_000, seed: int = 0) -> tuple[float, float, int]:
    """(rho, two-sided permutation p, n) for the rank correlation of ``x`` and ``y``.

    With ``strata`` (e.g. the scheme of each run) the ranks are centred within each stratum and
    ``y`` is permuted only within strata: the correlation *inside* schemes, with scheme
    differences removed (a scheme that is both fast and, say, high-norm cannot create it).
    Monte Carlo p with the (1 + count) / (1 + n_perm) estimate.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    s = None if strata is None else np.asarray(strata)[keep]
    n = len(x)
    rx, ry = st.rankdata(x), st.rankdata(y)
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


# =============================================================================================
# Survival.


def emerged_fraction(times, at, horizon: float) -> np.ndarray:
    """Kaplan–Meier fraction emerged by each step in ``at`` (``scipy.stats.ecdf`` on
    ``CensoredData``): ``times`` are emergence steps with NaN or +inf for runs that never emerged
    (right-censored at ``horizon``). Never-emerged runs stay in the denominator."""
    t = np.asarray(times, dtype=float).ravel()
    never = ~np.isfinite(t)
    at = np.asarray(at, dtype=float)
    if len(t) == 0:
        return np.full(at.shape, np.nan)
    if never.all():
        return np.zeros(at.shape)
    data = st.CensoredData(uncensored=t[~never], right=np.full(int(never.sum()), float(horizon)))
    return np.asarray(st.ecdf(data).cdf.evaluate(at), dtype=float)
