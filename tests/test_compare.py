"""07_compare: statistics on synthetic data with known answers, and the RQ assembly on a
synthetic study whose emergence steps, head roles and missing runs are planted by hand
(``tests/test_stats.py`` checks the statistics themselves: coverage, scipy cross-checks)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from initmi_utils import compare as C
from initmi_utils import rq1 as rq1_module
from initmi_utils.behavior import EMERGENCE_DEFINITIONS
from initmi_utils.behavior import emergence_table as behavior_emergence_table
from initmi_utils import inference as I
from initmi_utils import rq1 as R1
from initmi_utils import rq2 as R2
from initmi_utils.study import final_values
from initmi_utils import stats as S
from initmi_utils import study as ST
from initmi_utils.config import PRESET_SEEDS, PRESETS, experiment
from initmi_utils.findings import findings
from initmi_utils.geometry import linear_cka
from initmi_utils.schemes import SCHEMES
from initmi_utils.tables import write_table

# ---------------------------------------------------------------------------------------------
# A synthetic study (preset "full": 5 seeds per scheme) with planted answers.

PRESET = "full"
HORIZON = PRESETS[PRESET].train.steps  # >= 4000; planted steps below stay inside it
EVAL_STEPS = list(range(0, HORIZON + 1, 250))
CKPT_STEPS = [0, 500, 1000, 2000, 3000, HORIZON]
# Emergence of the k-th registered scheme, seed s: 1000 + 500 k + 250 s (multiples of the eval
# interval; past the horizon = never), except the NEVER scheme, whose accuracy saturates at 0.3.
NEVER = "scaled_residual"


def planted_emergence(scheme: str, seed: int) -> float:
    if scheme == NEVER:
        return math.nan
    return 1000 + 500 * list(SCHEMES).index(scheme) + 250 * seed


def _metrics(scheme: str, seed: int, last_step: int = HORIZON) -> pd.DataFrame:
    te = planted_emergence(scheme, seed)
    rows = []
    for t in [s for s in EVAL_STEPS if s <= last_step]:
        acc = 0.3 * min(1.0, t / 1000) if math.isnan(te) else (0.95 if t >= te else 0.5 * t / te)
        loss = 4.0 - 1.0 * min(1.0, t / 1000) - (1.0 if not math.isnan(te) and t >= te else 0.0)
        loss += 0.01 * seed
        for metric, value in [("val_loss", loss), ("train_loss", loss + 0.05), ("val_acc_induction", acc), ("val_acc_induction_unambiguous", acc),
                              ("rep_acc_induction", acc), ("val_logit_diff", 5 * acc), ("induction_score", acc)]:
            rows.append(dict(step=t, metric=metric, value=value))
    return pd.DataFrame(rows)


LADDER = {"val_loss": (3.5, 2.5, 2.2, 1.9), "val_loss_induction": (3.0, 1.0)}


def _ladder(scheme: str, seed: int, last_step: int = HORIZON) -> pd.DataFrame:
    """The loss ladder as training writes it, at the analysed checkpoints: val loss falls from 4 to
    the 3.0x plateau by step 1000 (3.5 is crossed on the way, at step 500, *before* anything
    emerges), and to 2.0x at emergence (2.5 and 2.2 reached then, 1.9 never); the induction loss
    falls from 4 to 0.5 at emergence."""
    te = planted_emergence(scheme, seed)
    rows = []
    for which, levels in LADDER.items():
        for level in levels:
            step = -1
            for t in [s for s in CKPT_STEPS if s <= last_step]:  # ladder steps are analysed checkpoints
                emerged = not math.isnan(te) and t >= te
                loss = (4.0 - min(1.0, t / 1000) - (1.0 if emerged else 0.0) + 0.01 * seed if which == "val_loss"
                        else (0.5 if emerged else 4.0))
                if loss <= level and (step < 0 or t < step):
                    step, value = int(t), loss
            rows.append(dict(step=step, metric=f"ladder_{which}", level=level,
                             value=value if step >= 0 else math.nan, tolerance=level - value if step >= 0 else math.nan))
    return pd.DataFrame(rows)


def _attention(scheme: str, seed: int) -> pd.DataFrame:
    """L0: head (seed % 4) is a previous-token head; L1: head ((seed + 1) % 4) becomes an induction
    head after emergence. Head indices move with the seed so that only a permutation-invariant
    comparison finds the runs alike."""
    te = planted_emergence(scheme, seed)
    rows = []
    for t in CKPT_STEPS:
        for layer in range(2):
            for head in range(4):
                prev = 0.9 if (layer == 0 and head == seed % 4 and t > 0) else 0.05
                ind = 0.8 if (layer == 1 and head == (seed + 1) % 4 and not math.isnan(te) and t >= te) else 0.02
                for metric, v in [("prev_token_score", prev), ("induction_score", ind), ("duplicate_score", 0.01),
                                  ("bos_score", 0.1), ("attn_entropy", 1.0 + 0.1 * head)]:
                    rows.append(dict(step=t, layer=layer, head=head, metric=metric, value=v))
    return pd.DataFrame(rows)


def _ablation(scheme: str, seed: int) -> pd.DataFrame:
    te = planted_emergence(scheme, seed)
    rows = []
    for t in CKPT_STEPS:
        learned = not math.isnan(te) and t >= te
        effects = np.full((2, 4), 0.01)
        if learned:
            effects[0, seed % 4], effects[1, (seed + 1) % 4] = 0.8, 1.2
        for layer in range(2):
            for head in range(4):
                rows.append(dict(step=t, layer=layer, head=head, metric="zero_ablation_loss_delta",
                                 value=effects[layer, head]))
        a = np.abs(effects).ravel() / np.abs(effects).sum()
        rows.append(dict(step=t, metric="localisation_top1_share", value=a.max()))
        rows.append(dict(step=t, metric="localisation_entropy", value=float(-(a * np.log(a)).sum())))
    return pd.DataFrame(rows)


def _geometry(scheme: str, seed: int) -> pd.DataFrame:
    """Early resid_norm planted to predict emergence (norm = emergence / 1000 at step 500)."""
    te = planted_emergence(scheme, seed)
    e = HORIZON if math.isnan(te) or te > HORIZON else te  # the restricted emergence step
    rows = []
    for t in CKPT_STEPS:
        for layer in range(2):
            rows.append(dict(step=t, layer=layer, metric="resid_norm", value=e / 1000 + t / 4000 + layer))
        for matrix in ("W_Q", "W_OV"):
            rows.append(dict(step=t, layer=0, head=0, metric="effective_rank", matrix=matrix, value=10 - t / 1000))
            rows.append(dict(step=t, layer=0, head=-1, metric="drift", matrix=matrix, value=t / 4000))
    return pd.DataFrame(rows)


RECALL = ("seeded", (1, 2, 3))  # planted long-offset recall runs (as in the quick grid)
SHIFTED = ("mimetic", (1,))  # a planted shifted-induction run, once it has emerged (as scaled_residual-s1 in full)


def planted_mechanism(scheme: str, seed: int, step: int) -> str:
    if scheme == RECALL[0] and seed in RECALL[1]:
        return "long_offset_recall"
    te = planted_emergence(scheme, seed)
    if math.isnan(te) or step < te:
        return "none"
    return "shifted_induction" if scheme == SHIFTED[0] and seed in SHIFTED[1] else "classic_induction"


def _evidence(scheme: str, seed: int) -> pd.DataFrame:
    """The final checkpoint's label and causal check (``ablation.evidence_rows``): the planted
    mechanism, and every label passes except the classic runs of seed 4, planted to fail the path
    part (a distributed previous-token signal)."""
    m = planted_mechanism(scheme, seed, HORIZON)
    fails = m == "classic_induction" and seed == 4
    return pd.DataFrame([dict(step=HORIZON, layer=1 if m != "none" else -1, head=(seed + 1) % 4 if m != "none" else -1,
                              metric="causal_ok", value=0.0 if fails else 1.0, label=m, attention_label=m, accuracy=0.9,
                              ablation_drop=0.8, top_drop=0.8, path_drop_q=0.0, path_drop_k=0.05 if fails else 0.6,
                              path_drop_v=0.0, ablation_ok=1.0, path_ok=0.0 if fails else 1.0)])


def _offsets(scheme: str, seed: int) -> pd.DataFrame:
    """The per-head summary rows of ``offsets.offset_table``: the planted mechanism's head is L1H
    ((seed + 1) % 4); every other head attends nowhere near the copy."""
    rows = []
    for t in CKPT_STEPS:
        m = planted_mechanism(scheme, seed, t)
        for head in range(4):
            mine = head == (seed + 1) % 4
            plus1 = 0.85 if (mine and m == "classic_induction") else 0.02
            plus2 = 0.8 if (mine and m == "shifted_induction") else 0.02
            comp = 0.55 if (mine and m in ("long_offset_recall", "shifted_induction")) else 0.05
            for metric, v in [("copy_offset_plus1", plus1), ("copy_offset_plus2", plus2),
                              ("copy_offset_near_max", max(plus1, plus2)), ("composed_copy_mass", comp)]:
                rows.append(dict(step=t, layer=1, head=head, metric=metric, value=v, source_layer=0, source_head=seed % 4))
    return pd.DataFrame(rows)


def _behavior(scheme: str, seed: int) -> pd.DataFrame:
    """Accuracy on short / long copies: classic copies at both, recall only at long, none at neither."""
    acc = {"classic_induction": (0.9, 0.92), "shifted_induction": (0.88, 0.95), "long_offset_recall": (0.05, 0.9),
           "none": (0.02, 0.02)}
    rows = []
    for t in CKPT_STEPS:
        short, long = acc[planted_mechanism(scheme, seed, t)]
        rows += [dict(step=t, metric="val_acc_induction_short", value=short + 0.01 * seed),
                 dict(step=t, metric="val_acc_induction_long", value=long)]
    return pd.DataFrame(rows)


def _paths(scheme: str, seed: int) -> pd.DataFrame:
    """Notebook 04's ``paths`` rows at the final step: classic runs lose accuracy through K of
    layer-0 head ``seed % 4``, recall and shifted runs through its K and V; no rows without a
    copying head (as ``ablation.mechanism_paths``)."""
    m = planted_mechanism(scheme, seed, HORIZON)
    if m == "none":
        return pd.DataFrame(columns=["step", "layer", "head", "metric", "value"])
    rows = []
    for head in range(4):
        for c in "qkv":
            hit = head == seed % 4 and (c == "k" or (c == "v" and m != "classic_induction"))
            rows.append(dict(step=HORIZON, layer=0, head=head, metric=f"path_{c}_acc_delta", value=-0.8 if hit else -0.01,
                             ablated_layer=1, ablated_head=(seed + 1) % 4, mechanism=m))
    return pd.DataFrame(rows)


def make_synthetic_study(root: Path, drop: tuple[str, int] = ("kaiming", 4), truncate: tuple[str, int] = ("xavier", 3),
                         with_geometry: bool = True, seeds: tuple[int, ...] = PRESET_SEEDS[PRESET]) -> Path:
    """Write metrics/attention/ablation/offsets/behavior(/geometry) tables for the runs of PRESET under ``root``
    (``seeds`` only: the others are then missing), leaving ``drop`` out entirely and stopping
    ``truncate``'s training at step 2000."""
    for scheme in SCHEMES:
        for seed in seeds:
            if (scheme, seed) == drop:
                continue
            cfg = experiment(PRESET, scheme, seed)
            last = 2000 if (scheme, seed) == truncate else HORIZON
            write_table(_metrics(scheme, seed, last), cfg, "metrics", root)
            write_table(_ladder(scheme, seed, last), cfg, "ladder", root)
            write_table(_attention(scheme, seed), cfg, "attention", root)
            write_table(_ablation(scheme, seed), cfg, "ablation", root)
            write_table(_offsets(scheme, seed), cfg, "offsets", root)
            write_table(_paths(scheme, seed), cfg, "paths", root)
            write_table(_evidence(scheme, seed), cfg, "evidence", root)
            write_table(_behavior(scheme, seed), cfg, "behavior", root)
            if with_geometry:
                write_table(_geometry(scheme, seed), cfg, "geometry", root)
    return root


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    return make_synthetic_study(tmp_path_factory.mktemp("study"))


# ---------------------------------------------------------------------------------------------
# Statistics with known answers.


def test_t_interval_covers_known_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    mean, lo, hi = S.t_interval(rng.normal(3.0, 1.0, 50))
    assert lo < 3.0 < hi and lo < mean < hi
    covered = 0
    for i in range(200):
        _, lo, hi = S.t_interval(rng.normal(3.0, 1.0, 30))
        covered += lo <= 3.0 <= hi
    assert 0.86 <= covered / 200 <= 0.99  # t-interval, n = 30: close to 95% (n = 5: tests/test_stats.py)
    assert math.isnan(S.t_interval([2.0])[1])  # one seed: no interval, not a zero-width one
    assert S.t_interval([1.0, np.nan, 3.0])[0] == 2.0


def test_permutation_test_exact_value_real_difference_and_null():
    # 3 v 3 fully separated: exact two-sided p = 2 / C(6, 3) = 0.1
    assert S.permutation_test([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert S.p_floor(3, 3) == pytest.approx(0.1) and S.p_floor(5, 5) == pytest.approx(2 / 252)
    rng = np.random.default_rng(0)
    assert S.permutation_test(rng.normal(0, 1, 8), rng.normal(3, 1, 8)) < 0.01  # exact (12870 > n_perm: MC)
    assert S.permutation_test(rng.normal(0, 1, 5), rng.normal(3, 1, 5)) <= 2 / 252 + 1e-12
    null = [S.permutation_test(rng.normal(0, 1, 6), rng.normal(0, 1, 6), n_perm=2000, seed=i) for i in range(150)]
    assert 0.0 <= np.mean(np.array(null) < 0.05) <= 0.12  # size ~ 5% under the null
    assert S.permutation_test([1.0, 1.0], [1.0, 1.0]) == 1.0


def test_holm_on_known_pvalues():
    got = S.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(got, [0.03, 0.06, 0.06, 0.02])
    got = S.holm([0.5, np.nan, 0.01])
    assert math.isnan(got[1]) and got[0] == pytest.approx(0.5) and got[2] == pytest.approx(0.02)


def test_pairwise_tests_find_the_planted_difference_only():
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"scheme": ["a"] * 6 + ["b"] * 6 + ["c"] * 6,
                       "value": np.r_[rng.normal(0, 0.1, 6), rng.normal(0, 0.1, 6), rng.normal(5, 0.1, 6)]})
    t = I.pairwise_tests(df).set_index(["a", "b"])
    assert t.loc[("a", "c"), "p_holm"] < 0.05 and t.loc[("b", "c"), "p_holm"] < 0.05
    assert t.loc[("a", "b"), "p_holm"] > 0.05
    assert (t.p_holm >= t.p - 1e-12).all()
    assert I.floor_note(I.pairwise_tests(df)) is None  # 6 v 6: floor 2/924 x 3 pairs < 0.05
    few = df.groupby("scheme").head(2)  # 2 v 2: floor 1/3
    assert "cannot" in I.floor_note(I.pairwise_tests(few)) or "no pairwise" in I.floor_note(I.pairwise_tests(few))
    # The same data as a reference family (a against b and c; no seeded scheme: one family).
    ref = I.reference_tests(df, reference="a", omnibus_p=I.omnibus_test(df)["p"]).set_index("a")
    assert list(ref.index) == ["b", "c"] and set(ref.family) == {"base"} and set(ref.b) == {"a"}
    assert ref.loc["c", "declared"] and not ref.loc["b", "declared"]


def test_spearman_pooled_and_within_scheme():
    x = np.arange(10.0)
    rho, p, n = S.spearman_permutation(x, x ** 3, n_perm=2000)
    assert rho == pytest.approx(1.0) and p < 0.01 and n == 10
    # Between schemes: higher x goes with higher y; within each scheme the reverse.
    strata = np.repeat([0, 1, 2], 4)
    xs = np.r_[[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]].astype(float)
    ys = np.r_[[3, 2, 1, 0], [13, 12, 11, 10], [23, 22, 21, 20]].astype(float)
    assert S.spearman_permutation(xs, ys, n_perm=500)[0] > 0.5
    rho_w, p_w, _ = S.spearman_permutation(xs, ys, strata=strata, n_perm=2000)
    assert rho_w == pytest.approx(-1.0) and p_w < 0.05


def test_linear_cka_invariances_and_known_value():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 16, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(X, 3.0 * X @ Q + 1.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    assert linear_cka(X, torch.randn(500, 16, generator=g)) < 0.1  # unrelated
    x, y = torch.randn(1000, 1, generator=g), torch.randn(1000, 1, generator=g)
    y = 0.6 * x + 0.8 * y
    r = np.corrcoef(x[:, 0], y[:, 0])[0, 1]
    assert linear_cka(x, y) == pytest.approx(r ** 2, rel=1e-6)  # 1-D: squared correlation
    assert linear_cka(X, X[:, :8]) == pytest.approx(linear_cka(X[:, :8], X))


def _hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012)'s unbiased HSIC estimator, written on Gram matrices as published."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return float((np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3)))


def test_debiased_cka_is_the_unbiased_hsic_ratio_and_scores_unrelated_probes_near_zero():
    g = torch.Generator().manual_seed(1)
    # fewer inputs than dimensions, as on a stored probe: the plug-in CKA of unrelated features is large
    biased, debiased = [], []
    for _ in range(20):
        x, y = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
        biased.append(linear_cka(x, y))
        debiased.append(linear_cka(x, y, debiased=True))
    assert np.mean(biased) > 0.7
    assert abs(np.mean(debiased)) < 0.02 and np.std(debiased) < 0.05
    # the same inputs related: still 1 under rotation, scale and shift; a known mix lands in between
    X = torch.randn(64, 256, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    assert linear_cka(X, 2.0 * X @ Q - 1.0, debiased=True) == pytest.approx(1.0, abs=1e-9)
    # against the Gram-matrix form of the estimator, on centred features
    x, y = torch.randn(40, 30, generator=g).double(), torch.randn(40, 20, generator=g).double()
    y[:, :5] += 2 * x[:, :5]
    xc, yc = (x - x.mean(0)).numpy(), (y - y.mean(0)).numpy()
    K, L = xc @ xc.T, yc @ yc.T
    want = _hsic_unbiased(K, L) / math.sqrt(_hsic_unbiased(K, K) * _hsic_unbiased(L, L))
    assert linear_cka(x, y, debiased=True) == pytest.approx(want, rel=1e-9)
    assert 0.2 < want < 0.9
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], y[:3], debiased=True)


# ---------------------------------------------------------------------------------------------
# Emergence, matching, roles on planted data.


def test_emergence_and_survival_count_never_emerged_runs():
    m = pd.concat([_metrics(s, k).assign(run=f"{s}-s{k}", scheme=s, seed=k) for s in ("normal", NEVER) for k in range(3)])
    em = R1.emergence(m, 0.8, HORIZON)
    for r in em.itertuples():
        planted = planted_emergence(r.scheme, r.seed)
        assert (math.isnan(r.emergence_step) and math.isnan(planted)) or r.emergence_step == planted
    assert (em[em.scheme == NEVER].restricted == HORIZON).all() and not em[em.scheme == NEVER].emerged.any()
    surv = R1.survival_curves(em, HORIZON, ["normal", NEVER])
    end = surv[surv.step == HORIZON].set_index("scheme")
    assert end.loc["normal", "fraction_emerged"] == 1.0 and end.loc[NEVER, "fraction_emerged"] == 0.0
    assert end.loc[NEVER, "n"] == 3 and end.loc[NEVER, "n_never"] == 3
    mid = surv[(surv.scheme == "normal") & (surv.step == 1250)].fraction_emerged.item()
    assert mid == pytest.approx(2 / 3)  # seeds 0, 1 emerged at 1000, 1250; seed 2 at 1500
    summ = R1.emergence_summary(em, ["normal", NEVER]).set_index("scheme")
    assert summ.loc["normal", "restricted_mean"] == pytest.approx(1250) and summ.loc[NEVER, "median"] == np.inf
    # Median with its order-statistic interval: [min, max] of 3 seeds, level 1 - 2 * 0.5^3 = 0.75.
    assert (summ.loc["normal", "median"], summ.loc["normal", "median_low"], summ.loc["normal", "median_high"]) == \
        (1250, 1000, 1500)
    assert summ.loc["normal", "median_level"] == pytest.approx(0.75)
    assert summ.loc[NEVER, "median_high"] == np.inf  # "not reached"
    assert summ.loc["normal", "restricted_low"] < 1250 < summ.loc["normal", "restricted_high"]  # t-interval


def test_step_and_loss_matching():
    m = pd.concat([_metrics(s, k).assign(run=f"{s}-s{k}", scheme=s, seed=k) for s in ("normal", NEVER) for k in range(2)])
    cands = pd.DataFrame([(r, s) for r in m.run.unique() for s in CKPT_STEPS], columns=["run", "step"])
    sm, step = R2.step_matched(cands, m)
    assert step == HORIZON and (sm.step == HORIZON).all()


def test_head_roles_and_permutation_invariant_distances():
    att = pd.concat([_attention("normal", k).assign(run=f"normal-s{k}", scheme="normal", seed=k) for k in (0, 1)])
    roles = R2.head_roles(att[att.step == HORIZON], threshold=0.4)
    r0 = roles[roles.run == "normal-s0"].set_index(["layer", "head"]).role
    assert r0[(0, 0)] == "prev_token" and r0[(1, 1)] == "induction" and r0[(0, 1)] == "other"
    r1 = roles[roles.run == "normal-s1"]
    assert r1.set_index(["layer", "head"]).role[(1, 2)] == "induction"
    # Seeds 0 and 1 put the same heads at different indices: same mechanism up to relabelling.
    assert R2.role_disagreement(roles[roles.run == "normal-s0"], r1) == 0.0
    abl = pd.concat([_ablation("normal", k).assign(run=f"normal-s{k}", scheme="normal", seed=k) for k in (0, 1)])
    prof = R2.ablation_profiles(abl[abl.step == HORIZON], "zero_ablation_loss_delta")
    assert R2.profile_distance(prof["normal-s0"], prof["normal-s1"]) == pytest.approx(0.0, abs=1e-12)
    # An unlearned run differs in both.
    never = _attention(NEVER, 0).assign(run="x", scheme=NEVER, seed=0)
    rn = R2.head_roles(never[never.step == HORIZON])
    assert R2.role_disagreement(roles[roles.run == "normal-s0"], rn) == pytest.approx(1 / 8)
    pn = R2.ablation_profiles(_ablation(NEVER, 0).assign(run="x", scheme=NEVER, seed=0).query(f"step == {HORIZON}"),
                             "zero_ablation_loss_delta")["x"]
    assert R2.profile_distance(prof["normal-s0"], pn) > 0.3


# ---------------------------------------------------------------------------------------------
# The study: run status, degradation, report.


def test_run_status_names_missing_incomplete_and_failed_runs(study_root: Path):
    nb = study_root / "data" / "runs" / PRESET / "orthogonal" / "seed2" / "notebooks"
    nb.mkdir(parents=True, exist_ok=True)
    (nb / "04_ablation_patching.ipynb").write_text("{}")  # executed copy, no success stamp
    (nb / "02_behavior.ipynb").write_text("{}")
    (nb / "02_behavior.ok.json").write_text("{}")
    study = C.load_study(PRESET, study_root)
    st = study.status.set_index("run")
    assert st.loc["kaiming-s4", "status"] == "missing"
    assert st.loc["xavier-s3", "status"] == "incomplete" and f"2000 of {HORIZON}" in st.loc["xavier-s3", "detail"]
    assert st.loc["orthogonal-s2", "status"] == "failed notebook"
    assert "04_ablation_patching" in st.loc["orthogonal-s2", "detail"] and "02_behavior" not in st.loc["orthogonal-s2", "detail"]
    assert st.loc["normal-s0", "status"] == "ok"
    assert (st[st.scheme == NEVER].status == "ok").all()  # no paths rows (no copying head) is not a missing table
    assert len(st) == len(SCHEMES) * len(PRESET_SEEDS[PRESET])
    assert "xavier-s3" not in set(study.table("metrics").run)  # incomplete runs stay out of the statistics


def test_the_grid_seeds_set_what_is_expected_and_extra(study_root: Path):
    # A grid run with --seeds 0,1 expects 2 seeds per scheme; runs of seeds 2-4 on disk are extra, yet used.
    study = C.load_study(PRESET, study_root, seeds=[0, 1])
    st = study.status.set_index("run")
    assert study.seeds == (0, 1)
    assert set(st[st.expected].seed) == {0, 1} and len(st[st.expected]) == len(SCHEMES) * 2
    assert st.loc["normal-s3", "expected"] == False and "extra run" in st.loc["normal-s3", "detail"]  # noqa: E712
    assert "normal-s3" in set(study.table("metrics").run)
    texts = " ".join(str(b.content) for b in C.overview(study).section.blocks if b.kind == "text")
    assert "2 seeds [0, 1]" in texts and f"{len(SCHEMES) * 2} runs" in texts
    # Without seeds, the preset's own.
    assert C.load_study(PRESET, study_root).seeds == tuple(PRESET_SEEDS[PRESET])


def test_compare_on_synthetic_study_answers_rq1_to_3(study_root: Path):
    study = C.load_study(PRESET, study_root)
    r1 = C.rq1(study, 0.8, n_boot=500, n_perm=500)
    em = r1.tables["emergence"].set_index("run")
    assert em.loc["normal-s2", "emergence_step"] == planted_emergence("normal", 2)
    summ = r1.tables["emergence_summary"].set_index("scheme")
    assert summ.loc["kaiming", "n"] == 4 and summ.loc["xavier", "n"] == 4  # named, not averaged silently
    assert summ.loc[NEVER, "emerged"] == 0
    pairs = r1.tables["emergence_tests_all_pairs"].set_index(["a", "b"])
    # Seeded runs start from a trained donor whose steps are not counted: out of the emergence tests.
    assert len(pairs) == 15 and "seeded" not in set(pairs.index.get_level_values(0)) | set(pairs.index.get_level_values(1))
    assert pairs.loc[("normal", NEVER), "p"] < 0.05  # planted: NEVER never emerges
    # Omnibus across schemes, then the reference family: NEVER (and the late orthogonal, mimetic) vs normal.
    assert r1.tables["emergence_omnibus"].significant.item()
    tests = r1.tables["emergence_tests"].set_index("a")
    assert set(tests.b) == {"normal"} and list(tests[tests.family == "base"].index) == \
        ["xavier", "kaiming", "orthogonal", NEVER, "mimetic"] and (tests.family == "seeded").sum() == 0
    # Every definition of emergence is shown; the planted study's accuracies agree, so no order swaps.
    assert set(r1.tables["emergence_definitions"].definition) == set(EMERGENCE_DEFINITIONS)
    assert r1.tables["emergence_ordering_swaps"].empty
    assert tests.loc[NEVER, "p"] == pytest.approx(2 / 252) and tests.loc[NEVER, "p_holm"] <= 0.05
    assert tests.loc[NEVER, "declared"] and tests.loc["orthogonal", "declared"]
    assert not tests.loc["xavier", "declared"]  # planted 500 steps later, overlapping seeds: not declared
    texts = " ".join(str(b.caption) + str(b.content) for b in r1.section.blocks if b.kind in ("table", "text"))
    assert "order-statistic interval" in texts and "t-interval" in texts and "log-rank" in texts
    r2 = C.rq2(study, role_threshold=0.4, similar_loss_eps=0.05, cka=False, n_perm=300)
    pairs = r2.tables["step_similar_loss_pairs"]
    assert len(pairs) and (pairs.loss_gap < 0.05).all()
    same = pairs[pairs.run_a.str.startswith("normal") & pairs.run_b.str.startswith("normal")]
    assert (same.ablation_distance.abs() < 1e-9).all()  # relabelled heads, same mechanism
    roles = r2.tables["step_roles"]
    assert set(roles[(roles.scheme == NEVER) & (roles.layer == 1)].role) == {"other"}
    # The copying mechanism at the matched step (HORIZON): planted labels, counts, short vs long accuracy.
    labels = r2.tables["step_mechanism_labels"].set_index("run")
    for run, r in labels.iterrows():
        assert r.mechanism == planted_mechanism(r.scheme, r.seed, HORIZON), run
    assert labels.loc["seeded-s1", "head"] == "L1H2 via L0H1" and labels.loc["normal-s0", "head"] == "L1H1"
    counts = r2.tables["step_mechanism_counts"].set_index("scheme")
    assert counts.loc["seeded", "long_offset_recall"] == "3/5" and counts.loc["seeded", "classic_induction"] == "2/5"
    assert counts.loc[NEVER, "none"] == "5/5" and counts.loc["kaiming", "n"] == 4
    assert counts.loc["mimetic", "shifted_induction"] == "1/5" and counts.loc["mimetic", "classic_induction"] == "4/5"
    paths = r2.tables["step_mechanism_paths"].set_index("run")
    assert NEVER not in set(paths.scheme)  # no copying head, no paths
    assert paths.loc["normal-s2", "K Δacc"] == -0.8 and paths.loc["normal-s2", "K via"] == "L0H2"
    assert paths.loc["normal-s2", "V Δacc"] == -0.01 and paths.loc["normal-s2", "head"] == "L1H3"
    assert paths.loc["seeded-s1", "V Δacc"] == -0.8 and paths.loc["mimetic-s1", "mechanism"] == "shifted_induction"
    acc = r2.tables["step_copy_distance_accuracy"].set_index(["metric", "scheme"])
    short = acc.loc[("val_acc_induction_short", "seeded")]
    assert short["mean"] == pytest.approx((0.9 + 0.05 * 3 + 0.9 + 0.01 * (0 + 1 + 2 + 3 + 4)) / 5)
    assert short.n == 5 and short.ci_low < short["mean"] < short.ci_high
    gap = acc.loc[("val_acc_induction_long_minus_short", "normal")]
    assert abs(gap["mean"]) < 0.05 and acc.loc[("val_acc_induction_long_minus_short", "seeded"), "mean"] > 0.3
    texts = " ".join(str(b.content) for b in r2.section.blocks if b.kind == "text")
    assert R2.MECHANISM_SENTENCE in texts
    omni = r2.tables["step_mechanism_omnibus"]
    assert (omni.test == "Kruskal–Wallis").all() and len(r2.tables["step_mechanism_tests"]) == 6 * len(omni)
    head = C.headline(study, r1, r2).tables["headline"].set_index("scheme")
    assert head.loc["seeded", "copying mechanism (step-matched)"].startswith("classic induction 2 · shifted induction 0 · long-offset recall 3")
    assert head.loc["mimetic", "copying mechanism (step-matched)"].startswith("classic induction 4 · shifted induction 1 ·")
    r3 = C.rq3(study, r1.tables["emergence"], early_fraction=500 / HORIZON, n_perm=500)
    corr = r3.tables["early_correlation"].set_index("feature")
    assert corr.loc["resid_norm L0", "rho"] == pytest.approx(1.0) and corr.loc["resid_norm L0", "p"] < 0.01
    assert corr.loc["resid_norm L0", "step"] == 500


def test_report_degrades_gracefully_and_names_missing(tmp_path: Path):
    make_synthetic_study(tmp_path, with_geometry=False, seeds=(0, 1), truncate=("xavier", 1))
    results, written = C.run_compare(PRESET, tmp_path, n_boot=200, n_perm=200, cka=True, static=False)
    html = written["report"].read_text(encoding="utf-8")
    assert "kaiming-s4" in html and "normal-s2" in html and "xavier-s1" in html  # missing, missing, incomplete
    assert "Table &#x27;geometry&#x27; was not found" in html or "Table 'geometry' was not found" in html
    assert (tmp_path / "figures" / PRESET / "07_rq1_curves.html").exists()
    assert "checkpoint" in html.lower()  # CKA cells left empty, with the reason
    assert "long-offset recall, where a layer-0 head" in html and "long_offset_recall" in html
    # 2 seeds per scheme: no reference family can reach α, so a sentence replaces each table.
    assert "is not shown: with seeds per scheme normal 2" in html and "no test in it can be significant" in html
    assert "t-interval" in html and "How to read the statistics" in html


def _final_loss_study(root: Path, shift: dict[str, float], rng_seed: int = 14) -> Path:
    """Metrics only: every run of PRESET ends at val loss N(2, 0.1²), + 0.1 × ``shift[scheme]``
    (a shift in standard deviations). One fixed draw, the same for the null and the shifted study;
    how often the procedure declares something over many draws is checked in tests/test_stats.py
    (null: ≤ 5% of studies; a 3 sd shift: ≈ 77%, the chance that 5 v 5 seeds separate fully)."""
    rng = np.random.default_rng(rng_seed)
    for scheme in SCHEMES:
        for seed in PRESET_SEEDS[PRESET]:
            final = rng.normal(2.0, 0.1) + 0.1 * shift.get(scheme, 0.0)
            rows = pd.DataFrame([dict(step=0, metric="val_loss", value=4.0),
                                 dict(step=HORIZON, metric="val_loss", value=final)])
            write_table(rows, experiment(PRESET, scheme, seed), "metrics", root)
    return root


def test_a_null_study_declares_nothing(tmp_path: Path):
    r1 = C.rq1(C.load_study(PRESET, _final_loss_study(tmp_path, {})), n_perm=2000)
    omni = r1.tables["final_omnibus"].set_index("metric").loc["val_loss"]
    tests = r1.tables["final_tests"]
    assert not omni.significant and omni.p > 0.05 and not tests.declared.any()
    assert len(tests) == len(SCHEMES) - 1 and len(r1.tables["final_tests_all_pairs"]) == 21


def test_a_planted_three_sd_shift_is_declared(tmp_path: Path):
    r1 = C.rq1(C.load_study(PRESET, _final_loss_study(tmp_path, {"orthogonal": 3.0})), n_perm=2000)
    omni = r1.tables["final_omnibus"].set_index("metric").loc["val_loss"]
    tests = r1.tables["final_tests"].set_index("a")
    assert omni.significant and omni.test == "Kruskal–Wallis"
    assert tests.loc["orthogonal", "declared"] and tests.loc["orthogonal", "p_holm"] <= 0.05
    assert tests.declared.sum() == 1  # only the planted one
    # 5 seeds per scheme: the base family can reach α, so its table (not a sentence) is in the report.
    captions = [b.caption for b in r1.section.blocks if b.kind == "table"]
    assert any("each scheme against the reference normal" in c for c in captions)
    assert not any("is not shown" in str(b.content) for b in r1.section.blocks if b.kind == "note")


@pytest.mark.slow
def test_probe_cka_between_runs_without_checkpoints(tmp_path: Path):
    """Two real (untrained) runs: the probe is kept at the ladder's steps and the last one; a run
    is CKA 1 with itself, less with another init; the comparison reads the stored probes only
    (checkpoints deleted); a step without a probe leaves the value empty and says why. Slow:
    imports TransformerLens."""
    import json as _json
    import shutil

    from initmi_utils.checkpoints import save_checkpoint
    from initmi_utils.config import RunPaths
    from initmi_utils.probes import PROBE_POSITIONS, PROBE_SEQUENCES, ProbeCache, probe_positions, write_probes
    from initmi_utils.schemes import build_model

    for seed in (0, 1):
        cfg = experiment("smoke", "normal", seed)
        folder = RunPaths.of(cfg, tmp_path).checkpoints
        for step in (0, 10, 40):
            save_checkpoint(folder, build_model(cfg, tmp_path), cfg, step, {})
        (folder / "done.json").write_text(_json.dumps({"final_step": 40}))
        write_table(pd.DataFrame([dict(step=10, metric="ladder_val_loss", level=3.3, value=3.2, tolerance=0.1),
                                  dict(step=-1, metric="ladder_val_loss", level=3.2, value=math.nan, tolerance=math.nan)]),
                    cfg, "ladder", tmp_path)
        path = write_probes(cfg, tmp_path)
        shutil.rmtree(folder)
    assert probe_positions(32) == sorted(set(np.round(np.linspace(1, 31, PROBE_POSITIONS)).astype(int).tolist()))
    cache = ProbeCache("smoke", tmp_path)
    x = cache.get("normal", 0, 40)
    assert x.dtype == torch.float16 and x.shape == (PROBE_SEQUENCES * len(probe_positions(32)), 32)
    assert cache.get("normal", 0, 10) is not None  # a ladder step
    assert cache.cka(("normal", 0, 40), ("normal", 0, 40)) == pytest.approx(1.0, abs=1e-6)
    assert cache.cka(("normal", 0, 40), ("normal", 1, 40)) < 0.95  # different random embeddings of the same tokens
    assert math.isnan(cache.cka(("normal", 0, 0), ("normal", 1, 40))) and "normal-s0@0" in cache.errors
    assert math.isnan(cache.cka(("xavier", 0, 40), ("normal", 1, 40))) and "run its notebook 06" in cache.errors["xavier-s0"]
    assert path.stat().st_size < 2 * 64e3 * 2  # two probes of 16 x 16 x 32 float16, plus the header


def test_an_ordering_swap_needs_non_overlapping_intervals_under_both_definitions():
    def summary(rows):
        return pd.DataFrame(rows, columns=["scheme", "median", "median_low", "median_high", "restricted_mean"])

    a = summary([("x", 100, 90, 110, 100), ("y", 500, 450, 550, 500), ("z", 300, 100, 900, 300)])
    b = summary([("x", 600, 590, 610, 600), ("y", 200, 150, 250, 200), ("z", 100, 50, 950, 100)])
    swaps = rq1_module.ordering_swaps({"d1": a, "d2": b})
    assert swaps[["scheme_a", "scheme_b"]].values.tolist() == [["x", "y"]]  # z overlaps everything: noise
    assert rq1_module.ordering_swaps({"d1": a, "d2": a}).empty
    assert rq1_module.scheme_order(a) == ["x", "z", "y"]


def test_the_loss_target_is_never_the_plateau_and_every_emerged_run_is_matched_after_its_emergence(study_root: Path):
    # The old automatic target, the largest per-scheme median final val loss, is the plateau here
    # (NEVER's runs end at 3.0x): it matched emerged runs before their emergence.
    study = C.load_study(PRESET, study_root)
    metrics, ladder = study.table("metrics"), study.table("ladder")
    old = final_values(metrics, "val_loss").groupby("scheme").value.median().max()  # the old automatic rule
    assert old >= 3.0
    em = behavior_emergence_table(metrics, 0.8)
    assert R2.ladder_target(ladder, em, "val_loss") == 2.2  # 3.5 is crossed by all, before anything emerged
    assert R2.ladder_target(ladder, em, "val_loss_induction") == 1.0
    lm = R2.ladder_matched(ladder, metrics, em, 2.2).set_index("run")
    emerged = em[em.emerged].run
    assert lm.loc[emerged, "reached"].all() and lm.loc[emerged, "after_emergence"].all()
    assert not lm.loc[f"{NEVER}-s0", "reached"]  # listed as not reached, never matched on its plateau
    assert (lm.loc[emerged, "tolerance"] >= 0).all()
    r2 = C.rq2(study, n_perm=200, cka=False)
    targets = r2.tables["loss_target"].set_index("view").target
    assert targets["loss"] == 2.2 and targets["induction_loss"] == 1.0
    assert "induction_loss_matched" in r2.tables


def test_the_report_shows_each_label_against_its_causal_check(study_root: Path):
    study = C.load_study(PRESET, study_root)
    r2 = C.rq2(study, n_perm=200, cka=False)
    table = r2.tables["label_agreement"].set_index("label")
    ev = study.table("evidence")
    classic = ev[ev.label == "classic_induction"]
    assert table.loc["classic_induction", "n"] == len(classic)
    assert table.loc["classic_induction", "path_fails"] == (classic.seed == 4).sum() > 0
    assert table.loc["classic_induction", "passes"] == len(classic) - (classic.seed == 4).sum()
    assert "label_agreement_every_checkpoint" not in r2.tables  # one checkpoint per run: one table

    # Evidence at every checkpoint (label validation): the runs' earlier checkpoints, here planted as
    # `partial` failing their check, join the every-checkpoint table and leave the final one as it was.
    earlier = classic.assign(step=classic.step - 1, label="partial", value=0.0, ablation_ok=0.0)
    study.tables["evidence"] = pd.concat([ev, earlier], ignore_index=True)
    r2 = C.rq2(study, n_perm=200, cka=False)
    pd.testing.assert_frame_equal(r2.tables["label_agreement"].set_index("label"), table)
    every = r2.tables["label_agreement_every_checkpoint"].set_index("label")
    assert every.loc["partial", "n"] == every.loc["partial", "fails"] == len(classic) > 0
    assert every.loc["classic_induction", "n"] == len(classic) and every.n.sum() == len(ev) + len(classic)


@pytest.mark.filterwarnings("ignore::initmi_utils.seeded.DonorWarning")
def test_seeded_emergence_is_also_counted_with_its_donors_steps(tmp_path):
    from types import SimpleNamespace

    from initmi_utils.donor import choose_donor
    from initmi_utils.model import flops_per_token
    from initmi_utils.seeded import donor_choice

    cfg = experiment("smoke", "seeded", 0).replace(train={"threads": 1})
    choose_donor(cfg, tmp_path)
    choice = donor_choice(cfg, tmp_path)
    chosen = next(c for c in choice["candidates"] if c["seed"] == choice["chosen_seed"])
    em = pd.DataFrame([dict(run="seeded-s0", scheme="seeded", seed=0, emergence_step=10.0),
                       dict(run="normal-s0", scheme="normal", seed=0, emergence_step=30.0)])
    cm = rq1_module.compute_matched(SimpleNamespace(preset="smoke", root=tmp_path, manifest=None), em)
    assert list(cm.run) == ["seeded-s0"]  # only seeded runs carry a donor
    row = cm.iloc[0]
    assert row.donor_steps == chosen["final_step"] and row.total_steps == chosen["final_step"] + 10
    assert row.total_steps_all_candidates == sum(c["final_step"] for c in choice["candidates"]) + 10
    per_step = flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.batch_size * cfg.data.seq_len
    assert row.student_flops_per_step == per_step and row.total_flops > 10 * per_step
    assert rq1_module.compute_matched(SimpleNamespace(preset="smoke", root=tmp_path / "none", manifest=None), em).empty


# ---------------------------------------------------------------------------------------------
# Runs trained past the horizon (train's extend_to).


def _extended_metrics(seed: int, emerges_at: float, until: int) -> pd.DataFrame:
    """The NEVER scheme's metrics (accuracy 0.3 up to the horizon) trained on to ``until``,
    emerging (accuracy 0.95, loss down by 1) at ``emerges_at`` (nan: never)."""
    base = _metrics(NEVER, seed)
    rows = []
    for t in range(HORIZON + 250, until + 1, 250):
        emerged = emerges_at == emerges_at and t >= emerges_at
        acc, loss = (0.95, 2.0) if emerged else (0.3, 3.0)
        for metric, value in [("val_loss", loss + 0.01 * seed), ("train_loss", loss), ("val_acc_induction", acc),
                              ("val_acc_induction_unambiguous", acc), ("rep_acc_induction", acc),
                              ("val_logit_diff", 5 * acc), ("induction_score", acc)]:
            rows.append(dict(step=t, metric=metric, value=value))
    return pd.concat([base, pd.DataFrame(rows)], ignore_index=True)


def test_extended_runs_count_for_emergence_and_nothing_else(tmp_path):
    root = make_synthetic_study(tmp_path, drop=("none", -1), truncate=("none", -1), with_geometry=False)
    until = 2 * HORIZON
    late = {0: HORIZON + 1000, 1: HORIZON + 1500}  # seeds 2-4 never emerge, even extended
    for seed in range(5):
        write_table(_extended_metrics(seed, late.get(seed, math.nan), until), experiment(PRESET, NEVER, seed),
                    "metrics", root)
    study = C.load_study(PRESET, root)
    assert set(study.extended_runs.run) == {f"{NEVER}-s{k}" for k in range(5)}
    assert study.emergence_horizon == until and study.table("metrics").step.max() == HORIZON
    r1 = C.rq1(study, n_perm=200)
    em = r1.tables["emergence"].set_index("run")
    assert em.loc[f"{NEVER}-s0", "emergence_step"] == HORIZON + 1000
    assert em.loc[f"{NEVER}-s4", "restricted"] == until and not em.loc[f"{NEVER}-s4", "emerged"]
    assert set(em.horizon) == {until}
    summ = r1.tables["emergence_summary"].set_index("scheme")
    assert summ.loc[NEVER, "emerged"] == 2
    # step-matched: the end-of-training values are read at the horizon, before the late emergence
    final = r1.tables["final"].set_index(["metric", "scheme"])
    assert final.loc[("val_acc_induction", NEVER), "mean"] == pytest.approx(0.3)
    ext = r1.tables["extended_runs"].set_index("run")
    assert ext.loc[f"{NEVER}-s1", "emergence_step"] == HORIZON + 1500 and math.isnan(ext.loc[f"{NEVER}-s3", "emergence_step"])
    res = findings(study, r1, C.rq2(study, cka=False, n_perm=200), C.rq3(study, r1.tables["emergence"], n_perm=200))
    text = " ".join(res.tables["findings"].sentence)
    assert f"5 run(s) without induction by step {HORIZON} were trained on to step {until}; 2 of them emerged" in text


def test_a_definition_under_which_an_unfollowed_run_is_censored_is_read_at_the_horizon():
    em = pd.DataFrame(dict(run=["a", "b", "c"], scheme="s", seed=[0, 1, 2], emergence_step=[500.0, math.nan, 7000.0],
                           emerged=[True, False, True], restricted=[500.0, 12000.0, 7000.0],
                           time=[500.0, math.inf, 7000.0]))
    followed = {"a": 6000, "b": 12000, "c": 12000}
    out, h = R1.common_censoring(em, followed, 6000, 12000)
    assert h == 12000 and out.set_index("run").restricted.to_dict() == {"a": 500, "b": 12000, "c": 7000}
    # b was not followed past the horizon (say it emerged under the headline definition only): cut at 6000
    out, h = R1.common_censoring(em, {**followed, "b": 6000}, 6000, 12000)
    assert h == 6000
    c = out.set_index("run")
    assert not c.loc["c", "emerged"] and c.loc["c", "time"] == math.inf and c.loc["c", "restricted"] == 6000
    assert c.loc["a", "emergence_step"] == 500 and c.restricted.max() == 6000
