"""The synthetic task: structure, determinism and the manifest's hash check."""

import pytest
import torch

from initmi_utils.config import data_dir
from initmi_utils.data import BOS, Dataset, load_dataset
from tests.conftest import tiny_cfg
from initmi_utils.config import experiment


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return load_dataset(experiment("quick"), tmp_path_factory.mktemp("data"))


def test_targets_are_exactly_the_copied_tokens(ds):
    tokens, target = ds.val.tokens, ds.val.target
    assert target.any(dim=1).all(), "every sequence has induction targets"
    for b in range(32):
        t = tokens[b].tolist()
        for i in torch.nonzero(target[b]).flatten().tolist():
            # token i follows an earlier occurrence of token i-1 (the "A B ... A -> B" pattern)
            assert any(t[j] == t[i - 1] and t[j + 1] == t[i] for j in range(i - 1)), (b, i)


def test_background_follows_the_bigram_chain(ds):
    tokens, target = ds.val.tokens, ds.val.target
    succ = ds.chain.successors
    allowed = (succ[tokens[:, :-1]] == tokens[:, 1:, None]).any(-1)
    # Outside the two segment copies every transition is one the chain allows; most positions are background.
    assert allowed.float().mean() > 0.5
    assert torch.all(tokens[:, 0] == BOS) and torch.all(tokens[:, 1:] != BOS)
    assert not allowed[target[:, 1:]].all(), "copied tokens are mostly not bigram successors"


def test_distractors_compete_with_the_answer(ds):
    for batch in (ds.val, ds.rep):
        mask = batch.target[:, 1:]
        answer, distractor = batch.tokens[:, 1:][mask], batch.distractor[:, 1:][mask]
        assert torch.all(distractor >= 1) and torch.all(distractor != answer)
        assert torch.all(batch.distractor[:, 1:][~mask] == -1)


def test_repeated_random_and_patch_pairs(ds):
    L = ds.d.rep_len
    rep = ds.rep.tokens
    assert torch.equal(rep[:, 1 : L + 1], rep[:, L + 1 :])
    assert all(len(set(row[1 : L + 1].tolist())) == L for row in rep)
    p = ds.patch
    diff = (p.clean != p.corrupted).sum(1)
    assert torch.all(diff == 1)
    rows = torch.arange(len(p.query))
    assert torch.equal(p.clean[rows, p.query + 1], p.answer)  # clean: the repeat continues with the answer
    first = p.query - L  # first occurrence of the query token
    assert torch.equal(p.corrupted[rows, first + 1], p.corrupt_answer)
    assert torch.equal(p.clean[rows, first + 1], p.answer)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    cfg = experiment("quick")
    a, b = load_dataset(cfg, tmp_path / "a"), load_dataset(cfg, tmp_path / "b")
    f = lambda root: (data_dir(cfg, root) / Dataset.FILE).read_bytes()  # noqa: E731
    assert f(tmp_path / "a") == f(tmp_path / "b")
    assert torch.equal(a.train_batch(5, 4).tokens, b.train_batch(5, 4).tokens)
    assert not torch.equal(a.train_batch(5, 4).tokens, a.train_batch(6, 4).tokens)
    other = load_dataset(cfg.replace(data={"seed": 1}), tmp_path / "a")
    assert not torch.equal(other.val.tokens, a.val.tokens)


def test_corrupted_data_file_is_detected(tmp_path):
    cfg = tiny_cfg()
    load_dataset(cfg, tmp_path)
    path = data_dir(cfg, tmp_path) / Dataset.FILE
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match="does not match the hash.*regenerated"):
        load_dataset(cfg, tmp_path)
