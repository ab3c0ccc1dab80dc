"""The `mimetic` scheme: per-head W_Q W_K^T ~ a1 Z + b1 I, per-layer W_V W_O ~ a2 Z - b2 I."""

from __future__ import annotations

import math

import pytest
import torch

from initmi_utils.config import ModelConfig
from initmi_utils.model import Transformer
from initmi_utils.schemes import MIMETIC, SCHEMES, MimeticConstants, init_weights, mimetic_attention

SMALL = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_mlp=64, d_vocab=32, n_ctx=32)  # the smoke model
DEFAULT = ModelConfig()  # 2 layers x 4 heads, d_model 128


def _offdiag(m: torch.Tensor) -> torch.Tensor:
    return m[~torch.eye(m.shape[0], dtype=torch.bool)]


def test_registered():
    assert "mimetic" in SCHEMES


@pytest.mark.parametrize("cfg", [SMALL, DEFAULT], ids=["smoke", "default"])
def test_query_key_product_has_positive_diagonal_per_head(cfg):
    model = init_weights(Transformer(cfg), "mimetic", seed=0)
    c = MIMETIC
    for block in model.blocks:
        for h in range(cfg.n_heads):
            qk = (block.attn.W_Q[h] @ block.attn.W_K[h].T).detach()
            diag, off = qk.diagonal().mean().item(), _offdiag(qk)
            # The rank-d_head truncation of a1 Z + b1 I keeps a positive diagonal far above the
            # off-diagonal noise, and can never exceed the full matrix's b1 (+ noise).
            assert diag > 3 * off.std().item()
            assert diag < c.beta_qk + 4 * c.alpha_qk / cfg.d_model
            assert abs(off.mean().item()) < 0.1 * diag


@pytest.mark.parametrize("cfg", [SMALL, DEFAULT], ids=["smoke", "default"])
def test_value_output_product_is_alpha_z_minus_beta_identity_per_layer(cfg):
    model = init_weights(Transformer(cfg), "mimetic", seed=0)
    c, d = MIMETIC, cfg.d_model
    for block in model.blocks:
        a = block.attn
        layer = torch.einsum("hme,hen->mn", a.W_V, a.W_O).detach()  # sum over heads of W_V^h W_O^h
        # mean(diag) = -b2 + a2 * mean(diag Z), and mean(diag Z) has std 1/d.
        assert abs(layer.diagonal().mean().item() + c.beta_vo) < 4 * c.alpha_vo / d
        # off-diagonal entries are a2 * N(0, 1/d)
        assert 0.85 < _offdiag(layer).std().item() / (c.alpha_vo / math.sqrt(d)) < 1.15
        for h in range(cfg.n_heads):  # each head carries its share of the negative identity
            assert (a.W_V[h] @ a.W_O[h]).diagonal().mean().item() < 0


def test_per_head_value_output_variant_has_negative_diagonal():
    model = init_weights(Transformer(SMALL), "normal", seed=0)
    mimetic_attention(model, torch.Generator().manual_seed(0), MimeticConstants(vo_per_layer=False))
    for block in model.blocks:
        for h in range(SMALL.n_heads):
            vo = (block.attn.W_V[h] @ block.attn.W_O[h]).detach()
            assert -vo.diagonal().mean().item() > 4 * _offdiag(vo).std().item()


def test_reproducible_by_seed_and_different_across_seeds():
    a = init_weights(Transformer(SMALL), "mimetic", seed=3).state_dict()
    b = init_weights(Transformer(SMALL), "mimetic", seed=3).state_dict()
    c = init_weights(Transformer(SMALL), "mimetic", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("blocks.0.attn.W_Q", "blocks.1.attn.W_K", "blocks.0.attn.W_V", "blocks.1.attn.W_O"):
        assert not torch.allclose(a[name], c[name])


def test_heads_get_independent_query_key_draws():
    model = init_weights(Transformer(SMALL), "mimetic", seed=0)
    a = model.blocks[0].attn
    assert not torch.allclose(a.W_Q[0] @ a.W_K[0].T, a.W_Q[1] @ a.W_K[1].T)


def test_other_matrices_are_the_normal_schemes_and_everything_is_finite():
    mim = init_weights(Transformer(SMALL), "mimetic", seed=1)
    nor = init_weights(Transformer(SMALL), "normal", seed=1).state_dict()
    for name, p in mim.state_dict().items():
        assert torch.isfinite(p).all(), name
        if not any(w in name for w in ("W_Q", "W_K", "W_V", "W_O")):
            assert torch.equal(p, nor[name]), name  # common random numbers with `normal`
    logits = mim(torch.randint(0, SMALL.d_vocab, (4, SMALL.n_ctx), generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(logits).all()
