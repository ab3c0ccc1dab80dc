"""A head browser: one run's attention heads across training, in one offline plotly figure.

Left, a head's attention pattern on one short fixed sequence (``browser_tokens``: BOS + B + B,
B the first ``block`` tokens of the first repeated-random diagnostic sequence, fixed by the
data seed) at one checkpoint; right, the same head's previous-token, induction and
duplicate-token scores over every analysed checkpoint (the run's ``attention`` table), with the
shown checkpoint marked. A slider moves across at most ``MAX_CHECKPOINTS`` checkpoints
(``choose_steps``: the first, the last and those where the scores change most, so the phase
change is in them), a dropdown picks the head::

    fig = head_browser(experiment("quick", "normal", 0), root, scores=attention_table)
    fig.show()

The figure is plain plotly, no script of its own, so it works wherever plotly figures are drawn:
JupyterLab (the plotly output type, animation frames included), an exported notebook, the
report. The slider animates over frames; frame k restyles every head's heatmap to checkpoint k
and moves the step marker, while the dropdown only toggles which head's traces are visible, so
the two controls compose. Patterns are whole percentages: the shown step's as ``uint8`` arrays,
which plotly stores as base64 (``{"dtype": "u1", "bdata": …}``), the frames' as integer lists
(plotly.js does not decode base64 arrays in animation frames: the heatmap would vanish). 8
checkpoints × 8 heads × 25² cells take ~0.1 MB.

``head_browser(..., keep=True)`` (notebook 03) also writes what the figure shows, the patterns
as whole percentages, the steps and the tokens (``browser.safetensors`` in the run's tables
folder, ~40 KB), so that ``stored_head_browser`` draws the same figure without checkpoints: from
published results (``results.publish`` copies it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from torch import Tensor

from safetensors.torch import load_file, save_file

from initmi_utils.attention import patterns_from_cache, token_labels
from initmi_utils.checkpoints import RunCheckpoints, list_checkpoints
from initmi_utils.config import ExperimentConfig, RunPaths
from initmi_utils.data import load_dataset
from initmi_utils.io import atomic_write
from initmi_utils.tables import table_path

MAX_CHECKPOINTS = 8
BLOCK = 12  # tokens of B in BOS + B + B: long enough for a copy 12 apart, short enough to read
SCORES = {"prev_token_score": "previous-token", "induction_score": "induction", "duplicate_score": "duplicate"}
SCORE_COLORS = {"prev_token_score": "#1f77b4", "induction_score": "#d62728", "duplicate_score": "#2ca02c"}


def browser_tokens(cfg: ExperimentConfig, root: str | Path | None = None, block: int = BLOCK) -> Int[Tensor, "pos"]:
    """BOS + B + B, B the first ``block`` tokens of the block of the first ``rep`` sequence
    (BOS + A + A, A distinct random tokens): the same sequence for every run of a data seed."""
    rep = load_dataset(cfg, root).rep.tokens[0]
    b = rep[1 : 1 + min(block, cfg.data.rep_len)]
    return torch.cat([rep[:1], b, b])


def choose_steps(scores: pd.DataFrame, n: int = MAX_CHECKPOINTS) -> list[int]:
    """At most ``n`` of the analysed steps in ``scores`` (step, layer, head, metric, value): the
    first, the last, then one at a time the step worst predicted by a straight line between its
    chosen neighbours (every head's three scores, checkpoints equally spaced), so the steps
    gather where the heads change; when nothing changes, the middle of the widest gap."""
    s = scores[scores.metric.isin(list(SCORES)) & (scores["head"] >= 0)]
    wide = s.pivot_table(index="step", columns=["metric", "layer", "head"], values="value", aggfunc="mean")
    steps = [int(x) for x in wide.index]
    if len(steps) <= n:
        return steps
    y = np.nan_to_num(wide.to_numpy(dtype=float))
    chosen = {0, len(steps) - 1}
    while len(chosen) < n:
        idx = sorted(chosen)
        best = None  # (error, gap, index)
        for a, b in zip(idx, idx[1:]):
            for i in range(a + 1, b):
                line = y[a] + (i - a) / (b - a) * (y[b] - y[a])
                key = (float(np.abs(y[i] - line).max()), b - a, -abs(i - (a + b) / 2))
                if best is None or key > best[0]:
                    best = (key, i)
        chosen.add(best[1])
    return [steps[i] for i in sorted(chosen)]


def evenly(steps: Sequence[int], n: int = MAX_CHECKPOINTS) -> list[int]:
    """At most ``n`` of ``steps``, evenly spaced by position, the first and last included."""
    steps = sorted(steps)
    if len(steps) <= n:
        return list(steps)
    return [steps[i] for i in sorted(set(np.round(np.linspace(0, len(steps) - 1, n)).astype(int)))]


def browser_patterns(ckpts: RunCheckpoints, steps: Sequence[int], tokens: Int[Tensor, "pos"]
                     ) -> dict[int, Float[Tensor, "layer head q k"]]:
    """Every head's attention pattern on ``tokens`` at each of ``steps`` (the training model's
    explicit patterns, the same numbers as the bridge's ``blocks.{l}.attn.hook_pattern``)."""
    out = {}
    for step in steps:
        model, _ = ckpts.load(step)
        patterns: list[Tensor] = []
        with torch.no_grad():
            model(tokens[None], patterns=patterns)
        out[int(step)] = patterns_from_cache(patterns, model.cfg.n_layers)[:, 0]
    return out


def _percent(p: Float[Tensor, "q k"]) -> np.ndarray:
    return np.rint(p.detach().float().cpu().numpy() * 100).clip(0, 100).astype(np.uint8)


def default_head(scores: pd.DataFrame, n_layers: int) -> tuple[int, int]:
    """The last layer's head with the highest induction score at the last analysed step
    (head 0 of the last layer when there are no scores)."""
    last = n_layers - 1
    ind = scores[(scores.metric == "induction_score") & (scores.layer == last) & (scores["head"] >= 0)]
    if ind.empty:
        return last, 0
    ind = ind[ind.step == ind.step.max()]
    return last, int(ind.loc[ind.value.idxmax(), "head"])


def head_browser_figure(patterns: dict[int, Float[Tensor, "layer head q k"]], tokens: Sequence[int],
                        scores: pd.DataFrame, title: str = "", height: int = 580,
                        width: int | None = None) -> go.Figure:
    """The browser from what it shows: ``patterns`` per checkpoint step, the sequence's
    ``tokens`` and the run's head ``scores`` over training (step, layer, head, metric, value;
    may be empty). The slider starts at the last checkpoint, the dropdown at ``default_head``."""
    steps = sorted(patterns)
    n_layers, n_heads, n_pos, _ = patterns[steps[-1]].shape
    heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    start = heads.index(default_head(scores, n_layers))
    labels = [f"{i} {t}" for i, t in enumerate(token_labels(tokens))]
    present = [m for m in SCORES if (scores.metric == m).any()] if len(scores) else []
    lines = {}
    for (l, h) in heads:
        for m in present:
            g = scores[(scores.metric == m) & (scores.layer == l) & (scores["head"] == h)]
            lines[(l, h, m)] = g.groupby("step").value.mean().sort_index()

    fig = make_subplots(rows=1, cols=2, column_widths=[0.52, 0.48], horizontal_spacing=0.16,
                        subplot_titles=("attention pattern (query ↓, key →), % of the query's attention",
                                        "the head's scores over training"))
    for i, (l, h) in enumerate(heads):
        fig.add_trace(go.Heatmap(
            z=_percent(patterns[steps[-1]][l, h]), zmin=0, zmax=100, colorscale="Blues", visible=i == start,
            name=f"L{l}H{h}", colorbar=dict(title="%", x=0.455, len=0.9, thickness=12),
            hovertemplate="query %{y} → key %{x}: %{z}%<extra>L" + f"{l}H{h}" + "</extra>"), row=1, col=1)
    for i, (l, h) in enumerate(heads):
        for m in present:
            s = lines[(l, h, m)]
            fig.add_trace(go.Scatter(
                x=s.index.to_numpy(), y=np.round(s.to_numpy(dtype=float), 3), mode="lines+markers",
                marker=dict(size=4), line=dict(color=SCORE_COLORS[m]), name=SCORES[m], legendgroup=m,
                visible=i == start,
                hovertemplate=f"{SCORES[m]} score<br>step %{{x}}: %{{y:.2f}}<extra>L{l}H{h}</extra>"), row=1, col=2)
    marker = len(fig.data)
    fig.add_trace(go.Scatter(x=[steps[-1], steps[-1]], y=[0, 1], mode="lines", showlegend=False, hoverinfo="skip",
                             line=dict(color="#444", dash="dash", width=1.5), name="shown checkpoint"), row=1, col=2)

    visible = lambda k: [j == k for j in range(len(heads))] + [  # noqa: E731
        j == k for j in range(len(heads)) for _ in present] + [True]
    # Frames hold lists, not base64 arrays: plotly.js decodes those in newPlot only, not in animate.
    fig.frames = [go.Frame(name=str(s), traces=list(range(len(heads))) + [marker],
                           data=[go.Heatmap(z=_percent(patterns[s][l, h]).tolist()) for (l, h) in heads]
                           + [go.Scatter(x=[s, s])]) for s in steps]
    animate = dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))
    fig.update_layout(
        template="plotly_white", title=dict(text=title, font=dict(size=14), x=0.01, y=0.985, yanchor="top"),
        height=height, width=width, margin=dict(t=140, b=120, l=80, r=30),
        legend=dict(x=1.0, y=1.0, xanchor="right", bgcolor="rgba(255,255,255,.7)"),
        sliders=[dict(active=len(steps) - 1, currentvalue=dict(prefix="checkpoint step "), pad=dict(t=50, b=10),
                      len=0.9, x=0.05, steps=[dict(method="animate", label=str(s), args=[[str(s)], animate])
                                             for s in steps])],
        updatemenus=[dict(type="dropdown", active=start, x=0.0, xanchor="left", y=1.22, yanchor="bottom",
                          buttons=[dict(label=f"layer {l} head {h}", method="restyle", args=[{"visible": visible(k)}])
                                   for k, (l, h) in enumerate(heads)])],
    )
    fig.update_xaxes(tickvals=list(range(n_pos)), ticktext=labels, tickangle=-90, tickfont=dict(size=9),
                     range=[-0.5, n_pos - 0.5], showgrid=False, row=1, col=1)
    fig.update_yaxes(tickvals=list(range(n_pos)), ticktext=labels, tickfont=dict(size=9), autorange="reversed",
                     showgrid=False, row=1, col=1)
    fig.update_xaxes(title_text="step", row=1, col=2)
    fig.update_yaxes(title_text="score", range=[-0.02, 1.02], row=1, col=2)
    return fig


def run_scores(cfg: ExperimentConfig, root: str | Path | None = None) -> pd.DataFrame:
    """The run's ``attention`` table (notebook 03), or an empty frame when it was not written."""
    path = table_path(cfg, "attention", root)
    if path.exists():
        return pd.read_parquet(path)
    return pd.DataFrame(columns=["step", "layer", "head", "metric", "value"])


BROWSER_FILE = "browser.safetensors"


def _title(cfg: ExperimentConfig, n_tokens: int, n_steps: int) -> str:
    return (f"{cfg.run.name} ({cfg.run.preset}): each head's attention on BOS + B + B (B: {(n_tokens - 1) // 2} "
            f"tokens) at {n_steps} checkpoints")


def head_browser(cfg: ExperimentConfig, root: str | Path | None = None, scores: pd.DataFrame | None = None,
                 n_checkpoints: int = MAX_CHECKPOINTS, block: int = BLOCK, keep: bool = False, **layout) -> go.Figure:
    """The browser of run ``cfg``: its checkpoints' patterns on ``browser_tokens``, beside the
    head scores in ``scores`` (default: the run's ``attention`` table). The slider's checkpoints
    are chosen among the analysed ones (``choose_steps``; every checkpoint when no scores).
    ``keep``: also write the figure's data for ``stored_head_browser``. Raises ``CheckpointError``
    (naming the training to run) when the run has no checkpoints."""
    ckpts = list_checkpoints(cfg, root, require_done=False)
    scores = run_scores(cfg, root) if scores is None else scores
    scores = scores[scores.step.isin(ckpts.steps)] if len(scores) else scores
    steps = choose_steps(scores, n_checkpoints) if len(scores) else evenly(ckpts.steps, n_checkpoints)
    tokens = browser_tokens(cfg, root, block)
    patterns = browser_patterns(ckpts, steps, tokens)
    if keep:
        stored = {"steps": torch.tensor(sorted(patterns)), "tokens": tokens.long().clone(),
                  "patterns": torch.from_numpy(np.stack([_percent(patterns[s]) for s in sorted(patterns)]))}
        path = RunPaths.of(cfg, root).tables / BROWSER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: save_file(stored, str(p)))
    return head_browser_figure(patterns, tokens.tolist(), scores, _title(cfg, len(tokens), len(steps)), **layout)


def stored_head_browser(cfg: ExperimentConfig, root: str | Path | None = None, scores: pd.DataFrame | None = None,
                        **layout) -> go.Figure:
    """``head_browser``'s figure from the data ``head_browser(..., keep=True)`` wrote (no
    checkpoints: published results). Raises ``FileNotFoundError`` naming the notebook to run."""
    path = RunPaths.of(cfg, root).tables / BROWSER_FILE
    if not path.exists():
        raise FileNotFoundError(f"no stored head browser for {cfg.run.name} ({path}): run its notebook 03.")
    stored = load_file(str(path))
    steps = [int(s) for s in stored["steps"]]
    patterns = {s: stored["patterns"][i].float() / 100 for i, s in enumerate(steps)}
    scores = run_scores(cfg, root) if scores is None else scores
    return head_browser_figure(patterns, stored["tokens"].tolist(), scores, _title(cfg, len(stored["tokens"]), len(steps)),
                               **layout)
