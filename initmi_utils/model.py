"""The model, in two views of the same weights.

- ``Transformer``: a plain-PyTorch pre-LN decoder used for *training*. Its parameters carry the
  names the field writes (``blocks.0.attn.W_Q`` of shape ``[head, d_model, d_head]``, ``embed.W_E``,
  ``unembed.W_U`` …, the HookedTransformer state-dict layout), it fuses Q/K/V into one matmul and
  uses ``F.scaled_dot_product_attention``, and it has no hook points: a training step pays for
  arithmetic only.
- ``to_bridge(model)``: the same weights inside TransformerLens 4.x's
  ``TransformerBridge.boot_native`` model, for *analysis* through its standard hook names
  (``blocks.{l}.attn.hook_pattern``, ``run_with_cache``, ``W_Q`` … ``W_U``). Tests prove that both
  views give the same logits and gradients.

Parameters are created as NaN: an init scheme that forgets one is caught by the finite check in
``schemes.init_weights`` instead of training on uninitialised memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from initmi_utils.config import ModelConfig

LN_EPS = 1e-5  # TransformerBridgeConfig's default eps; the bridge view must match it
EVAL_CHUNK = 32  # sequences per forward pass when no gradient is needed (see Transformer.forward)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.full(shape, float("nan")))


class LayerNorm(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.w = _param(d_model)
        self.b = _param(d_model)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return F.layer_norm(x, (x.shape[-1],), self.w, self.b, LN_EPS)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, m, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q, self.W_K, self.W_V = _param(h, m, e), _param(h, m, e), _param(h, m, e)
        self.b_Q, self.b_K, self.b_V = _param(h, e), _param(h, e), _param(h, e)
        self.W_O = _param(h, e, m)
        self.b_O = _param(m)

    def forward(self, x: Float[Tensor, "batch pos d_model"], patterns: list | None = None) -> Float[Tensor, "batch pos d_model"]:
        """``patterns``: if a list, the attention pattern ``[batch, head, q, k]`` is appended to it
        (computed explicitly; the fast path never materialises it)."""
        batch, pos, d_model = x.shape
        n_heads, _, d_head = self.W_Q.shape
        # One fused matmul for Q, K and V: [d_model, 3 * head * d_head].
        w_qkv = torch.cat([self.W_Q, self.W_K, self.W_V], dim=0).permute(1, 0, 2).reshape(d_model, -1)
        b_qkv = torch.cat([self.b_Q, self.b_K, self.b_V], dim=0).reshape(-1)
        qkv = torch.addmm(b_qkv, x.reshape(-1, d_model), w_qkv)
        q, k, v = qkv.view(batch, pos, 3 * n_heads, d_head).transpose(1, 2).split(n_heads, dim=1)
        if patterns is None:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(d_head)
        else:
            scores = q @ k.transpose(-2, -1) / d_head**0.5
            causal = torch.ones(pos, pos, dtype=torch.bool, device=x.device).triu(1)
            pattern = scores.masked_fill(causal, float("-inf")).softmax(-1)
            patterns.append(pattern)
            z = pattern @ v
        z = z.transpose(1, 2).reshape(-1, n_heads * d_head)
        out = torch.addmm(self.b_O, z, self.W_O.reshape(n_heads * d_head, d_model))
        return out.view(batch, pos, d_model)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in, self.b_in = _param(cfg.d_model, cfg.d_mlp), _param(cfg.d_mlp)
        self.W_out, self.b_out = _param(cfg.d_mlp, cfg.d_model), _param(cfg.d_model)
        self.act = F.gelu if cfg.act_fn == "gelu" else F.relu

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.act(x @ self.W_in + self.b_in) @ self.W_out + self.b_out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        if not cfg.attn_only:
            self.ln2 = LayerNorm(cfg.d_model)
            self.mlp = MLP(cfg)

    def forward(self, x: Float[Tensor, "batch pos d_model"], patterns: list | None = None) -> Float[Tensor, "batch pos d_model"]:
        x = x + self.attn(self.ln1(x), patterns)
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.ln2(x))
        return x


class Embed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_E = _param(cfg.d_vocab, cfg.d_model)


class PosEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_pos = _param(cfg.n_ctx, cfg.d_model)


class Unembed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_U = _param(cfg.d_model, cfg.d_vocab)


class Transformer(nn.Module):
    """Decoder-only, pre-LN, learned positions, no unembedding bias (as the native bridge model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.pos_embed = PosEmbed(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = LayerNorm(cfg.d_model)
        self.unembed = Unembed(cfg)

    def forward(self, tokens: Int[Tensor, "batch pos"], patterns: list | None = None) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits. Pass ``patterns=[]`` to also collect each layer's ``[batch, head, q, k]`` pattern.

        Without gradients (evaluation, analyses) a large batch runs in chunks of ``EVAL_CHUNK``
        sequences: the activations of a chunk stay in cache, which halves the time of a
        512 x 64-token validation forward on CPU (``benchmarks/README.md``). Rows are independent,
        so the result is the same up to float rounding of the matmuls.
        """
        if tokens.shape[-1] > self.cfg.n_ctx:
            raise ValueError(f"sequence of {tokens.shape[-1]} tokens exceeds n_ctx={self.cfg.n_ctx}.")
        if tokens.ndim == 2 and tokens.shape[0] > EVAL_CHUNK and not torch.is_grad_enabled():
            chunks = tokens.split(EVAL_CHUNK)
            per_chunk: list[list | None] = [[] if patterns is not None else None for _ in chunks]
            logits = torch.cat([self._logits(c, p) for c, p in zip(chunks, per_chunk)])
            if patterns is not None:
                patterns.extend(torch.cat(layer) for layer in zip(*per_chunk))
            return logits
        return self._logits(tokens, patterns)

    def _logits(self, tokens: Int[Tensor, "batch pos"], patterns: list | None) -> Float[Tensor, "batch pos d_vocab"]:
        x = self.embed.W_E[tokens] + self.pos_embed.W_pos[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x, patterns)
        return self.ln_final(x) @ self.unembed.W_U


def loss_fn(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """Mean next-token cross-entropy over all positions."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------
# The TransformerBridge view.


def bridge_config(cfg: ModelConfig):
    from transformer_lens.config import TransformerBridgeConfig

    return TransformerBridgeConfig(
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        n_layers=cfg.n_layers,
        n_ctx=cfg.n_ctx,
        n_heads=cfg.n_heads,
        d_vocab=cfg.d_vocab,
        d_mlp=cfg.d_mlp,
        act_fn=cfg.act_fn,
        attn_only=cfg.attn_only,
        normalization_type="LN",
        eps=LN_EPS,
        architecture="TransformerLensNative",
        init_weights=False,  # our schemes own the weights; see to_bridge
    )


def native_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our weights in the native bridge module's layout (nn.Linear stores ``[out, in]``)."""
    cfg = model.cfg
    sd = {
        "tok_embed.weight": model.embed.W_E,
        "pos.weight": model.pos_embed.W_pos,
        "ln_out.weight": model.ln_final.w,
        "ln_out.bias": model.ln_final.b,
        "head.weight": model.unembed.W_U.T,
    }
    for layer, block in enumerate(model.blocks):
        p, a = f"layers.{layer}.", block.attn
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = block.ln1.w, block.ln1.b
        for name, W, b in (("q", a.W_Q, a.b_Q), ("k", a.W_K, a.b_K), ("v", a.W_V, a.b_V)):
            sd[p + f"attn.{name}.weight"] = W.permute(0, 2, 1).reshape(-1, cfg.d_model)
            sd[p + f"attn.{name}.bias"] = b.reshape(-1)
        sd[p + "attn.o.weight"] = a.W_O.reshape(-1, cfg.d_model).T
        sd[p + "attn.o.bias"] = a.b_O
        if not cfg.attn_only:
            sd[p + "ln2.weight"], sd[p + "ln2.bias"] = block.ln2.w, block.ln2.b
            sd[p + "mlp.fc_in.weight"], sd[p + "mlp.fc_in.bias"] = block.mlp.W_in.T, block.mlp.b_in
            sd[p + "mlp.fc_out.weight"], sd[p + "mlp.fc_out.bias"] = block.mlp.W_out.T, block.mlp.b_out
    return sd


def to_bridge(model: Transformer, reuse=None):
    """A ``TransformerBridge`` (TL 4.x, ``boot_native``) computing exactly ``model``'s function.

    The bridge gets a copy of the weights: training ``model`` afterwards does not move it.
    ``reuse``: a bridge from an earlier call for a model of the same config; its weights are
    overwritten and it is returned. Building a bridge costs ~0.13 s (hook registry, component
    wrapping), more than the analyses of one small checkpoint, so a loop over checkpoints passes
    its last bridge back in (``bridge = to_bridge(model, bridge)``). A reused bridge is the
    same object: an earlier checkpoint's view does not survive.
    """
    if reuse is not None and _bridge_model_config(reuse) != model.cfg:
        raise ValueError("to_bridge(model, reuse): the bridge to reuse was built for another model config.")
    bridge = reuse if reuse is not None else _new_bridge(model)
    params = {
        name.replace("._original_component", ""): p for name, p in bridge.original_model.named_parameters()
    }
    ours = native_state_dict(model)
    if set(params) != set(ours):
        raise RuntimeError(
            "the TransformerBridge native layout changed: "
            f"missing {sorted(set(params) - set(ours))}, unexpected {sorted(set(ours) - set(params))}."
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ours[name])
    bridge.eval()
    return bridge


def _new_bridge(model: Transformer):
    from transformer_lens.model_bridge import TransformerBridge

    # init_weights=False leaves nn.Linear's default init, which draws from the global RNG; fork
    # it so building an analysis view never changes what a caller's torch.rand returns next.
    with torch.random.fork_rng(devices=[]):
        # TL's config defaults to CUDA when present; keep the bridge on the model's device.
        bridge = TransformerBridge.boot_native(bridge_config(model.cfg), device=next(model.parameters()).device)
    bridge._initmi_model_config = model.cfg
    return bridge


def _bridge_model_config(bridge) -> ModelConfig | None:
    return getattr(bridge, "_initmi_model_config", None)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counted analytically.

    Forward per token: 2 * (matmul params) for every weight matrix (QKV, O, MLP in/out, unembed)
    plus attention's 2 * 2 * seq_len * d_model (scores and the weighted sum, causal mask not
    discounted, as Kaplan et al.).
    """
    d, L = cfg.d_model, cfg.n_layers
    per_layer = 4 * d * d + (0 if cfg.attn_only else 2 * d * cfg.d_mlp)
    fwd = 2 * (L * per_layer + d * cfg.d_vocab) + L * 4 * seq_len * d
    return 3.0 * fwd


@contextlib.contextmanager
def torch_threads(n: int):
    """Temporarily set torch's intra-op threads (0 = leave as is)."""
    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Tell glibc to reuse freed activation memory instead of returning it to the kernel.

    A training step allocates and frees activations of 1-8 MB (``[batch, pos, d_mlp]``
    floats). With glibc's defaults such blocks are ``mmap``-ed and unmapped, or trimmed off the
    heap top, so the next step page-faults them back in, zero-filled: 2,000-3,500 minor faults
    per batch-64 training step and 7,000-18,000 per ``train.evaluate``, measured. Serving blocks
    up to 32 MB from the heap and never trimming it leaves ~100 faults per step; how many faults
    remain with glibc's defaults depends on the machine (kernel huge pages, glibc's dynamic mmap
    threshold), so ``tests/test_model.py`` checks the policy itself on a step's allocation pattern
    through ``malloc``: 0 faults against ~27,000 per step. Step time relative to a 2048^3 matmul
    timed in the same process, alternating processes on a quiet machine: batch 32 (the presets')
    0.60 vs 0.68 without, batch 64 1.24 vs 1.27 (``benchmarks/README.md``). The price is that the
    process keeps its peak heap. Returns whether glibc took the settings (``False`` on other C
    libraries, where nothing is changed, and with ``INITMI_MALLOC=default``). Called where
    training starts (``train.train``, the pipeline's kernels, the benchmarks), never at import.
    """
    if os.environ.get("INITMI_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 << 20),  # glibc's maximum; larger blocks are still mmap-ed
        (_M_TRIM_THRESHOLD, 1 << 30),
        (_M_TOP_PAD, 64 << 20),
    ))
