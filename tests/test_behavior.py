"""02_behavior: loss by position, ICL score, first vs repeated half and emergence, on logits built
by hand so that every expected number is known in closed form, and on the hand-built induction
model (which copies in the second half and cannot in the first)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from initmi_utils.data import Batch

from initmi_utils.behavior import (
    SHORT_COPY,
    accuracy_by_copy_distance,
    behavior_table,
    copy_distance,
    copy_distance_stats,
    emergence_rows,
    emergence_step,
    half_losses,
    icl_score,
    loss_by_position,
    next_token_stats,
    unambiguous_targets,
    evaluation_grid,
    sigmoid_midpoint,
    emergence_steps,
    EMERGENCE_DEFINITIONS,
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
    assert set(table.columns) == {"step", "metric", "value", "position", "copy_distance"} and (table.step == 7).all()
    v = table[(table.position == -1) & (table.copy_distance == -1)].set_index("metric").value
    assert v["rep_acc_induction"] == pytest.approx(next_token_stats(rep_logits, ds.rep)["acc_induction"])
    assert v["rep_acc_induction"] > 0.95 and v["rep_half_gap"] < -1.0
    pos = table[table.metric == "val_loss_at_position"]
    assert pos.position.tolist() == list(range(1, ds.val.tokens.shape[1]))


# ---------------------------------------------------------------------------------------------
# Accuracy by copy distance.


def test_copy_distance_on_known_sequences():
    from initmi_utils.data import Batch

    # Segment 52 3 61 28 at 4 and 12 (targets 13-15): distance 8; 40 and 17 also repeat in the background.
    t = torch.tensor([[0, 17, 40, 9, 52, 3, 61, 28, 40, 22, 17, 40, 52, 3, 61, 28, 33, 5]])
    target = torch.zeros_like(t, dtype=torch.bool)
    target[0, 13:16] = True
    # A second row whose background repeats segment tokens (40 before the copy, 3 after it) and a row
    # without targets.
    t2 = torch.tensor([[0, 3, 40, 9, 8, 7, 6, 40, 9, 8, 7, 6, 3, 1, 2, 5, 11, 12]])
    target2 = torch.zeros_like(t2, dtype=torch.bool)
    target2[0, 8:12] = True  # segment 40 9 8 7 6 at 2 and 7: distance 5
    b = Batch(torch.cat([t, t2, t2]), torch.cat([target, target2, torch.zeros_like(target2)]), torch.full((3, 18), -1))
    assert copy_distance(b).tolist() == [8, 5, -1]


def test_copy_distance_is_rep_len_on_bos_a_a_and_valid_on_val():
    from initmi_utils.handbuilt import handbuilt_dataset, handbuilt_experiment

    cfg = handbuilt_experiment()
    ds = handbuilt_dataset(cfg)
    assert (copy_distance(ds.rep) == cfg.data.rep_len).all()
    d = copy_distance(ds.val)
    n_targets = ds.val.target.sum(-1)
    assert ((d >= n_targets + 1) | (n_targets == 0)).all()  # copies never overlap
    # every target token equals the token d positions earlier
    rows, pos = ds.val.target.nonzero(as_tuple=True)
    assert (ds.val.tokens[rows, pos] == ds.val.tokens[rows, pos - d[rows]]).all()


def _oracle_logits(batch, correct_where, d_vocab: int = 20):
    """Logits whose argmax at position i is token i + 1 where ``correct_where[:, i]`` holds, and another
    token elsewhere."""
    b, n = batch.tokens.shape
    nxt = batch.tokens[:, 1:]
    answer = torch.where(correct_where, nxt, nxt % (d_vocab - 1) + 1)  # the other token is never nxt
    logits = torch.zeros(b, n, d_vocab)
    logits[:, :-1].scatter_(-1, answer[..., None], 5.0)
    return logits


def test_accuracy_by_copy_distance_on_the_handbuilt_model_and_a_long_offset_oracle():
    from initmi_utils.handbuilt import induction_model
    from test_offsets import copy_batch

    b = copy_batch(range(5, 41), per=3)  # copy distances 5..40, segment of 5
    model, _ = induction_model()
    with torch.no_grad():
        logits = model(b.tokens)
    stats = copy_distance_stats(logits, b)
    assert stats["acc_induction_short"] == 1.0 and stats["acc_induction_long"] == 1.0  # copies at every distance
    by = accuracy_by_copy_distance(logits, b, bins=(0, 8, 12, 24))
    assert by.copy_distance.tolist() == [0, 8, 12, 24] and by.copy_distance_high.tolist() == [8, 12, 24, -1]
    assert by.n_targets.tolist() == [3 * 3 * 4, 4 * 3 * 4, 12 * 3 * 4, 17 * 3 * 4]
    assert (by.accuracy == 1.0).all()
    assert stats["frac_targets_short"] == pytest.approx(7 / 36)  # distances 5..11 of 5..40
    # A model that copies only when the copies are >= SHORT_COPY apart (the long-offset recall circuit).
    dist = copy_distance(b)[:, None].expand(-1, b.tokens.shape[1] - 1)
    recall = _oracle_logits(b, dist >= SHORT_COPY)
    s = copy_distance_stats(recall, b)
    assert s["acc_induction_short"] == 0.0 and s["acc_induction_long"] == 1.0
    by = accuracy_by_copy_distance(recall, b, bins=(0, 8, 12, 24)).set_index("copy_distance").accuracy
    assert by[0] == 0.0 and by[8] == 0.0 and by[12] == 1.0 and by[24] == 1.0
    assert math.isnan(accuracy_by_copy_distance(recall, b, bins=(0, 100)).accuracy.iloc[1])  # empty bin
    assert stats == copy_distance_stats(logits, b, short=SHORT_COPY)


def test_behavior_table_has_the_copy_distance_rows():
    from initmi_utils.handbuilt import handbuilt_dataset, handbuilt_experiment, induction_model

    model, _ = induction_model()
    cfg = handbuilt_experiment()
    ds = handbuilt_dataset(cfg)
    with torch.no_grad():
        table = behavior_table(model(ds.val.tokens), ds.val, model(ds.rep.tokens), ds.rep, cfg.data.rep_len, step=1)
    scalars = table[(table.position == -1) & (table.copy_distance == -1)].set_index("metric").value
    assert {"val_acc_induction_short", "val_acc_induction_long", "val_frac_targets_short"} <= set(scalars.index)
    by = table[table.metric == "val_acc_by_copy_distance"]
    n = table[table.metric == "val_n_targets_by_copy_distance"]
    assert by.copy_distance.tolist() == n.copy_distance.tolist() and (by.position == -1).all()
    assert n.value.sum() == ds.val.target[:, 1:].sum()  # every target in exactly one bin


def test_emergence_step_on_known_series_including_never():
    steps = [0, 50, 100, 150, 200]
    assert emergence_step(steps, [0.1, 0.5, 0.79, 0.8, 0.9], 0.8) == 150.0  # >= threshold
    assert emergence_step(steps, [0.1, 0.5, 0.79, 0.8, 0.9], 0.5) == 50.0
    assert math.isnan(emergence_step(steps, [0.1, 0.2, 0.3, 0.2, 0.79], 0.8))  # never: nan, no error
    assert math.isnan(emergence_step(steps, [0.1, float("nan"), 0.3, 0.2, 0.1], 0.8))
    assert math.isnan(emergence_step([], [], 0.8))
    m = pd.DataFrame({"step": [100, 0, 50], "metric": "val_acc_induction_unambiguous", "value": [0.9, 0.0, 0.85]})
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
    r = _papermill(nb, tmp_path / "untrained.ipynb", dict(scheme="xavier", seed=0, preset="smoke", root=str(tmp_path)))
    assert r.returncode != 0 and "train it first" in (r.stderr + r.stdout)

    cfg = experiment("smoke", "xavier", 0)
    train(cfg, tmp_path, progress=False)
    r = _papermill(nb, tmp_path / "02.ipynb", dict(scheme="xavier", seed=0, preset="smoke", root=str(tmp_path),
                                                   emergence_threshold=0.5))
    assert r.returncode == 0, r.stderr[-3000:]
    table = pd.read_parquet(RunPaths.of(cfg, tmp_path).tables / "behavior.parquet")
    assert {"icl_score", "rep_half_gap", "val_loss", "emergence_step", "val_acc_induction_short"} <= set(table.metric)
    assert table[table.metric == "emergence_step"].threshold.item() == 0.5
    figs = sorted(p.name for p in RunPaths.of(cfg, tmp_path).figures.glob("02_*.html"))
    assert figs, "no figures written"
    for f in RunPaths.of(cfg, tmp_path).figures.glob("02_*.html"):
        text = f.read_text(encoding="utf-8")
        assert "cdn.plot.ly" not in text  # offline: plotly.js is the one local copy under figures/
        src = re.search(r'<script charset="utf-8" src="([^"]*plotly\.min\.js)"', text).group(1)
        assert (f.parent / src).resolve().stat().st_size > 3_000_000


def test_unambiguous_targets_are_those_whose_query_occurred_exactly_once_before():
    #        pos:  0   1  2  3  4  5  6  7  8  9
    tokens = torch.tensor([[0, 5, 7, 5, 9, 3, 5, 9, 3, 1]])
    target = torch.zeros_like(tokens, dtype=torch.bool)
    target[0, [7, 8]] = True  # 9 after the second 5 ... and 3 after 9
    batch = Batch(tokens, target, torch.full_like(tokens, -1))
    u = unambiguous_targets(batch)
    # target 7: query token 5 (pos 6) occurred at 1 and 3 before: ambiguous (5 -> 7 or 5 -> 9).
    # target 8: query token 9 (pos 7) occurred once before (pos 4): unambiguous.
    assert u[0].tolist() == [False] * 8 + [True, False]
    logits = torch.full((1, 10, 10), -5.0)
    logits[0, 6, 7] = 5.0  # predicts the older successor of 5: wrong, but only on the ambiguous target
    logits[0, 7, 3] = 5.0
    stats = next_token_stats(logits, batch)
    assert stats["acc_induction"] == 0.5 and stats["acc_induction_unambiguous"] == 1.0


def _logistic(steps, t0, width=30.0, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    return 0.02 + 0.9 / (1 + np.exp(-(steps - t0) / width)) + rng.normal(0, noise, len(steps))


def test_the_sigmoid_midpoint_recovers_a_planted_phase_change_and_censors_the_rest():
    steps = np.arange(0, 1201, 50)
    for t0 in (300, 700, 1100):  # anywhere in the horizon, within half an evaluation interval
        assert abs(sigmoid_midpoint(steps, _logistic(steps, t0, seed=t0)) - t0) < 25, t0
    assert math.isnan(sigmoid_midpoint(steps, _logistic(steps, 1400)))  # past the horizon: censored
    assert math.isnan(sigmoid_midpoint(steps, 0.02 + 0.3 / (1 + np.exp(-(steps - 600) / 30))))  # a rise < MIN_RISE
    assert sigmoid_midpoint(steps, np.full(len(steps), 0.95)) == 0.0  # emerged before training (seeded)


def test_emergence_definitions_differ_where_ambiguous_targets_hold_all_target_accuracy_back():
    # Planted: unambiguous accuracy crosses 0.8 at step 500; all-target accuracy plateaus at 0.78
    # (the ambiguous third never rises above chance-like copying), so "all targets >= 0.8" never.
    steps = np.arange(0, 1001, 50)
    unamb = np.where(steps >= 500, 0.95, np.where(steps >= 450, 0.6, 0.02))
    rows = [dict(step=s, metric="val_acc_induction_unambiguous", value=u) for s, u in zip(steps, unamb)]
    rows += [dict(step=s, metric="val_acc_induction", value=min(u, 0.78)) for s, u in zip(steps, unamb)]
    em = emergence_steps(pd.DataFrame(rows))
    assert em["unambiguous ≥ 0.8"] == 500 and em["unambiguous ≥ 0.5"] == 450 and em["unambiguous ≥ 0.9"] == 500
    assert math.isnan(em["all targets ≥ 0.8"])
    assert 400 < em["sigmoid midpoint"] <= 500  # between the last low and the first high evaluation
    assert list(EMERGENCE_DEFINITIONS)[0] == "unambiguous ≥ 0.8"  # the headline definition


def test_emergence_reads_the_evaluation_grid_every_run_shares():
    # A ladder evaluation at step 1037 (this run's own) must not make it emerge earlier than a run
    # evaluated only on the grid of 50.
    rows = [dict(step=s, metric="val_acc_induction_unambiguous", value=0.1) for s in range(0, 1001, 50)]
    rows += [dict(step=1037, metric="val_acc_induction_unambiguous", value=0.85),
             dict(step=1050, metric="val_acc_induction_unambiguous", value=0.9)]
    m = pd.DataFrame(rows)
    assert emergence_rows(m).value.item() == 1037
    assert emergence_rows(evaluation_grid(m, 50)).value.item() == 1050
