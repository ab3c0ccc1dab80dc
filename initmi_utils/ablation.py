"""Causal analyses on the bridge: head ablations, activation patching, a localisation index.

- ``ablation_effects``: zero- and mean-ablate each head's output (``blocks.{l}.attn.hook_z``)
  and measure the change in loss, induction accuracy and logit difference (the ablation effect
  matrix), and the change in every later head's induction score (K-composition evidence:
  ablating the previous-token head of layer 0 should collapse the layer-1 induction score).
- ``patching_effects``: activation patching clean -> corrupted on ``Dataset.patch`` with
  ``transformer_lens.patching`` (it works on the ``TransformerBridge``: it only needs
  ``run_with_hooks``, ``cfg`` and hook names ``blocks.{l}.attn.hook_z`` /
  ``blocks.{l}.hook_resid_pre``), per head and per (layer, position relative to the query),
  normalised so that 0 = corrupted run and 1 = clean run.
- ``localisation``: how concentrated an effect is over heads (top-1 share, entropy).
- ``path_ablation_effects``: one earlier head mean-ablated in only the Q, K or V input of one
  later head: which path a composition runs through (K: the match with the earlier copy; V: the
  copied token read from an earlier head's output).

Every analysis takes the bridge and data, runs under ``torch.no_grad`` and returns a tidy long
frame (``tables(cfg, root)`` runs them over every checkpoint of a run, for notebook 04); ``layer``/``head`` always name the head a value is *about* (for an effect, the ablated or
patched head; for an induction-score change, the head whose score changed), and
``ablated_layer``/``ablated_head`` the head that was ablated (-1 where nothing was).

We write the ablation hooks ourselves because ``transformer_lens.patching`` only *patches* (copies
activations from another run); zero/mean ablation replaces them by constants.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from initmi_utils.attention import detection_masks, masked_score, pattern_names, patterns_from_cache
from initmi_utils.behavior import next_token_stats
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ExperimentConfig
from initmi_utils.data import Batch, PatchPairs, load_dataset
from initmi_utils.offsets import REPORT_ORDER, THRESHOLDS, Thresholds, model_mechanism

ABLATIONS = ("zero", "mean")
_STAT_NAMES = {"loss": "loss_induction", "acc": "acc_induction", "logit_diff": "logit_diff"}


def z_name(layer: int) -> str:
    return get_act_name("z", layer)


def _ablate_variants_hook(z: Float[Tensor, "variants_x_batch pos head d_head"], hook, n: int,
                          variants: list[tuple[int, int, Tensor | None]]) -> Tensor:
    """Ablate one head per block of ``n`` sequences: ``variants`` = [(block, head, replacement)]."""
    z = z.clone()
    for block, head, replacement in variants:
        rows = slice(block * n, (block + 1) * n)
        z[rows, :, head] = 0.0 if replacement is None else replacement[None, : z.shape[1], head]
    return z


def ablation_effects(bridge, batch: Batch, kinds: tuple[str, ...] = ABLATIONS, max_batch: int = 64,
                     reference: Batch | None = None) -> pd.DataFrame:
    """The ablation effect matrix and the induction-score changes it causes downstream.

    For each kind in ``kinds`` and each head (l, h), head (l, h)'s ``hook_z`` is replaced by 0
    (``zero``) or by its mean over the batch at each position on the clean run (``mean``; keeping
    the per-position mean keeps positional information that is not the head's mechanism). Rows:

    - ``{kind}_ablation_loss_delta``, ``_acc_delta``, ``_logit_diff_delta`` at (l, h): ablated
      minus clean loss / accuracy / logit difference, measured on ``batch``'s induction targets
      (loss there, not over all positions: the first copy of a repeated block is unpredictable
      and its loss would swamp the effect);
    - ``{kind}_ablation_induction_score_delta`` at every head (l2, h2) with l2 > l, with
      ``ablated_layer=l, ablated_head=h``: the change of (l2, h2)'s induction score;
    - ``clean_loss``, ``clean_acc``, ``clean_logit_diff`` (layer = head = -1): the baselines.

    ``reference``: take the mean-ablation means from a forward on these sequences instead of on
    ``batch`` (same length). The headline localisation evaluates on one half of the validation
    set and takes the means over the other half (``localisation_by_layer``): a mean over the very
    sequences being evaluated leaks each sequence's own activation into its baseline.

    Speed: the bridge's per-forward overhead dominates on small models, so the ablations run
    batched: the batch is repeated once per (kind, head) and one hook per layer ablates a
    different head in each copy (at most ``max_batch`` sequences per forward: on CPU 64 was
    1.6x faster than 1024, whose activations fall out of cache).
    """
    bad = sorted(set(kinds) - set(ABLATIONS))
    if bad:
        raise ValueError(f"unknown ablation kind(s) {bad}; choose from {ABLATIONS}.")
    cfg = bridge.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    tokens, n = batch.tokens, batch.tokens.shape[0]
    induction_mask = detection_masks(tokens)["induction"]
    rows = []

    def add(layer, head, metric, value, ablated=(-1, -1)):
        rows.append({"layer": layer, "head": head, "metric": metric, "value": float(value),
                     "ablated_layer": ablated[0], "ablated_head": ablated[1]})

    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, names_filter=pattern_names(n_layers) + [z_name(l) for l in range(n_layers)])
        clean = next_token_stats(logits, batch)
        clean_induction = masked_score(patterns_from_cache(cache, n_layers).float(), induction_mask)
        for short, key in _STAT_NAMES.items():
            add(-1, -1, f"clean_{short}", clean[key])
        if reference is not None:
            _, ref_cache = bridge.run_with_cache(reference.tokens, names_filter=[z_name(l) for l in range(n_layers)])
            means = {l: ref_cache[z_name(l)].mean(0) for l in range(n_layers)}  # [pos head d_head]
        else:
            means = {l: cache[z_name(l)].mean(0) for l in range(n_layers)}
        variants = [(kind, layer, head) for kind in kinds for layer in range(n_layers) for head in range(n_heads)]
        per_forward = max(1, max_batch // n)
        for start in range(0, len(variants), per_forward):
            group = variants[start : start + per_forward]
            hooks = []
            for layer in range(n_layers):
                todo = [(i, head, None if kind == "zero" else means[layer])
                        for i, (kind, l, head) in enumerate(group) if l == layer]
                if todo:
                    hooks.append((z_name(layer), partial(_ablate_variants_hook, n=n, variants=todo)))
            with bridge.hooks(fwd_hooks=hooks):
                logits, cache = bridge.run_with_cache(tokens.repeat(len(group), 1), names_filter=pattern_names(n_layers))
            for i, (kind, layer, head) in enumerate(group):
                block = slice(i * n, (i + 1) * n)
                stats = next_token_stats(logits[block], batch)
                for short, key in _STAT_NAMES.items():
                    add(layer, head, f"{kind}_ablation_{short}_delta", stats[key] - clean[key], (layer, head))
                later = pattern_names(n_layers)[layer + 1 :]
                if later:
                    pat = torch.stack([cache[name][block] for name in later]).float()
                    delta = masked_score(pat, induction_mask) - clean_induction[layer + 1 :]
                    for j in range(delta.shape[0]):
                        for h2 in range(n_heads):
                            add(layer + 1 + j, h2, f"{kind}_ablation_induction_score_delta", delta[j, h2], (layer, head))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Activation patching.


def query_logit_diff(logits: Float[Tensor, "batch pos d_vocab"], pairs: PatchPairs) -> Float[Tensor, "batch"]:
    """logit(clean answer) - logit(corrupted answer) at each pair's query position."""
    rows = torch.arange(len(pairs.query))
    at_query = logits[rows, pairs.query]
    return at_query[rows, pairs.answer] - at_query[rows, pairs.corrupt_answer]


def subset_batch(batch: Batch, n: int) -> Batch:
    """The first ``n`` sequences of a batch (the notebooks' knob for speed)."""
    return Batch(batch.tokens[:n], batch.target[:n], batch.distractor[:n])


def subset_pairs(pairs: PatchPairs, n: int) -> PatchPairs:
    """The first ``n`` pairs (the notebooks' knob for speed)."""
    return PatchPairs(*(getattr(pairs, f)[:n] for f in ("clean", "corrupted", "query", "answer", "corrupt_answer")))


def _relative_pos_setter(corrupted: Tensor, index, clean: Tensor, query: Int[Tensor, "batch"]) -> Tensor:
    """Patch position ``query[b] + rel`` of every example b (index = [layer, rel])."""
    _, rel = index
    rows = torch.arange(len(query))
    corrupted[rows, query + rel] = clean[rows, query + rel]
    return corrupted


def position_labels(rep_len: int, offsets) -> list[str]:
    """What sits at each offset from the query in a patch pair (BOS + A + A, query = second A[k])."""
    names = {0: "query A[k]", -rep_len: "first A[k]", -(rep_len - 1): "first A[k+1] (corrupted)"}
    return [f"q{int(o):+d} {names[int(o)]}" if int(o) in names else f"q{int(o):+d}" for o in offsets]


@contextlib.contextmanager
def _without_progress_bars(module):
    """``transformer_lens.patching`` wraps its loops in ``tqdm`` with no switch to turn it off; a
    notebook patching every checkpoint would print two bars per checkpoint into its output.

    There is no supported per-call way: TL 4.3's patching functions take no ``disable`` or
    ``verbose`` argument, and tqdm's ``TQDM_DISABLE`` environment variable is read once, when
    tqdm is imported (``tqdm.utils.envwrap`` decorates ``tqdm.__init__``), so a running kernel
    cannot set it. Hence the module attribute is swapped for the duration of the call only."""
    original = module.tqdm
    module.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        module.tqdm = original


def patching_effects(bridge, pairs: PatchPairs, rep_len: int, positions: bool = True, min_gap: float = 0.1) -> pd.DataFrame:
    """Activation patching clean -> corrupted with ``transformer_lens.patching``.

    Metric: mean logit difference (clean answer - corrupted answer) at the query, normalised as
    ``(patched - corrupted) / (clean - corrupted)``: 0 = the patch did nothing, 1 = it restored
    the clean run (means over the batch before dividing, so a pair whose two runs agree does not
    divide by zero). Rows:

    - ``patch_head_normalised`` at (layer, head): each head's ``hook_z`` at every position
      (``get_act_patch_attn_head_out_all_pos``);
    - ``patch_resid_pre_normalised`` at (layer, head=-1) with column ``pos`` = offset from the
      query (``generic_activation_patch`` with our setter): the query position differs between
      pairs, but the first A[k] is always at ``-rep_len`` and the corrupted token at
      ``-(rep_len - 1)``, so offsets line up across pairs where absolute positions do not;
    - ``patch_clean_logit_diff``, ``patch_corrupted_logit_diff`` (layer = head = -1): the two ends.

    If ``|clean - corrupted| < min_gap`` logits the model does not tell the two runs apart (an
    untrained checkpoint) and every normalised value is ``nan`` rather than noise over a tiny gap.
    """
    import transformer_lens.patching as tl_patching

    metric = partial(query_logit_diff, pairs=pairs)
    rows = []
    with torch.no_grad(), _without_progress_bars(tl_patching):
        clean_logits, clean_cache = bridge.run_with_cache(pairs.clean)
        clean = metric(clean_logits).mean().item()
        heads = tl_patching.get_act_patch_attn_head_out_all_pos(
            bridge, pairs.corrupted, clean_cache, metric, reduce="mean", baseline=True)
        corrupted = float(heads.baseline)
        gap = clean - corrupted
        norm = (lambda v: (v - corrupted) / gap) if abs(gap) >= min_gap else (lambda v: math.nan)
        rows += [{"layer": -1, "head": -1, "metric": "patch_clean_logit_diff", "value": clean},
                 {"layer": -1, "head": -1, "metric": "patch_corrupted_logit_diff", "value": corrupted}]
        for layer in range(heads.values.shape[0]):
            for head in range(heads.values.shape[1]):
                rows.append({"layer": layer, "head": head, "metric": "patch_head_normalised",
                             "value": norm(float(heads.values[layer, head]))})
        if positions:
            offsets = list(range(-int(pairs.query.min()), 1))  # BOS of the earliest query .. the query
            index = pd.DataFrame([(l, o) for l in range(bridge.cfg.n_layers) for o in offsets], columns=["layer", "pos"])
            res = tl_patching.generic_activation_patch(
                bridge, pairs.corrupted, clean_cache, metric,
                patch_setter=partial(_relative_pos_setter, query=pairs.query),
                activation_name="resid_pre", index_df=index, reduce="mean")
            labels = dict(zip(offsets, position_labels(rep_len, offsets)))
            for (_, r), v in zip(index.iterrows(), res.tolist()):
                rows.append({"layer": int(r.layer), "head": -1, "metric": "patch_resid_pre_normalised",
                             "value": norm(v), "pos": int(r.pos), "pos_label": labels[int(r.pos)]})
    df = pd.DataFrame(rows)
    if "pos" in df:
        df["pos"] = df["pos"].astype("Int64")  # <NA> on per-head rows (-1 is a real offset)
    return df


# ---------------------------------------------------------------------------------------------
# Localisation.


def localisation(effects: Float[Tensor, "layer head"]) -> dict[str, float]:
    """How concentrated an effect is over heads, from ``p = |e| / sum |e|``.

    - ``localisation_top1_share``: ``max p`` (1 = one head carries everything, 1/n = spread evenly);
    - ``localisation_entropy``: ``-sum p log p`` in nats (0 = one head, ``log n`` = even);
    - ``localisation_entropy_normalised``: entropy / log n, comparable across model sizes;
    - ``top_layer``, ``top_head``: the head with the largest |effect|.

    All ``nan`` if every effect is 0 or nan (nothing to localise).
    """
    e = effects.detach().abs().flatten().double()
    n_heads = effects.shape[1]
    if not torch.isfinite(e).all() or e.sum() <= 0:
        nan = math.nan
        return {"localisation_top1_share": nan, "localisation_entropy": nan,
                "localisation_entropy_normalised": nan, "top_layer": -1, "top_head": -1}
    p = e / e.sum()
    entropy = abs(float(-(p * torch.log(p.clamp_min(1e-300))).sum()))  # abs: no "-0.0"
    top = int(p.argmax())
    return {"localisation_top1_share": float(p.max()), "localisation_entropy": entropy,
            "localisation_entropy_normalised": entropy / math.log(len(p)) if len(p) > 1 else 0.0,
            "top_layer": top // n_heads, "top_head": top % n_heads}


def localisation_table(effects: pd.DataFrame, sources: tuple[str, ...]) -> pd.DataFrame:
    """``localisation`` of each per-head effect metric in ``sources`` (rows of a long frame with
    layer, head, metric, value), one block of rows per source (column ``source``)."""
    rows = []
    for source in sources:
        sub = effects[(effects.metric == source) & (effects["layer"] >= 0) & (effects["head"] >= 0)]
        if sub.empty:
            continue
        m = sub.pivot(index="layer", columns="head", values="value")
        loc = localisation(torch.tensor(m.values, dtype=torch.float64))
        top = (loc.pop("top_layer"), loc.pop("top_head"))
        for metric, value in loc.items():
            rows.append({"layer": -1, "head": -1, "metric": metric, "value": value, "source": source,
                         "top_layer": top[0], "top_head": top[1]})
    return pd.DataFrame(rows)


def localisation_by_layer(effects: pd.DataFrame, sources: tuple[str, ...]) -> pd.DataFrame:
    """``localisation`` within each layer separately (``layer`` = the layer, ``head`` = -1,
    ``top_head`` = its largest head): "less localised" over all heads at once can just mean the
    previous-token signal is spread over more layer-0 heads, while the copying layer has one head."""
    rows = []
    for source in sources:
        sub = effects[(effects.metric == source) & (effects["layer"] >= 0) & (effects["head"] >= 0)]
        for layer, g in sub.groupby("layer"):
            loc = localisation(torch.tensor(g.sort_values("head").value.to_numpy()[None, :], dtype=torch.float64))
            top = loc.pop("top_head")
            loc.pop("top_layer")
            for metric, value in loc.items():
                rows.append({"layer": int(layer), "head": -1, "metric": f"{metric}_layer", "value": value,
                             "source": source, "top_layer": int(layer), "top_head": top})
    return pd.DataFrame(rows)


HELDOUT_SOURCES = ("heldout_mean_ablation_logit_diff_delta", "heldout_mean_ablation_acc_delta",
                   "heldout_zero_ablation_logit_diff_delta")  # per-layer localisation: the headline, then zero ablation


def heldout_ablation(bridge, val: Batch, n_sequences: int = 64) -> pd.DataFrame:
    """Mean ablation of every head evaluated on validation sequences with induction targets and
    with its per-position means taken over *other* validation sequences: the first
    ``n_sequences`` with targets are evaluated, the next ``n_sequences`` give the means (halves of
    them when there are fewer than ``2 * n_sequences``). Rows
    ``heldout_mean_ablation_{loss,acc,logit_diff}_delta``, ``heldout_zero_ablation_*`` (same
    sequences; zero ablation needs no means and is the secondary column), ``heldout_clean_*``, plus
    ``localisation_by_layer`` of ``HELDOUT_SOURCES``."""
    has = val.target.any(1).nonzero().flatten()
    n = min(n_sequences, len(has) // 2)  # a small validation set is split in halves
    if n < 1:
        raise ValueError("heldout_ablation needs at least 2 validation sequences with induction targets.")
    evaluate, reference = has[:n], has[n:2 * n]
    pick = lambda idx: Batch(val.tokens[idx], val.target[idx], val.distractor[idx])  # noqa: E731
    ab = ablation_effects(bridge, pick(evaluate), reference=pick(reference))
    ab = ab[~ab.metric.str.endswith("induction_score_delta")].copy()
    ab["metric"] = "heldout_" + ab.metric  # apart from the same metrics measured on ``rep``
    return pd.concat([ab, localisation_by_layer(ab, HELDOUT_SOURCES)], ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Path ablation: one earlier head removed from one input (Q, K or V) of one later head.

PATH_INPUTS = ("q", "k", "v")


def path_ablation_effects(model, bridge, batch: Batch, dst: tuple[int, int],
                          inputs: tuple[str, ...] = PATH_INPUTS, groups: bool = False,
                          through_mlp: bool = False) -> pd.DataFrame:
    """Which input of head ``dst`` = (layer, head) each earlier head reaches it through.

    For every head (l, h) of an earlier layer and every input ``c`` in ``inputs``, (l, h)'s output
    is replaced by its mean over the batch at each position (as ``ablation_effects``' ``mean``)
    in the residual stream that feeds ``dst``'s ``c`` alone; every other head and input sees the
    clean stream. Rows at (layer, head) = (l, h), ``ablated_layer/head`` = ``dst``: metric
    ``path_{c}_{loss,acc,logit_diff}_delta`` (ablated minus clean, on ``batch``'s induction
    targets). The hand-built induction head loses its accuracy through K only (its previous-token
    head sets the key); a large V drop means the copied token is read from an earlier head's
    output (shifted induction, long-offset recall, and some classic runs: README).

    ``groups``: also every earlier layer's heads *together* (rows with ``head = -1``): a
    previous-token signal spread over several layer-0 heads is invisible head by head.
    ``through_mlp``: for heads of the layer just below ``dst``, the ablated stream also goes
    through that layer's MLP (recomputed from it), so the path includes head -> MLP -> ``dst``: a
    trained model can pass the previous token to the key through MLP0 rather than directly.

    Why by hand: TransformerLens 4.x's native bridge (``AttentionBridge``) has no split Q/K/V
    input hooks (``set_use_split_qkv_input`` raises ``NotImplementedError``), so ``dst``'s q, k or
    v is recomputed from the cached ``hook_resid_pre`` with the source head's contribution
    replaced, through ``model``'s (the bridge's source) LayerNorm and weights, and written into
    the bridge's ``blocks.{layer}.attn.hook_{c}``.
    """
    bad = sorted(set(inputs) - set(PATH_INPUTS))
    if bad:
        raise ValueError(f"unknown input(s) {bad}; choose from {PATH_INPUTS}.")
    dst_layer, dst_head = dst
    if not 1 <= dst_layer < model.cfg.n_layers or not 0 <= dst_head < model.cfg.n_heads:
        raise ValueError(f"dst={dst} must be a head of layer 1..{model.cfg.n_layers - 1} (an earlier layer must exist).")
    tokens, block, rows = batch.tokens, model.blocks[dst_layer], []
    resid_name, mid_name = get_act_name("resid_pre", dst_layer), get_act_name("resid_mid", dst_layer - 1)
    source_block = model.blocks[dst_layer - 1]
    through_mlp = through_mlp and hasattr(source_block, "mlp")
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(
            tokens, names_filter=[resid_name] + [z_name(l) for l in range(dst_layer)] + ([mid_name] if through_mlp else []))
        clean = next_token_stats(logits, batch)
        resid = cache[resid_name]
        for layer in range(dst_layer):
            z, W_O = cache[z_name(layer)], model.blocks[layer].attn.W_O
            sources = [(h, z[:, :, h] @ W_O[h]) for h in range(model.cfg.n_heads)]  # [batch pos d_model] each
            if groups:
                sources.append((-1, sum(out for _, out in sources)))
            for head, out in sources:
                if through_mlp and layer == dst_layer - 1:
                    mid = cache[mid_name] - out + out.mean(0)
                    x = block.ln1(mid + source_block.mlp(source_block.ln2(mid)))
                else:
                    x = block.ln1(resid - out + out.mean(0))
                for c in inputs:
                    W, b = getattr(block.attn, f"W_{c.upper()}")[dst_head], getattr(block.attn, f"b_{c.upper()}")[dst_head]
                    new = x @ W + b

                    def patch(act, hook, new=new):
                        act = act.clone()
                        act[:, :, dst_head] = new
                        return act

                    with bridge.hooks(fwd_hooks=[(get_act_name(c, dst_layer), patch)]):
                        stats = next_token_stats(bridge(tokens), batch)
                    for short, key in _STAT_NAMES.items():
                        rows.append({"layer": layer, "head": head, "metric": f"path_{c}_{short}_delta",
                                     "value": float(stats[key] - clean[key]),
                                     "ablated_layer": dst_layer, "ablated_head": dst_head})
    return pd.DataFrame(rows)


def mechanism_paths(model, bridge, val: Batch, rep: Batch) -> pd.DataFrame:
    """``path_ablation_effects`` (on ``rep``) into the head that decides the checkpoint's copying
    mechanism (``offsets.model_mechanism`` on ``val``, where the copy distance varies), with its
    label in a ``mechanism`` column; no rows when the label is ``none`` (no such head)."""

    label = model_mechanism(model, val)
    if label["layer"] < 1:
        return pd.DataFrame(columns=["layer", "head", "metric", "value", "ablated_layer", "ablated_head", "mechanism"])
    return path_ablation_effects(model, bridge, rep, (label["layer"], label["head"])).assign(mechanism=label["label"])


# ---------------------------------------------------------------------------------------------
# Notebook 04's tables.

ABLATION_SOURCES = ("zero_ablation_logit_diff_delta", "mean_ablation_logit_diff_delta", "zero_ablation_acc_delta")
PATCHING_SOURCES = ("patch_head_normalised",)  # the per-head effects whose localisation notebook 04 reports


def tables(cfg: ExperimentConfig, root: str | Path | None = None, n_examples: int = 32, n_patch_pairs: int = 32,
           positions_every_checkpoint: bool = False, n_heldout: int = 64,
           evidence_every_checkpoint: bool = False) -> dict[str, pd.DataFrame]:
    """Notebook 04's tables of run ``cfg`` under ``root``: ``{"ablation", "patching", "paths"}``.

    - ``ablation``: at every checkpoint, ``ablation_effects`` on the first ``n_examples`` sequences
      of ``rep`` and the ``localisation_table`` of ``ABLATION_SOURCES`` (column ``source``), and
      ``heldout_ablation`` on ``n_heldout`` validation sequences (means over ``n_heldout`` others)
      with its per-layer localisation, the headline one;
    - ``patching``: at every checkpoint, ``patching_effects`` on the first ``n_patch_pairs`` pairs,
      per position only at the final checkpoint unless ``positions_every_checkpoint`` (slow), and
      the ``localisation_table`` of ``PATCHING_SOURCES``;
    - ``paths``: ``mechanism_paths`` at the final checkpoint (``val`` for the label, the same
      ``rep`` subset for the ablations), with its ``step``; no rows when the label is ``none``;
    - ``evidence``: ``label_evidence`` at the final checkpoint as one row (``evidence_rows``): the
      label next to the causal criterion it must pass; one row per checkpoint with
      ``evidence_every_checkpoint`` (label validation: checkpoints caught mid-emergence give the
      ``partial`` examples a final checkpoint rarely has).

    ``ablated_layer``, ``ablated_head``, ``top_layer`` and ``top_head`` are -1 where they do not apply.
    Raises ``CheckpointError`` naming the training to run if the run is not trained.
    """
    ckpts = list_checkpoints(cfg, root)
    ds = load_dataset(cfg, root)
    rep, pairs = subset_batch(ds.rep, n_examples), subset_pairs(ds.patch, n_patch_pairs)
    final = ckpts.steps[-1]
    ablation_frames, patching_frames, evidence_frames, paths = [], [], [], None
    for step, model, bridge in ckpts.bridges():
        ab = ablation_effects(bridge, rep)
        pa = patching_effects(bridge, pairs, cfg.data.rep_len, positions=positions_every_checkpoint or step == final)
        ablation_frames += [ab.assign(step=step), localisation_table(ab, ABLATION_SOURCES).assign(step=step),
                            heldout_ablation(bridge, ds.val, n_heldout).assign(step=step)]
        patching_frames += [pa.assign(step=step), localisation_table(pa, PATCHING_SOURCES).assign(step=step)]
        if step == final:  # here, not after the loop: the bridge is refilled by every step
            paths = mechanism_paths(model, bridge, ds.val, rep).assign(step=final)
        if step == final or evidence_every_checkpoint:
            evidence_frames.append(evidence_rows(label_evidence(model, bridge, ds.val, rep)).assign(step=step))
    out = {"ablation": pd.concat(ablation_frames, ignore_index=True), "patching": pd.concat(patching_frames, ignore_index=True)}
    for df in out.values():
        for col in ("ablated_layer", "ablated_head", "top_layer", "top_head"):
            if col in df:
                df[col] = df[col].fillna(-1).astype(int)
    return {**out, "paths": paths, "evidence": pd.concat(evidence_frames, ignore_index=True)}


# ---------------------------------------------------------------------------------------------
# The mechanism label against a causal criterion (``label_evidence``, ``agreement_table``).

ABLATION_MIN_DROP = 0.3  # induction-accuracy drop (on ``rep``) when the deciding head is mean-ablated
PATH_MIN_SHARE = 0.2  # share of that drop an implied Q/K/V path must carry on its own
LABEL_PATHS = {"classic_induction": ("k",), "shifted_induction": ("k", "v"), "long_offset_recall": ("k", "v")}


def causal_verdict(mechanism: str, head_drop: float, path_drops: dict[str, float], top_drop: float) -> dict:
    """Whether causal evidence supports the attention label ``mechanism`` (for ``partial``, pass
    its ``attention_label``: the circuit the attention says is there).

    - ``ablation_ok``: mean-ablating the deciding head drops induction accuracy by >=
      ``ABLATION_MIN_DROP`` (0.3): the model needs that head. The heads the labels were read from
      drop it by 0.89 (shifted, full seed 1) to ~1 (hand-built classic, quick recall students);
      a head whose removal costs less than 0.3 is not how the model copies, whatever it attends to.
    - ``path_ok``: the layer-0 -> deciding-head paths are the ones the label implies. ``path_drops``
      holds, per input ``q``/``k``/``v``, the largest accuracy drop when one earlier head, or one
      earlier layer's heads together, are removed from that input alone, directly and through the
      MLP of their layer (``path_ablation_effects`` with ``groups`` and ``through_mlp``:
      ``label_evidence``). Each implied path must carry >=
      ``PATH_MIN_SHARE`` (0.2) of the head's drop (of at least ``ABLATION_MIN_DROP``, so a
      noise-level path never counts). classic: K (the previous-token head sets the key) and K >= V
      (the copied token is the key position's own); shifted and recall: K *and* V (the token to
      copy is read through an earlier head). Q is never compared: every mechanism's query reads the
      current token, which a self-attending layer-0 head may carry (full mimetic-s1's classic head
      loses 0.94 through Q, 0.92 through K). 0.2: the shifted head's paths carry 0.29 (K) and 0.27
      (V) of its drop, the single largest share seen for a two-path circuit; a fifth leaves margin.
    - ``none`` (``head_drop`` nan: no deciding head): ``ablation_ok`` iff no head of layer >= 1
      drops accuracy by ``ABLATION_MIN_DROP`` (``top_drop``): the label missed no copying head;
      ``path_ok`` is ``None`` (nothing to check).

    ``causal_ok`` = ``ablation_ok`` and ``path_ok`` (for ``none``: ``ablation_ok``). ``nan`` drops
    never pass. Group and MLP paths are needed on trained models: in the quick preset's seed-0 classic
    runs (normal, xavier, orthogonal, seeded) no single layer-0 head's direct K path costs more than
    0.09, nor all of them together directly (0.04-0.33); through MLP0 the layer-0 heads together
    carry 0.80-0.88 of the K path, the whole drop of the induction head: the previous token
    reaches its key through MLP0.
    """
    if mechanism == "none":
        ok = bool(top_drop < ABLATION_MIN_DROP)  # nan: False
        return dict(ablation_ok=ok, path_ok=None, causal_ok=ok, path_floor=math.nan)
    if mechanism not in LABEL_PATHS:
        raise ValueError(f"no causal criterion for {mechanism!r}; pass the attention label, one of {tuple(LABEL_PATHS)} or 'none'.")
    ablation_ok = bool(head_drop >= ABLATION_MIN_DROP)
    floor = PATH_MIN_SHARE * max(head_drop, ABLATION_MIN_DROP) if not math.isnan(head_drop) else math.nan
    k, v = path_drops.get("k", math.nan), path_drops.get("v", math.nan)
    path_ok = all(path_drops.get(c, math.nan) >= floor for c in LABEL_PATHS[mechanism])
    if mechanism == "classic_induction":
        path_ok = path_ok and k >= v
    return dict(ablation_ok=ablation_ok, path_ok=bool(path_ok), causal_ok=ablation_ok and bool(path_ok), path_floor=floor)


def label_evidence(model, bridge, val: Batch, rep: Batch, n_sequences: int = 128,
                   thresholds: Thresholds = THRESHOLDS) -> dict:
    """The checkpoint's mechanism label next to the causal evidence for it.

    The label (``offsets.model_mechanism`` on the first ``n_sequences`` of ``val``: the copy
    distance varies, and the accuracy for the floor comes from the same forward); then, on
    ``rep`` (BOS + A + A, as ``mechanism_paths``), ``ablation_effects``' mean ablation of every
    head and ``path_ablation_effects`` into the deciding head; ``causal_verdict`` of the attention
    label. Keys: ``label``, ``attention_label``, ``accuracy``, ``layer``, ``head``,
    ``source_layer``, ``source_head``, ``score`` (the label's), ``rep_clean_acc``,
    ``ablation_drop`` (the deciding head's; ``nan`` without one), ``top_layer``, ``top_head``,
    ``top_drop`` (the head of layer >= 1 with the largest drop), ``path_drop_{q,k,v}`` and
    ``path_via_{q,k,v}`` (the largest single-head path drop per input and that head, ``L0H3``;
    ``nan`` / ``""`` without a deciding head), ``ablation_ok``, ``path_ok``, ``causal_ok``,
    ``path_floor``. Drops are positive when accuracy falls.
    """
    lab = model_mechanism(model, val, n_sequences, thresholds)
    eff = ablation_effects(bridge, rep, kinds=("mean",))
    acc = eff[(eff.metric == "mean_ablation_acc_delta") & (eff["layer"] >= 1)]
    drops = {(int(r.layer), int(r.head)): 0.0 - float(r.value) for r in acc.itertuples(index=False)}  # no "-0.0"
    (top_layer, top_head), top_drop = max(drops.items(), key=lambda kv: kv[1])
    dst = (lab["layer"], lab["head"])
    out = dict(lab, rep_clean_acc=float(eff[eff.metric == "clean_acc"].value.iloc[0]),
               ablation_drop=drops.get(dst, math.nan), top_layer=top_layer, top_head=top_head, top_drop=top_drop)
    path_drops: dict[str, float] = {}
    if dst[0] >= 1:
        paths = path_ablation_effects(model, bridge, rep, dst, groups=True, through_mlp=True)
        for c in PATH_INPUTS:
            worst = paths[paths.metric == f"path_{c}_acc_delta"].nsmallest(1, "value").iloc[0]
            path_drops[c] = 0.0 - float(worst.value)
            head = int(worst["head"])
            out[f"path_via_{c}"] = f"L{int(worst.layer)}" + (f"H{head}" if head >= 0 else " (all heads)")
    out.update({f"path_drop_{c}": path_drops.get(c, math.nan) for c in PATH_INPUTS})
    out.update({f"path_via_{c}": out.get(f"path_via_{c}", "") for c in PATH_INPUTS})
    return {**out, **causal_verdict(lab["attention_label"], out["ablation_drop"], path_drops, top_drop)}


EVIDENCE_COLUMNS = ("label", "attention_label", "accuracy", "ablation_drop", "top_drop", "path_drop_q", "path_drop_k",
                    "path_drop_v", "ablation_ok", "path_ok")


def evidence_rows(evidence: dict) -> pd.DataFrame:
    """``label_evidence`` as a table row: metric ``causal_ok`` (1 or 0), the deciding head in
    layer/head (-1 without one), the rest of ``EVIDENCE_COLUMNS`` as columns (``path_ok``: 1, 0 or
    nan for ``none``)."""
    row = {c: evidence[c] for c in EVIDENCE_COLUMNS}
    row["path_ok"] = math.nan if row["path_ok"] is None else float(row["path_ok"])
    row["ablation_ok"] = float(row["ablation_ok"])
    return pd.DataFrame([dict(row, layer=int(evidence["layer"]), head=int(evidence["head"]), metric="causal_ok",
                              value=float(bool(evidence["causal_ok"])))])


def final_evidence(evidence: pd.DataFrame) -> pd.DataFrame:
    """The rows of each run's last checkpoint in an ``evidence`` table (notebook 04 writes one row
    per checkpoint with ``evidence_every_checkpoint``, else only the final one)."""
    return evidence[evidence.step == evidence.groupby("run").step.transform("max")]


def agreement_table(rows) -> pd.DataFrame:
    """Label x causal evidence: per label (``REPORT_ORDER``, every label even when absent), ``n``
    checkpoints, how many the causal criterion supports (``passes``) and not (``fails``), the
    failures by part (``ablation_fails``, ``path_fails``: a checkpoint can fail both) and
    ``agreement`` = passes / n (``nan`` for n = 0). ``rows``: ``label_evidence`` dicts, or a
    frame of them (extra columns such as run or scheme are ignored; group first to split by them).
    """
    df = pd.DataFrame(list(rows) if not isinstance(rows, pd.DataFrame) else rows)
    out = []
    for label in REPORT_ORDER:
        g = df[df["label"] == label] if len(df) else df
        n = len(g)
        if n:  # label_evidence dicts carry causal_ok; table rows (``evidence_rows``) carry it as value
            ok = g["causal_ok"] if "causal_ok" in g.columns else g["value"] == 1.0
        passes = int((ok == True).sum()) if n else 0  # noqa: E712 (path_ok may be None)
        out.append(dict(label=label, n=n, passes=passes, fails=n - passes,
                        ablation_fails=int((g["ablation_ok"].isin([False, 0.0])).sum()) if n else 0,
                        path_fails=int((g["path_ok"].isin([False, 0.0])).sum()) if n else 0,
                        agreement=passes / n if n else math.nan))
    return pd.DataFrame(out).set_index("label")
