"""Attention-pattern scores per head, and offline circuitsvis views.

Scores (all in [0, 1] except the entropy), from the cached patterns of one forward pass:

- ``prev_token_score``: attention from position q to q - 1, averaged over q >= 1;
- ``duplicate_score``: attention from a token to its *earlier* occurrences (itself excluded),
  averaged over the queries that have one;
- ``induction_score``: attention from a token to the tokens that *followed* its earlier
  occurrences ("... A B ... A" -> B), averaged over the queries that have one;
- ``bos_score``: attention to position 0, averaged over q >= 1;
- ``attn_entropy``: entropy (nats) of each query's attention distribution, averaged over q >= 1
  (query 0 can only attend to itself); uniform attention over n keys has entropy log n.

Why not ``transformer_lens.head_detector``: ``detect_head`` tokenises strings through the model
(our bridge has no tokenizer), runs its own forward per prompt (we want one cached forward per
checkpoint to feed every score), and its ``"mul"`` score divides by *all* query rows, including
those where the pattern cannot occur (the first copy of BOS + A + A for duplicate/induction), so
a perfect induction head scores only ~0.5 there. We build the same detection masks batched
from the tokens and normalise by the queries that have a match, so a perfect head scores 1;
``tests/test_attention.py`` checks that our scores equal the head detector's up to exactly that
normalisation. ``tables(cfg, root)`` scores every checkpoint of a run (notebook 03).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ExperimentConfig
from initmi_utils.data import BOS, load_dataset
from initmi_utils.offsets import induction_accuracy, induction_queries, offset_table

METRICS = ("prev_token_score", "duplicate_score", "induction_score", "bos_score", "attn_entropy")


def pattern_names(n_layers: int) -> list[str]:
    """The hook names of every layer's attention pattern (for ``run_with_cache(names_filter=...)``)."""
    return [get_act_name("pattern", layer) for layer in range(n_layers)]


def patterns_from_cache(cache, n_layers: int) -> Float[Tensor, "layer batch head q k"]:
    """Stack ``blocks.{l}.attn.hook_pattern`` of a bridge cache (or a list from ``model(..., patterns=[])``)."""
    if isinstance(cache, (list, tuple)):
        return torch.stack(list(cache))
    return torch.stack([cache[name] for name in pattern_names(n_layers)])


def detection_masks(tokens: Int[Tensor, "batch pos"]) -> dict[str, Bool[Tensor, "batch q k"]]:
    """Where each kind of head should attend, per sequence (the head detector's patterns, batched).

    - ``prev_token``: k = q - 1;
    - ``duplicate``: tokens[k] == tokens[q], k < q;
    - ``induction``: tokens[k - 1] == tokens[q], 1 <= k <= q;
    - ``bos``: k = 0, q >= 1.
    """
    batch, n = tokens.shape
    q_idx, k_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch q k]
    prev = (k_idx == q_idx - 1).expand(batch, n, n)
    duplicate = same & (k_idx < q_idx)
    induction = torch.zeros_like(same)
    induction[:, :, 1:] = same[:, :, :-1] & (k_idx[:, 1:] <= q_idx)  # key k's previous token == query
    bos = ((k_idx == 0) & (q_idx >= 1)).expand(batch, n, n)
    return {"prev_token": prev, "duplicate": duplicate, "induction": induction, "bos": bos}


def masked_score(pattern: Float[Tensor, "layer batch head q k"], mask: Bool[Tensor, "batch q k"]) -> Float[Tensor, "layer head"]:
    """Attention mass on ``mask``, averaged over the (batch, query) rows where ``mask`` has a key.

    ``nan`` where no query has a match (e.g. no repeated token in the batch).
    """
    m = mask[None, :, None].to(pattern.dtype)  # [1 batch 1 q k]
    mass = (pattern * m).sum(-1)  # [layer batch head q]
    rows = mask.any(-1)  # [batch q]
    n_rows = rows.sum()
    if n_rows == 0:
        return torch.full(pattern.shape[:1] + pattern.shape[2:3], float("nan"))
    return (mass * rows[None, :, None].to(pattern.dtype)).sum(dim=(1, 3)) / n_rows


def attention_entropy(pattern: Float[Tensor, "layer batch head q k"]) -> Float[Tensor, "layer head"]:
    """Mean entropy (nats) of the attention distribution of queries q >= 1."""
    p = pattern[..., 1:, :]
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # 0 log 0 = 0
    return h.mean(dim=(1, 3))


def head_score_tensors(pattern: Float[Tensor, "layer batch head q k"], tokens: Int[Tensor, "batch pos"]) -> dict[str, Float[Tensor, "layer head"]]:
    """Every score of ``METRICS`` as a ``[layer, head]`` tensor."""
    pattern = pattern.detach().float()
    masks = detection_masks(tokens)
    return {
        "prev_token_score": masked_score(pattern, masks["prev_token"]),
        "duplicate_score": masked_score(pattern, masks["duplicate"]),
        "induction_score": masked_score(pattern, masks["induction"]),
        "bos_score": masked_score(pattern, masks["bos"]),
        "attn_entropy": attention_entropy(pattern),
    }


def to_long(scores: dict[str, Float[Tensor, "layer head"]], **columns) -> pd.DataFrame:
    """``{metric: [layer, head]}`` -> long frame (layer, head, metric, value, **columns)."""
    rows = []
    for metric, t in scores.items():
        for layer in range(t.shape[0]):
            for head in range(t.shape[1]):
                rows.append({"layer": layer, "head": head, "metric": metric, "value": float(t[layer, head])})
    df = pd.DataFrame(rows, columns=["layer", "head", "metric", "value"])
    for name, value in columns.items():
        df[name] = value
    return df


def head_scores(pattern: Float[Tensor, "layer batch head q k"], tokens: Int[Tensor, "batch pos"], step: int | None = None) -> pd.DataFrame:
    """Tidy long frame of every head's scores: (step,) layer, head, metric, value."""
    extra = {} if step is None else {"step": int(step)}
    return to_long(head_score_tensors(pattern, tokens), **extra)


def score_matrix(df: pd.DataFrame, metric: str) -> Float[Tensor, "layer head"]:
    """One metric of a ``head_scores`` frame back as a ``[layer, head]`` tensor (one step)."""
    sub = df[df.metric == metric].pivot_table(index="layer", columns="head", values="value")
    return torch.tensor(sub.values, dtype=torch.float32)


def checkpoint_patterns(bridge, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "layer batch head q k"]:
    """Every layer's attention pattern on ``tokens`` from one no-grad ``run_with_cache`` of ``bridge``."""
    n_layers = bridge.cfg.n_layers
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=pattern_names(n_layers))
    return patterns_from_cache(cache, n_layers)


def tables(cfg: ExperimentConfig, root: str | Path | None = None, n_examples: int = 64,
           n_offset_sequences: int = 64) -> dict[str, pd.DataFrame]:
    """Notebook 03's tables of run ``cfg`` under ``root``, every checkpoint: ``{"attention", "offsets"}``.

    - ``attention``: ``head_scores`` of the bridge's patterns on the first ``n_examples`` sequences
      of ``rep`` (BOS + A + A);
    - ``offsets``: ``offsets.offset_table`` (copy-offset profiles, summaries and the ``mechanism``
      label) of the plain model's patterns on the first ``n_offset_sequences`` of ``val``, where the
      copy distance varies (``model(tokens, patterns=[])`` computes the bridge's patterns, faster).

    The third table of notebook 03, ``persistence``, is ``donor_persistence.tables`` (that module
    sits above this one). Raises ``CheckpointError`` naming the training to run if the run is not
    trained.
    """
    ckpts = list_checkpoints(cfg, root)
    ds = load_dataset(cfg, root)
    tokens = ds.rep.tokens[:n_examples]
    val_tokens, val_queries = ds.val.tokens[:n_offset_sequences], induction_queries(ds.val.target[:n_offset_sequences])
    frames, offset_frames = [], []
    for step, model, bridge in ckpts.bridges():
        frames.append(head_scores(checkpoint_patterns(bridge, tokens), tokens, step=step))
        val_patterns: list[Tensor] = []
        with torch.no_grad():
            logits = model(val_tokens, patterns=val_patterns)
        accuracy = induction_accuracy(logits, val_tokens, ds.val.target[:n_offset_sequences])
        offset_frames.append(offset_table(patterns_from_cache(val_patterns, cfg.model.n_layers), val_tokens, val_queries,
                                          step=step, accuracy=accuracy))
    return {"attention": pd.concat(frames, ignore_index=True), "offsets": pd.concat(offset_frames, ignore_index=True)}


# ---------------------------------------------------------------------------------------------
# Figures.


def _head_by_step(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    sub = df[df.metric == metric].copy()
    sub["head_name"] = "L" + sub["layer"].astype(str) + "H" + sub["head"].astype(str)
    z = sub.pivot_table(index="head_name", columns="step", values="value", aggfunc="mean")
    return z.reindex(sorted(z.index, key=lambda s: tuple(int(x) for x in s[1:].split("H"))))


def _heatmap(z: pd.DataFrame, metric: str, **colorbar) -> go.Heatmap:
    # attention scores live in [0, 1], entropy in [0, log n]; effects are signed (diverging, 0 = white)
    sequential = metric in METRICS
    return go.Heatmap(
        z=z.values, x=[str(s) for s in z.columns], y=list(z.index), colorscale="Viridis" if sequential else "RdBu_r",
        zmin=0.0 if sequential else None, zmax=(None if metric == "attn_entropy" else 1.0) if sequential else None,
        zmid=None if sequential else 0.0,
        hovertemplate=f"{metric}<br>step %{{x}}<br>%{{y}}: %{{z:.3g}}<extra></extra>", colorbar=dict(title=metric, **colorbar))


def scores_grid_figure(df: pd.DataFrame, metrics: Sequence[str], title: str = "") -> go.Figure:
    """``scores_over_training_figure`` of several metrics stacked in one figure (one file to save),
    each panel with its own colour bar."""
    from plotly.subplots import make_subplots

    metrics = [m for m in metrics if (df.metric == m).any()]
    n = max(1, len(metrics))
    spacing = 0.08 / n if n > 1 else 0.0
    row_h = (1 - (n - 1) * spacing) / n  # plotly's row height, as a fraction of the plot
    fig = make_subplots(rows=n, cols=1, subplot_titles=list(metrics), vertical_spacing=spacing)
    n_heads = 1
    for i, metric in enumerate(metrics):
        z = _head_by_step(df, metric)
        n_heads = max(n_heads, len(z.index))
        y_mid = 1 - i * (row_h + spacing) - row_h / 2
        fig.add_trace(_heatmap(z, metric, y=y_mid, len=row_h * 0.95), row=i + 1, col=1)
        fig.update_yaxes(autorange="reversed", row=i + 1, col=1)
        fig.update_xaxes(type="category", row=i + 1, col=1)
    fig.update_xaxes(title="step (checkpoint)", row=n, col=1)
    fig.update_layout(template="plotly_white", title=title, height=max(320, 100 + n * (60 + 22 * n_heads)))
    return fig


def scores_over_training_figure(df: pd.DataFrame, metric: str, title: str = "") -> go.Figure:
    """Heatmap of one per-head metric: heads (``L{l}H{h}``) down, checkpoints (step) across.

    ``df``: step, layer, head, metric, value (a ``head_scores`` table over checkpoints, or any
    per-head effect such as ``ablation``). Attention scores get a sequential scale from 0,
    anything else a diverging scale centred on 0.
    Steps are shown as categories (checkpoints are log-spaced, so a linear axis hides early ones).
    """
    z = _head_by_step(df, metric)
    fig = go.Figure(_heatmap(z, metric))
    fig.update_yaxes(autorange="reversed", title="head")
    fig.update_xaxes(title="step (checkpoint)", type="category")
    fig.update_layout(template="plotly_white", title=title or metric, height=max(300, 60 + 28 * len(z.index)))
    return fig


# ---------------------------------------------------------------------------------------------
# circuitsvis, offline.


@dataclass(frozen=True)
class OfflineHTML:
    """HTML that Jupyter displays as is.

    circuitsvis's ``RenderedHTML._repr_html_`` picks the CDN version (``unpkg.com``) whenever a
    1-second request to google.com succeeds; this wrapper always shows the *local* source, which
    inlines the bundled ``circuitsvis/dist/cdn/iife.js``, so the view renders offline and in an
    executed notebook opened years later.
    """

    html: str

    def _repr_html_(self) -> str:
        return self.html

    def __html__(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def __repr__(self) -> str:  # the notebook's text/plain fallback: not another copy of the JS
        return f"<OfflineHTML, {len(self.html):,} characters of HTML with inlined circuitsvis JavaScript>"


def token_labels(tokens: Sequence[int]) -> list[str]:
    """Readable labels for integer tokens: ``BOS``, ``t17``, ..."""
    return ["BOS" if int(t) == BOS else f"t{int(t)}" for t in tokens]


def attention_heads_html(pattern: Float[Tensor, "head q k"], tokens: Sequence[int], layer: int) -> str:
    """circuitsvis ``attention_heads`` view of one layer (all heads in one view), local JS inlined.

    Uses ``RenderedHTML.local_src`` (never ``cdn_src``, never ``_repr_html_``, which may choose the CDN).
    """
    from circuitsvis.attention import attention_heads

    names = [f"L{layer}H{h}" for h in range(pattern.shape[0])]
    rendered = attention_heads(attention=pattern.detach().float().cpu(), tokens=token_labels(tokens),
                               attention_head_names=names, mask_upper_tri=True)
    return rendered.local_src


def attention_view(pattern: Float[Tensor, "layer head q k"], tokens: Sequence[int], title: str = "") -> OfflineHTML:
    """One offline ``attention_heads`` view per layer, stacked, for one sequence."""
    parts = [f"<h4>{title}</h4>"] if title else []
    for layer in range(pattern.shape[0]):
        parts.append(f"<h5>layer {layer}</h5>")
        parts.append(attention_heads_html(pattern[layer], tokens, layer))
    return OfflineHTML("\n".join(parts))
