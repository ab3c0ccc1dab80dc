"""Circuit scores single out the circuits built by hand, and nothing else."""

import math

import pytest
import torch
from transformer_lens.FactoredMatrix import FactoredMatrix

from initmi_utils.circuits import (
    FoldedWeights,
    circuits_table,
    composition_null,
    composition_table,
    copying_score,
    ov_table,
    qk_prev_token_table,
    top1_diag_accuracy,
)
from initmi_utils.config import ModelConfig
from initmi_utils.handbuilt import ROLES, handbuilt_model_config, induction_model
from initmi_utils.model import Transformer, to_bridge, torch_threads
from initmi_utils.schemes import init_weights
from tests.conftest import one_value as _value

SMALL = ModelConfig(n_layers=2, n_heads=4, d_model=64, d_mlp=128, d_vocab=48, n_ctx=32)


@pytest.fixture(scope="module")
def built():
    return induction_model()[0]


@pytest.fixture(scope="module")
def null():
    return composition_null(handbuilt_model_config(), "normal", n_models=4)


def _heads(model):
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


# --- OV circuit --------------------------------------------------------------------------------


def test_copying_score_of_known_spectra():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 6, generator=g)
    B = torch.linalg.pinv(A) * 3.0  # AB = 3 * projection: eigenvalues 3 (x6) and 0
    assert copying_score(FactoredMatrix(A, B)).item() == pytest.approx(1.0, abs=1e-5)
    assert copying_score(FactoredMatrix(A, -B)).item() == pytest.approx(-1.0, abs=1e-5)
    # Half copying, half anti-copying: eigenvalues +3 (x3), -3 (x3).
    flip = torch.diag(torch.tensor([1.0, 1, 1, -1, -1, -1]))
    assert copying_score(FactoredMatrix(A, flip @ B)).item() == pytest.approx(0.0, abs=1e-5)
    assert math.isnan(copying_score(FactoredMatrix(A, 0 * B)).item())


def test_top1_diag_accuracy_counts_strict_row_maxima():
    m = torch.eye(5) * 2
    assert top1_diag_accuracy(m, exclude=()).item() == 1.0
    assert top1_diag_accuracy(-m, exclude=()).item() == 0.0
    assert top1_diag_accuracy(torch.zeros(5, 5), exclude=()).item() == 0.0  # ties are no copying
    m[2, 3] = 5.0  # token 2 now raises token 3 more than itself
    assert top1_diag_accuracy(m, exclude=()).item() == pytest.approx(0.8)
    assert top1_diag_accuracy(m, exclude=(2,)).item() == 1.0


def test_ov_scores_find_the_identity_ov_head(built):
    df = ov_table(built)
    L, H = ROLES.copying
    assert _value(df, metric="ov_copying_score", layer=L, head=H) == pytest.approx(1.0, abs=1e-4)
    assert _value(df, metric="ov_top1_diag_acc", layer=L, head=H) == 1.0
    for layer, head in _heads(built):
        if (layer, head) != ROLES.copying:  # write nothing the unembedding reads
            assert math.isnan(_value(df, metric="ov_copying_score", layer=layer, head=head))
            assert _value(df, metric="ov_top1_diag_acc", layer=layer, head=head) == 0.0


def test_ov_scores_of_anti_copying_and_random_heads():
    anti, _ = induction_model()
    with torch.no_grad():
        anti.unembed.W_U.neg_()
    df = ov_table(anti)
    L, H = ROLES.copying
    assert _value(df, metric="ov_copying_score", layer=L, head=H) == pytest.approx(-1.0, abs=1e-4)
    assert _value(df, metric="ov_top1_diag_acc", layer=L, head=H) == 0.0

    scores, accs = [], []
    for seed in range(3):
        df = ov_table(init_weights(Transformer(SMALL), "normal", seed))
        scores += df[df.metric == "ov_copying_score"].value.tolist()
        accs += df[df.metric == "ov_top1_diag_acc"].value.tolist()
    assert abs(sum(scores) / len(scores)) < 0.15 and max(abs(s) for s in scores) < 0.6
    assert sum(accs) / len(accs) < 0.1  # chance is 1 / 47


def test_ov_circuit_folds_layernorm_centring():
    """A head writing only the all-ones direction writes nothing the final LayerNorm lets through,
    even when the unembedding reads that direction."""
    model, _ = induction_model()
    L, H = ROLES.copying
    d = model.cfg.d_model
    with torch.no_grad():
        model.blocks[L].attn.W_O[H] = torch.ones(model.cfg.d_head, d)
        model.unembed.W_U.add_(torch.ones(d, model.cfg.d_vocab))
    assert math.isnan(_value(ov_table(model), metric="ov_copying_score", layer=L, head=H))


# --- positional QK -----------------------------------------------------------------------------


def test_positional_qk_detects_the_prev_token_head(built):
    df = qk_prev_token_table(built)
    for layer, head in _heads(built):
        expected = 1.0 if (layer, head) == ROLES.prev_token else 0.0
        assert _value(df, layer=layer, head=head) == pytest.approx(expected, abs=0.03), (layer, head)


def test_positional_qk_rejects_a_two_back_head():
    """Rotating the query by two position steps makes the head attend to q - 2: not a prev-token head."""
    model, _ = induction_model()
    L, H = ROLES.prev_token
    a = model.blocks[L].attn
    with torch.no_grad():
        # q_i . k_j depends on i - j through the rotation baked into W_Q: applying the same
        # rotation twice (W_Q W_K^+ W_Q) shifts the peak to j = i - 2.
        q, k = a.W_Q[H].double(), a.W_K[H].double()
        a.W_Q[H] = (q @ torch.linalg.pinv(k) @ q).float()
    assert _value(qk_prev_token_table(model), layer=L, head=H) < 0.1


# --- composition -------------------------------------------------------------------------------


def test_composition_singles_out_the_built_k_composition_pair(built, null):
    df = composition_table(built, null)
    (sl, sh), (l, h) = ROLES.prev_token, ROLES.induction
    pair = dict(source_layer=sl, source_head=sh, layer=l, head=h)
    k = df[df.metric == "k_composition"].dropna(subset=["value"])
    top = k.sort_values("value").iloc[-1]
    assert (top.source_head, top["head"]) == (sh, h)
    assert (k.value < 1e-3).sum() == len(k) - 1  # every other writer/reader pair: nothing
    assert _value(df, metric="k_composition_z", **pair) > 10
    for mode in ("q", "v"):  # the pair composes through keys only
        assert _value(df, metric=f"{mode}_composition", **pair) < 1e-3
        assert _value(df, metric=f"{mode}_composition_z", **pair) < -10


def test_composition_vanishes_without_the_mechanism():
    """An induction head whose keys read the token itself instead of PREV has no K-composition."""
    model, _ = induction_model()
    l, h = ROLES.induction
    a = model.blocks[l].attn
    with torch.no_grad():
        a.W_K[h] = a.W_Q[h]
    df = composition_table(model)
    k = df[df.metric == "k_composition"].value.dropna()
    assert (k < 1e-3).all()


def test_composition_matches_transformer_lens_on_unit_layernorm():
    """With LayerNorm gains 1 and zero-mean writers, our folded scores equal the bridge's own."""
    model = init_weights(Transformer(SMALL), "normal", 3)
    with torch.no_grad():
        for blk in model.blocks:  # centre what heads write so the fold's centring changes nothing
            blk.attn.W_O.sub_(blk.attn.W_O.mean(-1, keepdim=True))
    ours = composition_table(model)
    bridge = to_bridge(model)
    for mode in ("Q", "K", "V"):
        with torch_threads(1):
            theirs = bridge.all_composition_scores(mode)  # [layer, head, layer, head]
        for (sl, sh) in [(0, h) for h in range(SMALL.n_heads)]:
            for h in range(SMALL.n_heads):
                want = theirs[sl, sh, 1, h].item()
                got = _value(ours, metric=f"{mode.lower()}_composition", source_layer=sl, source_head=sh, layer=1, head=h)
                assert got == pytest.approx(want, rel=1e-4)


def test_null_z_scores_of_a_fresh_model_are_unremarkable(null):
    """A fresh model of the null's own scheme (another seed) is no outlier."""
    model = init_weights(Transformer(handbuilt_model_config()), "normal", 12345)
    df = composition_table(model, null)
    z = df[df.metric.str.endswith("_z")].value
    assert z.abs().mean() < 2 and z.abs().max() < 5
    with pytest.raises(ValueError, match="drawn for"):
        composition_table(init_weights(Transformer(SMALL), "normal", 0), null)


def test_circuits_table_schema(built, null):
    df = circuits_table(built, step=3, null=null, n_pos=40)
    assert (df.step == 3).all()
    names = {"ov_copying_score", "ov_top1_diag_acc", "qk_prev_token_score"} | {
        f"{m}_composition{z}" for m in "qkv" for z in ("", "_z")}
    assert set(df.metric) == names
    comp = df[df.metric.str.contains("composition")]
    assert (comp.source_layer < comp.layer).all() and (df[~df.metric.str.contains("composition")].source_head == -1).all()


def test_folded_weights_fold_layernorm_gain():
    """Scaling a reader's LN gain scales its folded W_Q/W_K/W_V and leaves composition unchanged."""
    model, _ = induction_model()
    base = composition_table(model)
    with torch.no_grad():
        model.blocks[1].ln1.w.mul_(3.0)
    w = FoldedWeights.of(model)
    assert torch.allclose(w.W_Q[1], 3.0 * FoldedWeights.of(induction_model()[0]).W_Q[1])
    again = composition_table(model)
    assert torch.allclose(torch.tensor(base.value.values), torch.tensor(again.value.values), equal_nan=True, atol=1e-5)
