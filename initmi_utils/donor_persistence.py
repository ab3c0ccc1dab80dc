"""Persistence: does a seeded head keep its donor's role through training?

The ``seeded`` scheme starts the student as a copy of a small trained donor (head slot ``j`` of
each donor layer = the donor's head ``j``; its residual replicated into the student's, see
``initmi_utils.seeded``). Over the checkpoints of a run we ask three questions per layer, and
ask them too of runs under every other scheme, whose same slots are the baseline (the donor of a
run is the donor of its init seed, whatever the run's scheme):

- ``pattern_similarity_to_donor`` (layer, head, ``donor_head`` column): does the head still
  attend like the donor's head? ``1 - JSD`` (Jensen-Shannon divergence, base 2, so in [0, 1])
  between the two attention distributions of each query, averaged over queries ``1..`` and
  sequences (query 0 can only attend to BOS, for every head).
- ``ablation_effect`` / ``ablation_share`` (layer, head): how much does the model rely on the
  head? Zero-ablate the head's ``z`` (``blocks.{l}.attn.hook_z``) and measure the change of a
  metric (by default the induction loss on ``rep``); the share is ``|effect| / sum |effects|``
  over all heads of the model.
- ``cka_to_donor`` (layer, head -1): linear CKA between the donor's residual stream after block
  ``l`` and the student's, read in the donor subspace (``seeded.to_donor_basis``: the mean over
  the copies); ``cka_full_to_donor`` uses the student's whole residual. Positions ``1..`` of every
  sequence are the samples.

We compute these ourselves because TransformerLens has no donor-versus-student comparison;
the activations come from TransformerLens (``run_with_cache`` on ``to_bridge``, one pass with
cache per checkpoint; one ``run_with_hooks`` per ablated head). ``tables(cfg, root, schedule)``
is notebook 03's ``persistence`` table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.utilities import get_act_name

from initmi_utils.ablation import ablation_effects
from initmi_utils.behavior import next_token_stats
from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ExperimentConfig
from initmi_utils.data import Batch, load_dataset
from initmi_utils.geometry import linear_cka
from initmi_utils.model import Transformer, to_bridge
from initmi_utils.seeded import DONOR, DonorConfig, load_donor, to_donor_basis

PERSISTENCE_METRICS = ("pattern_similarity_to_donor", "ablation_share", "cka_to_donor")

def induction_loss(logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> float:
    """Mean cross-entropy on the batch's induction targets (what ``ablation_share`` is measured on)."""
    return next_token_stats(logits, batch)["loss_induction"]


# ---------------------------------------------------------------------------------------------
# Scores on tensors.


def js_similarity(p: Float[Tensor, "... k"], q: Float[Tensor, "... k"]) -> Float[Tensor, "..."]:
    """``1 - JSD(p, q)`` with the divergence in bits: 1 for equal distributions, 0 for disjoint."""
    p, q = p.double(), q.double()
    m = (p + q) / 2
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return 1 - (kl_pm + kl_qm) / (2 * math.log(2))


# ---------------------------------------------------------------------------------------------
# Activations and the per-checkpoint scores.


def activations(bridge, tokens: Tensor) -> dict[str, Tensor]:
    """One forward pass with cache of a ``TransformerBridge`` (``model.to_bridge``): ``logits``,
    ``pattern{l}`` ``[batch head q k]`` and ``resid{l}`` (``blocks.{l}.hook_resid_post``,
    ``[batch pos d_model]``) of every layer."""
    n_layers = bridge.cfg.n_layers
    names = [get_act_name("pattern", l) for l in range(n_layers)]
    names += [get_act_name("resid_post", l) for l in range(n_layers)]
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, names_filter=names)
    out = {"logits": logits}
    for l in range(n_layers):
        out[f"pattern{l}"] = cache[get_act_name("pattern", l)]
        out[f"resid{l}"] = cache[get_act_name("resid_post", l)]
    return out


def _shared_layers(acts: dict[str, Tensor], donor_acts: dict[str, Tensor]) -> int:
    """The donor's layers (a donor may be shallower than the student; the rest has no counterpart)."""
    return sum(1 for name in donor_acts if name.startswith("resid") and name in acts)


def pattern_similarity(acts: dict[str, Tensor], donor_acts: dict[str, Tensor]) -> pd.DataFrame:
    """``pattern_similarity_to_donor`` for every (layer, student head, donor head) of the donor's layers."""
    rows = []
    for l in range(_shared_layers(acts, donor_acts)):
        s, d = acts[f"pattern{l}"][:, :, 1:], donor_acts[f"pattern{l}"][:, :, 1:]  # drop query 0
        for dh in range(d.shape[1]):
            sim = js_similarity(s, d[:, dh : dh + 1]).mean(dim=(0, 2))  # [head]
            rows += [dict(layer=l, head=h, donor_head=dh, metric="pattern_similarity_to_donor", value=v)
                     for h, v in enumerate(sim.tolist())]
    return pd.DataFrame(rows)


def cka_scores(acts: dict[str, Tensor], donor_acts: dict[str, Tensor]) -> pd.DataFrame:
    """``cka_to_donor`` (student residual in the donor subspace) and ``cka_full_to_donor`` per layer."""
    rows = []
    for l in range(_shared_layers(acts, donor_acts)):
        d = donor_acts[f"resid{l}"][:, 1:]
        s = acts[f"resid{l}"][:, 1:]
        d_flat = d.reshape(-1, d.shape[-1])
        sub = to_donor_basis(s, d.shape[-1]).reshape(-1, d.shape[-1])
        rows.append(dict(layer=l, metric="cka_to_donor", value=linear_cka(sub, d_flat)))
        rows.append(dict(layer=l, metric="cka_full_to_donor", value=linear_cka(s.reshape(-1, s.shape[-1]), d_flat)))
    return pd.DataFrame(rows).assign(head=-1)


def ablation_scores(bridge, batch: Batch) -> pd.DataFrame:
    """``ablation_effect`` (induction loss with the head's ``z`` zeroed minus clean, from
    ``ablation.ablation_effects``) and ``ablation_share`` (``|effect|`` over the sum of all heads'
    ``|effect|``; NaN when no head has any effect)."""
    effects = ablation_effects(bridge, batch, kinds=("zero",))
    df = effects[effects.metric == "zero_ablation_loss_delta"][["layer", "head", "value"]].assign(metric="ablation_effect")
    total = df.value.abs().sum()
    share = df.assign(metric="ablation_share", value=df.value.abs() / total if total > 0 else math.nan)
    return pd.concat([df, share], ignore_index=True)


def persistence_scores(model: Transformer, donor_acts: dict[str, Tensor], batch: Batch, bridge=None) -> pd.DataFrame:
    """Every persistence score of one model against the donor's activations on ``batch.tokens``
    (``bridge``: one to refill, see ``model.to_bridge``)."""
    bridge = to_bridge(model, reuse=bridge)
    acts = activations(bridge, batch.tokens)
    return pd.concat([pattern_similarity(acts, donor_acts), ablation_scores(bridge, batch),
                      cka_scores(acts, donor_acts)], ignore_index=True)


def persistence_table(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR,
                      steps: list[int] | None = None, n_sequences: int = 128) -> pd.DataFrame:
    """Persistence scores of run ``cfg`` at each checkpoint (``steps``, default all) against the
    donor of its init seed, on the first ``n_sequences`` of the ``rep`` diagnostic set (the
    ablations cost one forward pass per head and checkpoint); long format (step, layer, head,
    donor_head, metric, value). The donor must be trained (``seeded.DonorMissing`` names the
    command otherwise)."""
    rep = load_dataset(cfg, root).rep
    batch = Batch(rep.tokens[:n_sequences], rep.target[:n_sequences], rep.distractor[:n_sequences])
    donor_acts = activations(to_bridge(load_donor(cfg, root, donor)), batch.tokens)
    ckpts = list_checkpoints(cfg, root)
    missing = sorted(set(steps or []) - set(ckpts.steps))
    if missing:
        raise ValueError(f"run {cfg.run.name} has no checkpoints at steps {missing}; it has {list(ckpts.steps)}.")
    frames = [persistence_scores(model, donor_acts, batch, bridge).assign(step=step)
              for step, model, bridge in ckpts.bridges(steps or None)]
    df = pd.concat(frames, ignore_index=True)
    df["donor_head"] = df["donor_head"].fillna(-1).astype(int)
    return df[["step", "layer", "head", "donor_head", "metric", "value"]]


def picked_steps(available: Sequence[int], schedule: Sequence[int] | None, n: int) -> list[int]:
    """``n`` steps evenly spaced (by index; first and last included) over the checkpoints in
    ``available`` that ``schedule`` lists (``None``: every one), so every run of a preset is scored
    at the same steps whatever adaptive extra checkpoints it saved. Fewer when there are fewer."""
    have = set(available)
    regular = [s for s in (available if schedule is None else schedule) if s in have]
    if not regular:
        raise ValueError(f"none of the scheduled steps {list(schedule or [])} is a checkpoint (have {list(available)}).")
    return sorted({regular[int(i)] for i in np.linspace(0, len(regular) - 1, n).round()})


def tables(cfg: ExperimentConfig, root: str | Path | None = None, schedule: Sequence[int] | None = None,
           persistence_checkpoints: int = 6) -> dict[str, pd.DataFrame]:
    """Notebook 03's ``persistence`` table: ``{"persistence": persistence_table(...)}`` at
    ``persistence_checkpoints`` steps picked by ``picked_steps`` from ``schedule`` (notebook 03
    passes ``train.checkpoint_schedule(cfg.train)``, which this module cannot import: ``train`` sits
    above it). The donor must be trained (``donor.donor_metrics`` trains it once)."""
    steps = picked_steps(list_checkpoints(cfg, root).steps, schedule, persistence_checkpoints)
    return {"persistence": persistence_table(cfg, root, steps=steps)}


def seeded_slots(table: pd.DataFrame) -> pd.DataFrame:
    """The rows about the seeded slots: each donor head's own slot (``head == donor_head``) for
    pattern similarity, the donor heads' slots for the ablation share, and the CKA rows."""
    t = table
    n_donor_heads = int(t.loc[t.metric == "pattern_similarity_to_donor", "donor_head"].max()) + 1
    keep = ((t.metric == "pattern_similarity_to_donor") & (t["head"] == t.donor_head)) \
        | ((t.metric == "ablation_share") & (t["head"] < n_donor_heads)) \
        | (t.metric == "cka_to_donor")
    return t[keep]
