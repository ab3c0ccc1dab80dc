"""How long does a whole preset take, against the least it could take, and where does the time go?

    python benchmarks/bench_presets.py [--preset smoke [quick ...]] [--workers N] [--root DIR]
                                       [--estimate-only] [--keep] [-- extra pipeline args]

For each preset it runs the whole grid, ``python -m initmi_utils.pipeline --preset P --root
<fresh tmp dir>`` (every notebook of every (scheme, seed) run, then the per-preset ones), and prints:

- ``wall``: the pipeline's wall time, start to exit;
- ``bound``: the lower bound = total *training* FLOPs of the runs the pipeline finished (read from
  each run's ``done.json`` config: steps x batch x seq_len x ``flops_per_token``) / the fp32 matmul
  GFLOP/s measured in this same process just before and after the pipeline (median). No training
  of that many FLOPs can finish faster on this machine;
- ``ratio = wall / bound`` (issue 5's target: <= 1.3) and the preset's time goal (smoke <= 2 min,
  quick <= 10 min);
- ``step bound``: the runs' training steps x our measured step time (``bench_train``'s ``ours`` at
  each run's model and batch, 1 thread as in a pipeline worker, timed in this process) / workers:
  what the grid would take if it did nothing but optimizer steps. ``wall / step bound`` is the
  pipeline's own overhead (evaluations, donors, analyses, notebooks, scheduling); ``wall / bound``
  also contains how far one step is from the matmul peak (``peak_fraction`` of ``bench_train``);
- where the time goes, from the executed notebooks' papermill metadata (``duration`` per cell and
  per notebook) and the pipeline's stamps (``seconds`` per notebook job, which includes getting a
  kernel and papermill's own reading/writing):

  - ``training``: code cells calling ``train(``; they include train()'s periodic evaluations and
    checkpoint writes (their forward FLOPs are printed separately, ``eval FLOPs``);
  - ``imports``: code cells holding only imports (a warm kernel pays e.g. transformer_lens's import
    once; the first such cell per kernel shows it); ``setup (imports + code)``: cells mixing
    imports with other work, whose time cannot be split;
  - ``analyses``: every other code cell (``parameters`` cells are listed too);
  - ``kernel+papermill``: job seconds minus notebook duration (kernel start or ``%reset``, nbclient);
  - ``pipeline outside jobs``: wall minus the job seconds (pipeline start-up, notebook discovery,
    planning; with ``--workers`` > 1 the job seconds overlap and this is not meaningful).

``--existing ROOT --wall S`` skips the pipeline too and reports on a grid already run in ROOT
(``make reproduce`` prints ``done in S s``); the matmul is measured now, so run it on a quiet
machine. ``--estimate-only`` skips the pipeline and prints the bound of each preset's default grid (every
registered scheme x the preset's seeds), e.g. to state the full preset's floor. Results go to
``benchmarks/results/bench_presets_<preset>[_w<workers>].json``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from initmi_utils.config import PRESET_SEEDS, PRESETS, ExperimentConfig, experiment
from initmi_utils.model import flops_per_token
from initmi_utils.train import checkpoint_schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import RESULTS, fixed_batch, machine, make_gemm_only, make_ours  # noqa: E402

GOALS_S = {"smoke": 120.0, "quick": 600.0}  # issue 5; full: whatever the science needs within 1.3x
TARGET_RATIO = 1.3
TRAIN_CALL = re.compile(r"\btrain\(")


# ---------------------------------------------------------------------------------------------
# FLOPs.


def training_flops(cfg: ExperimentConfig) -> float:
    t, d = cfg.train, cfg.data
    return t.steps * t.batch_size * d.seq_len * flops_per_token(cfg.model, d.seq_len)


def eval_flops(cfg: ExperimentConfig) -> float:
    """Forward FLOPs of train()'s evaluations (val + rep sets at step 0, every eval_every steps and
    at every scheduled checkpoint): not part of the bound, but real work inside ``training``."""
    t, d = cfg.train, cfg.data
    evals = {0, *range(t.eval_every, t.steps + 1, t.eval_every), *checkpoint_schedule(t)}
    rep_len = 1 + 2 * d.rep_len
    per_eval = (d.n_val * d.seq_len * flops_per_token(cfg.model, d.seq_len)
                + d.n_diagnostic * rep_len * flops_per_token(cfg.model, rep_len)) / 3.0  # forward only
    return len(evals) * per_eval


def _tolerant_config(d: dict) -> ExperimentConfig:
    """A stored config, ignoring fields this version of the package does not know: only the
    sizes that set the FLOPs matter here, and a done.json may predate (or postdate) a field."""
    import dataclasses

    sections = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}
    cfg = ExperimentConfig()
    kept = {}
    for name in sections:
        known = {f.name for f in dataclasses.fields(getattr(cfg, name))}
        kept[name] = {k: v for k, v in d.get(name, {}).items() if k in known}
    return ExperimentConfig.from_dict(kept)


def finished_runs(root: Path, preset: str) -> list[ExperimentConfig]:
    """Configs of the runs that finished training under ``root`` (each run's ``done.json``)."""
    return [_tolerant_config(json.loads(p.read_text())["config"])
            for p in sorted((root / "checkpoints" / preset).glob("*/seed*/done.json"))]


def default_grid(preset: str) -> list[ExperimentConfig]:
    from initmi_utils.schemes import SCHEMES

    return [experiment(preset, s, seed) for s in SCHEMES for seed in PRESET_SEEDS[preset]]


# ---------------------------------------------------------------------------------------------
# Matmul peak, measured in this process.


def matmul_gflops(n: int = 2048, repeats: int = 5) -> list[float]:
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def step_seconds(cfg: ExperimentConfig, steps: int = 8, repeats: int = 5, threads: int = 1, make=make_ours) -> float:
    """Median seconds of one of our training steps (``bench_train``'s ``ours``) at ``cfg``'s model and
    batch; with ``make=make_gemm_only``, of the step's matrix products alone."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = make(cfg, fixed_batch(cfg))
        run(2)  # warm-up
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(steps)
            samples.append((time.perf_counter() - t0) / steps)
    finally:
        torch.set_num_threads(old)
    return statistics.median(samples)


def step_bound(runs: list[ExperimentConfig], workers: int, make=make_ours) -> tuple[float, dict[str, float]]:
    """Seconds the runs' optimizer steps alone take at our measured step speed, spread over ``workers``
    (``make=make_gemm_only``: at the speed of the step's matrix products alone)."""
    speeds: dict[str, float] = {}
    total = 0.0
    for cfg in runs:
        key = json.dumps({"model": cfg.to_dict()["model"], "batch": cfg.train.batch_size}, sort_keys=True)
        if key not in speeds:
            speeds[key] = step_seconds(cfg, make=make)
        total += cfg.train.steps * speeds[key]
    return total / max(1, workers), speeds


def matmul_floor(runs: list[ExperimentConfig], workers: int) -> float:
    """The least wall time any implementation of the grid could take on this machine: training's and
    evaluation's FLOPs at the speed this BLAS runs the step's own matrix products (``gemm_only``,
    1 thread per worker), and nothing else (no elementwise op, analysis or notebook).

    Why not the big matmul's rate: the step's products are small ([4096, 128] x [128, 512] ...) and
    run slower than a 2048^3 one; ``bound`` ignores that, so ``floor / bound`` says how close to
    ``bound`` a perfect implementation could get. Evaluation forwards are counted at the training
    products' rate (their shapes are the forward's).
    """
    gemm_s, speeds = step_bound(runs, workers, make=make_gemm_only)
    train_flops = sum(training_flops(c) for c in runs)
    return gemm_s * (1 + sum(eval_flops(c) for c in runs) / train_flops)


# ---------------------------------------------------------------------------------------------
# Where the time goes.


def _cell_kind(cell: dict) -> str:
    """training (calls ``train(``) | imports (only import statements) | setup (imports plus other
    code: its time mixes a kernel's first import with real work) | parameters | analyses."""
    tags = cell.get("metadata", {}).get("tags", [])
    if "parameters" in tags or "injected-parameters" in tags:
        return "parameters"
    src = "".join(cell.get("source", ""))
    if TRAIN_CALL.search(src):
        return "training"
    try:
        body = ast.parse(src).body
    except SyntaxError:  # IPython magics
        body = []
    imports = [isinstance(stmt, (ast.Import, ast.ImportFrom)) for stmt in body]
    if imports and all(imports):
        return "imports"
    if any(imports):
        return "setup (imports + code)"
    return "analyses"


def time_breakdown(root: Path, preset: str) -> dict:
    """Seconds per kind of cell, per notebook, and papermill/kernel overhead, from executed notebooks."""
    kinds: dict[str, float] = {}
    per_notebook: dict[str, list[float]] = {}
    import_cells: list[tuple[str, float]] = []  # (start time, seconds): the first per kernel is the cold one
    by_cell: dict[tuple[str, int], list] = {}  # (notebook, cell index) -> [seconds summed, runs, first line]
    nb_total, job_total, n_notebooks = 0.0, 0.0, 0
    for path in sorted((root / "data" / "runs" / preset).rglob("*.ipynb")):
        if path.name.startswith("."):
            continue  # a temporary copy of a notebook still (or never) being written
        nb = json.loads(path.read_text())
        meta = nb.get("metadata", {}).get("papermill", {})
        duration = meta.get("duration") or 0.0
        n_notebooks += 1
        nb_total += duration
        per_notebook.setdefault(path.name, []).append(duration)
        stamp = path.with_suffix(".ok.json")
        if stamp.exists():
            job_total += json.loads(stamp.read_text()).get("seconds", duration)
        else:
            job_total += duration
        for index, cell in enumerate(c for c in nb.get("cells", []) if c.get("cell_type") == "code"):
            pm = cell.get("metadata", {}).get("papermill", {})
            seconds = pm.get("duration") or 0.0
            kind = _cell_kind(cell)
            src = "".join(cell.get("source", ""))
            first = next((ln.strip() for ln in src.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
            entry = by_cell.setdefault((path.name, index), [0.0, 0, first])
            entry[0] += seconds
            entry[1] += 1
            kinds[kind] = kinds.get(kind, 0.0) + seconds
            if kind in ("imports", "setup (imports + code)"):
                import_cells.append((pm.get("start_time") or "", seconds))
    import_secs = [s for _, s in sorted(import_cells)]
    slowest = sorted(by_cell.items(), key=lambda kv: -kv[1][0])[:10]
    return {
        "notebooks": n_notebooks,
        "cells_s": kinds,
        "notebook_s": nb_total,
        "job_s": job_total,
        "kernel_papermill_s": max(0.0, job_total - nb_total),
        "per_notebook_s": {k: {"n": len(v), "total": sum(v), "median": statistics.median(v)}
                           for k, v in per_notebook.items()},
        "import_cells_s": {"n": len(import_secs), "first": import_secs[0] if import_secs else None,
                           "median": statistics.median(import_secs) if import_secs else None,
                           "max": max(import_secs) if import_secs else None},
        "slowest_cells": [{"notebook": nb_name, "code_cell": i, "total_s": v[0], "n": v[1], "first_line": v[2]}
                          for (nb_name, i), v in slowest],
    }


# ---------------------------------------------------------------------------------------------


def run_pipeline(preset: str, root: Path, workers: int | None, extra: list[str]) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "initmi_utils.pipeline", "--preset", preset, "--root", str(root), *extra]
    if workers:
        cmd += ["--workers", str(workers)]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent).returncode
    return time.perf_counter() - t0, code


def report(preset: str, wall: float | None, runs: list[ExperimentConfig], gflops: float, breakdown: dict | None,
           workers: int = 1) -> dict:
    flops = sum(training_flops(c) for c in runs)
    e_flops = sum(eval_flops(c) for c in runs)
    bound = flops / (gflops * 1e9)
    print(f"\n== {preset}: {len(runs)} runs, training {flops / 1e12:.2f} TFLOP (+ eval forward "
          f"{e_flops / 1e12:.2f} TFLOP), matmul {gflops:.1f} GFLOP/s")
    out = {"preset": preset, "runs": len(runs), "training_flops": flops, "eval_flops": e_flops,
           "matmul_gflops": gflops, "bound_s": bound}
    if wall is None:
        print(f"   bound {bound:8.1f} s  ({bound / 60:.1f} min)  [estimate only: the preset's default grid]")
        return out
    ratio = wall / bound if bound > 0 else float("inf")
    goal = GOALS_S.get(preset)
    print(f"   wall  {wall:8.1f} s   bound {bound:8.1f} s   ratio {ratio:6.2f}  (target <= {TARGET_RATIO})"
          + (f"   goal {goal:.0f} s: {'met' if wall <= goal else 'NOT met'}" if goal else ""))
    out |= {"wall_s": wall, "ratio": ratio, "goal_s": goal}
    if runs:
        sb, speeds = step_bound(runs, workers)
        print(f"   step bound {sb:8.1f} s  (training steps alone at our measured step speed, 1 thread, "
              f"{workers} worker(s); {', '.join(f'{1e3 * v:.0f} ms/step' for v in speeds.values())})   "
              f"wall / step bound {wall / sb:5.2f}")
        out |= {"step_bound_s": sb, "step_s": list(speeds.values()), "ratio_vs_step_bound": wall / sb}
        floor = matmul_floor(runs, workers)
        print(f"   matmul floor {floor:8.1f} s  = {floor / bound:.2f} x bound  (training + evaluation FLOPs at the "
              f"speed of the step's own matmuls, nothing else: no implementation can beat it; "
              f"the {TARGET_RATIO} x bound target is {'reachable in principle' if floor / bound <= TARGET_RATIO else 'NOT reachable here'})")
        out |= {"matmul_floor_s": floor, "floor_over_bound": floor / bound}
    if breakdown:
        b = breakdown
        rows = [(k, v) for k, v in sorted(b["cells_s"].items(), key=lambda kv: -kv[1])]
        rows += [("kernel+papermill", b["kernel_papermill_s"])]
        if workers <= 1:
            rows += [("pipeline outside jobs", wall - b["job_s"])]
            print(f"   where the time goes ({b['notebooks']} executed notebooks; % of wall):")
        else:
            print(f"   where the time goes ({b['notebooks']} executed notebooks on {workers} workers: seconds are "
                  f"summed over workers, % of {workers} x wall; jobs use {b['job_s'] / (workers * wall):.0%} of it):")
        for name, s in rows:
            print(f"     {name:24s} {s:8.1f} s  {100 * s / (workers * wall):5.1f} %")
        print("   per notebook (n, total, median s):")
        for name, v in sorted(b["per_notebook_s"].items()):
            print(f"     {name:28s} {v['n']:3d} {v['total']:8.1f} {v['median']:8.1f}")
        ic = b["import_cells_s"]
        if ic["n"]:
            print(f"   import cells: first {ic['first']:.1f} s, median {ic['median']:.1f} s, max {ic['max']:.1f} s "
                  f"over {ic['n']}")
        print("   slowest cells (summed over runs):")
        for c in b["slowest_cells"][:8]:
            print(f"     {c['total_s']:7.1f} s  {c['notebook']} cell {c['code_cell']} x{c['n']}: {c['first_line'][:60]}")
        out["breakdown"] = b
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=["smoke"], help=f"presets to time, of {', '.join(PRESETS)}")
    p.add_argument("--workers", type=int, default=None, help="passed to the pipeline (default: its own)")
    p.add_argument("--root", type=Path, default=None, help="project root to run in (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp root (its path is printed)")
    p.add_argument("--estimate-only", action="store_true", help="print the bounds; do not run the pipeline")
    p.add_argument("--existing", type=Path, default=None, metavar="ROOT",
                   help="do not run: analyse the pipeline run already in ROOT (e.g. after `make reproduce`)")
    p.add_argument("--wall", type=float, default=None, help="with --existing: that run's wall time in seconds")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    unknown = [x for x in a.preset if x not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")

    mach = machine()
    print(f"{mach['cpu']} | {mach['cores']} cores ({', '.join(mach['simd'])}) | torch {mach['torch']} "
          f"| {mach['torch_threads']} threads | load {mach['load_avg_at_start'][0]:.2f}")
    code = 0
    for preset in a.preset:
        before = matmul_gflops(a.matmul_n)
        if a.estimate_only:
            res = report(preset, None, default_grid(preset), statistics.median(before), None)
        elif a.existing is not None:
            if a.wall is None:
                p.error("--existing needs --wall SECONDS (the pipeline's 'done in ...s' line)")
            res = report(preset, a.wall, finished_runs(a.existing, preset), statistics.median(before),
                         time_breakdown(a.existing, preset), a.workers or 1)
            res |= {"matmul_samples_gflops": before, "root": str(a.existing), "existing_run": True}
        else:
            root = a.root or Path(tempfile.mkdtemp(prefix=f"initmi-bench-{preset}-"))
            wall, rc = run_pipeline(preset, root, a.workers, extra)
            after = matmul_gflops(a.matmul_n)
            gflops = statistics.median(before + after)
            runs = finished_runs(root, preset)
            res = report(preset, wall, runs, gflops, time_breakdown(root, preset), a.workers or 1)
            res |= {"pipeline_exit": rc, "matmul_samples_gflops": before + after, "root": str(root)}
            if rc:
                print(f"   pipeline exited with {rc}: the numbers above cover the runs that finished")
                code = 1
            if a.root is None and not a.keep:
                shutil.rmtree(root, ignore_errors=True)
            elif a.root is None:
                print(f"   kept {root}")
        res |= {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": mach | {"load_avg_at_end": os.getloadavg()}, "pipeline_args": extra,
                "workers": a.workers}
        if not a.estimate_only:
            a.out_dir.mkdir(parents=True, exist_ok=True)
            suffix = f"_w{a.workers}" if a.workers else ""
            (a.out_dir / f"bench_presets_{preset}{suffix}.json").write_text(json.dumps(res, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
