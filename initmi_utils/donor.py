"""Training the ``seeded`` scheme's donor: a job above the registry, run before the seeded run.

``initmi_utils.seeded`` embeds a trained donor and never trains one; this module runs the donor
policy (``seeded``'s module docstring) with the ordinary training loop (``train.train``): for a
student seed ``k`` it trains the candidate donors ``seeded.donor_seeds(k)`` (``k``, then
``100 (k + 1) + 1``, ``100 (k + 1) + 2``, ...) in order, each once per (donor config, donor seed)
under ``checkpoints/<preset>/_donors/<donor name>/<donor scheme>/seed<s>/``, until one learns
induction (else it takes the best and warns with a ``DonorWarning``), and records the choice in
``choice-seed<k>.json`` next to them (``seeded.donor_choice_path``). A recorded choice is reused at
once. The pipeline runs it as a job of its own before every run of that seed that reads the
donor (the seeded run's training, every scheme's persistence scores in notebook 03).

    python -m initmi_utils.donor --preset quick --seed 0 [--root DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
import warnings
from pathlib import Path

import pandas as pd

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ExperimentConfig, RunPaths, experiment
from initmi_utils.data import load_dataset
from initmi_utils.io import atomic_write_text
from initmi_utils.model import Transformer
from initmi_utils.offsets import model_mechanism
from initmi_utils.seeded import (
    DONOR,
    DONOR_MECHANISM,
    DONOR_METRIC,
    DonorConfig,
    DonorMissing,
    DonorWarning,
    donor_choice,
    donor_choice_path,
    donor_experiment,
    donor_outcome,
    donor_seeds,
    load_donor,
    not_emerged_message,
)
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


def final_mechanism(dcfg: ExperimentConfig, root: str | Path | None = None) -> str:
    """The mechanism label (``offsets.model_mechanism``) of a donor run's last checkpoint."""
    ckpts = list_checkpoints(dcfg, root)
    return model_mechanism(ckpts.load(ckpts.steps[-1])[0], load_dataset(dcfg, root).val)["label"]


def train_candidate(cfg: ExperimentConfig, donor_seed: int, root: str | Path | None = None, donor: DonorConfig = DONOR,
                    progress: bool = False) -> pd.DataFrame:
    """The training metrics of donor seed ``donor_seed`` for ``cfg``'s run (long format, as
    ``train.train``), training it first if no finished run is cached; concurrent callers wait."""
    dcfg = donor_experiment(cfg, donor, donor_seed)
    with _locked(RunPaths.of(dcfg, root).checkpoints / ".lock"):
        return train(dcfg, root, progress=progress)  # returns at once when done.json exists


def choose_donor(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR,
                 progress: bool = False) -> dict:
    """Run the donor policy for ``cfg``'s seed and return its choice (``seeded.donor_choice``'s
    dict): train the candidates ``donor_seeds(seed, donor)`` in order until one's final
    unambiguous induction accuracy reaches the emergence threshold, else choose the best (the
    earliest on ties) and warn with a ``DonorWarning`` naming the seeds tried. The choice is
    written atomically once; a recorded, valid one is returned without training."""
    path = donor_choice_path(cfg, root, donor)
    with _locked(path.with_name(f".{path.stem}.lock")):
        try:
            choice = donor_choice(cfg, root, donor)
        except DonorMissing:  # not chosen yet, or stale: decide (cached candidates cost nothing)
            candidates = []
            for seed in donor_seeds(cfg.run.seed, donor):
                train_candidate(cfg, seed, root, donor, progress)
                outcome = donor_outcome(donor_experiment(cfg, donor, seed), root)
                outcome["mechanism"] = final_mechanism(donor_experiment(cfg, donor, seed), root)
                outcome["qualifies"] = outcome["emerged"] and outcome["mechanism"] == DONOR_MECHANISM
                candidates.append(outcome)
                if outcome["qualifies"]:
                    break
            emerged = [c for c in candidates if c["qualifies"]]
            accuracy = [c["final_accuracy"] if c["final_accuracy"] == c["final_accuracy"] else -1.0 for c in candidates]
            best = emerged[0] if emerged else candidates[accuracy.index(max(accuracy))]
            dcfg = donor_experiment(cfg, donor)
            choice = {"preset": cfg.run.preset, "donor": donor.name(cfg.model), "donor_scheme": donor.scheme,
                      "student_seed": cfg.run.seed, "max_tries": donor.max_tries, "metric": DONOR_METRIC,
                      "emergence_threshold": dcfg.train.emergence_threshold, "candidates": candidates,
                      "criterion": DONOR_MECHANISM, "chosen_seed": best["seed"], "emerged": bool(emerged)}
            atomic_write_text(path, json.dumps(choice, indent=2, sort_keys=True))
    if not choice["emerged"]:
        warnings.warn(not_emerged_message(choice), DonorWarning, stacklevel=2)
    return choice


def donor_metrics(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR,
                  progress: bool = False) -> pd.DataFrame:
    """The chosen donor's training metrics (long format, as ``train.train``), running the donor
    policy first (``choose_donor``) if no choice is recorded; concurrent callers wait."""
    choice = choose_donor(cfg, root, donor, progress)
    return train_candidate(cfg, choice["chosen_seed"], root, donor)


def train_donor(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR,
                progress: bool = False) -> Transformer:
    """The chosen donor of ``cfg``'s run at its last step, running the donor policy first if no
    choice is recorded (``seeded.load_donor`` warns with a ``DonorWarning`` if none reached
    induction)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DonorWarning)  # load_donor says it once
        choose_donor(cfg, root, donor, progress)
    return load_donor(cfg, root, donor)


def main(argv: list[str] | None = None) -> int:
    """Run (or reuse) one seed's donor policy and say what each candidate and the chosen one learnt."""
    p = argparse.ArgumentParser(description="Train (or reuse) the donor of the `seeded` scheme for a preset and seed.")
    p.add_argument("--preset", default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="project root for checkpoints/ and data/ (default: this project)")
    a = p.parse_args(argv)
    try:
        cfg = experiment(a.preset, "seeded", a.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DonorWarning)  # said below, on stdout
            choice = choose_donor(cfg, a.root)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threshold = choice["emergence_threshold"]
    print(f"donor {choice['donor']} ({choice['donor_scheme']}) of seed {a.seed}, {a.preset}: candidates tried "
          f"(at most {choice['max_tries']}), first to reach unambiguous induction accuracy {threshold} with "
          f"mechanism {DONOR_MECHANISM} wins:")
    for c in choice["candidates"]:
        print(f"  seed {c['seed']}: step {c['final_step']}, accuracy {c['final_accuracy']:.3f}, "
              + (f"emerged at step {c['emerged_at']}" if c["emerged"] else "not emerged")
              + f", mechanism {c['mechanism']}")
    dcfg = donor_experiment(cfg, DONOR, choice["chosen_seed"])
    chosen = next(c for c in choice["candidates"] if c["seed"] == choice["chosen_seed"])
    tried = ", ".join(str(c["seed"]) for c in choice["candidates"])
    print(f"chosen: donor {dcfg.run.name} (seeds tried {tried}): step {chosen['final_step']}, unambiguous induction "
          f"accuracy {chosen['final_accuracy']:.3f}, mechanism {chosen['mechanism']}"
          + ("" if choice["emerged"] else f"; none reached {threshold} with {DONOR_MECHANISM}: no classic "
                                          f"induction circuit, so the seeded run of "
                                          f"seed {a.seed} starts from a partial one (DonorWarning)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
