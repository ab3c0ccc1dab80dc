"""The head browser: which checkpoints it shows, how its slider and dropdown compose, what it
costs in bytes, and that its patterns are the model's (``tests/test_report_browser.py`` moves
its slider in Chromium)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from initmi_utils.attention import checkpoint_patterns
from initmi_utils.checkpoints import list_checkpoints, save_checkpoint
from initmi_utils.config import RunPaths, experiment
from initmi_utils.head_browser import (MAX_CHECKPOINTS, browser_patterns, browser_tokens, choose_steps, default_head,
                                       BROWSER_FILE, evenly, head_browser, head_browser_figure, stored_head_browser)
from initmi_utils.model import to_bridge
from initmi_utils.schemes import build_model

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100, 1200]
JUMP = (500, 600)  # the planted phase change: L1H1's induction score jumps between these steps


def scores_table(n_layers: int = 2, n_heads: int = 4, steps=STEPS) -> pd.DataFrame:
    rows = []
    for s in steps:
        for l in range(n_layers):
            for h in range(n_heads):
                ind = 0.9 if (l, h) == (1, 1) and s >= JUMP[1] else 0.05
                for m, v in (("induction_score", ind), ("prev_token_score", 0.1), ("duplicate_score", 0.02),
                             ("bos_score", 0.5)):
                    rows.append(dict(step=s, layer=l, head=h, metric=m, value=v))
    return pd.DataFrame(rows)


def test_the_slider_keeps_the_ends_and_the_phase_change():
    steps = choose_steps(scores_table(), 8)
    assert len(steps) == 8 and steps[0] == 0 and steps[-1] == 1200
    assert JUMP[0] in steps and JUMP[1] in steps  # the change is on the slider, not between two of its steps
    assert choose_steps(scores_table(steps=[0, 10, 20]), 8) == [0, 10, 20]
    flat = choose_steps(scores_table().assign(value=0.3), 5)  # nothing changes: spread out
    assert flat[0] == 0 and flat[-1] == 1200 and len(flat) == 5 and len(set(np.diff([STEPS.index(s) for s in flat]))) <= 2
    assert evenly(list(range(20)), 4) == [0, 6, 13, 19]


def _patterns(steps, n_layers=2, n_heads=4, n_pos=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in steps:
        x = torch.rand(n_layers, n_heads, n_pos, n_pos, generator=g).tril()
        out[s] = x / x.sum(-1, keepdim=True)
    return out


def test_the_slider_moves_every_head_and_the_dropdown_picks_one():
    scores = scores_table()
    steps = choose_steps(scores, MAX_CHECKPOINTS)
    patterns = _patterns(steps)
    fig = head_browser_figure(patterns, list(range(25)), scores, "t")
    n_heads = 8
    assert default_head(scores, 2) == (1, 1)  # the last layer's strongest induction head at the last step
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == n_heads and [t.visible for t in heat].count(True) == 1 and heat[5].visible  # L1H1
    assert np.array_equal(np.asarray(heat[5].z), np.rint(patterns[steps[-1]][1, 1].numpy() * 100))
    # Slider: one animation frame per checkpoint; each restyles every heatmap and the step marker.
    slider = fig.layout.sliders[0]
    assert [s.label for s in slider.steps] == [str(s) for s in steps] and slider.active == len(steps) - 1
    assert [f.name for f in fig.frames] == [str(s) for s in steps]
    k = steps.index(JUMP[0])
    frame = fig.frames[k]
    assert list(frame.traces) == list(range(n_heads)) + [len(fig.data) - 1]
    assert np.array_equal(np.asarray(frame.data[5].z), np.rint(patterns[JUMP[0]][1, 1].numpy() * 100))
    assert list(frame.data[-1].x) == [JUMP[0], JUMP[0]]
    # Dropdown: one button per head; it shows that head's heatmap and its three score lines only
    # (and the step marker), and changes nothing else, so the slider's position is kept.
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == [f"layer {l} head {h}" for l in range(2) for h in range(4)]
    for i, b in enumerate(buttons):
        assert b.method == "restyle" and list(b.args[0]) == ["visible"] and len(b.args) == 1
        vis = b.args[0]["visible"]
        assert len(vis) == len(fig.data) and sum(vis) == 1 + 3 + 1
        shown = [t for t, v in zip(fig.data, vis) if v]
        assert shown[0].name == f"L{i // 4}H{i % 4}" and {t.name for t in shown[1:4]} == {
            "previous-token", "induction", "duplicate"}
    lines = [t for t in fig.data if t.type == "scatter" and t.name == "induction"]
    assert list(lines[5].x) == STEPS and lines[5].y[STEPS.index(JUMP[1])] == pytest.approx(0.9)


def test_the_browser_stays_small():
    """8 checkpoints x 8 heads x 25 positions: patterns as whole percentages, so a 7-scheme report
    carries its browsers in well under a megabyte."""
    scores = scores_table()
    fig = head_browser_figure(_patterns(choose_steps(scores, 8)), list(range(25)), scores)
    size = len(fig.to_json())
    assert size < 160_000, size
    assert '"dtype":"u1"' in fig.to_json()  # the shown patterns are base64 uint8


def test_the_browser_draws_the_models_own_patterns(tmp_path):
    """On saved checkpoints of the smoke model (W_Q sharpened step by step): the patterns are the
    bridge's ``hook_pattern`` on the browser's sequence, and they change along the slider."""
    cfg = experiment("smoke", "normal", 0)
    folder = RunPaths.of(cfg, tmp_path).checkpoints
    for step in (0, 10, 20, 40):
        model = build_model(cfg, tmp_path)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.W_Q.mul_(1 + step)
        save_checkpoint(folder, model, cfg, step, {})
    ckpts = list_checkpoints(cfg, tmp_path, require_done=False)
    tokens = browser_tokens(cfg, tmp_path)
    assert tokens[0] == 0 and len(tokens) == 1 + 2 * min(12, cfg.data.rep_len)
    half = (len(tokens) - 1) // 2
    assert torch.equal(tokens[1 : 1 + half], tokens[1 + half :])  # BOS + B + B
    patterns = browser_patterns(ckpts, [0, 40], tokens)
    model, _ = ckpts.load(40)
    expected = checkpoint_patterns(to_bridge(model), tokens[None])[:, 0]
    assert torch.allclose(patterns[40], expected, atol=1e-5)
    assert not torch.allclose(patterns[0], patterns[40], atol=1e-3)
    fig = head_browser(cfg, tmp_path)  # no attention table: every checkpoint, evenly
    assert [f.name for f in fig.frames] == ["0", "10", "20", "40"]
    assert json.loads(fig.to_json())["layout"]["sliders"][0]["active"] == 3
    # Kept for published results: the same figure from the stored data, without any checkpoint.
    kept = head_browser(cfg, tmp_path, keep=True)
    moved = tmp_path / "published"
    (RunPaths.of(cfg, moved).tables).mkdir(parents=True)
    (RunPaths.of(cfg, tmp_path).tables / BROWSER_FILE).rename(RunPaths.of(cfg, moved).tables / BROWSER_FILE)
    assert not RunPaths.of(cfg, moved).checkpoints.exists()
    stored = stored_head_browser(cfg, moved)
    assert json.loads(stored.to_json()) == json.loads(kept.to_json())
    with pytest.raises(FileNotFoundError, match="run its notebook 03"):
        stored_head_browser(experiment("smoke", "xavier", 0), moved)
