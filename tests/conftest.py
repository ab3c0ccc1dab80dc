"""Shared fixtures: a tiny config factory and seeded global RNGs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from initmi_utils.config import PRESETS, ExperimentConfig, RunConfig


def tiny_cfg(scheme: str = "normal", seed: int = 0, **sections) -> ExperimentConfig:
    """The smoke preset with a run and optional per-section overrides: ``tiny_cfg(train={"steps": 8})``."""
    cfg = dataclasses.replace(PRESETS["smoke"], run=RunConfig(scheme=scheme, seed=seed, preset="smoke"))
    return cfg.replace(**sections) if sections else cfg


def one_value(df, **where) -> float:
    """The ``value`` of the single row matching ``where`` (fails if there is not exactly one)."""
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, f"expected one row for {where}, got {len(sel)}"
    return sel.value.item()


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield
