"""Typed, frozen experiment configuration.

One tree: ``ExperimentConfig(model, data, train, run)``. Every node is a frozen dataclass with
``to_dict``/``from_dict``; derived values (``d_head``, the run's name) are properties, never
defaults computed from another field. Seeds are separate on purpose:

- ``run.seed`` is the *init* seed: a scheme's weights depend only on (scheme, run.seed);
- ``data.seed`` fixes the synthetic data *and* the order batches are drawn in, so two seeds of
  one scheme see exactly the same batches and differ only in their initial weights.

Presets (``smoke``, ``quick``, ``full``; ``quick4`` and ``full4`` with 4 layers) are functions of the
preset name only; a run is a preset plus (scheme, seed): ``experiment("quick", scheme="xavier", seed=3)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from initmi_utils import __version__


class ConfigError(ValueError):
    """A configuration that cannot describe a valid experiment (the message says how to fix it)."""


def _from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"{cls.__name__} got unknown field(s) {unknown}; valid fields are {sorted(names)}."
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            v = d[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention heads per block
    d_model: int = 128  # residual stream width; d_head = d_model // n_heads
    d_mlp: int = 512  # MLP hidden width (ignored when attn_only)
    d_vocab: int = 64  # vocabulary, token 0 is BOS
    n_ctx: int = 64  # longest sequence the model accepts
    act_fn: Literal["gelu", "relu"] = "gelu"  # MLP nonlinearity
    attn_only: bool = False  # drop the MLPs (attention-only model)

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "d_model", "d_vocab", "n_ctx", "d_mlp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"choose d_model as a multiple of n_heads (e.g. d_model={self.n_heads * 32})."
            )
        if self.act_fn not in ("gelu", "relu"):
            raise ConfigError(f"model.act_fn must be 'gelu' or 'relu', got {self.act_fn!r}.")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0  # fixes the bigram chain, every data set and the batch order
    seq_len: int = 64  # tokens per training sequence, BOS included
    n_successors: int = 4  # each token's background successors (sparse bigram chain)
    segment_min: int = 8  # shortest repeated segment
    segment_max: int = 16  # longest repeated segment
    n_val: int = 512  # validation sequences from the training distribution
    rep_len: int = 24  # length of the random block in BOS + block + block
    n_diagnostic: int = 256  # sequences in each diagnostic set


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000  # optimizer steps
    batch_size: int = 32  # sequences per step
    lr: float = 1e-3  # peak AdamW learning rate
    warmup_steps: int = 100  # linear warm-up, then constant
    weight_decay: float = 0.01  # AdamW decoupled weight decay (matrices only)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    grad_clip: float = 1.0  # global grad-norm clip
    eval_every: int = 50  # steps between evaluations
    ckpt_every: int = 250  # regular checkpoints, on top of the log-spaced ones
    n_log_ckpts: int = 12  # log-spaced checkpoints between step 1 and the end
    emergence_threshold: float = 0.8  # induction accuracy on unambiguous targets that counts as "emerged"
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    donor_steps: int = 0  # steps of the `seeded` scheme's smaller donor; 0 = steps
    donor_lr: float = 3e-3  # the donor's lr (0 = lr): at 3e-3 the d64 donor emerges ~1300, at 1e-3 ~2600
    stop_after_emergence: int = -1  # >= 0: end this many steps after induction emerges (donors); -1 = all steps
    loss_ladder: tuple[float, ...] = ()  # val-loss levels: the first step at or below each gets a checkpoint
    induction_loss_ladder: tuple[float, ...] = ()  # the same for the loss on induction targets
    ladder_sequences: int = 128  # the fixed validation subset (its first sequences) the ladder is measured on

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.ckpt_every < 1:
            raise ConfigError("train.steps, batch_size, eval_every and ckpt_every must be >= 1.")
        if not 0 < self.emergence_threshold <= 1:
            raise ConfigError("train.emergence_threshold must lie in (0, 1].")
        if self.stop_after_emergence < -1:
            raise ConfigError("train.stop_after_emergence must be -1 (train every step) or >= 0.")
        if self.ladder_sequences < 1 or any(level <= 0 for level in self.loss_ladder + self.induction_loss_ladder):
            raise ConfigError("train.ladder_sequences must be >= 1 and every loss-ladder level > 0 (nats).")
        if self.lr <= 0 or self.donor_lr < 0:
            raise ConfigError(f"train.lr must be > 0 and train.donor_lr >= 0 (0 = lr); got {self.lr}, {self.donor_lr}.")


@dataclass(frozen=True)
class RunConfig:
    scheme: str = "normal"  # name in initmi_utils.schemes.SCHEMES
    seed: int = 0  # init seed
    preset: str = "quick"  # preset the run belongs to (names its folders)

    @property
    def name(self) -> str:
        return f"{self.scheme}-s{self.seed}"


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        m, d = self.model, self.data
        if d.seq_len > m.n_ctx:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is longer than model.n_ctx={m.n_ctx}; "
                f"shorten the sequences or raise n_ctx."
            )
        if 1 + 2 * d.rep_len > m.n_ctx:
            raise ConfigError(
                f"the repeated-random diagnostic needs 1 + 2*data.rep_len = {1 + 2 * d.rep_len} "
                f"tokens but model.n_ctx={m.n_ctx}; lower rep_len to {(m.n_ctx - 1) // 2} or less."
            )
        if not 2 <= d.segment_min <= d.segment_max:
            raise ConfigError("data.segment_min must be >= 2 and <= data.segment_max.")
        if 1 + 2 * d.segment_max + 2 > d.seq_len:
            raise ConfigError(
                f"data.seq_len={d.seq_len} cannot hold a segment of {d.segment_max} tokens twice; "
                f"use seq_len >= {2 * d.segment_max + 3} or a shorter segment_max."
            )
        n_tokens = m.d_vocab - 1  # token 0 is BOS
        need = max(d.segment_max, d.rep_len, d.n_successors + 1)
        if n_tokens < need:
            raise ConfigError(
                f"model.d_vocab={m.d_vocab} is too small for the data: segments and repeated blocks "
                f"use distinct tokens, so the vocabulary needs at least {need + 1} tokens "
                f"(BOS included); raise d_vocab or shorten segment_max/rep_len."
            )
        if d.n_successors < 1:
            raise ConfigError("data.n_successors must be >= 1.")

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as JSON stores them
        d["version"] = __version__
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        d = {k: v for k, v in d.items() if k != "version"}
        parts = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "run": RunConfig}
        unknown = sorted(set(d) - set(parts))
        if unknown:
            raise ConfigError(f"ExperimentConfig got unknown section(s) {unknown}; valid: {sorted(parts)}.")
        return cls(**{k: _from_dict(c, d.get(k, {})) for k, c in parts.items()})

    def replace(self, **sections: dict[str, Any]) -> "ExperimentConfig":
        """A copy with some fields changed: ``cfg.replace(train={"steps": 10}, run={"seed": 1})``."""
        d = self.to_dict()
        for section, changes in sections.items():
            if section not in d or section == "version":
                raise ConfigError(f"unknown config section {section!r}; valid: model, data, train, run.")
            d[section].update(changes)
        return ExperimentConfig.from_dict(d)

    @property
    def data_hash(self) -> str:
        """Identity of the data: the data config plus the vocabulary it is drawn from."""
        key = {"data": dataclasses.asdict(self.data), "d_vocab": self.model.d_vocab}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Presets. The science sets their lengths: `full` must run long enough for the slowest scheme
# (scaled-residual emerged near step 2150 in the first measurements) to emerge or convincingly not.

# The loss ladder of the default model's presets (nats; the loss-matched comparison picks one
# level). Every level of the val-loss ladder lies below the pre-induction plateau (val loss
# 2.45-2.55 at step 1000 of quick runs that have not emerged; 2.45 at step 6000 of one that never
# did), so reaching it needs induction; the induction-loss ladder spans the plateau (4.2-4.7) to
# trained models (0.13-0.6 in the quick grid).
LOSS_LADDER = (2.3, 2.1, 1.9, 1.8, 1.75, 1.7)
INDUCTION_LOSS_LADDER = (3.0, 2.0, 1.0, 0.5, 0.3, 0.2)

PRESETS: dict[str, ExperimentConfig] = {
    # Seconds per run: a tiny model and a handful of steps; exercises every code path.
    "smoke": ExperimentConfig(
        model=ModelConfig(n_layers=2, n_heads=2, d_model=32, d_mlp=64, d_vocab=32, n_ctx=32),
        data=DataConfig(seq_len=32, segment_min=4, segment_max=8, n_val=64, rep_len=10, n_diagnostic=32),
        train=TrainConfig(steps=40, batch_size=8, warmup_steps=5, eval_every=10, ckpt_every=20, n_log_ckpts=3,
                          loss_ladder=(3.3, 3.2), induction_loss_ladder=(3.6,)),
    ),
    # Minutes per run: the default model, long enough for the fast schemes to learn induction.
    # Both share the donor (lr 3e-3, until 1000 steps after its induction emerges, at most 8000
    # steps), so the seeded quick run is a prefix of the full one.
    "quick": ExperimentConfig(train=TrainConfig(steps=1200, eval_every=50, ckpt_every=200, n_log_ckpts=8,
                                                donor_steps=8000, loss_ladder=LOSS_LADDER,
                                                induction_loss_ladder=INDUCTION_LOSS_LADDER)),
    # The study: long enough for the slow schemes.
    "full": ExperimentConfig(train=TrainConfig(steps=6000, eval_every=50, ckpt_every=250, n_log_ckpts=12,
                                               donor_steps=8000, loss_ladder=LOSS_LADDER,
                                               induction_loss_ladder=INDUCTION_LOSS_LADDER)),
}


def deeper(cfg: ExperimentConfig, n_layers: int = 4) -> ExperimentConfig:
    """``cfg`` with ``n_layers`` transformer blocks, everything else unchanged."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=n_layers))


# The default runs with 4 layers, to speak about depth: with 2 layers "grows with depth" is one
# comparison (layer 0 vs layer 1). Same width, data, schedule and loss ladders as quick and full.
PRESETS.update(quick4=deeper(PRESETS["quick"]), full4=deeper(PRESETS["full"]))

PRESET_SEEDS: dict[str, tuple[int, ...]] = {"smoke": (0,), "quick": (0,), "full": (0, 1, 2, 3, 4),
                                            "quick4": (0,), "full4": (0, 1, 2, 3, 4)}

# Steps a run that has not emerged by its horizon (train.steps) is trained on to (``train.train``'s
# ``extend_to``): the study's emergence figure runs to 12k steps. Not part of the config, so an
# extension leaves the first train.steps steps' checkpoints byte-identical.
PRESET_EXTEND_TO: dict[str, int] = {"full": 12000, "full4": 12000}


def extend_to(preset: str, value: int = -1) -> int:
    """``value`` if it is >= 0 (0 = no extension), else the preset's ``PRESET_EXTEND_TO`` (0 if none)."""
    return int(value) if value >= 0 else PRESET_EXTEND_TO.get(preset, 0)


SCHEME_NAME = re.compile(r"[a-z][a-z0-9_]*")


def experiment(preset: str = "quick", scheme: str = "normal", seed: int = 0) -> ExperimentConfig:
    """The config of one run: a preset plus (scheme, init seed).

    The scheme name is checked for its form only (it names folders); whether a scheme of that
    name is registered is the registry's question (``schemes.check_scheme``), asked where weights
    are built, so that the config knows nothing of the schemes above it.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    if not isinstance(scheme, str) or not SCHEME_NAME.fullmatch(scheme):
        raise ConfigError(f"scheme name {scheme!r} must be lower-case letters, digits and '_', starting with a letter.")
    return dataclasses.replace(PRESETS[preset], run=RunConfig(scheme=scheme, seed=int(seed), preset=preset))


@dataclass(frozen=True)
class RunPaths:
    """Where one run's artefacts live under a project root.

    ``root/checkpoints/<preset>/<scheme>/seed<k>/`` holds weights; ``root/data/runs/...`` holds its
    tables and executed notebooks; ``root/data/synthetic/<data_hash>/`` the shared data set.
    """

    root: Path
    preset: str
    scheme: str
    seed: int

    @classmethod
    def of(cls, cfg: ExperimentConfig, root: str | Path | None = None) -> "RunPaths":
        return cls(resolve_root(root), cfg.run.preset, cfg.run.scheme, cfg.run.seed)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints" / self.preset / self.scheme / f"seed{self.seed}"

    @property
    def tables(self) -> Path:
        return self.root / "data" / "runs" / self.preset / self.scheme / f"seed{self.seed}"

    @property
    def notebooks(self) -> Path:
        return self.tables / "notebooks"

    @property
    def figures(self) -> Path:
        return self.root / "figures" / self.preset / self.scheme / f"seed{self.seed}"


def data_dir(cfg: ExperimentConfig, root: str | Path | None = None) -> Path:
    return resolve_root(root) / "data" / "synthetic" / cfg.data_hash


ROOT_ENV = "INITMI_ROOT"


def project_root() -> Path:
    """The project this package was installed from (the editable install of ``make venv``).

    Found from the package's own location, not from the working directory: a notebook run by
    papermill from any folder, or by a kernel started elsewhere, must still find the project's
    ``checkpoints/`` and ``data/``. ``$INITMI_ROOT`` overrides it (a cluster's shared folder).
    """
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / "initmi_utils").is_dir():
        return here
    raise ConfigError(
        f"initmi_utils is installed at {here}, outside a project checkout, so the project root is unknown: "
        f"pass root (papermill: -p root DIR; command line: --root DIR) or set ${ROOT_ENV}.")


def resolve_root(root: str | Path | None = None) -> Path:
    """``root`` as a path; ``None`` or ``""`` (the notebooks' default) means ``project_root()``."""
    if root is None or str(root) == "":
        return project_root()
    return Path(root)
