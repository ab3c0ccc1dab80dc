"""The grid runner: every numbered notebook, in order, for every (scheme, seed) of a preset.

    python -m initmi_utils.pipeline --preset quick [--schemes a,b] [--seeds 0,1]
        [--notebooks 01,02] [--workers N | --scheduler tcp://HOST:PORT] [--root DIR]
        [--param name=value ...] [--scheme-module FILE] [--force]

Per-run notebooks (those whose ``parameters`` cell has ``scheme``): each run's first selected
notebook (01_train) runs before its others, which read only its checkpoints and so run in any
order, on any free worker; the others (07_compare) run once per preset after every run. A seed's
donor is chosen (``python -m initmi_utils.donor``) before the notebooks that read it. Executed
notebooks go to ``<root>/data/runs/<preset>/<scheme>/seed<k>/notebooks/`` (per preset ones to
``<root>/data/runs/<preset>/notebooks/``), written atomically and signed (trusted) for the user
who launched the grid.

The jobs and when they are up to date: ``jobs``. Where they run: ``cluster`` (Dask; an embedded
``LocalCluster`` of ``--workers`` processes, or the scheduler given by ``--scheduler`` or
``$DASK_SCHEDULER_ADDRESS``).

A failing notebook is reported with the path of its executed copy; the other runs go on, the
notebooks that depend on it are skipped (blocked), and the exit status is 1. Bad input (an
unknown scheme, an unreachable scheduler, a worker with other package source) is one message
and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from initmi_utils.cluster import connect, dashboard, run_grid
from initmi_utils.config import PRESET_SEEDS, PRESETS, ConfigError, RunPaths, experiment, resolve_root
from initmi_utils.jobs import RUN_PARAMS, DonorJob, Job, Notebook, PipelineError, discover, ensure_kernel, needs_donor
from initmi_utils.schemes import SCHEMES, load_scheme_modules
import initmi_utils.seeded  # noqa: F401  (registers the `seeded` scheme)


def plan(preset: str, schemes: list[str], seeds: list[int], notebooks: list[Notebook], root: Path,
         extra: dict, all_notebooks: list[Notebook] | None = None) -> tuple[list[list[Job]], list[Job]]:
    """Per-run chains of jobs and the per-preset jobs that depend on all of them. ``notebooks`` are
    the ones to run; ``all_notebooks`` (default: the same) lets an analysis be keyed on its run's
    training even when 01 is not among them, so that a job's key, and whether it is up to date,
    do not depend on which other notebooks were selected: 06 run alone is up to date for the
    whole grid afterwards. A training not selected is not run and not waited for."""
    chains = []
    training = next((n for n in (all_notebooks or notebooks) if n.per_run and n.number == "01"), None)
    for scheme in schemes:
        for seed in seeds:
            paths = RunPaths.of(experiment(preset, scheme, seed), root)

            def job(nb: Notebook, depends: list[Job]) -> Job:
                params = {"scheme": scheme, "seed": seed, "preset": preset, "root": str(root)}
                params.update({k: v for k, v in extra.items() if k in nb.parameters and k != "scheme_modules"})
                if SCHEMES[scheme].source and "scheme_modules" in nb.parameters:  # a user's scheme: its file,
                    params["scheme_modules"] = extra["scheme_modules"]  # in its runs' keys only
                return Job(nb, paths.notebooks / nb.path.name, params, depends=depends,
                           scratch=(paths.notebooks, paths.tables, paths.checkpoints))

            train = job(training, []) if training else None
            chain = [train] if training in notebooks else []
            # The analyses read the first notebook's checkpoints, never each other's tables.
            chain += [job(nb, [train] if train else []) for nb in notebooks if nb.per_run and nb is not training]
            chains.append(chain)
    finals = []
    all_runs = [j for c in chains for j in c]
    for nb in (n for n in notebooks if not n.per_run):
        params = {k: v for k, v in {"preset": preset, "root": str(root), "seeds": list(seeds), **extra}.items()
                  if k in nb.parameters}
        output = root / "data" / "runs" / preset / "notebooks" / nb.path.name
        finals.append(Job(nb, output, params, depends=all_runs, scratch=(output.parent,)))
    return chains, finals


def resolve_schemes(names: list[str]) -> list[str]:
    """``names`` (default: every registered scheme), each checked against the registry."""
    schemes = list(names) or list(SCHEMES)
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise PipelineError(f"unknown init scheme(s) {unknown}; supported schemes: {', '.join(SCHEMES)}.")
    return schemes


def resolve_seeds(preset: str, seeds: list[int]) -> list[int]:
    """``seeds`` (default: the preset's)."""
    return [int(k) for k in seeds] or list(PRESET_SEEDS[preset])


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv: list[str] | None, notebooks: list[Notebook]):
    p = argparse.ArgumentParser(prog="python -m initmi_utils.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="quick", help=f"one of {', '.join(PRESETS)} (default quick)")
    p.add_argument("--schemes", default="", help="comma-separated init schemes (default: all registered)")
    p.add_argument("--seeds", default="", help="comma-separated init seeds (default: the preset's seeds)")
    p.add_argument("--notebooks", default="", help="comma-separated notebook numbers, e.g. 01,02 (default: all)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes of the embedded local cluster (default 1; ignored with --scheduler)")
    p.add_argument("--scheduler", default=os.environ.get("DASK_SCHEDULER_ADDRESS", ""), metavar="ADDRESS",
                   help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default $DASK_SCHEDULER_ADDRESS; "
                        "unset: an embedded local cluster)")
    p.add_argument("--kernel-threads", type=int, default=0, metavar="N",
                   help="torch threads per notebook kernel (default: local cores / --workers; with --scheduler, "
                        "the workers' own OMP_NUM_THREADS, which Dask sets to 1)")
    p.add_argument("--root", default=None, help="directory for every artefact (default: this project's root)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="extra notebook parameter (JSON value), passed to the notebooks that declare it")
    p.add_argument("--scheme-module", default="", metavar="FILE[,FILE]",
                   help="Python files that register schemes with @register_scheme; their schemes join the grid")
    p.add_argument("--force", action="store_true", help="rerun notebooks even when up to date")
    p.add_argument("--cold", action="store_true", help="a fresh kernel for every notebook (slower; for debugging)")
    a = p.parse_args(argv)

    if a.preset not in PRESETS:
        raise PipelineError(f"unknown preset {a.preset!r}; choose one of {', '.join(PRESETS)}.")
    modules = [str(Path(m).expanduser().resolve()) for m in a.scheme_module.split(",") if m.strip()]
    load_scheme_modules(",".join(modules))  # one clear error naming the file when it is missing or raises
    schemes = resolve_schemes([s for s in a.schemes.split(",") if s])
    try:
        seeds = resolve_seeds(a.preset, [int(s) for s in a.seeds.split(",") if s])
    except ValueError:
        raise PipelineError(f"--seeds must be comma-separated integers, got {a.seeds!r}.") from None
    numbers = {nb.number: nb for nb in notebooks}
    chosen = [n for n in a.notebooks.split(",") if n]
    missing = [n for n in chosen if n not in numbers]
    if missing:
        raise PipelineError(f"unknown notebook number(s) {missing}; available: {', '.join(numbers)}.")
    selected = [numbers[n] for n in sorted(chosen)] if chosen else notebooks
    extra = {}
    declared = {name for nb in selected for name in nb.parameters} - set(RUN_PARAMS)
    for item in a.param:
        name, sep, value = item.partition("=")
        if not sep or name not in declared:
            raise PipelineError(
                f"unknown notebook parameter {name!r} (from --param {item!r}); the selected notebooks "
                f"declare: {', '.join(sorted(declared)) or 'none besides ' + ', '.join(RUN_PARAMS)}. "
                f"Use --param NAME=VALUE."
            )
        extra[name] = _parse_value(value)
    if a.workers < 1:
        raise PipelineError("--workers must be >= 1.")
    if a.kernel_threads < 0:
        raise PipelineError("--kernel-threads must be >= 1 (or 0 for the default).")
    if modules:
        extra["scheme_modules"] = ",".join(modules)
    return a, schemes, seeds, selected, extra


def main(argv: list[str] | None = None) -> int:
    def log(line: str) -> None:
        print(line, flush=True)

    try:
        notebooks = discover()
        a, schemes, seeds, selected, extra = parse_args(argv, notebooks)
        root = resolve_root(a.root).resolve()
        chains, finals = plan(a.preset, schemes, seeds, selected, root, extra, all_notebooks=notebooks)
        kernel = ensure_kernel()
        threads = a.kernel_threads or (None if a.scheduler else max(1, (os.cpu_count() or 1) // a.workers))
        donors = [DonorJob(a.preset, seed, root) for seed in seeds] if needs_donor(schemes, selected) else []
        start = time.perf_counter()
        with connect(a.scheduler or None, a.workers, log) as client:
            n_workers = len(client.scheduler_info()["workers"])
            log(f"initmi pipeline: preset={a.preset} runs={len(chains)} notebooks="
                f"{','.join(nb.number for nb in selected)} root={root} kernel={kernel} "
                f"scheduler={a.scheduler or 'local'} workers={n_workers}")
            link = dashboard(client)
            if link:
                log(f"Dask dashboard: {link}")
            run_grid(client, donors, chains, finals, kernel, log, threads=threads, cold=a.cold, force=a.force)
    except (PipelineError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    jobs = [j for c in chains for j in c] + finals
    failed = [j for j in jobs if j.status in ("failed", "blocked")]
    failed_donors = [d for d in donors if d.status == "failed"]
    for d in failed_donors:
        print(f"FAILED: donor of seed {d.seed} ({d.error})", file=sys.stderr)
    counts = {s: sum(j.status == s for j in jobs) for s in ("ok", "skipped", "failed", "blocked")}
    print(f"done in {time.perf_counter() - start:.0f}s: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for j in failed:
        print(f"FAILED: {j.notebook.path.name} {j.parameters} -> {j.output}"
              + (f" ({j.error})" if j.error else " (not run: an earlier notebook of this run failed)"),
              file=sys.stderr)
    return 1 if failed or failed_donors else 0


if __name__ == "__main__":
    sys.exit(main())
