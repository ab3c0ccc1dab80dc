"""Residual-stream probes: a small fixed set of activations per checkpoint, kept with a run's
tables, so that representation similarity between runs (CKA) is computed without checkpoints.

The probe: the first ``PROBE_SEQUENCES`` validation sequences at ``PROBE_POSITIONS`` positions
spread evenly over ``1 .. seq_len - 1`` (BOS dropped: the same input at the same position in every
sequence, one high-norm point that would dominate the CKA of both runs), and the residual stream
after the last layer (``blocks.{L-1}.hook_resid_post``: what the unembedding reads), from one
``run_with_cache`` on the ``TransformerBridge`` view. Stored as float16: 16 x 16 x 128 x 2 B = 64 KB
per checkpoint, at the checkpoints a cross-run comparison reads: every loss-ladder checkpoint (the
loss-matched views, table ``ladder``) and the last checkpoint up to the horizon (the step-matched
view's default). Written by notebook 06 to ``probe.safetensors`` in the run's tables folder (keys:
the steps), copied by ``results.publish``.

256 points against 128 dimensions: the plug-in linear CKA would be biased upwards, so ``ProbeCache``
compares probes with the debiased estimator (``geometry.linear_cka(debiased=True)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from transformer_lens.utilities import get_act_name

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ExperimentConfig, RunPaths, experiment, resolve_root
from initmi_utils.data import load_dataset
from initmi_utils.geometry import linear_cka
from initmi_utils.io import atomic_write
from initmi_utils.model import Transformer, to_bridge
from initmi_utils.tables import table_path

PROBE_SEQUENCES = 16
PROBE_POSITIONS = 16
PROBE_FILE = "probe.safetensors"


def probe_positions(seq_len: int, n: int = PROBE_POSITIONS) -> list[int]:
    """``n`` positions spread evenly over ``1 .. seq_len - 1`` (fewer if the sequence is shorter)."""
    return sorted({int(p) for p in np.round(np.linspace(1, seq_len - 1, n))})


def probe_hook(model: Transformer) -> str:
    return get_act_name("resid_post", model.cfg.n_layers - 1)


def probe_activations(model: Transformer, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """The last layer's residual stream at ``positions`` of every sequence of ``tokens``, as
    ``[sequences * positions, d_model]`` float16."""
    bridge = to_bridge(model)
    hook = probe_hook(model)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n == hook)
    return cache[hook][:, positions].reshape(-1, cache[hook].shape[-1]).to(torch.float16).contiguous()


def probe_steps(cfg: ExperimentConfig, steps, root: str | Path | None = None) -> list[int]:
    """The checkpoints a probe is kept at: the loss-ladder steps (table ``ladder``) and the last
    checkpoint up to the horizon, among ``steps`` (the run's checkpoints)."""
    steps = sorted(int(s) for s in steps)
    keep = {max(s for s in steps if s <= cfg.train.steps)}
    path = table_path(cfg, "ladder", root)
    if path.exists():
        keep |= {int(s) for s in pd.read_parquet(path).step if int(s) in steps}
    return sorted(keep)


def write_probes(cfg: ExperimentConfig, root: str | Path | None = None) -> Path:
    """Compute and store run ``cfg``'s probe at ``probe_steps``; returns the file's path."""
    ckpts = list_checkpoints(cfg, root)
    tokens = load_dataset(cfg, root).val.tokens[:PROBE_SEQUENCES]
    positions = probe_positions(tokens.shape[1])
    stored = {}
    for step in probe_steps(cfg, ckpts.steps, root):
        model, _ = ckpts.load(step)
        stored[str(step)] = probe_activations(model, tokens, positions)
    path = RunPaths.of(cfg, root).tables / PROBE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"positions": ",".join(map(str, positions)), "sequences": str(tokens.shape[0])}
    atomic_write(path, lambda p: save_file(stored, str(p), metadata=meta))
    return path


def read_probes(cfg: ExperimentConfig, root: str | Path | None = None) -> dict[int, torch.Tensor]:
    """``{step: activations}`` of a run's stored probe; ``FileNotFoundError`` naming the notebook
    to run when there is none."""
    path = RunPaths.of(cfg, root).tables / PROBE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no stored probe for {cfg.run.name} ({path}): run its notebook 06.")
    return {int(k): v for k, v in load_file(str(path)).items()}


class ProbeCache:
    """Stored probes of a preset's runs, read on demand; ``cka`` compares two (scheme, seed, step)
    checkpoints with the debiased linear CKA. A probe that is not there leaves the value empty and
    records why in ``errors``, so a missing one does not stop the comparison."""

    def __init__(self, preset: str, root: str | Path):
        self.preset, self.root = preset, resolve_root(root)
        self._runs: dict[str, dict[int, torch.Tensor] | None] = {}
        self.errors: dict[str, str] = {}

    def get(self, scheme: str, seed: int, step: int) -> torch.Tensor | None:
        run = f"{scheme}-s{seed}"
        if run not in self._runs:
            try:
                self._runs[run] = read_probes(experiment(self.preset, scheme, int(seed)), self.root)
            except (FileNotFoundError, ValueError, OSError) as e:
                self.errors[run] = f"{type(e).__name__}: {e}"
                self._runs[run] = None
        probes = self._runs[run]
        if probes is None:
            return None
        if int(step) not in probes:
            self.errors[f"{run}@{int(step)}"] = f"no probe at step {int(step)} (kept: {sorted(probes)})"
            return None
        return probes[int(step)]

    def cka(self, a: tuple[str, int, int], b: tuple[str, int, int]) -> float:
        """Debiased linear CKA of two checkpoints' probes (nan if either is missing)."""
        xa, xb = self.get(*a), self.get(*b)
        if xa is None or xb is None:
            return float("nan")
        return linear_cka(xa.float(), xb.float(), debiased=True)
