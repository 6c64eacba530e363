"""Attention for small problems on CPU: three batched products instead of PyTorch's flash kernel.

transformers' `sdpa` attention calls `torch.nn.functional.scaled_dot_product_attention`, whose CPU kernel works
in blocks with a per-block product as deep as the head dimension. With small heads (stories260K: 8 dims) and short
sequences that kernel spends most of its time in per-block overhead: at the benchmark's DPO shapes (8 rows of 90
tokens, 8 query heads on 4 key/value heads) a layer's attention takes 1.7 ms forward and 4.5 ms forward + backward,
against 1.0 and 1.7 ms here (`bench/bench_attention.py`, bench/README.md). `small_attention_forward` runs

    scores = Q Kᵀ (the G query heads of a key/value head stacked as one matrix, no copy of K or V per head)
    probs  = softmax(scale · scores + mask)
    out    = probs V

when the score tensor is small (at most `SMALL_ATTENTION_SCORES` entries, 4 MB) and the heads are at most
`SMALL_ATTENTION_HEAD_DIM` deep, in float32 on CPU outside autocast, without attention dropout in training and
without the extras some models pass (soft-capping, sinks, position bias); every other call goes to transformers'
`sdpa_attention_forward` unchanged. It computes the same function to float rounding (~1e-6; tested against SDPA
with padding, custom 4D masks, grouped-query heads, gradients and several model families). One difference nobody
reads: a query that may attend to no key (a padding position) gets the mean of the values, where SDPA with a bool
mask gives 0. Score-sized buffers are kept in a small pool (at most 16, each at most 4 MB) and reused.

`use_small_attention(model)` switches a loaded model whose attention is `sdpa` to it (under the name
`rlhfkit_sdpa`, with SDPA's mask builder). The switch is not saved: `save_pretrained` writes no attention
implementation, so a saved model loads with the default anywhere.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from rlhfkit.data.collate import additive_mask

NAME = "rlhfkit_sdpa"
SMALL_ATTENTION_SCORES = 2 ** 20
"""Largest batch x heads x queries x keys handled by the plain products; larger calls take SDPA's kernel, which
never holds a head's whole score matrix (at 8 x 8 heads x 300 x 300 both take the same time, at 4 x 12 x 512 x 512
the plain products are 2x slower)."""
SMALL_ATTENTION_HEAD_DIM = 32
"""Largest head dimension handled by the plain products: forward + backward at 8 x 8 heads x 90 tokens they are
1.7x faster than SDPA at 16 dims, 1.5x at 32 and 1.08x at 64 (GPT-2's, left to SDPA)."""

NARROW_COLUMNS = 8
"""Products whose result has at most this many columns (a head dimension) run transposed (`_narrow_bmm`)."""

_EXTRAS = ("softcap", "position_bias", "s_aux", "sinks")


def small_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (B, H, Lq, D), key/value (B, Hkv, Lk, D), mask (B or 1, 1, Lq, Lk)
    bool (True: attend) or additive float, or None (causal, or none at all). Returns ((B, Lq, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if (query.device.type != "cpu" or torch.is_autocast_enabled("cpu") or query.dtype != torch.float32
            or key.dtype != query.dtype or value.dtype != query.dtype
            or (dropout and module.training) or H % Hkv or key.shape[0] != B
            or value.shape[0] != B or D > SMALL_ATTENTION_HEAD_DIM
            or B * H * Lq * Lk > SMALL_ATTENTION_SCORES
            or any(kwargs.get(k) is not None for k in _EXTRAS)
            or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    G = H // Hkv  # query head h uses key/value head h // G (transformers' repeat_kv order)
    scale = D ** -0.5 if scaling is None else scaling
    mask = attention_mask
    if mask is not None:
        mask = mask[..., :Lk]  # (a static cache's mask may cover more slots)
        if mask.dtype == torch.bool:
            mask = additive_mask(mask, query.dtype)
    elif Lq > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        # as transformers' sdpa: without a mask, causal attention is aligned at the first key (the only case is a
        # prefill into an empty static cache, whose extra slots are unused)
        key, value, Lk = key[:, :, :Lq], value[:, :, :Lq], Lq
        mask = additive_mask(torch.ones(Lq, Lq, dtype=torch.bool, device=query.device).tril(), query.dtype)
    q = query.reshape(B * Hkv, G * Lq, D)  # the G query heads of a key/value head as one matrix
    k, v = key.reshape(B * Hkv, Lk, D), value.reshape(B * Hkv, Lk, value.shape[-1])
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = _Attention.apply(q, k, v, mask, scale, (B, H, Lq, Lk))
    else:
        probs = _probs(q * scale, k, mask, (B, H, Lq, Lk))
        out = _narrow_bmm(probs, v)
        _POOL.give(probs)
    # out (B*Hkv, G*Lq, Dv) -> (B, Lq, Hkv, G, Dv) -> (B, Lq, H, Dv)
    return out.unflatten(0, (B, Hkv)).unflatten(2, (G, Lq)).permute(0, 3, 1, 2, 4).reshape(B, Lq, H, -1), None


def _narrow_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a result (batch, rows, n) with few columns n (a head dimension): up to NARROW_COLUMNS columns it is
    computed transposed, (bᵀ aᵀ)ᵀ, a (batch, n, rows) product that is 3x faster at n = 8 (bench/README.md); the
    result is then a transposed view."""
    if b.shape[-1] <= NARROW_COLUMNS:
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(a, b)


class _Pool:
    """Freed score-sized buffers, kept for the next call. Multi-MB tensors allocated and freed at every layer would
    otherwise come from fresh pages each time (glibc maps them, or trims its heap after a backward frees them):
    thousands of page faults per training step that cost more than the products (bench/README.md)."""

    def __init__(self, keep: int = 16):
        self.free: list[torch.Tensor] = []  # flat buffers
        self.keep = keep

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        inference = torch.is_inference_mode_enabled()  # an inference tensor can only be written in that mode
        fits = [i for i, b in enumerate(self.free) if b.numel() >= n and b.dtype == like.dtype
                and b.device == like.device and b.is_inference() == inference]
        if not fits:
            return torch.empty(n, dtype=like.dtype, device=like.device).view(shape)
        best = min(fits, key=lambda i: self.free[i].numel())
        return self.free.pop(best)[:n].view(shape)

    def give(self, t: torch.Tensor) -> None:
        flat = (t._base if t._base is not None else t).view(-1)  # (a saved tensor may come back without its base)
        if len(self.free) >= self.keep:  # keep the largest
            smallest = min(range(len(self.free)), key=lambda i: self.free[i].numel())
            if self.free[smallest].numel() >= flat.numel():
                return
            self.free.pop(smallest)
        self.free.append(flat)


_POOL = _Pool()


def _probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, dims: tuple[int, int, int, int]
           ) -> torch.Tensor:
    """softmax(q kᵀ + mask) for q (B*Hkv, G*Lq, D) already scaled, in a buffer of the pool."""
    B, H, Lq, Lk = dims
    scores = _POOL.take((q.shape[0], q.shape[1], Lk), q)
    torch.bmm(q, k.transpose(1, 2), out=scores)
    if mask is not None:
        scores.view(B, H, Lq, Lk).add_(mask)  # broadcast over heads
    probs = _POOL.take(scores.shape, q)
    torch.ops.aten._softmax.out(scores, -1, False, out=probs)
    _POOL.give(scores)
    return probs


class _Attention(torch.autograd.Function):
    """out = softmax(scale q kᵀ + mask) v with the score-sized tensors (probabilities, their gradient) in pool
    buffers; backward: dv = pᵀ g, dp = g vᵀ, ds = p (dp - rowsum(g * out)), dq = scale ds k, dk = scale dsᵀ q (the
    products with head-dimension columns through _narrow_bmm)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, dims):
        qs = q * scale
        probs = _probs(qs, k, mask, dims)
        out = _narrow_bmm(probs, v)
        ctx.save_for_backward(qs, k, v, probs, out)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        qs, k, v, probs, out = ctx.saved_tensors
        dv = _narrow_bmm(probs.transpose(1, 2), grad)
        ds = _POOL.take(probs.shape, probs)
        torch.bmm(grad, v.transpose(1, 2), out=ds)
        ds.sub_((grad * out).sum(-1, keepdim=True)).mul_(probs)
        _POOL.give(probs)
        dq = _narrow_bmm(ds, k).mul_(ctx.scale)
        dk = _narrow_bmm(ds.transpose(1, 2), qs)
        _POOL.give(ds)
        return dq, dk, dv, None, None, None


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, small_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_small_attention(model: torch.nn.Module) -> bool:
    """Switch `model` (and its sub-models) from `sdpa` to `rlhfkit_sdpa` attention; False when its attention is
    something else (eager, flash, a custom kernel) or it cannot switch, which leaves it unchanged."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    try:
        _register()
        model.set_attn_implementation(NAME)
    except (ImportError, ValueError, AttributeError, TypeError):
        return False
    return config._attn_implementation == NAME
