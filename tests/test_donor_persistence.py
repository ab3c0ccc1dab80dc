"""Persistence scores, checked on distributions, features and models whose answer is known."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from initmi_utils.config import experiment
from initmi_utils.data import Dataset
from initmi_utils.model import Transformer, to_bridge
from initmi_utils.donor_persistence import (
    ablation_scores,
    activations,
    induction_loss,
    js_similarity,
    linear_cka,
    persistence_scores,
    persistence_table,
    seeded_slots,
)
from initmi_utils.schemes import init_weights
from initmi_utils.donor import donor_metrics
from initmi_utils.seeded import DONOR, DonorMissing, embed_donor
from initmi_utils.train import train

CFG = experiment("smoke", "normal", 0)


@pytest.fixture(scope="module")
def rep():
    return Dataset(CFG, Dataset.generate(CFG)).rep


@pytest.fixture(scope="module")
def donor():
    """A donor with sharp attention (xavier weights x 3): far from any fresh model's behaviour."""
    model = init_weights(Transformer(DONOR.model_config(CFG.model)), "xavier", 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(3.0)
    return model


# ---------------------------------------------------------------------------------------------
# The scores on hand-made inputs.


def test_js_similarity_of_known_distributions():
    one_hot = torch.eye(4)
    assert torch.allclose(js_similarity(one_hot, one_hot), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(js_similarity(one_hot[0], one_hot[1]), torch.zeros((), dtype=torch.float64))
    # uniform over n keys versus one key: JSD = (log2(2n/(n+1)) + (n-1)/n + log2(2/(n+1))/n) / 2
    n = 8
    jsd = (math.log2(2 * n / (n + 1)) + (n - 1) / n + math.log2(2 / (n + 1)) / n) / 2
    assert js_similarity(torch.full((n,), 1 / n), torch.eye(n)[3]).item() == pytest.approx(1 - jsd)
    # masked (zero) keys contribute nothing: padding with zeros changes nothing
    p, q = torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.4])
    assert js_similarity(p, q).item() == pytest.approx(js_similarity(torch.cat([p, torch.zeros(3)]),
                                                                    torch.cat([q, torch.zeros(3)])).item())


def test_linear_cka_invariances_and_a_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert linear_cka(x, 3.0 * x @ rotation + 1.0) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(500, 6, generator=g)) < 0.1
    # a and b centred, orthogonal, equal norms: CKA([a], [a, b]) = n^2 / (n * sqrt(2) n) = 1/sqrt(2)
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    b = torch.tensor([1.0, 1.0, -1.0, -1.0])
    assert linear_cka(a[:, None], torch.stack([a, b], 1)) == pytest.approx(1 / math.sqrt(2))


def test_ablation_share_finds_the_only_head_that_writes(rep):
    """All heads but (1, 0) have W_O = 0: ablating them changes nothing, so (1, 0) has share 1;
    its effect equals the loss change from zeroing its W_O in our own model (an independent path)."""
    model = init_weights(Transformer(CFG.model), "xavier", 0)
    with torch.no_grad():
        for l, block in enumerate(model.blocks):
            for h in range(CFG.model.n_heads):
                if (l, h) != (1, 0):
                    block.attn.W_O[h] = 0.0
    metric = partial(induction_loss, batch=rep)
    df = ablation_scores(to_bridge(model), rep)
    share = df[df.metric == "ablation_share"].set_index(["layer", "head"]).value
    assert share[(1, 0)] == pytest.approx(1.0)
    assert share.drop((1, 0)).abs().max() < 1e-6
    effect = df[(df.metric == "ablation_effect") & (df.layer == 1) & (df["head"] == 0)].value.item()
    with torch.no_grad():
        clean = metric(model(rep.tokens))
        model.blocks[1].attn.W_O[0] = 0.0
        assert effect == pytest.approx(metric(model(rep.tokens)) - clean, abs=1e-5)
    assert abs(effect) > 1e-3


def test_seeded_student_at_step_0_matches_its_donor_and_a_random_model_does_not(rep, donor):
    donor_acts = activations(to_bridge(donor), rep.tokens)
    seeded = Transformer(CFG.model)
    embed_donor(seeded, donor, torch.Generator().manual_seed(0))
    random = init_weights(Transformer(CFG.model), "normal", 0)

    def scores(model):
        df = seeded_slots(persistence_scores(model, donor_acts, rep))
        return df.groupby("metric").value.agg(["min", "max"])

    s, r = scores(seeded), scores(random)
    assert s.loc["pattern_similarity_to_donor", "min"] > 0.999
    assert s.loc["cka_to_donor", "min"] > 0.999
    assert r.loc["pattern_similarity_to_donor", "max"] < 0.7
    assert r.loc["cka_to_donor", "max"] < 0.5
    # the seeded slots carry (nearly) all of the seeded student's ablation effect
    assert s.loc["ablation_share", "min"] > 0.2
    full = persistence_scores(seeded, donor_acts, rep)
    assert full[(full.metric == "ablation_share") & (full["head"] == 0)].value.sum() > 0.99


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::initmi_utils.seeded.DonorWarning")
def test_persistence_table_over_a_trained_seeded_run(tmp_path):
    cfg = experiment("smoke", "seeded", 0).replace(train={"steps": 20, "threads": 1})
    with pytest.raises(DonorMissing, match="python -m initmi_utils.donor"):
        persistence_table(cfg, tmp_path)
    donor_metrics(cfg, tmp_path)
    train(cfg, tmp_path, progress=False)
    table = persistence_table(cfg, tmp_path)
    assert {"pattern_similarity_to_donor", "ablation_share", "cka_to_donor"} <= set(table.metric)
    start = seeded_slots(table[table.step == 0])
    assert start[start.metric != "ablation_share"].value.min() > 0.99
    assert table.step.nunique() > 1
