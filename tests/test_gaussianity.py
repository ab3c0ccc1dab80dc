"""Gaussianity of weights and of their change, against matrices whose answer is known.

Known answers: Gaussian entries sit at the size-matched null (relative distance 1, kurtosis 0);
uniform entries have kurtosis -1.2 and stand far from it; Laplace entries have kurtosis +3; the
entries of a random orthogonal 128 x 128 matrix are close to Gaussian although its spectrum is as
far from Marchenko-Pastur as a spectrum can be; an i.i.d. matrix (Gaussian or uniform) matches
Marchenko-Pastur and a low-rank part on top of noise does not; a planted growth of dW's std with
depth is found, and its reverse is found as the reverse.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from initmi_utils import gaussianity as G
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import PRESET_SEEDS, ExperimentConfig, RunConfig, experiment
from initmi_utils.gaussianity_plots import distance_figure
from initmi_utils.geometry import named_matrices
from initmi_utils.model import Transformer
from initmi_utils.schemes import init_weights
from initmi_utils.tables import tidy
from initmi_utils.train import train
from tests.conftest import tiny_cfg

SIZES = [(128, 128), (128, 32), (128, 512)]  # the study's W_Q (all heads), one head's W_Q, MLP W_in


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(10_000 + seed)  # never the nulls' numpy seeds


def gaussian(shape, seed):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def uniform(shape, seed):
    return torch.rand(*shape, generator=_gen(seed), dtype=torch.float64) * 2 - 1


def laplace(shape, seed):
    return torch.distributions.Laplace(0.0, 1.0).icdf(torch.rand(*shape, generator=_gen(seed), dtype=torch.float64))


def rel(x) -> float:
    return G.ks_distance(x) / G.ks_null(x.numel())


def mp_rel(m) -> float:
    p, q = sorted(m.shape)
    return G.mp_distance(m)[0] / G.mp_null(p, q)


# --- the marginal ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SIZES)
def test_gaussian_entries_sit_at_the_size_matched_null(shape):
    # The null is an expectation: over many Gaussian matrices the relative distance averages 1.
    # A null taken from Kolmogorov's known-parameter law (0.87/sqrt(n)) would give ~0.73 here.
    ratios = [rel(gaussian(shape, seed) * 0.02 + 0.3) for seed in range(20)]  # scale and shift do not matter
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.1)
    assert 0.4 < min(ratios) and max(ratios) < 2.0
    x = gaussian(shape, 99)
    n = x.numel()
    assert G.excess_kurtosis(x) == pytest.approx(0.0, abs=4 * math.sqrt(24 / n))  # 4 standard errors
    assert G.skewness(x) == pytest.approx(0.0, abs=4 * math.sqrt(6 / n))


def test_raw_distances_shrink_with_size_and_the_null_follows():
    # Why the distance is relative: the raw KS of Gaussian entries falls like 1/sqrt(n).
    small, large = G.ks_null(512), G.ks_null(16384)
    assert small / large == pytest.approx(math.sqrt(16384 / 512), rel=0.1)
    assert 0.02 < small < 0.035 and 0.004 < large < 0.006


def test_the_nulls_are_deterministic():
    a, b = G.ks_null(2048), G.mp_null(32, 64)
    G.ks_null.cache_clear()
    G.mp_null.cache_clear()
    assert G.ks_null(2048) == a and G.mp_null(32, 64) == b
    assert G.ks_null(2048, draws=10) != a  # the draws are really drawn


@pytest.mark.parametrize("shape, at_least", [((128, 32), 4.0), ((128, 128), 8.0)])
def test_uniform_entries_are_clearly_not_gaussian(shape, at_least):
    x = uniform(shape, 1)
    assert G.excess_kurtosis(x) == pytest.approx(-1.2, abs=0.05)
    assert G.skewness(x) == pytest.approx(0.0, abs=0.1)
    assert rel(x) > at_least


def test_laplace_entries_have_heavy_tails():
    x = laplace((128, 512), 2)
    assert G.excess_kurtosis(x) == pytest.approx(3.0, abs=0.5)
    assert rel(x) > 10


def test_a_random_orthogonal_matrix_has_near_gaussian_entries_and_a_flat_spectrum():
    # Haar-orthogonal entries are ~N(0, 1/d) already at d = 128 (excess kurtosis -6/(d+2) ~ -0.05),
    # so the marginal cannot tell `orthogonal` from `normal`; the spectrum can: every singular
    # value is 1, as far from Marchenko-Pastur as a spectrum gets.
    q = torch.nn.init.orthogonal_(torch.empty(128, 128, dtype=torch.float64), generator=_gen(3))
    assert torch.allclose(q @ q.T, torch.eye(128, dtype=torch.float64), atol=1e-10)
    assert G.excess_kurtosis(q) == pytest.approx(-6 / 130, abs=0.1)
    assert rel(q) < 2.0
    assert mp_rel(q) > 10 and G.mp_distance(q)[1] < 0.5


def test_a_constant_matrix_has_no_shape():
    out = G.matrix_metrics(torch.full((4, 8), 0.5), "W_in")
    assert out["std"] == 0 and all(math.isnan(v) for k, v in out.items() if k != "std")


# --- the spectrum ------------------------------------------------------------------------------


def test_the_marchenko_pastur_cdf():
    # F(1) at ratio 1 (the quarter-circle law of singular values): 1/3 + sqrt(3)/(2 pi)
    assert G.mp_cdf(1.0, 1.0) == pytest.approx(1 / 3 + math.sqrt(3) / (2 * math.pi), abs=1e-6)
    for ratio in (0.25, 0.5, 1.0):
        a, b = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
        assert G.mp_cdf(a - 1e-9, ratio) == 0 and G.mp_cdf(b + 1e-9, ratio) == 1
        x = np.linspace(a, b, 200_001)
        F = G.mp_cdf(x, ratio)
        assert (np.diff(F) >= 0).all()
        mid, dF = (x[1:] + x[:-1]) / 2, np.diff(F)
        assert (mid * dF).sum() == pytest.approx(1.0, abs=1e-3)  # mean 1
        assert (mid**2 * dF).sum() == pytest.approx(1 + ratio, abs=2e-3)  # second moment 1 + ratio
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        G.mp_cdf(1.0, 2.0)


@pytest.mark.parametrize("shape", SIZES)
def test_iid_matrices_match_marchenko_pastur_and_low_rank_plus_noise_does_not(shape):
    noise = gaussian(shape, 4) * 0.01
    assert 0.5 < mp_rel(noise) < 1.8
    assert 0.85 < G.mp_distance(noise)[1] < 1.1
    assert 0.5 < mp_rel(uniform(shape, 5)) < 1.8, "MP is universal: uniform i.i.d. entries match it too"
    g = _gen(6)
    low = torch.randn(shape[0], 2, generator=g, dtype=torch.float64) @ torch.randn(2, shape[1], generator=g, dtype=torch.float64)
    spiked = noise + low * (noise.norm() / low.norm())  # a rank-2 part with the noise's energy
    assert mp_rel(spiked) > 5
    assert G.mp_distance(spiked)[1] > 2


def test_the_spectrum_is_taken_on_the_logical_matrix():
    # W_Q stored [head, d_model, d_head]: a rank-1 map d_model -> n_heads * d_head is rank 1 only
    # once the heads are put side by side.
    u, v = torch.randn(32, 1, dtype=torch.float64), torch.randn(1, 4 * 8, dtype=torch.float64)
    stored = (u @ v).reshape(32, 4, 8).permute(1, 0, 2)  # [head, d_model, d_head]
    out = G.matrix_metrics(stored + 1e-3 * torch.randn(stored.shape, dtype=torch.float64), "W_Q")
    assert out["mp_edge_ratio"] > 5


# --- tables, depth, claims ---------------------------------------------------------------------


def _cfg(n_layers: int = 2) -> ExperimentConfig:
    return tiny_cfg(model={"n_layers": n_layers})


def _perturbed(model0: Transformer, stds: list[float], seed: int, embed_std: float = 0.01) -> Transformer:
    """``model0`` plus Gaussian noise: std ``stds[l]`` on every matrix of layer ``l``."""
    model, g = copy.deepcopy(model0), _gen(seed)
    with torch.no_grad():
        for name, layer, w in named_matrices(model):
            for p in model.parameters():
                if p.data_ptr() == w.data_ptr():
                    std = embed_std if layer < 0 else stds[layer]
                    p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _planted(stds: list[float], seeds=(0, 1, 2), scheme: str = "planted") -> pd.DataFrame:
    frames = []
    for seed in seeds:
        cfg = dataclasses.replace(_cfg(len(stds)), run=RunConfig(scheme=scheme, seed=seed, preset="smoke"))
        model0 = init_weights(Transformer(cfg.model), "normal", seed)
        frames.append(tidy(pd.concat([G.gaussianity_table(model0, model0, 0),
                                      G.gaussianity_table(_perturbed(model0, stds, seed), model0, 7)]), cfg))
    return pd.concat(frames, ignore_index=True)


def test_the_table_has_every_matrix_and_no_dW_at_step_0():
    model0 = init_weights(Transformer(_cfg().model), "xavier", 0)
    at0 = G.gaussianity_table(model0, model0, 0)
    later = G.gaussianity_table(_perturbed(model0, [0.01, 0.01], 1), model0, 5)
    assert set(at0.weights) == {"W"} and set(later.weights) == {"W", "dW"}
    n_matrices = 3 + 2 * 6
    assert len(later) == 2 * n_matrices * len(G.METRICS) and set(later.metric) == set(G.METRICS)
    dw_std = later[(later.weights == "dW") & (later.metric == "std")].value
    assert dw_std.to_numpy() == pytest.approx(0.01, rel=0.15)  # the noise that was added
    with pytest.raises(ValueError, match="same architecture"):
        G.gaussianity_table(init_weights(Transformer(_cfg(3).model), "xavier", 0), model0, 5)


def test_a_planted_depth_effect_is_found_and_its_reverse_is_not_taken_for_it():
    grows = G.claims(_planted([0.01, 0.02]))
    shrinks = G.claims(_planted([0.02, 0.01]))
    for claims, verdict, ratio in ((grows, "grows", 2.0), (shrinks, "shrinks", 0.5)):
        slope = claims[claims.metric == "depth_slope"]
        assert set(slope.matrix) == {"W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"}
        assert set(slope.verdict) == {verdict}
        assert (slope.n == 3).all() and (slope.n_layers == 2).all()
        assert slope["mean"].to_numpy() == pytest.approx(math.log2(ratio), abs=0.15)
        depth_ratio = claims[claims.metric == "depth_ratio"]
        assert depth_ratio["mean"].to_numpy() == pytest.approx(ratio, rel=0.1)
    one = G.claims(_planted([0.01, 0.02], seeds=(0,)))
    assert set(one[one.metric == "depth_slope"].verdict) == {"one seed"}


def test_a_depth_trend_over_four_layers():
    claims = G.claims(_planted([0.01, 0.015, 0.0225, 0.03375]))
    slope = claims[claims.metric == "depth_slope"]
    assert (slope.n_layers == 4).all() and set(slope.verdict) == {"grows"}
    assert slope["mean"].to_numpy() == pytest.approx(math.log2(1.5), abs=0.1)
    assert G.depth_trend([0, 1, 2, 3], [1, 2, 4, 8]) == pytest.approx((1.0, 8.0))
    assert G.depth_trend([1, 0], [2.0, 1.0]) == pytest.approx((1.0, 2.0))  # order of rows does not matter


def test_claims_report_the_init_distribution_and_gaussian_noise():
    # normal init (Gaussian W at step 0) plus Gaussian noise: every part of the claim holds.
    df = _planted([0.01, 0.01])
    claims = G.claims(df).set_index(["claim", "matrix", "metric", "when"])
    assert claims.loc[("W_gaussian", "W_in", "kurtosis", "init"), "mean"] == pytest.approx(0.0, abs=0.3)
    assert claims.loc[("dW_gaussian", "W_in", "ks_rel", "final"), "mean"] == pytest.approx(1.0, abs=0.5)
    assert claims.loc[("dW_iid", "W_in", "mp_ks_rel", "final"), "mean"] == pytest.approx(1.0, abs=0.6)
    assert claims.loc[("dW_gaussian", "W_in", "ks_rel", "final"), "n"] == 3
    assert claims.loc[("W_gaussian", "W_E", "kurtosis", "final"), "step"] == 7
    assert G.claims(df.iloc[:0]).empty


def test_distance_curves_per_scheme_and_per_layer():
    df = pd.concat([_planted([0.01, 0.01]), _planted([0.01, 0.01], scheme="other")])
    curves = G.distance_curves(df, "ks_rel", by="scheme")
    assert set(curves.scheme) == {"planted", "other"} and (curves.n == 3).all()
    dw = curves[(curves.weights == "dW") & (curves.matrix == "W_in")]
    assert set(dw.step) == {7} and dw["mean"].to_numpy() == pytest.approx(1.0, abs=0.5)
    assert (curves.ci_low <= curves["mean"]).all() and (curves["mean"] <= curves.ci_high).all()
    by_layer = G.distance_curves(df[df.scheme == "other"], "kurtosis", by="layer")
    assert set(by_layer.layer) == {"embed/unembed", "L0", "L1"}
    with pytest.raises(ValueError, match="scheme' or 'layer"):
        G.distance_curves(df, by="seed")
    fig = distance_figure(curves, "test")
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(lines) == 2 * len(G.FAMILIES) * 2  # a line per scheme, family and W / dW
    assert len(bands) == len(lines)  # n = 3 seeds: every line has its band
    assert fig.layout.yaxis.type == "log"
    one_seed = distance_figure(G.distance_curves(df[df.seed == 0], "ks_rel"), "one seed per scheme")
    assert not [t for t in one_seed.data if t.fill == "toself"]


# --- a trained model, and the 4-layer presets ----------------------------------------------------


def test_the_four_layer_presets_change_only_the_depth():
    for base in ("quick", "full"):
        deep, flat = experiment(f"{base}4", "xavier", 1), experiment(base, "xavier", 1)
        assert deep.model.n_layers == 4 and flat.model.n_layers == 2
        assert dataclasses.replace(deep, model=flat.model, run=flat.run) == flat
        assert PRESET_SEEDS[f"{base}4"] == PRESET_SEEDS[base]


@pytest.mark.slow
def test_a_trained_four_layer_run(tmp_path):
    cfg = tiny_cfg("xavier", model={"n_layers": 4})
    train(cfg, tmp_path, progress=False)
    df = G.tables(cfg, tmp_path)["gaussianity"]
    steps = sorted(df.step.unique())
    assert steps[0] == 0 and len(steps) >= 3
    assert set(df.layer) == {-1, 0, 1, 2, 3}
    assert set(df[df.step == 0].weights) == {"W"} and set(df[df.step > 0].weights) == {"W", "dW"}
    # xavier draws uniform entries: kurtosis -1.2 and far from Gaussian at step 0
    w_in0 = df[(df.step == 0) & (df.matrix == "W_in") & (df.weights == "W")].set_index(["layer", "metric"]).value
    for layer in range(4):
        assert w_in0[(layer, "kurtosis")] == pytest.approx(-1.2, abs=0.15)
        assert w_in0[(layer, "ks_rel")] > 3
    # training moved every matrix: dW is never zero
    assert (df[(df.weights == "dW") & (df.metric == "std")].value > 0).all()
    # the table of one step is gaussianity_table of that checkpoint
    ckpts = list_checkpoints(cfg, tmp_path)
    step = steps[len(steps) // 2]
    direct = G.gaussianity_table(ckpts.load(step)[0], ckpts.load(0)[0], step)
    pd.testing.assert_frame_equal(df[df.step == step].reset_index(drop=True), direct)
    curves = G.distance_curves(df, "ks_rel", by="layer")  # one run, as notebook 06 has it: no run columns
    assert set(curves.layer) == {"embed/unembed", "L0", "L1", "L2", "L3"} and (curves.n == 1).all()
    with pytest.raises(ValueError, match="run columns"):
        G.distance_curves(df, by="scheme")
    claims = G.claims(tidy(df, cfg))
    slope = claims[claims.metric == "depth_slope"]
    assert (slope.n_layers == 4).all() and set(slope.verdict) == {"one seed"}
