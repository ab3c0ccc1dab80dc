"""Ablation, patching and localisation point at the heads the hand-built model uses.

Each assertion names the exact set of heads that must carry the effect, so a metric that pointed
at a wrong head (or at every head) fails.
"""

import math

import pandas as pd
import pytest
import torch

from initmi_utils.ablation import (
    ablation_effects,
    heldout_ablation,
    localisation,
    localisation_table,
    patching_effects,
    mechanism_paths,
    path_ablation_effects,
    subset_pairs,
)
from initmi_utils.data import Batch
from initmi_utils.handbuilt import handbuilt_dataset, handbuilt_experiment, induction_model
from initmi_utils.model import to_bridge


@pytest.fixture(scope="module")
def built():
    model, roles = induction_model()
    ds = handbuilt_dataset(handbuilt_experiment(rep_len=6, n_diagnostic=16))
    bridge = to_bridge(model)
    ablation = ablation_effects(bridge, ds.rep)
    patching = patching_effects(bridge, subset_pairs(ds.patch, 8), ds.d.rep_len)
    return roles, ds, ablation, patching


def _per_head(df, metric, **where):
    sub = df[df.metric == metric]
    for col, v in where.items():
        sub = sub[sub[col] == v]
    return {(int(r.layer), int(r["head"])): r.value for _, r in sub.iterrows()}


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_ablating_the_circuit_destroys_induction_and_dummies_do_not(built, kind):
    roles, _, ablation, _ = built
    acc = _per_head(ablation, f"{kind}_ablation_acc_delta")
    assert len(acc) == 8
    assert {h for h, d in acc.items() if d < -0.5} == {roles.induction, roles.prev_token}
    for head in [*roles.dummy, *roles.bos, roles.duplicate]:
        assert abs(acc[head]) < 0.02
    diff = _per_head(ablation, f"{kind}_ablation_logit_diff_delta")
    assert diff[roles.induction] < -10 and all(abs(diff[h]) < 1 for h in roles.dummy)
    loss = _per_head(ablation, f"{kind}_ablation_loss_delta")
    assert loss[roles.induction] > 1 and all(abs(loss[h]) < 0.1 for h in roles.dummy)


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_ablating_the_prev_token_head_collapses_the_induction_score(built, kind):
    """K-composition evidence: only the (prev-token -> induction) pair shows a large drop."""
    roles, _, ablation, _ = built
    rows = ablation[ablation.metric == f"{kind}_ablation_induction_score_delta"]
    assert set(rows.layer) == {1} and set(rows.ablated_layer) == {0}
    big = {((int(r.ablated_layer), int(r.ablated_head)), (int(r.layer), int(r["head"])))
           for _, r in rows.iterrows() if r.value < -0.5}
    assert big == {(roles.prev_token, roles.induction)}
    assert rows.value.abs().sort_values().iloc[:-1].max() < 0.05


def test_clean_baselines_are_reported(built):
    _, _, ablation, _ = built
    clean = dict(zip(ablation[ablation.metric.str.startswith("clean_")].metric, ablation.value))
    assert clean["clean_acc"] > 0.99 and clean["clean_logit_diff"] > 10 and clean["clean_loss"] < 0.01


def test_patching_the_induction_head_restores_the_clean_answer(built):
    roles, _, _, patching = built
    heads = _per_head(patching, "patch_head_normalised")
    assert heads[roles.induction] == pytest.approx(1.0, abs=0.02)
    assert all(abs(v) < 0.02 for h, v in heads.items() if h != roles.induction)
    ends = dict(zip(patching.metric, patching.value))
    assert ends["patch_clean_logit_diff"] > 10 and ends["patch_corrupted_logit_diff"] < -10


def test_patching_by_position_finds_the_corrupted_token(built):
    """resid_pre at the corrupted token (query - (rep_len - 1)) restores everything, elsewhere nothing."""
    _, ds, _, patching = built
    R = ds.d.rep_len
    pos = patching[patching.metric == "patch_resid_pre_normalised"]
    assert set(pos.layer) == {0, 1} and 0 in set(pos.pos) and -R in set(pos.pos)
    restored = pos[pos.value > 0.5]
    assert set(restored.pos) == {-(R - 1)} and set(restored.layer) == {0, 1}
    assert (pos[pos.pos != -(R - 1)].value.abs() < 0.02).all()
    assert "corrupted" in restored.pos_label.iloc[0]


def test_localisation_concentrates_on_the_built_head(built):
    roles, _, ablation, patching = built
    loc = localisation_table(pd.concat([ablation, patching]), ("patch_head_normalised", "zero_ablation_acc_delta"))
    p = loc[loc.source == "patch_head_normalised"].set_index("metric")
    assert p.loc["localisation_top1_share", "value"] > 0.95
    assert p.loc["localisation_entropy", "value"] < 0.1
    assert (p.top_layer.iloc[0], p.top_head.iloc[0]) == roles.induction
    a = loc[loc.source == "zero_ablation_acc_delta"].set_index("metric")
    assert a.loc["localisation_top1_share", "value"] == pytest.approx(0.5, abs=0.05)  # two heads needed


def test_localisation_index_limits():
    one = torch.zeros(2, 4)
    one[1, 2] = -3.0
    loc = localisation(one)
    assert loc["localisation_top1_share"] == 1.0 and loc["localisation_entropy"] == 0.0
    assert (loc["top_layer"], loc["top_head"]) == (1, 2)
    even = localisation(torch.ones(2, 4))
    assert even["localisation_top1_share"] == pytest.approx(1 / 8)
    assert even["localisation_entropy"] == pytest.approx(math.log(8))
    assert even["localisation_entropy_normalised"] == pytest.approx(1.0)
    assert math.isnan(localisation(torch.zeros(2, 4))["localisation_top1_share"])


def test_untrained_model_gives_nan_not_noise(capsys):
    """A model that cannot tell clean from corrupted has no recovery scale."""
    model, _ = induction_model()
    with torch.no_grad():
        model.unembed.W_U.zero_()  # every logit 0: clean == corrupted
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=4))
    df = patching_effects(to_bridge(model), ds.patch, ds.d.rep_len, positions=True)
    assert df[df.metric == "patch_head_normalised"].value.isna().all()
    out = capsys.readouterr()
    assert "it/s" not in out.err + out.out, "transformer_lens.patching's progress bars reach the notebook"


def test_unknown_ablation_kind_raises():
    model, _ = induction_model()
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=4))
    with pytest.raises(ValueError, match="unknown ablation kind"):
        ablation_effects(to_bridge(model), ds.rep, kinds=("resample",))


def test_batched_ablations_equal_one_forward_per_head():
    """The batched implementation (many ablations per forward) changes nothing but speed."""
    model, _ = induction_model(noise=0.02)
    ds = handbuilt_dataset(handbuilt_experiment(rep_len=6, n_diagnostic=4))
    bridge = to_bridge(model)
    batched = ablation_effects(bridge, ds.rep)
    one_by_one = ablation_effects(bridge, ds.rep, max_batch=4)
    pd.testing.assert_frame_equal(batched, one_by_one, atol=1e-4, rtol=1e-4)


def test_the_previous_token_head_reaches_the_induction_head_through_its_key_only():
    model, roles = induction_model()
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=32))
    df = path_ablation_effects(model, to_bridge(model), ds.rep, roles.induction)
    assert set(df.ablated_layer) == {roles.induction[0]} and set(df.ablated_head) == {roles.induction[1]}
    acc = {c: _per_head(df, f"path_{c}_acc_delta") for c in "qkv"}
    assert acc["k"][roles.prev_token] < -0.5  # the key says "the previous token was A"
    assert abs(acc["q"][roles.prev_token]) < 0.05 and abs(acc["v"][roles.prev_token]) < 0.05
    for c in "qkv":  # no other layer-0 head feeds the induction head
        assert all(abs(v) < 0.05 for h, v in acc[c].items() if h != roles.prev_token), (c, acc[c])
    assert _per_head(df, "path_k_logit_diff_delta")[roles.prev_token] < -1.0


def test_path_ablation_of_a_single_sequence_changes_nothing():
    # With one sequence the mean over the batch is the head's own output: the recomputed q, k and v
    # must then equal the bridge's own, so every delta is 0 (a wrong LayerNorm, weight or bias would
    # not be: the biases and LayerNorm parameters are made non-trivial first).
    model, roles = induction_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.split(".")[-1].startswith("b_"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=32))
    one = type(ds.rep)(*(t[:1] for t in (ds.rep.tokens, ds.rep.target, ds.rep.distractor)))
    df = path_ablation_effects(model, to_bridge(model), one, roles.induction)
    assert len(df) == 4 * 3 * 3 and df.value.abs().max() < 1e-4


def test_path_ablation_refuses_a_head_without_earlier_layers_or_an_unknown_input():
    model, _ = induction_model()
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=8))
    with pytest.raises(ValueError, match="layer 1"):
        path_ablation_effects(model, to_bridge(model), ds.rep, (0, 1))
    with pytest.raises(ValueError, match="unknown input"):
        path_ablation_effects(model, to_bridge(model), ds.rep, (1, 2), inputs=("o",))


def test_mechanism_paths_follow_the_deciding_head_and_are_empty_without_one(tmp_path):
    model, roles = induction_model()
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=32))
    df = mechanism_paths(model, to_bridge(model), ds.val, ds.rep)
    assert set(df.mechanism) == {"classic_induction"}
    assert (int(df.ablated_layer.iloc[0]), int(df.ablated_head.iloc[0])) == roles.induction
    assert _per_head(df, "path_k_acc_delta")[roles.prev_token] < -0.5
    from initmi_utils.config import experiment
    from initmi_utils.data import load_dataset
    from initmi_utils.schemes import build_model

    cfg = experiment("smoke", "normal", 0)
    untrained = build_model(cfg)
    smoke = load_dataset(cfg, tmp_path)
    assert mechanism_paths(untrained, to_bridge(untrained), smoke.val, smoke.rep).empty


def test_per_layer_localisation_under_mean_ablation_ignores_a_head_that_writes_a_constant():
    # The built induction circuit, plus L1H0 turned into a head whose output is the same vector
    # at every position (W_V = 0, b_V one-hot) along a direction the unembedding reads. It
    # carries no information, so mean ablation must not charge it; zero ablation removes the
    # constant, which shifts every logit through the final LayerNorm, and does charge it.
    model, roles = induction_model()
    u = model.unembed.W_U[:, 3].detach()
    with torch.no_grad():
        a = model.blocks[1].attn
        a.W_V[0].zero_()
        a.b_V[0].zero_()
        a.b_V[0, 0] = 1.0
        a.W_O[0].zero_()
        a.W_O[0, 0] = 1.5 * u / u.norm()
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=16))
    table = heldout_ablation(to_bridge(model), ds.val, n_sequences=16)
    loc = table[table.metric == "localisation_top1_share_layer"].set_index(["source", "layer"])
    heldout = loc.loc[("heldout_mean_ablation_logit_diff_delta", roles.induction[0])]
    zero = loc.loc[("heldout_zero_ablation_logit_diff_delta", roles.induction[0])]
    assert heldout.value == pytest.approx(1.0, abs=1e-6) and heldout.top_head == roles.induction[1]
    assert zero.value < 0.95  # zero ablation also charges the constant head
    const = table[(table.layer == 1) & (table["head"] == 0)].set_index("metric").value
    assert abs(const["heldout_mean_ablation_logit_diff_delta"]) < 1e-5
    assert abs(const["heldout_zero_ablation_logit_diff_delta"]) > 0.1


def test_heldout_means_come_from_other_sequences():
    # With the reference equal to the evaluated batch the held-out ablation is today's batch-mean
    # ablation; with other sequences the baseline differs (a sequence's own activation no longer
    # leaks into its baseline).
    model, _ = induction_model(noise=0.02)
    bridge = to_bridge(model)
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=16))
    has = ds.val.target.any(1).nonzero().flatten()
    first = Batch(ds.val.tokens[has[:8]], ds.val.target[has[:8]], ds.val.distractor[has[:8]])
    other = Batch(ds.val.tokens[has[8:16]], ds.val.target[has[8:16]], ds.val.distractor[has[8:16]])
    same = ablation_effects(bridge, first, kinds=("mean",), reference=first).set_index(["layer", "head", "metric"]).value
    batch_mean = ablation_effects(bridge, first, kinds=("mean",)).set_index(["layer", "head", "metric"]).value
    held = ablation_effects(bridge, first, kinds=("mean",), reference=other).set_index(["layer", "head", "metric"]).value
    assert (same - batch_mean).abs().max() < 1e-6
    assert (held - batch_mean).abs().max() > 1e-3


def test_paths_through_the_mlp_equal_direct_paths_when_the_mlp_writes_nothing():
    # The hand-built model with MLPs has all-zero MLP weights: through its MLP, the ablated
    # stream changes nothing more, so the two path measures agree; group rows (head -1) are the
    # whole layer at once, and remove the previous-token signal as the single head does.
    model, roles = induction_model(attn_only=False)
    bridge = to_bridge(model)
    ds = handbuilt_dataset(handbuilt_experiment(attn_only=False, n_diagnostic=32))
    direct = path_ablation_effects(model, bridge, ds.rep, roles.induction, groups=True)
    relayed = path_ablation_effects(model, bridge, ds.rep, roles.induction, groups=True, through_mlp=True)
    assert (direct.value - relayed.value).abs().max() < 1e-5
    k = direct[direct.metric == "path_k_acc_delta"].set_index("head").value
    assert k[-1] < -0.5 and abs(k[-1] - k[roles.prev_token[1]]) < 0.1
    with torch.no_grad():  # an MLP that does write: the relayed path differs from the direct one
        model.blocks[0].mlp.W_in.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        model.blocks[0].mlp.W_out.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    bridge = to_bridge(model)
    direct = path_ablation_effects(model, bridge, ds.rep, roles.induction, groups=True)
    relayed = path_ablation_effects(model, bridge, ds.rep, roles.induction, groups=True, through_mlp=True)
    assert (direct.value - relayed.value).abs().max() > 1e-3
