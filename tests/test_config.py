import dataclasses
from pathlib import Path

import pytest

from initmi_utils.config import (ROOT_ENV, PRESETS, ConfigError, ExperimentConfig, ModelConfig, RunPaths, experiment,
                                 resolve_root)
from initmi_utils.train import build_model  # train registers every built-in scheme, `seeded` too


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dict(name):
    cfg = experiment(name, "xavier", 3)
    again = ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.to_dict()["version"]
    assert again.run.seed == 3 and again.run.scheme == "xavier" and again.run.preset == name


def test_configs_are_frozen():
    cfg = experiment("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 64


def test_d_head_follows_d_model():
    # The grokking Config froze d_vocab = p + 1 at definition time; derived values must follow.
    cfg = experiment("quick").replace(model={"d_model": 64})
    assert cfg.model.d_head == 16
    assert ModelConfig().d_head == 32


def test_default_model_is_the_proposals():
    m = ModelConfig()
    assert (m.n_layers, m.n_heads, m.d_model, m.d_head, m.d_mlp, m.d_vocab, m.n_ctx) == (2, 4, 128, 32, 512, 64, 64)


@pytest.mark.parametrize(
    "sections, fragment",
    [
        ({"model": {"d_model": 130}}, "not divisible"),
        ({"data": {"seq_len": 80}}, "longer than model.n_ctx"),
        ({"model": {"d_vocab": 10}}, "too small for the data"),
        ({"data": {"rep_len": 40}}, "rep_len"),
        ({"train": {"steps": 0}}, "steps"),
        ({"train": {"donor_lr": -1e-3}}, "donor_lr >= 0"),
    ],
)
def test_invalid_configs_say_what_is_wrong(sections, fragment):
    with pytest.raises(ConfigError, match=fragment):
        experiment("quick").replace(**sections)


def test_unknown_fields_and_presets_are_rejected():
    d = experiment("smoke").to_dict()
    d["model"]["d_modle"] = 3
    with pytest.raises(ConfigError, match="d_modle.*valid fields"):
        ExperimentConfig.from_dict(d)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        experiment("huge")
    with pytest.raises(ConfigError, match="scheme name 'Xavier/1' must be lower-case"):
        experiment("smoke", "Xavier/1")  # it names folders


def test_an_unknown_scheme_is_refused_where_weights_are_built_listing_the_registered_ones():
    cfg = experiment("smoke", "xavir")  # the config does not know the registry (a layer above it)
    with pytest.raises(ConfigError, match="unknown init scheme 'xavir'.*normal, xavier.*seeded"):
        build_model(cfg)


def test_the_default_root_is_the_project_whatever_the_working_directory(tmp_path, monkeypatch):
    project = Path(__file__).resolve().parent.parent
    monkeypatch.delenv(ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_root(None) == resolve_root("") == project
    assert RunPaths.of(experiment("smoke"), "").checkpoints.is_relative_to(project / "checkpoints")
    assert resolve_root("elsewhere") == Path("elsewhere")
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "shared"))
    assert resolve_root(None) == tmp_path / "shared"


def test_run_paths_separate_runs(tmp_path):
    a = RunPaths.of(experiment("smoke", "xavier", 0), tmp_path)
    b = RunPaths.of(experiment("smoke", "xavier", 1), tmp_path)
    assert a.checkpoints != b.checkpoints and a.tables != b.tables
    assert a.checkpoints.is_relative_to(tmp_path) and a.notebooks.is_relative_to(a.tables)


def test_data_hash_depends_on_data_only():
    base = experiment("quick", "normal", 0)
    assert base.data_hash == experiment("quick", "kaiming", 4).data_hash
    assert base.data_hash != base.replace(data={"seed": 1}).data_hash
