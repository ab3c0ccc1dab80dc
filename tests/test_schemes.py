"""Every registered scheme passes the generic checks; each base scheme is checked against its theory."""

import math

import pytest
import torch

import initmi_utils.seeded  # noqa: F401  (registers `seeded`: the generic checks cover the whole registry)
from initmi_utils.config import experiment
from initmi_utils.donor import train_donor
from initmi_utils.model import Transformer
from initmi_utils.schemes import (
    MATRIX_ROLES,
    SCHEMES,
    init_weights,
    logical_matrix,
    param_role,
    register_scheme,
)

BASE = ["normal", "xavier", "kaiming", "orthogonal", "scaled_residual"]  # the theory tests below
REGISTERED = list(SCHEMES)  # the generic tests: a newly registered scheme cannot escape them
# Schemes that copy trained weights (LayerNorm gains, biases) instead of drawing them:
COPIES_WEIGHTS = {"seeded"}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """A project root holding what schemes may read (the smoke donors of seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("scheme_artefacts")
    with pytest.warns(UserWarning):  # 20 steps teach a donor no induction (DonorWarning)
        for seed in (0, 1):
            train_donor(smoke(seed), root)
    return root


def smoke(seed: int, scheme: str = "seeded"):
    return experiment("smoke", scheme, seed).replace(train={"steps": 20, "threads": 1})


def built(scheme, seed=0, cfg=None):
    cfg = cfg or experiment("quick", scheme, seed)
    return init_weights(Transformer(cfg.model), scheme, seed, cfg)


def matrices(model):
    for name, p in model.named_parameters():
        role = param_role(name)
        if role in MATRIX_ROLES:
            yield name, role, logical_matrix(role, p.detach())


@pytest.mark.filterwarnings("ignore::initmi_utils.seeded.DonorWarning")
@pytest.mark.parametrize("scheme", REGISTERED)
def test_scheme_is_finite_reproducible_and_seed_dependent(scheme, artefacts):
    def built_(seed):
        cfg = smoke(seed, scheme)
        return init_weights(Transformer(cfg.model), scheme, seed, cfg, artefacts)

    a, b, c = built_(0), built_(0), built_(1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.isfinite(pa).all(), name
        assert torch.equal(pa, pb), name
        if param_role(name) in MATRIX_ROLES:
            assert not torch.equal(pa, pc), name
    tokens = torch.randint(0, a.cfg.d_vocab, (2, 16))
    assert torch.isfinite(a(tokens)).all()


@pytest.mark.filterwarnings("ignore::initmi_utils.seeded.DonorWarning")
def test_schemes_differ_pairwise(artefacts):
    models = {s: init_weights(Transformer(smoke(0, s).model), s, 0, smoke(0, s), artefacts) for s in REGISTERED}
    for i, s in enumerate(REGISTERED):
        for t in REGISTERED[i + 1 :]:
            w = lambda m: m.blocks[1].attn.W_O  # noqa: E731 - W_O differs for every pair, scaled_residual included
            assert not torch.allclose(w(models[s]), w(models[t])), (s, t)


@pytest.mark.parametrize("scheme", [s for s in REGISTERED if s not in COPIES_WEIGHTS])
def test_layernorms_and_biases(scheme):
    m = built(scheme)
    for name, p in m.named_parameters():
        role = param_role(name)
        if role == "ln_w":
            assert torch.all(p == 1), name
        elif role in ("ln_b", "bias"):
            assert torch.all(p == 0), name


def test_normal_std():
    for name, _, w in matrices(built("normal")):
        assert abs(w.mean().item()) < 0.003, name
        assert w.std().item() == pytest.approx(0.02, rel=0.06), name


def test_xavier_bound_and_std():
    for name, _, w in matrices(built("xavier")):
        fan_in, fan_out = w.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert w.abs().max().item() <= bound, name
        assert w.abs().max().item() > 0.95 * bound, name
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.06), name


def test_kaiming_fan_in_std():
    for name, _, w in matrices(built("kaiming")):
        assert w.std().item() == pytest.approx(math.sqrt(2 / w.shape[0]), rel=0.06), name


def test_orthogonal_is_semi_orthogonal():
    for name, _, w in matrices(built("orthogonal")):
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-4), name


def test_scaled_residual_scales_exactly_the_residual_writers():
    cfg = experiment("quick")
    factor = 1 / math.sqrt(2 * cfg.model.n_layers)
    normal, scaled = built("normal"), built("scaled_residual")
    for (name, role, w_n), (_, _, w_s) in zip(matrices(normal), matrices(scaled)):
        # Same seed -> same random numbers: the only difference is the residual factor.
        expected = w_n * factor if role in ("W_O", "W_out") else w_n
        assert torch.allclose(w_s, expected, atol=1e-7), name
    assert scaled.blocks[0].attn.W_O.std().item() == pytest.approx(0.02 * factor, rel=0.06)


def test_roles_are_matched_by_exact_name():
    assert param_role("unembed.W_U") == "W_U"  # "embed" is a substring of "unembed"
    assert param_role("embed.W_E") == "W_E"
    assert param_role("blocks.1.attn.b_O") == "bias"
    with pytest.raises(KeyError, match="no init role"):
        param_role("blocks.0.attn.W_Q_extra")


def test_unknown_scheme_lists_the_supported_ones():
    with pytest.raises(ValueError, match="unknown init scheme 'he'.*kaiming.*seeded"):
        built("normal", cfg=None) and init_weights(Transformer(experiment("smoke").model), "he", 0)


def test_registry_refuses_duplicates_and_catches_forgotten_parameters():
    with pytest.raises(ValueError, match="init scheme .normal. from initmi_utils clashes with .normal. from initmi_utils"):
        register_scheme("normal", "again")(lambda *a: None)
    register_scheme("_forgetful", "writes nothing")(lambda model, cfg, g, root: None)
    try:
        with pytest.raises(RuntimeError, match="left parameters uninitialised"):
            init_weights(Transformer(experiment("smoke").model), "_forgetful", 0)
    finally:
        del SCHEMES["_forgetful"]
