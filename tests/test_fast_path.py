"""The training path is the model the analyses see.

Training runs ``Transformer`` (fused QKV, ``scaled_dot_product_attention``, no hooks); every
analysis runs ``to_bridge(model)``, TransformerLens's ``TransformerBridge`` on a copy of the same
weights. If the two ever computed different functions, every mechanism we report would describe
a model that was never trained. So: same weights in, same logits AND same gradients out
(float32 tolerance), for several init schemes, with and without MLPs, on CUDA when present.

Gradients are compared in *our* parameter names: the bridge's gradients are pulled back through
``native_state_dict`` (our weights -> the bridge's layout, a pure reshape/transpose map) with
autograd, so the test does not rely on a hand-written inverse of that layout.
"""

from __future__ import annotations

import pytest
import torch

from initmi_utils.config import ModelConfig
from initmi_utils.model import Transformer, loss_fn, native_state_dict, to_bridge
from initmi_utils.schemes import init_weights

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Small but not degenerate: several heads, d_head > 1, MLP wider than the residual, seq < n_ctx.
BASE = dict(n_layers=2, n_heads=4, d_model=64, d_mlp=128, d_vocab=48, n_ctx=24)
CASES = [
    ("xavier", ModelConfig(**BASE)),
    ("scaled_residual", ModelConfig(**BASE)),
    ("orthogonal", ModelConfig(**BASE, act_fn="relu")),
    ("kaiming", ModelConfig(**BASE, attn_only=True)),
]


def _tokens(cfg: ModelConfig, batch: int = 6, pos: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.d_vocab, (batch, pos), generator=g).to(DEVICE)


def _model(scheme: str, cfg: ModelConfig) -> Transformer:
    return init_weights(Transformer(cfg), scheme, seed=3).to(DEVICE)


def _bridge_param_grads(bridge) -> dict[str, torch.Tensor]:
    """The bridge's gradients keyed by the native module's parameter names (wrappers stripped)."""
    return {
        name.replace("._original_component", ""): p.grad
        for name, p in bridge.original_model.named_parameters()
    }


def _pull_back(model: Transformer, native_grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bridge-layout gradients -> gradients w.r.t. ``model``'s parameters, by the chain rule through
    ``native_state_dict`` (the layout map is linear, so this is exact, a transpose of the map)."""
    names, params = zip(*model.named_parameters())
    layout = native_state_dict(model)
    missing = sorted(set(layout) ^ set(native_grads))
    assert not missing, f"layouts differ: {missing}"
    with torch.enable_grad():
        inner = sum((layout[n] * native_grads[n].detach()).sum() for n in layout)
        grads = torch.autograd.grad(inner, params)
    return dict(zip(names, grads))


def _both(scheme: str, cfg: ModelConfig):
    """Logits, loss and per-parameter gradients of the training path and of the bridge."""
    model = _model(scheme, cfg)
    bridge = to_bridge(model).to(DEVICE)
    tokens = _tokens(cfg)

    logits = model(tokens)
    loss = loss_fn(logits, tokens)
    ours = dict(zip((n for n, _ in model.named_parameters()), torch.autograd.grad(loss, list(model.parameters()))))

    b_logits = bridge(tokens)
    b_loss = loss_fn(b_logits, tokens)
    b_loss.backward()
    theirs = _pull_back(model, _bridge_param_grads(bridge))
    return model, bridge, tokens, (logits, loss, ours), (b_logits, b_loss, theirs)


def _assert_grads_close(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        a, b = ours[name], theirs[name]
        assert b is not None, f"the bridge produced no gradient for {name}"
        if name.endswith("attn.b_K"):
            # b_K adds q . b_K to every score of a query row, which softmax ignores: its true
            # gradient is 0 and both paths return rounding noise. Check exactly that, on the
            # scale of the same layer's W_K gradient.
            ref = ours[name.replace("b_K", "W_K")].abs().max().item()
            assert max(a.abs().max().item(), b.abs().max().item()) <= 1e-5 * ref, f"{name}: not ~0"
            continue
        scale = a.abs().max().item()
        assert scale > 0, f"{name}: zero gradient, the comparison would be vacuous"
        err = (a - b).abs().max().item()
        assert err <= 1e-4 * scale, f"{name}: max |grad diff| {err:.3g} vs max |grad| {scale:.3g}"


@pytest.mark.parametrize("scheme,cfg", CASES, ids=[f"{s}-{'attn_only' if c.attn_only else c.act_fn}" for s, c in CASES])
def test_training_path_matches_bridge(scheme, cfg):
    _, _, _, (logits, loss, ours), (b_logits, b_loss, theirs) = _both(scheme, cfg)
    assert logits.device.type == DEVICE.type and b_logits.device.type == DEVICE.type
    torch.testing.assert_close(b_logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b_loss, loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(ours, theirs)


def test_bridge_loss_return_type_is_our_loss():
    """TL's own training loop calls ``bridge(tokens, return_type="loss")`` (the benchmark's baseline);
    it must be the same objective as ``loss_fn`` for the speed comparison to be like for like."""
    scheme, cfg = CASES[0]
    model = _model(scheme, cfg)
    tokens = _tokens(cfg)
    torch.testing.assert_close(to_bridge(model).to(DEVICE)(tokens, return_type="loss"), loss_fn(model(tokens), tokens),
                               rtol=1e-5, atol=1e-6)


def test_comparison_detects_a_swapped_head():
    """Negative control: the tolerances are not vacuous. Swapping two heads' W_V in the training
    model only (the bridge keeps the original) must break both the logits and the gradients."""
    scheme, cfg = CASES[0]
    model = _model(scheme, cfg)
    bridge = to_bridge(model).to(DEVICE)
    with torch.no_grad():
        W_V = model.blocks[1].attn.W_V
        W_V[[0, 1]] = W_V[[1, 0]].clone()
    tokens = _tokens(cfg)
    logits = model(tokens)
    ours = dict(zip((n for n, _ in model.named_parameters()),
                    torch.autograd.grad(loss_fn(logits, tokens), list(model.parameters()))))
    b_logits = bridge(tokens)
    loss_fn(b_logits, tokens).backward()
    theirs = _pull_back(model, _bridge_param_grads(bridge))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(b_logits, logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError):
        _assert_grads_close(ours, theirs)


def test_pull_back_maps_layout_exactly():
    """The pull-back is the inverse layout map: feeding it the native layout of a model whose every
    entry is distinct returns that model's own parameters, name by name."""
    cfg = ModelConfig(**BASE)
    model = Transformer(cfg).to(DEVICE)
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(torch.arange(offset, offset + p.numel(), dtype=p.dtype).reshape(p.shape))
            offset += p.numel()
    native = {n: t.detach().clone() for n, t in native_state_dict(model).items()}
    back = _pull_back(model, native)
    for name, p in model.named_parameters():
        assert torch.equal(back[name], p.detach()), name
