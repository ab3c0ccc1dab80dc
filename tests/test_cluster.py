"""The Dask engine: an existing scheduler with separate worker processes, a worker killed
mid-notebook, workers that must be refused, leases, priorities."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed import Client, get_worker

from initmi_utils.cluster import PRIORITY, Work, check_workers, connect, dispatch
from initmi_utils.config import RunPaths, experiment
from initmi_utils.jobs import HOST, Job, JobBusy, Lease, Notebook, PipelineError, _alive
from initmi_utils.sources import package_hash
from initmi_utils.train import train

REPO = Path(__file__).resolve().parent.parent
DASK = str(Path(sys.executable).parent / "dask")


def pipeline(*args, root, env=None):
    return subprocess.run([sys.executable, "-m", "initmi_utils.pipeline", *args, "--root", str(root)],
                          capture_output=True, text=True, cwd=REPO, env=env)


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start_worker(address, name, env=None, log=None):
    return subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
                             "--no-dashboard", "--name", name], cwd=REPO, env=env,
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)


def stop(*processes):
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture
def scheduler(tmp_path):
    """A real ``dask scheduler`` on 127.0.0.1 (random port); yields its address."""
    sf = tmp_path / "scheduler.json"
    proc = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                             "--scheduler-file", str(sf)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sf.exists() and sf.stat().st_size, 60, "the scheduler file")
        yield json.loads(sf.read_text())["address"]
    finally:
        stop(proc)


def test_an_unreachable_scheduler_is_one_message_exit_2_and_nothing_written(tmp_path):
    out = pipeline("--preset", "smoke", "--scheduler", "tcp://127.0.0.1:9", root=tmp_path / "root")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in out.stderr
    assert not (tmp_path / "root").exists()


class FakeClient:
    def __init__(self, facts):
        self.facts = facts

    def wait_for_workers(self, n, timeout):
        pass

    def run(self, function, *args):
        return self.facts


def test_a_worker_without_the_kernel_or_with_other_source_is_refused_by_name():
    good = {"host": "a", "source": "s" * 64, "python": "/venv/bin/python", "kernel_python": "/venv/bin/python"}
    check_workers(FakeClient({"tcp://a:1": good}), "initmi", "s" * 64)
    with pytest.raises(PipelineError, match=r"worker tcp://b:2 \(b\) has no Jupyter kernel 'initmi'.*ipykernel install"):
        check_workers(FakeClient({"tcp://a:1": good, "tcp://b:2": {**good, "host": "b", "kernel_python": None}}),
                      "initmi", "s" * 64)
    with pytest.raises(PipelineError, match=r"worker tcp://b:2 \(b\) runs other initmi source.*same commit"):
        check_workers(FakeClient({"tcp://a:1": good, "tcp://b:2": {**good, "host": "b", "source": "t" * 64}}),
                      "initmi", "s" * 64)


def _job(tmp_path):
    nb = Notebook(tmp_path / "01_train.ipynb", ("scheme", "seed", "preset", "root"))
    scratch = tmp_path / "run"
    scratch.mkdir()
    return Job(nb, scratch / "notebooks" / "01_train.ipynb", {"scheme": "normal", "seed": 0}, scratch=(scratch,))


def test_a_lease_left_by_a_dead_worker_stops_its_orphaned_kernel_and_clears_its_temp_files(tmp_path):
    job = _job(tmp_path)
    orphan = subprocess.Popen(["sleep", "600"])  # stands for the dead worker's kernel, still training
    dead_worker = subprocess.Popen(["true"])
    dead_worker.wait()
    (job.scratch[0] / ".step_000040.safetensors.abc123.tmp").write_text("half")
    job.output.parent.mkdir(parents=True)
    job.output.with_suffix(".lease.json").write_text(json.dumps(
        {"host": HOST, "pid": dead_worker.pid, "kernel_pid": orphan.pid, "grid": "g1", "attempt": 1,
         "owner": "tcp://127.0.0.1:1"}))
    lease = Lease(job, "g1", "tcp://127.0.0.1:2")
    previous = lease.acquire()
    try:
        assert previous["kernel_pid"] == orphan.pid
        assert orphan.wait(timeout=5) == -signal.SIGKILL  # stopped before this attempt writes anything
        assert not list(job.scratch[0].glob(".*.tmp"))
        assert lease.data["attempt"] == 2
        assert json.loads(job.output.with_suffix(".lease.json").read_text())["pid"] == os.getpid()
    finally:
        lease.release()
    assert not job.output.with_suffix(".lease.json").exists()
    # A lease from an earlier grid (a run killed with Ctrl-C) is taken over as a first attempt.
    job.output.with_suffix(".lease.json").write_text(json.dumps(
        {"host": HOST, "pid": dead_worker.pid, "kernel_pid": None, "grid": "g0", "attempt": 2}))
    lease = Lease(job, "g1", "w")
    lease.acquire()
    lease.release()
    assert lease.data["attempt"] == 1


def test_a_lease_held_by_a_live_process_is_not_taken(tmp_path):
    job = _job(tmp_path)
    holder = subprocess.Popen(["sleep", "600"])
    try:
        job.output.parent.mkdir(parents=True)
        job.output.with_suffix(".lease.json").write_text(json.dumps(
            {"host": HOST, "pid": holder.pid, "kernel_pid": None, "grid": "other", "attempt": 1}))
        with pytest.raises(JobBusy, match=f"being run by process {holder.pid}"):
            Lease(job, "g1", "w").acquire()
        assert holder.poll() is None
    finally:
        holder.kill()


def test_a_lease_from_another_host_is_taken_only_once_it_stops_being_renewed(tmp_path):
    job = _job(tmp_path)
    job.output.parent.mkdir(parents=True)
    path = job.output.with_suffix(".lease.json")
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "kernel_pid": 2, "grid": "g1", "attempt": 1}))
    clock, slept = [path.stat().st_mtime], []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    lease = Lease(job, "g1", "w")
    lease.acquire(clock=lambda: clock[0], sleep=sleep)
    lease.release()
    assert sum(slept) >= 10.0 + 2.0  # LEASE_STALE, then ipykernel's parent poll
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "kernel_pid": 2, "grid": "g1", "attempt": 1}))
    with pytest.raises(JobBusy, match="being run on elsewhere"):  # renewed all along
        Lease(job, "g1", "w").acquire(clock=lambda: path.stat().st_mtime, sleep=lambda s: None)


def _pid():
    return os.getpid()


def _record(item):
    label, seconds, status = item
    start = time.time()
    time.sleep(seconds)
    return {"label": label, "status": status, "start": start, "end": time.time(), "worker": get_worker().address}


def _dispatch(client, spec):
    """``dispatch`` on ``spec`` ({label: (seconds, kind, status, [labels after])}, in plan order);
    returns {label: record or None when not run} and the order ``settle`` saw."""
    works = {}
    for label, (seconds, kind, status, after) in spec.items():
        works[label] = Work((label, seconds, status), _record, PRIORITY[kind], f"{label}-key",
                            [works[u] for u in after])
    records, settled = {}, []

    def settle(work, future):
        settled.append(work.item[0])
        records[work.item[0]] = None if future is None else future.result()

    dispatch(client, list(works.values()), settle)
    return records, settled


def test_dispatch_runs_every_ready_training_before_any_analysis_and_respects_dependencies():
    # Planned run by run, as ``run_grid`` plans (a run's training, then its analyses). With one slot
    # every training must still start before any analysis: the priorities decide, not the plan
    # order. With two workers, what a test can check is the dependencies.
    spec = {}
    for r in range(3):
        spec[f"t{r}"] = (0.3, "training", "ok", [])
        spec |= {f"a{r}{k}": (0.1, "analysis", "ok", [f"t{r}"]) for k in range(2)}
    for workers in (1, 2):
        with connect(None, workers) as client:
            records, _ = _dispatch(client, spec)
        first_analysis = min(records[f"a{r}{k}"]["start"] for r in range(3) for k in range(2))
        if workers == 1:
            assert all(records[f"t{r}"]["start"] < first_analysis for r in range(3)), records
        for r in range(3):
            assert all(records[f"a{r}{k}"]["start"] >= records[f"t{r}"]["end"] for k in range(2)), records


def test_dispatch_leaves_no_worker_idle_while_ready_work_waits():
    # Five runs, each a training and five analyses, on two workers. Handed to Dask all at once (with
    # priorities, every task's key new to it), the analyses stayed queued on the worker that ran
    # their training: in one measured case, once the first worker ran out, the second still started
    # 5 more analyses one after another, all ready for seconds, while the first sat idle. In a list
    # schedule, when one worker has run out of work nothing is waiting, so the other starts at most
    # the one job that became free at about the same moment.
    spec = {}
    for r in range(5):
        spec[f"t{r}"] = (1.0, "training", "ok", [])
        spec |= {f"a{r}{k}": (0.3, "analysis", "ok", [f"t{r}"]) for k in range(5)}
    with connect(None, 2) as client:
        client.run(_pid)  # each worker imports this module (and torch) before the clock matters
        records, _ = _dispatch(client, spec)
    last_end = {}
    for r in records.values():
        last_end[r["worker"]] = max(last_end.get(r["worker"], 0.0), r["end"])
    assert len(last_end) == 2, last_end
    first_out = min(last_end, key=last_end.get)
    late = [label for label, r in records.items() if r["worker"] != first_out and r["start"] > last_end[first_out]]
    assert len(late) <= 1, (late, records)
    spans = [(r["start"], r["end"]) for r in records.values()]
    for start, _ in spans:
        assert sum(s <= start < e for s, e in spans) <= 2, spans


def test_dispatch_waits_for_a_worker_when_there_is_none_for_a_moment():
    spec = {"t0": (0.0, "training", "ok", []), "a0": (0.0, "analysis", "ok", ["t0"])}
    works = {}
    for label, (seconds, kind, status, after) in spec.items():
        works[label] = Work((label, seconds, status), _record, PRIORITY[kind], f"{label}-key", [works[u] for u in after])
    seen = []
    with connect(None, 1) as client:
        real = {a: 1 for a in client.scheduler_info()["workers"]}
        answers = iter([real, {}, {}])  # after t0: no worker twice, then the worker is back
        dispatch(client, list(works.values()), lambda w, f: seen.append(w.item[0]), lambda: next(answers, real))
    assert seen == ["t0", "a0"]


def test_dispatch_does_not_run_what_follows_a_failure_and_runs_the_rest():
    spec = {"t0": (0.0, "training", "failed", []), "a0": (0.0, "analysis", "ok", ["t0"]),
            "b0": (0.0, "analysis", "ok", ["a0"]), "t1": (0.0, "training", "ok", []),
            "a1": (0.0, "analysis", "ok", ["t1"])}
    with connect(None, 1) as client:
        records, settled = _dispatch(client, spec)
    assert records["a0"] is None and records["b0"] is None  # blocked, transitively
    assert records["t1"]["status"] == "ok" and records["a1"]["status"] == "ok"
    assert sorted(settled) == sorted(spec)  # every work settled exactly once
    assert settled.index("a0") < settled.index("b0")


@pytest.mark.slow
def test_a_worker_with_other_package_source_is_refused_before_anything_runs(scheduler, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(REPO / "initmi_utils", other / "initmi_utils")
    with open(other / "initmi_utils" / "report.py", "a") as f:
        f.write("\n# edited\n")
    env = {**os.environ, "PYTHONPATH": str(other)}
    worker = start_worker(scheduler, "edited", env=env)
    try:
        out = pipeline("--preset", "smoke", "--scheduler", scheduler, root=tmp_path / "root")
    finally:
        stop(worker)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "worker tcp://127.0.0.1:" in out.stderr and "runs other initmi source" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "root").exists()


@pytest.mark.slow
def test_a_smoke_grid_on_a_scheduler_survives_a_worker_killed_mid_notebook(scheduler, tmp_path):
    root = tmp_path / "root"
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    workers = [start_worker(scheduler, f"w{i}", log=logs[i]) for i in range(2)]
    run = RunPaths.of(experiment("smoke", "normal", 0), root)
    lease = run.notebooks / "01_train.lease.json"
    with Client(scheduler, timeout="30s") as client:
        client.wait_for_workers(2, timeout=120)
    grid = subprocess.Popen([sys.executable, "-m", "initmi_utils.pipeline", "--preset", "smoke", "--scheduler",
                             scheduler, "--root", str(root)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        with Client(scheduler, timeout="30s") as client:
            client.wait_for_workers(2, timeout=120)
            pids = client.run(os.getpid)  # the worker processes, not their nannies
            # The training notebook is running once its lease names its kernel.
            held = wait_for(lambda: lease.exists() and json.loads(lease.read_text()).get("kernel_pid")
                            and json.loads(lease.read_text()), 600, "normal's training to start")
            victim, kernel = pids[held["owner"]], held["kernel_pid"]
            os.kill(victim, signal.SIGKILL)
        out, _ = grid.communicate(timeout=3600)
    finally:
        if grid.poll() is None:
            grid.kill()
        stop(*workers)
    assert grid.returncode == 0, out[-4000:]
    assert "01_train.ipynb normal seed=0" in out and "retried (attempt 2)" in out, out[-4000:]
    assert " 0 failed, 0 blocked" in out
    assert not _alive(kernel), "the killed worker's kernel outlived it"
    assert not [p for p in root.rglob("*") if p.name.endswith((".tmp", ".tmp.ipynb", ".lease.json"))]
    # The retried run's checkpoints are the bytes of an undisturbed run.
    undisturbed = tmp_path / "undisturbed"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers' kernels (Dask's nanny sets OMP_NUM_THREADS=1): bytes depend on it
    try:
        train(experiment("smoke", "normal", 0), undisturbed, progress=False)
    finally:
        torch.set_num_threads(threads)
    clean = RunPaths.of(experiment("smoke", "normal", 0), undisturbed).checkpoints
    files = sorted(p.name for p in clean.glob("*.safetensors"))
    assert files == sorted(p.name for p in run.checkpoints.glob("*.safetensors"))
    for name in files:
        assert (clean / name).read_bytes() == (run.checkpoints / name).read_bytes(), name
    assert (root / "figures" / "smoke" / "report.html").exists()

