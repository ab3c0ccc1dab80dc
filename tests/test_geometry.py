"""Geometry metrics against matrices and models whose answer is known by construction."""

import math

import pytest
import torch

from initmi_utils.config import ModelConfig
from initmi_utils.geometry import (
    drift_table,
    effective_rank,
    excess_kurtosis,
    geometry_table,
    head_outputs,
    head_similarity_table,
    hook_names,
    linear_cka,
    mean_cosine,
    spectra_table,
    weight_stats_table,
)
from initmi_utils.handbuilt import ROLES, handbuilt_dataset, handbuilt_experiment, induction_model
from initmi_utils.model import Transformer, to_bridge
from initmi_utils.schemes import init_weights
from tests.conftest import one_value as _value


def _orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


@pytest.fixture(scope="module")
def built():
    model, roles = induction_model(attn_only=False)
    ds = handbuilt_dataset(handbuilt_experiment(attn_only=False))
    names = hook_names(model.cfg.n_layers)
    with torch.no_grad():
        _, cache = to_bridge(model).run_with_cache(ds.rep.tokens, names_filter=lambda n: n in names)
    return model, cache


# --- effective rank ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 8])
def test_effective_rank_of_flat_rank_k_matrix_is_k(k):
    g = torch.Generator().manual_seed(k)
    m = _orthonormal(20, k, g) @ _orthonormal(12, k, g).T * 5.0  # k equal singular values
    s = torch.linalg.svdvals(m)
    assert effective_rank(s).item() == pytest.approx(k, rel=1e-4)


def test_effective_rank_interpolates_and_ignores_scale():
    peaked, flat = torch.tensor([10.0, 0.1, 0.1, 0.1]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert 1.0 < effective_rank(peaked).item() < 2.0 < effective_rank(flat).item() == pytest.approx(4.0)
    assert effective_rank(peaked * 7).item() == pytest.approx(effective_rank(peaked).item())
    assert math.isnan(effective_rank(torch.zeros(4)).item())


def test_spectra_of_handbuilt_circuits(built):
    """L1H2's OV copies d_vocab token directions 1:1 (flat rank d_vocab); L0H1's QK is an
    orthogonal rotation on the 2F positional directions (flat rank 2F); zero heads have none."""
    model, _ = built
    df = spectra_table(model)
    er = df[df.metric == "effective_rank"]
    V = model.cfg.d_vocab
    assert _value(er, matrix="W_OV", layer=1, head=ROLES.induction[1]) == pytest.approx(V, rel=1e-3)
    assert _value(er, matrix="W_QK", layer=0, head=ROLES.prev_token[1]) == pytest.approx(32, rel=1e-3)  # n_freqs=16
    assert _value(er, matrix="W_E", layer=-1, head=-1) == pytest.approx(V, rel=1e-3)
    assert math.isnan(_value(er, matrix="W_QK", layer=1, head=1))  # all-zero dummy head
    sv = df[(df.metric == "singular_value") & (df.matrix == "W_QK") & (df.layer == 0) & (df["head"] == ROLES.prev_token[1])]
    assert len(sv) == model.cfg.d_head and (sv.sort_values("sv_index").value.diff().dropna() <= 1e-4).all()


def test_spectra_detect_a_rank_deficient_trained_matrix():
    """Rank-2 W_V in one head of a random model: its effective rank is <= 2, the others' is not."""
    model = init_weights(Transformer(ModelConfig(n_layers=1, n_heads=2, d_model=32, d_vocab=16, n_ctx=8, attn_only=True)), "normal", 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.blocks[0].attn.W_V[0] = (_orthonormal(32, 2, g) @ _orthonormal(16, 2, g).T).float()
    er = spectra_table(model, with_values=False).query("metric == 'effective_rank' and matrix == 'W_V'")
    assert _value(er, head=0) == pytest.approx(2.0, rel=1e-3) and _value(er, head=1) > 8


# --- CKA and cosine ----------------------------------------------------------------------------


def test_cka_identical_rotated_scaled_is_one_independent_is_near_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g)
    rot = _orthonormal(16, 16, g).float()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, 3.0 * x @ rot) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, torch.randn(4000, 16, generator=g)) < 0.02
    assert mean_cosine(x, 2 * x) == pytest.approx(1.0) and mean_cosine(x, -x) == pytest.approx(-1.0)
    assert abs(mean_cosine(x, torch.randn(4000, 16, generator=g))) < 0.02


def test_head_similarity_finds_a_duplicated_head(built):
    """Copy L1H2 (induction) into the zero dummy L1H1: that pair's outputs are identical (CKA and
    cosine 1); L1H2 vs L1H0 (writes into an orthogonal JUNK subspace) have cosine 0."""
    model, _ = built
    twin, _ = induction_model(attn_only=False)
    L, H = ROLES.induction
    with torch.no_grad():
        a = twin.blocks[L].attn
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            getattr(a, name)[1] = getattr(a, name)[H]
    ds = handbuilt_dataset(handbuilt_experiment(attn_only=False))
    with torch.no_grad():
        _, cache = to_bridge(twin).run_with_cache(ds.rep.tokens, names_filter=lambda n: n in hook_names(2))
    outputs = head_outputs(cache, twin)
    outputs = {k: v for k, v in outputs.items() if v.abs().sum() > 0}  # zero heads have no direction
    df = head_similarity_table(outputs)
    assert _value(df, metric="head_cka", layer=1, head=1, other_layer=1, other_head=H) == pytest.approx(1.0, abs=1e-5)
    assert _value(df, metric="head_cosine", layer=1, head=1, other_layer=1, other_head=H) == pytest.approx(1.0, abs=1e-5)
    assert abs(_value(df, metric="head_cosine", layer=1, head=0, other_layer=1, other_head=H)) < 1e-4
    others = df[(df.metric == "head_cka") & ~((df.layer == 1) & (df["head"] == 1) & (df.other_head == H))]
    assert (others.value < 0.9).all()


# --- drift and weight shape --------------------------------------------------------------------


def test_drift_measures_a_known_perturbation():
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_mlp=64, d_vocab=16, n_ctx=8)
    model0 = init_weights(Transformer(cfg), "xavier", 0)
    model = init_weights(Transformer(cfg), "xavier", 0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        W = model.blocks[1].mlp.W_in
        delta = torch.randn(W.shape, generator=g)
        W += 0.25 * W.norm() * delta / delta.norm()  # ||W_t - W_0|| / ||W_0|| = 0.25 exactly
        model.blocks[0].attn.b_Q += 1.0  # biases are not matrices: no drift row, no effect
    df = drift_table(model, model0)
    assert _value(df, matrix="W_in", layer=1) == pytest.approx(0.25, rel=1e-5)
    assert (df[~((df.matrix == "W_in") & (df.layer == 1))].value == 0).all()
    assert set(df.matrix) == {"W_E", "W_pos", "W_U", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"}


def test_kurtosis_of_known_distributions():
    g = torch.Generator().manual_seed(0)
    n = 400_000
    assert excess_kurtosis(torch.randn(n, generator=g)) == pytest.approx(0.0, abs=0.05)
    assert excess_kurtosis(torch.rand(n, generator=g)) == pytest.approx(-1.2, abs=0.02)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    assert excess_kurtosis(laplace) == pytest.approx(3.0, abs=0.3)


def test_weight_stats_recognise_the_init_distribution():
    """Xavier-uniform matrices: std sqrt(2 / (fan_in + fan_out)) and kurtosis -1.2 (uniform);
    normal(0.02) matrices: std 0.02 and kurtosis 0."""
    cfg = ModelConfig()  # d_model 128, d_mlp 512: enough entries for stable moments
    xav = weight_stats_table(init_weights(Transformer(cfg), "xavier", 0))
    nor = weight_stats_table(init_weights(Transformer(cfg), "normal", 0))
    assert _value(xav, metric="weight_std", matrix="W_in", layer=0) == pytest.approx(math.sqrt(2 / (128 + 512)), rel=0.01)
    assert _value(xav, metric="weight_kurtosis", matrix="W_in", layer=0) == pytest.approx(-1.2, abs=0.03)
    assert _value(nor, metric="weight_std", matrix="W_out", layer=1) == pytest.approx(0.02, rel=0.01)
    assert _value(nor, metric="weight_kurtosis", matrix="W_out", layer=1) == pytest.approx(0.0, abs=0.1)


# --- activations -------------------------------------------------------------------------------


def test_resid_norm_and_entropy_on_handbuilt(built):
    """The built residual holds unit TOK + POS (norm sqrt 2), then + PREV from L0H1 (sqrt 3);
    L0H1 attends to one position (entropy 0); the dummy L0H0 is uniform (normalised entropy 1)."""
    model, cache = built
    df = geometry_table(model, model, cache, step=7)
    assert (df.step == 7).all()
    norms = df[df.metric == "resid_norm"].set_index("layer").value
    assert norms[-1] == pytest.approx(math.sqrt(2), rel=1e-4)
    assert norms[0] == pytest.approx(math.sqrt(3), rel=1e-3)
    ent = df[df.metric == "attn_entropy"]
    assert _value(ent, layer=0, head=ROLES.prev_token[1]) < 0.01
    n = cache["blocks.0.attn.hook_pattern"].shape[-1]
    uniform = sum(math.log(q + 1) for q in range(1, n)) / (n - 1)
    assert _value(ent, layer=0, head=0) == pytest.approx(uniform, rel=1e-4)
    assert _value(df[df.metric == "attn_entropy_norm"], layer=0, head=0) == pytest.approx(1.0, rel=1e-4)
    for head in ROLES.bos:
        assert _value(ent, layer=head[0], head=head[1]) < 0.01
    assert (df[df.metric == "drift"].value.dropna() == 0).all()  # model vs itself (zero MLPs: nan)
