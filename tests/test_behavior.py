"""02_behavior: loss by position, ICL score, first vs repeated half and emergence, on logits built
by hand so that every expected number is known in closed form, and on the hand-built induction
model (which copies in the second half and cannot in the first)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from initmi_utils.behavior import (
    behavior_table,
    emergence_rows,
    emergence_step,
    half_losses,
    icl_score,
    loss_by_position,
    next_token_stats,
)

V = 16  # vocabulary of the hand-built logits


def logits_with_margin(tokens: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Logits where the token at i+1 gets logit ``margin[i + 1]`` at position i and every other
    token 0, so the loss on token i is exactly log(e^m + V - 1) - m with m = margin[i]."""
    b, n = tokens.shape
    logits = torch.zeros(b, n, V)
    rows = torch.arange(b)[:, None]
    logits[rows, torch.arange(n - 1)[None], tokens[:, 1:]] = margin[1:].expand(b, n - 1)
    return logits


def expected_loss(m: float) -> float:
    return math.log(math.exp(m) + V - 1) - m


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, V, (8, 32), generator=g)


def test_loss_by_position_matches_closed_form(tokens):
    margin = torch.linspace(-2.0, 6.0, tokens.shape[1])
    got = loss_by_position(logits_with_margin(tokens, margin), tokens)
    assert math.isnan(got[0])  # BOS is never predicted
    want = torch.tensor([expected_loss(m) for m in margin[1:].tolist()])
    torch.testing.assert_close(got[1:], want, rtol=1e-5, atol=1e-5)


def test_icl_score_is_late_minus_early_loss(tokens):
    n = tokens.shape[1]
    margin = torch.zeros(n)  # uniform everywhere: loss log V
    margin[n - 4 :] = 30.0  # the last 4 tokens predicted perfectly
    assert icl_score(logits_with_margin(tokens, margin), tokens) == pytest.approx(-math.log(V), abs=1e-6)
    margin = torch.zeros(n)
    margin[10:14] = 30.0  # only the early window is perfect: the context hurts
    assert icl_score(logits_with_margin(tokens, margin), tokens) == pytest.approx(math.log(V), abs=1e-6)
    margin = torch.zeros(n)
    margin[14 : n - 4] = 30.0  # outside both windows: no effect
    assert icl_score(logits_with_margin(tokens, margin), tokens) == pytest.approx(0.0, abs=1e-6)
    # width 1 reads exactly token `early` and token `late`
    margin = torch.zeros(n)
    margin[20] = 5.0
    assert icl_score(logits_with_margin(tokens, margin), tokens, early=20, late=25, width=1) == pytest.approx(
        math.log(V) - expected_loss(5.0), abs=1e-6)
    with pytest.raises(ValueError, match="overlap"):
        icl_score(logits_with_margin(tokens, margin), tokens, early=20, late=22, width=4)


def test_half_losses_compare_the_same_tokens_first_and_repeated():
    rep_len = 6
    g = torch.Generator().manual_seed(1)
    a = torch.stack([torch.randperm(V - 1, generator=g)[:rep_len] + 1 for _ in range(5)])
    tokens = torch.cat([torch.zeros(5, 1, dtype=torch.long), a, a], dim=1)
    n = tokens.shape[1]
    margin = torch.zeros(n)
    margin[rep_len + 2 :] = 30.0  # the second copy from A[1] on is predicted perfectly
    margin[rep_len + 1] = -30.0  # A[0] of the second copy: catastrophic, and excluded by design
    margin[1] = -30.0  # A[0] of the first copy: excluded too
    h = half_losses(logits_with_margin(tokens, margin), tokens, rep_len)
    assert h["first_half"] == pytest.approx(math.log(V), abs=1e-6)
    assert h["repeated_half"] == pytest.approx(0.0, abs=1e-6)
    assert h["half_gap"] == pytest.approx(-math.log(V), abs=1e-6)
    with pytest.raises(ValueError, match="BOS \\+ A \\+ A"):
        half_losses(logits_with_margin(tokens, margin), tokens, rep_len + 1)


def test_half_losses_and_table_on_the_handbuilt_induction_model():
    from initmi_utils.handbuilt import handbuilt_dataset, handbuilt_experiment, induction_model

    model, _ = induction_model()
    cfg = handbuilt_experiment()
    ds = handbuilt_dataset(cfg)
    with torch.no_grad():
        rep_logits, val_logits = model(ds.rep.tokens), model(ds.val.tokens)
    h = half_losses(rep_logits, ds.rep.tokens, cfg.data.rep_len)
    assert h["repeated_half"] < 0.05 < 1.0 < h["first_half"]  # copies only what it has seen
    table = behavior_table(val_logits, ds.val, rep_logits, ds.rep, cfg.data.rep_len, step=7)
    assert set(table.columns) == {"step", "metric", "value", "position"} and (table.step == 7).all()
    v = table[table.position == -1].set_index("metric").value
    assert v["rep_acc_induction"] == pytest.approx(next_token_stats(rep_logits, ds.rep)["acc_induction"])
    assert v["rep_acc_induction"] > 0.95 and v["rep_half_gap"] < -1.0
    pos = table[table.metric == "val_loss_at_position"]
    assert pos.position.tolist() == list(range(1, ds.val.tokens.shape[1]))


def test_emergence_step_on_known_series_including_never():
    steps = [0, 50, 100, 150, 200]
    assert emergence_step(steps, [0.1, 0.5, 0.79, 0.8, 0.9], 0.8) == 150.0  # >= threshold
    assert emergence_step(steps, [0.1, 0.5, 0.79, 0.8, 0.9], 0.5) == 50.0
    assert math.isnan(emergence_step(steps, [0.1, 0.2, 0.3, 0.2, 0.79], 0.8))  # never: nan, no error
    assert math.isnan(emergence_step(steps, [0.1, float("nan"), 0.3, 0.2, 0.1], 0.8))
    assert math.isnan(emergence_step([], [], 0.8))
    m = pd.DataFrame({"step": [100, 0, 50], "metric": "val_acc_induction", "value": [0.9, 0.0, 0.85]})
    r = emergence_rows(m, 0.8)  # unsorted input: the first step in time order counts
    assert r.value.item() == 50 and r.step.item() == -1 and r.threshold.item() == 0.8
    assert math.isnan(emergence_rows(m, 0.95).value.item())


# ---------------------------------------------------------------------------------------------
# The notebook, on a smoke run (papermill, a few seconds of training).


def _papermill(nb: Path, out: Path, params: dict) -> subprocess.CompletedProcess:
    import json

    code = ("import papermill, json, sys; papermill.execute_notebook(sys.argv[1], sys.argv[2], "
            "parameters=json.loads(sys.argv[3]), kernel_name=sys.argv[4], cwd=sys.argv[5], progress_bar=False)")
    from initmi_utils.pipeline import ensure_kernel

    return subprocess.run([sys.executable, "-c", code, str(nb), str(out), json.dumps(params), ensure_kernel(),
                           str(nb.parent)], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_notebook_02_on_a_smoke_run(tmp_path):
    from initmi_utils.config import RunPaths, experiment
    from initmi_utils.train import train

    nb = Path(__file__).resolve().parent.parent / "notebooks" / "02_behavior.ipynb"
    # Untrained run: the notebook fails and says which training to run.
    r = _papermill(nb, tmp_path / "untrained.ipynb", dict(init_scheme="xavier", seed=0, preset="smoke", root=str(tmp_path)))
    assert r.returncode != 0 and "train it first" in (r.stderr + r.stdout)

    cfg = experiment("smoke", "xavier", 0)
    train(cfg, tmp_path, progress=False)
    r = _papermill(nb, tmp_path / "02.ipynb", dict(init_scheme="xavier", seed=0, preset="smoke", root=str(tmp_path),
                                                   emergence_threshold=0.5))
    assert r.returncode == 0, r.stderr[-3000:]
    table = pd.read_parquet(RunPaths.of(cfg, tmp_path).tables / "behavior.parquet")
    assert {"icl_score", "rep_half_gap", "val_loss", "emergence_step"} <= set(table.metric)
    assert table[table.metric == "emergence_step"].threshold.item() == 0.5
    figs = sorted(p.name for p in RunPaths.of(cfg, tmp_path).figures.glob("02_*.html"))
    assert figs, "no figures written"
    for f in RunPaths.of(cfg, tmp_path).figures.glob("02_*.html"):
        text = f.read_text(encoding="utf-8")
        assert "cdn.plot.ly" not in text  # offline: plotly.js is the one local copy under figures/
        src = re.search(r'<script charset="utf-8" src="([^"]*plotly\.min\.js)"', text).group(1)
        assert (f.parent / src).resolve().stat().st_size > 3_000_000
