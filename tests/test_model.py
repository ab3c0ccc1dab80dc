"""The training model and its TransformerBridge view compute the same function."""

import pytest
import torch

from initmi_utils.config import experiment
from initmi_utils.model import to_bridge
from initmi_utils.schemes import build_model
from tests.conftest import tiny_cfg


@pytest.mark.parametrize("scheme", ["normal", "xavier", "orthogonal"])
def test_bridge_logits_match_training_model(scheme):
    model = build_model(experiment("quick", scheme, 0))
    bridge = to_bridge(model)
    tokens = torch.randint(0, 64, (3, 64))
    with torch.no_grad():
        ours, theirs = model(tokens), bridge(tokens)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # Weights under the field's names agree too.
    for layer, block in enumerate(model.blocks):
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            assert torch.equal(getattr(bridge, name)[layer], getattr(block.attn, name).detach()), name
    assert torch.equal(bridge.W_E, model.embed.W_E.detach())
    assert torch.equal(bridge.W_U, model.unembed.W_U.detach())


def test_attn_only_bridge_matches():
    model = build_model(tiny_cfg("kaiming", model={"attn_only": True}))
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model(tokens), to_bridge(model)(tokens), atol=1e-5)


def test_explicit_patterns_match_bridge_hook_pattern():
    model = build_model(experiment("quick", "xavier", 1))
    tokens = torch.randint(0, 64, (2, 40))
    patterns = []
    with torch.no_grad():
        fast, slow = model(tokens), model(tokens, patterns)
        _, cache = to_bridge(model).run_with_cache(tokens)
    assert torch.allclose(fast, slow, atol=1e-5)
    for layer, p in enumerate(patterns):
        assert torch.allclose(p, cache[f"blocks.{layer}.attn.hook_pattern"], atol=1e-5)
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]))
        assert torch.all(p.triu(1) == 0)  # causal


def test_building_a_bridge_leaves_the_global_rng_alone():
    model = build_model(tiny_cfg())
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    to_bridge(model)
    assert torch.equal(torch.rand(3), expected)


def test_too_long_input_is_refused():
    model = build_model(tiny_cfg())
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        model(torch.zeros(1, model.cfg.n_ctx + 1, dtype=torch.long))
