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
    return dict(classify_mechanism(df), table=df)


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
    assert classify_mechanism(_summary(CLASSIC_MIN_PLUS1, CLASSIC_MIN_PLUS1, 0.0))["label"] == "classic_induction"
    assert classify_mechanism(_summary(CLASSIC_MIN_PLUS1 - e, 0.0, 0.0))["label"] == "none"
    assert classify_mechanism(_summary(0.0, RECALL_MAX_NEAR - e, RECALL_MIN_COMPOSED))["label"] == "long_offset_recall"
    assert classify_mechanism(_summary(0.0, RECALL_MAX_NEAR, RECALL_MIN_COMPOSED))["label"] == "none"
    assert classify_mechanism(_summary(0.0, 0.0, RECALL_MIN_COMPOSED - e))["label"] == "none"
    assert classify_mechanism(_summary(float("nan"), float("nan"), float("nan")))["label"] == "none"
    assert classify_mechanism(_summary(0.9, 0.9, 0.9, layer=0))["label"] == "none"  # layer 0 cannot compose
    assert classify_mechanism(_summary(0.0, 0.0, 0.6), recall_min_composed=0.7)["label"] == "none"
    lab = classify_mechanism(_summary(0.0, 0.0, 0.5))
    assert (lab["source_layer"], lab["source_head"], lab["score"]) == (0, 1, 0.5)
    # shifted induction: +2 and composed, checked before recall (its +2 mass is near the copy)
    assert classify_mechanism(_summary(0.0, 0.9, RECALL_MIN_COMPOSED, plus2=SHIFTED_MIN_PLUS2))["label"] == "shifted_induction"
    assert classify_mechanism(_summary(0.0, 0.0, 0.6, plus2=SHIFTED_MIN_PLUS2))["label"] == "shifted_induction"
    assert classify_mechanism(_summary(0.0, 0.9, RECALL_MIN_COMPOSED, plus2=SHIFTED_MIN_PLUS2 - e))["label"] == "none"
    assert classify_mechanism(_summary(0.0, 0.9, RECALL_MIN_COMPOSED - e, plus2=0.9))["label"] == "none"
    assert classify_mechanism(_summary(CLASSIC_MIN_PLUS1, 0.9, 0.9, plus2=0.9))["label"] == "classic_induction"
    lab = classify_mechanism(_summary(0.0, 0.9, 0.5, plus2=0.8))
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
