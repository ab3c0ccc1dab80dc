"""The grid runner: every numbered notebook, in order, for every (scheme, seed) of a preset.

    python -m initmi_utils.pipeline --preset quick [--schemes a,b] [--seeds 0,1]
        [--notebooks 01,02] [--workers N] [--root DIR] [--param name=value ...] [--force]

Per-run notebooks (those whose ``parameters`` cell has ``scheme``): each run's first selected
notebook (01_train) runs before its others, which read only its checkpoints and so run in any order,
on any free worker; the others (07_compare) run once per preset after every run. Workers take the
ready job of highest priority: donors, then trainings, then analyses (``schedule``), so that the
analyses, many and short, fill both workers at the end instead of one worker idling through the
last run's training while the other analyses it. Executed notebooks go to
``<root>/data/runs/<preset>/<scheme>/seed<k>/notebooks/`` (per preset ones to
``<root>/data/runs/<preset>/notebooks/``), written atomically.

Up to date = skipped: after a notebook succeeds a stamp records a hash of (notebook source,
parameters, the source of every package module it imports, transitively, and the torch and
transformer_lens versions, the stamps of what it depends on); a rerun with the same hash skips
it. Editing 01 or the training code therefore reruns everything downstream of it, like ``make``;
editing ``report.py`` reruns 07 only. Training itself refuses checkpoints written by other
training code (``train.StaleRun``).

The kernel is passed explicitly: a notebook's metadata says ``python3``, which on many machines
resolves to a Python other than the project's venv (the venv-kernel trap). We register a
kernelspec ``initmi`` whose argv is *this* interpreter and run every notebook with it.

A failing notebook is reported with the path of its executed copy; the other runs go on, the
notebooks that depend on it are skipped (blocked), and the exit status is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from initmi_utils.config import PRESET_SEEDS, PRESETS, ConfigError, RunPaths, experiment, resolve_root
from initmi_utils.io import atomic_write_text
from initmi_utils.schemes import SCHEMES, load_scheme_modules
from initmi_utils.sources import closure_hash, notebook_imports, package_hash
import initmi_utils.seeded  # noqa: F401  (registers the `seeded` scheme)

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL_NAME = "initmi"
POLICY_PARAMS = ("stale",)  # say how to run, not what to compute: not part of a job's key
RUN_PARAMS = ("scheme", "seed", "preset", "root", "seeds", "scheme_modules")  # set by the runner, not by --param


class PipelineError(ValueError):
    """Bad pipeline input (unknown notebook, parameter, scheme or seed)."""


@dataclass(frozen=True)
class Notebook:
    path: Path
    parameters: tuple[str, ...]
    imports: frozenset[str] = frozenset()  # the package modules its code cells import

    @property
    def number(self) -> str:
        return self.path.name.split("_", 1)[0]

    @property
    def per_run(self) -> bool:
        return "scheme" in self.parameters


def discover(notebook_dir: Path = NOTEBOOK_DIR) -> list[Notebook]:
    """Numbered notebooks (``NN_name.ipynb``) with the names in their ``parameters`` cell."""
    import papermill

    found = []
    for path in sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb")):
        params = papermill.inspect_notebook(str(path))
        cells = [c["source"] for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        cells = ["".join(c) if isinstance(c, list) else c for c in cells]
        found.append(Notebook(path, tuple(params), frozenset(notebook_imports(cells))))
    return found


def ensure_kernel() -> str:
    """Register (once) a kernelspec named ``initmi`` that runs this interpreter; return its name."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return KERNEL_NAME
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL_NAME, display_name="initmi (project venv)", prefix=sys.prefix)
    return KERNEL_NAME


def _hash(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass
class Job:
    """One notebook execution."""

    notebook: Notebook
    output: Path
    parameters: dict
    depends: list["Job"] = field(default_factory=list)
    key: str = ""
    status: str = "pending"  # pending | skipped | ok | failed | blocked
    seconds: float = 0.0
    error: str = ""

    @property
    def stamp(self) -> Path:
        return self.output.with_suffix(".ok.json")

    def compute_key(self) -> str:
        """The notebook's source, its parameters, the hash of the package modules it imports
        (transitively, with the torch and transformer_lens versions: ``sources.closure_hash``) and
        the keys of the jobs it depends on: editing an analysis module reruns the notebooks that
        import it and what depends on them, nothing else."""
        modules = [p for p in str(self.parameters.get("scheme_modules", "")).split(",") if p]
        result_params = {k: v for k, v in self.parameters.items() if k not in POLICY_PARAMS}
        self.key = _hash(self.notebook.path.read_bytes(), result_params, closure_hash(self.notebook.imports),
                         [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in modules],
                         [d.key for d in self.depends])
        return self.key

    def up_to_date(self) -> bool:
        return self.stamp.exists() and self.output.exists() and json.loads(self.stamp.read_text()).get("key") == self.key


class WarmKernel:
    """One kernel reused for a worker's notebooks, its namespace reset between them.

    Starting a kernel and importing torch + transformer_lens costs seconds per notebook; a grid
    of 7 notebooks x 35 runs would spend most of its overhead there. ``%reset -f`` empties the
    user namespace (no state leaks from one notebook into the next) while the imported modules
    stay loaded. A kernel that died or failed a notebook is replaced by a fresh one, and so is one
    started before the package's source changed (``sources.package_hash``): a warm kernel never
    runs code that has since been edited.
    """

    def __init__(self, kernel_name: str, cwd: Path):
        self.kernel_name, self.cwd, self.km, self.source = kernel_name, cwd, None, None

    def get(self):
        from jupyter_client.manager import KernelManager

        source = package_hash()
        if self.km is not None and self.source != source:  # it holds code that has since been edited
            self.discard()
        self.source = source
        if self.km is None or not self.km.is_alive():
            self.km = KernelManager(kernel_name=self.kernel_name)
            self.km.start_kernel(cwd=str(self.cwd))
            self._run("from initmi_utils.model import keep_freed_memory as _k; _k(); del _k")
        else:
            kc = self.km.client()
            kc.start_channels()
            try:
                kc.wait_for_ready(timeout=60)
                reply = kc.execute_interactive("get_ipython().run_line_magic('reset', '-f')", timeout=60,
                                               store_history=False)
                if reply["content"]["status"] != "ok":
                    raise RuntimeError("reset failed")
            finally:
                kc.stop_channels()
        return self.km

    def _run(self, code: str) -> None:
        """Run ``code`` in the kernel outside any notebook (the worker's own set-up)."""
        kc = self.km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            reply = kc.execute_interactive(code, timeout=60, store_history=False)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"kernel set-up failed: {code}")
        finally:
            kc.stop_channels()

    def discard(self) -> None:
        if self.km is not None:
            try:
                self.km.shutdown_kernel(now=True)
            except Exception:
                pass
            self.km = None


def execute(job: Job, kernel: str, log=print, warm: WarmKernel | None = None) -> None:
    """Run one notebook with papermill; the executed copy is written atomically either way."""
    import papermill

    if any(d.status in ("failed", "blocked") for d in job.depends):
        job.status = "blocked"
        return
    job.compute_key()
    if job.up_to_date():
        job.status = "skipped"
        return
    job.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.output.with_name(f".{job.output.name}.{os.getpid()}.tmp.ipynb")
    job.stamp.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(job.notebook.path), str(tmp), parameters=job.parameters, kernel_name=kernel,
            cwd=str(job.notebook.path.parent), progress_bar=False, request_save_on_cell_execute=False,
            **({"km": warm.get()} if warm is not None else {}),
        )
        job.status = "ok"
    except Exception as e:  # papermill's PapermillExecutionError, a dead kernel, ...
        job.status = "failed"
        if warm is not None:
            warm.discard()
        job.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    finally:
        job.seconds = time.perf_counter() - start
        if tmp.exists():
            os.replace(tmp, job.output)
    if job.status == "ok":
        atomic_write_text(job.stamp, json.dumps({"key": job.key, "seconds": round(job.seconds, 2)}))
    log(f"[{job.status:>6}] {job.notebook.path.name} {job.parameters.get('scheme', '')} "
        f"seed={job.parameters.get('seed', '-')} ({job.seconds:.1f}s) -> {job.output}"
        + (f"\n         {job.error}" if job.error else ""))


def needs_donor(schemes: list[str], notebooks: list[Notebook]) -> bool:
    """Whether the selected work needs the ``seeded`` scheme's donors: training a ``seeded`` run
    does, and so does every run's persistence analysis (a notebook declaring
    ``persistence_checkpoints``), whose baseline is the donor of the run's seed."""
    per_run = [nb for nb in notebooks if nb.per_run]
    return bool(per_run) and ("seeded" in schemes or any("persistence_checkpoints" in nb.parameters for nb in per_run))


@dataclass
class DonorJob:
    """Run (or reuse) one student seed's donor policy in a subprocess (``python -m initmi_utils.donor``):
    its candidate donors in order until one learns induction, and the recorded choice
    (``seeded.donor_choice``). Logs the command's last line (the chosen donor) or its error."""

    preset: str
    seed: int
    root: Path
    error: str = ""

    def run(self, log=print) -> bool:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "initmi_utils.donor", "--preset", self.preset, "--seed", str(self.seed),
               "--root", str(self.root)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=NOTEBOOK_DIR.parent)
        # On success the last line of stdout names the chosen donor (stderr may end in a warning).
        lines = (done.stdout if done.returncode == 0 else done.stdout + done.stderr).strip().splitlines()
        self.error = "" if done.returncode == 0 else (lines[-1] if lines else f"exit status {done.returncode}")
        log(f"[{'ok' if not self.error else 'failed':>6}] donor seed={self.seed} ({time.perf_counter() - start:.1f}s)"
            + (f": {lines[-1]}" if lines and not self.error else f"\n         {self.error}" if self.error else ""))
        return not self.error


def plan(preset: str, schemes: list[str], seeds: list[int], notebooks: list[Notebook], root: Path,
         extra: dict) -> tuple[list[list[Job]], list[Job]]:
    """Per-run chains of jobs and the per-preset jobs that depend on all of them."""
    chains = []
    for scheme in schemes:
        for seed in seeds:
            paths = RunPaths.of(experiment(preset, scheme, seed), root)
            chain: list[Job] = []
            for nb in (n for n in notebooks if n.per_run):
                params = {"scheme": scheme, "seed": seed, "preset": preset, "root": str(root)}
                params.update({k: v for k, v in extra.items() if k in nb.parameters and k != "scheme_modules"})
                if SCHEMES[scheme].source and "scheme_modules" in nb.parameters:  # a user's scheme: its file,
                    params["scheme_modules"] = extra["scheme_modules"]  # in its runs' keys only
                # The analyses read the first notebook's checkpoints, never each other's tables.
                chain.append(Job(nb, paths.notebooks / nb.path.name, params, depends=chain[:1]))
            chains.append(chain)
    finals = []
    all_runs = [j for c in chains for j in c]
    for nb in (n for n in notebooks if not n.per_run):
        params = {k: v for k, v in {"preset": preset, "root": str(root), "seeds": list(seeds), **extra}.items()
                  if k in nb.parameters}
        finals.append(Job(nb, root / "data" / "runs" / preset / "notebooks" / nb.path.name, params,
                          depends=all_runs))
    return chains, finals


def priority_order(chains: list[list[Job]]) -> list[Job]:
    """Every run's first notebook (training, minutes), then the others (analyses, seconds) run by run."""
    return [c[0] for c in chains if c] + [j for c in chains for j in c[1:]]


class Progress:
    """One line a person can follow, in a plain log and under ``make``: jobs done / total, the
    running ones and how long they have run, the elapsed time and an ETA.

    The ETA is measured, not guessed: each job kind (donor, training, analysis, comparison) is
    assumed to take the mean of the jobs of that kind finished so far (skipped ones do not count),
    the work left is that sum spread over the workers, and until a kind has a measurement the ETA
    says which kind it waits for.
    """

    def __init__(self, kinds: list[str], workers: int, clock: Callable[[], float] = time.monotonic):
        self.total, self.workers, self.clock = len(kinds), max(1, workers), clock
        self.start_time = clock()
        self.left: dict[str, int] = {}
        for k in kinds:
            self.left[k] = self.left.get(k, 0) + 1
        self.durations: dict[str, list[float]] = {}
        self.running: dict[str, tuple[str, float]] = {}
        self.done = 0
        self.lock = threading.Lock()

    def start(self, label: str, kind: str) -> None:
        with self.lock:
            self.left[kind] -= 1
            self.running[label] = (kind, self.clock())

    def finish(self, label: str, seconds: float | None) -> None:
        """``seconds`` None: skipped (up to date), no measurement."""
        with self.lock:
            kind, _ = self.running.pop(label)
            self.done += 1
            if seconds is not None:
                self.durations.setdefault(kind, []).append(seconds)

    def eta(self) -> str:
        now, work, unmeasured = self.clock(), 0.0, []
        for kind in self.left:  # in the order the kinds first appear in the grid
            pending = self.left.get(kind, 0) + sum(k == kind for k, _ in self.running.values())
            if pending and not self.durations.get(kind):
                unmeasured.append(kind)
            elif pending:
                mean = sum(self.durations[kind]) / len(self.durations[kind])
                work += self.left.get(kind, 0) * mean
                work += sum(max(0.0, mean - (now - t0)) for k, t0 in self.running.values() if k == kind)
        if unmeasured and not work:
            return f"ETA after the first {unmeasured[0]}"
        return f"ETA {_clock(work / self.workers)}" + (f" + the {', '.join(unmeasured)} (not measured yet)"
                                                         if unmeasured else "")

    def line(self) -> str:
        with self.lock:
            now = self.clock()
            running = ", ".join(f"{label} {_clock(now - t0)}" for label, (_, t0) in self.running.items()) or "none"
            return (f"[progress] {self.done}/{self.total} done; running: {running}; "
                    f"elapsed {_clock(now - self.start_time)}; {self.eta()}")


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def job_kind(task) -> str:
    if isinstance(task, DonorJob):
        return "donor"
    if not task.notebook.per_run:
        return "comparison"
    return "training" if task.notebook.number == "01" else "analysis"


def schedule(tasks: list, depends: Callable[[object], list], run: Callable[[object], None], workers: int) -> None:
    """Run ``tasks`` on ``workers`` threads: each free worker takes the first task in list order
    whose ``depends(task)`` have all finished (list order = priority). Returns when all are done.

    Why not ``pool.map`` over per-run chains: a chain keeps its worker for a whole run, so at the
    end of a grid one worker trains the last run while the other, done, idles; here the last
    run's analyses spread over every worker and the idle tail is one notebook at most.
    """
    pending, finished = list(tasks), set()
    cond = threading.Condition()
    failure: list[BaseException] = []

    def worker() -> None:
        while True:
            with cond:
                while True:
                    if failure or not pending:
                        return
                    ready = next((t for t in pending if all(id(d) in finished for d in depends(t))), None)
                    if ready is not None:
                        pending.remove(ready)
                        break
                    cond.wait()
            try:
                run(ready)
            except BaseException as e:  # a bug in the runner itself: stop handing out work, raise it below
                with cond:
                    failure.append(e)
                    cond.notify_all()
                return
            with cond:
                finished.add(id(ready))
                cond.notify_all()

    threads = [threading.Thread(target=worker, name=f"initmi-worker-{i}") for i in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failure:
        raise failure[0]


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
    p.add_argument("--workers", type=int, default=1, help="runs executed in parallel (default 1)")
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
    schemes = [s for s in a.schemes.split(",") if s] or list(SCHEMES)
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise PipelineError(f"unknown init scheme(s) {unknown}; supported schemes: {', '.join(SCHEMES)}.")
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s] or list(PRESET_SEEDS[a.preset])
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
    if modules:
        extra["scheme_modules"] = ",".join(modules)
    return a, schemes, seeds, selected, extra


def main(argv: list[str] | None = None) -> int:
    try:
        notebooks = discover()
        a, schemes, seeds, selected, extra = parse_args(argv, notebooks)
        root = resolve_root(a.root).resolve()
        chains, finals = plan(a.preset, schemes, seeds, selected, root, extra)
    except (PipelineError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kernel = ensure_kernel()
    if a.workers > 1:  # share the cores between concurrent kernels instead of oversubscribing them
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.workers)))
    if a.force:
        for job in [j for c in chains for j in c] + finals:
            job.stamp.unlink(missing_ok=True)

    start = time.perf_counter()
    print(f"initmi pipeline: preset={a.preset} runs={len(chains)} notebooks="
          f"{','.join(nb.number for nb in selected)} root={root} kernel={kernel}", flush=True)

    local = threading.local()
    warms: list[WarmKernel] = []

    def warm_kernel() -> WarmKernel | None:
        if a.cold:
            return None
        if not hasattr(local, "warm"):
            local.warm = WarmKernel(kernel, NOTEBOOK_DIR)
            warms.append(local.warm)
        return local.warm

    def log(line: str) -> None:
        print(line, flush=True)

    donors = [DonorJob(a.preset, seed, root) for seed in seeds] if needs_donor(schemes, selected) else []
    failed_donors: list[DonorJob] = []
    ordered = [*donors, *priority_order(chains)]
    progress = Progress([job_kind(t) for t in ordered + finals], a.workers)
    stop = threading.Event()

    def tick() -> None:  # long trainings would otherwise leave the log silent for minutes
        while not stop.wait(60):
            log(progress.line())

    def run_task(task) -> None:
        label = f"donor s{task.seed}" if isinstance(task, DonorJob) else \
            f"{task.notebook.number} {task.parameters.get('scheme', '')}-s{task.parameters.get('seed', '')}".replace(" -s", "")
        progress.start(label, job_kind(task))
        began = time.perf_counter()
        if isinstance(task, DonorJob):
            if not task.run(log):
                failed_donors.append(task)
        else:
            execute(task, kernel, log, warm_kernel())
        skipped = getattr(task, "status", "") == "skipped"
        progress.finish(label, None if skipped else time.perf_counter() - began)
        if not skipped:
            log(progress.line())

    threading.Thread(target=tick, daemon=True, name="initmi-progress").start()

    try:
        # Donors first: a worker trains a donor while the others start on runs, instead of two
        # workers reaching the donor's lock together and one of them idling until it is trained.
        schedule(ordered, lambda t: getattr(t, "depends", []), run_task, a.workers)
        for job in finals:
            # The comparison runs even when some runs failed: its report names the missing runs.
            job.depends = [j for j in job.depends if j.status not in ("failed", "blocked")]
            run_task(job)
    finally:
        stop.set()
        for w in warms:
            w.discard()

    jobs = [j for c in chains for j in c] + finals
    failed = [j for j in jobs if j.status in ("failed", "blocked")]
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
