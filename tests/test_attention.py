"""Attention scores identify the heads of the hand-built model, and agree with TL's head detector."""

import pytest
import torch
from transformer_lens.head_detector import (
    compute_head_attention_similarity_score,
    get_duplicate_token_head_detection_pattern,
    get_induction_head_detection_pattern,
    get_previous_token_head_detection_pattern,
)

from initmi_utils.attention import (
    METRICS,
    attention_view,
    head_score_tensors,
    head_scores,
    pattern_names,
    patterns_from_cache,
    score_matrix,
    scores_over_training_figure,
)
from initmi_utils.handbuilt import handbuilt_dataset, handbuilt_experiment, induction_model
from initmi_utils.model import to_bridge


@pytest.fixture(scope="module")
def built():
    model, roles = induction_model()
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=32))
    tokens = ds.rep.tokens
    bridge = to_bridge(model)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=pattern_names(model.cfg.n_layers))
    pattern = patterns_from_cache(cache, model.cfg.n_layers)
    return model, roles, tokens, pattern


def _only_head_high(scores, head, high=0.95, low=0.2):
    """``head`` scores > high and every other head < low: fails if the score points elsewhere."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[head] = True
    assert scores[head] > high, f"{head}: {scores[head]:.3f}"
    others = scores[~mask]
    assert (others < low).all(), f"other heads: {scores}"


def test_bridge_patterns_equal_model_patterns(built):
    model, _, tokens, pattern = built
    ours = []
    with torch.no_grad():
        model(tokens, patterns=ours)
    assert torch.allclose(patterns_from_cache(ours, 2), pattern, atol=1e-4)


def test_scores_single_out_the_built_heads(built):
    _, roles, tokens, pattern = built
    s = head_score_tensors(pattern, tokens)
    _only_head_high(s["prev_token_score"], roles.prev_token)
    _only_head_high(s["induction_score"], roles.induction)
    _only_head_high(s["duplicate_score"], roles.duplicate)
    bos = s["bos_score"]
    for head in roles.bos:
        assert bos[head] > 0.95
    for head in [roles.prev_token, roles.induction, roles.duplicate]:
        assert bos[head] < 0.2


def test_entropy_is_zero_for_sharp_heads_and_mean_log_n_for_uniform(built):
    _, roles, tokens, pattern = built
    h = head_score_tensors(pattern, tokens)["attn_entropy"]
    n = tokens.shape[1]
    uniform = torch.log(torch.arange(2, n + 1, dtype=torch.float)).mean()  # queries 1..n-1
    for head in roles.dummy:
        assert h[head] == pytest.approx(float(uniform), abs=1e-3)
    for head in [roles.prev_token, *roles.bos]:  # (the induction head is diffuse on the first copy)
        assert h[head] < 0.05


def test_long_frame_round_trips(built):
    _, roles, tokens, pattern = built
    df = head_scores(pattern, tokens, step=7)
    assert set(df.metric) == set(METRICS) and (df.step == 7).all() and len(df) == len(METRICS) * 8
    ind = score_matrix(df, "induction_score")
    assert ind.argmax().item() == roles.induction[0] * 4 + roles.induction[1]


@pytest.mark.parametrize("name, detector", [
    ("prev_token_score", get_previous_token_head_detection_pattern),
    ("duplicate_score", get_duplicate_token_head_detection_pattern),
    ("induction_score", get_induction_head_detection_pattern),
])
def test_matches_transformer_lens_head_detector(built, name, detector):
    """Our score == TL's "mul" score x (rows / rows with a match), sequence by sequence, every head."""
    _, _, tokens, pattern = built
    for b in range(3):
        det = detector(tokens[b : b + 1])
        rows_with_match = int((det.sum(-1) > 0).sum())
        ours = head_score_tensors(pattern[:, b : b + 1], tokens[b : b + 1])[name]
        for layer in range(pattern.shape[0]):
            for head in range(pattern.shape[2]):
                tl = compute_head_attention_similarity_score(
                    pattern[layer, b, head], det, exclude_bos=False, exclude_current_token=False, error_measure="mul")
                expected = tl * tokens.shape[1] / rows_with_match
                assert ours[layer, head].item() == pytest.approx(expected, abs=1e-5)


def test_scores_on_a_model_without_the_mechanism_are_low(built):
    """Break the prev-token head's OV: the induction head can no longer find its key."""
    model, roles, tokens, _ = built
    broken, _ = induction_model()
    with torch.no_grad():
        broken.blocks[roles.prev_token[0]].attn.W_O[roles.prev_token[1]] = 0
        pats = []
        broken(tokens, patterns=pats)
    s = head_score_tensors(patterns_from_cache(pats, 2), tokens)
    assert s["induction_score"].max() < 0.3
    assert s["prev_token_score"][roles.prev_token] > 0.95  # its pattern is intact, only its output is gone


def test_circuitsvis_view_is_offline(built):
    import circuitsvis

    _, _, tokens, pattern = built
    view = attention_view(pattern[:, 0], tokens[0].tolist(), title="hand-built")
    html = view._repr_html_()
    assert "unpkg" not in html and "cdn" not in html.lower()
    assert "http://" not in html.split("<script", 1)[0] and "https://" not in html.split("<script", 1)[0]
    from pathlib import Path

    bundled = (Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js").read_text(encoding="utf-8")
    assert bundled[:2000] in html  # the bundled JS is inlined
    assert html.count("CircuitsVis.AttentionHeads") == pattern.shape[0]  # one view per layer
    assert "L1H2" in html and "BOS" in html


def test_training_heatmap_has_every_head_and_step(built):
    _, _, tokens, pattern = built
    import pandas as pd

    df = pd.concat([head_scores(pattern, tokens, step=s) for s in (0, 10, 100)])
    fig = scores_over_training_figure(df, "induction_score")
    assert len(fig.data[0].y) == 8 and list(fig.data[0].x) == ["0", "10", "100"]
