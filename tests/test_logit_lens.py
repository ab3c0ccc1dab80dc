"""The logit lens on the hand-built induction model: the answer appears only after the last layer."""

import math

import pytest
import torch

from initmi_utils.handbuilt import ROLES, handbuilt_dataset, handbuilt_experiment, induction_model
from initmi_utils.logit_lens import correct_token_stats, hook_names, lens_batch, logit_lens_table
from initmi_utils.model import to_bridge


def _lens(model, ds, **kw):
    batch = lens_batch(ds, **kw)
    names = hook_names(model.cfg.n_layers)
    with torch.no_grad():
        logits, cache = to_bridge(model).run_with_cache(batch.tokens, names_filter=lambda n: n in names)
    return batch, logits, logit_lens_table(cache, batch)


@pytest.fixture(scope="module")
def ds():
    return handbuilt_dataset(handbuilt_experiment())


@pytest.fixture(scope="module")
def built(ds):
    model, _ = induction_model()
    return (model, *_lens(model, ds))


def _metric(df, metric, dataset, position_type):
    sel = df[(df.metric == metric) & (df.dataset == dataset) & (df.position_type == position_type)]
    return sel.set_index("layer").value


def test_rank1_only_after_the_last_layer_at_induction_positions(built):
    model, _, _, df = built
    last = model.cfg.n_layers - 1
    top1 = _metric(df, "correct_top1", "rep", "induction")
    rank = _metric(df, "correct_rank", "rep", "induction")
    assert list(top1.index) == list(range(-1, last + 1))  # embedding, then after every layer
    assert top1[last] > 0.99 and rank[last] == pytest.approx(1.0, abs=0.01)
    for layer in range(-1, last):  # before the induction head writes, nothing knows the answer
        assert top1[layer] < 0.2 and rank[layer] > 5
    assert _metric(df, "first_rank1_layer", "rep", "induction").item() == last
    assert _metric(df, "first_rank1_layer", "val", "induction").item() == last
    prob = _metric(df, "correct_prob", "rep", "induction")
    assert prob[last] > 0.99 and prob[last - 1] < 0.1


def test_last_lens_layer_reproduces_the_models_own_predictions(built):
    _, batch, logits, df = built
    mask = batch.masks[("rep", "induction")]
    p = logits.softmax(-1).gather(-1, batch.next_tokens[..., None])[..., 0]
    last = _metric(df, "correct_prob", "rep", "induction").iloc[-1]
    assert last == pytest.approx(p[mask].mean().item(), rel=1e-4)


def test_lens_never_finds_rank1_when_the_prev_token_head_is_broken(ds):
    """Without L0H1's OV the induction head has nothing to match: no layer predicts the answer."""
    model, _ = induction_model()
    L, H = ROLES.prev_token
    with torch.no_grad():
        model.blocks[L].attn.W_O[H].zero_()
    _, _, df = _lens(model, ds)
    assert math.isnan(_metric(df, "first_rank1_layer", "rep", "induction").item())
    assert _metric(df, "correct_top1", "rep", "induction").max() < 0.5


def test_ties_are_not_rank_1():
    """An unembedding that reads nothing gives equal logits: the correct token is not the argmax."""
    logits = torch.zeros(1, 2, 3, 7)
    nxt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    s = correct_token_stats(logits, nxt)
    assert (s["rank"] == 7).all() and (s["top1"] == 0).all() and torch.allclose(s["prob"], torch.full_like(s["prob"], 1 / 7))
    logits[0, 1, 2, 6] = 1.0
    assert correct_token_stats(logits, nxt)["rank"][0, 1, 2].item() == 1


def test_masks_align_predictions_with_targets(ds):
    """Position j predicts token j + 1: the rep mask covers the logits that predict A[1:] of the second copy."""
    R = ds.d.rep_len
    batch = lens_batch(ds, n_val=5, n_rep=3)
    rep = batch.masks[("rep", "induction")]
    assert rep[:5].sum() == 0  # val rows
    assert rep[5:].sum(0).nonzero().flatten().tolist() == list(range(R + 1, 2 * R))
    assert torch.equal(batch.next_tokens[5:, R + 1 : 2 * R], ds.rep.tokens[:3, R + 2 : 2 * R + 1])
    val_ind, val_bg = batch.masks[("val", "induction")], batch.masks[("val", "background")]
    assert not (val_ind & val_bg).any() and val_ind[:5].sum() == ds.val.target[:5, 1:].sum()
    assert (val_ind | val_bg)[:5, : ds.val.tokens.shape[1] - 1].all()
    with pytest.raises(ValueError, match="at least one sequence"):
        lens_batch(ds, n_val=0)
