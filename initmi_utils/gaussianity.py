"""Are trained weights Gaussian, whatever the initialisation? And is what training added i.i.d. noise?

A claim made of large foundation models ("Gaussian distribution never fades"): trained weights are
predominantly Gaussian whatever the init; the change ``dW = W - W_0`` behaves like i.i.d. Gaussian
noise; and the standard deviation of ``dW`` grows with depth. This module measures each part on
every weight matrix (``geometry.named_matrices``: W_E, W_pos, W_U, and per layer W_Q, W_K, W_V, W_O
over all heads, MLP W_in, W_out; raw, LayerNorm not folded in) at every checkpoint, for ``W`` and,
after step 0, for ``dW`` (``W_0`` = the run's step-0 checkpoint). Here the init is controlled:
``xavier`` is uniform (excess kurtosis -1.2 at step 0), ``orthogonal`` and ``mimetic`` are
structured, so "whatever the init" is a real test.

Metrics (column ``weights`` is ``"W"`` or ``"dW"``, ``matrix`` the family, ``layer`` -1 for the
embeddings and the unembedding):

- ``std``: population standard deviation of the entries (for ``dW`` by layer: the depth claim);
- ``kurtosis``: excess kurtosis (``geometry.excess_kurtosis``: 0 Gaussian, -1.2 uniform, +3
  Laplace); ``skew``: ``scipy.stats.skew``;
- ``ks``: the Kolmogorov-Smirnov distance (``scipy.stats.kstest``) between the entries, standardised
  by their own mean and std, and N(0, 1): the distance to the *fitted* Gaussian. Raw distances are
  not comparable across sizes (a Gaussian sample's is about 0.64/sqrt(n) after fitting: 0.028 at
  512 entries, 0.0025 at 65536), so ``ks_null`` is the expected distance of a Gaussian sample of the
  same number of entries, standardised the same way, and ``ks_rel = ks / ks_null``: about 1 for
  Gaussian entries, 6-12 for uniform entries at the study's sizes (4096-16384 entries).
  The null is simulated because the parameters are fitted (Lilliefors' setting): Kolmogorov's
  known-parameter mean, 0.87/sqrt(n), would be about 35% too large and make every matrix look
  closer to Gaussian than a Gaussian. It is the mean over ``NULL_DRAWS`` draws with fixed seeds,
  so every run and every process gets the same number (cached per size); its standard error is
  about 2% of its value.
- the singular-value spectrum against Marchenko-Pastur (MP), for "i.i.d.", which the marginal
  cannot see (an orthogonal or a low-rank matrix can have Gaussian entries). On the *logical*
  ``[fan_in, fan_out]`` matrix (``schemes.logical_matrix``: all heads of W_Q as one map), shape
  ``p x q`` with ``p <= q``, centred by its mean, of entry variance ``sigma^2``: the eigenvalues
  ``s_i^2 / (q sigma^2)`` of its Gram matrix follow MP with ratio ``p / q`` if the entries are
  i.i.d. (whatever their distribution: a uniform matrix matches too, an orthogonal one does not).
  ``mp_ks``: their KS distance to the MP law (``mp_cdf``); ``mp_ks_null``, ``mp_ks_rel``: the same
  size-matched null (a Gaussian matrix of the same shape) and ratio as for ``ks``;
  ``mp_edge_ratio``: the largest eigenvalue over the MP edge ``(1 + sqrt(p / q))^2``, about 0.9-1.0
  for an i.i.d. matrix of these sizes, far above 1 when a low-rank part stands out of the noise.

A matrix whose entries are all equal (a ``dW`` that did not move) has ``std`` 0 and NaN elsewhere.

``claims`` turns the table of many runs into one row per (scheme, matrix family, part of the
claim) with t-intervals over seeds; ``distance_curves`` gives the distance over training.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as st
from scipy.integrate import cumulative_trapezoid
from torch import Tensor

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ExperimentConfig
from initmi_utils.geometry import excess_kurtosis, named_matrices, single_threaded
from initmi_utils.model import Transformer
from initmi_utils.schemes import MATRIX_ROLES, logical_matrix
from initmi_utils.stats import t_interval

FAMILIES = MATRIX_ROLES  # W_E, W_pos, W_Q, W_K, W_V, W_O, W_in, W_out, W_U: residual-stream order
WEIGHTS = ("W", "dW")
METRICS = ("std", "kurtosis", "skew", "ks", "ks_null", "ks_rel", "mp_ks", "mp_ks_null", "mp_ks_rel", "mp_edge_ratio")
NULL_DRAWS = 100  # Gaussian draws per null: standard error of the null's mean ~ 2% (KS), ~1% (MP)
NULL_SEED = 16  # the nulls' fixed seed (with the size): the same null in every process
MP_GRID = 4001  # points of the MP CDF's integration grid (smooth integrand: error ~1e-7)


# ---------------------------------------------------------------------------------------------
# The marginal: moments and the distance to the fitted Gaussian.


def _flat(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def skewness(x: Tensor | np.ndarray) -> float:
    """``scipy.stats.skew`` of all entries (population moments); nan for a constant matrix."""
    v = _flat(x)
    if v.size == 0 or np.ptp(v) == 0:
        return float("nan")
    return float(st.skew(v, bias=True))


def ks_distance(x: Tensor | np.ndarray) -> float:
    """KS distance between the entries, standardised by their own mean and (population) std, and
    N(0, 1) (``scipy.stats.kstest``; the p-value is not used, hence its asymptotic method)."""
    v = _flat(x)
    if v.size == 0 or np.ptp(v) == 0:
        return float("nan")
    return float(st.kstest((v - v.mean()) / v.std(), "norm", method="asymp").statistic)


@functools.lru_cache(maxsize=None)
def ks_null(n: int, draws: int = NULL_DRAWS) -> float:
    """Expected ``ks_distance`` of ``n`` i.i.d. Gaussian entries: the mean over ``draws`` samples
    with fixed seeds (``NULL_SEED``, ``n``, draw index), so deterministic and cached per size."""
    return float(np.mean([ks_distance(np.random.default_rng([NULL_SEED, n, i]).standard_normal(n))
                          for i in range(draws)]))


# ---------------------------------------------------------------------------------------------
# The spectrum: Marchenko-Pastur.


@functools.lru_cache(maxsize=None)
def _mp_grid(ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """``(x, F(x))`` on a grid of the MP law with ratio ``ratio`` in (0, 1] and variance 1.

    scipy has no Marchenko-Pastur distribution, so its CDF is integrated here. The density
    ``sqrt((b - x)(x - a)) / (2 pi ratio x)`` on ``[a, b] = [(1 - r)^2, (1 + r)^2]``, ``r =
    sqrt(ratio)``, has square-root ends and, at ratio 1, a ``1/sqrt(x)`` pole at 0. Substituting
    ``x = 1 + r^2 - 2 r cos(t)``, ``t`` in ``[0, pi]``, turns it into the smooth
    ``F(x(t)) = (2 / pi) int_0^t sin^2(u) / (1 + r^2 - 2 r cos(u)) du`` (at ratio 1 the integrand is
    ``cos^2(u / 2)``), integrated with the trapezoid rule on ``MP_GRID`` points and divided by its
    total (which is 1 up to ~1e-7: the Poisson-kernel integral ``int_0^pi sin^2 / (1 - 2 r cos +
    r^2) = pi / 2``).
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"the MP ratio p / q must lie in (0, 1], got {ratio}.")
    r = math.sqrt(ratio)
    t = np.linspace(0.0, math.pi, MP_GRID)
    x = 1 + ratio - 2 * r * np.cos(t)
    density = np.divide(np.sin(t) ** 2, x, out=np.ones_like(t), where=x > 0)  # 0/0 only at ratio 1, t = 0: limit 1
    F = cumulative_trapezoid(density, t, initial=0.0)
    return x, F / F[-1]


def mp_cdf(x: np.ndarray | float, ratio: float) -> np.ndarray:
    """The Marchenko-Pastur CDF with ratio ``ratio = p / q`` in (0, 1] and variance 1: the limit law
    of the eigenvalues of ``X X^T / q`` for ``X`` a ``p x q`` matrix of i.i.d. unit-variance
    entries (mean 1, variance ``ratio``, support ``[(1 - sqrt(ratio))^2, (1 + sqrt(ratio))^2]``)."""
    grid, F = _mp_grid(float(ratio))
    return np.interp(np.asarray(x, dtype=np.float64), grid, F, left=0.0, right=1.0)


def mp_eigenvalues(m: Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    """``(s_i^2 / (q sigma^2), p / q)`` of a ``p x q`` (or ``q x p``) matrix, ``p <= q``, centred by its
    mean, ``sigma^2`` the variance of its entries: the eigenvalues MP describes, and its ratio."""
    m = torch.as_tensor(m, dtype=torch.float64)
    if m.ndim != 2:
        raise ValueError(f"a spectrum needs a 2-D matrix, got shape {tuple(m.shape)}.")
    m = m - m.mean()
    p, q = sorted(m.shape)
    var = m.pow(2).mean().item()
    s = torch.linalg.svdvals(m).numpy()
    return s**2 / (q * var), p / q


def mp_distance(m: Tensor | np.ndarray) -> tuple[float, float]:
    """``(mp_ks, mp_edge_ratio)`` of one matrix: the KS distance (``scipy.stats.kstest`` with
    ``mp_cdf``) of its ``mp_eigenvalues`` to the MP law, and its largest one over the MP edge."""
    m = torch.as_tensor(m, dtype=torch.float64)
    if m.numel() == 0 or m.std() == 0:
        return float("nan"), float("nan")
    ev, ratio = mp_eigenvalues(m)
    ks = st.kstest(ev, functools.partial(mp_cdf, ratio=ratio), method="asymp").statistic
    return float(ks), float(ev.max() / (1 + math.sqrt(ratio)) ** 2)


@functools.lru_cache(maxsize=None)
@single_threaded
def mp_null(p: int, q: int, draws: int = NULL_DRAWS) -> float:
    """Expected ``mp_ks`` of a ``p x q`` i.i.d. Gaussian matrix: the mean over ``draws`` fixed-seed
    draws, cached per shape (finite matrices sit near, not on, the limit law: ~0.018 at 128 x 128,
    ~0.03 at 64 x 128)."""
    return float(np.mean([mp_distance(np.random.default_rng([NULL_SEED, p, q, i]).standard_normal((p, q)))[0]
                          for i in range(draws)]))


# ---------------------------------------------------------------------------------------------
# One matrix, one checkpoint, one run.


def matrix_metrics(w: Tensor, matrix: str) -> dict[str, float]:
    """Every metric of ``METRICS`` for one matrix in its stored shape, ``matrix`` its family (the
    spectrum is taken on ``schemes.logical_matrix(matrix, w)``)."""
    m = logical_matrix(matrix, w.detach().double())
    std = m.std(unbiased=False).item()
    out = dict.fromkeys(METRICS, float("nan"))
    out["std"] = std
    if std == 0:
        return out
    p, q = sorted(m.shape)
    ks, ks0 = ks_distance(m), ks_null(m.numel())
    mp_ks, edge = mp_distance(m)
    mp0 = mp_null(p, q)
    out.update(kurtosis=excess_kurtosis(m), skew=skewness(m), ks=ks, ks_null=ks0, ks_rel=ks / ks0,
               mp_ks=mp_ks, mp_ks_null=mp0, mp_ks_rel=mp_ks / mp0, mp_edge_ratio=edge)
    return out


@single_threaded
def gaussianity_table(model: Transformer, model0: Transformer, step: int) -> pd.DataFrame:
    """``METRICS`` of every weight matrix of ``model`` (``weights = "W"``) and, unless ``step`` is 0,
    of its change from ``model0``, the same run at step 0 (``weights = "dW"``). Columns ``step,
    layer, head`` (-1), ``matrix, weights, metric, value``."""
    now, start = named_matrices(model), named_matrices(model0)
    if [(n, l, w.shape) for n, l, w in now] != [(n, l, w.shape) for n, l, w in start]:
        raise ValueError(f"dW needs two models of the same architecture; got {model.cfg} and {model0.cfg}.")
    rows = []
    for (name, layer, w), (_, _, w0) in zip(now, start):
        kinds = [("W", w)] + ([("dW", w.double() - w0.double())] if step != 0 else [])
        for weights, x in kinds:
            rows += [dict(step=int(step), layer=layer, head=-1, matrix=name, weights=weights, metric=k, value=v)
                     for k, v in matrix_metrics(x, name).items()]
    return pd.DataFrame(rows)


def tables(cfg: ExperimentConfig, root: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """``{"gaussianity": ...}``: ``gaussianity_table`` at every checkpoint of run ``cfg`` under
    ``root``, ``dW`` measured from its step 0. Raises ``CheckpointError`` naming the training to run
    if the run is not trained."""
    ckpts = list_checkpoints(cfg, root)
    model0, _ = ckpts.load(0)
    frames = [gaussianity_table(ckpts.load(step)[0], model0, step) for step in ckpts.steps]
    return {"gaussianity": pd.concat(frames, ignore_index=True)}


# ---------------------------------------------------------------------------------------------
# Across runs: curves over training and the claim's parts per scheme.


def layer_label(layer: int) -> str:
    return "embed/unembed" if layer < 0 else f"L{layer}"


def distance_curves(table: pd.DataFrame, metric: str = "ks_rel", by: str = "scheme", level: float = 0.95) -> pd.DataFrame:
    """``metric`` over training per ``by`` group, matrix family and ``weights``, with t-intervals.

    ``by="scheme"``: a run's value is the mean over its layers, then the mean over the scheme's
    seeds; ``by="layer"``: per layer (``layer_label``), the mean over the runs in ``table`` (one run
    in notebook 06, whose table need not carry the run columns yet). Columns ``by, matrix, weights,
    step, mean, ci_low, ci_high, n``.
    """
    if by not in ("scheme", "layer"):
        raise ValueError(f"distance_curves groups by 'scheme' or 'layer', got {by!r}.")
    if by == "scheme" and "scheme" not in table:
        raise ValueError("distance_curves by scheme needs the run columns (tables.read_table or tables.tidy).")
    t = table[table.metric == metric]
    runs = ["run"] if "run" in t else []
    if by == "layer":
        t = t.assign(layer=t.layer.map(layer_label))
    per_run = t.groupby([by, *runs, "matrix", "weights", "step"], as_index=False).value.mean()
    rows = []
    for (group, matrix, weights, step), g in per_run.groupby([by, "matrix", "weights", "step"], sort=True):
        mean, lo, hi = t_interval(g.value, level)
        rows.append({by: group, "matrix": matrix, "weights": weights, "step": int(step), "mean": mean,
                     "ci_low": lo, "ci_high": hi, "n": int(g.value.notna().sum())})
    return pd.DataFrame(rows, columns=[by, "matrix", "weights", "step", "mean", "ci_low", "ci_high", "n"])


# (claim, weights, metrics, when): the rows of ``claims`` other than the depth rows
CLAIM_PARTS = (
    ("W_gaussian", "W", ("kurtosis", "skew", "ks_rel"), ("init", "final")),
    ("dW_gaussian", "dW", ("kurtosis", "skew", "ks_rel"), ("final",)),
    ("dW_iid", "dW", ("mp_ks_rel", "mp_edge_ratio"), ("final",)),
)


def depth_trend(layers, stds) -> tuple[float, float]:
    """``(slope, ratio)`` of one run's dW std over its layers: the least-squares slope of
    ``log2(std)`` on the layer index (``scipy.stats.linregress``; +1 = doubling per layer) and
    ``std(last layer) / std(layer 0)``. With two layers the slope is ``log2(ratio)``: one comparison."""
    layers, stds = np.asarray(layers, dtype=float), np.asarray(stds, dtype=float)
    order = np.argsort(layers)
    layers, stds = layers[order], stds[order]
    if len(layers) < 2 or not (stds > 0).all():
        return float("nan"), float("nan")
    return float(st.linregress(layers, np.log2(stds)).slope), float(stds[-1] / stds[0])


def claims(table: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """The claim's three parts per (scheme, matrix family), over seeds, from the ``gaussianity``
    table of many runs (``tables.read_table(preset, "gaussianity")``).

    A run's value for a family is the mean over its layers, at step 0 (``when = "init"``) or at the
    run's last checkpoint (``"final"``; ``step`` is the latest such step). Rows (``claim``,
    ``metric``): ``W_gaussian`` (kurtosis, skew, ks_rel of W at init and final), ``dW_gaussian``
    (the same of dW, final), ``dW_iid`` (mp_ks_rel, mp_edge_ratio of dW, final) and ``dW_std_depth``
    (``depth_trend``'s ``depth_slope`` and ``depth_ratio`` of dW's std over layers, final; families
    with layers only). Columns ``claim, scheme, matrix, metric, when, step, mean, ci_low, ci_high,
    n, n_layers, verdict``: ``mean`` over seeds with its t-interval (``stats.t_interval``).
    ``verdict`` (depth slope only): ``grows`` / ``shrinks`` when the interval of the slope lies above
    / below 0, ``no clear trend`` when it holds 0, ``one seed`` when there is no interval.
    """
    columns = ["claim", "scheme", "matrix", "metric", "when", "step", "mean", "ci_low", "ci_high", "n",
               "n_layers", "verdict"]
    if table.empty:
        return pd.DataFrame(columns=columns)
    t = table.assign(last=table.groupby("run").step.transform("max"))
    rows = []

    def add(claim, scheme, matrix, metric, when, step, values, n_layers, verdict=""):
        mean, lo, hi = t_interval(values, level)
        rows.append(dict(claim=claim, scheme=scheme, matrix=matrix, metric=metric, when=when, step=int(step),
                         mean=mean, ci_low=lo, ci_high=hi, n=int(np.isfinite(np.asarray(values, float)).sum()),
                         n_layers=int(n_layers), verdict=verdict))

    for claim, weights, metrics, whens in CLAIM_PARTS:
        for when in whens:
            at = t[((t.step == 0) if when == "init" else (t.step == t["last"])) & (t.weights == weights)
                   & t.metric.isin(metrics)]
            per_run = at.groupby(["scheme", "matrix", "metric", "run"]).agg(
                value=("value", "mean"), step=("step", "first"), n_layers=("layer", "nunique"))
            for (scheme, matrix, metric), g in per_run.groupby(level=[0, 1, 2], sort=True):
                add(claim, scheme, matrix, metric, when, g.step.max(), g.value.values, g.n_layers.max())

    final = t[(t.step == t["last"]) & (t.weights == "dW") & (t.metric == "std") & (t.layer >= 0)]
    trends = []
    for (scheme, matrix, run), g in final.groupby(["scheme", "matrix", "run"], sort=True):
        slope, ratio = depth_trend(g.layer, g.value)
        trends.append(dict(scheme=scheme, matrix=matrix, run=run, step=g.step.max(), slope=slope, ratio=ratio,
                           n_layers=g.layer.nunique()))
    for (scheme, matrix), g in pd.DataFrame(trends, columns=["scheme", "matrix", "run", "step", "slope", "ratio",
                                                             "n_layers"]).groupby(["scheme", "matrix"], sort=True):
        _, lo, hi = t_interval(g.slope.values, level)
        verdict = ("one seed" if not np.isfinite(lo) else "grows" if lo > 0 else "shrinks" if hi < 0
                   else "no clear trend")
        add("dW_std_depth", scheme, matrix, "depth_slope", "final", g.step.max(), g.slope.values, g.n_layers.max(), verdict)
        add("dW_std_depth", scheme, matrix, "depth_ratio", "final", g.step.max(), g.ratio.values, g.n_layers.max())
    return pd.DataFrame(rows, columns=columns)
