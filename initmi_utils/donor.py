"""Training the ``seeded`` scheme's donor: a job above the registry, run before the seeded run.

``initmi_utils.seeded`` embeds a trained donor and never trains one; this module trains it with
the ordinary training loop (``train.train``), once per (donor config, init seed), under
``checkpoints/<preset>/_donors/<donor name>/<donor scheme>/seed<k>/``, and returns the cached run
afterwards. The pipeline runs it as a job of its own before every run of that seed that reads
the donor (the seeded run's training, every scheme's persistence scores in notebook 03).

    python -m initmi_utils.donor --preset quick --seed 0 [--root DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import sys
from pathlib import Path

import pandas as pd

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ExperimentConfig, RunPaths, experiment
from initmi_utils.data import load_dataset
from initmi_utils.model import Transformer
from initmi_utils.offsets import model_mechanism
from initmi_utils.seeded import DONOR, DonorConfig, donor_experiment, load_donor
from initmi_utils.train import train


@contextlib.contextmanager
def _locked(path: Path):
    # Two processes (a pipeline worker and a user's notebook) may ask for the same donor at once:
    # one trains, the other waits and then reuses it.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def donor_metrics(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR,
                  progress: bool = False) -> pd.DataFrame:
    """The donor's training metrics (long format, as ``train.train``), training it first if no
    finished run is cached; concurrent callers wait for one another."""
    dcfg = donor_experiment(cfg, donor)
    with _locked(RunPaths.of(dcfg, root).checkpoints / ".lock"):
        return train(dcfg, root, progress=progress)  # returns at once when done.json exists


def train_donor(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR,
                progress: bool = False) -> Transformer:
    """The donor of ``cfg``'s run at its last step, trained first if no finished run is cached
    (``seeded.load_donor`` warns with a ``DonorWarning`` if it never reached induction)."""
    donor_metrics(cfg, root, donor, progress)
    return load_donor(cfg, root, donor)


def main(argv: list[str] | None = None) -> int:
    """Train (or reuse) one seed's donor and say what it learnt."""
    p = argparse.ArgumentParser(description="Train (or reuse) the donor of the `seeded` scheme for a preset and seed.")
    p.add_argument("--preset", default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="project root for checkpoints/ and data/ (default: this project)")
    a = p.parse_args(argv)
    try:
        cfg = experiment(a.preset, "seeded", a.seed)
        metrics = donor_metrics(cfg, a.root)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dcfg = donor_experiment(cfg)
    final = metrics[metrics.step == metrics.step.max()].set_index("metric").value
    acc = final.get("val_acc_induction_unambiguous", float("nan"))
    emerged = acc >= dcfg.train.emergence_threshold
    ckpts = list_checkpoints(dcfg, a.root)
    mechanism = model_mechanism(ckpts.load(ckpts.steps[-1])[0], load_dataset(dcfg, a.root).val)["label"]
    print(f"donor {dcfg.run.name}: step {int(metrics.step.max())}, unambiguous induction accuracy {acc:.3f}, mechanism {mechanism}"
          + ("" if emerged else f"; < {dcfg.train.emergence_threshold}: no induction circuit yet, so the seeded "
                                f"run of seed {a.seed} starts from a partial one (DonorWarning)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
