"""The hand-built models really implement the mechanism their roles claim.

Every other analysis test trusts ``initmi_utils.handbuilt``; these tests check it from the
outside (patterns and predictions), so a wrong construction fails here first.
"""

import pytest
import torch

from initmi_utils.behavior import next_token_stats
from initmi_utils.handbuilt import ROLES, handbuilt_dataset, handbuilt_experiment, helmert_basis, induction_model
from initmi_utils.model import to_bridge


@pytest.fixture(scope="module", params=[True, False], ids=["attn_only", "zero_mlp"])
def built(request):
    model, roles = induction_model(attn_only=request.param)
    ds = handbuilt_dataset(handbuilt_experiment(attn_only=request.param))
    patterns = []
    with torch.no_grad():
        logits = model(ds.rep.tokens, patterns=patterns)
    return model, roles, ds, logits, patterns


def _attention(patterns, head, q, k):
    layer, h = head
    return patterns[layer][:, h, q, k].mean().item()


def test_induction_on_second_copy_only(built):
    model, roles, ds, logits, _ = built
    stats = next_token_stats(logits, ds.rep)
    assert stats["acc_induction"] > 0.99 and stats["loss_induction"] < 0.01
    R = ds.d.rep_len
    tokens = ds.rep.tokens
    first_copy_acc = (logits[:, 1:R].argmax(-1) == tokens[:, 2 : R + 1]).float().mean().item()
    assert first_copy_acc < 0.1  # nothing to copy from yet


def test_heads_attend_where_their_role_says(built):
    _, roles, ds, _, patterns = built
    R, n_pos = ds.d.rep_len, ds.rep.tokens.shape[1]
    q = torch.arange(1, n_pos)
    q2 = torch.arange(R + 2, 2 * R + 1)  # second copy, A[1:]
    assert _attention(patterns, roles.prev_token, q, q - 1) > 0.99
    assert _attention(patterns, roles.induction, q2, q2 - R + 1) > 0.99
    assert _attention(patterns, roles.duplicate, q2, q2 - R) > 0.99
    for head in roles.bos:
        assert _attention(patterns, head, q, torch.zeros_like(q)) > 0.99
    for head in roles.dummy:  # uniform causal attention
        layer, h = head
        expected = torch.tril(torch.ones(n_pos, n_pos)) / torch.arange(1, n_pos + 1)[:, None]
        assert torch.allclose(patterns[layer][:, h], expected.expand_as(patterns[layer][:, h]), atol=1e-5)


def test_prev_token_head_is_needed_for_induction(built):
    """K-composition: with L0H1's OV zeroed the induction head has nothing to match on."""
    model, roles, ds, _, _ = built
    layer, h = roles.prev_token
    broken, _ = induction_model(attn_only=model.cfg.attn_only)
    with torch.no_grad():
        broken.blocks[layer].attn.W_O[h] = 0
        stats = next_token_stats(broken(ds.rep.tokens), ds.rep)
    assert stats["acc_induction"] < 0.2


def test_patch_pairs_follow_the_copied_token(built):
    model, _, ds, _, _ = built
    p = ds.patch
    rows = torch.arange(len(p.query))
    with torch.no_grad():
        clean = model(p.clean)[rows, p.query].argmax(-1)
        corrupted = model(p.corrupted)[rows, p.query].argmax(-1)
    assert (clean == p.answer).all() and (corrupted == p.corrupt_answer).all()


def test_bridge_view_matches(built):
    model, _, ds, logits, _ = built
    with torch.no_grad():
        bridge_logits = to_bridge(model)(ds.rep.tokens)
    assert torch.allclose(bridge_logits, logits, atol=1e-3)


def test_roles_are_disjoint_and_cover_every_head():
    heads = [ROLES.prev_token, ROLES.duplicate, ROLES.induction, *ROLES.bos, *ROLES.dummy]
    assert len(set(heads)) == len(heads) == 8


def test_helmert_basis_is_orthonormal_and_centred():
    b = helmert_basis(16)
    assert torch.allclose(b @ b.T, torch.eye(15, dtype=b.dtype), atol=1e-12)
    assert torch.allclose(b.sum(1), torch.zeros(15, dtype=b.dtype), atol=1e-12)


def test_noisy_variant_keeps_the_mechanism_and_has_no_exact_zeros():
    model, roles = induction_model(noise=0.02, seed=3)
    ds = handbuilt_dataset(handbuilt_experiment(n_diagnostic=16))
    patterns = []
    with torch.no_grad():
        stats = next_token_stats(model(ds.rep.tokens, patterns=patterns), ds.rep)
    assert stats["acc_induction"] > 0.99
    assert all((p != 0).all() for n, p in model.named_parameters() if p.dim() >= 2)
    again, _ = induction_model(noise=0.02, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


@pytest.mark.parametrize("d_vocab, n_ctx, rep_len", [(16, 32, 10), (24, 64, 20)])
def test_other_sizes_keep_every_role(d_vocab, n_ctx, rep_len):
    model, roles = induction_model(d_vocab=d_vocab, n_ctx=n_ctx)
    ds = handbuilt_dataset(handbuilt_experiment(d_vocab=d_vocab, n_ctx=n_ctx, rep_len=rep_len, n_diagnostic=16))
    patterns = []
    with torch.no_grad():
        stats = next_token_stats(model(ds.rep.tokens, patterns=patterns), ds.rep)
    assert stats["acc_induction"] > 0.99
    q = torch.arange(1, ds.rep.tokens.shape[1])
    q2 = torch.arange(rep_len + 2, 2 * rep_len + 1)
    assert _attention(patterns, roles.prev_token, q, q - 1) > 0.99
    assert _attention(patterns, roles.duplicate, q2, q2 - rep_len) > 0.99
    assert _attention(patterns, roles.induction, q2, q2 - rep_len + 1) > 0.99


def test_full_ov_circuit_is_identity_only_for_the_copying_head():
    model, roles = induction_model()
    eye = torch.eye(model.cfg.d_vocab)
    for layer, block in enumerate(model.blocks):
        for head in range(model.cfg.n_heads):
            ov = model.embed.W_E @ block.attn.W_V[head] @ block.attn.W_O[head] @ model.unembed.W_U
            if (layer, head) == roles.copying:
                assert torch.allclose(ov / ov.diagonal().mean(), eye, atol=1e-5)
            else:
                assert ov.abs().max() < 1e-5
