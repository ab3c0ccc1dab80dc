"""Published results: a preset's per-run tables and a manifest under ``results/<preset>/``, in git,
so that the comparison, the report and the findings regenerate without training.

``publish`` copies what notebooks 01-06 wrote for each finished run (the tables
``data/runs/<preset>/<scheme>/seed<k>/*.parquet``, and the head browser's data) into ``results/<preset>/`` with the same layout,
so that the folder is a ``root`` that ``study.load_study`` reads, and records in
``results/<preset>/manifest.json`` per run: the git commit, the package source hash, the hash of
each notebook's import closure (``sources.closure_hash``), torch and transformer_lens versions, the
machine (CPU model, cores) and the wall time of each notebook (from the pipeline's stamps), the
training facts of ``done.json`` (last step, horizon, extension) and, for ``seeded`` runs, the donor
(``seeded.donor_compute``). Checkpoints and executed notebooks are not published.

One source: a run is published only when every one of its notebooks is up to date under the
current code (the pipeline's stamps, as the pipeline itself decides), and runs are added to an
existing manifest only when its notebooks' closure hashes are the current ones. So a study run seed
by seed, on more than one machine, publishes each finished seed as it goes, and every number in
the folder comes from the same analysis code. A change to that code refuses the next publish,
naming the notebooks that changed: rerun them (the pipeline), then publish every run again.

Command line::

    python -m initmi_utils.results publish --preset full --seeds 0 [--root DIR] [--dest DIR]
    python -m initmi_utils.results report --preset full      # 07 from results/full, no checkpoints
    python -m initmi_utils.results labels --preset quick --seeds 5,6,7,8,9 --root DIR   # held-out labels

``report`` also writes ``docs/findings.md`` (``findings_markdown``): the report's findings, every
number inserted by code, with the manifest's provenance and nothing time-dependent, so that
regenerating it from the same results gives the same file, and publishes the comparison's tables
beside the results (``results/<preset>/compare/*.csv``, ``publish_compare``): every CSV notebook 07
writes but the large restatements of the run tables, floats rounded to 6 significant digits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from initmi_utils.ablation import agreement_table, final_evidence
from initmi_utils.config import PRESETS, RunPaths, experiment, project_root, resolve_root
from initmi_utils.io import atomic_write_text
from initmi_utils.jobs import KERNEL_NAME, Job, PipelineError, discover, execute
from initmi_utils.offsets import TUNING_SEEDS
from initmi_utils.pipeline import plan, resolve_schemes, resolve_seeds
from initmi_utils.seeded import DonorMissing, donor_compute
from initmi_utils.sources import LIBRARIES, _version, closure_hash, machine, package_hash
from initmi_utils.study import MANIFEST, read_manifest
from initmi_utils.tables import read_table

RESULTS_DIR = "results"  # under the project root: results/<preset>/
LABELS_DIR = "labels"  # results/labels/<preset>_seeds<a>-<b>.csv: label validation on held-out seeds
COMPARE_DIR = "compare"  # results/<preset>/compare/<name>.csv: the comparison's tables, as the report wrote them
# Compare tables not published: row-by-row restatements of the run tables (every run's geometry
# features at every checkpoint) and the per-step means behind the curve figures. Both are several MB,
# and the report recomputes them from the published run tables.
UNPUBLISHED_TABLES = ("geometry_features", "curves")
CSV_FLOAT = "%.6g"  # published CSVs: 6 significant digits, so the last bits of a CPU's arithmetic do not show


class ResultsError(RuntimeError):
    """Results that cannot be published or read as asked (the message says what to do)."""


def _git_commit(where: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def notebook_sources(notebooks=None) -> dict[str, str]:
    """``{notebook stem: closure hash}`` of the per-run notebooks: the code a run's tables depend on."""
    return {nb.path.stem: closure_hash(nb.imports) for nb in (notebooks or discover()) if nb.per_run}


def publish(preset: str, seeds, root: str | Path | None = None, dest: str | Path | None = None,
            schemes=None) -> Path:
    """Copy the finished runs of ``seeds`` (every registered scheme, or ``schemes``) into ``dest``
    (default ``results/<preset>``) and add them to its manifest; returns the manifest's path.

    Raises ``ResultsError`` (and writes nothing) when a run is missing or not up to date under the
    current code, or when ``dest`` holds runs published from other analysis code."""
    if preset not in PRESETS:
        raise ResultsError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    root = resolve_root(root)
    dest = Path(dest) if dest else project_root() / RESULTS_DIR / preset
    notebooks = [nb for nb in discover() if nb.per_run]
    schemes = resolve_schemes(schemes or [])
    seeds = resolve_seeds(preset, seeds)
    sources = notebook_sources(notebooks)
    manifest = read_manifest(dest) or {"preset": preset, "notebooks": sources, "runs": {}}
    changed = sorted(n for n in set(sources) | set(manifest["notebooks"])
                     if manifest["notebooks"].get(n) != sources.get(n))
    if manifest["preset"] != preset or changed:
        raise ResultsError(
            f"{dest} holds {manifest['preset']} runs published from other analysis code (changed since: "
            f"{', '.join(changed) or 'the preset'}); its results and these would not come from one source. Rerun "
            f"the changed notebooks for every run (python -m initmi_utils.pipeline), then publish every run into an "
            f"empty {dest} (move the old one away first).")
    chains, _ = plan(preset, schemes, list(seeds), notebooks, root, {})
    problems, runs = [], {}
    for chain in chains:
        for job in chain:
            job.compute_key()
        first = chain[0]
        cfg = experiment(preset, first.parameters["scheme"], first.parameters["seed"])
        stale = [j.notebook.path.stem for j in chain if not j.up_to_date()]
        if stale:
            problems.append(f"{cfg.run.name}: {', '.join(stale)} not up to date")
            continue
        runs[cfg.run.name] = _run_entry(cfg, root, chain)
    if problems:
        seeds_arg = ",".join(map(str, seeds))
        raise ResultsError("not published, nothing written: " + "; ".join(problems) + f". Run them first: python -m "
                           f"initmi_utils.pipeline --preset {preset} --seeds {seeds_arg} --notebooks 01,02,03,04,05,06"
                           f" --root {root}")
    dest.mkdir(parents=True, exist_ok=True)
    for name, entry in runs.items():
        cfg = experiment(preset, entry["scheme"], entry["seed"])
        _replace_dir(RunPaths.of(cfg, root).tables, RunPaths.of(cfg, dest).tables)
    manifest["runs"].update(runs)
    manifest["runs"] = dict(sorted(manifest["runs"].items()))
    manifest.update(commit=_git_commit(project_root()), libraries={lib: _version(lib) for lib in LIBRARIES},
                    bytes=_size(dest))
    path = dest / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def _run_entry(cfg, root: Path, chain) -> dict:
    done = json.loads((RunPaths.of(cfg, root).checkpoints / "done.json").read_text())
    stamps = {j.notebook.path.stem: json.loads(j.stamp.read_text()) for j in chain}
    entry = dict(scheme=cfg.run.scheme, seed=cfg.run.seed, commit=_git_commit(project_root()), package=package_hash(),
                 final_step=done["final_step"], horizon=done.get("horizon", cfg.train.steps),
                 extended_to=done.get("extended_to"),
                 seconds={n: s.get("seconds") for n, s in stamps.items()},
                 machine=stamps[chain[0].notebook.path.stem].get("machine") or machine())
    if cfg.run.scheme == "seeded":
        try:
            entry["donor"] = donor_compute(cfg, root)
        except DonorMissing:
            entry["donor"] = None
    return entry


def _replace_dir(src: Path, dst: Path) -> None:
    """Copy the tables (``*.parquet``) and stored figure data (``*.safetensors``) of ``src`` to ``dst`` (replacing it whole, atomically per run:
    a temporary copy renamed into place)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    for f in sorted([*src.glob("*.parquet"), *src.glob("*.safetensors")]):
        shutil.copy2(f, tmp / f.name)
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def findings_markdown(findings: pd.DataFrame, manifest: dict, results: str) -> str:
    """``docs/findings.md``: the findings table of the comparison (``findings.findings``: one row per
    sentence, by question) as Markdown, headed by where the numbers come from."""
    runs = manifest["runs"]
    schemes = sorted({r["scheme"] for r in runs.values()})
    seeds = sorted({r["seed"] for r in runs.values()})
    machines = sorted({f"{r['machine']['cpu']} ({r['machine']['cores']} cores)" for r in runs.values() if r.get("machine")})
    commits = sorted({r["commit"] for r in runs.values()})
    lines = [f"# Findings ({manifest['preset']} preset)", "",
             f"Generated by `python -m initmi_utils.results report --preset {manifest['preset']}` from `{results}` "
             f"({len(runs)} runs: {len(schemes)} schemes × seeds {', '.join(map(str, seeds))}); every number below is "
             f"inserted by code (`initmi_utils.findings`), and a test regenerates this file from those results. The "
             f"evidence, tests and definitions are in the report (`figures/{manifest['preset']}/report.html`).", "",
             f"Runs computed at commit(s) {', '.join(c[:12] for c in commits)}, torch "
             f"{manifest['libraries'].get('torch')}, transformer_lens {manifest['libraries'].get('transformer-lens')}, "
             f"on {'; '.join(machines) or 'unrecorded machines'}. Every run's tables come from the same analysis code: "
             f"the import-closure hash of each notebook (`sources.closure_hash`), " +
             ", ".join(f"{n} `{h[:12]}`" for n, h in sorted(manifest["notebooks"].items())) + ".", ""]
    for question, g in findings.groupby("question", sort=False):
        lines += [f"## {question}", ""] + [f"- {s}" for s in g.sentence] + [""]
    return "\n".join(lines)


def publish_compare(table_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy the comparison's tables (the CSVs notebook 07 wrote in ``table_dir``) to ``dest``,
    replacing what was there: floats to 6 significant digits, so that the same results give the
    same files on any machine. Leaves out ``UNPUBLISHED_TABLES``. Returns the written paths."""
    table_dir, dest = Path(table_dir), Path(dest)
    names = sorted(p.stem for p in table_dir.glob("*.csv") if p.stem not in UNPUBLISHED_TABLES)
    if not names:
        raise ResultsError(f"no comparison tables in {table_dir}: run notebook 07 (or the report) first.")
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.csv"):
        if old.stem not in names:
            old.unlink()
    written = []
    for name in names:
        table = pd.read_csv(table_dir / f"{name}.csv", keep_default_na=False, na_values=[""])
        written.append(dest / f"{name}.csv")
        atomic_write_text(written[-1], table.to_csv(index=False, float_format=CSV_FLOAT))
    return written


def compare_differences(table_dir: str | Path, published: str | Path, rtol: float = 1e-5) -> list[str]:
    """What differs between the comparison's tables in ``table_dir`` (as 07 wrote them) and those
    published in ``published``: missing or extra tables, other columns or rows, values beyond
    ``rtol`` (the published floats are rounded to 6 digits). Empty when they agree."""
    table_dir, published = Path(table_dir), Path(published)
    fresh = {p.stem for p in table_dir.glob("*.csv") if p.stem not in UNPUBLISHED_TABLES}
    have = {p.stem for p in published.glob("*.csv")}
    problems = [f"{n}.csv: not published" for n in sorted(fresh - have)]
    problems += [f"{n}.csv: published but no longer computed" for n in sorted(have - fresh)]
    for name in sorted(fresh & have):
        a = pd.read_csv(table_dir / f"{name}.csv", keep_default_na=False, na_values=[""])
        b = pd.read_csv(published / f"{name}.csv", keep_default_na=False, na_values=[""])
        try:
            pd.testing.assert_frame_equal(a, b, check_dtype=False, check_exact=False, rtol=rtol, atol=1e-12)
        except AssertionError as e:
            problems.append(f"{name}.csv: {' '.join(str(e).split())[:300]}")
    return problems


def report(preset: str, results: str | Path | None = None, root: str | Path | None = None,
           doc: str | Path | None = None, tables: str | Path | None = None) -> Path:
    """Run notebook 07 on the published results (no checkpoints needed): the report goes to
    ``<root>/figures/<preset>/report.html``, the findings to ``doc`` (default
    ``<root>/docs/findings.md`` for the full preset, ``<root>/docs/findings_<preset>.md`` otherwise)
    and the comparison's tables to ``tables`` (default ``<results>/compare``, published with the
    results: ``publish_compare``); returns the executed notebook's path."""
    results = Path(results) if results else project_root() / RESULTS_DIR / preset
    manifest = read_manifest(results)
    if manifest is None:
        raise ResultsError(f"no published results in {results} ({MANIFEST} missing): publish them first "
                           f"(python -m initmi_utils.results publish --preset {preset} --seeds ...).")
    root = resolve_root(root)
    seeds = sorted({r["seed"] for r in manifest["runs"].values()})
    nb = next(n for n in discover() if n.path.stem == "07_compare")
    out = root / "data" / "compare" / preset / "07_compare.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    job = Job(nb, out, {"preset": preset, "root": str(root), "results": str(results.resolve()), "seeds": seeds})
    job.compute_key()
    start = time.perf_counter()
    execute(job, KERNEL_NAME)
    if job.status != "ok":
        raise ResultsError(f"07_compare failed on {results}: {job.error} (the executed notebook: {out}).")
    doc = Path(doc) if doc else root / "docs" / ("findings.md" if preset == "full" else f"findings_{preset}.md")
    found = pd.read_csv(root / "data" / "compare" / preset / "findings.csv")
    shown = os.path.relpath(results.resolve(), root.resolve()) if results.resolve().is_relative_to(root.resolve()) \
        else results.name
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, findings_markdown(found, manifest, shown))
    tables = Path(tables) if tables else results / COMPARE_DIR
    publish_compare(root / "data" / "compare" / preset, tables)
    print(f"report from {results} in {time.perf_counter() - start:.0f} s: {root / 'figures' / preset / 'report.html'}, "
          f"{doc}, {tables}")
    return out


def label_validation(preset: str, seeds, root: str | Path | None = None,
                     dest: str | Path | None = None) -> tuple[Path, dict[str, pd.DataFrame]]:
    """The mechanism labels against their causal criterion on runs the thresholds were not tuned on.

    Reads the ``evidence`` tables notebook 04 wrote for ``seeds`` of ``preset`` under ``root``
    (run it with ``evidence_every_checkpoint`` so that checkpoints caught mid-emergence give the
    ``partial`` examples a final checkpoint rarely has) and writes them, one row per checkpoint,
    to ``dest`` (default ``results/labels/<preset>_seeds<a>-<b>.csv``; small, committed). Returns
    that path and ``ablation.agreement_table`` over the final checkpoints (``final``), every
    checkpoint (``every``) and every checkpoint per scheme (``by_scheme``, label x scheme: n and
    passes). Refuses seeds the thresholds were tuned on (``offsets.TUNING_SEEDS``): they are not
    held out."""
    seeds = sorted({int(s) for s in seeds})
    if not seeds:
        raise ResultsError("name the held-out seeds (--seeds 5,6,7,8,9): the thresholds were tuned on seeds "
                           f"{', '.join(map(str, TUNING_SEEDS))}.")
    tuned = sorted(set(seeds) & set(TUNING_SEEDS))
    if tuned:
        raise ResultsError(f"seeds {tuned} are the ones the label thresholds were tuned on (offsets.TUNING_SEEDS), "
                           f"not held out: pass other seeds, e.g. --seeds 5,6,7,8,9.")
    root = resolve_root(root)
    ev = read_table(preset, "evidence", root)
    ev = ev[ev.seed.isin(seeds)].sort_values(["scheme", "seed", "step"]).reset_index(drop=True)
    if ev.empty:
        raise ResultsError(f"no evidence tables for {preset} seeds {seeds} under {root}: run notebooks 01 and 04 "
                           f"first (python -m initmi_utils.pipeline --preset {preset} --seeds "
                           f"{','.join(map(str, seeds))} --notebooks 01,04 --param evidence_every_checkpoint=true "
                           f"--root {root}).")
    final = final_evidence(ev)
    tables = {"final": agreement_table(final), "every": agreement_table(ev)}
    tables["by_scheme"] = pd.concat({s: agreement_table(g)[["n", "passes"]] for s, g in ev.groupby("scheme")},
                                    axis=1).fillna(0).astype(int)
    dest = Path(dest) if dest else project_root() / RESULTS_DIR / LABELS_DIR / f"{preset}_seeds{seeds[0]}-{seeds[-1]}.csv"
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, ev.to_csv(index=False, float_format="%.6g"))
    return dest, tables


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m initmi_utils.results", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="copy finished runs' tables and their manifest into results/<preset>")
    pub.add_argument("--preset", required=True)
    pub.add_argument("--seeds", default="", help="comma-separated seeds (default: the preset's)")
    pub.add_argument("--schemes", default="", help="comma-separated schemes (default: all registered)")
    pub.add_argument("--root", default=None, help="the project root the runs were computed in (default: this one)")
    pub.add_argument("--dest", default=None, help="default results/<preset>")
    rep = sub.add_parser("report", help="notebook 07 from results/<preset>, without checkpoints")
    rep.add_argument("--preset", required=True)
    rep.add_argument("--results", default=None, help="default results/<preset>")
    rep.add_argument("--root", default=None, help="where figures/ and data/compare/ are written (default: this project)")
    rep.add_argument("--doc", default=None, help="the findings' Markdown (default: docs/findings.md for full)")
    rep.add_argument("--tables", default=None, help="where the comparison's CSVs are published (default "
                                                    "<results>/compare)")
    lab = sub.add_parser("labels", help="mechanism labels vs causal evidence on held-out seeds (notebook 04's evidence)")
    lab.add_argument("--preset", required=True)
    lab.add_argument("--seeds", required=True, help="comma-separated held-out seeds, e.g. 5,6,7,8,9")
    lab.add_argument("--root", default=None, help="the project root the runs were computed in (default: this one)")
    lab.add_argument("--dest", default=None, help="default results/labels/<preset>_seeds<a>-<b>.csv")
    a = p.parse_args(argv)
    try:
        if a.command == "publish":
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
            schemes = [s for s in a.schemes.split(",") if s.strip()]
            path = publish(a.preset, seeds, a.root, a.dest, schemes)
            m = read_manifest(path.parent)
            print(f"published {len(m['runs'])} runs in {path.parent} ({m['bytes'] / 1e6:.1f} MB of tables)")
        elif a.command == "labels":
            path, tables = label_validation(a.preset, [s for s in a.seeds.split(",") if s.strip()], a.root, a.dest)
            for name, t in tables.items():
                print(f"\n{name}:\n{t.to_string()}")
            print(f"\nper-checkpoint evidence: {path}")
        else:
            report(a.preset, a.results, a.root, a.doc, a.tables)
    except (ResultsError, PipelineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
