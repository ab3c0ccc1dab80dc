"""Training: AdamW with warm-up, periodic evaluation, checkpoints, bitwise resume.

``train(cfg, root)`` trains one run and returns its tidy metrics table (run, scheme, seed,
preset, step, metric, value). It is idempotent: a finished run is loaded, not retrained; a killed
run resumes from its last checkpoint and ends with the same bytes as an uninterrupted one (the
batch of step t depends only on (data.seed, t), the optimizer state is saved with each
checkpoint, and nothing else is random).

The learning rate is linear warm-up then *constant*: a shorter preset is then exactly a prefix
of a longer one, so ``quick`` and ``full`` runs agree step for step.

Checkpoints: step 0, log-spaced steps, every ``ckpt_every`` steps, the final step, and, densely
around emergence, every evaluation at which induction accuracy moved by >= ``ADAPTIVE_DELTA``
since the last checkpoint.

Extension: ``train(cfg, extend_to=N)`` trains a run that has not emerged by its horizon
(``train.steps``; emerged = ``HEADLINE_METRIC`` >= ``train.emergence_threshold`` at an evaluation)
on to step ``N``, with the same constant learning rate, batches and checkpoint rules, so that a
late run's emergence is observed instead of censored. It works on a finished run too: the
optimizer state of the last checkpoint is kept when a run finishes (``resume.safetensors``). The
config is not changed by an extension (``N`` is an argument, recorded in ``done.json`` as
``extended_to``) and the log-spaced checkpoints are spread over the horizon, not over ``N``, so
the first ``train.steps`` steps of an extended run are byte for byte those of the run without
extension. A run that emerged by its horizon is not extended.

The loss ladder: for every level of ``train.loss_ladder`` (val loss) and
``train.induction_loss_ladder`` (loss on induction targets), the first step at which the loss on
a fixed validation subset (its first ``train.ladder_sequences`` sequences) is at or below the
level gets a checkpoint, so that runs can be compared at matched loss within one step's change
of loss instead of the 0.5 nats two evaluations can be apart during emergence. How: the model
and optimizer state of the last evaluation are kept in memory; when an evaluation finds a level
crossed, those ``eval_every`` steps are replayed from that state with the subset evaluated after
every step (``ladder_replay``). Training is deterministic given (state, step), so the replayed
steps are the steps trained (tested bit for bit), and training itself is unchanged: the
evaluations only read the model. The crossings are recorded in ``done.json`` (``ladder``) and in
the table ``ladder``; the evaluation that found them also checkpoints, so a resumed run knows
them.

``train.stop_after_emergence >= 0`` ends a run that many steps (rounded up to an evaluation)
after its validation induction accuracy first reaches ``train.emergence_threshold``; ``steps`` is
then a cap. The ``seeded`` scheme's donors train this way: how long the loss plateau before
induction lasts depends strongly on the seed, so a fixed length either wastes steps or leaves
some seeds' donors without an induction circuit.

Command line: ``python -m initmi_utils.train --preset quick --scheme xavier --seed 0 [--root DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

import initmi_utils.seeded  # noqa: F401  (registers the `seeded` scheme)
from initmi_utils.behavior import HEADLINE_METRIC, induction_scores, next_token_stats
from initmi_utils.checkpoints import (
    load_resume_state,
    save_checkpoint,
    save_resume_state,
    step_path,
)
from initmi_utils.config import ExperimentConfig, RunPaths, TrainConfig, experiment
from initmi_utils.data import Batch, Dataset, load_dataset
from initmi_utils.io import atomic_write_text
from initmi_utils.model import Transformer, keep_freed_memory, loss_fn, torch_threads
from initmi_utils.schemes import SCHEMES, build_model, check_scheme, load_scheme_modules, scheme_source
from initmi_utils.sources import closure_hash
from initmi_utils.tables import table_path, write_table

ADAPTIVE_DELTA = 0.1  # induction-accuracy change that triggers an extra checkpoint


class RunConfigMismatch(RuntimeError):
    """Artefacts in a run folder were written by a different config."""


class ExtensionError(RuntimeError):
    """A run cannot be extended as asked (the message says why and what to do)."""


def checkpoint_schedule(t: TrainConfig, until: int | None = None) -> list[int]:
    """Step 0, ``n_log_ckpts`` log-spaced steps over the horizon ``[1, t.steps]``, every
    ``ckpt_every`` steps up to ``until`` (default and at least ``t.steps``), the horizon and
    ``until``. Steps up to the horizon do not depend on ``until``: an extension only adds later ones."""
    until = max(until or t.steps, t.steps)
    log_steps = np.unique(np.round(np.geomspace(1, t.steps, t.n_log_ckpts)).astype(int)) if t.n_log_ckpts else []
    return sorted({0, t.steps, until, *range(t.ckpt_every, until, t.ckpt_every), *map(int, log_steps)})


def emerged_by(rows, step: int, t: TrainConfig) -> bool:
    """Whether the headline metric reached ``t.emergence_threshold`` at an evaluation at or before
    ``step``; ``rows`` are metric rows (dicts or a metrics table)."""
    rows = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
    return any(r["metric"] == HEADLINE_METRIC and r["step"] <= step and r["value"] >= t.emergence_threshold
               for r in rows)


def _check_extend_to(extend_to: int, t: TrainConfig) -> None:
    if extend_to and extend_to <= t.steps:
        raise ExtensionError(f"extend_to={extend_to} must be 0 (no extension) or beyond the horizon train.steps="
                             f"{t.steps}.")
    if extend_to and t.stop_after_emergence >= 0:
        raise ExtensionError("a run with train.stop_after_emergence >= 0 (a donor) ends on its own; raise train.steps "
                             "instead of extending it.")


def lr_at(step: int, t: TrainConfig) -> float:
    return t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps))


def optimizer_step(opt: torch.optim.Optimizer, loss_of: Callable[[], torch.Tensor], params, step: int,
                   t: TrainConfig) -> float:
    """One update: the step's learning rate, backward, global grad-norm clip, AdamW; the loss.

    ``loss_of`` computes the loss, so the benchmark can time exactly this step on another model
    view (the bridge) without a copy of the loop.
    """
    for group in opt.param_groups:
        group["lr"] = lr_at(step, t)
    loss = loss_of()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    opt.step()
    return loss.item()


@torch.no_grad()
def evaluate(model: Transformer, ds: Dataset) -> dict[str, float]:
    """Validation loss/accuracy/logit difference, the same on BOS+A+A, and the best head's induction score."""
    was_training = model.training
    model.eval()
    out = {f"val_{k}": v for k, v in next_token_stats(model(ds.val.tokens), ds.val).items()}
    patterns: list = []
    rep_logits = model(ds.rep.tokens, patterns)
    out.update({f"rep_{k}": v for k, v in next_token_stats(rep_logits, ds.rep).items()})
    out["induction_score"] = induction_scores(patterns, ds.d.rep_len).max().item()
    model.train(was_training)
    return out


LADDERS = {"val_loss": "loss_ladder", "val_loss_induction": "induction_loss_ladder"}  # ladder -> TrainConfig field


@torch.no_grad()
def ladder_losses(model: Transformer, ds: Dataset, t: TrainConfig) -> dict[str, float]:
    """Val loss and induction loss on the ladder's fixed subset (the first ``ladder_sequences``
    validation sequences): the quantities the ladder's levels are crossed by."""
    n = min(t.ladder_sequences, ds.val.tokens.shape[0])
    sub = Batch(ds.val.tokens[:n], ds.val.target[:n], ds.val.distractor[:n])
    was_training = model.training
    model.eval()
    stats = next_token_stats(model(sub.tokens), sub)
    model.train(was_training)
    return {"val_loss": stats["loss"], "val_loss_induction": stats["loss_induction"]}


def _pending(state: dict, t: TrainConfig) -> list[tuple[str, float]]:
    """The (ladder, level) pairs not crossed yet."""
    return [(name, level) for name, field in LADDERS.items() for level in getattr(t, field)
            if repr(level) not in state["ladder"][name]]


def _crossed(losses: dict[str, float], pending: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(name, level) for name, level in pending if losses[name] <= level]


def _snapshot(model: Transformer, opt: torch.optim.Optimizer, step: int) -> dict:
    """Model and optimizer state at ``step``, copied, to replay the steps after it."""
    return {"step": step, "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "opt": copy.deepcopy(opt.state_dict())}


def ladder_replay(snapshot: dict, cfg: ExperimentConfig, ds: Dataset, until: int, pending: list[tuple[str, float]],
                  on_crossing: Callable[[int, Transformer, list[tuple[str, float], dict[str, float]]], None]) -> None:
    """Replay the steps after ``snapshot["step"]`` and before ``until`` on a copy of the model,
    evaluate the ladder's subset after each, and call ``on_crossing(step, model, levels, losses)``
    at the first step at or below each pending level (several levels can share a step). Step
    ``until`` itself is the live model's: the caller evaluated it already."""
    t = cfg.train
    model = Transformer(cfg.model)
    model.load_state_dict(snapshot["model"])
    model.train()
    opt, _ = _optimizer(model, t)
    opt.load_state_dict(snapshot["opt"])
    left = list(pending)
    for step in range(snapshot["step"], until - 1):
        batch = ds.train_batch(step, t.batch_size)
        optimizer_step(opt, lambda: loss_fn(model(batch.tokens), batch.tokens), model.parameters(), step, t)
        losses = ladder_losses(model, ds, t)
        hit = _crossed(losses, left)
        if hit:
            on_crossing(step + 1, model, hit, losses)
            left = [p for p in left if p not in hit]
        if not left:
            return


def _optimizer(model: Transformer, t: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW with decoupled weight decay on matrices only (not LayerNorm gains or biases)."""
    named = list(model.named_parameters())
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named if p.ndim < 2]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": t.weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, foreach=True)
    return opt, [n for n, _ in decay] + [n for n, _ in no_decay]


def _stop_now(state: dict, metrics: dict[str, float], step: int, t: TrainConfig) -> bool:
    """Record the first step at which induction emerged; whether ``stop_after_emergence`` ends the run here."""
    if t.stop_after_emergence < 0:
        return False
    if state.get("emerged_at") is None and metrics[HEADLINE_METRIC] >= t.emergence_threshold:
        state["emerged_at"] = step
    return state.get("emerged_at") is not None and step >= state["emerged_at"] + t.stop_after_emergence


def _rows(step: int, metrics: dict[str, float]) -> list[dict]:
    return [dict(step=step, metric=k, value=float(v)) for k, v in metrics.items()]


def _check_same_config(found: dict, cfg: ExperimentConfig, where: Path) -> None:
    want = cfg.to_dict()
    if {k: v for k, v in found.items() if k != "version"} != {k: v for k, v in want.items() if k != "version"}:
        raise RunConfigMismatch(
            f"{where} was written by a different config than this run's; delete that run folder "
            f"({where.parent}) or train into another --root."
        )


class StaleRun(RuntimeError):
    """A run's checkpoints were written by other training code (its source changed)."""


def training_source(scheme: str = "") -> str:
    """The hash of the training closure: this module and every package module it imports
    (model, schemes, data, …), with the torch and transformer_lens versions; for a scheme from a
    user's file (``schemes.load_scheme_module``), ``+`` that file's hash, so that editing it
    retrains its runs and no others."""
    user = scheme_source(scheme)
    return closure_hash({"initmi_utils.train"}) + (f"+{user}" if user else "")


def run_source(cfg: ExperimentConfig, root: str | Path | None = None) -> str:
    """``training_source`` of the run's scheme, ``+`` the fingerprint of what the scheme reads
    (``Scheme.inputs``; the ``seeded`` scheme's chosen donor): a run trained from another donor
    is stale like one trained by other code."""
    scheme = SCHEMES.get(cfg.run.scheme)
    inputs = scheme.inputs(cfg, root) if scheme is not None and scheme.inputs is not None else ""
    return training_source(cfg.run.scheme) + (f"+inputs:{inputs}" if inputs else "")


STALE = ("refuse", "reuse", "retrain")  # what ``train`` does with checkpoints of other training code


def _is_stale(found: str | None, folder: Path, stale: str, now: str) -> bool:
    """Whether the run in ``folder`` must be retrained; raises ``StaleRun`` if it is stale and
    ``stale`` is ``refuse``."""
    if stale not in STALE:
        raise ValueError(f"stale={stale!r}; choose one of {STALE}.")
    if found == now or stale == "reuse":
        return False
    if stale == "retrain":
        return True
    raise StaleRun(
        f"the checkpoints in {folder} were written by other training code (training source {found or 'unrecorded'}, "
        f"now {now}: a module train imports, the scheme's file or inputs (the seeded scheme's donor), torch or transformer_lens changed). Retrain them: "
        f"train(..., stale='retrain'), --stale retrain on the train CLI, -p stale retrain with papermill, "
        f"--param stale=retrain on the pipeline (or delete that folder). Reuse them knowingly: stale='reuse'.")


def train(cfg: ExperimentConfig, root: str | Path | None = None, progress: bool = True,
          stale: str = "refuse", extend_to: int = 0) -> pd.DataFrame:
    """Train (or resume, or load, or extend) one run; returns its metrics in long format.

    A finished or half-trained run whose training source (``training_source``) differs from the
    current one is never served silently from code that no longer exists: ``stale`` says what
    happens, ``refuse`` (``StaleRun``), ``retrain`` (its checkpoints are deleted and it trains
    anew) or ``reuse`` (knowingly).

    ``extend_to`` (0 = none): if the run has not emerged by ``train.steps``, train on to this step
    (see the module docstring); a finished run that has not emerged is extended in place. An
    extension once started is finished on resume, whatever ``extend_to`` the resuming call passes."""
    t = cfg.train
    _check_extend_to(extend_to, t)
    paths = RunPaths.of(cfg, root)
    folder, table = paths.checkpoints, table_path(cfg, "metrics", root)
    done = folder / "done.json"
    source = run_source(cfg, root)
    if done.exists():
        info = json.loads(done.read_text())
        _check_same_config(info["config"], cfg, done)
        if _is_stale(info.get("source"), folder, stale, source):
            shutil.rmtree(folder)
        elif info["final_step"] >= max(extend_to, t.steps) or emerged_by(pd.read_parquet(table), t.steps, t):
            return pd.read_parquet(table)
        elif not (folder / "resume.safetensors").exists():
            raise ExtensionError(f"{folder} finished at step {info['final_step']} without the optimizer state an "
                                 f"extension continues from (trained by a version that deleted it); retrain it to "
                                 f"extend it: train(..., stale='retrain'), or delete that folder.")

    keep_freed_memory()
    with torch_threads(t.threads):
        ds = load_dataset(cfg, root)
        model = build_model(cfg, root)
        model.train()
        opt, names = _optimizer(model, t)
        state = load_resume_state(folder, opt, names)
        if state is not None:
            _check_same_config(state["config"], cfg, folder / "resume.safetensors")
            if _is_stale(state.get("source"), folder, stale, source):
                shutil.rmtree(folder)
                opt, names = _optimizer(model, t)  # fresh moments: the stale ones were loaded
                state = None
        if state is not None:
            model.load_state_dict(load_file(str(step_path(folder, state["step"]))))
        else:
            metrics = evaluate(model, ds)
            state = {"config": cfg.to_dict(), "step": 0, "rows": _rows(0, metrics), "loss_sum": 0.0,
                     "loss_n": 0, "ckpt_acc": metrics["val_acc_induction"], "checkpoints": [0],
                     "ladder": {name: {} for name in LADDERS}, "source": source}
            losses = ladder_losses(model, ds, t)
            for name, level in _crossed(losses, _pending(state, t)):  # a run may start below a level
                state["ladder"][name][repr(level)] = {"step": 0, "loss": losses[name]}
            save_checkpoint(folder, model, cfg, 0, metrics)
            save_resume_state(folder, opt, names, state)
            write_table(pd.DataFrame(state["rows"]), cfg, "metrics", root)

        until = max(t.steps, extend_to, state.get("until", t.steps))  # an extension once started is finished
        if done.exists():  # extending a finished run: from here on it is an unfinished extension
            state["until"] = until
            save_resume_state(folder, opt, names, state)
            done.unlink()
        schedule = set(checkpoint_schedule(t, until))
        bar = tqdm(total=until, initial=state["step"], file=sys.stdout, ascii=True, mininterval=5,
                   disable=not progress, desc=cfg.run.name)
        snapshot = _snapshot(model, opt, state["step"]) if _pending(state, t) else None

        def on_crossing(step: int, replayed: Transformer, levels: list, losses: dict) -> None:
            for name, level in levels:
                state["ladder"][name][repr(level)] = {"step": step, "loss": losses[name]}
            found = evaluate(replayed, ds)
            state["rows"] += _rows(step, found)
            state["checkpoints"].append(step)
            save_checkpoint(folder, replayed, cfg, step, found)
        for step in range(state["step"], until):
            batch = ds.train_batch(step, t.batch_size)
            loss = optimizer_step(opt, lambda: loss_fn(model(batch.tokens), batch.tokens), model.parameters(), step, t)
            done_steps = step + 1
            state["loss_sum"] += loss
            state["loss_n"] += 1
            bar.update(1)

            is_ckpt = done_steps in schedule
            if done_steps % t.eval_every == 0 or is_ckpt:
                metrics = evaluate(model, ds)
                metrics["train_loss"] = state["loss_sum"] / state["loss_n"]
                state["loss_sum"], state["loss_n"] = 0.0, 0
                if snapshot is not None:
                    pending, losses = _pending(state, t), ladder_losses(model, ds, t)
                    if _crossed(losses, pending):
                        ladder_replay(snapshot, cfg, ds, done_steps, pending, on_crossing)
                        for name, level in _crossed(losses, _pending(state, t)):  # first crossed at this step
                            state["ladder"][name][repr(level)] = {"step": done_steps, "loss": losses[name]}
                        is_ckpt = True  # the resume state then holds the crossings just found
                    snapshot = _snapshot(model, opt, done_steps) if _pending(state, t) else None
                state["rows"] += _rows(done_steps, metrics)
                bar.set_postfix(loss=f"{metrics['val_loss']:.3f}", ind_acc=f"{metrics['val_acc_induction']:.2f}",
                                refresh=False)
                if abs(metrics["val_acc_induction"] - state["ckpt_acc"]) >= ADAPTIVE_DELTA:
                    is_ckpt = True
                stop = _stop_now(state, metrics, done_steps, t)
                if done_steps == t.steps and until > t.steps:  # the horizon: extend only a run not emerged
                    stop = emerged_by(state["rows"], t.steps, t)
                    if not stop:
                        state["until"] = until
                if is_ckpt or stop:
                    state["step"], state["ckpt_acc"] = done_steps, metrics["val_acc_induction"]
                    state["checkpoints"].append(done_steps)
                    save_checkpoint(folder, model, cfg, done_steps, metrics)
                    save_resume_state(folder, opt, names, state)
                    write_table(pd.DataFrame(state["rows"]), cfg, "metrics", root)
                if stop:
                    break
        bar.close()

    write_table(pd.DataFrame(state["rows"]), cfg, "metrics", root)
    write_table(ladder_table(state.get("ladder", {}), t), cfg, "ladder", root)
    last = state["checkpoints"][-1]
    atomic_write_text(done, json.dumps({"config": cfg.to_dict(), "checkpoints": state["checkpoints"],
                                        "final_step": last, "emerged_at": state.get("emerged_at"),
                                        "horizon": t.steps, "extended_to": state.get("until"),
                                        "ladder": state.get("ladder", {}), "source": source,
                                        "final_metrics": {r["metric"]: r["value"] for r in state["rows"]
                                                          if r["step"] == last}}, indent=2, sort_keys=True))
    return pd.read_parquet(table)  # resume.safetensors stays: the optimizer state an extension continues from


def ladder_table(ladder: dict, t: TrainConfig) -> pd.DataFrame:
    """One row per ladder level: ``metric`` the ladder (``val_loss`` / ``val_loss_induction``),
    ``level``, ``step`` the first step at or below it (``-1``: not reached), ``value`` the
    subset loss there and ``tolerance`` = level - value (>= 0; how far past the level the step
    landed)."""
    rows = []
    for name, field in LADDERS.items():
        for level in getattr(t, field):
            hit = ladder.get(name, {}).get(repr(level))
            rows.append(dict(step=hit["step"] if hit else -1, metric=f"ladder_{name}", level=float(level),
                             value=hit["loss"] if hit else float("nan"),
                             tolerance=level - hit["loss"] if hit else float("nan")))
    columns = ["step", "metric", "level", "value", "tolerance"]
    return pd.DataFrame(rows, columns=columns)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train one (scheme, seed) run of a preset.")
    p.add_argument("--preset", default="quick")
    p.add_argument("--scheme", default="normal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="project root for checkpoints/ and data/ (default: this project)")
    p.add_argument("--config", default=None, help="a JSON file of ExperimentConfig.to_dict() (overrides the rest)")
    p.add_argument("--scheme-module", default="",
                   help="comma-separated .py files that register schemes (@register_scheme)")
    p.add_argument("--extend-to", type=int, default=0,
                   help="train a run that has not emerged by train.steps on to this step (0 = no extension)")
    p.add_argument("--stale", default="refuse", choices=STALE,
                   help="checkpoints written by other training code: refuse them (default), retrain, or reuse")
    a = p.parse_args(argv)
    try:
        load_scheme_modules(a.scheme_module)
        if a.config:
            cfg = ExperimentConfig.from_dict(json.loads(Path(a.config).read_text()))
            check_scheme(cfg.run.scheme)
        else:
            cfg = experiment(a.preset, a.scheme, a.seed)
            check_scheme(cfg.run.scheme)
        train(cfg, a.root, stale=a.stale, extend_to=a.extend_to)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
