"""Where the grid's jobs run: a Dask cluster, embedded or existing.

With no scheduler given, ``connect`` starts a ``LocalCluster`` of ``workers`` processes x 1 thread
on 127.0.0.1 and shuts it down afterwards; given one (``tcp://host:port``), it submits to that
scheduler's workers. Either way ``run_grid`` hands the jobs to ``dispatch``, which keeps as many
jobs in flight as the cluster has worker threads: whenever one finishes, the ready job of highest
priority (donors, then trainings, then analyses; ties in plan order) is submitted next, and a job
is ready when what it depends on has finished (a seed's donor -> the jobs that read it; a run's
training -> its analyses; every run -> the comparison). This is the list schedule that
``benchmarks/bench_grid.py`` simulates.

Each worker keeps one warm Jupyter kernel (``KernelPlugin``, a Dask ``WorkerPlugin``): imports are
paid once per worker, not per notebook. The kernel restarts when the package source changes
(``jobs.WarmKernel``). A worker that dies mid-notebook loses its task to Dask, which runs it on
another worker; the job's lease (``jobs.Lease``) makes sure the dead worker's kernel has exited
and its temp files are gone before the retry writes, and allows one retry.

What a cluster needs: ``--root`` on a filesystem every worker sees at the same path, and on every
worker the same package source (checked at start: ``check_workers``) and the ``initmi`` kernelspec.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import dask
from distributed import Client, LocalCluster, WorkerPlugin, get_worker, wait

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


def run_notebook(job: Job) -> dict:
    """The task of one notebook on a worker: refused when the worker's package source differs
    from the client's, otherwise executed in the worker's warm kernel. Returns a small record; the
    notebook's results are files."""
    plugin: KernelPlugin = get_worker().plugins[PLUGIN]
    if package_hash() != plugin.source:
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
    # ``dispatch`` never submits more tasks than there are threads, so nothing needs queueing on
    # the scheduler: each task goes straight to a free worker.
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


@dataclass(eq=False)
class Work:
    """One task for ``dispatch``: ``fn(item)`` on a worker, which returns a record with a
    ``status``; it may start once every work in ``after`` has finished."""

    item: Any
    fn: Callable[[Any], dict]
    priority: int
    key: str
    after: list["Work"] = field(default_factory=list)
    finished: bool = False
    failed: bool = False  # raised, or its record's status is failed or blocked, or not run


def worker_threads(client: Client) -> dict[str, int]:
    """``{address: threads}`` of the cluster's workers now."""
    return {a: w.get("nthreads", 1) for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}


def dispatch(client: Client, works: list[Work], settle: Callable[[Work, Any], None],
             workers: Callable[[], dict[str, int]] | None = None) -> None:
    """Run ``works`` (given in plan order) on ``client``'s workers as a list schedule: whenever a
    worker thread is free, the ready work of highest ``priority`` (ties in plan order) is submitted
    to that worker. A work is ready when every work in its ``after`` has finished; when one of those
    failed it is not run. ``settle(work, future)`` is called once per work as it ends (``future`` is
    None for a work not run), in the calling thread. ``workers()`` (default ``worker_threads``) is
    read again at every step, so workers that join or leave count; a task whose worker dies is
    rerun by Dask on another one (the restriction to its worker is loose).

    Why the client places the tasks rather than Dask: Dask sends a ready task to a worker at once,
    judging how busy each worker is by the durations it has measured per key prefix. Every
    notebook's key is new to it, so a worker an hour into a training looked as free as an idle one:
    one worker held a queue of trainings while the other sat idle, and work stealing, which judges
    by the same estimates, moved nothing."""
    workers = workers or (lambda: worker_threads(client))
    pending, flight = list(works), {}
    while pending or flight:
        blocked = True
        while blocked:  # a work not run makes the works after it not run either
            blocked = [w for w in pending if any(u.failed for u in w.after)]
            for w in blocked:
                pending.remove(w)
                w.finished = w.failed = True
                settle(w, None)
        ready = sorted((w for w in pending if all(u.finished for u in w.after)), key=lambda w: -w.priority)
        threads = workers()
        busy = collections.Counter(address for _, address in flight.values())
        free = [a for a, n in sorted(threads.items()) for _ in range(n - busy[a])]
        for w, address in zip(ready, free[:max(0, sum(threads.values()) - len(flight))]):
            pending.remove(w)
            future = client.submit(w.fn, w.item, key=w.key, priority=w.priority, pure=False, workers=[address],
                                   allow_other_workers=True)
            flight[future] = (w, address)
        if not flight:
            if not pending:
                return
            if not ready:
                raise PipelineError(f"{len(pending)} jobs wait for jobs that are not in the grid, e.g. {pending[0].key}")
            try:  # ready work and no worker at the moment (the last one died, its nanny restarts it)
                client.wait_for_workers(1, timeout=WORKER_WAIT)
            except (TimeoutError, OSError):
                raise PipelineError(f"the Dask scheduler at {client.scheduler.address} has had no workers for "
                                    f"{WORKER_WAIT} s with {len(pending)} jobs left; start some, then rerun.") from None
            continue
        done, _ = wait(list(flight), return_when="FIRST_COMPLETED", timeout=None)
        for future in done:
            w, _ = flight.pop(future)
            w.finished = True
            w.failed = future.status == "error" or future.result()["status"] in ("failed", "blocked")
            settle(w, future)


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
        for j in jobs:  # trainings come before their analyses in each chain: keys in dependency order
            j.compute_key()
        submitted = [j for j in jobs if not _skip(j, progress)]
        needed = {j.parameters["seed"] for j in submitted if reads_donor(j)}
        works, donor_work, work_of = [], {}, {}
        for d in donors:
            if d.seed in needed:
                donor_work[d.seed] = Work(d, run_donor, PRIORITY["donor"], f"donor-s{d.seed}-{grid[:8]}")
                works.append(donor_work[d.seed])
            else:  # nothing that reads it runs
                d.status = "skipped"
                progress.start(d.label, d.kind)
                progress.finish(d.label, d.kind, None)
        for j in submitted:
            after = [work_of[id(d)] for d in j.depends if id(d) in work_of]
            if reads_donor(j) and j.parameters["seed"] in donor_work:
                after.append(donor_work[j.parameters["seed"]])
            work_of[id(j)] = Work(j, run_notebook, PRIORITY[j.kind], f"{j.label.replace(' ', '-')}-{j.key[:10]}", after)
            works.append(work_of[id(j)])
        settle = functools.partial(_settle, progress=progress, log=log)
        dispatch(client, works, settle)
        for j in finals:
            # The comparison runs even when some runs failed: its report names the missing runs.
            j.depends = [d for d in j.depends if d.status not in ("failed", "blocked")]
            j.compute_key()
            if not _skip(j, progress):
                dispatch(client, [Work(j, run_notebook, PRIORITY[j.kind], f"{j.label}-{j.key[:10]}")], settle)
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


def _settle(work: Work, future, progress: Progress, log: Callable[[str], None]) -> None:
    """``dispatch``'s ``settle``: copy a finished work's record onto its job, sign its notebook,
    log. A work not run (``future`` None) is blocked by the first of its ``after`` that failed."""
    job = work.item
    if future is None:
        cause = next(u.item for u in work.after if u.failed)
        job.status, job.error = "blocked", f"not run: {cause.label} {cause.status}"
    elif future.status == "error":
        error = future.exception()
        job.status, job.error = "failed", f"{type(error).__name__}: {error}"
        line = f"[{job.status:>6}] {job.label}\n         {job.error}"
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
