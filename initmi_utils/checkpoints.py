"""Checkpoints: safetensors weights that describe themselves.

``checkpoints/<preset>/<scheme>/seed<k>/step_000123.safetensors`` holds the model's weights under
their field names (``blocks.0.attn.W_Q`` …) and, in the safetensors header, a JSON document: the
full config, the step, the package version, the data hash and the metrics at that step. Nothing
machine- or time-dependent goes in, so the same (scheme, seed) gives the same bytes under any
root. Files are written to a temporary name and renamed: a killed run never leaves half a file.

``done.json`` marks a finished run; ``resume.safetensors`` holds the optimizer state of the
latest checkpoint so that a killed run resumes to bitwise the same result.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from initmi_utils.config import ExperimentConfig, RunPaths
from initmi_utils.io import atomic_write
from initmi_utils.model import Transformer, to_bridge

_STEP_FILE = re.compile(r"step_(\d{6,})\.safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable (the message says what to run)."""


def step_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:06d}.safetensors"


def save_checkpoint(folder: Path, model: Transformer, cfg: ExperimentConfig, step: int, metrics: dict[str, float]) -> Path:
    path = step_path(folder, step)
    meta = {"config": cfg.to_dict(), "step": step, "version": cfg.to_dict()["version"],
            "data_hash": cfg.data_hash, "metrics": metrics}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"initmi": json.dumps(meta, sort_keys=True)}))
    return path


def read_meta(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["initmi"])
    except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable or corrupted ({type(e).__name__}: {e}); delete it and "
            f"rerun training for this run: it resumes from the last good checkpoint."
        ) from e


def load_model(path: Path) -> tuple[Transformer, dict[str, Any]]:
    """The model stored in ``path`` and the checkpoint's metadata."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; train the run first (notebook 01).")
    meta = read_meta(path)
    cfg = ExperimentConfig.from_dict(meta["config"])
    model = Transformer(cfg.model)
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupted ({e}); delete it and rerun training for this run."
        ) from e
    model.eval()
    return model, meta


@dataclass(frozen=True)
class RunCheckpoints:
    """The checkpoints of one run, in step order."""

    folder: Path
    steps: tuple[int, ...]

    def path(self, step: int) -> Path:
        return step_path(self.folder, step)

    def load(self, step: int) -> tuple[Transformer, dict[str, Any]]:
        return load_model(self.path(step))

    def bridges(self, steps: Iterable[int] | None = None) -> Iterator[tuple[int, Transformer, Any]]:
        """``(step, model, bridge)`` for each of ``steps`` (default: every checkpoint), ``bridge``
        being the model's ``TransformerBridge`` view. One bridge is refilled per step
        (``to_bridge(model, reuse=...)``): building one costs more than the analyses of a small
        checkpoint. The bridge of a step is therefore overwritten by the next step's weights."""

        bridge = None
        for step in self.steps if steps is None else steps:
            model, _ = self.load(step)
            bridge = to_bridge(model, reuse=bridge)
            yield step, model, bridge


def list_checkpoints(cfg: ExperimentConfig, root: str | Path | None = None, require_done: bool = True) -> RunCheckpoints:
    """The run's checkpoints; raises ``CheckpointError`` naming the training to do if there are none."""
    paths = RunPaths.of(cfg, root)
    folder = paths.checkpoints
    steps = sorted(int(m.group(1)) for p in folder.glob("step_*.safetensors") if (m := _STEP_FILE.fullmatch(p.name)))
    run = f"preset={cfg.run.preset} scheme={cfg.run.scheme} seed={cfg.run.seed}"
    hint = (f"train it first: python -m initmi_utils.pipeline --preset {cfg.run.preset} "
            f"--schemes {cfg.run.scheme} --seeds {cfg.run.seed} --notebooks 01 --root {paths.root}")
    if not steps:
        raise CheckpointError(f"no checkpoints for run {run} in {folder}; {hint}")
    if require_done and not (folder / "done.json").exists():
        raise CheckpointError(f"training of run {run} has not finished ({folder}/done.json missing); {hint}")
    return RunCheckpoints(folder, tuple(steps))


def _flat_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def save_resume_state(folder: Path, optimizer: torch.optim.Optimizer, names: list[str], state: dict[str, Any]) -> None:
    """Optimizer moments and step counts (tensors, ``names`` in param-group order) plus the loop's
    own state (JSON)."""
    tensors = {}
    for p, name in zip(_flat_params(optimizer), names):
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"{k}.{name}"] = torch.as_tensor(v).detach().clone().contiguous()
    atomic_write(folder / "resume.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"state": json.dumps(state, sort_keys=True)}))


def load_resume_state(folder: Path, optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, Any] | None:
    path = folder / "resume.safetensors"
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()["state"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"resume state {path} is corrupted ({e}); delete it to restart this run from step 0.") from e
    for p, name in zip(_flat_params(optimizer), names):
        s = {k.split(".", 1)[0]: v for k, v in tensors.items() if k.split(".", 1)[1] == name}
        if s:
            optimizer.state[p] = s
    return state
