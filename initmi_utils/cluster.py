"""Where the grid's jobs run: a Dask cluster, embedded or existing.

With no scheduler given, ``connect`` starts a ``LocalCluster`` of ``workers`` processes x 1 thread
on 127.0.0.1 and shuts it down afterwards; given one (``tcp://host:port``), it submits to that
scheduler's workers. Either way ``run_grid`` submits every job as a Dask task with its
dependencies declared (a seed's donor -> the jobs that read it; a run's training -> its analyses;
every run -> the comparison) and Dask priorities (donors, then trainings, then analyses), and
returns as jobs finish.

Each worker keeps one warm Jupyter kernel (``KernelPlugin``, a Dask ``WorkerPlugin``): imports are
paid once per worker, not per notebook. The kernel restarts when the package source changes
(``jobs.WarmKernel``). A worker that dies mid-notebook loses its task to Dask, which runs it on
another worker; the job's lease (``jobs.Lease``) makes sure the dead worker's kernel has exited
and its temp files are gone before the retry writes, and allows one retry.

What a cluster needs: ``--root`` on a filesystem every worker sees at the same path, and on every
worker the same package source (checked at start: ``check_workers``) and the ``initmi`` kernelspec.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator

import dask
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker

from initmi_utils.jobs import (
    HOST,
    NOTEBOOK_DIR,
    DonorJob,
    Job,
    JobBusy,
    PipelineError,
    Progress,
    WarmKernel,
    execute,
    reads_donor,
)
from initmi_utils.report import sign_notebook
from initmi_utils.sources import package_hash

PLUGIN = "initmi-kernel"
TOPIC = "initmi-progress"
CONNECT_TIMEOUT = "10s"
WORKER_WAIT = 60  # seconds to wait for a scheduler's first worker
PRIORITY = {"donor": 30, "training": 20, "analysis": 10, "comparison": 0}


class KernelPlugin(WorkerPlugin):
    """Per worker: the warm kernel its notebooks run in, the kernel name, the threads each kernel's
    torch may use (``None``: as the worker's environment says; Dask's nanny sets 1), and the
    package source hash and grid id the client planned with."""

    name = PLUGIN

    def __init__(self, kernel: str, source: str, grid: str, threads: int | None = None, cold: bool = False):
        self.kernel, self.source, self.grid, self.threads, self.cold = kernel, source, grid, threads, cold
        self.warm: WarmKernel | None = None

    def setup(self, worker) -> None:
        if self.threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[var] = str(self.threads)  # kernels started from here inherit it
        # Dask's nanny asks glibc to trim freed memory; the kernels set their own policy
        # (``model.keep_freed_memory``), which this variable would otherwise undo at start-up.
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        self.warm = None if self.cold else WarmKernel(self.kernel, NOTEBOOK_DIR)

    def teardown(self, worker) -> None:
        if self.warm is not None:
            self.warm.discard()


def _announce(label: str, kind: str) -> None:
    worker = get_worker()
    worker.log_event(TOPIC, {"label": label, "kind": kind, "worker": worker.address})


def run_notebook(job: Job, *upstream: dict) -> dict:
    """The task of one notebook on a worker: blocked when something it depends on failed,
    refused when the worker's package source differs from the client's, otherwise executed in
    the worker's warm kernel. Returns a small record; the notebook's results are files."""
    plugin: KernelPlugin = get_worker().plugins[PLUGIN]
    failed = [u for u in upstream if u["status"] in ("failed", "blocked")]
    if failed:
        job.status, job.error = "blocked", f"not run: {failed[0]['label']} {failed[0]['status']}"
    elif package_hash() != plugin.source:
        job.status, job.error = "failed", (f"worker {get_worker().address} on {HOST} now runs other package source "
                                           f"than the grid was planned with; rerun the pipeline")
    else:
        _announce(job.label, job.kind)
        try:
            execute(job, plugin.kernel, plugin.warm, plugin.grid, get_worker().address)
        except JobBusy as e:
            job.status, job.error = "failed", str(e)
    return {"label": job.label, "status": job.status, "seconds": job.seconds, "key": job.key,
            "output": str(job.output), "log": job.log_line(), "error": job.error, "retried": job.retried}


def run_donor(donor: DonorJob) -> dict:
    """The task of one seed's donor policy (a subprocess: ``python -m initmi_utils.donor``)."""
    _announce(donor.label, donor.kind)
    donor.run()
    return {"label": donor.label, "status": donor.status, "seconds": donor.seconds, "log": donor.log_line(),
            "error": donor.error, "retried": ""}


def worker_facts(kernel: str) -> dict:
    """What the client checks on every worker before submitting: its package source hash, and
    whether it has the kernelspec (and which Python that kernel runs)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        kernel_python = KernelSpecManager().get_kernel_spec(kernel).argv[0]
    except NoSuchKernel:
        kernel_python = None
    return {"host": HOST, "source": package_hash(), "python": sys.executable, "kernel_python": kernel_python}


def check_workers(client: Client, kernel: str, source: str) -> dict:
    """Refuse (``PipelineError``, one message naming the worker) a worker without the kernelspec
    or running other package source than this client; return the facts per worker."""
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT)
    except (TimeoutError, OSError):
        raise PipelineError(f"the Dask scheduler at {client.scheduler.address} has no workers after {WORKER_WAIT} s; "
                            f"start some with `dask worker {client.scheduler.address} --nthreads 1`.") from None
    facts = client.run(worker_facts, kernel)
    for address, f in sorted(facts.items()):
        if f["kernel_python"] is None:
            raise PipelineError(f"worker {address} ({f['host']}) has no Jupyter kernel {kernel!r}: run "
                                f"`{f['python']} -m ipykernel install --sys-prefix --name {kernel}` there, then restart it.")
        if f["source"] != source:
            raise PipelineError(f"worker {address} ({f['host']}) runs other initmi source than this client "
                                f"({f['source'][:12]} vs {source[:12]}): install the same commit on every worker "
                                f"(pip install -e . in the shared checkout) and restart it.")
    return facts


@contextlib.contextmanager
def connect(scheduler: str | None, workers: int, log: Callable[[str], None] = print) -> Iterator[Client]:
    """A client on ``scheduler``, or on a ``LocalCluster`` of ``workers`` processes x 1 thread."""
    if scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            raise PipelineError(f"cannot reach the Dask scheduler at {scheduler} ({type(e).__name__}); start one "
                                f"(`dask scheduler`) or leave out --scheduler for a local cluster.") from None
        with client:
            yield client
        return
    # No work queued on the scheduler: every ready task goes to a worker at once, so the workers
    # order them by priority (trainings before analyses) instead of the queue sending a ready
    # analysis ahead of a queued training.
    with dask.config.set({"distributed.scheduler.worker-saturation": "inf"}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:8787", silence_logs=logging.ERROR)
        try:
            with Client(cluster) as client:
                client.wait_for_workers(workers)  # work submitted to the first worker alone would stay there
                yield client
        finally:
            cluster.close()


def dashboard(client: Client) -> str | None:
    """The dashboard's address, when the scheduler serves one (bokeh installed)."""
    services = client.scheduler_info().get("services", {})
    return client.dashboard_link if "dashboard" in services else None


def run_grid(client: Client, donors: list[DonorJob], runs: list[list[Job]], finals: list[Job], kernel: str,
             log: Callable[[str], None] = print, threads: int | None = None, cold: bool = False,
             tick: float = 60.0, force: bool = False) -> None:
    """Run the grid on ``client``'s workers; set every job's ``status`` (and ``seconds``,
    ``error``, ``retried``). Up-to-date jobs are skipped here, in the client, without a task. The
    comparison jobs (``finals``) are submitted after every run, on the runs that did not fail.
    Executed notebooks are signed here, in the process that launched the grid (``report.sign_notebook``)."""
    source = package_hash()
    check_workers(client, kernel, source)
    jobs = [j for chain in runs for j in chain]
    if force:  # only now: a grid refused above has written nothing and deleted nothing
        for job in jobs + finals:
            job.stamp.unlink(missing_ok=True)
    grid = uuid.uuid4().hex
    plugin = KernelPlugin(kernel, source, grid, threads=threads, cold=cold)
    client.register_plugin(plugin)
    n_workers = len(client.scheduler_info()["workers"])
    progress = Progress([d.kind for d in donors] + [j.kind for j in jobs + finals], n_workers)
    client.subscribe_topic(TOPIC, lambda event: progress.start(event[1]["label"], event[1]["kind"]))
    stop = threading.Event()

    def ticker() -> None:  # long trainings would otherwise leave the log silent for minutes
        while not stop.wait(tick):
            log(progress.line())

    threading.Thread(target=ticker, daemon=True, name="initmi-progress").start()
    try:
        futures: dict = {}
        for j in jobs:  # trainings come before their analyses in each chain: keys in dependency order
            j.compute_key()
        submitted = [j for j in jobs if not _skip(j, progress)]
        needed = {j.parameters["seed"] for j in submitted if reads_donor(j)}
        donor_future = {}
        for d in donors:
            if d.seed in needed:
                f = client.submit(run_donor, d, key=f"donor-s{d.seed}-{grid[:8]}", priority=PRIORITY["donor"],
                                  pure=False)
                futures[f], donor_future[d.seed] = d, f
            else:  # nothing that reads it runs
                d.status = "skipped"
                progress.start(d.label, d.kind)
                progress.finish(d.label, d.kind, None)
        future_of: dict[int, object] = {}
        for j in submitted:
            upstream = [future_of[id(d)] for d in j.depends if id(d) in future_of]
            if reads_donor(j) and j.parameters["seed"] in donor_future:
                upstream.append(donor_future[j.parameters["seed"]])
            f = client.submit(run_notebook, j, *upstream, key=f"{j.label.replace(' ', '-')}-{j.key[:10]}",
                              priority=PRIORITY[j.kind], pure=False)
            futures[f], future_of[id(j)] = j, f
        _collect(futures, progress, log)
        for j in finals:
            # The comparison runs even when some runs failed: its report names the missing runs.
            j.depends = [d for d in j.depends if d.status not in ("failed", "blocked")]
            j.compute_key()
            if not _skip(j, progress):
                f = client.submit(run_notebook, j, key=f"{j.label}-{j.key[:10]}", priority=PRIORITY[j.kind],
                                  pure=False)
                _collect({f: j}, progress, log)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(PLUGIN)  # its teardown shuts the warm kernels down


def _skip(job: Job, progress: Progress) -> bool:
    if job.up_to_date():
        job.status = "skipped"
        progress.start(job.label, job.kind)
        progress.finish(job.label, job.kind, None)
        return True
    return False


def _collect(futures: dict, progress: Progress, log: Callable[[str], None]) -> None:
    """Wait for ``futures`` ({future: job}); copy each result onto its job, sign its notebook, log."""
    for future in as_completed(list(futures)):
        job = futures[future]
        if future.status == "error":
            failed_upstream = [d for d in getattr(job, "depends", []) if d.status in ("failed", "blocked")]
            job.status = "blocked" if failed_upstream else "failed"
            error = future.exception()
            job.error = "" if failed_upstream else f"{type(error).__name__}: {error}"
            line = (f"[{job.status:>6}] {job.label}" + (f"\n         {job.error}" if job.error else ""))
        else:
            result = future.result()
            job.status, job.seconds, job.error, job.retried = (result["status"], result["seconds"], result["error"],
                                                               result["retried"])
            line = result["log"]
            if isinstance(job, Job) and Path(result["output"]).exists() and job.status in ("ok", "failed"):
                sign_notebook(result["output"])
        progress.finish(job.label, job.kind, job.seconds if job.status in ("ok", "failed") else None)
        if job.status != "blocked":
            log(line)
            log(progress.line())
