"""Behavioural metrics: loss, induction accuracy, logit difference, emergence.

Plain functions of logits (or patterns) and a ``data.Batch``. We compute these ourselves because
they are specific to this task's target mask and distractors; TransformerLens has no notion of
either. Shapes: ``logits [batch pos d_vocab]``; a target at token position ``i`` is predicted by
the logits at ``i - 1``.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from initmi_utils.data import Batch


def next_token_stats(logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> dict[str, float]:
    """Loss over all / induction / background positions, induction accuracy and logit difference.

    - ``loss``: mean next-token cross-entropy over every position;
    - ``loss_induction`` / ``loss_background``: the same restricted to induction targets / the rest;
    - ``acc_induction``: argmax == target on induction targets;
    - ``logit_diff``: logit(correct) - logit(distractor) on induction targets.
    """
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
        "logit_diff": (correct - distractor)[mask].mean().item() if mask.any() else nan,
    }


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


def emergence_table(metrics: pd.DataFrame, threshold: float = 0.8, metric: str = "val_acc_induction") -> pd.DataFrame:
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
    ``icl_score`` (validation); ``rep_first_half``, ``rep_repeated_half``, ``rep_half_gap``; and
    ``val_loss_at_position`` per token index (``position`` column; -1 on the other rows).
    """
    rows = [dict(metric=f"val_{k}", value=v) for k, v in next_token_stats(val_logits, val).items()]
    rows += [dict(metric=f"rep_{k}", value=v) for k, v in next_token_stats(rep_logits, rep).items()]
    rows.append(dict(metric="icl_score", value=icl_score(val_logits, val.tokens)))
    rows += [dict(metric=f"rep_{k}", value=v) for k, v in half_losses(rep_logits, rep.tokens, rep_len).items()]
    df = pd.DataFrame(rows).assign(position=-1)
    per_pos = loss_by_position(val_logits, val.tokens)
    pos = pd.DataFrame({"metric": "val_loss_at_position", "value": per_pos[1:].tolist(),
                        "position": range(1, len(per_pos))})
    return pd.concat([df, pos], ignore_index=True).assign(step=int(step))[["step", "metric", "value", "position"]]


def emergence_rows(metrics: pd.DataFrame, threshold: float = 0.8, metric: str = "val_acc_induction") -> pd.DataFrame:
    """A run's emergence step as table rows (``step = -1``: a run-level value, like layer/head -1).

    ``value`` is ``nan`` when the run never reached ``threshold`` ("never" is a value, not an
    error); the ``threshold`` column records what was asked.
    """
    g = metrics[metrics.metric == metric].sort_values("step")
    step = emergence_step(g.step.tolist(), g.value.tolist(), threshold)
    return pd.DataFrame([dict(step=-1, metric="emergence_step", value=step, position=-1, threshold=float(threshold))])
