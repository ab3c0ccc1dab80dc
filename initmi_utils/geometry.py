"""Geometry of weights and activations: norms, entropy, spectra, similarity, drift, weight shape.

Two kinds of input, both plain:

- *weights* come from the training ``Transformer`` (``model.blocks[l].attn.W_Q`` …, the field's
  names and shapes). They are read **raw**, LayerNorm gains not folded in: these analyses ask what
  training did to the matrices an init scheme drew, and folding would mix the (scheme-independent,
  initially 1) LN gains into every spectrum. The circuit scores in ``circuits`` do fold them,
  because there the question is the function a path computes.
- *activations* come from one ``bridge.run_with_cache`` per checkpoint, addressed by hook name
  (``blocks.{l}.hook_resid_post``, ``blocks.{l}.attn.hook_pattern``, ``blocks.{l}.attn.hook_z``);
  ``hook_names(n_layers)`` lists what to cache.

Every table function returns a tidy long ``DataFrame`` (``layer``, ``head``, ``metric``, ``value``
plus descriptive columns such as ``matrix``); ``layer``/``head`` are -1 where not applicable. The
residual stream is indexed by the layer it comes *after*: ``-1`` is the embedding
(``blocks.0.hook_resid_pre``), ``l`` is ``blocks.{l}.hook_resid_post``.

Definitions we compute ourselves (TransformerLens has none of them):

- effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` the
  normalised singular values and ``H`` the Shannon entropy in nats. It is 1 for a rank-1 matrix,
  ``k`` for ``k`` equal non-zero singular values, and varies continuously in between;
- linear CKA (Kornblith et al. 2019): ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` for
  representations ``X [n, d1]``, ``Y [n, d2]`` of the same ``n`` inputs, centred over ``n``;
  invariant to rotation and isotropic scaling, 1 for identical representations;
- drift: ``||W_t - W_0||_F / ||W_0||_F`` (relative Frobenius distance from the step-0 weights);
- excess kurtosis: ``E[(x - mu)^4] / sigma^4 - 3`` over a matrix's entries (0 for a Gaussian,
  -1.2 for a uniform, positive for heavy tails): do trained weights stay Gaussian? (``gaussianity``
  asks it fully: skewness, a size-matched distance to the Gaussian, the spectrum of ``W - W_0``.)
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from scipy import stats as st
from torch import Tensor
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.utilities import get_act_name

from initmi_utils.model import Transformer, torch_threads

ATTN_MATRICES = ("W_Q", "W_K", "W_V", "W_O")
HEAD_MATRICES = ATTN_MATRICES + ("W_QK", "W_OV")  # per-head matrices with a spectrum
MLP_MATRICES = ("W_in", "W_out")
EMBED_MATRICES = ("W_E", "W_pos", "W_U")


def hook_names(n_layers: int) -> list[str]:
    """The cache entries the activation analyses of this module read."""
    names = []
    for layer in range(n_layers):
        names += [get_act_name(kind, layer) for kind in ("resid_pre", "resid_post", "pattern", "z")]
    return names


def single_threaded(fn):
    """Run ``fn`` with one torch thread. These analyses make many small LAPACK/BLAS calls; on a
    busy 2-core machine a multi-threaded SVD of a 128 x 32 matrix took ~1 s (thread contention),
    single-threaded 0.3 ms."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch_threads(1):
            return fn(*args, **kwargs)

    return wrapped


# ---------------------------------------------------------------------------------------------
# Spectra.


def effective_rank(s: Float[Tensor, "... k"]) -> Float[Tensor, "..."]:
    """Roy & Vetterli effective rank ``exp(entropy(s / s.sum()))`` of non-negative singular values;
    ``nan`` for an all-zero matrix (no direction at all, not "rank 1")."""
    s = s.double().clamp(min=0)
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp(min=torch.finfo(torch.float64).tiny)
    h = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    return torch.where(total[..., 0] > 0, h.exp(), torch.full_like(h, float("nan"))).float()


def head_factors(model: Transformer, layer: int) -> dict[str, FactoredMatrix | Tensor]:
    """Per-head matrices of one layer, stacked over heads.

    ``W_Q, W_K, W_V [head, d_model, d_head]``, ``W_O [head, d_head, d_model]``, and the two
    low-rank products as ``FactoredMatrix`` (TransformerLens), whose SVD is taken on the
    ``d_head``-sized factors instead of the ``d_model x d_model`` product:
    ``W_QK = W_Q W_K^T``, ``W_OV = W_V W_O``.
    """
    a = model.blocks[layer].attn
    W_Q, W_K, W_V, W_O = (w.detach() for w in (a.W_Q, a.W_K, a.W_V, a.W_O))
    return {"W_Q": W_Q, "W_K": W_K, "W_V": W_V, "W_O": W_O,
            "W_QK": FactoredMatrix(W_Q, W_K.transpose(-2, -1)), "W_OV": FactoredMatrix(W_V, W_O)}


def _singular_values(w: FactoredMatrix | Tensor) -> Tensor:
    if isinstance(w, FactoredMatrix):
        return w.S.detach()
    return torch.linalg.svdvals(w.double()).float()


@single_threaded
def spectra_table(model: Transformer, with_values: bool = True) -> pd.DataFrame:
    """Singular values and effective rank of every weight matrix.

    Per head: ``W_Q, W_K, W_V, W_O, W_QK, W_OV``; per layer (``head = -1``): ``W_in, W_out``; the
    embeddings ``W_E, W_pos, W_U`` with ``layer = head = -1``. Metrics ``effective_rank``,
    ``spectral_norm`` (largest singular value) and, with ``with_values``, ``singular_value`` with a
    ``sv_index`` column (0 = largest).
    """
    items: list[tuple[str, int, int, Tensor]] = []
    for layer, block in enumerate(model.blocks):
        for name, w in head_factors(model, layer).items():
            s = _singular_values(w)  # [head, k]
            items += [(name, layer, h, s[h]) for h in range(s.shape[0])]
        if hasattr(block, "mlp"):
            items += [(name, layer, -1, _singular_values(getattr(block.mlp, name).detach())) for name in MLP_MATRICES]
    for name, w in (("W_E", model.embed.W_E), ("W_pos", model.pos_embed.W_pos), ("W_U", model.unembed.W_U)):
        items.append((name, -1, -1, _singular_values(w.detach())))
    rows = []
    for name, layer, head, s in items:
        base = dict(layer=layer, head=head, matrix=name)
        rows.append(dict(base, metric="effective_rank", value=effective_rank(s).item()))
        rows.append(dict(base, metric="spectral_norm", value=s.max().item()))
        if with_values:
            rows += [dict(base, metric="singular_value", value=v, sv_index=i) for i, v in enumerate(s.tolist())]
    df = pd.DataFrame(rows)
    if "sv_index" in df:
        df["sv_index"] = df["sv_index"].fillna(-1).astype(int)
    return df


# ---------------------------------------------------------------------------------------------
# Weight drift and distribution shape.


def named_matrices(model: Transformer) -> list[tuple[str, int, Tensor]]:
    """``(matrix, layer, weights)`` for every weight matrix (all heads of a layer together);
    embeddings have layer -1."""
    out = [("W_E", -1, model.embed.W_E), ("W_pos", -1, model.pos_embed.W_pos), ("W_U", -1, model.unembed.W_U)]
    for layer, block in enumerate(model.blocks):
        out += [(n, layer, getattr(block.attn, n)) for n in ATTN_MATRICES]
        if hasattr(block, "mlp"):
            out += [(n, layer, getattr(block.mlp, n)) for n in MLP_MATRICES]
    return [(n, layer, w.detach()) for n, layer, w in out]


def excess_kurtosis(x: Tensor) -> float:
    """``E[(x - mu)^4] / sigma^4 - 3`` over all entries (population moments: ``scipy.stats.kurtosis``
    with ``fisher=True, bias=True``); nan for a constant matrix, which has no shape. The one
    kurtosis of the package: ``weight_stats_table`` and ``gaussianity`` both call it."""
    v = x.detach().double().flatten().numpy()
    if v.size == 0 or np.ptp(v) == 0:
        return float("nan")
    return float(st.kurtosis(v, fisher=True, bias=True))


def weight_stats_table(model: Transformer) -> pd.DataFrame:
    """Per matrix: ``weight_std`` and ``weight_kurtosis`` (excess) of its entries."""
    rows = []
    for name, layer, w in named_matrices(model):
        base = dict(layer=layer, head=-1, matrix=name)
        rows.append(dict(base, metric="weight_std", value=w.double().std(unbiased=False).item()))
        rows.append(dict(base, metric="weight_kurtosis", value=excess_kurtosis(w)))
    return pd.DataFrame(rows)


def drift_table(model: Transformer, model0: Transformer) -> pd.DataFrame:
    """``drift = ||W_t - W_0||_F / ||W_0||_F`` per matrix, ``model0`` being the same run at step 0."""
    rows = []
    for (name, layer, w), (name0, layer0, w0) in zip(named_matrices(model), named_matrices(model0), strict=True):
        if (name, layer) != (name0, layer0) or w.shape != w0.shape:
            raise ValueError(f"drift needs two models of the same architecture; {name} L{layer} does not match.")
        norm0 = w0.double().norm()
        value = ((w.double() - w0.double()).norm() / norm0).item() if norm0 > 0 else float("nan")
        rows.append(dict(layer=layer, head=-1, matrix=name, metric="drift", value=value))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Activations.


def _non_bos(shape: torch.Size) -> Bool[Tensor, "batch pos"]:
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[:, 0] = False
    return mask


def resid_norm_table(cache, n_layers: int, mask: Bool[Tensor, "batch pos"] | None = None) -> pd.DataFrame:
    """Mean L2 norm of the residual stream after the embedding (layer -1) and after each layer.

    ``mask`` selects the positions averaged over; the default drops position 0: the BOS position
    always holds the same token at the same place, its residual typically grows into an attention
    sink, and mixing it in would hide what happens at ordinary tokens.
    """
    stack = cache.accumulated_resid().detach()  # [n_layers + 1, batch, pos, d_model]: embed, then each layer
    m = _non_bos(stack.shape[1:]) if mask is None else mask
    norms = stack.norm(dim=-1)[:, m].mean(-1)
    return pd.DataFrame([dict(layer=layer, head=-1, metric="resid_norm", value=norms[layer + 1].item())
                         for layer in range(-1, n_layers)])


def attention_entropy(pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, "batch head q_from_1"]:
    """Entropy (nats) of each attention distribution, for query positions ``q >= 1`` (query 0 can
    only attend to itself: entropy 0 whatever the head does)."""
    p = pattern.detach().double()
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)[:, :, 1:]


def attention_entropy_table(cache, n_layers: int) -> pd.DataFrame:
    """``attn_entropy`` (nats, mean over sequences and queries ``q >= 1``) and ``attn_entropy_norm``
    (entropy / log(q + 1), 1 = uniform over the causal window) per layer and head."""
    rows = []
    for layer in range(n_layers):
        h = attention_entropy(cache[get_act_name("pattern", layer)])
        max_h = torch.arange(2, h.shape[-1] + 2, dtype=torch.float64).log()  # log(q + 1), q = 1..
        for head in range(h.shape[1]):
            rows.append(dict(layer=layer, head=head, metric="attn_entropy", value=h[:, head].mean().item()))
            rows.append(dict(layer=layer, head=head, metric="attn_entropy_norm", value=(h[:, head] / max_h).mean().item()))
    return pd.DataFrame(rows)


def head_outputs(cache, model: Transformer, mask: Bool[Tensor, "batch pos"] | None = None) -> dict[tuple[int, int], Float[Tensor, "n d_model"]]:
    """Each head's write into the residual stream, ``hook_z @ W_O`` (no ``b_O``: it is shared by the
    layer's heads), at the selected positions (default: every position except BOS)."""
    out = {}
    for layer, block in enumerate(model.blocks):
        z = cache[get_act_name("z", layer)].detach()  # [batch pos head d_head]
        m = _non_bos(z.shape) if mask is None else mask
        W_O = block.attn.W_O.detach()
        for head in range(z.shape[2]):
            out[(layer, head)] = z[:, :, head][m] @ W_O[head]
    return out


def linear_cka(x: Float[Tensor, "n d1"], y: Float[Tensor, "n d2"], debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) between two representations of the same ``n`` inputs:
    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` on centred features.

    1 when one is an orthogonal transform and isotropic rescaling of the other (two bases that
    differ by a rotation count as the same), ~0 for unrelated representations. Computed in feature
    space (d x d Gram matrices, cheap for n >> d) in float64. The one implementation used by
    geometry (head similarity), persistence (donor vs student) and compare (runs vs runs);
    TransformerLens has no CKA.

    ``debiased``: the plug-in estimate is biased upwards when ``n`` is not much larger than the
    dimensions (two independent Gaussian representations of 64 inputs in 256 dimensions score
    about 0.8). The debiased form replaces each HSIC by its unbiased estimator (Song et al. 2012;
    Kornblith et al.'s feature-space form), so that unrelated representations score about 0 at any
    ``n >= 4``; it can be slightly negative. Use it where few inputs are compared (the stored
    probes of ``probes``)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares representations of the same inputs; got {x.shape[0]} and {y.shape[0]} rows.")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    xy = torch.linalg.matrix_norm(y.T @ x) ** 2
    xx = torch.linalg.matrix_norm(x.T @ x) ** 2
    yy = torch.linalg.matrix_norm(y.T @ y) ** 2
    if debiased:
        n = x.shape[0]
        if n < 4:
            raise ValueError(f"debiased CKA needs at least 4 inputs, got {n}.")
        rx, ry = (x * x).sum(1), (y * y).sum(1)  # squared row norms: the diagonal of the Gram matrices

        def unbiased(dot, a, b):  # n(n-3) x the unbiased HSIC of the two Gram matrices; the factor cancels
            return dot - n / (n - 2) * (a @ b) + a.sum() * b.sum() / ((n - 1) * (n - 2))

        xy, xx, yy = unbiased(xy, rx, ry), unbiased(xx, rx, rx), unbiased(yy, ry, ry)
    denom = torch.sqrt(xx * yy) if debiased else torch.sqrt(xx) * torch.sqrt(yy)
    if not denom > 0:
        return float("nan")
    return (xy / denom).item()


def mean_cosine(x: Float[Tensor, "n d"], y: Float[Tensor, "n d"]) -> float:
    """Mean over inputs of the cosine between ``x[i]`` and ``y[i]`` (same input, same space):
    do two heads write the same direction at the same token?"""
    return torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1, eps=1e-12).mean().item()


@single_threaded
def head_similarity_table(outputs: dict[tuple[int, int], Tensor]) -> pd.DataFrame:
    """``head_cosine`` and ``head_cka`` for every unordered pair of heads (also across layers):
    ``layer``/``head`` is the first head, ``other_layer``/``other_head`` the second."""
    rows = []
    for (a, xa), (b, xb) in itertools.combinations(sorted(outputs.items()), 2):
        base = dict(layer=a[0], head=a[1], other_layer=b[0], other_head=b[1])
        rows.append(dict(base, metric="head_cosine", value=mean_cosine(xa, xb)))
        rows.append(dict(base, metric="head_cka", value=linear_cka(xa, xb)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Everything of one checkpoint.


@single_threaded
def geometry_table(model: Transformer, model0: Transformer, cache, step: int, with_spectra: bool = True) -> pd.DataFrame:
    """All geometry metrics of one checkpoint: ``model`` at ``step``, ``model0`` the run's step 0,
    ``cache`` one ``run_with_cache`` of ``model``'s bridge holding ``hook_names(n_layers)``."""
    n_layers = model.cfg.n_layers
    parts = [
        resid_norm_table(cache, n_layers),
        attention_entropy_table(cache, n_layers),
        head_similarity_table(head_outputs(cache, model)),
        spectra_table(model, with_values=with_spectra),
        drift_table(model, model0),
        weight_stats_table(model),
    ]
    df = pd.concat(parts, ignore_index=True)
    df.insert(0, "step", int(step))
    for col in ("other_layer", "other_head", "sv_index"):
        if col in df:
            df[col] = df[col].fillna(-1).astype(int)
    if "matrix" in df:
        df["matrix"] = df["matrix"].fillna("")
    return df
