"""Attention mass by offset from the earlier copy of the current token; which copying mechanism a run uses.

``attention.induction_score`` asks one question: how much does a query attend to the key
*right after* the earlier occurrence of its token (offset +1)? A head that reads the earlier
copy in another way scores ~0 there although the model copies. Trained models do this. Besides
the classic circuit (a layer-0 previous-token head feeding a layer-1 induction head that attends
to offset +1 from the earlier copy), some 2-layer runs learn a *long-offset recall* circuit:

- a layer-0 head attends a fixed ~12-14 positions back (positional, not previous-token), so the
  residual stream at every position j holds "the tokens ~13 before j";
- a layer-1 head at a query holding token ``A`` attends to the position ~12-14 *after* the
  earlier ``A`` (K-composition: the key there holds "A was ~13 back") and reads, through the same
  layer-0 head (V-composition), a blurred bag of the tokens *around* the earlier ``A``;
- MLP0 and a local layer-1 head subtract the current and the recent tokens from that bag; the
  segment's tokens are distinct, so what remains is ``B``, the token after the earlier ``A``.

Its layer-1 head puts ~0 attention within +-3 of the earlier copy (induction score ~0), yet its
attention *rolled back through the layer-0 head* (``A_L1 @ A_L0``) peaks on the copy, at offsets
0/+1. It cannot copy when the two copies are fewer than ~12 positions apart (the position that
would hold "A was ~13 back" lies in the query's future): ``behavior.copy_distance_stats`` measures
that failure directly. Measured in the quick preset (5 seeds): the ``seeded`` donors of seeds 1-3
and their ``seeded`` students use it (README, "Findings so far").

A third circuit, *shifted induction*, appeared in the full preset (``scaled_residual``, seed 1,
step 6000; val induction accuracy 0.95): its layer-1 head attends to offset **+2** from the
earlier copy (0.81 of its mass), the token after ``B``, and reads ``B`` there through layer-0
heads that look back one position (V-composition), its key matching ``A`` through heads that
look back two (K-composition). Its induction score (+1) is 0.07, so it is neither classic nor
recall by the rules below without a rule of its own. Mean-ablating that head drops accuracy on
BOS + A + A by 0.89; no single layer-0 head's K or V path alone removes it
(``ablation.path_ablation_effects``: -0.26 through L0H3's K, -0.24 through its V, the largest).

So we measure two profiles:

- ``copy_offset_profile``: for each query whose token occurred earlier at index ``i``, the
  attention mass on key ``i + o``, per (layer, head, o). Offset +1 equals the induction score
  and offset 0 the duplicate-token score of ``attention.head_score_tensors`` on sequences where
  every repeated token has one earlier occurrence (``tests/test_offsets.py`` checks this);
- ``composed_copy_offset_profile``: the same profile of ``A_dst[h] @ A_src[s]``, the attention of a
  later head rolled back through one earlier head (the path "dst reads what src moved"); a
  classic induction head composed with its previous-token head lands on offset 0, and so does a
  long-offset recall head composed with its long-offset head, while its *direct* profile near
  the copy is ~0.

Both must be measured on data where the copy distance *varies* (``val``): on BOS + A + A the
distance is always ``rep_len``, and a long-offset recall head is indistinguishable from a
positional head attending ``rep_len - 13`` back. ``offset_table`` computes the profiles and a
per-head summary from one forward pass; ``classify_mechanism`` labels a checkpoint
``classic_induction``, ``shifted_induction``, ``long_offset_recall``, ``partial`` or ``none`` from
that summary *and* the checkpoint's induction accuracy (``THRESHOLDS``, a frozen ``Thresholds``).

A label needs behaviour as well as attention. The attention rules name the circuit a head would
implement; only a model that actually copies uses it. So a checkpoint whose attention says
classic / shifted / recall but whose induction accuracy (argmax == target on the validation
induction targets, ``behavior.next_token_stats``' ``acc_induction``) is below
``THRESHOLDS.min_induction_accuracy`` = 0.5 is labelled ``partial`` (the circuit's attention is
there, the behaviour is not yet or no longer); with no attention evidence it stays ``none``,
whatever its accuracy. Why 0.5: on the quick preset's seeds 0-4 at step 1200 every run without
any copying head has val induction accuracy <= 0.06 (short and long copies alike) and every run
with one >= 0.74 on short copies and >= 0.85 on long ones (the recall runs 0.30-0.49 on short
copies, but those are 6% of the targets: ~0.87 overall), so any floor in that gap labels those
runs as before; 0.5 is "the model gets most copy targets right", a property of the behaviour
rather than of the grid, and below the emergence threshold (0.8) so a run is labelled before it
counts as emerged. (The hand-built induction model scores only ~0.6 on its own ``val``: with 20
tokens the filler repeats, so many targets have an ambiguous earlier copy. The floor is a
statement about the quick/full data, d_vocab 64; revisit it for other data.) The donors of seeds 1 and 3 (0.71 and
0.45, never emerged) fall on either side of it: the second is ``partial``. ``partial`` is appended
to ``MECHANISMS`` (index 4), so the integer ``value`` of stored ``mechanism`` rows keeps its
meaning. Where no accuracy is available (``accuracy=None``: an ``offsets`` table read without its
``behavior`` table) the label is the attention label alone, as before the floor existed; the
frames say so (``accuracy`` is ``nan``).

Why by hand: neither TransformerLens's ``head_detector`` (fixed detection patterns, one offset)
nor its ``patching`` (causal effects, not attention geometry) measures mass at arbitrary offsets
from a token's earlier occurrence, nor attention composed across layers; both are a few tensor
operations on the cached patterns ``[layer, batch, head, q, k]`` (``attention.patterns_from_cache``
or ``model(tokens, patterns=[])``), which every other score of the package also takes.

Conventions: a query counts only if its token occurred before it *exactly once* (``unique=True``,
the default: the earlier copy is then unambiguous, e.g. the second half of BOS + A + A) or at
least once (``unique=False``: the most recent earlier occurrence); BOS queries never count. For
each offset only the rows whose key ``i + o`` exists, is not BOS and is causal
(``1 <= i + o <= q``) are averaged: BOS (position 0) is every head's attention sink, and counting
it would credit a BOS head with "attending before the copy" whenever the copy is at index 1-3.
Large offsets are thus averaged over the queries far enough from their earlier copy; ``nan``
where no row qualifies.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from initmi_utils.data import BOS

DEFAULT_OFFSETS = tuple(range(-3, 4))


def earlier_copy_index(tokens: Int[Tensor, "batch pos"], unique: bool = True) -> Int[Tensor, "batch pos"]:
    """Index of the earlier occurrence of ``tokens[b, q]`` (``k < q``), ``-1`` where there is none.

    ``unique=True``: only tokens that occurred exactly once before count (the others get ``-1``);
    ``unique=False``: the most recent earlier occurrence. BOS positions always get ``-1``.
    """
    batch, n = tokens.shape
    q_idx, k_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    earlier = (tokens[:, :, None] == tokens[:, None, :]) & (k_idx < q_idx)  # [batch q k]
    count = earlier.sum(-1)
    latest = torch.where(earlier, k_idx.expand_as(earlier), -1).amax(-1)  # [batch q]
    ok = (count == 1) if unique else (count >= 1)
    ok &= tokens != BOS
    return torch.where(ok, latest, -1)


def _copy_rows(tokens: Int[Tensor, "batch pos"], offsets: Sequence[int], queries: Bool[Tensor, "batch pos"] | None,
               unique: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (batch, query) rows that count and, per row and offset, the key ``i + o`` and whether it
    counts: ``b [row], q [row], key [row offset], ok [row offset]`` (see the module docstring)."""
    src = earlier_copy_index(tokens, unique)  # [batch q]
    has = src >= 0
    if queries is not None:
        has &= queries.bool()
    b, q = has.nonzero(as_tuple=True)
    key = src[b, q][:, None] + torch.tensor(list(offsets), dtype=torch.long)[None, :]  # [row offset]
    ok = (key >= 1) & (key <= q[:, None])  # key 0 is BOS; keys after the query are not causal
    return b, q, key.clamp(0, tokens.shape[1] - 1), ok


def _row_means(mass: Float[Tensor, "... row offset"], ok: Bool[Tensor, "row offset"]) -> Float[Tensor, "... offset"]:
    n = ok.sum(0)  # [offset]
    out = (mass * ok.to(mass.dtype)).sum(-2) / n.clamp(min=1)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def copy_offset_profile(
    pattern: Float[Tensor, "layer batch head q k"],
    tokens: Int[Tensor, "batch pos"],
    offsets: Sequence[int] = DEFAULT_OFFSETS,
    queries: Bool[Tensor, "batch pos"] | None = None,
    unique: bool = True,
) -> Float[Tensor, "layer head offset"]:
    """Mean attention from a query to key ``i + o``, ``i`` the earlier copy of the query's token.

    ``queries``: optional extra mask of the query positions to use (e.g. the positions that
    *predict* an induction target, ``induction_queries(batch.target)``). Rows: see the module
    docstring. Returns ``[layer, head, len(offsets)]``.
    """
    pattern = pattern.detach().float()
    b, q, key, ok = _copy_rows(tokens, offsets, queries, unique)
    rows = pattern[:, b, :, q, :]  # [row layer head k]: advanced indices first
    mass = rows.gather(-1, key[:, None, None, :].expand(-1, *rows.shape[1:3], -1))  # [row layer head offset]
    return _row_means(mass.permute(1, 2, 0, 3), ok)


def composed_pattern(
    pattern: Float[Tensor, "layer batch head q k"], src_layer: int = 0, dst_layer: int = 1
) -> Float[Tensor, "dst_head batch src_head q k"]:
    """``A_dst[h] @ A_src[s]`` for every (dst head h, src head s): the attention of ``dst_layer``'s
    heads rolled back through one head of ``src_layer`` (only that path; the residual path, i.e.
    reading the key position's own token, is ``pattern[dst_layer]`` itself). Laid out like a
    pattern with the dst head as "layer" so ``copy_offset_profile`` applies unchanged."""
    _check_layers(src_layer, dst_layer)
    a_dst, a_src = pattern[dst_layer].detach().float(), pattern[src_layer].detach().float()  # [batch head q k]
    return torch.einsum("bhqj,bsjk->hbsqk", a_dst, a_src)


def _check_layers(src_layer: int, dst_layer: int) -> None:
    if not src_layer < dst_layer:
        raise ValueError(f"src_layer={src_layer} must come before dst_layer={dst_layer}.")


def composed_copy_offset_profile(
    pattern: Float[Tensor, "layer batch head q k"],
    tokens: Int[Tensor, "batch pos"],
    offsets: Sequence[int] = DEFAULT_OFFSETS,
    src_layer: int = 0,
    dst_layer: int = 1,
    queries: Bool[Tensor, "batch pos"] | None = None,
    unique: bool = True,
) -> Float[Tensor, "dst_head src_head offset"]:
    """``copy_offset_profile`` of ``composed_pattern``: ``[dst head, src head, offset]``.

    Computed on the counted rows and keys only (``sum_j A_dst[q, j] A_src[j, i + o]``), never
    materialising the composed pattern: a few ms instead of ~50 ms on 128 sequences."""
    _check_layers(src_layer, dst_layer)
    pattern = pattern.detach().float()
    b, q, key, ok = _copy_rows(tokens, offsets, queries, unique)
    a_dst = pattern[dst_layer][b, :, q, :]  # [row dst_head j]
    cols = pattern[src_layer][b[:, None], :, :, key]  # [row offset src_head j]: only the keys needed
    mass = torch.einsum("rhj,rosj->hsro", a_dst, cols)
    return _row_means(mass, ok)


# ---------------------------------------------------------------------------------------------
# Per-checkpoint table and the mechanism label.

DIRECT_OFFSETS = tuple(range(-3, 21))  # wide: a long-offset recall head peaks at +12..+14
COMPOSED_OFFSETS = tuple(range(-3, 4))  # composed attention lands on the copy itself
NEAR = tuple(range(-3, 4))  # "near the copy": a recall head puts < 0.01 on each of these
FAR = tuple(range(10, 17))  # where a recall head's direct attention sits (0.77-0.97 of its mass)

# ``mechanism`` rows store the index here as ``value``: new labels are only ever appended.
MECHANISMS = ("none", "classic_induction", "long_offset_recall", "shifted_induction", "partial")
REPORT_ORDER = ("classic_induction", "shifted_induction", "long_offset_recall", "partial", "none")  # order in the report


@dataclass(frozen=True)
class Thresholds:
    """The thresholds of ``classify_mechanism``, frozen with their provenance.

    PROVENANCE: tuned by looking at the quick preset's seeds 0-4, final checkpoints (step 1200,
    64 val sequences); ``shifted_min_plus2`` was added after the full preset's seed 1
    (scaled_residual, step 6000). The full preset's seeds 0-4 repeat the quick runs for their first
    1200 steps (same init and data seeds), so neither is held out: a held-out validation of these
    values needs new seeds >= 5. What was seen:

    - ``classic_min_plus1``: induction heads put 0.85-0.93 of their attention on +1, every other
      layer-1 head <= 0.19;
    - ``shifted_min_plus2``: the one shifted head seen puts 0.81 on +2; set equal to
      ``classic_min_plus1`` (the same rule one key later), not tuned on a distribution;
    - ``recall_min_composed``: recall heads put 0.51-0.59 (their donors from 0.31) on {0, +1}
      composed, the heads of runs without induction <= 0.14;
    - ``recall_max_near``: recall heads put <= 0.01 on each offset within +-3; the mimetic runs'
      duplicate-token heads reach 0.74 composed but hold 0.2-0.7 on offset 0 directly, which this
      keeps out;
    - ``min_induction_accuracy``: runs without a copying head <= 0.06 val induction accuracy, runs
      with one >= 0.74 even on short copies (module docstring: why 0.5).

    ``tests/test_offsets.py`` pins each value with planted answers on both sides of it.

    HELD OUT: quick seeds 5-9 of normal, xavier, orthogonal and mimetic, every checkpoint
    (``make validate-labels``; ``results/labels/quick_seeds5-9.csv``) against the causal criterion
    of ``ablation.label_evidence``: every ``none`` passes, ``classic_induction`` passes at all but
    two checkpoints just above the accuracy floor, and every ``partial`` (classic attention, accuracy
    below the floor) fails it, as it should: its head does not yet carry the behaviour. No shifted
    or recall example occurred there.
    """

    classic_min_plus1: float = 0.3  # direct mass on +1 that makes a head an induction head
    shifted_min_plus2: float = 0.3  # direct mass on +2 that makes a head a shifted induction head (with recall_min_composed)
    recall_min_composed: float = 0.25  # composed mass on offsets {0, +1} that makes a head a recall head ...
    recall_max_near: float = 0.1  # ... provided its direct mass at every offset within +-3 of the copy stays below this
    min_induction_accuracy: float = 0.5  # val induction accuracy below which a copying circuit is only ``partial``


THRESHOLDS = Thresholds()
TUNING_SEEDS = (0, 1, 2, 3, 4)  # the init seeds the thresholds were read from (``Thresholds``' provenance)
# The same values under their old names (read-only copies: change ``Thresholds``, not these).
CLASSIC_MIN_PLUS1 = THRESHOLDS.classic_min_plus1
SHIFTED_MIN_PLUS2 = THRESHOLDS.shifted_min_plus2
RECALL_MIN_COMPOSED = THRESHOLDS.recall_min_composed
RECALL_MAX_NEAR = THRESHOLDS.recall_max_near
MIN_INDUCTION_ACCURACY = THRESHOLDS.min_induction_accuracy
ACCURACY_METRIC = "induction_accuracy"  # the ``offset_table`` row holding the accuracy the label used
BEHAVIOR_ACCURACY_METRIC = "val_acc_induction"  # the ``behavior`` table's metric ``mechanism_labels`` reads

SUMMARY_METRICS = ("copy_offset_plus1", "copy_offset_plus2", "copy_offset_near_max", "copy_offset_far",
                   "composed_copy_mass")


def induction_queries(target: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """The query positions that *predict* an induction target: ``target`` shifted one to the left
    (a target at ``i`` is predicted at ``i - 1``, whose token is the one that repeats)."""
    q = torch.zeros_like(target, dtype=torch.bool)
    q[:, :-1] = target[:, 1:].bool()
    return q


def induction_accuracy(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
                       target: Bool[Tensor, "batch pos"]) -> float:
    """Share of the induction targets (``target[b, i]``: token ``i`` is one) whose token is the
    argmax of the logits at ``i - 1``: ``behavior.next_token_stats``' ``acc_induction`` (equal,
    tested), computed here because ``offsets`` must not depend on ``behavior``. ``nan`` without
    targets."""
    mask = target[:, 1:].bool()
    if not mask.any():
        return math.nan
    return (logits[:, :-1].argmax(-1) == tokens[:, 1:])[mask].float().mean().item()


def _mass(profile: Tensor, offsets: Sequence[int], which: Sequence[int], reduce: str) -> Tensor:
    idx = [offsets.index(o) for o in which if o in offsets]
    if not idx:
        return torch.full(profile.shape[:-1], float("nan"))
    part = profile[..., idx]
    return part.nansum(-1) if reduce == "sum" else part.nan_to_num(0.0).amax(-1)


def offset_table(
    pattern: Float[Tensor, "layer batch head q k"],
    tokens: Int[Tensor, "batch pos"],
    queries: Bool[Tensor, "batch pos"] | None = None,
    step: int | None = None,
    direct_offsets: Sequence[int] = DIRECT_OFFSETS,
    composed_offsets: Sequence[int] = COMPOSED_OFFSETS,
    accuracy: float | None = None,
) -> pd.DataFrame:
    """Profiles, per-head summary and mechanism label of one checkpoint, long format.

    Columns: (step,) layer, head, metric, value, offset, source_layer, source_head, label
    (``-1`` / ``""`` where they do not apply). Metrics:

    - ``copy_offset_mass`` (per layer, head, ``offset``): ``copy_offset_profile``;
    - ``composed_copy_offset_mass`` (per later head ``layer, head`` and earlier head
      ``source_layer, source_head``, ``offset``): ``composed_copy_offset_profile``, every pair of layers;
    - summary per head of layer >= 1: ``copy_offset_plus1`` and ``copy_offset_plus2`` (direct mass on +1, +2),
      ``copy_offset_near_max`` (largest direct mass on one offset in -3..+3), ``copy_offset_far``
      (direct mass summed over +10..+16), ``composed_copy_mass`` (composed mass on {0, +1}, the
      largest over earlier heads, which ``source_layer``/``source_head`` name);
    - ``mechanism``: one row, ``value`` = index in ``MECHANISMS``, ``label`` its name, layer/head
      the deciding head (``classify_mechanism`` with ``accuracy``);
    - ``induction_accuracy`` (layer = head = -1): ``accuracy``, only when it is given, so that
      ``mechanism_labels`` relabels the stored table with the same floor.

    ``queries`` defaults to every position whose token occurred exactly once before; on ``val``
    pass ``induction_queries(batch.target)``. ``accuracy``: the checkpoint's induction accuracy
    on the same sequences (``induction_accuracy``); ``None`` = not measured, and the ``mechanism``
    row is then the attention label alone (never ``partial``: see the module docstring).
    """
    direct_offsets, composed_offsets = tuple(direct_offsets), tuple(composed_offsets)
    pattern = pattern.detach().float()
    n_layers, _, n_heads = pattern.shape[:3]
    direct = copy_offset_profile(pattern, tokens, direct_offsets, queries)  # [layer head offset]
    frames = [_grid_frame(direct, "copy_offset_mass", direct_offsets)]
    on_copy = torch.full((n_layers, n_heads), float("nan"))  # best composed mass on {0, +1} per later head
    source = torch.full((n_layers, n_heads, 2), -1, dtype=torch.long)  # ... and the earlier head giving it
    for dst in range(1, n_layers):
        for src in range(dst):
            comp = composed_copy_offset_profile(pattern, tokens, composed_offsets, src, dst, queries)  # [dst src offset]
            frames.append(_grid_frame(comp, "composed_copy_offset_mass", composed_offsets)
                          .rename(columns={"layer": "head", "head": "source_head"})
                          .assign(layer=dst, source_layer=src))
            mass = _mass(comp, composed_offsets, (0, 1), "sum").nan_to_num(-1.0)  # [dst head, src head]
            best, arg = mass.max(-1)
            better = best > on_copy[dst].nan_to_num(-1.0)
            on_copy[dst] = torch.where(better, best.where(best >= 0, torch.tensor(float("nan"))), on_copy[dst])
            source[dst] = torch.where(better[:, None], torch.stack([torch.full_like(arg, src), arg], -1), source[dst])
    summary = {"copy_offset_plus1": _mass(direct, direct_offsets, (1,), "sum"),
               "copy_offset_plus2": _mass(direct, direct_offsets, (2,), "sum"),
               "copy_offset_near_max": _mass(direct, direct_offsets, NEAR, "max"),
               "copy_offset_far": _mass(direct, direct_offsets, FAR, "sum"),
               "composed_copy_mass": on_copy}
    rows = []
    for layer in range(1, n_layers):
        for head in range(n_heads):
            rows += [dict(layer=layer, head=head, metric=m, value=float(t[layer, head])) for m, t in summary.items()]
            rows[-1].update(source_layer=int(source[layer, head, 0]), source_head=int(source[layer, head, 1]))
    summ = pd.DataFrame(rows, columns=["layer", "head", "metric", "value", "source_layer", "source_head"])
    label = classify_mechanism(summ, accuracy)
    mech = [dict(layer=label["layer"], head=label["head"], source_layer=label["source_layer"],
                 source_head=label["source_head"], metric="mechanism",
                 value=float(MECHANISMS.index(label["label"])), label=label["label"])]
    if accuracy is not None:
        mech.append(dict(layer=-1, head=-1, metric=ACCURACY_METRIC, value=float(accuracy)))
    df = pd.concat(frames + [summ, pd.DataFrame(mech)], ignore_index=True)
    for col in ("offset", "source_layer", "source_head"):
        df[col] = df[col].fillna(-1).astype(int)
    df["label"] = df["label"].fillna("")
    if step is not None:
        df.insert(0, "step", int(step))
    return df[(["step"] if step is not None else []) + ["layer", "head", "metric", "value", "offset", "source_layer",
                                                        "source_head", "label"]]


def _grid_frame(t: Float[Tensor, "a b offset"], metric: str, offsets: Sequence[int]) -> pd.DataFrame:
    """``t[a, b, o]`` as rows (layer = a, head = b, offset, metric, value)."""
    a, b, o = t.shape
    idx = torch.cartesian_prod(torch.arange(a), torch.arange(b), torch.arange(o)).numpy()
    return pd.DataFrame({"layer": idx[:, 0], "head": idx[:, 1], "offset": [offsets[i] for i in idx[:, 2]],
                         "metric": metric, "value": t.reshape(-1).double().numpy()})


def classify_mechanism(
    summary: pd.DataFrame,
    accuracy: float | None,
    thresholds: Thresholds = THRESHOLDS,
    **overrides: float,
) -> dict:
    """Label one checkpoint from the per-head summary rows of ``offset_table`` (other rows ignored)
    and its induction accuracy.

    First the attention label, by the first rule that holds:

    - ``classic_induction``: some head of layer >= 1 puts >= ``classic_min_plus1`` of its
      attention on offset +1 from the earlier copy (the deciding head: the largest such mass);
    - ``shifted_induction``: otherwise, some head of layer >= 1 puts >= ``shifted_min_plus2`` on
      offset +2 (the token after the one to predict) *and*, rolled back through some earlier head,
      >= ``recall_min_composed`` on offsets {0, +1}: it reads the copy's successor where an earlier
      head moved it (deciding: the largest +2 mass). Without the composed condition a head that
      merely attends two after the copy would count;
    - ``long_offset_recall``: otherwise, some head of layer >= 1 whose direct mass stays below
      ``recall_max_near`` at *every* offset within +-3 of the copy (so neither an induction nor a
      duplicate-token head) has composed mass on offsets {0, +1} >= ``recall_min_composed``
      through some earlier head (deciding: the largest composed mass);
    - ``none``: neither (no copying head yet, or one this classification does not know).

    Then behaviour: an attention label other than ``none`` becomes ``partial`` when ``accuracy``
    (val induction accuracy, ``induction_accuracy``) is below ``min_induction_accuracy`` (the
    deciding head is kept: ``attention_label`` says which circuit it would be). ``accuracy`` is
    required; pass ``None`` only when it is not available, which skips the floor (the label before
    the floor existed). ``nan`` accuracy (measured, but no target) fails the floor, as ``nan``
    never passes a threshold.

    ``thresholds``: a ``Thresholds`` (default: the frozen ``THRESHOLDS``); ``overrides``: some of
    its fields by name, e.g. ``recall_min_composed=0.7``. Returns ``label``, ``attention_label``,
    ``accuracy`` (``nan`` if ``None``), ``layer``, ``head``, ``source_layer``, ``source_head``
    (``-1`` where they do not apply) and ``score``.
    """
    t = dataclasses.replace(thresholds, **overrides) if overrides else thresholds
    s = summary[summary.metric.isin(SUMMARY_METRICS) & (summary.layer >= 1)]
    heads: dict[tuple[int, int], dict] = {}  # (layer, head) -> {metric: value, "source": (layer, head)}
    has_source = "source_layer" in s.columns and "source_head" in s.columns
    for r in s.itertuples(index=False):
        h = heads.setdefault((int(r.layer), int(r.head)), {})
        h[r.metric] = float(r.value)
        if r.metric == "composed_copy_mass" and has_source:
            h["source"] = (int(r.source_layer), int(r.source_head))
    acc = math.nan if accuracy is None else float(accuracy)
    out = dict(label="none", attention_label="none", accuracy=acc, layer=-1, head=-1, source_layer=-1,
               source_head=-1, score=math.nan)
    nan = math.nan
    rules = (  # (label, the deciding score, whether a head qualifies, whether to name its composing head)
        ("classic_induction", "copy_offset_plus1",
         lambda h: h.get("copy_offset_plus1", nan) >= t.classic_min_plus1, False),  # nan compares False
        ("shifted_induction", "copy_offset_plus2",
         lambda h: h.get("copy_offset_plus2", nan) >= t.shifted_min_plus2
         and h.get("composed_copy_mass", nan) >= t.recall_min_composed, True),
        ("long_offset_recall", "composed_copy_mass",
         lambda h: h.get("copy_offset_near_max", nan) < t.recall_max_near
         and h.get("composed_copy_mass", nan) >= t.recall_min_composed, True),
    )
    for label, metric, qualifies, composed in rules:
        found = {k: h[metric] for k, h in heads.items() if qualifies(h)}
        if found:
            (layer, head), score = max(found.items(), key=lambda kv: kv[1])
            src_layer, src_head = heads[(layer, head)].get("source", (-1, -1)) if composed else (-1, -1)
            copies = accuracy is None or acc >= t.min_induction_accuracy  # nan compares False
            return dict(out, label=label if copies else "partial", attention_label=label, layer=layer, head=head,
                        source_layer=src_layer, source_head=src_head, score=score)
    return out


def mechanism_labels(offsets: pd.DataFrame, behavior: pd.DataFrame | None = None,
                     thresholds: Thresholds = THRESHOLDS, **overrides: float) -> pd.DataFrame:
    """``classify_mechanism`` of every (run, step) of an ``offsets`` table (read across runs):
    run, scheme, seed, step, mechanism, layer, head, source_layer, source_head, score, accuracy,
    attention_mechanism. Labels are recomputed from the summary rows, so ``thresholds`` /
    ``overrides`` apply to stored tables too.

    The accuracy of each (run, step), for the floor: the ``behavior`` table's
    ``BEHAVIOR_ACCURACY_METRIC`` rows (``val_acc_induction``, notebook 02; matched on the key
    columns both tables have) when ``behavior`` is given, else the ``offsets`` table's own
    ``induction_accuracy`` row (``offset_table(accuracy=...)``). Where neither has it the
    accuracy is unavailable: ``classify_mechanism(..., None)``, the attention label alone (never
    ``partial``), with ``accuracy`` ``nan`` in the result so the missing floor is visible. Pass
    ``behavior``: a label without it only says what the attention looks like.
    """
    keys = [c for c in ("run", "scheme", "seed", "step") if c in offsets.columns]
    cols = keys + ["mechanism", "layer", "head", "source_layer", "source_head", "score", "accuracy",
                   "attention_mechanism"]
    sub = offsets[offsets.metric.isin(SUMMARY_METRICS + (ACCURACY_METRIC,))]
    if not sub.metric.isin(SUMMARY_METRICS).any():
        return pd.DataFrame(columns=cols)
    from_behavior: dict = {}
    bkeys: list[str] = []
    if behavior is not None:
        bkeys = [k for k in keys if k in behavior.columns]
        if not bkeys:
            raise ValueError(f"behavior shares no key column with offsets ({keys}).")
        b = behavior[behavior.metric == BEHAVIOR_ACCURACY_METRIC]
        from_behavior = b.groupby(bkeys).value.mean().to_dict() if len(b) else {}
    rows = []
    for k, g in sub.groupby(keys, sort=False):
        k = k if isinstance(k, tuple) else (k,)
        where = dict(zip(keys, k))
        own = g[g.metric == ACCURACY_METRIC].value
        if behavior is not None:
            bk = tuple(where[c] for c in bkeys)
            accuracy = from_behavior.get(bk if len(bk) > 1 else bk[0])
        else:
            accuracy = float(own.mean()) if len(own) else None
        lab = classify_mechanism(g, accuracy, thresholds, **overrides)
        rows.append({**where, "mechanism": lab.pop("label"), "attention_mechanism": lab.pop("attention_label"), **lab})
    return pd.DataFrame(rows, columns=cols)


def model_mechanism(model, batch, n_sequences: int = 128, thresholds: Thresholds = THRESHOLDS) -> dict:
    """``classify_mechanism`` of a training-path ``model.Transformer`` on the first
    ``n_sequences`` of ``batch`` (``val``: the copy distance varies), from one no-grad forward
    that gives both the attention patterns and the induction accuracy for the floor."""
    tokens, target = batch.tokens[:n_sequences], batch.target[:n_sequences]
    patterns: list = []
    with torch.no_grad():
        logits = model(tokens, patterns)
    accuracy = induction_accuracy(logits, tokens, target)
    table = offset_table(torch.stack(patterns), tokens, induction_queries(target), accuracy=accuracy)
    return classify_mechanism(table, accuracy, thresholds)
