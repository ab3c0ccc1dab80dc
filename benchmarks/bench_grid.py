"""What does the grid engine cost, and what would the study take on more workers?

    python benchmarks/bench_grid.py measure --preset smoke [--modes embedded,embedded1,external,ref:REF]
                                    [--repeats R] [--schemes a,b] [--seeds 0,1] [--keep]
    python benchmarks/bench_grid.py project --from-root ROOT --preset quick [--schemes a,b] [--seeds 0,1]
                                    [--workers 2,8,35,70] [--donors-from ROOT2] [--scale-to full]
                                    [--to-seeds 0,1,2,3,4] [--analysis-scale X]

``measure`` times a whole grid (``python -m initmi_utils.pipeline --preset P``, every notebook of
every run, then 07) in a fresh temporary ``--root`` per run, for each mode:

- ``embedded``: the embedded ``LocalCluster``, ``--workers 2``;
- ``embedded1``: the same with ``--workers 1`` (parallel efficiency = T(1 worker) / (2 x T(2 workers)));
- ``external``: a real ``dask scheduler`` and two ``dask worker`` processes (1 thread each) on
  127.0.0.1, started from the venv's ``bin`` before the clock starts and stopped after it, the
  pipeline given ``--scheduler ADDRESS``;
- ``ref:<git ref>``: the engine of an earlier commit: ``git archive <ref>`` extracted to a temp dir
  and its pipeline run from there with ``PYTHONPATH`` set to it, so its package shadows the
  editable install (its CLI took ``--workers N``; run with 2).

With ``--repeats R`` the modes alternate (A B C A B C ...), so load that drifts over minutes falls
on every mode alike; it reports each mode's median, min and max, the parallel efficiency, and the
ratios external / embedded and embedded / ref. Wall time is the pipeline command's, start to exit;
for ``external`` the cluster's start-up is reported separately. After each run of the current
engine its stamps are also fed to the projection below (``projected_s``: what the simulator
predicts for that grid on that many workers), a check of the simulator against the clock.
Results: ``benchmarks/results/bench_grid_<preset>.json`` (machine, date, torch, exact commands,
every sample).

``project`` reads a finished grid's measured job durations and replays them on N identical workers
(``list_schedule``), on the dependency graph the pipeline builds (``pipeline.plan`` and
``jobs.reads_donor``, as ``cluster.run_grid`` submits it):

- a seed's donor -> that seed's ``seeded`` training (01) and every run's 03 of that seed (its
  persistence baseline); a run's 01 -> its 02..06; every run's jobs -> 07;
- notebook jobs take the ``seconds`` of their stamps (``<notebook>.ok.json``);
- a donor job runs its seed's candidates one after another (``choice-seed<k>.json``); donors are not
  stamped, so each candidate's duration is read from its checkpoint files' modification times (step 0
  to its final step: the training, without the job's start-up and its final mechanism label), or,
  when those are missing, its ``final_step`` x the seconds per step of the donors measured that way,
  or x the students' 01 seconds per step (an overestimate: the donor is half as wide). The source is
  printed per donor. ``--donors-from ROOT2`` takes the donor choices of seeds ROOT did not run from
  another root (which candidates a seed tries and their final steps depend on the seeds and the
  code, not the machine), timed at ROOT's donor seconds per step; ROOT2 may also be a projection
  JSON this script wrote, whose recorded choices are used;
- ``--scale-to full`` projects another preset from these measurements: trainings x the ratio of
  training steps (``config.PRESETS``), donors x the ratio of their step caps (1 for quick -> full:
  both presets train the same donor, ``train.donor_steps`` = 8000, until 1000 steps after
  emergence), analyses x the ratio of the checkpoints they read (each run's checkpoints in the
  measured grid vs the target preset's ``train.checkpoint_schedule`` plus the same loss-ladder
  checkpoints; an upper bound: their fixed costs do not grow; ``--analysis-scale`` overrides it), 07
  x the ratio of the number of runs. Seeds the root did not run take the mean of the measured seeds
  of the same scheme (donors: of the measured donors), and are named. Without ``--analysis-scale``
  the projection is printed twice, analyses scaled and unscaled, the two ends of the range.

It prints, per N: the simulated makespan, the lower bound max(critical path, work / N), and the
workers' utilisation; the critical path job by job; the total work by kind. Results:
``benchmarks/results/bench_grid_projection_<preset>[_to_<preset>].json``.

Why a simulation: Dask has no what-if mode for a cluster one does not have, and a 35-run study is
hours per try. The simulation is the list scheduling the pipeline asks Dask for (priorities donor 30
> training 20 > analysis 10 > comparison 0, ties in submission order; ``worker-saturation: inf``
and work stealing approximate "a free worker takes the highest-priority ready task"); it ignores
the scheduler's latency (milliseconds against jobs of seconds to minutes) and the pipeline's start-up,
which ``measure`` shows as wall - simulated.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
KINDS = ("donor", "training", "analysis", "comparison")
DEFAULT_WORKERS = (2, 8, 35, 70)


# ---------------------------------------------------------------------------------------------
# The graph and its schedule: pure functions (only list_schedule's default priorities import initmi).


@dataclass(frozen=True)
class Task:
    """One job of the grid: ``deps`` are the names of the jobs it waits for; ``order`` is its
    submission order (Dask's tie-break among equal priorities)."""

    name: str
    kind: str
    seconds: float
    deps: tuple[str, ...] = ()
    order: int = 0


def _topological(tasks: Iterable[Task]) -> list[Task]:
    """The tasks in an order where every task follows its dependencies; a missing dependency or a
    cycle is an error (the pipeline's graph has neither)."""
    by_name = {t.name: t for t in tasks}
    for t in by_name.values():
        missing = [d for d in t.deps if d not in by_name]
        if missing:
            raise ValueError(f"task {t.name!r} depends on unknown task(s) {missing}")
    indegree = {n: len(set(t.deps)) for n, t in by_name.items()}
    children: dict[str, list[str]] = {n: [] for n in by_name}
    for t in by_name.values():
        for d in set(t.deps):
            children[d].append(t.name)
    ready = sorted((by_name[n].order, n) for n, k in indegree.items() if k == 0)
    heapq.heapify(ready)
    out = []
    while ready:
        _, n = heapq.heappop(ready)
        out.append(by_name[n])
        for c in children[n]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, (by_name[c].order, c))
    if len(out) != len(by_name):
        raise ValueError(f"the graph has a cycle through {sorted(n for n, k in indegree.items() if k)}")
    return out


def critical_path(tasks: Iterable[Task]) -> tuple[float, list[str]]:
    """The longest chain of dependent jobs (sum of their seconds) and its jobs, first to last: no
    number of workers finishes the grid sooner."""
    order = _topological(tasks)
    finish: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for t in order:
        before = max(t.deps, key=lambda d: finish[d], default=None)
        finish[t.name] = t.seconds + (finish[before] if before is not None else 0.0)
        via[t.name] = before
    if not finish:
        return 0.0, []
    end = max(finish, key=finish.get)
    path = [end]
    while via[path[-1]] is not None:
        path.append(via[path[-1]])
    return finish[end], path[::-1]


def total_work(tasks: Iterable[Task]) -> float:
    return sum(t.seconds for t in tasks)


def lower_bound(tasks: Iterable[Task], workers: int) -> float:
    """max(critical path, work / workers): no schedule on ``workers`` identical workers is shorter."""
    tasks = list(tasks)
    return max(critical_path(tasks)[0], total_work(tasks) / workers)


@dataclass
class Schedule:
    makespan: float
    start: dict[str, float] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)
    worker: dict[str, int] = field(default_factory=dict)


def list_schedule(tasks: Iterable[Task], workers: int, priority: dict[str, int] | None = None) -> Schedule:
    """Simulate the grid on ``workers`` identical workers: whenever a worker is free it takes the
    ready job of highest ``priority[kind]`` (default: ``cluster.PRIORITY``, the pipeline's), ties in
    submission order; a job is ready when every job it depends on has finished.

    Why simulate rather than run: Dask cannot tell what a cluster one does not have would do, and
    the full study takes hours per try. This greedy rule is what the pipeline runs
    (``cluster.dispatch``); Graham's bound makes it at most
    work / N + (1 - 1/N) x critical path, whatever the graph.
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if priority is None:
        from initmi_utils.cluster import PRIORITY as priority  # noqa: N811
    order = _topological(tasks)  # validates the graph
    by_name = {t.name: t for t in order}
    waiting = {t.name: len(set(t.deps)) for t in order}
    children: dict[str, list[str]] = {t.name: [] for t in order}
    for t in order:
        for d in set(t.deps):
            children[d].append(t.name)
    ready: list[tuple[int, int, str]] = []

    def push(name: str) -> None:
        t = by_name[name]
        heapq.heappush(ready, (-priority[t.kind], t.order, name))

    for t in order:
        if waiting[t.name] == 0:
            push(t.name)
    free = list(range(workers))
    heapq.heapify(free)
    running: list[tuple[float, int, str, int]] = []  # (end, order, name, worker)
    out = Schedule(0.0)
    now = 0.0
    while ready or running:
        while ready and free:
            _, _, name = heapq.heappop(ready)
            w = heapq.heappop(free)
            out.start[name], out.worker[name] = now, w
            out.end[name] = now + by_name[name].seconds
            heapq.heappush(running, (out.end[name], by_name[name].order, name, w))
        now = running[0][0]
        while running and running[0][0] <= now:  # every job ending now frees its worker first
            _, _, name, w = heapq.heappop(running)
            heapq.heappush(free, w)
            for c in children[name]:
                waiting[c] -= 1
                if waiting[c] == 0:
                    push(c)
    out.makespan = max(out.end.values(), default=0.0)
    return out


def checkpoint_ratio(measured: Iterable[int], schedule_from: Iterable[int], schedule_to: Iterable[int]) -> float:
    """How many more checkpoints a run of the target preset has to analyse: the measured run's
    checkpoints are its preset's schedule plus its loss-ladder checkpoints; the target run is
    assumed to have the target schedule plus the same ladder checkpoints (the presets share lr,
    warm-up and data, so the shorter run is a prefix of the longer one and reaches the same
    levels at the same steps)."""
    measured, schedule_from = set(measured), set(schedule_from)
    ladder = measured - schedule_from
    return len(set(schedule_to) | ladder) / len(measured)


# ---------------------------------------------------------------------------------------------
# The pipeline's graph, with durations.


def dag_from_plan(chains: list[list], finals: list, seconds: Callable[[object], float],
                  donor_seconds: Callable[[int], float]) -> list[Task]:
    """The ``Task`` graph of the pipeline's plan (``pipeline.plan``'s chains and finals), as
    ``cluster.run_grid`` submits it: a donor per seed some job reads (``jobs.reads_donor``) first,
    then every run's jobs with their ``depends`` plus that donor, then the comparison jobs after
    every run's jobs. ``seconds(job)`` and ``donor_seconds(seed)`` give the durations."""
    from initmi_utils.jobs import reads_donor

    jobs = [j for chain in chains for j in chain]
    seeds = sorted({j.parameters["seed"] for j in jobs if reads_donor(j)})
    tasks, order = [], 0
    for seed in seeds:
        tasks.append(Task(f"donor s{seed}", "donor", donor_seconds(seed), (), order))
        order += 1
    for j in jobs:
        deps = [d.label for d in j.depends]
        if reads_donor(j):
            deps.append(f"donor s{j.parameters['seed']}")
        tasks.append(Task(j.label, j.kind, seconds(j), tuple(deps), order))
        order += 1
    for j in finals:
        tasks.append(Task(j.label, j.kind, seconds(j), tuple(d.label for d in j.depends), order))
        order += 1
    return tasks


def _plan(preset: str, schemes: list[str], seeds: list[int], root: Path):
    from initmi_utils.jobs import discover
    from initmi_utils.pipeline import plan

    return plan(preset, schemes, seeds, discover(), root, {})


def _stamp_seconds(job) -> float | None:
    try:
        return float(json.loads(job.stamp.read_text())["seconds"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def _step_files(folder: Path) -> dict[int, Path]:
    return {int(p.stem.split("_")[1]): p for p in folder.glob("step_*.safetensors")}


def donor_measurements(root: Path, preset: str, seeds: list[int], train_s_per_step: float | None,
                       donors_from: list[Path] = ()) -> dict:
    """Per seed: its donor job's estimated seconds (its candidates, one after another), and per
    candidate the seconds and where they came from (``mtime``: its checkpoint files in ``root``;
    ``donor s/step``: final_step x the median of the mtime-measured donors' seconds per step;
    ``01 s/step``: final_step x the students' training seconds per step). A seed without a choice
    file but with a trained donor of its own seed counts that one candidate (roots from before the
    donor policy). A seed ``root`` has no donor of is looked up in ``donors_from``, other roots of the
    same preset: which candidates a seed tries, and their final steps, depend on the seeds and the
    code, not on the machine, so only their seconds are taken from ``root``'s measured donors."""
    from initmi_utils.config import RunPaths, experiment
    from initmi_utils.seeded import donor_choice_path, donor_experiment

    out: dict[int, dict] = {}
    for seed in seeds:
        cfg = experiment(preset, "seeded", seed)
        for where in [root, *donors_from]:
            if where.suffix == ".json":  # a projection written by this script: the choices it recorded
                recorded = json.loads(where.read_text())["measured"]["donors"].get(str(seed))
                if recorded:
                    candidates = [{"seed": c["seed"], "final_step": c["final_step"]}
                                  for c in recorded["candidates"]]
                    source = f"{where} (recorded from {recorded['choice']})"
                    break
                continue
            path = donor_choice_path(cfg, where)
            done = RunPaths.of(donor_experiment(cfg), where).checkpoints / "done.json"
            if path.exists():
                candidates = [{"seed": c["seed"], "final_step": int(c["final_step"])}
                              for c in json.loads(path.read_text())["candidates"]]
                source = str(path)
                break
            if done.exists():
                candidates = [{"seed": seed, "final_step": int(json.loads(done.read_text())["final_step"])}]
                source = f"{done} (no choice file: its own seed only)"
                break
        else:
            continue
        for c in candidates:
            if where != root:
                continue
            files = _step_files(RunPaths.of(donor_experiment(cfg, donor_seed=c["seed"]), root).checkpoints)
            if 0 in files and c["final_step"] in files and c["final_step"] > 0:
                span = files[c["final_step"]].stat().st_mtime - files[0].stat().st_mtime
                if span > 0:
                    c["seconds"], c["how"] = span, "mtime"
        out[seed] = {"candidates": candidates, "choice": source}
    measured = [c["seconds"] / c["final_step"] for d in out.values() for c in d["candidates"] if "seconds" in c]
    for d in out.values():
        for c in d["candidates"]:
            if "seconds" in c:
                continue
            if measured:
                c["seconds"], c["how"] = c["final_step"] * statistics.median(measured), "donor s/step"
            elif train_s_per_step:
                c["seconds"], c["how"] = c["final_step"] * train_s_per_step, "01 s/step (overestimate)"
            else:
                raise SystemExit(f"no way to time the donor candidates of {d['choice']}: no donor checkpoints "
                                 f"and no measured training")
        d["seconds"] = sum(c["seconds"] for c in d["candidates"])
    return out


def measured_grid(root: Path, preset: str, schemes: list[str], seeds: list[int],
                  donors_from: list[Path] = ()) -> dict:
    """Everything ``project`` needs from a finished (or partly finished) grid root: per job label
    its stamped seconds (None when not stamped), its kind, the run's analysed checkpoints (its
    ``done.json``), and the donors (``donor_measurements``)."""
    from initmi_utils.config import RunPaths, experiment

    chains, finals = _plan(preset, schemes, seeds, root)
    jobs = {}
    for j in [j for c in chains for j in c] + finals:
        jobs[j.label] = {"kind": j.kind, "seconds": _stamp_seconds(j), "notebook": j.notebook.number,
                         "scheme": j.parameters.get("scheme"), "seed": j.parameters.get("seed")}
    checkpoints, steps = {}, {}
    for scheme in schemes:
        for seed in seeds:
            done = RunPaths.of(experiment(preset, scheme, seed), root).checkpoints / "done.json"
            if done.exists():
                d = json.loads(done.read_text())
                checkpoints[f"{scheme}-s{seed}"] = d["checkpoints"]
                steps[f"{scheme}-s{seed}"] = d["final_step"]
    per_step = [v["seconds"] / steps[f"{v['scheme']}-s{v['seed']}"] for v in jobs.values()
                if v["kind"] == "training" and v["seconds"] and steps.get(f"{v['scheme']}-s{v['seed']}")]
    donor_seeds = sorted(set(seeds).union(*(_choice_seeds(r, preset) for r in donors_from)))
    donors = donor_measurements(root, preset, donor_seeds, statistics.median(per_step) if per_step else None,
                                list(donors_from))
    return {"root": str(root), "preset": preset, "schemes": schemes, "seeds": seeds, "jobs": jobs,
            "checkpoints": checkpoints, "donors": donors}


def _choice_seeds(root: Path, preset: str) -> set[int]:
    """The student seeds whose donor choice ``root`` holds (``choice-seed<k>.json``; in a projection's
    JSON, the donors it recorded)."""
    from initmi_utils.config import experiment
    from initmi_utils.seeded import donor_choice_path

    if root.suffix == ".json":
        return {int(k) for k in json.loads(root.read_text())["measured"]["donors"]}

    folder = donor_choice_path(experiment(preset, "seeded", 0), root).parent
    found = (re.fullmatch(r"choice-seed(\d+)", p.stem) for p in folder.glob("choice-seed*.json"))
    return {int(m.group(1)) for m in found if m}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def project_tasks(m: dict, to_preset: str | None = None, to_seeds: list[int] | None = None,
                  analysis_scale: float | None = None) -> tuple[list[Task], list[str]]:
    """The task graph of ``m``'s grid (``measured_grid``) or, with ``to_preset``, of that preset's
    grid over the same schemes and ``to_seeds`` (default the preset's seeds), with durations scaled
    as the module docstring says. Returns the tasks and the assumptions made (filled-in jobs,
    factors), to be printed with the numbers."""
    from initmi_utils.config import PRESET_SEEDS, PRESETS, experiment

    preset, notes, filled = to_preset or m["preset"], [], []
    seeds = to_seeds or (list(PRESET_SEEDS[preset]) if to_preset else m["seeds"])
    jobs = m["jobs"]
    train_f = donor_f = comparison_f = 1.0
    ckpt_f: dict[str, float] = {}
    if to_preset:
        n_from = len(m["schemes"]) * len(m["seeds"])
        comparison_f = len(m["schemes"]) * len(seeds) / n_from
        if comparison_f != 1:
            notes.append(f"07 x {comparison_f:g} (runs {len(m['schemes']) * len(seeds)} / {n_from}; a guess: "
                         f"its tables grow with the runs)")
    if to_preset and to_preset != m["preset"]:
        from initmi_utils.seeded import donor_experiment
        from initmi_utils.train import checkpoint_schedule

        src, dst = PRESETS[m["preset"]].train, PRESETS[to_preset].train
        train_f = dst.steps / src.steps
        donor_f = (donor_experiment(experiment(to_preset, "seeded")).train.steps
                   / donor_experiment(experiment(m["preset"], "seeded")).train.steps)
        for run, ckpts in m["checkpoints"].items():
            ckpt_f[run] = checkpoint_ratio(ckpts, checkpoint_schedule(src), checkpoint_schedule(dst))
        notes.append(f"training x {train_f:g} ({dst.steps} / {src.steps} steps)")
        caps = [donor_experiment(experiment(p, "seeded")).train.steps for p in (to_preset, m["preset"])]
        notes.append(f"donor candidates x {donor_f:g} (step cap {caps[0]} / {caps[1]}; they stop 1000 steps "
                     f"after emergence in both)")
        if analysis_scale is None:
            if ckpt_f:
                lo, hi = min(ckpt_f.values()), max(ckpt_f.values())
                notes.append(f"analyses x the run's checkpoint ratio ({lo:.2f}-{hi:.2f}: {len(checkpoint_schedule(dst))} "
                             f"scheduled checkpoints vs {len(checkpoint_schedule(src))}, plus the run's loss-ladder "
                             f"checkpoints; an upper bound, their fixed costs do not grow)")
            else:
                raise SystemExit("no done.json in the root: cannot scale the analyses; give --analysis-scale")
    if analysis_scale is not None:
        notes.append(f"analyses x {analysis_scale:g} instead of the checkpoint ratio")

    def measured(number: str, scheme: str | None, seed: int | None) -> float:
        if scheme is None:
            found = [v["seconds"] for v in jobs.values() if v["notebook"] == number and v["seconds"] is not None]
            if not found:
                raise SystemExit(f"notebook {number} has no stamp in {m['root']}")
            return found[0]
        exact = [v["seconds"] for v in jobs.values()
                 if (v["notebook"], v["scheme"], v["seed"]) == (number, scheme, seed) and v["seconds"] is not None]
        if exact:
            return exact[0]
        same = _mean([v["seconds"] for v in jobs.values()
                      if (v["notebook"], v["scheme"]) == (number, scheme) and v["seconds"] is not None])
        if same is None:
            same = _mean([v["seconds"] for v in jobs.values()
                          if v["notebook"] == number and v["seconds"] is not None])
            filled.append(f"{number} {scheme}-s{seed} (mean of that notebook over all schemes)")
        else:
            filled.append(f"{number} {scheme}-s{seed} (mean of its scheme's measured seeds)")
        if same is None:
            raise SystemExit(f"notebook {number} has no stamp in {m['root']}")
        return same

    def seconds(job) -> float:
        scheme, seed, number = job.parameters.get("scheme"), job.parameters.get("seed"), job.notebook.number
        s = measured(number, scheme, seed)
        if job.kind == "training":
            return s * train_f
        if job.kind == "analysis":
            if analysis_scale is not None:
                return s * analysis_scale
            if ckpt_f:
                f = ckpt_f.get(f"{scheme}-s{seed}") or _mean([v for k, v in ckpt_f.items()
                                                               if k.startswith(f"{scheme}-s")])
                return s * (f if f is not None else _mean(list(ckpt_f.values())))
            return s
        return s * comparison_f

    def donor_seconds(seed: int) -> float:
        d = m["donors"].get(seed) or m["donors"].get(str(seed))
        if d is None:
            measured_donors = [v["seconds"] for v in m["donors"].values()]
            if not measured_donors:
                raise SystemExit(f"no donor measured in {m['root']}")
            filled.append(f"donor s{seed} (mean of the measured donors)")
            return _mean(measured_donors) * donor_f
        return d["seconds"] * donor_f

    chains, finals = _plan(preset, m["schemes"], seeds, Path(m["root"]))
    tasks = dag_from_plan(chains, finals, seconds, donor_seconds)
    groups: dict[str, list[str]] = {}
    for item in filled:
        label, _, how = item.partition(" (")
        groups.setdefault(how.rstrip(")"), []).append(label)
    for how, labels in groups.items():
        notes.append(f"{len(labels)} job(s) not measured, each the {how}: "
                     + ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else ""))
    return tasks, notes


def projection(tasks: list[Task], workers: Iterable[int]) -> dict:
    cp, path = critical_path(tasks)
    work = total_work(tasks)
    by_kind = {k: sum(t.seconds for t in tasks if t.kind == k) for k in KINDS}
    seconds = {t.name: t.seconds for t in tasks}
    rows = []
    for n in workers:
        s = list_schedule(tasks, n)
        bound = max(cp, work / n)
        rows.append({"workers": n, "makespan_s": s.makespan, "lower_bound_s": bound,
                     "makespan_over_bound": s.makespan / bound if bound else 1.0,
                     "utilisation": work / (n * s.makespan) if s.makespan else 1.0})
    return {"jobs": len(tasks), "work_s": work, "work_by_kind_s": by_kind, "critical_path_s": cp,
            "critical_path": [{"job": name, "seconds": seconds[name]} for name in path], "rows": rows}


def _hm(seconds: float) -> str:
    m = seconds / 60
    return f"{seconds:7.0f} s ({m / 60:.2f} h)" if m >= 60 else f"{seconds:7.0f} s ({m:.1f} min)"


def print_projection(p: dict, title: str, notes: list[str]) -> None:
    print(f"\n== {title}: {p['jobs']} jobs")
    for n in notes:
        print(f"   assumption: {n}")
    print(f"   total work {_hm(p['work_s'])} = " + ", ".join(f"{k} {v:.0f} s" for k, v in p["work_by_kind_s"].items()))
    print(f"   critical path {_hm(p['critical_path_s'])}: "
          + " -> ".join(f"{c['job']} ({c['seconds']:.0f} s)" for c in p["critical_path"]))
    print(f"   {'workers':>7}  {'makespan':>22}  {'lower bound':>22}  {'/ bound':>7}  {'utilisation':>11}")
    for r in p["rows"]:
        print(f"   {r['workers']:7d}  {_hm(r['makespan_s']):>22}  {_hm(r['lower_bound_s']):>22}  "
              f"{r['makespan_over_bound']:7.2f}  {r['utilisation']:10.0%}")


# ---------------------------------------------------------------------------------------------
# Measuring whole grids.


def machine() -> dict:
    """CPU model, cores, load, torch version (from its metadata: this process imports no torch)."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if cpu == "unknown" and shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), cpu)
    versions = {}
    for pkg in ("torch", "distributed", "transformer-lens"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **versions,
            "git_head": git, "work_tree_modified": bool(dirty), "load_avg_at_start": os.getloadavg()}


DONE = re.compile(r"^done in (\d+)s: (.*)$", re.M)


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class ExternalCluster:
    """A ``dask scheduler`` and two ``dask worker`` processes (1 thread each) on 127.0.0.1, the
    venv's own commands, as the README tells a cluster user to start them."""

    def __init__(self, workdir: Path, workers: int = 2, cwd: Path = REPO, env: dict | None = None):
        self.workdir, self.n, self.procs, self.cwd, self.env = workdir, workers, [], cwd, env
        self.commands: list[str] = []
        self.address = ""
        self.startup_s = 0.0
        self.logs: list = []

    def _log(self, name: str):
        self.logs.append(open(self.workdir / f"{name}.log", "w"))
        return self.logs[-1]

    def __enter__(self) -> "ExternalCluster":
        t0 = time.perf_counter()
        sf = self.workdir / "scheduler.json"
        cmd = [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", str(sf),
               "--no-dashboard"]
        self.commands.append(shlex.join(cmd))
        self.procs.append(subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=self._log("scheduler"),
                                           stderr=subprocess.STDOUT))
        try:
            _wait_for(lambda: sf.exists() and sf.stat().st_size, 300, "the scheduler file")
            self.address = json.loads(sf.read_text())["address"]
            for i in range(self.n):
                cmd = [str(BIN / "dask"), "worker", self.address, "--nthreads", "1", "--nworkers", "1",
                       "--host", "127.0.0.1", "--no-dashboard", "--name", f"bench-w{i}"]
                self.commands.append(shlex.join(cmd))
                self.procs.append(subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=self._log(f"worker{i}"),
                                                   stderr=subprocess.STDOUT))
            from distributed import Client

            with Client(self.address, timeout="60s") as client:
                client.wait_for_workers(self.n, timeout=600)  # both, before the clock starts
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        _stop(self.procs[1:])  # the workers, then the scheduler
        _stop(self.procs[:1])
        for f in self.logs:
            f.close()


def _extract_ref(ref: str, into: Path) -> dict:
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", sha], capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return {"ref": ref, "commit": sha, "dir": str(into)}


def _with_path(env: dict, directory: str) -> dict:
    """``env`` with ``directory`` first on ``PYTHONPATH``: its ``initmi_utils`` shadows the editable
    install (which setuptools puts on ``sys.meta_path`` after the path finder), in this process's
    children and in every kernel they start."""
    return env | {"PYTHONPATH": directory + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")}


def snapshot_worktree(into: Path) -> Path:
    """A copy of the work tree's package, notebooks and ``pyproject.toml``, run instead of the work
    tree itself. Why: on a shared machine others edit ``initmi_utils`` while a grid runs, and the
    engine then rightly refuses the next job (its workers' source no longer matches the plan), so a
    benchmark of the live tree loses runs to other people's edits."""
    into.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    for name in ("initmi_utils", "notebooks"):
        shutil.copytree(REPO / name, into / name, ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", into / "pyproject.toml")
    return into


def run_once(mode: str, preset: str, passthrough: list[str], work: Path, refs: dict, keep: bool,
             check_projection: bool, snapshot: Path | None = None) -> dict:
    """One grid in a fresh root under ``work``; returns its sample (wall, exit, counts, commands).
    The current engine runs from ``snapshot`` when given (``snapshot_worktree``), else from the work
    tree."""
    root = Path(tempfile.mkdtemp(prefix=f"root-{mode.replace(':', '-')}-", dir=work))
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    cmd = [sys.executable, "-m", "initmi_utils.pipeline", "--preset", preset, "--root", str(root), *passthrough]
    cwd, sample, cluster = REPO, {"mode": mode, "root": str(root)}, None
    if snapshot is not None and not mode.startswith("ref:"):
        cwd, env = snapshot, _with_path(env, str(snapshot))
    if mode == "embedded":
        cmd += ["--workers", "2"]
    elif mode == "embedded1":
        cmd += ["--workers", "1"]
    elif mode == "external":
        cluster = ExternalCluster(Path(tempfile.mkdtemp(prefix="cluster-", dir=work)), cwd=cwd, env=env)
    elif mode.startswith("ref:"):
        ref = refs[mode]
        cmd += ["--workers", "2"]
        cwd, env = Path(ref["dir"]), _with_path(env, ref["dir"])
        sample["commit"] = ref["commit"]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    log = root.parent / f"{root.name}.log"
    try:
        if cluster is not None:
            cluster.__enter__()
            cmd += ["--scheduler", cluster.address]
            sample["cluster_commands"] = cluster.commands
            sample["cluster_startup_s"] = cluster.startup_s
        path = f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} " if env.get("PYTHONPATH") else ""
        sample["command"] = f"(cd {shlex.quote(str(cwd))} && {path}{shlex.join(cmd)})"
        print(f"$ {sample['command']}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        sample["wall_s"] = time.perf_counter() - t0
    finally:
        if cluster is not None:
            cluster.__exit__(None, None, None)
    text = log.read_text()
    done = DONE.findall(text)
    sample |= {"exit": rc, "pipeline_done": done[-1][1] if done else None, "load_avg_after": os.getloadavg()}
    if rc:
        sample["log_tail"] = text.splitlines()[-30:]
    print(f"   {mode}: {sample['wall_s']:.1f} s, exit {rc}, {sample['pipeline_done']}", flush=True)
    if check_projection and not mode.startswith("ref:") and rc == 0:
        try:
            schemes, seeds = _grid_selection(preset, passthrough)
            m = measured_grid(root, preset, schemes, seeds)
            n = {"embedded": 2, "embedded1": 1, "external": 2}[mode]
            tasks, _ = project_tasks(m)
            sample["projected_s"] = list_schedule(tasks, n).makespan
            sample["critical_path_s"] = critical_path(tasks)[0]
            sample["work_s"] = total_work(tasks)
            print(f"   simulated on {n} worker(s) from its stamps: {sample['projected_s']:.1f} s "
                  f"(wall - simulated = {sample['wall_s'] - sample['projected_s']:.1f} s)", flush=True)
        except Exception as e:  # a check, never the reason a measurement is lost
            sample["projection_error"] = f"{type(e).__name__}: {e}"
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return sample


def _grid_selection(preset: str, passthrough: list[str]) -> tuple[list[str], list[int]]:
    """The schemes and seeds the pipeline runs for these arguments (its own defaults)."""
    import initmi_utils.seeded  # noqa: F401  (registers `seeded`)
    from initmi_utils.config import PRESET_SEEDS
    from initmi_utils.schemes import SCHEMES

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--schemes", default="")
    p.add_argument("--seeds", default="")
    a, _ = p.parse_known_args(passthrough)
    return ([s for s in a.schemes.split(",") if s] or list(SCHEMES),
            [int(s) for s in a.seeds.split(",") if s] or list(PRESET_SEEDS[preset]))


def summarise(samples: list[dict], modes: list[str]) -> dict:
    out: dict = {}
    for mode in modes:
        walls = [s["wall_s"] for s in samples if s["mode"] == mode and s["exit"] == 0]
        failed = sum(s["mode"] == mode and s["exit"] != 0 for s in samples)
        out[mode] = {"n": len(walls), "failed": failed, "median_s": statistics.median(walls) if walls else None,
                     "min_s": min(walls, default=None), "max_s": max(walls, default=None)}
    med = {k: v["median_s"] for k, v in out.items()}
    ratios = {}
    if med.get("embedded") and med.get("embedded1"):
        ratios["parallel_efficiency"] = med["embedded1"] / (2 * med["embedded"])
    if med.get("embedded") and med.get("external"):
        ratios["external_over_embedded"] = med["external"] / med["embedded"]
    for mode in modes:
        if mode.startswith("ref:") and med.get(mode) and med.get("embedded"):
            ratios[f"embedded_over_{mode}"] = med["embedded"] / med[mode]
    return {"modes": out, "ratios": ratios}


def cmd_measure(a) -> int:
    modes = [m for m in a.modes.split(",") if m]
    passthrough = [*(["--schemes", a.schemes] if a.schemes else []), *(["--seeds", a.seeds] if a.seeds else []),
                   *a.pipeline_args]
    mach = machine()
    print(f"{mach['cpu']} | {mach['cores']} cores | torch {mach['torch']} | distributed {mach['distributed']} | "
          f"load {mach['load_avg_at_start'][0]:.2f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="initmi-bench-grid-"))
    refs = {m: _extract_ref(m.split(":", 1)[1], work / f"ref-{i}")
            for i, m in enumerate(modes) if m.startswith("ref:")}
    snapshot = None if a.live else snapshot_worktree(work / "worktree")
    samples, started = [], datetime.now(timezone.utc)
    try:
        for r in range(a.repeats):
            for mode in modes:
                try:
                    s = run_once(mode, a.preset, passthrough, work, refs, a.keep, not a.no_projection, snapshot)
                except Exception as e:  # e.g. a cluster that did not start: record it, keep the other samples
                    print(f"   {mode}: not measured ({type(e).__name__}: {e})", flush=True)
                    s = {"mode": mode, "exit": -1, "wall_s": None, "error": f"{type(e).__name__}: {e}"}
                samples.append(s | {"repeat": r})
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    summary = summarise(samples, modes)
    print(f"\n== {a.preset}{' ' + ' '.join(passthrough) if passthrough else ''}: wall time per mode "
          f"({a.repeats} alternated round(s))")
    for mode, v in summary["modes"].items():
        if v["n"]:
            print(f"   {mode:24s} median {v['median_s']:8.1f} s   min {v['min_s']:8.1f}   max {v['max_s']:8.1f}   "
                  f"n {v['n']}" + (f"   ({v['failed']} failed)" if v["failed"] else ""))
        else:
            print(f"   {mode:24s} no successful run ({v['failed']} failed)")
    for k, v in summary["ratios"].items():
        print(f"   {k} = {v:.3f}")
    result = {"preset": a.preset, "pipeline_args": passthrough, "repeats": a.repeats, "modes": modes,
              "current_engine": "the work tree itself (--live)" if a.live else
              "a copy of the work tree's initmi_utils/, notebooks/ and pyproject.toml taken at start",
              "when": started.isoformat(timespec="seconds"), "machine": mach | {"load_avg_at_end": os.getloadavg()},
              "refs": {m: {k: v for k, v in r.items() if k != "dir"} for m, r in refs.items()},
              "samples": samples, **summary}
    out = a.out or RESULTS / f"bench_grid_{a.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0 if all(s["exit"] == 0 for s in samples) else 1


def cmd_project(a) -> int:
    root = a.from_root.resolve()
    schemes, seeds = _grid_selection(a.preset, [*(["--schemes", a.schemes] if a.schemes else []),
                                                *(["--seeds", a.seeds] if a.seeds else [])])
    workers = [int(w) for w in a.workers.split(",") if w]
    m = measured_grid(root, a.preset, schemes, seeds, [r.resolve() for r in a.donors_from])
    stamped = sum(v["seconds"] is not None for v in m["jobs"].values())
    print(f"{root}: {a.preset}, {len(schemes)} schemes x seeds {seeds}: {stamped}/{len(m['jobs'])} jobs stamped, "
          f"donors of seeds {sorted(m['donors'])}")
    for seed, d in sorted(m["donors"].items()):
        print(f"   donor s{seed}: {d['seconds']:.0f} s = " + " + ".join(
            f"seed {c['seed']} {c['final_step']} steps {c['seconds']:.0f} s [{c['how']}]" for c in d["candidates"]))
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine_now": machine(),
              "measured": m, "projections": {}}
    tasks, notes = project_tasks(m)
    p = projection(tasks, workers)
    print_projection(p, f"{a.preset} as measured", notes)
    result["projections"][a.preset] = p | {"assumptions": notes}
    if a.scale_to:
        to_seeds = [int(s) for s in a.to_seeds.split(",") if s] or None
        tasks, notes = project_tasks(m, a.scale_to, to_seeds, a.analysis_scale)
        p = projection(tasks, workers)
        print_projection(p, f"{a.scale_to} projected from {a.preset}", notes)
        result["projections"][a.scale_to] = p | {"assumptions": notes}
        if a.analysis_scale is None:  # the checkpoint ratio is an upper bound: show the other end too
            tasks, notes = project_tasks(m, a.scale_to, to_seeds, 1.0)
            p = projection(tasks, workers)
            print_projection(p, f"{a.scale_to} projected from {a.preset}, analyses unscaled (lower end)", notes)
            result["projections"][f"{a.scale_to}, analyses x1"] = p | {"assumptions": notes}
    out = a.out or RESULTS / f"bench_grid_projection_{a.preset}{f'_to_{a.scale_to}' if a.scale_to else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"-> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="time whole grids per engine mode, alternated",
                       description="Time a preset's whole grid in fresh temp roots, per mode, modes alternated "
                                   "(A B A B ...). Arguments after -- go to the pipeline unchanged.")
    m.add_argument("--preset", default="smoke", help="smoke or quick (default smoke)")
    m.add_argument("--modes", default="embedded,embedded1,external",
                   help="comma-separated: embedded (--workers 2), embedded1 (--workers 1), external (dask scheduler "
                        "+ 2 dask workers), ref:<git ref> (that commit's engine, --workers 2)")
    m.add_argument("--repeats", type=int, default=1, help="alternated rounds (default 1)")
    m.add_argument("--schemes", default="", help="passed to the pipeline (default: all registered)")
    m.add_argument("--seeds", default="", help="passed to the pipeline (default: the preset's)")
    m.add_argument("--keep", action="store_true", help="keep the temp roots and logs (the path is printed)")
    m.add_argument("--live", action="store_true",
                   help="run the work tree itself, not a copy taken at start (edits made meanwhile then reach "
                        "the workers, and the engine refuses the jobs after them)")
    m.add_argument("--no-projection", action="store_true", help="skip simulating each measured grid from its stamps")
    m.add_argument("--out", type=Path, default=None, help="default results/bench_grid_<preset>.json")
    pr = sub.add_parser("project", help="project a finished grid's wall time on N workers",
                        description="Simulate a finished grid's measured jobs on N workers along the pipeline's "
                                    "dependency graph; optionally scale them to another preset.")
    pr.add_argument("--from-root", type=Path, required=True, metavar="ROOT", help="a grid's --root, finished")
    pr.add_argument("--preset", default="quick", help="the preset that ROOT ran (default quick)")
    pr.add_argument("--schemes", default="", help="the grid's schemes (default: all registered)")
    pr.add_argument("--seeds", default="", help="the grid's seeds (default: the preset's)")
    pr.add_argument("--workers", default=",".join(map(str, DEFAULT_WORKERS)), help="N to simulate (default 2,8,35,70)")
    pr.add_argument("--donors-from", type=Path, action="append", default=[], metavar="ROOT2",
                    help="other roots of the same preset (or a projection JSON written by this script) whose donor "
                         "choices (candidates tried, their final steps) stand in for seeds ROOT has none of; timed "
                         "at ROOT's measured donor seconds per step")
    pr.add_argument("--scale-to", default="", metavar="PRESET", help="also project this preset's grid, e.g. full")
    pr.add_argument("--to-seeds", default="", help="with --scale-to: its seeds (default: that preset's, full 0-4)")
    pr.add_argument("--analysis-scale", type=float, default=None, metavar="X",
                    help="with --scale-to: analyses x X instead of the checkpoint ratio (e.g. 1 for a lower bound)")
    pr.add_argument("--out", type=Path, default=None,
                    help="default results/bench_grid_projection_<preset>[_to_<preset>].json")
    a = p.parse_args(argv)
    if a.command == "measure":
        a.pipeline_args = extra
        if a.repeats < 1:
            p.error("--repeats must be >= 1")
        bad = [m for m in a.modes.split(",") if m and m not in ("embedded", "embedded1", "external")
               and not (m.startswith("ref:") and len(m) > 4)]
        if bad:
            p.error(f"unknown mode(s) {bad}; choose from embedded, embedded1, external, ref:<git ref>")
        return cmd_measure(a)
    return cmd_project(a)


if __name__ == "__main__":
    sys.exit(main())
