"""The ``seeded`` scheme: a smaller trained *donor* embedded into the student at step 0.

The donor is a small transformer (by default 2 layers and half the student's heads and width:
2L x 2H x d64 for the 2L x 4H x d128 student, see ``DonorConfig``) trained by the ordinary
training loop on the student's data with the student's train config (``initmi_utils.donor``,
which this module never calls: it loads a trained donor and raises ``DonorMissing``, naming the
command that trains it, when there is none). Its weights are then written into the student so that, at step 0, the
student computes the donor's function: the donor's heads occupy head slots ``0 .. n_heads - 1``
of the student's first ``n_layers`` layers, its MLP neurons the student's first neurons, and
everything else is random but kept out of the donor's way.

Why a replicated residual
-------------------------
LayerNorm normalises over the whole residual, so putting the donor's ``d`` coordinates into the
first ``d`` of the student's ``D`` (zeros elsewhere) would change both the mean and the
variance LayerNorm divides by. Instead the donor residual ``x`` (``[d]``) is embedded as ``k =
D / d`` copies, ``E x = [x, x, ..., x]`` (``[D]``). Then

- ``mean_D(E x) = mean_d(x)`` and ``E x - mean_D(E x) = E (x - mean_d(x))`` (``E 1_d = 1_D``);
- ``var_D(E x) = k |x - mean|^2 / (k d) = var_d(x)``;
- gains act coordinate-wise and commute with copying: ``E(y) * E(w) = E(y * w)``;

so ``LN_D(E x; E w, E b) = E LN_d(x; w, b)``, exactly. A matrix that *writes* to the residual
(``W_E, W_pos, W_O, W_out`` and the ``b_O, b_out`` biases) is copied along its residual axis;
a matrix that *reads* it (``W_Q, W_K, W_V, W_in, W_U``) is copied along the residual axis and
divided by ``k``, since ``E(x) @ (copies of W) / k = x @ W``. With no noise the student's logits
equal the donor's to float precision (tested).

What is random, and the step-0 noise
------------------------------------
Every other weight is random, drawn from the scheme's generator; biases are 0 and LayerNorm
gains 1 outside the donor's layers:

- *readers* (the other heads' ``W_Q, W_K, W_V``, the extra neurons' ``W_in``) are
  ``N(0, noise_std^2)`` (``SEED_NOISE_STD = 0.02``, the ``normal`` scheme's std) over the full
  residual: they see the donor's features and can learn from them. The donor's own readers and
  ``W_U`` get the same noise, but only in the orthogonal complement of ``range(E)``, so that they
  can learn to read new directions without hearing anything at step 0;
- *writers* (the other heads' ``W_O``, the extra neurons' ``W_out``, noise added to ``W_E`` and
  ``W_pos``) are ``N(0, write_std^2)`` (``SEED_WRITE_STD = 0.002``, small as in zero-initialised
  residual branches) projected onto that complement.

At step 0 the residual is therefore ``E x + c`` with ``c ⟂ range(E)``. As ``1_D ∈ range(E)``,
``c`` has zero mean, so it changes no LayerNorm mean; it raises the variance, dividing the
donor part of every LN output by ``sqrt(1 + |c|^2 / (D var_d(x)))``, and ``c * gains`` leaks
into the donor's readers through their complement noise. Both are set by ``write_std`` (the
error grows linearly in it). Measured with the defaults, for the 2L x 4H x d128 student and its
2-head donor trained to induction (quick data, 6000 steps): RMS(student - donor logits) /
std(donor logits) = 0.17 % on ``val`` and 0.25 % on ``rep``, argmax agreement 99.9 % / 99.8 %,
induction accuracy 0.971 vs the donor's 0.972, induction loss equal to 3 decimals.
``STEP0_LOGIT_TOLERANCE = 0.02`` is the bound ``tests/test_seeded.py`` enforces.

The donor is a cached artefact: ``donor.train_donor`` trains it once per (donor config, donor
init seed) under ``checkpoints/<preset>/_donors/<donor name>/<donor scheme>/seed<s>/`` (its
config's preset is ``<preset>/_donors/<donor name>``, which ``RunPaths`` turns into that folder
and no normal run can produce; ``read_table`` does not see its metrics) and ``load_donor`` reads
it.

The donor policy: which donor a student seed gets
--------------------------------------------------
A donor's loss plateau before induction depends strongly on its init seed: on the quick data the
donors of seeds 1-3 had not learnt induction after 8000 steps. So each student seed ``k`` has a
sequence of candidate donor seeds of its own (``donor_seeds``),

    k, 100 (k + 1) + 1, 100 (k + 1) + 2, ...   (at most ``DonorConfig.max_tries``, default 4)

e.g. 0, 101, 102, 103 for seed 0 and 1, 201, 202, 203 for seed 1. The first candidate is ``k``
itself, the donor every seed had before the policy, so donors already trained stay valid; the
others lie in ``[100 (k + 1) + 1, 100 (k + 1) + 99]``, above every student seed's first candidate
and disjoint across student seeds: no two student seeds ``0 <= k < 100`` can share a donor
(``donor_seeds`` refuses other seeds, ``max_tries`` is at most 100). Candidates train in order
(each until ``steps_after_emergence`` steps after its induction emerges, capped as above) and the
first that does classic induction is chosen: its final unambiguous induction accuracy
(``val_acc_induction_unambiguous``) reaches ``train.emergence_threshold`` *and* its final
checkpoint's mechanism label (``offsets.model_mechanism``, frozen thresholds) is
``classic_induction`` (``DONOR_MECHANISM``). Accuracy alone is not enough: a donor can reach it by
recalling a token at a fixed long offset, which is not the circuit the scheme promises to embed.
The rest are never trained. If none qualifies, the one with the highest final accuracy (the
earliest on ties) is chosen and a ``DonorWarning`` names the seeds tried: the scheme then seeds
another mechanism or a partial circuit, not a classic induction circuit.

The choice is recorded, once, in ``checkpoints/<preset>/_donors/<donor name>/<donor
scheme>/choice-seed<k>.json`` (``donor_choice_path``; ``-tries<n>`` is appended to the stem when
``max_tries`` is not the default): every candidate tried (its seed, final step, step of emergence,
final unambiguous accuracy, whether it emerged) and the chosen seed. ``donor.choose_donor`` writes
it atomically when the policy finishes; ``load_donor`` and ``donor_choice`` only read it (a missing
or stale choice raises ``DonorMissing`` naming the command). The seeded run's own checkpoints do
not repeat the donor seed (they hold the run's config and metrics, written by ``train``): this file
is the record of which donor a seeded run embedded. ``donor_compute`` turns it into the donor's
training cost (steps and FLOPs of the chosen donor and of every candidate tried), which the
student's own step count leaves out.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from initmi_utils.checkpoints import list_checkpoints
from initmi_utils.config import ConfigError, ExperimentConfig, ModelConfig, RunConfig, RunPaths
from initmi_utils.model import Transformer, flops_per_token
from initmi_utils.schemes import check_scheme, register_scheme

SEED_NOISE_STD = 0.02  # std of the random readers (= schemes.NORMAL_STD)
SEED_WRITE_STD = 0.002  # std of the random writers into the residual (small: they perturb the donor)
STEP0_LOGIT_TOLERANCE = 0.02  # RMS(student - donor logits) / std(donor logits) allowed at step 0
DONOR_SEED_BLOCK = 100  # student seed k's further donor seeds: DONOR_SEED_BLOCK * (k + 1) + j, j = 1, 2, ...
DONOR_METRIC = "val_acc_induction_unambiguous"  # the donor's final accuracy that decides "emerged"
DONOR_MECHANISM = "classic_induction"  # the label a chosen donor must have besides the accuracy


@dataclass(frozen=True)
class DonorConfig:
    """The donor's architecture relative to the student, and how it is trained.

    Sizes derive from the student (in ``model_config``, never class-time defaults): the donor's
    ``d_head`` equals the student's (a donor head must fit a student head slot), so ``d_model =
    n_heads * student.d_head``; ``d_mlp = mlp_ratio * d_model``. By default the donor has half the
    student's heads, hence half its width: 2L x 2H x d64 for the study's 2L x 4H x d128 student,
    2L x 1H x d16 for the smoke model.

    Why not 1 head: with ``d_head = 32`` a 1-head donor is 32 wide, and on the quick data it had
    not learnt induction after 3000 steps (induction accuracy 0.015, its induction score falling;
    also attention-only or at lr 3e-3, 2400 steps), while the 2-head, 64-wide donor emerged at
    step ~2600 (accuracy 0.94 at 3000; the 128-wide xavier student: ~1000), seed 0. At lr 3e-3
    (``train.donor_lr``) the same donor emerges at step 1300 and plateaus at accuracy 0.95 by step
    2000, at half the cost. But the plateau before emergence depends strongly on the seed: the
    donors of seeds 1 and 2 were still at accuracy 0.02 at step 2500. So a donor trains until its
    induction has emerged, plus ``steps_after_emergence`` steps (0.95 is reached ~700 steps after
    emergence), capped by the preset's ``train.donor_steps``.
    """

    n_layers: int = 2  # donor blocks, embedded into the student's first n_layers blocks
    n_heads: int | None = None  # donor heads per block (slots 0 .. n_heads - 1); None = half the student's
    mlp_ratio: int = 4  # donor d_mlp = mlp_ratio * donor d_model
    scheme: str = "xavier"  # the donor's own init scheme (the fastest to emerge among the students)
    train_steps: int | None = None  # donor optimizer steps (a cap); None = the preset's train.donor_steps (or train.steps)
    steps_after_emergence: int = 1000  # the donor stops this many steps after its induction emerges; -1 = never early
    max_tries: int = 4  # candidate donor seeds tried per student seed until one emerges (``donor_seeds``)

    def heads(self, student: ModelConfig) -> int:
        return max(1, student.n_heads // 2) if self.n_heads is None else self.n_heads

    def model_config(self, student: ModelConfig) -> ModelConfig:
        n_heads = self.heads(student)
        d_model = n_heads * student.d_head
        d_mlp = self.mlp_ratio * d_model
        problems = []
        if not 1 <= self.n_layers <= student.n_layers:
            problems.append(f"donor n_layers={self.n_layers} must lie in 1..{student.n_layers} (the student's)")
        if not 1 <= n_heads <= student.n_heads:
            problems.append(f"donor n_heads={n_heads} must lie in 1..{student.n_heads} (the student's)")
        elif student.d_model % d_model:
            problems.append(
                f"the student's d_model={student.d_model} is not a multiple of the donor's d_model={d_model} "
                f"(= n_heads * d_head), so the donor residual cannot be replicated into it; "
                f"choose a donor n_heads dividing {student.n_heads}")
        if not student.attn_only and d_mlp > student.d_mlp:
            problems.append(f"donor d_mlp={d_mlp} exceeds the student's d_mlp={student.d_mlp}; lower mlp_ratio")
        if self.scheme == "seeded":
            problems.append("the donor cannot itself be seeded; choose a base scheme such as 'xavier'")
        if self.train_steps is not None and self.train_steps < 1:
            problems.append(f"donor train_steps={self.train_steps} must be >= 1 (or None for the student's)")
        if not 1 <= self.max_tries <= DONOR_SEED_BLOCK:
            problems.append(f"donor max_tries={self.max_tries} must lie in 1..{DONOR_SEED_BLOCK} "
                            f"(a student seed's donor seeds are disjoint from the others' only so far)")
        if problems:
            raise ConfigError("invalid donor for the seeded scheme: " + "; ".join(problems) + ".")
        return dataclasses.replace(student, n_layers=self.n_layers, n_heads=n_heads, d_model=d_model, d_mlp=d_mlp)

    def name(self, student: ModelConfig) -> str:
        m = self.model_config(student)
        steps = "" if self.train_steps is None else f"-t{self.train_steps}"
        return f"L{m.n_layers}H{m.n_heads}d{m.d_model}" + ("-attn" if m.attn_only else f"m{m.d_mlp}") + steps


DONOR = DonorConfig()


class DonorWarning(UserWarning):
    """The donor finished training without learning induction."""


def donor_experiment(cfg: ExperimentConfig, donor: DonorConfig = DONOR, donor_seed: int | None = None) -> ExperimentConfig:
    """The run of donor seed ``donor_seed`` (default: the student's init seed): the student's data
    and train config (its length set by ``donor.train_steps``, else the preset's
    ``train.donor_steps``, else ``train.steps``, and ended ``donor.steps_after_emergence`` steps
    after induction emerges; its learning rate ``train.donor_lr``, else ``train.lr``), the donor's
    model and scheme, init seed ``donor_seed``, and the preset ``<preset>/_donors/<donor name>``
    (its own folders, ``seed<donor_seed>`` among them)."""
    check_scheme(donor.scheme)
    preset = f"{cfg.run.preset}/_donors/{donor.name(cfg.model)}"
    steps = donor.train_steps or cfg.train.donor_steps or cfg.train.steps
    train = dataclasses.replace(cfg.train, steps=steps, donor_steps=0, lr=cfg.train.donor_lr or cfg.train.lr,
                                stop_after_emergence=donor.steps_after_emergence,
                                loss_ladder=(), induction_loss_ladder=())  # donors are never loss-matched
    seed = cfg.run.seed if donor_seed is None else donor_seed
    return ExperimentConfig(model=donor.model_config(cfg.model), data=cfg.data, train=train,
                            run=RunConfig(scheme=donor.scheme, seed=seed, preset=preset))


def donor_seeds(student_seed: int, donor: DonorConfig = DONOR) -> list[int]:
    """The donor seeds tried, in order, for student seed ``k``: ``k`` itself, then
    ``100 (k + 1) + j`` for ``j = 1 .. donor.max_tries - 1`` (0, 101, 102, 103 for seed 0). Disjoint
    across student seeds ``0 <= k < 100``; other student seeds are refused, since their candidates
    could be another seed's."""
    k, block = student_seed, DONOR_SEED_BLOCK
    if not 0 <= k < block:
        raise ConfigError(
            f"the seeded scheme's donor seeds are disjoint across student seeds 0..{block - 1} only; got seed {k}.")
    if not 1 <= donor.max_tries <= block:
        raise ConfigError(f"donor max_tries={donor.max_tries} must lie in 1..{block}.")
    return [k] + [block * (k + 1) + j for j in range(1, donor.max_tries)]


class DonorMissing(ConfigError):
    """The donor of a ``seeded`` run has not been trained (the message names the command)."""


def donor_command(cfg: ExperimentConfig, root: str | Path | None = None) -> str:
    """The command that runs the donor policy for ``cfg``'s seed: trains its candidate donors
    (or reuses them) and records the choice."""
    where = "" if root is None or str(root) == "" else f" --root {root}"
    return f"python -m initmi_utils.donor --preset {cfg.run.preset} --seed {cfg.run.seed}{where}"


def donor_choice_path(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR) -> Path:
    """Where the donor policy records its choice for ``cfg``'s seed: next to the candidates'
    folders, ``checkpoints/<preset>/_donors/<donor name>/<donor scheme>/choice-seed<k>.json``
    (``-tries<n>`` appended to the stem when ``max_tries`` is not the default)."""
    folder = RunPaths.of(donor_experiment(cfg, donor), root).checkpoints.parent
    tries = "" if donor.max_tries == DonorConfig.max_tries else f"-tries{donor.max_tries}"
    return folder / f"choice-seed{cfg.run.seed}{tries}.json"


def donor_outcome(dcfg: ExperimentConfig, root: str | Path | None = None) -> dict:
    """One finished donor run as a candidate of the policy: ``seed``, ``final_step``, ``emerged_at``
    (the first evaluation at or above the threshold, or None), ``final_accuracy`` (final
    ``val_acc_induction_unambiguous``) and ``emerged`` (final accuracy >= the threshold)."""
    done = json.loads((RunPaths.of(dcfg, root).checkpoints / "done.json").read_text())
    final = done.get("final_metrics", {})
    acc = float(final.get(DONOR_METRIC, final.get("val_acc_induction", float("nan"))))
    return {"seed": dcfg.run.seed, "final_step": int(done["final_step"]), "emerged_at": done.get("emerged_at"),
            "final_accuracy": acc, "emerged": bool(acc >= dcfg.train.emergence_threshold)}


def donor_choice(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR) -> dict:
    """The recorded donor choice of ``cfg``'s seed (``donor_choice_path``): ``student_seed``,
    ``candidates`` (``donor_outcome`` of each seed tried, in order), ``chosen_seed``, ``emerged``,
    ``max_tries``, ``emergence_threshold``, ``preset`` and ``donor`` (name and scheme).

    Raises ``DonorMissing`` (naming the command) when the policy has not run, when it ran with
    another ``max_tries``, or when the chosen donor's run is gone."""
    path = donor_choice_path(cfg, root, donor)
    hint = f"run the donor policy first with `{donor_command(cfg, root)}` (the pipeline does this by itself)"
    if not path.exists():
        raise DonorMissing(f"the donor of run {cfg.run.name} ({cfg.run.preset}) is not chosen yet ({path} missing): {hint}.")
    choice = json.loads(path.read_text())
    if choice.get("criterion") != DONOR_MECHANISM:
        raise DonorMissing(f"the donor choice {path} was made by an older policy (criterion "
                           f"{choice.get('criterion', 'accuracy only')}, now {DONOR_MECHANISM}): {hint}.")
    if choice.get("max_tries") != donor.max_tries:
        raise DonorMissing(f"the donor choice {path} was made with max_tries={choice.get('max_tries')}, "
                           f"not {donor.max_tries}: {hint}.")
    done = RunPaths.of(donor_experiment(cfg, donor, choice["chosen_seed"]), root).checkpoints / "done.json"
    if not done.exists():
        raise DonorMissing(f"the chosen donor (seed {choice['chosen_seed']}) of run {cfg.run.name} ({cfg.run.preset}) "
                           f"is not trained ({done} missing): {hint}.")
    return choice


def not_emerged_message(choice: dict) -> str:
    """The ``DonorWarning`` text for a choice none of whose candidates emerged."""
    tried = ", ".join(f"{c['seed']} ({c['final_accuracy']:.3f} at step {c['final_step']}, {c.get('mechanism', '?')})"
                      for c in choice["candidates"])
    return (f"none of the donors tried for seed {choice['student_seed']} of {choice['preset']} reached unambiguous "
            f"induction accuracy {choice['emergence_threshold']} with mechanism {DONOR_MECHANISM} (donor seeds "
            f"{tried}): the best, seed {choice['chosen_seed']}, has no classic induction circuit, so `seeded` seeds "
            f"another mechanism, bigram statistics or a partial circuit only. Train it longer (DonorConfig(train_steps=...)), try more seeds "
            f"(DonorConfig(max_tries=...)) or give it more heads (DonorConfig(n_heads=...)).")


def load_donor(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR) -> Transformer:
    """The chosen donor of ``cfg``'s run (``donor_choice``) at its last step.

    Raises ``DonorMissing`` (naming the command that runs the donor policy) when there is no
    valid choice, and warns with a ``DonorWarning`` when no candidate reached the
    induction-emergence threshold: the student is then seeded with bigram statistics or a
    partial circuit, not an induction circuit.
    """
    choice = donor_choice(cfg, root, donor)
    if not choice["emerged"]:
        warnings.warn(not_emerged_message(choice), DonorWarning, stacklevel=2)
    ckpts = list_checkpoints(donor_experiment(cfg, donor, choice["chosen_seed"]), root)
    model, _ = ckpts.load(ckpts.steps[-1])
    return model


def donor_compute(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR) -> dict:
    """What the donor of ``cfg``'s seed cost to train, which the seeded student's own steps leave
    out: ``steps`` and ``flops`` of the chosen donor (its final step), ``total_steps`` and
    ``total_flops`` over every candidate tried (the policy's whole cost), ``donor_seed`` and
    ``flops_per_step``. FLOPs are training FLOPs (``model.flops_per_token``, forward + backward)
    times ``batch_size * seq_len`` tokens per step; evaluations are not counted."""
    choice = donor_choice(cfg, root, donor)
    dcfg = donor_experiment(cfg, donor, choice["chosen_seed"])
    seq_len = dcfg.data.seq_len
    per_step = flops_per_token(dcfg.model, seq_len) * dcfg.train.batch_size * seq_len
    steps = next(c["final_step"] for c in choice["candidates"] if c["seed"] == choice["chosen_seed"])
    total = sum(c["final_step"] for c in choice["candidates"])
    return {"donor_seed": choice["chosen_seed"], "steps": steps, "flops": steps * per_step,
            "total_steps": total, "total_flops": total * per_step, "flops_per_step": per_step}


# ---------------------------------------------------------------------------------------------
# The replicated embedding E and its complement.


def n_copies(student: ModelConfig, donor: ModelConfig) -> int:
    if student.d_model % donor.d_model:
        raise ConfigError(f"student d_model={student.d_model} is not a multiple of donor d_model={donor.d_model}.")
    return student.d_model // donor.d_model


def to_donor_basis(x: Float[Tensor, "... d_model"], d_donor: int) -> Float[Tensor, "... d_donor"]:
    """``E^T x / k``: the mean over the ``k`` copies, i.e. the student residual's coordinates in
    the donor subspace (the donor's own residual when ``x = E x_donor``)."""
    return x.unflatten(-1, (x.shape[-1] // d_donor, d_donor)).mean(-2)


def _write(w: Tensor, k: int, dim: int) -> Tensor:
    """A donor writer copied ``k`` times along its residual axis ``dim``."""
    return torch.cat([w] * k, dim=dim)


def _read(w: Tensor, k: int, dim: int) -> Tensor:
    """A donor reader copied along its residual axis and divided by ``k``."""
    return torch.cat([w] * k, dim=dim) / k


def _perp(w: Tensor, k: int, dim: int) -> Tensor:
    """``w`` minus its projection onto ``range(E)`` along axis ``dim`` (copy-mean removed)."""
    w = w.movedim(dim, -1)
    d = w.shape[-1] // k
    mean = to_donor_basis(w, d)
    return (w - torch.cat([mean] * k, dim=-1)).movedim(-1, dim)


def embed_donor(student: Transformer, donor: Transformer, g: torch.Generator, noise_std: float = SEED_NOISE_STD,
                write_std: float = SEED_WRITE_STD) -> None:
    """Write every parameter of ``student`` so that it computes ``donor``'s function (see the
    module docstring for the exact construction); random parts from ``g`` only."""
    s, d = student.cfg, donor.cfg
    if (s.d_vocab, s.n_ctx, s.act_fn, s.attn_only, s.d_head) != (d.d_vocab, d.n_ctx, d.act_fn, d.attn_only, d.d_head):
        raise ConfigError(
            "donor and student must share d_vocab, n_ctx, act_fn, attn_only and d_head; "
            f"got student {s} and donor {d}.")
    if d.n_layers > s.n_layers or d.n_heads > s.n_heads or (not s.attn_only and d.d_mlp > s.d_mlp):
        raise ConfigError(f"the donor {d} does not fit into the student {s}.")
    k = n_copies(s, d)
    H = d.n_heads
    D = s.d_model

    def noise(*shape: int, std: float = noise_std) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    with torch.no_grad():
        # Embeddings: donor copies plus complement noise (rows are residual vectors).
        student.embed.W_E.copy_(_write(donor.embed.W_E, k, -1) + _perp(noise(s.d_vocab, D, std=write_std), k, -1))
        student.pos_embed.W_pos.copy_(_write(donor.pos_embed.W_pos, k, -1) + _perp(noise(s.n_ctx, D, std=write_std), k, -1))
        for layer, block in enumerate(student.blocks):
            dblock = donor.blocks[layer] if layer < d.n_layers else None
            lns = [("ln1", block.ln1)] + ([] if s.attn_only else [("ln2", block.ln2)])
            for name, ln in lns:
                if dblock is None:
                    ln.w.fill_(1.0)
                    ln.b.zero_()
                else:
                    ln.w.copy_(_write(getattr(dblock, name).w, k, -1))
                    ln.b.copy_(_write(getattr(dblock, name).b, k, -1))
            a = block.attn
            for W in (a.W_Q, a.W_K, a.W_V):  # [head, d_model, d_head]: other heads read everything
                W.copy_(noise(*W.shape))
            a.W_O.copy_(_perp(noise(*a.W_O.shape, std=write_std), k, -1))  # [head, d_head, d_model]
            for b in (a.b_Q, a.b_K, a.b_V, a.b_O):
                b.zero_()
            if dblock is not None:
                da = dblock.attn
                for W, dW in ((a.W_Q, da.W_Q), (a.W_K, da.W_K), (a.W_V, da.W_V)):
                    W[:H] = _read(dW, k, 1) + _perp(W[:H].clone(), k, 1)
                for b, db in ((a.b_Q, da.b_Q), (a.b_K, da.b_K), (a.b_V, da.b_V)):
                    b[:H] = db
                a.W_O[:H] = _write(da.W_O, k, -1)
                a.b_O.copy_(_write(da.b_O, k, -1))
            if s.attn_only:
                continue
            mlp = block.mlp
            mlp.W_in.copy_(noise(*mlp.W_in.shape))  # [d_model, d_mlp]
            mlp.W_out.copy_(_perp(noise(*mlp.W_out.shape, std=write_std), k, -1))  # [d_mlp, d_model]
            mlp.b_in.zero_()
            mlp.b_out.zero_()
            if dblock is not None:
                dm, M = dblock.mlp, d.d_mlp
                mlp.W_in[:, :M] = _read(dm.W_in, k, 0) + _perp(mlp.W_in[:, :M].clone(), k, 0)
                mlp.b_in[:M] = dm.b_in
                mlp.W_out[:M] = _write(dm.W_out, k, -1)
                mlp.b_out.copy_(_write(dm.b_out, k, -1))
        student.ln_final.w.copy_(_write(donor.ln_final.w, k, -1))
        student.ln_final.b.copy_(_write(donor.ln_final.b, k, -1))
        student.unembed.W_U.copy_(_read(donor.unembed.W_U, k, 0) + _perp(noise(D, s.d_vocab), k, 0))


def seed_from_donor(model: Transformer, cfg: ExperimentConfig | None, g: torch.Generator,
                    root: str | Path | None = None, donor: DonorConfig = DONOR, noise_std: float = SEED_NOISE_STD,
                    write_std: float = SEED_WRITE_STD) -> None:
    """The ``seeded`` scheme: load the trained donor of ``cfg``'s run and embed it into ``model``."""
    if cfg is None:
        raise ConfigError(
            "the 'seeded' scheme embeds the donor trained on the run's data, so it needs the run's ExperimentConfig: "
            "call init_weights(model, 'seeded', seed, cfg, root) or build_model(cfg, root).")
    if cfg.model != model.cfg:
        raise ConfigError(f"the model ({model.cfg}) is not the run's model ({cfg.model}).")
    embed_donor(model, load_donor(cfg, root, donor), g, noise_std, write_std)


def donor_fingerprint(cfg: ExperimentConfig, root: str | Path | None = None, donor: DonorConfig = DONOR) -> str:
    """What a ``seeded`` run reads besides its own config: its seed's chosen donor (name, seed) and
    the training source recorded by that donor's run. Part of the run's training source
    (``Scheme.inputs``), so a student trained from a donor that is no longer the choice is stale."""
    choice = donor_choice(cfg, root, donor)
    done = RunPaths.of(donor_experiment(cfg, donor, choice["chosen_seed"]), root).checkpoints / "done.json"
    source = json.loads(done.read_text()).get("source", "")
    return f"{donor.name(cfg.model)}-s{choice['chosen_seed']}@{source.split('+')[0][:16]}"


@register_scheme(
    "seeded",
    "a trained donor with half the heads and width (xavier) embedded exactly into the first head "
    "slots of each layer; other readers N(0, 0.02^2), other writers N(0, 0.002^2) outside its subspace",
    inputs=donor_fingerprint,
)
def seeded(model: Transformer, cfg, g: torch.Generator, root: str | Path | None) -> None:
    seed_from_donor(model, cfg, g, root)
