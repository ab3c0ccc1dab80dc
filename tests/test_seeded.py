"""The `seeded` scheme: a trained donor embedded so that the student computes its function."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings

import pytest
import torch

import initmi_utils.donor as donor_module
import initmi_utils.train as train_module
from initmi_utils.train import StaleRun, train
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.donor import choose_donor, donor_metrics, train_donor
from initmi_utils.config import ConfigError, ModelConfig, RunPaths, experiment
from initmi_utils.data import load_dataset
from initmi_utils.model import Transformer, flops_per_token
from initmi_utils.schemes import SCHEMES, build_model, init_weights
from initmi_utils.seeded import (
    DONOR,
    SEED_NOISE_STD,
    SEED_WRITE_STD,
    STEP0_LOGIT_TOLERANCE,
    DonorConfig,
    DonorWarning,
    DonorMissing,
    donor_choice,
    donor_choice_path,
    donor_compute,
    donor_experiment,
    donor_seeds,
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

    with pytest.warns(DonorWarning, match="no classic induction circuit"):  # 20 steps cannot teach induction
        donor = train_donor(cfg, root)
    # none emerges, so every candidate is tried, each once
    assert [c.run.seed for c in trainings] == donor_seeds(0) == [0, 101, 102, 103]
    assert all(c.model == DONOR.model_config(cfg.model) for c in trainings)
    with pytest.warns(DonorWarning):
        student = build_model(cfg, root)
    batch = load_dataset(cfg, root).val
    with torch.no_grad():
        assert _rel_rms(student(batch.tokens), donor(batch.tokens)) < STEP0_LOGIT_TOLERANCE

    with pytest.warns(DonorWarning):
        train_donor(cfg, root)  # cached: not trained again
        again = build_model(cfg, root)
    assert len(trainings) == DONOR.max_tries
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
    # each candidate is a run of its own seed; the choice sits next to them, apart from the study
    other = donor_experiment(cfg, DONOR, donor_seed=101)
    assert other.run.seed == 101 and other.model == dcfg.model and other.train == dcfg.train
    assert RunPaths.of(other, root).checkpoints == donor_dir.with_name("seed101")
    assert donor_choice_path(cfg, root) == donor_dir.with_name("choice-seed0.json")


# ---------------------------------------------------------------------------------------------
# The donor policy: candidate donor seeds until one learns induction, and the recorded choice.


def test_donor_seeds_start_with_the_student_seed_and_never_overlap_across_students():
    assert donor_seeds(0) == [0, 101, 102, 103]
    assert donor_seeds(1) == [1, 201, 202, 203]
    assert donor_seeds(4, DonorConfig(max_tries=1)) == [4]  # the donor each seed had before the policy
    longest = DonorConfig(max_tries=100)
    seqs = [donor_seeds(k, longest) for k in range(100)]
    assert all(len(set(q)) == 100 for q in seqs)
    for a, b in itertools.combinations(seqs, 2):
        assert not set(a) & set(b)
    assert len(set().union(*seqs)) == 100 * 100
    for bad in (-1, 100):
        with pytest.raises(ConfigError, match="disjoint"):
            donor_seeds(bad)
    for tries in (0, 101):
        with pytest.raises(ConfigError, match="max_tries"):
            DonorConfig(max_tries=tries).model_config(SMOKE)
    assert DonorConfig(max_tries=2).name(SMOKE) == DONOR.name(SMOKE)  # candidates' runs are shared


OFFSET_ONLY = 101  # in the policy fixture, the second candidate reaches the accuracy by another mechanism
EMERGES = 102  # and the third "learns classic induction"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The policy run with fake outcomes: candidate 0 fails (its real accuracy after 20 steps);
    candidate 101 reaches accuracy 0.9 but its mechanism is ``long_offset_recall``, so it does not
    qualify; candidate 102 reaches 0.9 with ``classic_induction`` and is chosen."""
    root = tmp_path_factory.mktemp("policy_root")
    cfg = experiment("smoke", "seeded", 0).replace(train={"steps": 20, "threads": 1})
    trainings, outcomes = [], []
    real_outcome, real_build = donor_module.donor_outcome, train_module.build_model

    def outcome(dcfg, root):
        out = real_outcome(dcfg, root)
        if dcfg.run.seed in (OFFSET_ONLY, EMERGES):
            out.update(final_accuracy=0.9, emerged=True, emerged_at=10)
        outcomes.append(out)
        return out

    labels = {OFFSET_ONLY: "long_offset_recall", EMERGES: "classic_induction"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(donor_module, "donor_outcome", outcome)
        mp.setattr(donor_module, "final_mechanism", lambda dcfg, root: labels.get(dcfg.run.seed, "none"))
        mp.setattr(train_module, "build_model", lambda c, r: trainings.append(c) or real_build(c, r))
        with warnings.catch_warnings():
            warnings.simplefilter("error", DonorWarning)  # a donor emerged: no warning
            choice = choose_donor(cfg, root)
    return cfg, root, choice, trainings, outcomes


def test_the_policy_stops_at_the_first_donor_that_emerges_and_records_its_choice(policy):
    cfg, root, choice, trainings, outcomes = policy
    assert [c.run.seed for c in trainings] == [0, OFFSET_ONLY, EMERGES]  # candidate 103 never trained
    path = donor_choice_path(cfg, root)
    assert path == root / "checkpoints" / "smoke" / "_donors" / DONOR.name(cfg.model) / "xavier" / "choice-seed0.json"
    recorded = json.loads(path.read_text())
    assert recorded == choice == donor_choice(cfg, root)
    assert recorded["chosen_seed"] == EMERGES and recorded["emerged"] is True and recorded["student_seed"] == 0
    assert recorded["max_tries"] == DONOR.max_tries and recorded["emergence_threshold"] == 0.8
    assert recorded["criterion"] == "classic_induction"
    assert [c["seed"] for c in recorded["candidates"]] == [0, OFFSET_ONLY, EMERGES]
    first, offset_only, third = recorded["candidates"]
    assert first["final_step"] == 20 and first["emerged"] is False and first["final_accuracy"] < 0.8
    assert not first["qualifies"]
    # Accuracy without the classic mechanism does not qualify: the policy went on.
    assert offset_only["emerged"] and offset_only["mechanism"] == "long_offset_recall" and not offset_only["qualifies"]
    assert third == {"seed": EMERGES, "final_step": 20, "emerged_at": 10, "final_accuracy": 0.9, "emerged": True,
                     "mechanism": "classic_induction", "qualifies": True}
    assert first == outcomes[0]
    assert not list(path.parent.glob(".*.tmp"))  # written atomically
    # Recorded: asking again trains nothing and reads the file, not the (now real) outcomes.
    n = len(trainings)
    assert choose_donor(cfg, root) == choice and len(trainings) == n


def test_load_donor_loads_the_chosen_seed_and_reports_its_compute(policy):
    cfg, root, choice, _, _ = policy
    with warnings.catch_warnings():
        warnings.simplefilter("error", DonorWarning)
        loaded = load_donor(cfg, root)
        metrics = donor_metrics(cfg, root)
    chosen = list_checkpoints(donor_experiment(cfg, DONOR, EMERGES), root)
    first = list_checkpoints(donor_experiment(cfg, DONOR, 0), root)
    want, other = chosen.load(chosen.steps[-1])[0], first.load(first.steps[-1])[0]
    assert all(torch.equal(x, y) for x, y in zip(loaded.state_dict().values(), want.state_dict().values()))
    assert not torch.equal(loaded.blocks[0].attn.W_Q, other.blocks[0].attn.W_Q)
    assert metrics.step.max() == 20  # the chosen donor's metrics
    # The seeded student embeds the chosen donor.
    student = build_model(cfg, root)
    batch = load_dataset(cfg, root).val
    with torch.no_grad():
        assert _rel_rms(student(batch.tokens), want(batch.tokens)) < STEP0_LOGIT_TOLERANCE

    compute = donor_compute(cfg, root)
    dcfg = donor_experiment(cfg, DONOR, EMERGES)
    per_step = flops_per_token(dcfg.model, cfg.data.seq_len) * cfg.train.batch_size * cfg.data.seq_len
    assert compute == {"donor_seed": EMERGES, "steps": 20, "flops": 20 * per_step, "total_steps": 60,
                       "total_flops": 60 * per_step, "flops_per_step": per_step}


def test_a_missing_choice_is_an_error_naming_the_command(policy, tmp_path):
    cfg, root, _, _, _ = policy
    command = r"python -m initmi_utils\.donor --preset smoke --seed 0 --root "
    with pytest.raises(DonorMissing, match=command):
        donor_choice(cfg, tmp_path)
    with pytest.raises(DonorMissing, match=command):
        donor_compute(cfg, tmp_path)
    # The candidates are trained but no choice was recorded under another max_tries.
    with pytest.raises(DonorMissing, match=r"choice-seed0-tries2\.json missing.*" + command):
        load_donor(cfg, root, DonorConfig(max_tries=2))
    # A choice whose max_tries differs from the config asking is stale.
    stale = donor_choice_path(cfg, root, DonorConfig(max_tries=2))
    stale.write_text(donor_choice_path(cfg, root).read_text())  # says max_tries 4
    try:
        with pytest.raises(DonorMissing, match="max_tries=4, not 2"):
            load_donor(cfg, root, DonorConfig(max_tries=2))
    finally:
        stale.unlink()


def test_the_cli_prints_the_candidates_and_the_choice(policy, monkeypatch, capsys):
    cfg, root, _, _, _ = policy
    monkeypatch.setattr(donor_module, "experiment", lambda preset, scheme, seed: cfg)  # the fixture's 20 steps
    assert donor_module.main(["--preset", "smoke", "--seed", "0", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("  seed 0: step 20, accuracy ") and lines[1].endswith("not emerged, mechanism none")
    assert lines[2] == f"  seed {OFFSET_ONLY}: step 20, accuracy 0.900, emerged at step 10, mechanism long_offset_recall"
    assert lines[3] == f"  seed {EMERGES}: step 20, accuracy 0.900, emerged at step 10, mechanism classic_induction"
    assert lines[-1].startswith(f"chosen: donor xavier-s{EMERGES} (seeds tried 0, {OFFSET_ONLY}, {EMERGES}): step 20, ")
    assert "DonorWarning" not in lines[-1]


@pytest.mark.filterwarnings("ignore::initmi_utils.seeded.DonorWarning")
def test_when_no_donor_emerges_the_best_is_chosen_with_a_warning_naming_the_seeds(run):
    cfg, root = run
    train_donor(cfg, root)  # 20 steps: no candidate emerges
    choice = donor_choice(cfg, root)
    accuracy = [c["final_accuracy"] for c in choice["candidates"]]
    assert [c["seed"] for c in choice["candidates"]] == [0, 101, 102, 103] and not choice["emerged"]
    assert choice["chosen_seed"] == choice["candidates"][accuracy.index(max(accuracy))]["seed"]
    with pytest.warns(DonorWarning, match=r"donor seeds 0 \(.*\), 101 \(.*\), 102 \(.*\), 103 \(.*\)"):
        choose_donor(cfg, root)
    with pytest.warns(DonorWarning, match=f"the best, seed {choice['chosen_seed']}, has no classic induction circuit"):
        load_donor(cfg, root)
    assert donor_compute(cfg, root)["total_steps"] == 4 * 20


def test_a_choice_made_by_an_older_policy_is_not_served(policy, tmp_path):
    cfg, root, _, _, _ = policy
    path = donor_choice_path(cfg, root)
    kept = path.read_text()
    old = json.loads(kept)
    del old["criterion"]  # accuracy only
    try:
        path.write_text(json.dumps(old))
        with pytest.raises(DonorMissing, match="older policy.*accuracy only.*classic_induction"):
            donor_choice(cfg, root)
    finally:
        path.write_text(kept)


def test_a_seeded_run_trained_from_a_donor_no_longer_chosen_is_stale(policy):
    cfg, root, _, _, _ = policy
    student = cfg.replace(train={"steps": 10})
    train(student, root, progress=False)
    path = donor_choice_path(cfg, root)
    kept = path.read_text()
    try:
        path.write_text(json.dumps({**json.loads(kept), "chosen_seed": OFFSET_ONLY}))  # another donor now
        with pytest.raises(StaleRun, match="inputs"):
            train(student, root, progress=False)
        retrained = train(student, root, progress=False, stale="retrain")
        done = json.loads((RunPaths.of(student, root).checkpoints / "done.json").read_text())
        assert done["source"].endswith(f"-s{OFFSET_ONLY}@" + done["source"].split("@")[-1])
        assert not retrained.empty
    finally:
        path.write_text(kept)
    # Back on the recorded choice, the run is stale again (it was retrained from the other donor).
    with pytest.raises(StaleRun):
        train(student, root, progress=False)
