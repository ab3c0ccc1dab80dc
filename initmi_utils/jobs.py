"""The grid's jobs: which notebook runs with which parameters, when its result is up to date, and
how one runs in a kernel. Where they run is ``cluster``'s concern; the command line is ``pipeline``.

Up to date = skipped: after a notebook succeeds a stamp records a hash of (notebook source,
parameters, the source of every package module it imports, transitively, and the torch and
transformer_lens versions, the stamps of what it depends on); a rerun with the same hash skips
it. Editing 01 or the training code therefore reruns everything downstream of it, like ``make``;
editing ``report.py`` reruns 07 only. Training itself refuses checkpoints written by other
training code (``train.StaleRun``).

The kernel is passed explicitly: a notebook's metadata says ``python3``, which on many machines
resolves to a Python other than the project's venv (the venv-kernel trap). We register a
kernelspec ``initmi`` whose argv is *this* interpreter and run every notebook with it.

This module imports no torch: a Dask worker unpickling a job stays a light process, and the
kernels it drives pay for torch once each.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from initmi_utils.io import atomic_write_text
from initmi_utils.sources import closure_hash, machine, notebook_imports, package_hash

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
    scratch: tuple[Path, ...] = ()  # directories its notebook writes into (temp files cleaned on a retry)
    key: str = ""
    status: str = "pending"  # pending | skipped | ok | failed | blocked
    seconds: float = 0.0
    error: str = ""
    retried: str = ""  # set when this attempt took over from a worker that died running it

    @property
    def stamp(self) -> Path:
        return self.output.with_suffix(".ok.json")

    @property
    def label(self) -> str:
        scheme, seed = self.parameters.get("scheme"), self.parameters.get("seed")
        return f"{self.notebook.number} {scheme}-s{seed}" if scheme else self.notebook.number

    @property
    def kind(self) -> str:
        if not self.notebook.per_run:
            return "comparison"
        return "training" if self.notebook.number == "01" else "analysis"

    def compute_key(self) -> str:
        """The notebook's source, its parameters, the hash of the package modules it imports
        (transitively, with the torch and transformer_lens versions: ``sources.closure_hash``) and
        the keys of the jobs it depends on: editing an analysis module reruns the notebooks that
        import it and what depends on them, nothing else. A job that reads its seed's donor
        (``reads_donor``) is also keyed on the donor policy's code (``initmi_utils.donor``)."""
        modules = [p for p in str(self.parameters.get("scheme_modules", "")).split(",") if p]
        result_params = {k: v for k, v in self.parameters.items() if k not in POLICY_PARAMS}
        imports = self.notebook.imports | ({"initmi_utils.donor"} if reads_donor(self) else set())
        self.key = _hash(self.notebook.path.read_bytes(), result_params, closure_hash(imports),
                         [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in modules],
                         [d.key or d.compute_key() for d in self.depends])  # a training not run: keyed all the same
        return self.key

    def up_to_date(self) -> bool:
        return self.stamp.exists() and self.output.exists() and json.loads(self.stamp.read_text()).get("key") == self.key

    def log_line(self) -> str:
        return (f"[{self.status:>6}] {self.notebook.path.name} {self.parameters.get('scheme', '')} "
                f"seed={self.parameters.get('seed', '-')} ({self.seconds:.1f}s) -> {self.output}"
                + (f"\n         {self.retried}" if self.retried else "")
                + (f"\n         {self.error}" if self.error else ""))


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
        self.kernel_name, self.cwd, self.km, self.source, self.sockets = kernel_name, cwd, None, None, ""

    def get(self):
        from jupyter_client.manager import KernelManager

        source = package_hash()
        if self.km is not None and self.source != source:  # it holds code that has since been edited
            self.discard()
        self.source = source
        if self.km is None or not self.km.is_alive():
            # Local IPC sockets, not TCP ports: nothing listens on the network, and none of the
            # kernel's warnings about unencrypted TCP.
            self.sockets = tempfile.mkdtemp(prefix="initmi-kernel-")
            self.km = KernelManager(kernel_name=self.kernel_name, transport="ipc", ip=os.path.join(self.sockets, "k"))
            self.km.start_kernel(cwd=str(self.cwd))
            self._run("from initmi_utils.model import keep_freed_memory as _k; _k(); del _k")
        else:
            self._run("get_ipython().run_line_magic('reset', '-f')")
        return self.km

    @property
    def pid(self) -> int | None:
        process = getattr(getattr(self.km, "provisioner", None), "process", None)
        return getattr(process, "pid", None)

    def _run(self, code: str) -> None:
        """Run ``code`` in the kernel outside any notebook (the worker's own set-up or reset)."""
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
            shutil.rmtree(self.sockets, ignore_errors=True)


HOST = socket.gethostname()
LEASE_BEAT = 2.0  # seconds between a running job's lease heartbeats
LEASE_STALE = 10.0  # a lease not renewed for this long belongs to a dead worker
PARENT_POLL = 1.0  # ipykernel's parent poller: an orphaned kernel exits within this of its parent's death
MAX_ATTEMPTS = 2  # a job whose worker dies is run once more, on whichever worker Dask gives it


class JobBusy(RuntimeError):
    """The job's lease is held by a live process (another grid on the same ``--root``)."""


def _alive(pid: int | None) -> bool:
    """Whether ``pid`` is a running process on this host (a zombie, already dead, is not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Lease:
    """``<executed notebook>.lease.json``: which worker runs a job now, its kernel's pid, and the
    attempt. Written when a job starts, renewed every ``LEASE_BEAT`` seconds, removed when it ends.

    Why a file, next to the artefacts, and not Dask's own state: when a worker process is killed,
    Dask reruns its task elsewhere, but the dead worker's kernel is a separate process that may
    still be training into the same checkpoint directory. Only the shared filesystem is common to
    the old and the new attempt, so the new attempt finds the lease there and makes sure the
    orphan has exited before it writes: on the same host it kills the kernel by pid and waits for
    it; on another host it waits until the lease stops being renewed, then for ipykernel's parent
    poller (``JPY_PARENT_PID``), which ends a kernel whose parent died within ``PARENT_POLL``. Then
    it removes the temp files the dead attempt left (artefacts themselves are written atomically,
    so none is ever half-written).
    """

    def __init__(self, job: Job, grid: str, owner: str):
        self.path, self.job, self.grid, self.owner = job.output.with_suffix(".lease.json"), job, grid, owner
        self.data: dict = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self, clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> dict | None:
        """Take the lease; return the previous holder's record when this is a takeover."""
        previous = self._read()
        attempt = 1
        if previous is not None:
            if previous.get("host") == HOST:
                if previous.get("pid") != os.getpid() and _alive(previous.get("pid")):
                    raise JobBusy(f"{self.job.label} is being run by process {previous['pid']} on this host "
                                  f"(another pipeline on the same --root?); wait for it or stop it.")
                kernel = previous.get("kernel_pid")
                if _alive(kernel):
                    os.kill(kernel, 9)
                while _alive(kernel):
                    sleep(0.1)
            else:
                waited = 0.0
                while clock() - self.path.stat().st_mtime < LEASE_STALE:
                    if waited > 3 * LEASE_STALE:
                        raise JobBusy(f"{self.job.label} is being run on {previous.get('host')} "
                                      f"(its lease {self.path} is still renewed); wait for it or stop it.")
                    sleep(1.0)
                    waited += 1.0
                sleep(PARENT_POLL + 1.0)
            for directory in self.job.scratch:
                for tmp in list(directory.glob(".*.tmp")) + list(directory.glob(".*.tmp.ipynb")):
                    tmp.unlink(missing_ok=True)
            attempt = previous.get("attempt", 1) + 1 if previous.get("grid") == self.grid else 1
        self.data = {"host": HOST, "pid": os.getpid(), "owner": self.owner, "grid": self.grid, "attempt": attempt,
                     "kernel_pid": None}
        self._write()
        self._beat = threading.Thread(target=self._renew, daemon=True, name="initmi-lease")
        self._beat.start()
        return previous

    def set_kernel(self, pid: int | None) -> None:
        self.data["kernel_pid"] = pid
        self._write()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        self.path.unlink(missing_ok=True)

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_BEAT):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data))


def execute(job: Job, kernel: str, warm: WarmKernel | None = None, grid: str = "", owner: str = "") -> None:
    """Run one notebook with papermill; the executed copy is written atomically either way.

    ``job.key`` must be computed (``compute_key``) by the caller. Sets ``job.status`` (``ok`` or
    ``failed``), ``seconds``, ``error`` and, when it took over from a dead worker, ``retried``.
    """
    import papermill

    job.output.parent.mkdir(parents=True, exist_ok=True)
    lease = Lease(job, grid, owner)
    previous = lease.acquire()
    try:
        if previous is not None:
            attempt = lease.data["attempt"]
            job.retried = (f"retried (attempt {attempt}): {previous.get('owner') or 'its worker'} on "
                           f"{previous.get('host')} died running it; its kernel has exited")
            if attempt > MAX_ATTEMPTS:
                job.status, job.error = "failed", f"its worker died in {attempt - 1} attempts; not retried again"
                return
        tmp = job.output.with_name(f".{job.output.name}.{os.getpid()}.tmp.ipynb")
        job.stamp.unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            km = warm.get() if warm is not None else None
            lease.set_kernel(warm.pid if warm is not None else None)
            papermill.execute_notebook(
                str(job.notebook.path), str(tmp), parameters=job.parameters, kernel_name=kernel,
                cwd=str(job.notebook.path.parent), progress_bar=False, request_save_on_cell_execute=False,
                **({"km": km} if km is not None else {}),
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
            atomic_write_text(job.stamp, json.dumps({"key": job.key, "seconds": round(job.seconds, 2),
                                                     "machine": machine()}))
    finally:
        lease.release()


def needs_donor(schemes: list[str], notebooks: list[Notebook]) -> bool:
    """Whether the selected work needs the ``seeded`` scheme's donors: training a ``seeded`` run
    does, and so does every run's persistence analysis (a notebook declaring
    ``persistence_checkpoints``), whose baseline is the donor of the run's seed."""
    per_run = [nb for nb in notebooks if nb.per_run]
    return bool(per_run) and ("seeded" in schemes or any("persistence_checkpoints" in nb.parameters for nb in per_run))


def reads_donor(job: Job) -> bool:
    """Whether ``job`` needs its seed's donor chosen first: a ``seeded`` run's training, and every
    run's persistence analysis."""
    if not job.notebook.per_run:
        return False
    if job.kind == "training":
        return job.parameters.get("scheme") == "seeded"
    return "persistence_checkpoints" in job.notebook.parameters


@dataclass
class DonorJob:
    """Run (or reuse) one student seed's donor policy in a subprocess (``python -m initmi_utils.donor``):
    its candidate donors in order until one learns induction, and the recorded choice
    (``seeded.donor_choice``). ``log_line`` is the command's last line (the chosen donor) or its error."""

    preset: str
    seed: int
    root: Path
    error: str = ""
    seconds: float = 0.0
    summary: str = ""
    status: str = "pending"
    kind = "donor"

    @property
    def label(self) -> str:
        return f"donor s{self.seed}"

    def run(self) -> bool:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "initmi_utils.donor", "--preset", self.preset, "--seed", str(self.seed),
               "--root", str(self.root)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=NOTEBOOK_DIR.parent)
        # On success the last line of stdout names the chosen donor (stderr may end in a warning).
        lines = (done.stdout if done.returncode == 0 else done.stdout + done.stderr).strip().splitlines()
        self.error = "" if done.returncode == 0 else (lines[-1] if lines else f"exit status {done.returncode}")
        self.summary = lines[-1] if lines and not self.error else ""
        self.seconds = time.perf_counter() - start
        self.status = "failed" if self.error else "ok"
        return not self.error

    def log_line(self) -> str:
        return (f"[{self.status:>6}] donor seed={self.seed} ({self.seconds:.1f}s)"
                + (f": {self.summary}" if self.summary else f"\n         {self.error}" if self.error else ""))


class Progress:
    """One line a person can follow, in a plain log and under ``make``: jobs done / total, the
    running ones and how long they have run, the elapsed time and an ETA.

    The ETA is measured, not guessed: each job kind (donor, training, analysis, comparison) is
    assumed to take the mean of the jobs of that kind finished so far (skipped ones do not count),
    the work left is that sum spread over the workers, and until a kind has a measurement the ETA
    says which kind it waits for. Starts and finishes may arrive in either order (a worker's
    start event can come after its result): a finish without a start still counts once.
    """

    def __init__(self, kinds: list[str], workers: int, clock: Callable[[], float] = time.monotonic):
        self.total, self.workers, self.clock = len(kinds), max(1, workers), clock
        self.start_time = clock()
        self.left: dict[str, int] = {}
        for k in kinds:
            self.left[k] = self.left.get(k, 0) + 1
        self.durations: dict[str, list[float]] = {}
        self.running: dict[str, tuple[str, float]] = {}
        self.finished: set[str] = set()
        self.done = 0
        self.lock = threading.Lock()

    def start(self, label: str, kind: str) -> None:
        with self.lock:
            if label in self.finished or label in self.running:
                return
            self.left[kind] -= 1
            self.running[label] = (kind, self.clock())

    def finish(self, label: str, kind: str, seconds: float | None) -> None:
        """``seconds`` None: skipped (up to date), no measurement."""
        with self.lock:
            if label in self.finished:
                return
            if self.running.pop(label, None) is None:
                self.left[kind] -= 1
            self.finished.add(label)
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
