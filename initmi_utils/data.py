"""The synthetic induction task and its diagnostic sets.

Training sequences mix a learnable *background* with one *repeated segment*:

- the background is a sparse bigram (Markov) chain: every token has ``n_successors`` possible
  next tokens with random probabilities, so a model first learns bigram statistics;
- a segment of 8-16 distinct random tokens appears twice; inside its second occurrence every
  token after the first is predictable only by *induction* ("... A B ... A -> B").

A worked example (vocabulary 64, token 0 is BOS; ``=`` marks the segment, ``^`` the induction
targets, i.e. the positions whose token a model can predict only by copying)::

    pos    0   1   2   3   4   5   6   7   8   9  10  11  12  13  14  15  16  17
    tok  BOS  17  40   9  52   3  61  28  40  22  17  40   9  52   3  61  28  33 ...
    seg                    =   =   =   =                       =   =   =   =
                                                                   ^   ^   ^
    bigram background: 17 -> 40 -> 9 (each token has 4 allowed successors)

At position 13 the model sees 52 again and should predict 3 (position 14), then 61, then 28.
Position 13 itself is not a target: the second occurrence's first token cannot be predicted.

Diagnostic sets (all seeded by ``data.seed`` through their own ``torch.Generator``, independent
of any init seed):

- ``val``: sequences from the training distribution, with the induction-target mask;
- ``rep``: BOS + A + A with A a block of ``rep_len`` distinct random tokens (the standard
  induction-score prompt); targets are A's second copy from its second token on;
- ``patch``: clean/corrupted pairs built from ``rep``: the corrupted copy replaces A[k+1] in the
  first half by a token not in A, so at the query position (the second A[k]) induction answers
  A[k+1] on clean and the new token on corrupted;
- every target carries a *distractor*: the background chain's most likely successor of the
  current token (the second most likely where that is the answer), for a logit difference.

``load_dataset(cfg, root)`` writes all of this once to ``data/synthetic/<data_hash>/`` as
safetensors with a ``manifest.json`` (config, sha256 of the file) and checks the hash on load.
Training batches are not stored: batch ``t`` is drawn from a generator seeded by
``(data.seed, t)``, so any step's batch can be regenerated (a resumed run needs no loader
state) and the stream never repeats.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from initmi_utils.config import DataConfig, ExperimentConfig, data_dir
from initmi_utils.io import atomic_write, atomic_write_text

BOS = 0
_STREAMS = {"chain": 1, "val": 2, "rep": 3, "patch": 4, "train": 5}  # independent generator streams


def _generator(seed: int, stream: str, step: int = 0) -> torch.Generator:
    # One generator per (seed, stream, step): changing one data set never shifts another.
    return torch.Generator().manual_seed(seed * 1_000_003 + _STREAMS[stream] * 7_919 + step * 104_729)


@dataclass(frozen=True)
class Batch:
    """Tokens with their induction targets and distractors.

    ``target[b, i]`` is True when token ``i`` is an induction target, i.e. predictable from the
    logits at position ``i - 1`` only by copying; ``distractor[b, i]`` is the competing token for
    the logit difference at that target (``-1`` elsewhere).
    """

    tokens: Int[Tensor, "batch pos"]
    target: Bool[Tensor, "batch pos"]
    distractor: Int[Tensor, "batch pos"]


class BigramChain:
    """The background: ``successors[t]`` are token t's allowed next tokens, ``probs[t]`` theirs."""

    def __init__(self, d_vocab: int, n_successors: int, seed: int):
        g = _generator(seed, "chain")
        n = d_vocab - 1
        self.successors = torch.stack(
            [torch.randperm(n, generator=g)[:n_successors] + 1 for _ in range(d_vocab)]
        )  # [d_vocab, n_successors], never BOS
        weights = -torch.log(torch.rand(d_vocab, n_successors, generator=g))  # Dirichlet(1)
        probs = weights / weights.sum(-1, keepdim=True)
        order = probs.argsort(dim=-1, descending=True)  # most likely successor first
        self.successors = self.successors.gather(1, order)
        self.probs = probs.gather(1, order)
        self.cum = self.probs.cumsum(-1)

    def distractor(self, current: Tensor, answer: Tensor) -> Tensor:
        """Most likely successor of ``current``; the second most likely where that is ``answer``."""
        first, second = self.successors[current, 0], self.successors[current, 1 % self.successors.shape[1]]
        return torch.where(first == answer, second, first)


def _distinct_tokens(n_rows: int, length: int, d_vocab: int, g: torch.Generator) -> Tensor:
    """Rows of ``length`` distinct non-BOS tokens."""
    return torch.argsort(torch.rand(n_rows, d_vocab - 1, generator=g), dim=-1)[:, :length] + 1


def sample_sequences(chain: BigramChain, d: DataConfig, d_vocab: int, n: int, g: torch.Generator) -> Batch:
    """``n`` training-distribution sequences (background chain + one repeated segment)."""
    S = d.seq_len
    lengths = torch.randint(d.segment_min, d.segment_max + 1, (n,), generator=g)
    segments = _distinct_tokens(n, d.segment_max, d_vocab, g)
    u1, u2, u_chain = torch.rand(n, generator=g), torch.rand(n, generator=g), torch.rand(n, S, generator=g)
    # First start in [1, S - 2L]; second start in [p1 + L, S - L] (positions are 0-based, BOS at 0).
    p1 = 1 + (u1 * (S - 2 * lengths)).long()
    p2 = p1 + lengths + (u2 * (S - lengths - (p1 + lengths) + 1)).long()
    pos = torch.arange(S)
    off1, off2 = pos[None] - p1[:, None], pos[None] - p2[:, None]
    in1 = (off1 >= 0) & (off1 < lengths[:, None])
    in2 = (off2 >= 0) & (off2 < lengths[:, None])
    seg_tok1 = segments.gather(1, off1.clamp(0, d.segment_max - 1))
    seg_tok2 = segments.gather(1, off2.clamp(0, d.segment_max - 1))
    # The chain is sequential in position; numpy's per-call overhead is a third of torch's on
    # these [batch]-sized steps (the random draws above stay torch's, so batches are unchanged).
    cum, succ = chain.cum.numpy(), chain.successors.numpy()
    u, fixed = u_chain.numpy(), torch.where(in1, seg_tok1, seg_tok2).numpy()
    in_seg = (in1 | in2).numpy()
    tok = np.empty((n, S), dtype=np.int64)
    tok[:, 0] = BOS
    last = succ.shape[1] - 1
    for i in range(1, S):
        prev = tok[:, i - 1]
        idx = np.minimum((u[:, i, None] > cum[prev]).sum(-1), last)
        tok[:, i] = np.where(in_seg[:, i], fixed[:, i], succ[prev, idx])
    tokens = torch.from_numpy(tok)
    target = in2 & (off2 >= 1)
    return Batch(tokens, target, _distractors(chain, tokens, target))


def _distractors(chain: BigramChain, tokens: Tensor, target: Tensor) -> Tensor:
    distractor = torch.full_like(tokens, -1)
    d = chain.distractor(tokens[:, :-1], tokens[:, 1:])
    distractor[:, 1:] = torch.where(target[:, 1:], d, -1)
    return distractor


def repeated_random(chain: BigramChain, d: DataConfig, d_vocab: int, n: int, g: torch.Generator) -> Batch:
    """BOS + A + A with A ``rep_len`` distinct random tokens; targets are A's second copy from A[1]."""
    a = _distinct_tokens(n, d.rep_len, d_vocab, g)
    tokens = torch.cat([torch.full((n, 1), BOS), a, a], dim=1)
    target = torch.zeros_like(tokens, dtype=torch.bool)
    target[:, d.rep_len + 2 :] = True
    return Batch(tokens, target, _distractors(chain, tokens, target))


@dataclass(frozen=True)
class PatchPairs:
    """Clean/corrupted pairs: at ``query`` the clean answer is ``answer``, the corrupted one ``corrupt_answer``."""

    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    query: Int[Tensor, "batch"]
    answer: Int[Tensor, "batch"]
    corrupt_answer: Int[Tensor, "batch"]


def patch_pairs(d: DataConfig, d_vocab: int, n: int, g: torch.Generator) -> PatchPairs:
    a = _distinct_tokens(n, d.rep_len + 1, d_vocab, g)
    block, replacement = a[:, : d.rep_len], a[:, d.rep_len]  # replacement is not in the block
    clean = torch.cat([torch.full((n, 1), BOS), block, block], dim=1)
    k = torch.randint(0, d.rep_len - 1, (n,), generator=g)
    rows = torch.arange(n)
    corrupted = clean.clone()
    corrupted[rows, 1 + k + 1] = replacement  # first occurrence of A[k+1]
    query = 1 + d.rep_len + k  # second occurrence of A[k]
    return PatchPairs(clean, corrupted, query, block[rows, k + 1], replacement)


class Dataset:
    """The chain plus every stored evaluation set of one data config."""

    FILE = "dataset.safetensors"

    def __init__(self, cfg: ExperimentConfig, tensors: dict[str, Tensor]):
        self.cfg = cfg
        self.d, self.d_vocab = cfg.data, cfg.model.d_vocab
        self.chain = BigramChain(self.d_vocab, self.d.n_successors, self.d.seed)
        t = tensors
        self.val = Batch(t["val.tokens"], t["val.target"].bool(), t["val.distractor"])
        self.rep = Batch(t["rep.tokens"], t["rep.target"].bool(), t["rep.distractor"])
        self.patch = PatchPairs(
            t["patch.clean"], t["patch.corrupted"], t["patch.query"], t["patch.answer"], t["patch.corrupt_answer"]
        )

    @staticmethod
    def generate(cfg: ExperimentConfig) -> dict[str, Tensor]:
        d, v = cfg.data, cfg.model.d_vocab
        chain = BigramChain(v, d.n_successors, d.seed)
        val = sample_sequences(chain, d, v, d.n_val, _generator(d.seed, "val"))
        rep = repeated_random(chain, d, v, d.n_diagnostic, _generator(d.seed, "rep"))
        patch = patch_pairs(d, v, d.n_diagnostic, _generator(d.seed, "patch"))
        out = {"chain.successors": chain.successors, "chain.probs": chain.probs}
        for name, b in (("val", val), ("rep", rep)):
            out[f"{name}.tokens"], out[f"{name}.target"], out[f"{name}.distractor"] = (
                b.tokens, b.target.to(torch.uint8), b.distractor
            )
        for field in ("clean", "corrupted", "query", "answer", "corrupt_answer"):
            out[f"patch.{field}"] = getattr(patch, field)
        return {k: v.contiguous() for k, v in out.items()}

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """The batch of optimizer step ``step``: a function of (data.seed, step) only."""
        return sample_sequences(self.chain, self.d, self.d_vocab, batch_size, _generator(self.d.seed, "train", step))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_dataset(cfg: ExperimentConfig, root: str | Path | None = None) -> Dataset:
    """The data set of ``cfg.data``: generated and written on first use, hash-checked afterwards."""
    folder = data_dir(cfg, root)
    path, manifest_path = folder / Dataset.FILE, folder / "manifest.json"
    if not path.exists() or not manifest_path.exists():
        tensors = Dataset.generate(cfg)
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"data_hash": cfg.data_hash}))
        manifest = {
            "data_hash": cfg.data_hash,
            "data": cfg.to_dict()["data"],
            "d_vocab": cfg.model.d_vocab,
            "sha256": _sha256(path),
            "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
            "train_batches": "generated per step from torch.Generator seeded by (data.seed, step)",
        }
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
    manifest = json.loads(manifest_path.read_text())
    if _sha256(path) != manifest["sha256"]:
        raise RuntimeError(
            f"{path} does not match the hash in {manifest_path} (corrupted or edited); "
            f"delete the folder {folder} and it will be regenerated identically from the seed."
        )
    return Dataset(cfg, load_file(str(path)))
