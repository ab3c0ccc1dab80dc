"""The `seeded` scheme: a trained donor embedded so that the student computes its function."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import initmi_utils.train as train_module
from initmi_utils.donor import train_donor
from initmi_utils.config import ConfigError, ModelConfig, RunPaths, experiment
from initmi_utils.data import load_dataset
from initmi_utils.model import Transformer
from initmi_utils.schemes import SCHEMES, build_model, init_weights
from initmi_utils.seeded import (
    DONOR,
    SEED_NOISE_STD,
    SEED_WRITE_STD,
    STEP0_LOGIT_TOLERANCE,
    DonorConfig,
    DonorWarning,
    DonorMissing,
    donor_experiment,
    embed_donor,
    load_donor,
    to_donor_basis,
)
from initmi_utils.tables import read_table

SMOKE = experiment("smoke", "seeded", 0).model


def _cfg(**model):
    return dataclasses.replace(SMOKE, **model)


def _donor(student: ModelConfig, donor: DonorConfig = DONOR, seed: int = 1, sharpen: float = 3.0) -> Transformer:
    """A random donor with larger-than-init weights, so that its attention is sharp and its
    function far from a fresh model's (a stricter test of the embedding than a near-uniform one)."""
    model = init_weights(Transformer(donor.model_config(student)), "xavier", seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.mul_(sharpen)
            elif name.endswith(".b"):  # LayerNorm biases: nonzero, to test that they are carried too
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    return model


def _tokens(cfg: ModelConfig, n: int = 16) -> torch.Tensor:
    return torch.randint(0, cfg.d_vocab, (n, cfg.n_ctx), generator=torch.Generator().manual_seed(0))


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.std()).item()


@pytest.mark.parametrize(
    "student, donor",
    [
        (SMOKE, DONOR),
        (ModelConfig(), DONOR),  # the study's 2L x 4H x d128 student, 2-head donor d_model 64 (2 copies)
        (ModelConfig(), DonorConfig(n_heads=1)),  # a 1-head donor, d_model 32 (4 copies)
        (_cfg(n_layers=3), DONOR),  # a deeper student: its third block starts as (almost) nothing
        (ModelConfig(n_heads=4, d_model=64), DonorConfig(n_heads=2)),  # a 2-head donor
        (_cfg(attn_only=True), DONOR),
    ],
    ids=["smoke", "default", "one-head-donor", "deeper-student", "two-head-donor", "attn-only"],
)
def test_without_noise_the_student_computes_the_donors_logits(student, donor):
    d = _donor(student, donor)
    s = Transformer(student)
    embed_donor(s, d, torch.Generator().manual_seed(0), noise_std=0.0, write_std=0.0)
    with torch.no_grad():
        s_logits, d_logits = s(_tokens(student)), d(_tokens(student))
    assert torch.allclose(s_logits, d_logits, atol=1e-4 * d_logits.abs().max().item())
    # ... and its seeded head slots attend exactly like the donor's heads.
    patterns_s, patterns_d = [], []
    with torch.no_grad():
        s(_tokens(student), patterns_s), d(_tokens(student), patterns_d)
    for ps, pd_ in zip(patterns_s, patterns_d):
        assert torch.allclose(ps[:, : d.cfg.n_heads], pd_, atol=1e-4)


def test_with_default_noise_the_logits_agree_within_the_documented_tolerance():
    student = ModelConfig()
    d = _donor(student)
    s = Transformer(student)
    embed_donor(s, d, torch.Generator().manual_seed(0))  # SEED_NOISE_STD, SEED_WRITE_STD
    with torch.no_grad():
        err = _rel_rms(s(_tokens(student)), d(_tokens(student)))
    assert err < STEP0_LOGIT_TOLERANCE
    # The bound is tight enough to matter: full-size noise on the writers breaks it.
    loud = Transformer(student)
    embed_donor(loud, d, torch.Generator().manual_seed(0), write_std=30 * SEED_WRITE_STD)
    with torch.no_grad():
        assert _rel_rms(loud(_tokens(student)), d(_tokens(student))) > STEP0_LOGIT_TOLERANCE


def test_random_parts_stay_out_of_the_donor_subspace_and_depend_on_the_generator():
    student = ModelConfig()
    d = _donor(student)
    a, b, c = Transformer(student), Transformer(student), Transformer(student)
    for m, seed in ((a, 0), (b, 0), (c, 1)):
        embed_donor(m, d, torch.Generator().manual_seed(seed))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.blocks[0].attn.W_Q[-1], c.blocks[0].attn.W_Q[-1])
    d_donor = d.cfg.d_model
    # The other heads' writers are random but have no component in the donor subspace ...
    other = d.cfg.n_heads
    W_O = a.blocks[0].attn.W_O[other:]
    assert W_O.std() > 0.5 * SEED_WRITE_STD
    assert to_donor_basis(W_O, d_donor).abs().max() < 1e-6
    # ... while their readers see the whole residual at the normal scheme's scale.
    assert 0.8 < a.blocks[0].attn.W_Q[other].std().item() / SEED_NOISE_STD < 1.2


def test_donor_config_derives_from_the_student_and_rejects_what_cannot_embed():
    # half the student's heads (at least one) and so half its width; d_head kept
    for student, heads in ((SMOKE, 1), (ModelConfig(), 2), (_cfg(n_heads=1, d_model=16), 1)):
        m = DONOR.model_config(student)
        assert (m.n_heads, m.d_head, m.n_layers) == (heads, student.d_head, 2)
        assert m.d_model == heads * student.d_head and m.d_mlp == 4 * m.d_model
    with pytest.raises(ConfigError, match="not a multiple"):
        DonorConfig(n_heads=3).model_config(ModelConfig())  # 3 * 32 does not divide 128
    with pytest.raises(ConfigError, match="n_layers"):
        DonorConfig(n_layers=3).model_config(SMOKE)
    with pytest.raises(ConfigError, match="d_mlp"):
        DonorConfig(mlp_ratio=8).model_config(SMOKE)
    with pytest.raises(ConfigError, match="train_steps"):
        DonorConfig(train_steps=0).model_config(SMOKE)
    with pytest.raises(ConfigError, match="cannot itself be seeded"):
        DonorConfig(scheme="seeded").model_config(SMOKE)
    with pytest.raises(ConfigError, match="ExperimentConfig"):
        init_weights(Transformer(SMOKE), "seeded", 0, cfg=None)


# ---------------------------------------------------------------------------------------------
# Through the pipeline: a real donor trained into a temporary root.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded_root")
    cfg = experiment("smoke", "seeded", 0).replace(train={"steps": 20, "threads": 1})
    return cfg, root


def test_a_missing_donor_is_an_error_naming_the_command_that_trains_it(tmp_path):
    cfg = experiment("smoke", "seeded", 0)
    with pytest.raises(DonorMissing, match=r"python -m initmi_utils\.donor --preset smoke --seed 0 --root "):
        build_model(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # the scheme loads; it never trains


def test_seeded_student_matches_its_trained_donor_and_the_donor_is_trained_once(run, monkeypatch):
    cfg, root = run
    trainings = []
    real_build = train_module.build_model
    monkeypatch.setattr(train_module, "build_model", lambda c, r: trainings.append(c) or real_build(c, r))

    with pytest.warns(DonorWarning, match="no induction circuit"):  # 20 steps cannot teach induction
        donor = train_donor(cfg, root)
    assert len(trainings) == 1 and trainings[0].model == DONOR.model_config(cfg.model)
    with pytest.warns(DonorWarning):
        student = build_model(cfg, root)
    batch = load_dataset(cfg, root).val
    with torch.no_grad():
        assert _rel_rms(student(batch.tokens), donor(batch.tokens)) < STEP0_LOGIT_TOLERANCE

    with pytest.warns(DonorWarning):
        train_donor(cfg, root)  # cached: not trained again
        again = build_model(cfg, root)
    assert len(trainings) == 1
    assert all(torch.equal(x, y) for x, y in zip(student.state_dict().values(), again.state_dict().values()))
    with pytest.warns(DonorWarning):
        loaded = load_donor(cfg, root)
    assert all(torch.equal(x, y) for x, y in zip(donor.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.filterwarnings("ignore::initmi_utils.seeded.DonorWarning")
def test_the_donor_run_lives_apart_from_the_study_runs(run):
    cfg, root = run
    train_donor(cfg, root)
    dcfg = donor_experiment(cfg)
    donor_dir = RunPaths.of(dcfg, root).checkpoints
    assert (donor_dir / "done.json").exists()
    assert donor_dir.is_relative_to(root / "checkpoints" / "smoke" / "_donors")
    for scheme in SCHEMES:
        assert RunPaths.of(experiment("smoke", scheme, 0), root).checkpoints != donor_dir
    assert read_table("smoke", "metrics", root).empty  # the donor's metrics are not a study run's
    longer = donor_experiment(cfg, DonorConfig(train_steps=50))
    assert longer.train.steps == 50 and RunPaths.of(longer, root).checkpoints != donor_dir
