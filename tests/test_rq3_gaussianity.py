"""The Gaussianity claim's verdicts and sentences, on studies whose answer is planted.

Each planted "scheme" is a set of runs whose W₀ and ΔW are drawn from a known law at the study's
sizes (W_in 128 x 512, W_out 512 x 128, W_U 128 x 512), measured by ``gaussianity.matrix_metrics``
exactly as notebook 06 measures a checkpoint:

- ``gauss``: Gaussian W₀, Gaussian ΔW whose std doubles from layer 0 to layer 1: every part holds
  and the std grows with depth;
- ``uniform_lowrank``: uniform W₀ (as xavier), ΔW a rank-one part (entries are products of two
  Gaussians: kurtosis 6) plus weak noise, std halving with depth: W is not Gaussian at init, ΔW is
  neither Gaussian nor i.i.d., the std shrinks;
- ``student``: Gaussian W₀, ΔW i.i.d. Student-t with 5 degrees of freedom: a law the thresholds
  were not chosen on. i.i.d., so its spectrum is Marchenko-Pastur, but heavy-tailed, so not
  Gaussian: the parts are separate tests, and the verdicts keep them apart.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from initmi_utils import gaussianity as G
from initmi_utils.rq3 import DEPTH_ALL, depth_by_scheme, gaussianity_verdicts

SEEDS = (0, 1, 2, 3, 4)
FAMILIES = {"W_in": (128, 512), "W_out": (512, 128)}  # per layer; W_U (no layer) below
FINAL = 600


def _w0(kind: str, shape, g: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return (torch.rand(shape, generator=g) - 0.5) * 0.1
    return torch.randn(shape, generator=g) * 0.02


def _dw(kind: str, shape, std: float, g: torch.Generator) -> torch.Tensor:
    if kind == "lowrank":
        u, v = torch.randn(shape[0], 1, generator=g), torch.randn(1, shape[1], generator=g)
        return std * (u @ v + 0.1 * torch.randn(shape, generator=g))
    if kind == "student":
        t = torch.distributions.StudentT(5.0).sample(shape)  # global RNG: seeded per run below
        return std * t / np.sqrt(5 / 3)
    return std * torch.randn(shape, generator=g)


PLANTED = {"gauss": ("gauss", "gauss", (0.01, 0.02)), "uniform_lowrank": ("uniform", "lowrank", (0.02, 0.01)),
           "student": ("gauss", "student", (0.01, 0.01))}


def planted_table(schemes=tuple(PLANTED), seeds=SEEDS) -> pd.DataFrame:
    rows = []
    for scheme in schemes:
        w0_kind, dw_kind, stds = PLANTED[scheme]
        for seed in seeds:
            g = torch.Generator().manual_seed(1000 * seed + len(scheme))
            torch.manual_seed(seed)
            matrices = [(name, layer, shape) for layer in (0, 1) for name, shape in FAMILIES.items()]
            matrices.append(("W_U", -1, (128, 512)))
            for name, layer, shape in matrices:
                w0 = _w0(w0_kind, shape, g)
                dw = _dw(dw_kind, shape, stds[max(layer, 0)] if layer >= 0 else 0.01, g)
                for step, weights, x in ((0, "W", w0), (FINAL, "W", w0 + dw), (FINAL, "dW", dw)):
                    for metric, value in G.matrix_metrics(x, name).items():
                        rows.append(dict(run=f"{scheme}-s{seed}", scheme=scheme, seed=seed, preset="planted",
                                         step=step, layer=layer, head=-1, matrix=name, weights=weights,
                                         metric=metric, value=value))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return planted_table()


@pytest.fixture(scope="module")
def verdicts(table) -> pd.DataFrame:
    claims = pd.concat([G.claims(table), depth_by_scheme(table)], ignore_index=True)
    return gaussianity_verdicts(claims).set_index(["part", "scheme", "matrix"]).sort_index().verdict


def test_gaussian_init_and_gaussian_noise_hold_every_part(verdicts):
    for part in ("W_gaussian_init", "W_gaussian", "dW_gaussian", "dW_iid"):
        assert set(verdicts.loc[part, "gauss"]) == {"holds"}, part
    assert verdicts.loc[("dW_std_depth", "gauss", DEPTH_ALL)] == "grows"
    assert set(verdicts.loc["dW_std_depth", "gauss"].drop(DEPTH_ALL)) == {"grows"}


def test_uniform_init_and_a_low_rank_change_fail_the_parts_they_break(verdicts):
    assert set(verdicts.loc["W_gaussian_init", "uniform_lowrank"]) == {"fails"}
    assert set(verdicts.loc["dW_gaussian", "uniform_lowrank"]) == {"fails"}  # product of two Gaussians: kurtosis 6
    assert set(verdicts.loc["dW_iid", "uniform_lowrank"]) == {"fails"}  # a spike above the MP edge
    assert verdicts.loc[("dW_std_depth", "uniform_lowrank", DEPTH_ALL)] == "shrinks"


def test_heavy_tailed_iid_noise_is_iid_but_not_gaussian(verdicts):
    assert set(verdicts.loc["dW_gaussian", "student"]) == {"fails"}
    assert set(verdicts.loc["dW_iid", "student"]) == {"holds"}
    assert verdicts.loc[("dW_std_depth", "student", DEPTH_ALL)] == "no clear trend"


def test_one_seed_decides_on_its_value_and_says_so(table):
    table = table[(table.scheme == "gauss") & (table.seed == 0)]
    claims = pd.concat([G.claims(table), depth_by_scheme(table)], ignore_index=True)
    v = gaussianity_verdicts(claims).set_index(["part", "scheme", "matrix"]).sort_index()
    assert set(v.loc["W_gaussian_init", "gauss"].verdict) == {"holds"}
    assert v.loc[("dW_std_depth", "gauss", DEPTH_ALL), "verdict"] == "one seed"
    assert (v.n == 1).all()
    assert gaussianity_verdicts(claims.iloc[:0]).empty


def test_the_report_sentences_state_each_part_per_scheme(table):
    from types import SimpleNamespace

    from initmi_utils.findings import gaussianity_sentences
    from initmi_utils.report import Section
    from initmi_utils.study import Result

    table = table[table.seed < 3]
    claims = pd.concat([G.claims(table), depth_by_scheme(table)], ignore_index=True)
    r3 = Result(Section("RQ3"))
    r3.tables.update(gaussianity_claims=claims, gaussianity_verdicts=gaussianity_verdicts(claims))
    whole, delta, iid, depth = gaussianity_sentences(SimpleNamespace(schemes=list(PLANTED)), r3)
    assert "at init: gauss 3/3, uniform_lowrank 0/3 (farthest: " in whole
    assert f"(step {FINAL}): gauss 3/3" in whole
    assert "moves from excess kurtosis -1.2 [" in whole  # the uniform init, quoted with its interval
    assert "gauss 3/3, uniform_lowrank 0/3 (farthest: " in delta and "student 0/3" in delta
    assert "gauss 3/3, uniform_lowrank 0/3" in iid and "student 3/3" in iid and "low-rank part" in iid
    assert "grows in 1 of 3 schemes (gauss" in depth and "shrinks in 1 of 3 schemes (uniform_lowrank" in depth
    assert "one comparison per run" in depth
    r3.tables.clear()
    assert gaussianity_sentences(SimpleNamespace(schemes=list(PLANTED)), r3) == [
        "The Gaussianity claim is not tested here (no gaussianity table; notebook 06 writes it)."]
