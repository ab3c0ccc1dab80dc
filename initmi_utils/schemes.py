"""Initialisation schemes: a name -> scheme registry.

A scheme writes every parameter of a freshly built ``Transformer`` (whose parameters start as
NaN). Parameters are selected by *exact* name through ``param_role``; an unknown name raises,
so a new parameter can never silently keep its NaN. Every matrix is drawn on its *logical*
matrix ``[fan_in, fan_out]`` (``logical_matrix``): W_Q of all heads is one ``d_model -> n_heads *
d_head`` map, W_O one ``n_heads * d_head -> d_model`` map, W_E one ``d_vocab -> d_model`` map (a
one-hot input), W_U one ``d_model -> d_vocab`` map.

The generator is seeded by the init seed alone and parameters are visited in a fixed order, so
schemes share their random numbers: ``normal`` and ``scaled_residual`` of one seed differ *only*
by the residual factor (common random numbers make scheme comparisons less noisy).

New schemes register themselves with ``@register_scheme(name, description)``; nothing else in
the package changes. The registry holds recipes only: ``seeded``, which needs a trained donor,
registers itself from ``initmi_utils.seeded`` (a layer above, as it reads checkpoints), and
the modules that run every scheme (``train``, ``compare``, ``pipeline``) import it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from initmi_utils.config import ConfigError
from initmi_utils.model import Transformer

NORMAL_STD = 0.02
RELU_GAIN = math.sqrt(2.0)  # torch.nn.init.calculate_gain("relu"); also used for GELU

_ROLE_PATTERNS: list[tuple[str, re.Pattern]] = [
    (role, re.compile(pattern))
    for role, pattern in [
        ("W_E", r"embed\.W_E"),
        ("W_pos", r"pos_embed\.W_pos"),
        ("W_U", r"unembed\.W_U"),
        ("W_Q", r"blocks\.\d+\.attn\.W_Q"),
        ("W_K", r"blocks\.\d+\.attn\.W_K"),
        ("W_V", r"blocks\.\d+\.attn\.W_V"),
        ("W_O", r"blocks\.\d+\.attn\.W_O"),
        ("W_in", r"blocks\.\d+\.mlp\.W_in"),
        ("W_out", r"blocks\.\d+\.mlp\.W_out"),
        ("bias", r"blocks\.\d+\.attn\.b_[QKVO]|blocks\.\d+\.mlp\.b_(in|out)"),
        ("ln_w", r"(blocks\.\d+\.ln[12]|ln_final)\.w"),
        ("ln_b", r"(blocks\.\d+\.ln[12]|ln_final)\.b"),
    ]
]
MATRIX_ROLES = ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U")
RESIDUAL_WRITERS = ("W_O", "W_out")  # matrices whose output is added to the residual stream


def param_role(name: str) -> str:
    """The role of a parameter, matched on its full name (never a substring)."""
    for role, pattern in _ROLE_PATTERNS:
        if pattern.fullmatch(name):
            return role
    raise KeyError(f"no init role for parameter {name!r}; add it to schemes._ROLE_PATTERNS.")


def logical_matrix(role: str, w: Tensor) -> Tensor:
    """The ``[fan_in, fan_out]`` matrix a stored parameter represents (a view-like copy)."""
    if role in ("W_Q", "W_K", "W_V"):  # [head, d_model, d_head] -> [d_model, head * d_head]
        return w.permute(1, 0, 2).reshape(w.shape[1], -1)
    if role == "W_O":  # [head, d_head, d_model] -> [head * d_head, d_model]
        return w.reshape(-1, w.shape[-1])
    return w


def from_logical(role: str, m: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of ``logical_matrix``: back to the stored shape."""
    if role in ("W_Q", "W_K", "W_V"):
        n_heads, d_model, d_head = shape
        return m.reshape(d_model, n_heads, d_head).permute(1, 0, 2).contiguous()
    return m.reshape(shape)


# A matrix sampler gets (role, fan_in, fan_out, generator) and returns a [fan_in, fan_out] matrix.
MatrixSampler = Callable[[str, int, int, torch.Generator], Tensor]
SchemeFn = Callable[[Transformer, object, torch.Generator, "str | Path | None"], None]


def init_matrices(model: Transformer, sample: MatrixSampler, generator: torch.Generator) -> None:
    """Write every parameter: matrices from ``sample``, LayerNorm gains 1, all biases 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            role = param_role(name)
            if role in MATRIX_ROLES:
                fan_in, fan_out = logical_matrix(role, p).shape
                m = sample(role, fan_in, fan_out, generator).to(torch.float32)
                p.copy_(from_logical(role, m, p.shape))
            elif role == "ln_w":
                p.fill_(1.0)
            else:  # ln_b, bias
                p.zero_()


@dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    fn: SchemeFn
    source: str = ""  # the user's scheme file ("" for the package's own schemes)
    source_hash: str = ""  # sha256 (16 hex) of that file: part of the runs' training source
    inputs: Callable | None = None  # inputs(cfg, root) -> str: what the scheme reads besides the model (its donor)


SCHEMES: dict[str, Scheme] = {}
_loading: list[tuple[str, str]] = []  # (file, hash) of the scheme module being imported


def register_scheme(name: str, description: str, inputs: Callable | None = None) -> Callable[[SchemeFn], SchemeFn]:
    """Register ``fn(model, cfg, generator, root)`` under ``name``.

    ``inputs(cfg, root)``, for a scheme that reads artefacts, returns a fingerprint of the ones
    it would read for that run (the ``seeded`` scheme: its chosen donor): it is part of the run's
    training source, so a run whose inputs changed is stale (``train.run_source``).

    ``cfg`` is the run's ``ExperimentConfig`` (may be None for schemes that need only the model);
    ``root`` the project root, for schemes that read artefacts (a trained donor model). A name
    registered twice raises, except from the same user file (``load_scheme_module`` again, e.g.
    in a warm kernel after an edit): the new version replaces the old.
    """
    source, source_hash = _loading[-1] if _loading else ("", "")

    def decorate(fn: SchemeFn) -> SchemeFn:
        old = SCHEMES.get(name)
        if old is not None and not (source and old.source == source):
            where = old.source or "initmi_utils (built in)"
            raise ConfigError(f"init scheme {name!r} from {source or 'initmi_utils'} clashes with {name!r} from "
                              f"{where}; choose another name.")
        SCHEMES[name] = Scheme(name, description, fn, source, source_hash, inputs)
        return fn

    return decorate


SCHEME_MODULES_ENV = "INITMI_SCHEME_MODULES"


def load_scheme_module(path: str | Path) -> list[str]:
    """Import a user's Python file that registers schemes with ``@register_scheme``; return the
    names it registered. Loading the same file again re-runs it, its schemes replacing their old
    versions (a warm kernel never runs an edited scheme's old code). A missing file or one that
    raises is one ``ConfigError`` naming the file."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"scheme module {path} does not exist; pass the path of a .py file that calls "
                          f"@register_scheme(name, description).")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(f"initmi_user_schemes.{path.stem}_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    before = {n: s for n, s in SCHEMES.items()}
    _loading.append((str(path), digest))
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as e:  # the user's code: any error, reported with the file it came from
        raise ConfigError(f"scheme module {path} raised {type(e).__name__} on import: {e}") from e
    finally:
        _loading.pop()
    return [n for n, s in SCHEMES.items() if s.source == str(path) and before.get(n) is not s]


def load_scheme_modules(paths: str = "") -> list[str]:
    """``load_scheme_module`` for each of the comma-separated ``paths`` (default: the
    ``$INITMI_SCHEME_MODULES`` environment variable, for papermill by hand); the names registered."""
    paths = paths or os.environ.get(SCHEME_MODULES_ENV, "")
    return [n for p in paths.split(",") if p.strip() for n in load_scheme_module(p.strip())]


def scheme_source(name: str) -> str:
    """The source hash of a user scheme's file ("" for the package's own schemes, whose source is
    the package's)."""
    return SCHEMES[name].source_hash if name in SCHEMES else ""


def check_scheme(name: str) -> None:
    if name not in SCHEMES:
        raise ConfigError(f"unknown init scheme {name!r}; registered schemes: {', '.join(SCHEMES)}.")


def init_weights(model: Transformer, scheme: str, seed: int, cfg=None, root: str | Path | None = None) -> Transformer:
    """Initialise ``model`` in place with ``scheme``; weights depend only on (scheme, seed).

    ``cfg`` (the ``ExperimentConfig``) and ``root`` are passed to schemes that need more than the
    model, such as one seeded from a trained donor.
    """
    check_scheme(scheme)
    generator = torch.Generator().manual_seed(int(seed))
    SCHEMES[scheme].fn(model, cfg, generator, root)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"init scheme {scheme!r} left parameters uninitialised: {bad}.")
    return model


def build_model(cfg, root: str | Path | None = None) -> Transformer:
    """The run's model at step 0: ``cfg.model`` initialised with (cfg.run.scheme, cfg.run.seed)."""
    return init_weights(Transformer(cfg.model), cfg.run.scheme, cfg.run.seed, cfg, root)


# ---------------------------------------------------------------------------------------------
# The five base schemes.


def _normal(role: str, fan_in: int, fan_out: int, g: torch.Generator) -> Tensor:
    return torch.randn(fan_in, fan_out, generator=g) * NORMAL_STD


@register_scheme("normal", "N(0, 0.02^2) on every matrix")
def normal(model: Transformer, cfg, g: torch.Generator, root: Path) -> None:
    init_matrices(model, _normal, g)


@register_scheme("xavier", "Glorot uniform U(-a, a), a = sqrt(6 / (fan_in + fan_out))")
def xavier(model: Transformer, cfg, g: torch.Generator, root: Path) -> None:
    def sample(role, fan_in, fan_out, g):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound

    init_matrices(model, sample, g)


@register_scheme("kaiming", "He normal, fan-in, ReLU gain sqrt(2): N(0, 2 / fan_in)")
def kaiming(model: Transformer, cfg, g: torch.Generator, root: Path) -> None:
    def sample(role, fan_in, fan_out, g):
        return torch.randn(fan_in, fan_out, generator=g) * (RELU_GAIN / math.sqrt(fan_in))

    init_matrices(model, sample, g)


@register_scheme("orthogonal", "semi-orthogonal logical matrices, gain 1 (W W^T = I on the short side)")
def orthogonal(model: Transformer, cfg, g: torch.Generator, root: Path) -> None:
    def sample(role, fan_in, fan_out, g):
        return torch.nn.init.orthogonal_(torch.empty(fan_in, fan_out), gain=1.0, generator=g)

    init_matrices(model, sample, g)


@register_scheme("scaled_residual", "N(0, 0.02^2), residual writers (W_O, W_out) x 1/sqrt(2L)")
def scaled_residual(model: Transformer, cfg, g: torch.Generator, root: Path) -> None:
    factor = 1.0 / math.sqrt(2 * model.cfg.n_layers)

    def sample(role, fan_in, fan_out, g):
        m = _normal(role, fan_in, fan_out, g)
        return m * factor if role in RESIDUAL_WRITERS else m

    init_matrices(model, sample, g)


# ---------------------------------------------------------------------------------------------
# Mimetic initialisation (Trockman & Kolter 2023, "Mimetic Initialization of Self-Attention Layers").


@dataclass(frozen=True)
class MimeticConstants:
    """The targets of mimetic init: ``W_Q W_K^T ≈ alpha_qk Z1 + beta_qk I`` per head and
    ``W_V W_O ≈ alpha_vo Z2 - beta_vo I``, with ``Z`` i.i.d. ``N(0, 1/d_model)``.

    The defaults are the paper's (and its reference code's): alpha_1 = beta_1 = 0.7 for
    query-key, alpha_2 = beta_2 = 0.4 for value-output. They were chosen on vision transformers,
    where pre-trained heads show a positive QK diagonal and a negative VO diagonal.

    ``vo_per_layer``: the paper factorises the *layer's* value-output map (all heads' ``W_V``
    concatenated ``[d_model, n_heads * d_head]`` times the stacked ``W_O``), which is square and
    so exactly ``alpha Z2 - beta I``; its singular directions are dealt to the heads in a random
    order so that no head is special. ``False`` instead draws an independent ``Z2`` per head and
    keeps its top ``d_head`` directions, like query-key (the sum over heads is then only roughly
    ``-beta I``).
    """

    alpha_qk: float = 0.7
    beta_qk: float = 0.7
    alpha_vo: float = 0.4
    beta_vo: float = 0.4
    vo_per_layer: bool = True


MIMETIC = MimeticConstants()


def mimetic_factors(d_model: int, rank: int, alpha: float, beta: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``L, R`` of shape ``[d_model, rank]`` with ``L R^T`` the best rank-``rank`` approximation of
    ``alpha Z + beta I`` (``Z`` i.i.d. ``N(0, 1/d_model)``): the SVD ``U S V^T`` split as
    ``L = U_k sqrt(S_k)``, ``R = V_k sqrt(S_k)``, so both factors get the same scale."""
    m = alpha * torch.randn(d_model, d_model, generator=g) / math.sqrt(d_model) + beta * torch.eye(d_model)
    u, s, vh = torch.linalg.svd(m)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


def mimetic_attention(model: Transformer, g: torch.Generator, c: MimeticConstants = MIMETIC) -> None:
    """Overwrite every layer's ``W_Q, W_K, W_V, W_O`` with mimetic factors (biases untouched)."""
    n_heads, d_model, d_head = model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head
    with torch.no_grad():
        for block in model.blocks:
            a = block.attn
            for h in range(n_heads):  # an independent Z1 per head
                a.W_Q[h], a.W_K[h] = mimetic_factors(d_model, d_head, c.alpha_qk, c.beta_qk, g)
            if c.vo_per_layer:
                v, o = mimetic_factors(d_model, d_model, c.alpha_vo, -c.beta_vo, g)
                order = torch.randperm(d_model, generator=g)  # n_heads * d_head == d_model
                a.W_V.copy_(from_logical("W_V", v[:, order], a.W_V.shape))
                a.W_O.copy_(from_logical("W_O", o[:, order].T, a.W_O.shape))
            else:
                for h in range(n_heads):
                    v, o = mimetic_factors(d_model, d_head, c.alpha_vo, -c.beta_vo, g)
                    a.W_V[h], a.W_O[h] = v, o.T


@register_scheme(
    "mimetic",
    "Trockman & Kolter 2023: per head W_Q W_K^T ~ 0.7 Z + 0.7 I, per layer W_V W_O ~ 0.4 Z - 0.4 I "
    "(SVD factors); other matrices N(0, 0.02^2)",
)
def mimetic(model: Transformer, cfg, g: torch.Generator, root: Path) -> None:
    # Draw everything as `normal` first, so that the non-attention matrices equal `normal`'s of the
    # same seed (common random numbers), then replace the attention matrices.
    init_matrices(model, _normal, g)
    mimetic_attention(model, g, MIMETIC)
