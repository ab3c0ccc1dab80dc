"""Training: checkpoints, metrics, byte-identical reruns and resumes, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import initmi_utils.train as train_module
from safetensors.torch import load_file

from initmi_utils.checkpoints import CheckpointError, list_checkpoints, load_model, step_path
from initmi_utils.config import RunPaths, experiment
from initmi_utils.data import load_dataset
from initmi_utils.tables import COLUMNS
from initmi_utils.train import (
    LADDERS,
    ExtensionError,
    RunConfigMismatch,
    checkpoint_schedule,
    ladder_losses,
    train,
)
from tests.conftest import tiny_cfg


def ckpt_bytes(cfg, root):
    folder = RunPaths.of(cfg, root).checkpoints
    return {p.name: p.read_bytes() for p in sorted(folder.glob("step_*.safetensors"))}


def test_training_writes_checkpoints_and_a_tidy_table(tmp_path):
    cfg = tiny_cfg("xavier", train={"steps": 60})
    metrics = train(cfg, tmp_path, progress=False)
    assert list(metrics.columns[: len(COLUMNS)]) == COLUMNS
    ckpts = list_checkpoints(cfg, tmp_path)
    assert set(checkpoint_schedule(cfg.train)) <= set(ckpts.steps)
    assert ckpts.steps[0] == 0 and ckpts.steps[-1] == 60
    val = metrics[metrics.metric == "val_loss"].set_index("step").value
    assert val[60] < val[0] - 0.3, "training lowers the validation loss"
    model, meta = ckpts.load(60)
    assert meta["step"] == 60 and meta["config"] == cfg.to_dict() and meta["data_hash"] == cfg.data_hash
    assert meta["metrics"]["val_loss"] == pytest.approx(val[60])
    assert not list(RunPaths.of(cfg, tmp_path).checkpoints.glob("*.tmp")), "no temp files left behind"


def test_same_run_same_bytes_in_another_root(tmp_path):
    cfg = tiny_cfg("orthogonal", seed=2)
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    a, b = ckpt_bytes(cfg, tmp_path / "a"), ckpt_bytes(cfg, tmp_path / "b")
    assert a and a == b
    assert ckpt_bytes(tiny_cfg("orthogonal", seed=3), tmp_path / "a") == {}


def test_stop_after_emergence_ends_the_run_that_many_steps_after_induction(tmp_path, monkeypatch):
    # The evaluation is replaced by a script whose induction accuracy crosses the threshold at step 25:
    # what is tested is the loop's bookkeeping (the donors' early end), not the model.
    cfg = tiny_cfg("xavier", train={"steps": 200, "eval_every": 5, "ckpt_every": 100, "stop_after_emergence": 12})
    real_eval, real_step = train_module.evaluate, train_module.optimizer_step
    steps = []

    def counted(*args, **kwargs):
        steps.append(1)
        return real_step(*args, **kwargs)

    def scripted(model, ds):
        return real_eval(model, ds) | {"val_acc_induction_unambiguous": 0.9 if len(steps) >= 25 else 0.1}

    monkeypatch.setattr(train_module, "optimizer_step", counted)
    monkeypatch.setattr(train_module, "evaluate", scripted)
    metrics = train(cfg, tmp_path, progress=False)
    assert metrics.step.max() == 40  # first evaluation at or after 25 + 12
    done = json.loads((RunPaths.of(cfg, tmp_path).checkpoints / "done.json").read_text())
    assert done["emerged_at"] == 25 and done["final_step"] == 40 and done["checkpoints"][-1] == 40
    assert list_checkpoints(cfg, tmp_path).steps[-1] == 40
    # Without it, every step is trained.
    full = tiny_cfg("xavier", train={"steps": 60, "eval_every": 5})
    steps.clear()
    assert train(full, tmp_path / "full", progress=False).step.max() == 60


def test_checkpoint_bridges_compute_each_checkpoints_model(tmp_path):
    cfg = tiny_cfg("xavier", train={"steps": 30})
    train(cfg, tmp_path, progress=False)
    ckpts = list_checkpoints(cfg, tmp_path)
    tokens = torch.randint(0, cfg.model.d_vocab, (3, cfg.data.seq_len))
    seen = []
    with torch.no_grad():
        for step, model, bridge in ckpts.bridges():
            stored, _ = ckpts.load(step)
            torch.testing.assert_close(bridge(tokens), stored(tokens), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(tokens), stored(tokens))
            seen.append((step, id(bridge)))
    assert [s for s, _ in seen] == list(ckpts.steps) and len({b for _, b in seen}) == 1  # one bridge, refilled
    assert [s for s, _, _ in ckpts.bridges([ckpts.steps[-1]])] == [ckpts.steps[-1]]


def test_a_finished_run_is_not_retrained(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    first = train(cfg, tmp_path, progress=False)
    monkeypatch.setattr(train_module, "build_model", lambda *a: pytest.fail("retrained a finished run"))
    pd.testing.assert_frame_equal(train(cfg, tmp_path, progress=False), first)


def test_interrupted_run_resumes_to_identical_bytes(tmp_path, monkeypatch):
    cfg = tiny_cfg("kaiming", train={"steps": 50, "ckpt_every": 20, "eval_every": 5})
    train(cfg, tmp_path / "straight", progress=False)

    real_evaluate = train_module.evaluate
    calls = {"n": 0}

    def crash_after_a_while(model, ds):
        calls["n"] += 1
        if calls["n"] == 9:  # past the step-20 checkpoint, before the end
            raise KeyboardInterrupt
        return real_evaluate(model, ds)

    monkeypatch.setattr(train_module, "evaluate", crash_after_a_while)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    folder = RunPaths.of(cfg, tmp_path / "resumed").checkpoints
    assert (folder / "resume.safetensors").exists() and not (folder / "done.json").exists()
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    resumed = train(cfg, tmp_path / "resumed", progress=False)
    assert ckpt_bytes(cfg, tmp_path / "resumed") == ckpt_bytes(cfg, tmp_path / "straight")
    straight = pd.read_parquet(RunPaths.of(cfg, tmp_path / "straight").tables / "metrics.parquet")
    pd.testing.assert_frame_equal(resumed, straight)


# --- extension past the horizon ------------------------------------------------------------------

NEVER = 1.0  # an emergence threshold no tiny run reaches (accuracy exactly 1): it is extended
AT_ONCE = 1e-4  # one every run reaches at step 0: it is not


def _ext_cfg(threshold: float):
    return tiny_cfg("kaiming", train={"steps": 50, "ckpt_every": 20, "eval_every": 5, "emergence_threshold": threshold})


def _done(cfg, root) -> dict:
    return json.loads((RunPaths.of(cfg, root).checkpoints / "done.json").read_text())


def _metrics(cfg, root) -> pd.DataFrame:
    return pd.read_parquet(RunPaths.of(cfg, root).tables / "metrics.parquet")


def test_the_schedule_up_to_the_horizon_does_not_depend_on_the_extension():
    t = _ext_cfg(NEVER).train
    short, long = checkpoint_schedule(t), checkpoint_schedule(t, 130)
    assert [s for s in long if s <= t.steps] == short
    assert [s for s in long if s > t.steps] == [60, 80, 100, 120, 130]
    assert checkpoint_schedule(t, 10) == short  # never shorter than the horizon


def test_an_extended_run_is_the_unextended_run_byte_for_byte_up_to_the_horizon(tmp_path):
    cfg = _ext_cfg(NEVER)
    train(cfg, tmp_path / "short", progress=False)
    train(cfg, tmp_path / "long", progress=False, extend_to=90)
    short, long = ckpt_bytes(cfg, tmp_path / "short"), ckpt_bytes(cfg, tmp_path / "long")
    assert {k: v for k, v in long.items() if int(k[5:11]) <= 50} == short
    later = {int(k[5:11]) for k in long if int(k[5:11]) > 50}
    assert {60, 80, 90} <= later and max(later) == 90  # regular ones, plus ladder and adaptive ones
    m_short, m_long = _metrics(cfg, tmp_path / "short"), _metrics(cfg, tmp_path / "long")
    pd.testing.assert_frame_equal(m_long[m_long.step <= 50].reset_index(drop=True), m_short)
    assert m_long.step.max() == 90
    assert (_done(cfg, tmp_path / "long")["extended_to"], _done(cfg, tmp_path / "long")["horizon"]) == (90, 50)
    assert _done(cfg, tmp_path / "short")["extended_to"] is None

    # A finished run extended afterwards is the run extended from the start, bytes and table.
    train(cfg, tmp_path / "short", progress=False, extend_to=90)
    assert ckpt_bytes(cfg, tmp_path / "short") == long
    pd.testing.assert_frame_equal(_metrics(cfg, tmp_path / "short"), m_long)
    assert _done(cfg, tmp_path / "short")["extended_to"] == 90


def test_a_killed_extension_finishes_on_resume_even_without_asking_again(tmp_path, monkeypatch):
    cfg = _ext_cfg(NEVER)
    train(cfg, tmp_path / "straight", progress=False, extend_to=90)
    train(cfg, tmp_path / "killed", progress=False)
    real_evaluate = train_module.evaluate
    calls = {"n": 0}

    def crash(model, ds):
        calls["n"] += 1
        if calls["n"] == 6:  # step 80's checkpoint written (evaluations 55 … 80), before step 90
            raise KeyboardInterrupt
        return real_evaluate(model, ds)

    monkeypatch.setattr(train_module, "evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "killed", progress=False, extend_to=90)
    assert not (RunPaths.of(cfg, tmp_path / "killed").checkpoints / "done.json").exists()
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    train(cfg, tmp_path / "killed", progress=False)  # no extend_to: the started extension is finished
    assert ckpt_bytes(cfg, tmp_path / "killed") == ckpt_bytes(cfg, tmp_path / "straight")
    assert _done(cfg, tmp_path / "killed")["extended_to"] == 90


def test_a_run_that_emerged_by_the_horizon_is_not_extended(tmp_path):
    cfg = _ext_cfg(AT_ONCE)
    train(cfg, tmp_path, progress=False, extend_to=90)
    assert _metrics(cfg, tmp_path).step.max() == 50 and _done(cfg, tmp_path)["extended_to"] is None
    train(cfg, tmp_path, progress=False, extend_to=90)  # asked again on the finished run: still not
    assert _metrics(cfg, tmp_path).step.max() == 50


def test_extensions_that_cannot_be_done_say_why(tmp_path):
    cfg = _ext_cfg(NEVER)
    with pytest.raises(ExtensionError, match="beyond the horizon"):
        train(cfg, tmp_path, progress=False, extend_to=50)
    donor = tiny_cfg(train={"steps": 50, "stop_after_emergence": 0})
    with pytest.raises(ExtensionError, match="ends on its own"):
        train(donor, tmp_path, progress=False, extend_to=90)
    train(cfg, tmp_path, progress=False)
    (RunPaths.of(cfg, tmp_path).checkpoints / "resume.safetensors").unlink()  # as older versions left it
    before = ckpt_bytes(cfg, tmp_path)
    with pytest.raises(ExtensionError, match="without the optimizer state"):
        train(cfg, tmp_path, progress=False, extend_to=90)
    assert ckpt_bytes(cfg, tmp_path) == before and _done(cfg, tmp_path)["extended_to"] is None


@pytest.mark.slow
def test_killed_process_resumes_to_identical_final_weights(tmp_path):
    """SIGKILL a real training process mid-run, restart it, compare with an uninterrupted run."""
    cfg = tiny_cfg("xavier", train={"steps": 1500, "ckpt_every": 100, "eval_every": 100})
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    cmd = [sys.executable, "-m", "initmi_utils.train", "--config", str(cfg_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    folder = RunPaths.of(cfg, tmp_path / "killed").checkpoints
    proc = subprocess.Popen(cmd + ["--root", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (folder / "step_000300.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "done.json").exists(), "the run finished before it could be killed"
    for root in ("killed", "straight"):
        subprocess.run(cmd + ["--root", str(tmp_path / root)], env=env, check=True, capture_output=True)
    final = "step_001500.safetensors"
    a = load_model(RunPaths.of(cfg, tmp_path / "killed").checkpoints / final)[0]
    b = load_model(RunPaths.of(cfg, tmp_path / "straight").checkpoints / final)[0]
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_a_different_config_in_the_same_folder_is_refused(tmp_path):
    train(tiny_cfg(train={"steps": 20}), tmp_path, progress=False)
    with pytest.raises(RunConfigMismatch, match="different config"):
        train(tiny_cfg(train={"steps": 30}), tmp_path, progress=False)


def test_missing_and_corrupted_checkpoints_say_what_to_do(tmp_path):
    cfg = tiny_cfg()
    with pytest.raises(CheckpointError, match="no checkpoints.*pipeline --preset smoke --schemes normal --seeds 0 --notebooks 01"):
        list_checkpoints(cfg, tmp_path)
    train(cfg, tmp_path, progress=False)
    path = list_checkpoints(cfg, tmp_path).path(40)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted.*rerun training"):
        load_model(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(Path(tmp_path) / "nope.safetensors")


def test_cli_reports_bad_input_without_writing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "initmi_utils.train", "--preset", "smoke", "--scheme", "nope",
                          "--root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown init scheme 'nope'" in out.stderr and "normal" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_loss_ladder_checkpoints_the_first_step_at_or_below_each_level_bit_for_bit(tmp_path):
    # Run A: the smoke preset's ladder. Run B: no ladder, a checkpoint after every step. A's
    # ladder checkpoints must be B's checkpoints of the same steps (the replay is the training),
    # and each must be the first step whose subset loss is at or below its level.
    a = experiment("smoke", "normal", 0).replace(train={"threads": 1})
    b = a.replace(train={"loss_ladder": (), "induction_loss_ladder": (), "ckpt_every": 1})
    train(a, tmp_path / "a", progress=False)
    train(b, tmp_path / "b", progress=False)
    ladder = json.loads((RunPaths.of(a, tmp_path / "a").checkpoints / "done.json").read_text())["ladder"]
    ds = load_dataset(a, tmp_path / "a")
    every = list_checkpoints(b, tmp_path / "b")
    losses = {step: ladder_losses(every.load(step)[0], ds, a.train) for step in every.steps}
    reached = 0
    for name, field in LADDERS.items():
        for level in getattr(a.train, field):
            first = next((s for s in every.steps if losses[s][name] <= level), None)
            hit = ladder[name].get(repr(level))
            assert (hit or {}).get("step") == first, (name, level, hit, first)
            if first is None:
                continue
            reached += 1
            assert hit["loss"] == pytest.approx(losses[first][name], abs=1e-6)
            ours = load_file(str(step_path(RunPaths.of(a, tmp_path / "a").checkpoints, first)))
            theirs = load_file(str(step_path(RunPaths.of(b, tmp_path / "b").checkpoints, first)))
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs), (name, level, first)
    assert reached >= 2  # the smoke ladder is set so that the path is exercised
    table = pd.read_parquet(RunPaths.of(a, tmp_path / "a").tables / "ladder.parquet")
    assert len(table) == len(a.train.loss_ladder) + len(a.train.induction_loss_ladder)
    assert (table[table.step >= 0].tolerance >= 0).all()
    # The ladder only reads the model: run A's regular checkpoints equal B's.
    final = list_checkpoints(a, tmp_path / "a").steps[-1]
    ours = load_file(str(step_path(RunPaths.of(a, tmp_path / "a").checkpoints, final)))
    theirs = load_file(str(step_path(RunPaths.of(b, tmp_path / "b").checkpoints, final)))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
