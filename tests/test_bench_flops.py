"""The FLOP count the benchmarks divide by is the work the step really does.

``flops_per_token`` is written down from the architecture; ``benchmarks/bench_train.py`` records
the matrix products a real training step dispatches (forward and backward, attention written out
as matmuls) and replays them as its ``gemm_only`` ceiling. The two must agree exactly, on models
of other shapes too: a miscounted weight, an attention term counted once instead of per layer, or
a product the recorder misses (and the ceiling would then be too optimistic) all fail here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from initmi_utils.config import ExperimentConfig
from initmi_utils.model import flops_per_token

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_train import make_gemm_only, matmul_flops, step_matmuls  # noqa: E402

MODELS = [
    {},  # the default model
    {"n_layers": 3, "n_heads": 2, "d_model": 64, "d_mlp": 256, "d_vocab": 48, "act_fn": "relu"},
    {"n_layers": 1, "n_heads": 8, "d_model": 64, "d_vocab": 100, "attn_only": True},
]


@pytest.mark.parametrize("model", MODELS, ids=["default", "3L-relu", "attn-only"])
@pytest.mark.parametrize("seq_len", [64, 37])
def test_recorded_matmul_flops_equal_the_analytic_count(model, seq_len):
    cfg = ExperimentConfig().replace(model=model, data={"seq_len": seq_len}, train={"batch_size": 3})
    tokens = torch.randint(0, cfg.model.d_vocab, (3, seq_len), generator=torch.Generator().manual_seed(0))
    calls = step_matmuls(cfg, tokens)
    recorded = sum(matmul_flops(layout_operands(layout)) for _, layout, _ in calls)
    assert recorded == flops_per_token(cfg.model, seq_len) * tokens.numel()


def test_gemm_only_replays_the_recorded_products():
    cfg = ExperimentConfig().replace(train={"batch_size": 2})
    tokens = torch.randint(0, cfg.model.d_vocab, (2, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    run = make_gemm_only(cfg, tokens)
    assert run.flops == flops_per_token(cfg.model, cfg.data.seq_len) * tokens.numel()
    run(1)  # every recorded layout is valid for its op (a wrong stride or operand order raises)


def layout_operands(layout: tuple) -> tuple:
    """Empty tensors with a recorded call's shapes (``matmul_flops`` only reads shapes)."""
    return tuple(torch.empty(x[0]) if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], torch.Size) else x
                 for x in layout)
