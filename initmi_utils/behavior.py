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
from jaxtyping import Float
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
