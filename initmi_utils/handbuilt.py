"""Transformers whose weights are set by hand, so that their mechanism is known.

Every analysis of this package is tested on these models: a metric that points at the wrong
head, the wrong layer or the wrong position fails on them. ``induction_model()`` builds a 2-layer,
4-head, attention-only ``Transformer`` (d_model 128, d_head 32) with these heads::

    layer 0  head 0  dummy: all weights zero (uniform causal attention, writes nothing)
             head 1  previous-token head: attends to position i-1; OV copies the token there
                     into the PREV subspace
             head 2  duplicate-token head: attends to the earlier occurrence of the current
                     token (itself penalised); writes nothing
             head 3  BOS head: attends only to BOS; writes nothing
    layer 1  head 0  dummy: uniform attention (zero QK), OV copies tokens into a JUNK subspace
                     that the unembedding does not read
             head 1  dummy: all weights zero
             head 2  induction head: queries read the current token (TOK), keys read the
                     *previous* token (PREV, written by L0H1 — K-composition); OV copies the
                     attended token into OUT, which the unembedding reads (identity OV circuit)
             head 3  BOS head

Exact facts other tests can rely on (noise = 0): the full OV circuit ``W_E W_V W_O W_U`` of
L1H2 is ``unembed_scale * I`` and that of every other head is 0; the only non-zero K-composition
is L0H1 -> L1H2 (L0H1 writes PREV, which only L1H2's W_K reads); no Q- or V-composition; the
positional QK circuit ``W_pos W_Q W_K^T W_pos^T`` of L0H1 peaks at key = query - 1. The
duplicate head needs the repeat to be 4 to n_ctx - 4 positions back. Zero-weight heads make
ratio metrics 0/0; ``noise > 0`` removes exact zeros.

On BOS + A + A (A distinct tokens) L1H2 at the second A[k] attends to the first A[k+1] (the only
key whose previous token is A[k]) and the model predicts A[k+1]; in the first copy no key
matches, attention is diffuse and the prediction is wrong. ``HandBuiltRoles`` names which
(layer, head) is which.

How the mechanism survives LayerNorm (pre-LN): every feature lives in its own set of orthonormal
directions inside the subspace orthogonal to the all-ones vector (a Helmert basis), so LN's mean
subtraction does nothing; every residual stream the heads read has the same norm at every
position (token 1 + position 1 at layer 0, + PREV 1 at layer 1), so LN is a fixed rescaling,
and the LN gains undo it exactly (``ln.w = |x| / sqrt(d_model)``): LN is the identity on the
designed residual. Scores are scaled so that the wanted key beats every other by ``sharpness``
logits (default 30), so the attention is ~1 where it should be.

Positions are sinusoids: ``W_pos[p]`` holds ``(cos w_f p, sin w_f p) / sqrt(F)`` for frequencies
``w_f = 2 pi f / n_ctx``, f = 1..F. The previous-token query rotates its position by one step, so
``score(i, j) ∝ sum_f cos(w_f (i - 1 - j))``, a Dirichlet kernel peaked at ``j = i - 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from initmi_utils.config import DataConfig, ExperimentConfig, ModelConfig, RunConfig, TrainConfig
from initmi_utils.data import Dataset
from initmi_utils.model import Transformer

Head = tuple[int, int]  # (layer, head)


@dataclass(frozen=True)
class HandBuiltRoles:
    """Which (layer, head) does what in a hand-built model."""

    prev_token: Head  # attends to the previous position, copies its token into PREV
    duplicate: Head  # attends to the earlier occurrence of the current token
    induction: Head  # K-composes with prev_token; predicts the token after the earlier occurrence
    copying: Head  # the head whose full OV circuit W_E W_V W_O W_U is the identity
    bos: tuple[Head, ...]  # attend only to BOS
    dummy: tuple[Head, ...]  # no mechanism: zero weights or uniform attention into an unread subspace

    @property
    def all_roles(self) -> dict[str, tuple[Head, ...]]:
        return {
            "prev_token": (self.prev_token,),
            "duplicate": (self.duplicate,),
            "induction": (self.induction,),
            "copying": (self.copying,),
            "bos": self.bos,
            "dummy": self.dummy,
        }


ROLES = HandBuiltRoles(
    prev_token=(0, 1),
    duplicate=(0, 2),
    induction=(1, 2),
    copying=(1, 2),
    bos=((0, 3), (1, 3)),
    dummy=((0, 0), (1, 0), (1, 1)),
)


def helmert_basis(d_model: int) -> Tensor:
    """``[d_model - 1, d_model]`` orthonormal rows orthogonal to the all-ones vector.

    Row k-1 is ``(1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1))`` (k ones). Vectors in their span
    have zero mean, so LayerNorm's centring leaves them unchanged.
    """
    rows = torch.zeros(d_model - 1, d_model, dtype=torch.float64)
    for k in range(1, d_model):
        rows[k - 1, :k] = 1.0
        rows[k - 1, k] = -float(k)
        rows[k - 1] /= math.sqrt(k * (k + 1))
    return rows


class _Subspaces:
    """Hands out disjoint blocks of orthonormal residual directions by name."""

    def __init__(self, d_model: int):
        self.basis = helmert_basis(d_model)
        self.next = 0
        self.blocks: dict[str, Tensor] = {}

    def add(self, name: str, n: int) -> Tensor:
        if self.next + n > self.basis.shape[0]:
            raise ValueError(
                f"subspace {name!r} of {n} directions does not fit: {self.next} of "
                f"{self.basis.shape[0]} already used; raise d_model or lower d_vocab/n_freqs."
            )
        self.blocks[name] = self.basis[self.next : self.next + n]
        self.next += n
        return self.blocks[name]


def handbuilt_model_config(d_vocab: int = 20, n_ctx: int = 48, attn_only: bool = True) -> ModelConfig:
    return ModelConfig(n_layers=2, n_heads=4, d_model=128, d_mlp=256, d_vocab=d_vocab, n_ctx=n_ctx, attn_only=attn_only)


def induction_model(
    d_vocab: int = 20,
    n_ctx: int = 48,
    attn_only: bool = True,
    sharpness: float = 30.0,
    unembed_scale: float = 20.0,
    n_freqs: int | None = None,
    noise: float = 0.0,
    seed: int = 0,
) -> tuple[Transformer, HandBuiltRoles]:
    """The hand-built induction model described in the module docstring, and its roles.

    - ``n_freqs``: positional frequencies (default: as many as fit, 16 for d_vocab <= 23);
    - ``sharpness``: logit margin of the wanted key over the runner-up in every built head;
    - ``unembed_scale``: logit of the copied token in OUT (others get 0), so the loss at a solved
      induction position is ~``log(1 + (d_vocab - 1) e^-unembed_scale)``;
    - ``attn_only=False`` adds MLPs with all-zero weights (they output exactly 0), for code paths
      that need MLP parameters;
    - ``noise > 0`` adds N(0, noise^2) to every weight matrix (not LayerNorm; its own
      ``torch.Generator`` seeded by ``seed``): no weight is exactly zero any more (so ratios such
      as composition scores are defined for the dummy heads too) and a metric that only works on
      exact zeros fails. The mechanism survives ``noise`` up to ~0.05 (tested at 0.02).
    """
    cfg = handbuilt_model_config(d_vocab, n_ctx, attn_only)
    d_head, V = cfg.d_head, d_vocab
    if n_freqs is None:  # as many as fit next to TOK, PREV, OUT and JUNK (4 * d_vocab directions)
        n_freqs = min(d_head // 2, (cfg.d_model - 1 - 4 * V) // 2)
    if 2 * n_freqs > d_head:
        raise ValueError(f"n_freqs={n_freqs} needs 2*n_freqs <= d_head={d_head}.")
    F_dup = min(6, n_freqs, (d_head - V) // 2)  # frequencies the duplicate head penalises itself with
    if F_dup < 3:
        raise ValueError(f"d_vocab={V} too large for d_head={d_head}: the duplicate head needs d_vocab + 6 <= d_head.")
    space = _Subspaces(cfg.d_model)
    TOK, POS = space.add("tok", V), space.add("pos", 2 * n_freqs)
    PREV, OUT, JUNK = space.add("prev", V), space.add("out", V), space.add("junk", V)
    f64 = dict(dtype=torch.float64)
    sqrt_dh = math.sqrt(d_head)

    # Positions: frequency pairs (cos, sin) / sqrt(F), norm 1 at every position.
    p = torch.arange(n_ctx, **f64)
    omega = 2 * math.pi * torch.arange(1, n_freqs + 1, **f64) / n_ctx
    pos_coords = torch.stack([torch.cos(omega[None] * p[:, None]), torch.sin(omega[None] * p[:, None])], -1)
    pos_coords = pos_coords.reshape(n_ctx, 2 * n_freqs) / math.sqrt(n_freqs)  # [pos, 2F] (c1 s1 c2 s2 ...)

    def dirichlet(delta: float, F: int) -> float:
        return float(torch.cos(omega[:F] * delta).sum())

    z = lambda *s: torch.zeros(*s, **f64)  # noqa: E731
    W_E, W_pos = torch.eye(V, **f64) @ TOK, pos_coords @ POS
    W_Q, W_K, W_V = z(2, 4, cfg.d_model, d_head), z(2, 4, cfg.d_model, d_head), z(2, 4, cfg.d_model, d_head)
    W_O = z(2, 4, d_head, cfg.d_model)

    # L0H1 previous-token head. q_i = R(-w_f) pos_i so q_i . k_j ∝ sum_f cos(w_f (i - 1 - j)).
    L, H = ROLES.prev_token
    rot = z(2 * n_freqs, 2 * n_freqs)  # coords [c, s] -> [c cos w + s sin w, -c sin w + s cos w]
    for f in range(n_freqs):
        c, s = math.cos(omega[f]), math.sin(omega[f])
        rot[2 * f : 2 * f + 2, 2 * f : 2 * f + 2] = torch.tensor([[c, -s], [s, c]], **f64)
    gap = (dirichlet(0, n_freqs) - dirichlet(1, n_freqs)) / n_freqs  # q.k at Δ=0 minus Δ=±1
    scale = math.sqrt(sharpness * sqrt_dh / gap)
    W_Q[L, H, :, : 2 * n_freqs] = POS.T @ rot * scale
    W_K[L, H, :, : 2 * n_freqs] = POS.T * scale
    W_V[L, H, :, :V] = TOK.T
    W_O[L, H, :V] = PREV

    # L0H2 duplicate-token head: +match on TOK, -self on the first F_dup frequencies of POS.
    L, H = ROLES.duplicate
    F6 = F_dup
    self_pen = 1.0 - max(dirichlet(d, F6) / F6 for d in range(4, n_ctx - 3))  # self vs a match >= 4 back
    pen = sharpness / self_pen  # score -pen * D6(i - j) / F6
    W_Q[L, H, :, :V] = TOK.T * math.sqrt(3 * pen * sqrt_dh)
    W_K[L, H, :, :V] = TOK.T * math.sqrt(3 * pen * sqrt_dh)
    W_Q[L, H, :, V : V + 2 * F6] = -POS[: 2 * F6].T * math.sqrt(pen * sqrt_dh * n_freqs / F6)
    W_K[L, H, :, V : V + 2 * F6] = POS[: 2 * F6].T * math.sqrt(pen * sqrt_dh * n_freqs / F6)

    # BOS heads (L0H3, L1H3): constant query (every token's TOK direction), key = "is BOS".
    bos_scale = math.sqrt(sharpness * sqrt_dh)
    for L, H in ROLES.bos:
        W_Q[L, H, :, 0] = TOK.sum(0) * bos_scale
        W_K[L, H, :, 0] = TOK[0] * bos_scale

    # L1H0 uniform dummy: zero QK, copies tokens into JUNK (changes only the final LN norm).
    W_V[1, 0, :, :V] = TOK.T
    W_O[1, 0, :V] = JUNK

    # L1H2 induction head: query TOK_i . key PREV_j, OV TOK -> OUT.
    L, H = ROLES.induction
    ind_scale = math.sqrt(sharpness * sqrt_dh)
    W_Q[L, H, :, :V] = TOK.T * ind_scale
    W_K[L, H, :, :V] = PREV.T * ind_scale
    W_V[L, H, :, :V] = TOK.T
    W_O[L, H, :V] = OUT

    # LN gains: the residual read at layer 0 has norm^2 = 2 (TOK + POS), at layer 1 norm^2 = 3
    # (+ PREV); w = |x| / sqrt(d_model) makes LN the identity there.
    d = cfg.d_model
    model = Transformer(cfg)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            prm.zero_()
        model.embed.W_E.copy_(W_E)
        model.pos_embed.W_pos.copy_(W_pos)
        for layer, block in enumerate(model.blocks):
            block.ln1.w.fill_(math.sqrt((2 + layer) / d))
            block.attn.W_Q.copy_(W_Q[layer])
            block.attn.W_K.copy_(W_K[layer])
            block.attn.W_V.copy_(W_V[layer])
            block.attn.W_O.copy_(W_O[layer])
            if not attn_only:
                block.ln2.w.fill_(1.0)  # MLP weights stay zero: the MLP outputs exactly 0
        model.ln_final.w.fill_(math.sqrt(3 / d))  # TOK + POS + PREV (+ OUT, JUNK: varies)
        model.unembed.W_U.copy_(OUT.T * unembed_scale)
        if noise > 0:
            g = torch.Generator().manual_seed(seed)
            for name, prm in model.named_parameters():
                if ".ln" not in name and not name.startswith("ln_final") and prm.dim() >= 2:
                    prm.add_(torch.randn(prm.shape, generator=g) * noise)
    model.eval()
    return model, ROLES


def handbuilt_experiment(d_vocab: int = 20, n_ctx: int = 48, rep_len: int = 12, n_diagnostic: int = 64, attn_only: bool = True) -> ExperimentConfig:
    """An ``ExperimentConfig`` matching ``induction_model`` (for ``handbuilt_dataset``)."""
    return ExperimentConfig(
        model=handbuilt_model_config(d_vocab, n_ctx, attn_only),
        data=DataConfig(seq_len=n_ctx, segment_min=4, segment_max=min(12, d_vocab - 1), n_val=64,
                        rep_len=rep_len, n_diagnostic=n_diagnostic),
        train=TrainConfig(steps=1),
        run=RunConfig(scheme="handbuilt", seed=0, preset="handbuilt"),
    )


def handbuilt_dataset(cfg: ExperimentConfig | None = None) -> Dataset:
    """The diagnostic sets (``val``, ``rep``, ``patch``) for ``cfg``, generated in memory (no files)."""
    cfg = cfg or handbuilt_experiment()
    return Dataset(cfg, Dataset.generate(cfg))
