"""Bring your own scheme: a user's file registers schemes that run through the whole study."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from initmi_utils.config import ConfigError, experiment
from initmi_utils.model import Transformer
from initmi_utils.schemes import SCHEMES, init_weights, load_scheme_module, load_scheme_modules
from initmi_utils.train import training_source

# The README's example, as written there (a test below checks that the two agree).
EXAMPLE = '''\
import torch
from initmi_utils.schemes import init_weights, register_scheme

FACTOR = 0.5


@register_scheme("small_wo", "normal, with every W_O scaled by FACTOR")
def small_wo(model, cfg, generator, root):
    init_weights(model, "normal", generator.initial_seed(), cfg, root)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_O.mul_(FACTOR)
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_schemes.py"
    path.write_text(EXAMPLE)
    yield path
    for name in [n for n, s in SCHEMES.items() if s.source]:
        del SCHEMES[name]


def test_a_users_file_registers_a_scheme_and_reloading_an_edit_replaces_it(user_file):
    assert load_scheme_module(user_file) == ["small_wo"]
    cfg = experiment("smoke", "small_wo", 0)
    model = init_weights(Transformer(cfg.model), "small_wo", 0, cfg)
    normal = init_weights(Transformer(cfg.model), "normal", 0, cfg)
    assert torch.allclose(model.blocks[0].attn.W_O, 0.5 * normal.blocks[0].attn.W_O)
    assert torch.equal(model.blocks[0].attn.W_Q, normal.blocks[0].attn.W_Q)
    first = training_source("small_wo")
    assert first.startswith(training_source("normal") + "+")  # the file's hash is part of its runs' source
    user_file.write_text(EXAMPLE.replace("FACTOR = 0.5", "FACTOR = 0.25"))  # a warm kernel reloads the edit
    assert load_scheme_modules(str(user_file)) == ["small_wo"]
    model = init_weights(Transformer(cfg.model), "small_wo", 0, cfg)
    assert torch.allclose(model.blocks[0].attn.W_O, 0.25 * normal.blocks[0].attn.W_O)
    assert training_source("small_wo") != first and training_source("normal") == first.split("+")[0]


def test_bad_scheme_modules_are_one_clear_error_naming_the_file(tmp_path, user_file):
    with pytest.raises(ConfigError, match="nope.py does not exist"):
        load_scheme_module(tmp_path / "nope.py")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half written')\n")
    with pytest.raises(ConfigError, match=r"broken.py raised RuntimeError on import: half written"):
        load_scheme_module(broken)
    clash = tmp_path / "clash.py"
    clash.write_text("from initmi_utils.schemes import register_scheme\n"
                     "register_scheme('xavier', 'mine')(lambda model, cfg, g, root: None)\n")
    with pytest.raises(ConfigError, match=r"'xavier' from .*clash.py clashes with 'xavier' from initmi_utils"):
        load_scheme_module(clash)
    assert SCHEMES["xavier"].source == ""  # the built-in is untouched
    unset = tmp_path / "unset.py"
    unset.write_text("from initmi_utils.schemes import register_scheme\n"
                     "register_scheme('forgetful', 'writes nothing')(lambda model, cfg, g, root: None)\n")
    load_scheme_module(unset)
    with pytest.raises(RuntimeError, match="left parameters uninitialised"):
        init_weights(Transformer(experiment("smoke").model), "forgetful", 0)


def test_the_readme_example_is_this_one():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert EXAMPLE.strip() in readme


@pytest.mark.slow
def test_a_users_scheme_runs_through_the_whole_smoke_grid_into_the_report(tmp_path, user_file):
    out = subprocess.run([sys.executable, "-m", "initmi_utils.pipeline", "--preset", "smoke", "--schemes",
                          "small_wo,normal", "--scheme-module", str(user_file), "--root", str(tmp_path / "root"),
                          "--workers", "2"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "root" / "figures" / "smoke" / "report.html").read_text()
    assert "small_wo" in report
    status = pd.read_csv(tmp_path / "root" / "data" / "compare" / "smoke" / "status.csv")
    assert set(status[status.scheme == "small_wo"].status) == {"ok"}
    # Editing the file reruns its runs and no others.
    user_file.write_text(EXAMPLE.replace("FACTOR = 0.5", "FACTOR = 0.3"))
    again = subprocess.run([sys.executable, "-m", "initmi_utils.pipeline", "--preset", "smoke", "--schemes",
                            "small_wo,normal", "--scheme-module", str(user_file), "--root", str(tmp_path / "root"),
                            "--workers", "2", "--notebooks", "01"], capture_output=True, text=True, timeout=900)
    assert again.returncode != 0 and "other training code" in again.stderr + again.stdout  # refused, not served
    retrain = subprocess.run([sys.executable, "-m", "initmi_utils.pipeline", "--preset", "smoke", "--schemes",
                              "small_wo,normal", "--scheme-module", str(user_file), "--root", str(tmp_path / "root"),
                              "--workers", "2", "--notebooks", "01", "--param", "stale=retrain"],
                             capture_output=True, text=True, timeout=900)
    assert retrain.returncode == 0, retrain.stdout[-3000:] + retrain.stderr[-3000:]
    lines = retrain.stdout.splitlines()
    assert any("ok" in line and "01_train.ipynb small_wo" in line for line in lines)  # its run retrained
    assert not any("01_train.ipynb normal" in line for line in lines)  # no other: skipped, not logged
    assert "1 ok, 1 skipped, 0 failed" in retrain.stdout
