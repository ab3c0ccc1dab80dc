"""The training model and its TransformerBridge view compute the same function."""

import subprocess
import sys

import pytest
import torch

from initmi_utils.config import experiment
from initmi_utils.model import to_bridge
from initmi_utils.schemes import build_model
from tests.conftest import tiny_cfg


@pytest.mark.parametrize("scheme", ["normal", "xavier", "orthogonal"])
def test_bridge_logits_match_training_model(scheme):
    model = build_model(experiment("quick", scheme, 0))
    bridge = to_bridge(model)
    tokens = torch.randint(0, 64, (3, 64))
    with torch.no_grad():
        ours, theirs = model(tokens), bridge(tokens)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # Weights under the field's names agree too.
    for layer, block in enumerate(model.blocks):
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            assert torch.equal(getattr(bridge, name)[layer], getattr(block.attn, name).detach()), name
    assert torch.equal(bridge.W_E, model.embed.W_E.detach())
    assert torch.equal(bridge.W_U, model.unembed.W_U.detach())


def test_a_reused_bridge_computes_the_new_model_and_refuses_another_config():
    first, second = build_model(experiment("quick", "normal", 0)), build_model(experiment("quick", "orthogonal", 1))
    tokens = torch.randint(0, 64, (3, 64))
    bridge = to_bridge(first)
    with torch.no_grad():
        reused = to_bridge(second, reuse=bridge)
        assert reused is bridge
        assert torch.allclose(reused(tokens), second(tokens), atol=1e-4)
        assert not torch.allclose(reused(tokens), first(tokens), atol=1e-2)
        # Same (layer, head) weights as a fresh bridge of the second model.
        assert torch.equal(reused.W_Q, to_bridge(second).W_Q)
    with pytest.raises(ValueError, match="another model config"):
        to_bridge(build_model(tiny_cfg("normal")), reuse=bridge)


def test_no_grad_forward_in_chunks_matches_one_batch():
    # Evaluation runs in chunks of EVAL_CHUNK sequences; logits and patterns must be those of one batch.
    from initmi_utils.model import EVAL_CHUNK

    model = build_model(experiment("quick", "xavier", 0))
    tokens = torch.randint(0, 64, (2 * EVAL_CHUNK + 5, 40))
    whole_patterns, chunked_patterns = [], []
    whole = model(tokens, whole_patterns)  # with gradients: one batch
    with torch.no_grad():
        chunked = model(tokens, chunked_patterns)
    torch.testing.assert_close(chunked, whole.detach(), atol=1e-5, rtol=1e-5)
    assert len(chunked_patterns) == len(whole_patterns) == model.cfg.n_layers
    for a, b in zip(chunked_patterns, whole_patterns):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-5)


def test_attn_only_bridge_matches():
    model = build_model(tiny_cfg("kaiming", model={"attn_only": True}))
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model(tokens), to_bridge(model)(tokens), atol=1e-5)


def test_explicit_patterns_match_bridge_hook_pattern():
    model = build_model(experiment("quick", "xavier", 1))
    tokens = torch.randint(0, 64, (2, 40))
    patterns = []
    with torch.no_grad():
        fast, slow = model(tokens), model(tokens, patterns)
        _, cache = to_bridge(model).run_with_cache(tokens)
    assert torch.allclose(fast, slow, atol=1e-5)
    for layer, p in enumerate(patterns):
        assert torch.allclose(p, cache[f"blocks.{layer}.attn.hook_pattern"], atol=1e-5)
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]))
        assert torch.all(p.triu(1) == 0)  # causal


def test_building_a_bridge_leaves_the_global_rng_alone():
    model = build_model(tiny_cfg())
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    to_bridge(model)
    assert torch.equal(torch.rand(3), expected)


def test_too_long_input_is_refused():
    model = build_model(tiny_cfg())
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        model(torch.zeros(1, model.cfg.n_ctx + 1, dtype=torch.long))


# A training step's allocation pattern without torch: blocks of 2-16 MB (activations and their
# gradients), 120 MB live, freed at the end of the step. Through malloc directly, because the
# count then depends on glibc's policy alone; a torch step's faults also depend on the kernel's
# transparent huge pages and on torch's own allocations (CI once measured 4097 with the settings
# against 3040 without, on such a probe).
_FAULTS = """
import ctypes, resource, sys
import initmi_utils.model
if sys.argv[1] == "keep":
    assert initmi_utils.model.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
sizes = [(16 << 20), (8 << 20), (2 << 20), (4 << 20)] * 4
def step():
    blocks = [libc.malloc(size) for size in sizes]
    for block, size in zip(blocks, sizes):
        libc.memset(block, 1, size)
    for block in reversed(blocks):
        libc.free(block)
for _ in range(3):  # the heap reaches its working size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_activation_page_faults_and_importing_changes_nothing():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    tuned, imported = faults("keep"), faults("import-only")
    # glibc's defaults unmap the 16 MB blocks and trim the freed heap top: every step faults its
    # memory back in (~27,000 faults per step measured). Kept memory is reused: 0 measured.
    # Importing the package alone must leave glibc's policy as it is (no side effects at import).
    assert tuned * 10 < imported, (tuned, imported)
