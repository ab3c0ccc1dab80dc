"""Logit lens: what would the model predict if it stopped after the embedding, or after layer l?

The residual stream after the embedding (``blocks.0.hook_resid_pre``, layer ``-1``) and after each
block (``blocks.{l}.hook_resid_post``, layer ``l``) is read through the model's own final LayerNorm
and unembedding by TransformerLens's ``tools.analysis.logit_lens``. Its final-LN choice is the one
we want: ``apply_ln_to_stack(recompute_ln=True)`` normalises every stack entry with *its own*
mean and scale (nostalgebraist's lens) rather than the final layer's cached scale, so an early,
small residual is not read as if it had the final residual's norm; the last entry reproduces the
model's logits exactly.

We then compute rank and probability of the correct next token ourselves, for one reason: TL's
``target_ranks`` count only *strictly* larger logits, so a readout where every logit is equal
(an unembedding that does not read the stream yet, as in a hand-built model before its last
layer) would count as rank 1 everywhere. Here ``rank = #{tokens j : logit_j >= logit_correct}``:
a tie is not a win, and rank 1 means the correct token is the unique argmax.

Position types come from the data's induction-target masks (``Batch.target[b, i]``: token ``i``
is predictable only by copying, from the logits at ``i - 1``):

- ``dataset="val", position_type="induction"``: targets inside a repeated segment's second copy;
- ``dataset="val", position_type="background"``: every other position (bigram background, the
  segment's first copy, and the unpredictable first token of its second copy);
- ``dataset="rep", position_type="induction"``: the second copy of BOS + A + A.

``lens_batch`` stacks ``val`` and ``rep`` into one token batch (``rep`` right-padded with BOS,
harmless under a causal mask) so that one forward pass per checkpoint feeds every score;
``tables(cfg, root)`` does that at every checkpoint of a run (notebook 05).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.tools.analysis import logit_lens
from transformer_lens.utilities import get_act_name

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ExperimentConfig
from initmi_utils.data import BOS, Batch, Dataset, load_dataset

METRICS = ("correct_rank", "correct_prob", "correct_top1")


def hook_names(n_layers: int) -> list[str]:
    """The cache entries ``logit_lens_table`` reads (``accumulated_resid`` wants every
    ``resid_pre`` plus the last ``resid_post``)."""
    return [get_act_name("resid_pre", layer) for layer in range(n_layers)] + [get_act_name("resid_post", n_layers - 1)]


@dataclass(frozen=True)
class LensBatch:
    """Tokens and, for every (dataset, position type), the *prediction* positions that belong to it.

    ``masks[key][b, j]`` is True when the logits at ``j`` predict a token of that type, i.e. when
    ``next_tokens[b, j] = tokens[b, j + 1]`` is such a token.
    """

    tokens: Int[Tensor, "batch pos"]
    next_tokens: Int[Tensor, "batch pos"]
    masks: dict[tuple[str, str], Bool[Tensor, "batch pos"]]


def lens_batch(ds: Dataset, n_val: int | None = None, n_rep: int | None = None) -> LensBatch:
    """The first ``n_val`` validation and ``n_rep`` BOS + A + A sequences in one padded batch."""
    parts: list[tuple[str, Batch]] = [("val", _first_rows(ds.val, n_val)), ("rep", _first_rows(ds.rep, n_rep))]
    length = max(b.tokens.shape[1] for _, b in parts)
    tokens, masks, row = [], {}, 0
    n_total = sum(b.tokens.shape[0] for _, b in parts)
    for name, b in parts:
        n, L = b.tokens.shape
        tokens.append(torch.nn.functional.pad(b.tokens, (0, length - L), value=BOS))
        pred_target = torch.zeros(n_total, length, dtype=torch.bool)  # logits at j predict token j + 1
        pred_real = torch.zeros(n_total, length, dtype=torch.bool)
        pred_target[row : row + n, : L - 1] = b.target[:, 1:]
        pred_real[row : row + n, : L - 1] = True
        masks[(name, "induction")] = pred_target
        if name == "val":
            masks[(name, "background")] = pred_real & ~pred_target
        row += n
    tokens = torch.cat(tokens)
    next_tokens = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], BOS)], dim=1)
    return LensBatch(tokens, next_tokens, masks)


def _first_rows(b: Batch, n: int | None) -> Batch:
    if n is None:
        return b
    if n < 1:
        raise ValueError(f"the logit lens needs at least one sequence per data set, got n={n}.")
    return Batch(b.tokens[:n], b.target[:n], b.distractor[:n])


def lens_logits(cache) -> tuple[list[int], Float[Tensor, "layer batch pos d_vocab"]]:
    """Full-vocabulary logit-lens logits (TransformerLens) and the layer index of each stack
    entry (``-1`` = embedding, ``l`` = after block ``l``)."""
    with torch.no_grad():  # chunk_size: TL's default of 64 rows made the lens 3-8x slower here
        result = logit_lens(cache, positions=None, return_type="logits", chunk_size=4096)
    n = len(result.labels)  # "0_pre", "1_pre", ..., "final_post"
    return list(range(-1, n - 1)), result.values.detach()


def correct_token_stats(logits: Float[Tensor, "layer batch pos d_vocab"], next_tokens: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
    """Per stack entry and position: 1-based ``rank`` (ties count against the correct token),
    ``prob`` and ``top1`` (rank == 1) of the correct next token."""
    logits = logits.float()
    idx = next_tokens[None, ..., None].expand(logits.shape[0], -1, -1, 1)
    correct = logits.gather(-1, idx)
    rank = (logits >= correct).sum(-1)
    prob = logits.softmax(-1).gather(-1, idx)[..., 0]
    return {"rank": rank.float(), "prob": prob, "top1": (rank == 1).float()}


def first_rank1_layer(top1_by_layer: list[float], layers: list[int], fraction: float = 0.5) -> float:
    """First layer at which the correct token is the argmax at >= ``fraction`` of the positions;
    ``nan`` if it never is."""
    for layer, top1 in zip(layers, top1_by_layer):
        if top1 >= fraction:
            return float(layer)
    return float("nan")


def logit_lens_table(cache, batch: LensBatch, rank1_fraction: float = 0.5) -> pd.DataFrame:
    """Tidy table of one checkpoint: per (dataset, position_type) and layer, the mean
    ``correct_rank`` (1 = argmax), ``correct_prob`` and ``correct_top1`` (fraction at rank 1); per
    (dataset, position_type) the ``first_rank1_layer`` (``layer`` column -1, value = the layer
    index, ``nan`` = never)."""
    layers, logits = lens_logits(cache)
    if logits.shape[1:3] != batch.tokens.shape:
        raise ValueError(
            f"the cache holds activations of shape {tuple(logits.shape[1:3])} but the lens batch has "
            f"tokens {tuple(batch.tokens.shape)}; run the bridge on batch.tokens."
        )
    stats = correct_token_stats(logits, batch.next_tokens)
    rows = []
    for (dataset, ptype), mask in batch.masks.items():
        if not mask.any():
            continue
        base = dict(head=-1, dataset=dataset, position_type=ptype)
        top1 = []
        for i, layer in enumerate(layers):
            values = {m: stats[k][i][mask].mean().item() for m, k in zip(METRICS, ("rank", "prob", "top1"))}
            rows += [dict(base, layer=layer, metric=m, value=v) for m, v in values.items()]
            top1.append(values["correct_top1"])
        rows.append(dict(base, layer=-1, metric="first_rank1_layer", value=first_rank1_layer(top1, layers, rank1_fraction)))
    return pd.DataFrame(rows)


def tables(cfg: ExperimentConfig, root: str | Path | None = None, n_val: int = 128, n_rep: int = 64,
           rank1_fraction: float = 0.5) -> dict[str, pd.DataFrame]:
    """Notebook 05's table of run ``cfg`` under ``root``: ``{"logit_lens": df}``, ``df`` being
    ``logit_lens_table`` of every checkpoint (one cached bridge forward each on
    ``lens_batch(ds, n_val, n_rep)``) with its ``step``. Raises ``CheckpointError`` naming the
    training to run if the run is not trained."""
    ckpts = list_checkpoints(cfg, root)
    batch = lens_batch(load_dataset(cfg, root), n_val, n_rep)
    names = hook_names(cfg.model.n_layers)
    frames = []
    for step, _, bridge in ckpts.bridges():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(batch.tokens, names_filter=names)
        frames.append(logit_lens_table(cache, batch, rank1_fraction).assign(step=step))
    return {"logit_lens": pd.concat(frames, ignore_index=True)}
