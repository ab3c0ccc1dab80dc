"""The projection of ``benchmarks/bench_grid.py``: critical path, list scheduling and the graph it
builds from the pipeline's jobs, on small graphs whose answers are worked out by hand.

A projection of the full study on 35 workers is only as good as these: a scheduler that leaves a
worker idle while a job is ready, priorities applied backwards, a donor that does not hold back the
jobs reading it, or a critical path that drops a chain would all give a plausible but wrong number.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from initmi_utils.jobs import Job, Notebook

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_grid import (  # noqa: E402
    Task,
    checkpoint_ratio,
    critical_path,
    dag_from_plan,
    list_schedule,
    lower_bound,
    total_work,
)

EQUAL = {"donor": 0, "training": 0, "analysis": 0, "comparison": 0}
PIPELINE = {"donor": 30, "training": 20, "analysis": 10, "comparison": 0}


def chain(*seconds):
    names = [f"t{i}" for i in range(len(seconds))]
    return [Task(n, "training", s, (names[i - 1],) if i else (), i) for i, (n, s) in enumerate(zip(names, seconds))]


def test_a_chain_takes_its_sum_on_any_number_of_workers():
    tasks = chain(2.0, 3.0, 4.0)
    assert critical_path(tasks) == (9.0, ["t0", "t1", "t2"])
    for n in (1, 2, 5):
        s = list_schedule(tasks, n, EQUAL)
        assert s.makespan == 9.0
        assert [s.start[t] for t in ("t0", "t1", "t2")] == [0.0, 2.0, 5.0]


def test_a_fork_spreads_over_workers_and_its_critical_path_is_the_longest_branch():
    tasks = [Task("root", "training", 1.0, (), 0), Task("x", "analysis", 5.0, ("root",), 1),
             Task("y", "analysis", 3.0, ("root",), 2), Task("z", "analysis", 2.0, ("root",), 3)]
    assert critical_path(tasks) == (6.0, ["root", "x"])
    assert list_schedule(tasks, 1, EQUAL).makespan == 11.0  # all work, one after another
    two = list_schedule(tasks, 2, EQUAL)
    assert two.makespan == 6.0  # x on one worker; y then z on the other
    assert two.start["z"] == 4.0 and two.worker["z"] == two.worker["y"]
    assert list_schedule(tasks, 3, EQUAL).makespan == 6.0
    assert lower_bound(tasks, 1) == 11.0 and lower_bound(tasks, 2) == 6.0 and lower_bound(tasks, 10) == 6.0


def test_a_join_waits_for_its_last_dependency():
    tasks = [Task("a", "analysis", 4.0, (), 0), Task("b", "analysis", 1.0, (), 1),
             Task("c", "comparison", 2.0, ("a", "b"), 2)]
    s = list_schedule(tasks, 2, EQUAL)
    assert s.start["c"] == 4.0 and s.makespan == 6.0
    assert critical_path(tasks) == (6.0, ["a", "c"])


def test_priorities_put_trainings_before_analyses_submitted_earlier():
    # Two analyses of 5 s are ready and submitted first; a 10 s training unlocks a 1 s analysis.
    # Training first (the pipeline's order): 11 s. Submission order alone: both analyses first, 16 s.
    tasks = [Task("b1", "analysis", 5.0, (), 0), Task("b2", "analysis", 5.0, (), 1),
             Task("t", "training", 10.0, (), 2), Task("a", "analysis", 1.0, ("t",), 3)]
    by_priority = list_schedule(tasks, 2, PIPELINE)
    assert by_priority.start["t"] == 0.0 and by_priority.makespan == 11.0
    fifo = list_schedule(tasks, 2, EQUAL)
    assert fifo.start["t"] == 5.0 and fifo.makespan == 16.0


def test_the_default_priorities_are_the_pipelines_donor_training_analysis_comparison():
    # One worker, everything ready at once, submitted in the reverse of the pipeline's order.
    tasks = [Task("c", "comparison", 1.0, (), 0), Task("a", "analysis", 1.0, (), 1),
             Task("t", "training", 1.0, (), 2), Task("d", "donor", 1.0, (), 3)]
    s = list_schedule(tasks, 1)  # priorities from initmi_utils.cluster.PRIORITY
    assert sorted(s.start, key=s.start.get) == ["d", "t", "a", "c"]


def random_dag(rng: random.Random, n: int) -> list[Task]:
    kinds = list(PIPELINE)
    tasks = []
    for i in range(n):
        deps = tuple(f"j{k}" for k in rng.sample(range(i), min(i, rng.randint(0, 3))))
        tasks.append(Task(f"j{i}", rng.choice(kinds), float(rng.randint(0, 20)), deps, i))
    rng.shuffle(tasks)  # the order of the list must not matter, only deps and ``order``
    return tasks


@pytest.mark.parametrize("seed", range(20))
def test_on_random_graphs_the_schedule_is_valid_and_within_grahams_bound(seed):
    rng = random.Random(seed)
    tasks = random_dag(rng, rng.randint(1, 40))
    by_name = {t.name: t for t in tasks}
    cp, path = critical_path(tasks)
    assert cp == pytest.approx(sum(by_name[n].seconds for n in path))
    for a, b in zip(path, path[1:]):
        assert a in by_name[b].deps  # the path is a chain of real dependencies
    for n in (1, 2, 3, 8):
        s = list_schedule(tasks, n, PIPELINE)
        for t in tasks:
            assert s.end[t.name] == pytest.approx(s.start[t.name] + t.seconds)
            assert all(s.start[t.name] >= s.end[d] - 1e-9 for d in t.deps)
        for w in range(n):  # a worker runs one job at a time
            spans = sorted((s.start[t.name], s.end[t.name]) for t in tasks if s.worker[t.name] == w)
            assert all(e0 <= s1 + 1e-9 for (_, e0), (s1, _) in zip(spans, spans[1:]))
        assert s.makespan >= lower_bound(tasks, n) - 1e-9
        # A greedy schedule never idles a worker while a job is ready: Graham's bound.
        assert s.makespan <= total_work(tasks) / n + (1 - 1 / n) * cp + 1e-9
        if n == 1:
            assert s.makespan == pytest.approx(total_work(tasks))


def test_a_cycle_or_an_unknown_dependency_is_refused():
    with pytest.raises(ValueError, match="cycle"):
        critical_path([Task("a", "training", 1.0, ("b",), 0), Task("b", "training", 1.0, ("a",), 1)])
    with pytest.raises(ValueError, match="unknown"):
        list_schedule([Task("a", "training", 1.0, ("nope",), 0)], 2, EQUAL)


def _grid(tmp_path):
    """Two schemes x two seeds of notebooks 01 (training), 02 and 03 (03 scores persistence
    against the donor) and 07, as ``pipeline.plan`` builds them."""
    nb = {n: Notebook(tmp_path / f"{n}_x.ipynb", params) for n, params in
          {"01": ("scheme", "seed"), "02": ("scheme", "seed"), "03": ("scheme", "seed", "persistence_checkpoints"),
           "07": ("preset", "seeds")}.items()}
    chains = []
    for scheme in ("normal", "seeded"):
        for seed in (0, 1):
            c: list[Job] = []
            for n in ("01", "02", "03"):
                c.append(Job(nb[n], tmp_path / f"{scheme}{seed}{n}.ipynb", {"scheme": scheme, "seed": seed},
                             depends=c[:1]))
            chains.append(c)
    finals = [Job(nb["07"], tmp_path / "07.ipynb", {"seeds": [0, 1]}, depends=[j for c in chains for j in c])]
    return chains, finals


def test_the_graph_follows_the_pipeline_donors_trainings_analyses_comparison(tmp_path):
    chains, finals = _grid(tmp_path)
    seconds = {"01": 10.0, "02": 1.0, "03": 2.0, "07": 3.0}
    tasks = dag_from_plan(chains, finals, lambda j: seconds[j.notebook.number], lambda seed: [7.0, 30.0][seed])
    by = {t.name: t for t in tasks}
    assert [t.name for t in tasks if t.kind == "donor"] == ["donor s0", "donor s1"]
    assert by["donor s1"].seconds == 30.0 and by["donor s1"].order < by["01 normal-s0"].order
    assert by["01 seeded-s1"].deps == ("donor s1",)  # the seeded training reads its seed's donor
    assert by["01 normal-s1"].deps == ()  # other trainings do not
    assert set(by["03 normal-s1"].deps) == {"01 normal-s1", "donor s1"}  # every 03 reads its seed's donor
    assert by["02 normal-s1"].deps == ("01 normal-s1",)
    assert set(by["07"].deps) == {t.name for t in tasks if t.kind in ("training", "analysis")}
    # The slow donor of seed 1 (its candidates run one after another) sets the critical path.
    cp, path = critical_path(tasks)
    assert path == ["donor s1", "01 seeded-s1", "03 seeded-s1", "07"] and cp == 30 + 10 + 2 + 3
    assert list_schedule(tasks, 100, PIPELINE).makespan == cp


def test_no_donor_when_nothing_reads_one(tmp_path):
    chains, finals = _grid(tmp_path)
    chains = [[j for j in c if j.notebook.number != "03"] for c in chains if c[0].parameters["scheme"] == "normal"]
    finals[0].depends = [j for c in chains for j in c]
    tasks = dag_from_plan(chains, finals, lambda j: 1.0, lambda seed: pytest.fail("no donor is needed"))
    assert not [t for t in tasks if t.kind == "donor"]


def test_checkpoint_ratio_keeps_the_runs_ladder_checkpoints():
    quick = [0, 1, 10, 100]
    full = [0, 1, 5, 10, 50, 100, 500]
    assert checkpoint_ratio(quick, quick, full) == 7 / 4
    # Two loss-ladder checkpoints (37, 38) the schedule does not have: kept in the target run.
    assert checkpoint_ratio([0, 1, 10, 37, 38, 100], quick, full) == 9 / 6
