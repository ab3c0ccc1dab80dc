"""One schema for every table the study writes, one writer and one reader.

Every analysis returns a long-format ``DataFrame`` with the columns of ``COLUMNS``; ``layer`` and
``head`` are ``-1`` where a metric is not per layer or per head, and extra descriptive columns
(e.g. ``position_type``) may follow. ``write_table`` stores it as
``data/runs/<preset>/<scheme>/seed<k>/<name>.parquet`` (atomically; zstd level 19, about a
quarter smaller than parquet's default snappy: the full study's tables are published in git); ``read_table`` gathers one
table name across every run of a preset, so 07_compare reads all runs in one call.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from initmi_utils.config import ExperimentConfig, RunPaths, resolve_root
from initmi_utils.io import atomic_write

ID_COLUMNS = ["run", "scheme", "seed", "preset"]
COLUMNS = ID_COLUMNS + ["step", "layer", "head", "metric", "value"]


def tidy(df: pd.DataFrame, cfg: ExperimentConfig) -> pd.DataFrame:
    """Add the run's identifying columns and default ``layer``/``head`` to -1; schema columns first."""
    df = df.copy()
    r = cfg.run
    for col, val in zip(ID_COLUMNS, (r.name, r.scheme, r.seed, r.preset)):
        df[col] = val
    for col in ("layer", "head"):
        df[col] = df[col].fillna(-1).astype(int) if col in df else -1
    missing = {"step", "metric", "value"} - set(df.columns)
    if missing:
        raise ValueError(f"a table needs the columns step, metric and value; missing {sorted(missing)}.")
    df["step"] = df["step"].astype(int)
    df["value"] = df["value"].astype(float)
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def table_path(cfg: ExperimentConfig, name: str, root: str | Path | None = None) -> Path:
    return RunPaths.of(cfg, root).tables / f"{name}.parquet"


def write_table(df: pd.DataFrame, cfg: ExperimentConfig, name: str, root: str | Path | None = None) -> Path:
    path = table_path(cfg, name, root)
    out = tidy(df, cfg)
    atomic_write(path, lambda p: out.to_parquet(p, index=False, compression="zstd", compression_level=19))
    return path


def read_table(preset: str, name: str, root: str | Path | None = None) -> pd.DataFrame:
    """Table ``name`` of every run of ``preset`` under ``root`` (empty frame with COLUMNS if none)."""
    paths = sorted((resolve_root(root) / "data" / "runs" / preset).glob(f"*/seed*/{name}.parquet"))
    if not paths:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
