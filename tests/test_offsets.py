"""Offset profiles relative to the earlier copy: right offset, right head, right path.

Known answers come from the hand-built induction model (``handbuilt.py``: L0H1 previous-token,
L0H2 duplicate-token, L1H2 induction) and from hand-made patterns of a long-offset recall
circuit (a layer-0 head attending exactly ``d`` back and a layer-1 head attending ``d`` after the
earlier copy), whose direct profile is empty near the copy and whose composed profile is not.
"""

import math

import pytest
import torch

from initmi_utils.attention import head_score_tensors
from initmi_utils.data import BOS
from initmi_utils.handbuilt import handbuilt_dataset, handbuilt_experiment, induction_model
from initmi_utils.offsets import (
    composed_copy_offset_profile,
    composed_pattern,
    copy_offset_profile,
    earlier_copy_index,
)

OFFSETS = tuple(range(-3, 4))
PLUS1, ZERO = OFFSETS.index(1), OFFSETS.index(0)


@pytest.fixture(scope="module")
def built():
    model, roles = induction_model()
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=32))
    tokens = ds.rep.tokens
    patterns = []
    with torch.no_grad():
        model(tokens, patterns=patterns)
    return roles, tokens, torch.stack(patterns), ds.cfg.data.rep_len


def test_earlier_copy_index_on_a_small_example():
    t = torch.tensor([[BOS, 5, 6, 5, 7, 5, 6]])
    assert earlier_copy_index(t).tolist() == [[-1, -1, -1, 1, -1, -1, 2]]  # the third 5 has two earlier ones
    assert earlier_copy_index(t, unique=False).tolist() == [[-1, -1, -1, 1, -1, 3, 2]]


def test_plus_one_is_the_induction_score_and_zero_the_duplicate_score(built):
    # On BOS + A + A every second-copy token has exactly one earlier occurrence, so the profile at
    # +1 / 0 must equal attention.py's induction / duplicate scores for every head.
    _, tokens, pattern, _ = built
    prof = copy_offset_profile(pattern, tokens, OFFSETS)
    s = head_score_tensors(pattern, tokens)
    assert prof.shape == (2, 4, len(OFFSETS))
    torch.testing.assert_close(prof[..., PLUS1], s["induction_score"], atol=1e-5, rtol=0)
    torch.testing.assert_close(prof[..., ZERO], s["duplicate_score"], atol=1e-5, rtol=0)


def test_induction_head_peaks_at_plus_one_and_duplicate_head_at_zero(built):
    roles, tokens, pattern, _ = built
    prof = copy_offset_profile(pattern, tokens, OFFSETS)
    ind, dup = prof[roles.induction], prof[roles.duplicate]
    assert ind[PLUS1] > 0.95 and ind.argmax() == PLUS1
    assert (ind[torch.arange(len(OFFSETS)) != PLUS1] < 0.05).all(), ind
    assert dup[ZERO] > 0.9 and dup.argmax() == ZERO
    for head in [roles.prev_token, *roles.bos]:  # these never look at the earlier copy
        assert (prof[head] < 0.05).all(), (head, prof[head])


def test_wide_profile_finds_the_previous_token_head_at_rep_len_minus_one(built):
    # On BOS + A + A the previous token of a second-copy query is R - 1 after its earlier copy.
    roles, tokens, pattern, R = built
    offsets = tuple(range(-2, R + 1))
    prof = copy_offset_profile(pattern, tokens, offsets)
    assert offsets[int(prof[roles.prev_token].argmax())] == R - 1
    assert prof[roles.prev_token][offsets.index(R - 1)] > 0.95


def test_composed_through_the_previous_token_head_lands_on_the_copy(built):
    roles, tokens, pattern, _ = built
    comp = composed_copy_offset_profile(pattern, tokens, OFFSETS)  # [dst head, src head, offset]
    path = comp[roles.induction[1], roles.prev_token[1]]
    assert path[ZERO] > 0.9 and path.argmax() == ZERO
    # the same induction head rolled through the BOS head of layer 0 goes to BOS, not the copy
    assert (comp[roles.induction[1], roles.bos[0][1]] < 0.05).all()


def test_composed_pattern_is_a_row_stochastic_product(built):
    _, _, pattern, _ = built
    comp = composed_pattern(pattern)
    assert comp.shape == (4, pattern.shape[1], 4, pattern.shape[3], pattern.shape[4])
    torch.testing.assert_close(comp.sum(-1), torch.ones(comp.shape[:-1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(comp[2, :, 1], pattern[1, :, 2] @ pattern[0, :, 1])
    with pytest.raises(ValueError):
        composed_pattern(pattern, src_layer=1, dst_layer=1)


def _one_hot_rows(keys: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(keys, n).float()


def _long_offset_patterns(tokens: torch.Tensor, d: int) -> torch.Tensor:
    """[layer=2, batch, head=2, q, k]: L0H0 attends exactly d back (BOS when q < d), L0H1 attends to
    itself; L1H0 at a query whose token occurred at i attends to i + d (when causal, else BOS),
    L1H1 attends to the key right after the earlier copy (a classic induction head)."""
    batch, n = tokens.shape
    q = torch.arange(n).expand(batch, n)
    src = earlier_copy_index(tokens)
    l0h0 = _one_hot_rows((q - d).clamp(min=0), n)
    l0h1 = _one_hot_rows(q, n)
    far = src + d
    l1h0 = _one_hot_rows(torch.where((src >= 0) & (far <= q), far, 0), n)
    l1h1 = _one_hot_rows(torch.where(src >= 0, src + 1, 0), n)
    return torch.stack([torch.stack([l0h0, l0h1], 1), torch.stack([l1h0, l1h1], 1)])


def test_long_offset_recall_is_invisible_near_the_copy_but_found_by_composition():
    R, d = 10, 6
    g = torch.Generator().manual_seed(0)
    a = torch.argsort(torch.rand(16, 40, generator=g), -1)[:, :R] + 1
    tokens = torch.cat([torch.full((16, 1), BOS), a, a], 1)
    pattern = _long_offset_patterns(tokens, d)
    offsets = tuple(range(-d, d + 2))
    direct = copy_offset_profile(pattern, tokens, offsets)
    near = [offsets.index(o) for o in range(-3, 4)]
    assert (direct[1, 0, near] == 0).all()  # the recall head: nothing within +-3 of the copy ...
    assert direct[1, 0, offsets.index(d)] == pytest.approx(1.0)  # ... all of it d after the copy
    assert direct[1, 1, offsets.index(1)] == pytest.approx(1.0)  # the induction head at +1
    comp = composed_copy_offset_profile(pattern, tokens, offsets)
    assert comp[0, 0, offsets.index(0)] == pytest.approx(1.0)  # recall head through the d-back head
    assert comp[0, 1, offsets.index(d)] == pytest.approx(1.0)  # through the self head: unchanged
    assert comp[1, 0, offsets.index(1 - d)] == pytest.approx(1.0)  # induction head through d-back


def test_rows_without_a_causal_key_are_left_out_and_empty_offsets_are_nan():
    # Query at index 4 (token 7) has its earlier copy at 1: key 1 - 1 = 0 is BOS, key 1 + 5 = 6 lies
    # in the future; both rows are left out.
    tokens = torch.tensor([[BOS, 7, 8, 9, 7]])
    n = tokens.shape[1]
    pattern = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]  # uniform causal
    pattern = pattern[None, None, None].expand(1, 1, 1, n, n)
    prof = copy_offset_profile(pattern, tokens, (-1, 0, 1, 3, 5))
    assert math.isnan(prof[0, 0, 0])  # key 0 is BOS: not counted
    assert prof[0, 0, 1:4].tolist() == pytest.approx([0.2] * 3)  # one query, 5 keys, uniform
    assert math.isnan(prof[0, 0, 4])  # key 6 > query 4
    none = copy_offset_profile(pattern, torch.tensor([[BOS, 1, 2, 3, 4]]), (0, 1))
    assert torch.isnan(none).all()


def test_queries_mask_restricts_the_rows(built):
    roles, tokens, pattern, R = built
    only_last = torch.zeros_like(tokens, dtype=torch.bool)
    only_last[:, -1] = True
    prof = copy_offset_profile(pattern, tokens, OFFSETS, queries=only_last)
    expected = pattern[roles.induction[0], :, roles.induction[1], -1, R + 1].mean()  # key after A[-1]'s first copy
    assert prof[roles.induction][PLUS1] == pytest.approx(float(expected), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The mechanism label: classic induction, long-offset recall, none.

from initmi_utils.data import Batch  # noqa: E402
from initmi_utils.offsets import (  # noqa: E402
    CLASSIC_MIN_PLUS1,
    MECHANISMS,
    RECALL_MAX_NEAR,
    RECALL_MIN_COMPOSED,
    SHIFTED_MIN_PLUS2,
    classify_mechanism,
    induction_queries,
    mechanism_labels,
    model_mechanism,
    offset_table,
)


def copy_batch(distances, seg_len: int = 5, n_ctx: int = 48, d_vocab: int = 20, per: int = 4, seed: int = 0) -> Batch:
    """BOS + filler with one segment of ``seg_len`` distinct tokens copied once, the second copy
    ``D`` positions after the first, ``per`` sequences per ``D``; filler tokens never occur in the
    segment, so the earlier copy of every second-copy token is unique. Targets: the second copy
    from its second token on (as in ``data.sample_sequences``)."""
    g = torch.Generator().manual_seed(seed)
    tokens, targets = [], []
    for D in distances:
        for _ in range(per):
            perm = torch.randperm(d_vocab - 1, generator=g) + 1
            seg, rest = perm[:seg_len], perm[seg_len:]
            t = rest[torch.randint(len(rest), (n_ctx,), generator=g)]
            t[0] = BOS
            p1 = 1 + int(torch.randint(0, n_ctx - D - seg_len, (1,), generator=g))
            t[p1 : p1 + seg_len], t[p1 + D : p1 + D + seg_len] = seg, seg
            m = torch.zeros(n_ctx, dtype=torch.bool)
            m[p1 + D + 1 : p1 + D + seg_len] = True
            tokens.append(t)
            targets.append(m)
    t = torch.stack(tokens)
    return Batch(t, torch.stack(targets), torch.full_like(t, -1))


def _label(pattern, tokens, queries=None) -> dict:
    df = offset_table(pattern, tokens, queries)
    row = df[df.metric == "mechanism"]
    assert len(row) == 1 and MECHANISMS[int(row.value.item())] == row.label.item()
    return dict(classify_mechanism(df, None), table=df)


def _uniform(batch: int, n_layers: int, n_heads: int, n: int) -> torch.Tensor:
    p = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    return p.expand(n_layers, batch, n_heads, n, n).clone()


def test_handbuilt_induction_model_is_classic_on_varying_copy_distances():
    model, roles = induction_model()
    b = copy_batch(range(5, 41))
    with torch.no_grad():
        patterns = []
        model(b.tokens, patterns=patterns)
    lab = _label(torch.stack(patterns), b.tokens, induction_queries(b.target))
    assert lab["label"] == "classic_induction" and (lab["layer"], lab["head"]) == roles.induction
    assert lab["score"] > 0.95


def test_model_mechanism_labels_a_model_from_one_forward():
    model, roles = induction_model()
    b = copy_batch(range(5, 41))
    lab = model_mechanism(model, b)
    assert lab["label"] == "classic_induction" and (lab["layer"], lab["head"]) == roles.induction
    from initmi_utils.config import experiment
    from initmi_utils.schemes import build_model

    assert model_mechanism(build_model(experiment("quick", "normal", 0)), b)["label"] == "none"  # untrained


def test_offset_table_summary_agrees_with_the_profiles(built):
    roles, tokens, pattern, _ = built
    df = offset_table(pattern, tokens, step=3)
    assert (df.step == 3).all()
    assert list(df.columns) == ["step", "layer", "head", "metric", "value", "offset", "source_layer", "source_head", "label"]
    direct = df[df.metric == "copy_offset_mass"]
    assert len(direct) == 2 * 4 * len(tuple(range(-3, 21)))
    L, H = roles.induction
    plus1 = df[(df.metric == "copy_offset_plus1") & (df.layer == L) & (df["head"] == H)].value.item()
    assert plus1 == pytest.approx(direct[(direct.layer == L) & (direct["head"] == H) & (direct.offset == 1)].value.item())
    comp = df[(df.metric == "composed_copy_mass") & (df.layer == L) & (df["head"] == H)]
    assert comp.source_layer.item() == 0 and comp.source_head.item() == roles.prev_token[1]  # via the prev-token head
    assert comp.value.item() > 0.9
    assert (df[df.metric == "copy_offset_plus1"].layer == 1).all()  # summaries only for heads that can compose


def test_long_offset_recall_patterns_are_labelled_recall():
    # Copies at distances 8..20; L0H0 looks d back, L1H0 attends d after the earlier copy, L1H1 is uniform.
    d = 6
    b = copy_batch(range(8, 21), n_ctx=40)
    p = _long_offset_patterns(b.tokens, d)
    p[1, :, 1] = _uniform(1, 1, 1, b.tokens.shape[1])[0, 0, 0]
    q = induction_queries(b.target)
    lab = _label(p, b.tokens, q)
    assert lab["label"] == "long_offset_recall"
    assert (lab["layer"], lab["head"], lab["source_layer"], lab["source_head"]) == (1, 0, 0, 0)
    assert lab["score"] == pytest.approx(1.0)
    far = lab["table"].query("metric == 'copy_offset_mass' and layer == 1 and head == 0")
    assert far.set_index("offset").value[d] == pytest.approx(1.0)  # directly: all of it d after the copy


def test_a_recall_head_next_to_an_induction_head_is_classic():
    d = 6
    b = copy_batch(range(8, 21), n_ctx=40)
    lab = _label(_long_offset_patterns(b.tokens, d), b.tokens, induction_queries(b.target))  # L1H1: induction head
    assert lab["label"] == "classic_induction" and (lab["layer"], lab["head"]) == (1, 1)


def _shifted_patterns(tokens: torch.Tensor, layer0: str) -> torch.Tensor:
    """[layer=2, batch, head=2, q, k]: L1H0 at a query whose token occurred at i attends to i + 2
    (the token after the one to copy), L1H1 is uniform; L0H0 attends to the previous token
    (``layer0="previous"``: it moves the token to copy to i + 2) or to itself (``"self"``)."""
    batch, n = tokens.shape
    q = torch.arange(n).expand(batch, n)
    src = earlier_copy_index(tokens)
    l0h0 = _one_hot_rows((q - 1).clamp(min=0) if layer0 == "previous" else q, n)
    l1h0 = _one_hot_rows(torch.where((src >= 0) & (src + 2 <= q), src + 2, 0), n)
    uniform = _uniform(batch, 1, 1, n)[0, :, 0]
    return torch.stack([torch.stack([l0h0, _one_hot_rows(q, n)], 1), torch.stack([l1h0, uniform], 1)])


def test_a_head_two_after_the_copy_reading_through_a_previous_token_head_is_shifted_induction():
    b = copy_batch(range(8, 21), n_ctx=40)
    lab = _label(_shifted_patterns(b.tokens, "previous"), b.tokens, induction_queries(b.target))
    assert lab["label"] == "shifted_induction"
    assert (lab["layer"], lab["head"], lab["source_layer"], lab["source_head"]) == (1, 0, 0, 0)
    assert lab["score"] == pytest.approx(1.0)
    plus1 = lab["table"].query("metric == 'copy_offset_plus1' and layer == 1 and head == 0").value.item()
    assert plus1 == 0.0  # invisible to the induction score


def test_a_head_two_after_the_copy_with_nothing_moving_the_token_there_is_none():
    b = copy_batch(range(8, 21), n_ctx=40)
    lab = _label(_shifted_patterns(b.tokens, "self"), b.tokens, induction_queries(b.target))
    assert lab["label"] == "none", lab


@pytest.mark.parametrize("case", ["uniform", "previous_token_only", "duplicate_through_self"])
def test_no_copying_head_is_none(case):
    b = copy_batch(range(8, 21), n_ctx=40)
    tokens = b.tokens
    batch, n = tokens.shape
    p = _uniform(batch, 2, 2, n)
    q_idx = torch.arange(n).expand(batch, n)
    if case == "previous_token_only":  # every head attends to the previous token: never near the earlier copy
        p[:] = _one_hot_rows((q_idx - 1).clamp(min=0), n)[None, :, None]
    if case == "duplicate_through_self":
        # L1H0 attends to the earlier copy itself (a duplicate-token head) and L0H1 to the current
        # position: composed they land on offset 0 too, but the direct mass sits on the copy, so
        # it is not recall (mimetic-initialised runs look like this).
        p[0, :, 1] = _one_hot_rows(q_idx, n)
        src = earlier_copy_index(tokens)
        p[1, :, 0] = _one_hot_rows(torch.where(src >= 0, src, 0), n)
    lab = _label(p, tokens, induction_queries(b.target))
    assert lab["label"] == "none", lab
    assert (lab["layer"], lab["head"]) == (-1, -1)


def _summary(plus1: float, near: float, composed: float, layer: int = 1, head: int = 0, plus2: float = 0.0):
    import pandas as pd

    return pd.DataFrame([dict(layer=layer, head=head, metric="copy_offset_plus1", value=plus1),
                         dict(layer=layer, head=head, metric="copy_offset_plus2", value=plus2),
                         dict(layer=layer, head=head, metric="copy_offset_near_max", value=near),
                         dict(layer=layer, head=head, metric="composed_copy_mass", value=composed,
                              source_layer=0, source_head=1)])


def test_thresholds_are_where_the_docstring_says():
    e = 1e-3
    assert classify_mechanism(_summary(CLASSIC_MIN_PLUS1, CLASSIC_MIN_PLUS1, 0.0), None)["label"] == "classic_induction"
    assert classify_mechanism(_summary(CLASSIC_MIN_PLUS1 - e, 0.0, 0.0), None)["label"] == "none"
    assert classify_mechanism(_summary(0.0, RECALL_MAX_NEAR - e, RECALL_MIN_COMPOSED), None)["label"] == "long_offset_recall"
    assert classify_mechanism(_summary(0.0, RECALL_MAX_NEAR, RECALL_MIN_COMPOSED), None)["label"] == "none"
    assert classify_mechanism(_summary(0.0, 0.0, RECALL_MIN_COMPOSED - e), None)["label"] == "none"
    assert classify_mechanism(_summary(float("nan"), float("nan"), float("nan")), None)["label"] == "none"
    assert classify_mechanism(_summary(0.9, 0.9, 0.9, layer=0), None)["label"] == "none"  # layer 0 cannot compose
    assert classify_mechanism(_summary(0.0, 0.0, 0.6), None, recall_min_composed=0.7)["label"] == "none"
    lab = classify_mechanism(_summary(0.0, 0.0, 0.5), None)
    assert (lab["source_layer"], lab["source_head"], lab["score"]) == (0, 1, 0.5)
    # shifted induction: +2 and composed, checked before recall (its +2 mass is near the copy)
    assert classify_mechanism(_summary(0.0, 0.9, RECALL_MIN_COMPOSED, plus2=SHIFTED_MIN_PLUS2), None)["label"] == "shifted_induction"
    assert classify_mechanism(_summary(0.0, 0.0, 0.6, plus2=SHIFTED_MIN_PLUS2), None)["label"] == "shifted_induction"
    assert classify_mechanism(_summary(0.0, 0.9, RECALL_MIN_COMPOSED, plus2=SHIFTED_MIN_PLUS2 - e), None)["label"] == "none"
    assert classify_mechanism(_summary(0.0, 0.9, RECALL_MIN_COMPOSED - e, plus2=0.9), None)["label"] == "none"
    assert classify_mechanism(_summary(CLASSIC_MIN_PLUS1, 0.9, 0.9, plus2=0.9), None)["label"] == "classic_induction"
    lab = classify_mechanism(_summary(0.0, 0.9, 0.5, plus2=0.8), None)
    assert (lab["source_layer"], lab["source_head"], lab["score"]) == (0, 1, 0.8)


def test_mechanism_labels_per_run_and_step():
    import pandas as pd

    rows = [_summary(0.8, 0.8, 0.6).assign(run="a", scheme="x", seed=0, step=10),
            _summary(0.0, 0.0, 0.5).assign(run="b", scheme="x", seed=1, step=10),
            _summary(0.0, 0.0, 0.0).assign(run="b", scheme="x", seed=1, step=0)]
    labels = mechanism_labels(pd.concat(rows, ignore_index=True)).set_index(["run", "step"])
    assert labels.loc[("a", 10), "mechanism"] == "classic_induction"
    assert labels.loc[("b", 10), "mechanism"] == "long_offset_recall" and labels.loc[("b", 0), "mechanism"] == "none"
    assert mechanism_labels(pd.DataFrame(columns=["run", "step", "layer", "head", "metric", "value"])).empty


# ---------------------------------------------------------------------------------------------
# Each label's definition pinned by planted answers with *literal* values on both sides of every
# threshold: loosening (or tightening) any value of ``Thresholds`` fails at least one of these.
# (The tests above read the constants, so they move with them and pin nothing.)

import dataclasses  # noqa: E402

import pandas as pd  # noqa: E402

from initmi_utils.behavior import next_token_stats  # noqa: E402
from initmi_utils.offsets import (  # noqa: E402
    ACCURACY_METRIC,
    MIN_INDUCTION_ACCURACY,
    REPORT_ORDER,
    THRESHOLDS,
    Thresholds,
    induction_accuracy,
)


def test_thresholds_are_one_frozen_table_and_labels_only_ever_appended():
    with pytest.raises(dataclasses.FrozenInstanceError):
        THRESHOLDS.classic_min_plus1 = 0.05
    assert (CLASSIC_MIN_PLUS1, SHIFTED_MIN_PLUS2, RECALL_MIN_COMPOSED, RECALL_MAX_NEAR, MIN_INDUCTION_ACCURACY) == (
        THRESHOLDS.classic_min_plus1, THRESHOLDS.shifted_min_plus2, THRESHOLDS.recall_min_composed,
        THRESHOLDS.recall_max_near, THRESHOLDS.min_induction_accuracy)
    # stored ``mechanism`` rows hold the index: the first four must never move
    assert MECHANISMS[:4] == ("none", "classic_induction", "long_offset_recall", "shifted_induction")
    assert MECHANISMS[4] == "partial" and sorted(REPORT_ORDER) == sorted(MECHANISMS)


def _lab(plus1=0.0, near=0.0, composed=0.0, plus2=0.0, accuracy=None, **kw) -> str:
    return classify_mechanism(_summary(plus1, near, composed, plus2=plus2), accuracy, **kw)["label"]


E = 0.001  # "just below / just above"; literal thresholds on purpose (see the section comment)


def test_classic_edge_plus1_mass():
    assert _lab(plus1=0.3 - E) == "none"
    assert _lab(plus1=0.3 + E) == "classic_induction"


def test_shifted_edge_plus2_mass_and_composed_mass():
    # near 0.9 (the +2 mass is near the copy) keeps recall out; only the shifted rule can fire
    assert _lab(plus2=0.3 - E, near=0.9, composed=0.9) == "none"
    assert _lab(plus2=0.3 + E, near=0.9, composed=0.9) == "shifted_induction"
    assert _lab(plus2=0.9, near=0.9, composed=0.25 - E) == "none"
    assert _lab(plus2=0.9, near=0.9, composed=0.25 + E) == "shifted_induction"


def test_recall_edge_composed_mass_and_near_mass():
    assert _lab(near=0.0, composed=0.25 - E) == "none"
    assert _lab(near=0.0, composed=0.25 + E) == "long_offset_recall"
    assert _lab(near=0.1 - E, composed=0.9) == "long_offset_recall"
    assert _lab(near=0.1 + E, composed=0.9) == "none"


@pytest.mark.parametrize("attention, label", [
    (dict(plus1=0.9, near=0.9), "classic_induction"),
    (dict(plus2=0.9, near=0.9, composed=0.9), "shifted_induction"),
    (dict(near=0.0, composed=0.9), "long_offset_recall"),
])
def test_accuracy_floor_edge(attention, label):
    assert _lab(**attention, accuracy=0.5 - E) == "partial"
    assert _lab(**attention, accuracy=0.5 + E) == label
    assert _lab(**attention, accuracy=0.5) == label  # the floor itself passes (>=)
    assert _lab(**attention, accuracy=float("nan")) == "partial"  # measured without a target: no evidence
    assert _lab(**attention, accuracy=None) == label  # not measured: the attention label alone
    lab = classify_mechanism(_summary(**{"plus1": 0.0, "near": 0.0, "composed": 0.0, **attention}), 0.49)
    assert lab["attention_label"] == label and lab["layer"] == 1 and lab["accuracy"] == 0.49  # head kept


def test_no_attention_evidence_stays_none_at_any_accuracy():
    for acc in (0.0, 0.49, 0.99, None):
        lab = classify_mechanism(_summary(0.0, 0.0, 0.0), acc)
        assert lab["label"] == lab["attention_label"] == "none" and (lab["layer"], lab["head"]) == (-1, -1)


def test_observed_heads_of_the_tuning_grid_keep_their_labels():
    # The values ``Thresholds`` was tuned on (its docstring): each sits on one side of one threshold.
    assert _lab(plus1=0.85) == "classic_induction"  # weakest induction head seen
    assert _lab(plus1=0.19, near=0.19) == "none"  # strongest non-induction layer-1 head on +1
    assert _lab(near=0.01, composed=0.31) == "long_offset_recall"  # a recall donor's weakest composed mass
    assert _lab(near=0.01, composed=0.14) == "none"  # strongest composed mass in runs without induction
    assert _lab(near=0.2, composed=0.74) == "none"  # mimetic duplicate-token head: near the copy
    assert _lab(plus2=0.81, plus1=0.07, near=0.81, composed=0.6) == "shifted_induction"  # full seed 1
    assert _lab(plus1=0.9, accuracy=0.74) == "classic_induction"  # lowest-accuracy run labelled in the grid
    assert _lab(near=0.01, composed=0.55, accuracy=0.45) == "partial"  # like the never-emerged donor of seed 3
    assert _lab(near=0.01, composed=0.55, accuracy=0.71) == "long_offset_recall"  # like that of seed 1


def test_thresholds_can_be_overridden_by_name_only():
    assert _lab(plus1=0.2, classic_min_plus1=0.1) == "classic_induction"
    assert classify_mechanism(_summary(0.2, 0.0, 0.0), None, Thresholds(classic_min_plus1=0.1))["label"] == "classic_induction"
    assert _lab(plus1=0.9, accuracy=0.3, min_induction_accuracy=0.2) == "classic_induction"
    with pytest.raises(TypeError):
        _lab(plus1=0.9, classic_min_plus=0.1)  # a typo is an error, not a silently ignored keyword


# The same edges through the whole path (patterns -> ``offset_table`` -> label): planted patterns
# whose attention mass is exactly ``w`` on the key the rule looks at and the rest on BOS.

D = 6  # the recall circuit's look-back in these patterns


def _keys(tokens, kind: str, o: int = 0) -> torch.Tensor:
    n = tokens.shape[1]
    q = torch.arange(n).expand_as(tokens)
    if kind == "back":  # o positions before the query (BOS when there is none)
        return (q - o).clamp(min=0)
    src = earlier_copy_index(tokens)  # o after the earlier copy (BOS when that key is not causal)
    return torch.where((src >= 0) & (src + o >= 1) & (src + o <= q), src + o, 0)


def _planted(tokens, layer0, layer1) -> torch.Tensor:
    """[layer=2, batch, head=2, q, k] from, per head, a list of (weight, keys): weight on those
    keys, the remaining mass on BOS."""
    n = tokens.shape[1]

    def head(parts):
        p = torch.zeros(*tokens.shape, n)
        for w, keys in parts:
            p += w * _one_hot_rows(keys, n)
        p[..., 0] += 1 - sum(w for w, _ in parts)
        return p

    return torch.stack([torch.stack([head(h) for h in layer]).transpose(0, 1) for layer in (layer0, layer1)])


@pytest.fixture(scope="module")
def varied():
    b = copy_batch(range(8, 21), n_ctx=40)
    return b.tokens, induction_queries(b.target)


def _planted_label(varied, layer0, layer1) -> str:
    tokens, q = varied
    return _label(_planted(tokens, layer0, layer1), tokens, q)["label"]


@pytest.mark.parametrize("w, label", [(0.29, "none"), (0.31, "classic_induction")])
def test_planted_classic_edge(varied, w, label):
    t = varied[0]
    prev, self_ = [(1.0, _keys(t, "back", 1))], [(1.0, _keys(t, "back", 0))]
    assert _planted_label(varied, [prev, self_], [[(w, _keys(t, "copy", 1))], []]) == label


@pytest.mark.parametrize("w, c, label", [(0.29, 1.0, "none"), (0.31, 1.0, "shifted_induction"),
                                         (0.9, 0.27, "none"), (0.9, 0.29, "shifted_induction")])
def test_planted_shifted_edges(varied, w, c, label):
    # L1H0: w on +2; L0H0 looks one back with mass c, so composed mass on +1 is w * c
    t = varied[0]
    layer0 = [[(c, _keys(t, "back", 1))], [(1.0, _keys(t, "back", 0))]]
    assert _planted_label(varied, layer0, [[(w, _keys(t, "copy", 2))], []]) == label


@pytest.mark.parametrize("w, near, label", [(0.24, 0.0, "none"), (0.26, 0.0, "long_offset_recall"),
                                            (0.8, 0.09, "long_offset_recall"), (0.8, 0.11, "none")])
def test_planted_recall_edges(varied, w, near, label):
    # L1H0: w D after the copy (composed through L0H0, D back: w on offset 0) and ``near`` on -2
    t = varied[0]
    layer0 = [[(1.0, _keys(t, "back", D))], [(1.0, _keys(t, "back", 0))]]
    l1h0 = [(w, _keys(t, "copy", D))] + ([(near, _keys(t, "copy", -2))] if near else [])
    assert _planted_label(varied, layer0, [l1h0, []]) == label


# ---------------------------------------------------------------------------------------------
# Behaviour in the label: the accuracy's sources.


def test_induction_accuracy_is_next_token_stats_acc_induction():
    model, _ = induction_model(noise=0.03)
    b = copy_batch(range(5, 41))
    with torch.no_grad():
        logits = model(b.tokens)
    acc = induction_accuracy(logits, b.tokens, b.target)
    assert acc == pytest.approx(next_token_stats(logits, b)["acc_induction"])
    assert math.isnan(induction_accuracy(logits, b.tokens, torch.zeros_like(b.target)))


def test_model_mechanism_needs_the_model_to_copy():
    model, roles = induction_model()
    b = copy_batch(range(5, 41))
    lab = model_mechanism(model, b)
    assert lab["label"] == "classic_induction" and lab["accuracy"] > 0.95
    with torch.no_grad():
        model.unembed.W_U.zero_()  # same attention, but every logit is 0: the argmax is BOS, never right
    lab = model_mechanism(model, b)
    assert lab["label"] == "partial" and lab["attention_label"] == "classic_induction"
    assert lab["accuracy"] == 0.0 and (lab["layer"], lab["head"]) == roles.induction


def test_offset_table_stores_the_accuracy_it_labelled_with(varied):
    tokens, q = varied
    t = tokens
    pattern = _planted(t, [[(1.0, _keys(t, "back", 1))], []], [[(0.9, _keys(t, "copy", 1))], []])
    df = offset_table(pattern, tokens, q, step=7, accuracy=0.3)
    mech = df[df.metric == "mechanism"]
    assert mech.label.item() == "partial" and MECHANISMS[int(mech.value.item())] == "partial"
    assert df[df.metric == ACCURACY_METRIC].value.item() == pytest.approx(0.3)
    assert not (offset_table(pattern, tokens, q).metric == ACCURACY_METRIC).any()  # not measured: no row
    assert offset_table(pattern, tokens, q).query("metric == 'mechanism'").label.item() == "classic_induction"
    # mechanism_labels re-reads the stored accuracy, so relabelling a stored table keeps the floor
    labels = mechanism_labels(df.assign(run="a"))
    assert labels.mechanism.item() == "partial" and labels.attention_mechanism.item() == "classic_induction"
    assert labels.accuracy.item() == pytest.approx(0.3)


def test_mechanism_labels_take_the_accuracy_from_the_behavior_table():
    rows = [_summary(0.8, 0.8, 0.6).assign(run="a", scheme="x", seed=0, step=10),
            _summary(0.0, 0.0, 0.5).assign(run="b", scheme="x", seed=1, step=10),
            _summary(0.8, 0.8, 0.6).assign(run="b", scheme="x", seed=1, step=0)]
    offsets = pd.concat(rows, ignore_index=True)
    behavior = pd.DataFrame([dict(run="a", scheme="x", seed=0, step=10, metric="val_acc_induction", value=0.49),
                             dict(run="a", scheme="x", seed=0, step=10, metric="val_loss", value=2.0),
                             dict(run="b", scheme="x", seed=1, step=10, metric="val_acc_induction", value=0.9)])
    labels = mechanism_labels(offsets, behavior).set_index(["run", "step"])
    assert labels.loc[("a", 10), "mechanism"] == "partial"  # the example of the issue: 0.49 is not induction
    assert labels.loc[("a", 10), "attention_mechanism"] == "classic_induction"
    assert labels.loc[("b", 10), "mechanism"] == "long_offset_recall" and labels.loc[("b", 10), "accuracy"] == 0.9
    # (b, 0) has no behaviour row: accuracy unavailable, the attention label alone, visibly so
    assert labels.loc[("b", 0), "mechanism"] == "classic_induction" and math.isnan(labels.loc[("b", 0), "accuracy"])
    # without behaviour every label is attention-only and says so
    alone = mechanism_labels(offsets)
    assert alone.accuracy.isna().all() and (alone.mechanism == alone.attention_mechanism).all()
    with pytest.raises(ValueError, match="no key column"):
        mechanism_labels(offsets, behavior.drop(columns=["run", "scheme", "seed", "step"]))
