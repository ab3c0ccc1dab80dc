"""Behavioural metrics: loss, induction accuracy (also by copy distance), logit difference, emergence.

Plain functions of logits (or patterns) and a ``data.Batch``. We compute these ourselves because
they are specific to this task's target mask and distractors; TransformerLens has no notion of
either. Shapes: ``logits [batch pos d_vocab]``; a target at token position ``i`` is predicted by
the logits at ``i - 1``. ``tables(cfg, root)`` runs them over every checkpoint of a run (notebook 02).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.optimize
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ExperimentConfig
from initmi_utils.data import Batch, load_dataset
from initmi_utils.tables import table_path


def unambiguous_targets(batch: Batch) -> Bool[Tensor, "batch pos"]:
    """Induction targets whose query token (the token before the target) occurs exactly once
    earlier in the sequence.

    One-token induction ("find the earlier A, copy what followed it") has one right answer only
    there. Where A occurred more than once before (the bigram background can repeat a segment
    token before the segment starts), even a perfect one-token induction head must choose among
    several earlier successors: on the quick preset's validation set 34 % of targets are like
    that, and a perfect circuit scores 0.81 (uniform over earlier occurrences) to 0.88 (the most
    recent) on all targets. So emergence is defined on these targets (``acc_induction_unambiguous``).
    A hand-written count: it is a property of this task's sequences, not of any model.
    """
    tokens, target = batch.tokens, batch.target.bool()
    query = torch.zeros_like(tokens)
    query[:, 1:] = tokens[:, :-1]  # the token each position is predicted from
    n = tokens.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-2)  # [i, j]: position j < i - 1
    count = ((tokens[:, None, :] == query[:, :, None]) & earlier).sum(-1)  # [batch, i]
    return target & (count == 1)


def next_token_stats(logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> dict[str, float]:
    """Loss over all / induction / background positions, induction accuracy and logit difference.

    - ``loss``: mean next-token cross-entropy over every position;
    - ``loss_induction`` / ``loss_background``: the same restricted to induction targets / the rest;
    - ``acc_induction``: argmax == target on induction targets;
    - ``acc_induction_unambiguous``: the same on the targets whose query token occurs exactly once
      before it (``unambiguous_targets``), where one-token induction has a single right answer;
    - ``logit_diff``: logit(correct) - logit(distractor) on induction targets.
    """
    unambiguous = unambiguous_targets(batch)[:, 1:]
    logits = logits[:, :-1].float()
    tgt, mask = batch.tokens[:, 1:], batch.target[:, 1:]
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, tgt[..., None])[..., 0]
    correct = logits.gather(-1, tgt[..., None])[..., 0]
    distractor = logits.gather(-1, batch.distractor[:, 1:].clamp(min=0)[..., None])[..., 0]
    nan = float("nan")
    return {
        "loss": nll.mean().item(),
        "loss_induction": nll[mask].mean().item() if mask.any() else nan,
        "loss_background": nll[~mask].mean().item() if (~mask).any() else nan,
        "acc_induction": (logits.argmax(-1) == tgt)[mask].float().mean().item() if mask.any() else nan,
        "acc_induction_unambiguous": ((logits.argmax(-1) == tgt)[unambiguous].float().mean().item()
                                      if unambiguous.any() else nan),
        "logit_diff": (correct - distractor)[mask].mean().item() if mask.any() else nan,
    }


# ---------------------------------------------------------------------------------------------
# Accuracy by copy distance. A model can copy without a classic induction head: the long-offset
# recall circuit (``offsets``) reads the earlier copy through a layer-0 head that looks a fixed
# ~12-14 positions back, so it cannot copy when the two copies are closer than that. Induction
# accuracy split by the distance between the copies shows this without looking at any head.

SHORT_COPY = 12  # copies fewer than this many positions apart are "short" (the recall circuit fails there)
COPY_DISTANCE_BINS = (0, 12, 14, 16, 24, 32)  # lower edges of the bins of ``accuracy_by_copy_distance``


def copy_distance(batch: Batch) -> Int[Tensor, "batch"]:
    """Distance between the two copies of each sequence's segment (second start - first start).

    From the ``Batch`` fields only: the second copy starts one position before its first target
    and has one more token than it has targets; the distance is the smallest ``d`` at which every
    token of the second copy equals the token ``d`` positions earlier (segment tokens are
    distinct, so no ``d`` shorter than the segment matches). ``-1`` for a sequence without
    targets. On BOS + A + A it is ``rep_len``.
    """
    tokens, target = batch.tokens, batch.target.bool()
    n, S = tokens.shape
    pos = torch.arange(S)
    has = target.any(-1)
    p2 = torch.where(has, target.float().argmax(-1) - 1, torch.full((n,), S))  # second copy's start
    second = target.clone()
    second[torch.arange(n)[has], p2[has]] = True  # the second copy: its start plus its targets
    d = torch.arange(1, S)  # candidate distances
    earlier = pos[None, :] - d[:, None]  # [d, pos]
    same = tokens[:, None, :] == tokens[:, earlier.clamp(min=0)]  # [batch d pos]
    same &= (earlier >= 1)[None]  # never match BOS or before it
    match = (same | ~second[:, None, :]).all(-1)  # [batch d]
    first = torch.where(match.any(-1), match.float().argmax(-1) + 1, torch.full((n,), -1))
    return torch.where(has, first, torch.full((n,), -1))


def _induction_hits(logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> tuple[Tensor, Tensor]:
    """(correct, mask), both ``[batch, pos - 1]``: argmax == next token, at induction targets."""
    return logits[:, :-1].argmax(-1) == batch.tokens[:, 1:], batch.target[:, 1:].bool()


def accuracy_by_copy_distance(
    logits: Float[Tensor, "batch pos d_vocab"], batch: Batch, bins: tuple[int, ...] = COPY_DISTANCE_BINS,
    distance: Int[Tensor, "batch"] | None = None,
) -> pd.DataFrame:
    """Induction accuracy per bin of ``copy_distance``: ``copy_distance`` (the bin's lower edge),
    ``copy_distance_high`` (exclusive upper edge, -1 for the last, open bin), ``n_targets``,
    ``accuracy`` (nan for an empty bin). ``distance``: ``copy_distance(batch)`` if already computed."""
    correct, mask = _induction_hits(logits, batch)
    dist = (copy_distance(batch) if distance is None else distance)[:, None].expand_as(mask)
    rows = []
    for lo, hi in zip(bins, list(bins[1:]) + [None]):
        sel = mask & (dist >= lo) & ((dist < hi) if hi is not None else True)
        k = int(sel.sum())
        rows.append(dict(copy_distance=lo, copy_distance_high=-1 if hi is None else hi, n_targets=k,
                         accuracy=correct[sel].float().mean().item() if k else math.nan))
    return pd.DataFrame(rows)


def copy_distance_stats(logits: Float[Tensor, "batch pos d_vocab"], batch: Batch, short: int = SHORT_COPY,
                        distance: Int[Tensor, "batch"] | None = None) -> dict[str, float]:
    """``acc_induction_short`` / ``acc_induction_long``: induction accuracy on targets whose copies
    are < ``short`` / >= ``short`` positions apart (nan when there is none), and
    ``frac_targets_short``, the share of targets that are short. A classic induction head copies
    at both; the long-offset recall circuit only at long distances. ``distance``: as in
    ``accuracy_by_copy_distance``."""
    correct, mask = _induction_hits(logits, batch)
    dist = (copy_distance(batch) if distance is None else distance)[:, None].expand_as(mask)
    short_m, long_m = mask & (dist < short), mask & (dist >= short)
    acc = lambda m: correct[m].float().mean().item() if m.any() else math.nan  # noqa: E731
    n = int(mask.sum())
    return {"acc_induction_short": acc(short_m), "acc_induction_long": acc(long_m),
            "frac_targets_short": int(short_m.sum()) / n if n else math.nan}


def induction_scores(patterns: list[Float[Tensor, "batch head q k"]], rep_len: int) -> Float[Tensor, "layer head"]:
    """Mean attention from each token of the second copy of BOS + A + A to the token after its
    first occurrence (offset ``rep_len - 1`` back), per layer and head."""
    out = []
    for p in patterns:
        q = torch.arange(rep_len + 2, 2 * rep_len + 1)  # A[1:] second copy (A[0]'s successor in copy 1 exists)
        out.append(p[:, :, q, q - rep_len + 1].mean(dim=(0, 2)))
    return torch.stack(out)


def emergence_step(steps, accuracies, threshold: float = 0.8) -> float:
    """First evaluated step whose induction accuracy is >= ``threshold``; ``nan`` means never."""
    for step, acc in zip(steps, accuracies):
        if acc >= threshold:
            return float(step)
    return math.nan


HEADLINE_METRIC = "val_acc_induction_unambiguous"  # the accuracy emergence is defined on
# name -> (metric, threshold); None = threshold-free (``sigmoid_midpoint``). The first is the headline.
EMERGENCE_DEFINITIONS: dict[str, tuple[str, float | None]] = {
    "unambiguous ≥ 0.8": (HEADLINE_METRIC, 0.8),
    "unambiguous ≥ 0.5": (HEADLINE_METRIC, 0.5),
    "unambiguous ≥ 0.9": (HEADLINE_METRIC, 0.9),
    "all targets ≥ 0.8": ("val_acc_induction", 0.8),
    "sigmoid midpoint": (HEADLINE_METRIC, None),
}
MIN_RISE = 0.5  # a fitted sigmoid counts as emergence only if it rises by at least this much


def sigmoid_midpoint(steps, accuracies, horizon: float | None = None) -> float:
    """The threshold-free emergence step: the midpoint ``t0`` of a logistic curve
    ``lo + (hi - lo) / (1 + exp(-(t - t0) / width))`` fitted to the accuracy curve by least
    squares (``scipy.optimize.curve_fit``); ``nan`` (never) when the fit fails, the fitted rise
    ``hi - lo`` is below ``MIN_RISE`` (no phase change), ``hi`` is below 0.5, or ``t0`` lies past
    the last evaluated step (or ``horizon``). A run that starts at accuracy >= 0.5 (a ``seeded``
    student) has emerged at its first step. Induction's phase change is sharp, so a logistic
    describes it; its midpoint does not depend on where a threshold is put.
    """
    x, y = np.asarray(steps, dtype=float), np.asarray(accuracies, dtype=float)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) and y[0] >= 0.5:
        return float(x[0])
    if len(x) < 4 or y.max() - y.min() < MIN_RISE:
        return math.nan
    span = max(x.max() - x.min(), 1.0)
    mid = x[np.argmax(y >= (y.min() + y.max()) / 2)]

    def curve(t, lo, hi, t0, width):
        return lo + (hi - lo) / (1 + np.exp(-np.clip((t - t0) / width, -60, 60)))

    try:
        (lo, hi, t0, width), _ = scipy.optimize.curve_fit(
            curve, x, y, p0=(y.min(), y.max(), mid, span / 50), maxfev=20_000,
            bounds=([-0.1, 0.0, x.min() - span, span / 1e4], [1.1, 1.1, x.max() + span, span]))
    except (RuntimeError, ValueError):
        return math.nan
    end = x.max() if horizon is None else min(x.max(), horizon)
    if hi - lo < MIN_RISE or hi < 0.5 or not x.min() <= t0 <= end:
        return math.nan
    return float(t0)


def emergence_steps(metrics: pd.DataFrame, horizon: float | None = None) -> dict[str, float]:
    """One run's emergence step under every definition of ``EMERGENCE_DEFINITIONS`` (``nan`` =
    not by the last evaluated step: censored there, never dropped). ``metrics`` is the run's
    training-metrics table (long format)."""
    out = {}
    for name, (metric, threshold) in EMERGENCE_DEFINITIONS.items():
        g = metrics[metrics.metric == metric].sort_values("step")
        if threshold is None:
            out[name] = sigmoid_midpoint(g.step, g.value, horizon)
        else:
            out[name] = emergence_step(g.step.tolist(), g.value.tolist(), threshold)
    return out


def evaluation_grid(metrics: pd.DataFrame, eval_every: int) -> pd.DataFrame:
    """The rows of a training-metrics table on the regular evaluation grid (``step % eval_every
    == 0``), the steps every run of a preset is evaluated at. Training also evaluates a run at its
    own loss-ladder steps; emergence read there would be finer for some runs than for others, so
    every emergence definition reads the common grid."""
    return metrics[metrics.step % eval_every == 0]


def emergence_table(metrics: pd.DataFrame, threshold: float = 0.8, metric: str = HEADLINE_METRIC) -> pd.DataFrame:
    """One row per run: its emergence step (``nan`` = never) and whether it emerged."""
    rows = []
    for keys, g in metrics[metrics.metric == metric].sort_values("step").groupby(["run", "scheme", "seed"]):
        step = emergence_step(g.step, g.value, threshold)
        rows.append(dict(zip(["run", "scheme", "seed"], keys), emergence_step=step, emerged=not math.isnan(step), threshold=threshold))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 02_behavior: loss by position, the in-context-learning score, first vs repeated half, and the
# per-checkpoint behaviour table. Computed here for the same reason as above: they are defined by
# this task's positions and halves, which TransformerLens knows nothing about.

ICL_EARLY = 10  # first token index of the "early" window of the ICL score
ICL_WIDTH = 4  # tokens averaged in each window of the ICL score


def loss_by_position(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "pos"]:
    """Mean cross-entropy of predicting token ``i`` (from the logits at ``i - 1``), per token index.

    Index ``i`` of the result is the loss *on token i*; index 0 (BOS, never predicted) is ``nan``,
    so the result lines up with the token positions of ``tokens``.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]  # [batch, pos - 1]
    return torch.cat([torch.full((1,), math.nan), nll.mean(0)])


def icl_score(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    early: int = ICL_EARLY,
    late: int = -1,
    width: int = ICL_WIDTH,
) -> float:
    """In-context-learning score: mean loss late in the sequence minus mean loss early in it.

    Olsson et al. (2022) take the loss at the 500th token minus the loss at the 50th token of an
    8192-token context: "early" is late enough that a few tokens of context exist, "late" far
    enough that much more does. Their indices scaled to our 64-token context would be tokens 0
    and 4, where nothing can be learnt in context yet, so we keep the idea instead of the ratio:
    *early* = tokens ``early .. early + width - 1`` (default 10-13: the bigram background is
    already predictable, but a repeated segment has rarely started its second occurrence),
    *late* = the last ``width`` tokens ending at token ``late`` (default the last token, where
    the second occurrence of the segment is most often under way). Averaging ``width`` tokens per
    window trades a little locality for less noise. Negative = the model uses its context;
    roughly 0 before induction exists.
    """
    n = tokens.shape[-1]
    late = late % n
    lo, hi = early, late - width + 1
    if early < 1 or width < 1 or early + width > hi:
        raise ValueError(
            f"icl_score windows must not overlap and must skip BOS: early tokens {early}..{early + width - 1}, "
            f"late tokens {hi}..{late} in a sequence of {n}; lower early/width or use a later late index."
        )
    per_pos = loss_by_position(logits, tokens)
    return (per_pos[hi : late + 1].mean() - per_pos[lo : lo + width].mean()).item()


def half_losses(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], rep_len: int) -> dict[str, float]:
    """Loss on the first vs the repeated copy of A in BOS + A + A.

    Both halves are scored on the *same tokens* A[1:] (token indices ``2 .. rep_len`` and
    ``rep_len + 2 .. 2 rep_len``): A[0] is left out of both because in the second copy it follows
    A[-1], a pair that never occurred before, so it is no more predictable than in the first.
    The only difference between the halves is then that the second has been seen: the gap is
    pure in-context copying. Keys: ``first_half``, ``repeated_half``, ``half_gap`` (repeated -
    first, negative when the model copies).
    """
    if tokens.shape[-1] != 1 + 2 * rep_len:
        raise ValueError(
            f"half_losses expects BOS + A + A of {1 + 2 * rep_len} tokens for rep_len={rep_len}, "
            f"got {tokens.shape[-1]}; pass Dataset.rep and cfg.data.rep_len."
        )
    per_pos = loss_by_position(logits, tokens)
    first = per_pos[2 : rep_len + 1].mean().item()
    repeated = per_pos[rep_len + 2 : 2 * rep_len + 1].mean().item()
    return {"first_half": first, "repeated_half": repeated, "half_gap": repeated - first}


def behavior_table(
    val_logits: Float[Tensor, "batch pos d_vocab"],
    val: Batch,
    rep_logits: Float[Tensor, "batch pos d_vocab"],
    rep: Batch,
    rep_len: int,
    step: int,
) -> pd.DataFrame:
    """Every behavioural number of one checkpoint, long format (``step, metric, value, position``).

    ``val_*`` / ``rep_*``: ``next_token_stats`` on the validation and BOS + A + A sets;
    ``val_acc_induction_short``, ``val_acc_induction_long``, ``val_frac_targets_short``
    (``copy_distance_stats``); ``icl_score`` (validation); ``rep_first_half``,
    ``rep_repeated_half``, ``rep_half_gap``; ``val_loss_at_position`` per token index
    (``position`` column); and ``val_acc_by_copy_distance`` / ``val_n_targets_by_copy_distance``
    per bin (``copy_distance`` column: the bin's lower edge). ``position`` and ``copy_distance``
    are -1 on the rows they do not apply to.
    """
    rows = [dict(metric=f"val_{k}", value=v) for k, v in next_token_stats(val_logits, val).items()]
    rows += [dict(metric=f"rep_{k}", value=v) for k, v in next_token_stats(rep_logits, rep).items()]
    distance = copy_distance(val)
    rows += [dict(metric=f"val_{k}", value=v) for k, v in copy_distance_stats(val_logits, val, distance=distance).items()]
    rows.append(dict(metric="icl_score", value=icl_score(val_logits, val.tokens)))
    rows += [dict(metric=f"rep_{k}", value=v) for k, v in half_losses(rep_logits, rep.tokens, rep_len).items()]
    df = pd.DataFrame(rows).assign(position=-1)
    per_pos = loss_by_position(val_logits, val.tokens)
    pos = pd.DataFrame({"metric": "val_loss_at_position", "value": per_pos[1:].tolist(),
                        "position": range(1, len(per_pos))})
    by_d = accuracy_by_copy_distance(val_logits, val, distance=distance)
    dist = pd.concat([by_d.assign(metric="val_acc_by_copy_distance", value=by_d.accuracy),
                      by_d.assign(metric="val_n_targets_by_copy_distance", value=by_d.n_targets.astype(float))])
    out = pd.concat([df, pos, dist[["metric", "value", "copy_distance"]]], ignore_index=True).assign(step=int(step))
    out["position"] = out.position.fillna(-1).astype(int)
    out["copy_distance"] = out.copy_distance.fillna(-1).astype(int)
    return out[["step", "metric", "value", "position", "copy_distance"]]


def emergence_rows(metrics: pd.DataFrame, threshold: float = 0.8, metric: str = HEADLINE_METRIC) -> pd.DataFrame:
    """A run's emergence step as table rows (``step = -1``: a run-level value, like layer/head -1).

    ``value`` is ``nan`` when the run never reached ``threshold`` ("never" is a value, not an
    error); the ``threshold`` column records what was asked.
    """
    g = metrics[metrics.metric == metric].sort_values("step")
    step = emergence_step(g.step.tolist(), g.value.tolist(), threshold)
    return pd.DataFrame([dict(step=-1, metric="emergence_step", value=step, position=-1, copy_distance=-1,
                                       threshold=float(threshold))])


# ---------------------------------------------------------------------------------------------
# Notebook 02's table.


def tables(cfg: ExperimentConfig, root: str | Path | None = None, emergence_threshold: float = 0.8) -> dict[str, pd.DataFrame]:
    """Notebook 02's table of run ``cfg`` under ``root``: ``{"behavior": df}``.

    ``df``: ``behavior_table`` of every checkpoint (one forward on ``val`` and one on ``rep`` per
    step, under ``torch.no_grad``) followed by ``emergence_rows`` of the run's training metrics
    (``metrics.parquet``) at ``emergence_threshold`` (step -1). Raises ``CheckpointError`` naming
    the training to run if the run is not trained.
    """
    checkpoints = list_checkpoints(cfg, root)
    ds = load_dataset(cfg, root)
    rows = []
    with torch.no_grad():
        for step in checkpoints.steps:
            model, _ = checkpoints.load(step)
            rows.append(behavior_table(model(ds.val.tokens), ds.val, model(ds.rep.tokens), ds.rep, cfg.data.rep_len, step))
    metrics = pd.read_parquet(table_path(cfg, "metrics", root))
    grid = evaluation_grid(metrics, cfg.train.eval_every)
    return {"behavior": pd.concat(rows + [emergence_rows(grid, emergence_threshold)], ignore_index=True)}
