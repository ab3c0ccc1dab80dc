"""Weight-based circuit scores (Elhage et al. 2021): OV copying, positional QK, composition.

All scores read the weights of the training ``Transformer`` with the *linear* part of each
LayerNorm folded in, as TransformerLens's ``fold_ln`` + ``center_writing_weights`` would: a
reader's gain multiplies its input rows (``diag(w) W_Q``), and everything written into the
residual stream is centred (``W P`` with ``P = I - 11^T / d_model``), because the next LayerNorm
removes the mean anyway. Only LN's division by the residual's norm (a positive scalar per
position) is left out, which changes no sign and no ranking over tokens. Folding matters here and
not in ``geometry``: these scores ask what function a path computes, and trained LN gains are
part of that path. (``TransformerBridge.all_composition_scores`` reads the *unfolded* bridge
weights, so we build the ``FactoredMatrix`` pairs ourselves and score them with TransformerLens's
own ``utils.composition_scores``.)

- ``ov_copying_score``: eigenvalues ``λ`` of the full OV circuit ``W_E W_V W_O W_U``
  (``d_vocab x d_vocab``, token attended to -> logit), ``Re Σλ / Σ|λ|``: 1 when every eigenvalue is
  positive (the head raises the logit of the token it attends to), -1 for an anti-copying head,
  ~0 for a random one. ``ov_top1_diag_acc``: the fraction of tokens whose own logit is the
  (strict) maximum of their row. BOS is left out of the accuracy: it is never a next token, so its
  unembedding is unconstrained.
- ``qk_prev_token_score``: the positional QK circuit ``(W_pos W_Q + b_Q)(W_pos W_K + b_K)^T`` (the
  part of a head's attention scores that depends on positions only, LN folded as above)
  restricted to causal keys: the fraction of query positions ``q >= 2`` whose key ``q - 1`` scores
  strictly (beyond rounding) above every other key. It says *whether* positions alone point a head
  at the previous token, not how sharply: the attention scores in ``attention`` measure that.
- ``q_/k_/v_composition``: ``||W_OV^src M||_F / (||W_OV^src||_F ||M||_F)`` with ``M`` the reading
  head's ``W_QK`` (Q), ``W_QK^T`` (K) or ``W_OV`` (V), for every source head in an earlier layer.
  A random pair of matrices has a positive score of its own, so each is also reported as a
  z-score against a *null*: the same pairs in fresh models of the same init scheme at step 0
  (``composition_null``), ``k_composition_z`` etc.

``tables(cfg, root)`` computes these and the ``geometry`` metrics at every checkpoint of a run
(notebook 06; here because ``geometry`` sits below this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.utilities import composition_scores

import initmi_utils.seeded  # noqa: F401  (registers the `seeded` scheme, whose null ``composition_null`` draws)
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ExperimentConfig, ModelConfig
from initmi_utils.data import BOS, load_dataset
from initmi_utils.geometry import geometry_table, hook_names, single_threaded
from initmi_utils.model import Transformer
from initmi_utils.schemes import init_weights

MODES = ("q", "k", "v")
NULL_SEED_OFFSET = 1_000_000  # null seeds never coincide with a run's own init seed


def _centre(d: int) -> Tensor:
    return torch.eye(d) - torch.full((d, d), 1.0 / d)


@dataclass(frozen=True)
class FoldedWeights:
    """One model's weights with LayerNorm's linear part folded in (see the module docstring).

    Reader matrices ``[layer, head, d_model, d_head]`` include their LN gain; ``W_O`` (``[layer,
    head, d_head, d_model]``), ``W_E`` and ``W_pos`` are centred; ``W_U`` includes the final LN's
    centring and gain; ``b_Q``/``b_K`` include the ln1 bias (``b_Q + b_ln1 W_Q``), as TL's ``fold_ln``.
    """

    W_E: Float[Tensor, "d_vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    W_U: Float[Tensor, "d_model d_vocab"]
    W_Q: Float[Tensor, "layer head d_model d_head"]
    W_K: Float[Tensor, "layer head d_model d_head"]
    W_V: Float[Tensor, "layer head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_Q: Float[Tensor, "layer head d_head"]
    b_K: Float[Tensor, "layer head d_head"]

    @classmethod
    def of(cls, model: Transformer) -> "FoldedWeights":
        d = model.cfg.d_model
        P = _centre(d)
        with torch.no_grad():
            gain = torch.stack([blk.ln1.w for blk in model.blocks])[:, None, :, None]  # [layer 1 d_model 1]
            ln_b = torch.stack([blk.ln1.b for blk in model.blocks])[:, None, None, :]  # [layer 1 1 d_model]
            stack = lambda name: torch.stack([getattr(blk.attn, name) for blk in model.blocks]).detach().clone()  # noqa: E731
            return cls(
                W_E=model.embed.W_E.detach() @ P,
                W_pos=model.pos_embed.W_pos.detach() @ P,
                W_U=P @ (model.ln_final.w.detach()[:, None] * model.unembed.W_U.detach()),
                W_Q=gain * stack("W_Q"),
                W_K=gain * stack("W_K"),
                W_V=gain * stack("W_V"),
                W_O=stack("W_O") @ P,
                b_Q=stack("b_Q") + (ln_b @ stack("W_Q"))[:, :, 0],
                b_K=stack("b_K") + (ln_b @ stack("W_K"))[:, :, 0],
            )

    def OV(self, layer: int) -> FactoredMatrix:
        """``W_V W_O`` of every head of ``layer``: ``[head, d_model, d_model]``, factored."""
        return FactoredMatrix(self.W_V[layer], self.W_O[layer])

    def QK(self, layer: int) -> FactoredMatrix:
        """``W_Q W_K^T`` of every head of ``layer`` (query residual x key residual), factored."""
        return FactoredMatrix(self.W_Q[layer], self.W_K[layer].transpose(-2, -1))


# ---------------------------------------------------------------------------------------------
# OV circuit.


def full_ov_circuit(w: FoldedWeights, layer: int) -> FactoredMatrix:
    """``W_E W_V W_O W_U`` per head of ``layer``: ``[head, d_vocab, d_vocab]`` (row = attended
    token, column = output logit), as a ``FactoredMatrix`` through ``d_head``."""
    return FactoredMatrix(w.W_E @ w.W_V[layer], w.W_O[layer] @ w.W_U)


def copying_score(circuit: FactoredMatrix, scale: Tensor | float | None = None) -> Float[Tensor, "..."]:
    """``Re Σλ / Σ|λ|`` over the eigenvalues of ``circuit`` (TransformerLens's ``eigenvalues``, from
    the small ``BA`` product).

    ``nan`` when ``Σ|λ|`` is below ``1e-6 * scale``: such a circuit is zero up to rounding (a head
    writing where the unembedding does not read) and the ratio of rounding errors means nothing.
    ``scale`` should bound the circuit from the size of its parts (``ov_table`` passes
    ``|W_E W_V| |W_O| |W_U|``); by default ``|A| |B|``.
    """
    lam = circuit.eigenvalues
    total = lam.abs().sum(-1)
    if scale is None:
        scale = circuit.A.norm(dim=(-2, -1)) * circuit.B.norm(dim=(-2, -1))
    scale = torch.as_tensor(scale, dtype=total.dtype)
    score = lam.real.sum(-1) / total.clamp(min=torch.finfo(total.dtype).tiny)
    return torch.where(total > 1e-6 * scale, score, torch.full_like(score, float("nan"))).float()


def top1_diag_accuracy(m: Float[Tensor, "... d_vocab d_vocab"], exclude: tuple[int, ...] = (BOS,)) -> Float[Tensor, "..."]:
    """Fraction of tokens whose own entry is the strict maximum of their row (``exclude`` left
    out of rows and columns)."""
    keep = torch.tensor([i for i in range(m.shape[-1]) if i not in exclude])
    m = m[..., keep[:, None], keep[None, :]]
    diag = m.diagonal(dim1=-2, dim2=-1)
    others = m.masked_fill(torch.eye(m.shape[-1], dtype=torch.bool), float("-inf")).amax(-1)
    return (diag > others).float().mean(-1)


@single_threaded
def ov_table(model: Transformer) -> pd.DataFrame:
    """``ov_copying_score`` and ``ov_top1_diag_acc`` per layer and head."""
    w = FoldedWeights.of(model)
    rows = []
    for layer in range(model.cfg.n_layers):
        circuit = full_ov_circuit(w, layer)
        scale = circuit.A.norm(dim=(-2, -1)) * w.W_O[layer].norm(dim=(-2, -1)) * w.W_U.norm()
        scores, acc = copying_score(circuit, scale), top1_diag_accuracy(circuit.AB)
        for head in range(model.cfg.n_heads):
            rows.append(dict(layer=layer, head=head, metric="ov_copying_score", value=scores[head].item()))
            rows.append(dict(layer=layer, head=head, metric="ov_top1_diag_acc", value=acc[head].item()))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Positional QK circuit.


def positional_qk(w: FoldedWeights, layer: int, n_pos: int | None = None) -> Float[Tensor, "head q k"]:
    """Token-independent attention scores of every head of ``layer``: ``(x_q W_Q + b_Q)(x_k W_K +
    b_K)^T`` with ``x`` the (centred, gain- and bias-folded) positional embedding, for the first
    ``n_pos`` positions; non-causal keys are ``-inf``."""
    n_pos = n_pos or w.W_pos.shape[0]
    x = w.W_pos[:n_pos]
    q = x @ w.W_Q[layer] + w.b_Q[layer][:, None, :]
    k = x @ w.W_K[layer] + w.b_K[layer][:, None, :]
    scores = q @ k.transpose(-2, -1)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).triu(1)
    return scores.masked_fill(causal, float("-inf"))


def prev_token_fraction(scores: Float[Tensor, "... q k"], tol: Tensor | float = 0.0) -> Float[Tensor, "..."]:
    """Fraction of query positions ``q >= 2`` whose key ``q - 1`` scores more than ``tol`` above
    every other causal key. A tie (e.g. an all-zero circuit) is not a preference, and ``q = 1`` is
    left out because there "previous" and "not myself" are the same choice."""
    n = scores.shape[-1]
    q = torch.arange(2, n)
    prev = scores[..., q, q - 1]
    others = scores.clone()
    others[..., q, q - 1] = float("-inf")
    tol = torch.as_tensor(tol, dtype=scores.dtype)[..., None]
    return (prev > others[..., q, :].amax(-1) + tol).float().mean(-1)


@single_threaded
def qk_prev_token_table(model: Transformer, n_pos: int | None = None) -> pd.DataFrame:
    """``qk_prev_token_score`` per layer and head over the first ``n_pos`` positions (default
    ``n_ctx``; pass the training sequence length: later positions were never trained)."""
    w = FoldedWeights.of(model)
    rows = []
    for layer in range(model.cfg.n_layers):
        # Margins below 1e-5 of the largest possible score are rounding, not structure.
        bound = w.W_pos.norm(dim=-1).max() * torch.linalg.matrix_norm(w.W_Q[layer], ord=2) * torch.linalg.matrix_norm(w.W_K[layer], ord=2)
        frac = prev_token_fraction(positional_qk(w, layer, n_pos), tol=1e-5 * bound)
        rows += [dict(layer=layer, head=h, metric="qk_prev_token_score", value=frac[h].item()) for h in range(len(frac))]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Composition.


def composition(w: FoldedWeights, source_layer: int, layer: int, mode: str) -> Float[Tensor, "source_head head"]:
    """Composition scores of every head of ``source_layer`` into every head of ``layer`` (later),
    via TransformerLens's ``utils.composition_scores``; ``nan`` where a matrix is all zero."""
    if mode not in MODES:
        raise ValueError(f"composition mode must be one of {MODES}, got {mode!r}.")
    if not source_layer < layer:
        raise ValueError(f"a head can only compose with an earlier layer; got source {source_layer}, reader {layer}.")
    right = {"q": lambda: w.QK(layer), "k": lambda: w.QK(layer).T, "v": lambda: w.OV(layer)}[mode]()
    with torch.no_grad():
        return composition_scores(w.OV(source_layer), right, broadcast_dims=True)


@dataclass(frozen=True)
class CompositionNull:
    """Mean and std of composition scores in freshly initialised models of one scheme, per
    ``(mode, source_layer, layer)``, pooled over head pairs and ``n_models`` init seeds."""

    scheme: str
    n_models: int
    model_cfg: ModelConfig
    mean: dict[tuple[str, int, int], float]
    std: dict[tuple[str, int, int], float]


@single_threaded
def composition_null(model_cfg: ModelConfig, scheme: str, n_models: int = 8, cfg=None, root: str | Path | None = None) -> CompositionNull:
    """The step-0 null of ``scheme``: composition scores of ``n_models`` fresh inits with seeds
    ``NULL_SEED_OFFSET + i`` (never a run's own seed). At init every head pair is exchangeable, so
    pairs are pooled; with ``n_heads^2`` pairs per model a few models give a stable mean and std.

    ``cfg``/``root`` go to schemes that need the run (``seeded`` reuses the run's cached donor, so
    its null already holds the donor's circuit and only the random rest varies: its z-scores say
    what training added beyond the seeded start)."""

    if n_models < 2:
        raise ValueError(f"a null distribution needs n_models >= 2 fresh inits, got {n_models}.")
    samples: dict[tuple[str, int, int], list[Tensor]] = {}
    for i in range(n_models):
        model = init_weights(Transformer(model_cfg), scheme, NULL_SEED_OFFSET + i, cfg, root)
        w = FoldedWeights.of(model)
        for layer in range(model_cfg.n_layers):
            for source in range(layer):
                for mode in MODES:
                    samples.setdefault((mode, source, layer), []).append(composition(w, source, layer, mode).flatten())
    pooled = {k: torch.cat(v) for k, v in samples.items()}
    return CompositionNull(scheme, n_models, model_cfg, {k: v.mean().item() for k, v in pooled.items()},
                           {k: v.std().item() for k, v in pooled.items()})


@single_threaded
def composition_table(model: Transformer, null: CompositionNull | None = None) -> pd.DataFrame:
    """``q_/k_/v_composition`` for every (earlier-layer source head, reading head) pair: ``layer``
    and ``head`` name the reading head, ``source_layer``/``source_head`` the writer. With a
    ``null``, also ``{mode}_composition_z = (score - null mean) / null std``."""
    if null is not None and null.model_cfg != model.cfg:
        raise ValueError(
            f"the composition null was drawn for {null.model_cfg}, not for this model ({model.cfg}); "
            f"draw it with composition_null(model.cfg, scheme, ...)."
        )
    w = FoldedWeights.of(model)
    rows = []
    for layer in range(model.cfg.n_layers):
        for source in range(layer):
            for mode in MODES:
                scores = composition(w, source, layer, mode)
                key = (mode, source, layer)
                for s_head in range(scores.shape[0]):
                    for head in range(scores.shape[1]):
                        base = dict(layer=layer, head=head, source_layer=source, source_head=s_head)
                        value = scores[s_head, head].item()
                        rows.append(dict(base, metric=f"{mode}_composition", value=value))
                        if null is not None:
                            z = (value - null.mean[key]) / null.std[key] if null.std[key] > 0 else float("nan")
                            rows.append(dict(base, metric=f"{mode}_composition_z", value=z))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Everything of one checkpoint.


@single_threaded
def circuits_table(model: Transformer, step: int, null: CompositionNull | None = None, n_pos: int | None = None) -> pd.DataFrame:
    """OV copying, positional previous-token QK and composition scores of one checkpoint."""
    df = pd.concat([ov_table(model), qk_prev_token_table(model, n_pos), composition_table(model, null)], ignore_index=True)
    df.insert(0, "step", int(step))
    for col in ("source_layer", "source_head"):
        df[col] = df[col].fillna(-1).astype(int) if col in df else -1
    return df


# ---------------------------------------------------------------------------------------------
# Notebook 06's tables (here and not in ``geometry``, which sits below this module).


SINGULAR_VALUES = ("ends", "all", "none")  # where notebook 06 stores every singular value


def tables(cfg: ExperimentConfig, root: str | Path | None = None, n_sequences: int = 64, null_models: int = 8,
           singular_values: str = "ends", null: CompositionNull | None = None) -> dict[str, pd.DataFrame]:
    """Notebook 06's tables of run ``cfg`` under ``root``, every checkpoint: ``{"geometry", "circuits"}``.

    - ``geometry``: ``geometry.geometry_table`` from one cached bridge forward on the first
      ``n_sequences`` of ``val``, drift measured from this run's step 0, with every singular value
      (metric ``singular_value``) at the checkpoints ``singular_values`` names: ``"ends"`` (step 0
      and the last checkpoint, what notebook 06's spectra figure shows), ``"all"`` or ``"none"``.
      The summaries (``spectral_norm``, ``effective_rank``) are at every checkpoint either way.
      Why not every value at every checkpoint by default: they are 90 % of a run's geometry rows,
      and the published study keeps every run's tables in git;
    - ``circuits``: ``circuits_table`` with composition z-scores against ``null``, by default
      ``composition_null`` of ``null_models`` fresh inits of the run's scheme (pass one already
      drawn, e.g. to print it first, to draw it once).

    Raises ``CheckpointError`` naming the training to run if the run is not trained.
    """
    if singular_values not in SINGULAR_VALUES:
        raise ValueError(f"singular_values={singular_values!r}: use one of {', '.join(SINGULAR_VALUES)}.")
    ckpts = list_checkpoints(cfg, root)
    spectra_at = {"all": set(ckpts.steps), "ends": {ckpts.steps[0], ckpts.steps[-1]}, "none": set()}[singular_values]
    tokens = load_dataset(cfg, root).val.tokens[:n_sequences]
    names = hook_names(cfg.model.n_layers)
    model0, _ = ckpts.load(0)  # the drift reference: this run at step 0
    if null is None:
        null = composition_null(cfg.model, cfg.run.scheme, null_models, cfg, root)
    geo_frames, circ_frames = [], []
    for step, model, bridge in ckpts.bridges():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(tokens, names_filter=names)
        geo_frames.append(geometry_table(model, model0, cache, step, with_spectra=step in spectra_at))
        circ_frames.append(circuits_table(model, step, null, n_pos=cfg.data.seq_len))
    return {"geometry": pd.concat(geo_frames, ignore_index=True), "circuits": pd.concat(circ_frames, ignore_index=True)}
