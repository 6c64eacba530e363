"""Sampling completions from a causal LM: batched, left-padded, stops at EOS, returns sampling log-probs.

    samples = sample(model, tokenizer, prompt_ids, gen, seed=0)
    # Samples(prompt_ids, completion_ids, finished, logprobs)
    sample(model, tokenizer, prompt_ids, gen, seed=1, reuse=True)  # fixed weights: keep the decoder for next time

Two backends (`gen.backend`):
- `fast` (the default through `auto` for Llama / Mistral / Qwen2 / GPT-2 models, LoRA included): `FastDecoder`, a
  lean decode loop in this file on the model's own weights with a preallocated KV cache. Small models on CPU spend
  most of HF `generate()`'s time in per-step Python (modules, cache objects, mask building, logits processors);
  here a step is ~15 tensor calls per layer on prepacked weights (on CPU in float32 one TorchScript function,
  `_decode_layers`, whose projections, with the norms before them, are calls of rlhfkit's AVX2 kernel,
  `rlhfkit.kernels`), and small steps run on one thread (see `FastDecoder`). `bench/bench_rollout.py` and
  `bench/suite.py` measure it.
- `hf`: transformers `generate()`, for every other architecture (`auto` falls back to it).

Both return, per generated token, log p(token) under softmax(logits / temperature) of the *unfiltered*
distribution (temperature 0 scores at temperature 1): the quantity an RL trainer's training forward recomputes
(PITFALLS 1). top-k / top-p / min_new_tokens change what is sampled but not that score, as in TRL and
lm-human-preferences; keep them off for strictly on-policy PPO.
Left padding: prompt tokens get positions cumsum(mask) - 1 and token t of a row's completion the position
len(prompt) + t, the same positions `rlhfkit.rl.forward_logprobs` uses in training.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn.functional as F

from rlhfkit import kernels
from rlhfkit.config import GenConfig
from rlhfkit.core import gather_logprobs
from rlhfkit.data.collate import additive_mask, causal_padding_allowed, pad_sequences, position_ids_from_mask
from rlhfkit.errors import UserError

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
"""Architectures the fast decoder implements (others use HF generate)."""


@dataclass
class Samples:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    """Generated ids without padding; the last one is EOS when `finished`."""
    finished: list[bool]
    """True when the completion ended with EOS (False: it hit max_new_tokens)."""
    logprobs: list[list[float]] | None = None
    """Sampling log-prob of each completion token under softmax(logits / temperature), unfiltered."""


# ----------------------------------------------------------------------------------------------------------------
# Entry point


@torch.no_grad()
def sample(model: Any, tokenizer: Any, prompt_ids: list[list[int]], gen: GenConfig, seed: int | None = None,
           progress: Any = None, reuse: bool = False) -> Samples:
    """Sample one completion per entry of prompt_ids (repeat prompts for several samples), gen.batch_size at a time.

    With a seed the result depends only on (weights, prompts, gen, seed) and the caller's global RNG is left as it
    was; without one, sampling draws from (and advances) the global RNG.
    reuse (fast backend): keep the built decoder with the model and reuse it in the next reuse call while no weight
    has changed (`decoder_for`): for generation loops on fixed weights, which otherwise rebuild it on every call.
    """
    backend = resolve_backend(model, gen.backend)
    was_training = model.training
    model.eval()
    completions, finished, logprobs = [], [], []
    rng = torch.random.fork_rng(devices=_cuda_devices(model)) if seed is not None else contextlib.nullcontext()
    try:
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            engine = decoder_for(model, min(gen.batch_size, len(prompt_ids)), reuse) if backend == "fast" else None
            for i in range(0, len(prompt_ids), gen.batch_size):
                chunk = prompt_ids[i: i + gen.batch_size]
                if engine is not None:
                    c, f, lp = engine.generate(chunk, gen, tokenizer.eos_token_id, tokenizer.pad_token_id)
                else:
                    c, f, lp = _hf_generate(model, tokenizer, chunk, gen)
                completions += c
                finished += f
                logprobs += lp
                if progress is not None:
                    progress.update(len(chunk))
    finally:
        if was_training:
            model.train()
    return Samples(list(prompt_ids), completions, finished, logprobs)


DECODER_REUSE_MAX_BYTES = 2 ** 31
"""Largest model (weight bytes) whose folded decoder `decoder_for` keeps between `sample(reuse=True)` calls."""
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, FastDecoder)
_OPTIMIZER_STEPS = [0, None]  # torch optimizer steps taken in this process since the hook below was registered


def _count_optimizer_step(*_: Any) -> None:
    _OPTIMIZER_STEPS[0] += 1


def decoder_for(model: Any, batch: int, reuse: bool = False) -> FastDecoder:
    """A FastDecoder for model. reuse=False: a new one, kept nowhere. reuse=True: the one a previous reuse call
    kept, if the key below is unchanged, else a new one, kept for the next call.

    Building folds and prepacks every weight matrix: a fifth to a third of a short `sample()` call on the
    benchmark's GPT-2 (18-20 ms of a 60-90 ms call for 8 x 32 tokens, by host; mostly reorders into fresh memory),
    paid again by every call of a generation loop on fixed weights. The key is each parameter's address and version
    counter (a new tensor, .to(), load_state_dict, copy_ or any in-place torch op changes it) and, for a model with
    trainable weights, the number of torch optimizer steps taken in the process (fused AdamW updates weights without
    bumping their version counters; a frozen model, such as the RL trainers' reference (`rl.frozen_decoder`), is not
    rebuilt by the policy's steps). Changes made through `.data` are not seen: reuse is a promise by the caller that
    it makes none. Models with PEFT LoRA layers (an adapter can be switched off without a weight changing) and those
    above DECODER_REUSE_MAX_BYTES are never kept. A kept decoder holds one folded copy of the weights and the KV
    buffers of its last call while the model lives, and serves one call at a time (not for sample() calls from
    several threads at once)."""
    if not reuse:
        return FastDecoder(model, batch)
    params = list(model.parameters())
    if (sum(p.numel() * p.element_size() for p in params) > DECODER_REUSE_MAX_BYTES
            or any(hasattr(m, "base_layer") for m in model.modules())):
        _DECODERS.pop(model, None)
        return FastDecoder(model, batch)
    trainable = any(p.requires_grad for p in params)
    if trainable and _OPTIMIZER_STEPS[1] is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _OPTIMIZER_STEPS[1] = register_optimizer_step_post_hook(_count_optimizer_step)
    key = (batch, _OPTIMIZER_STEPS[0] if trainable else -1, tuple((p.data_ptr(), p._version) for p in params))
    hit = _DECODERS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    _DECODERS.pop(model, None)  # the stale copy goes before the new one is built
    engine = FastDecoder(model, batch)
    _DECODERS[model] = (key, engine)
    return engine


def forget_decoder(model: Any) -> None:
    """Drop the decoder `decoder_for` keeps for model (e.g. after a rollout sampled in chunks, before the update
    changes the weights: no copy is held through the training step)."""
    _DECODERS.pop(model, None)


def resolve_backend(model: Any, backend: str) -> str:
    """"fast" or "hf" for gen.backend auto/fast/hf; a UserError when fast is asked for an unsupported model."""
    if backend == "hf":
        return "hf"
    if backend == "vllm":  # an engine that lives across updates: rlhfkit.vllm_rollout, built by the RL trainers
        raise UserError("gen.backend=vllm: only the RL trainers (ppo, grpo, rloo) sample with vLLM; use auto, fast "
                        "or hf here")
    reason = fast_unsupported_reason(model)
    if reason is None:
        return "fast"
    if backend == "fast":
        raise UserError(f"gen.backend=fast: {reason}; use gen.backend=hf (or auto)")
    return "hf"


def _cuda_devices(model: Any) -> list:
    device = next(model.parameters()).device
    return [device] if device.type == "cuda" else []


# ----------------------------------------------------------------------------------------------------------------
# Sampling one token


def sample_next(logits: torch.Tensor, gen: GenConfig, ban: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from logits (B, V). Returns (tokens, logprobs), each (B, 1).

    logprobs = log softmax(logits / T)[token] (T = gen.temperature, or 1 for greedy) before any filtering.
    ban: a token id given probability 0 (EOS before gen.min_new_tokens). Sampling is by inverse CDF (one uniform
    per row, searchsorted in the cumulative probabilities): exact, and far cheaper on CPU than multinomial."""
    z = logits if logits.dtype == torch.float32 else logits.float()
    if gen.temperature > 0 and gen.temperature != 1.0:
        z = z / gen.temperature
    if gen.temperature == 0:
        tokens = (z if ban is None else _filter(z, gen, ban)).argmax(-1, keepdim=True)  # (B, 1)
        return tokens, z.gather(-1, tokens) - torch.logsumexp(z, -1, keepdim=True)
    if not gen.top_k and gen.top_p >= 1.0:
        probs = torch.softmax(z, -1)  # (B, V)
        # a banned token: its probability zeroed, the rest renormalised by the inverse CDF itself (one exp pass,
        # not two); unless it held all the mass a float32 softmax can represent (then the log-space path below)
        allowed = probs if ban is None else probs.index_fill(-1, torch.tensor(ban, device=probs.device), 0.0)
        cdf = allowed.cumsum(-1)  # (B, V)
        if ban is None or bool(cdf[:, -1].min() > 0):
            tokens = _inverse_cdf(cdf)
            return tokens, probs.gather(-1, tokens).log()  # drawn tokens have probability > 0
    # filtered (in log space, so a row whose mass sits on banned tokens still renormalises); the log-prob is
    # under the unfiltered distribution, which is what the training forward scores
    tokens = _inverse_cdf(torch.softmax(_filter(z, gen, ban), -1).cumsum(-1))
    return tokens, z.gather(-1, tokens) - torch.logsumexp(z, -1, keepdim=True)


def _inverse_cdf(cdf: torch.Tensor) -> torch.Tensor:
    """Draw one index per row from cumulative probabilities cdf (B, V) (rows need not end exactly at 1): (B, 1)."""
    # u < total strictly (r < 1 - 2^-22 absorbs the rounding of the product), and right=True sends u == cdf[i] to
    # i + 1: a token whose probability is 0 (a flat step of the cdf) is never drawn, and the index is always < V
    u = torch.empty(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device).uniform_(0, 1 - 2.0 ** -22)
    return torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True)


def _filter(z: torch.Tensor, gen: GenConfig, ban: int | None) -> torch.Tensor:
    """Logits with banned / top-k / top-p tokens set to -inf (a copy)."""
    z = z.clone()
    if ban is not None:
        z[:, ban] = -torch.inf
    if gen.temperature == 0:
        return z
    if gen.top_k and gen.top_k < z.shape[-1]:
        kth = torch.topk(z, gen.top_k, dim=-1).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, -torch.inf)
    if gen.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_z, -1)
        drop = probs.cumsum(-1) - probs > gen.top_p  # mass before this token already reaches top_p
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, -torch.inf))
    return z


# ----------------------------------------------------------------------------------------------------------------
# HF generate backend


def _hf_generate(model: Any, tokenizer: Any, prompts: list[list[int]], gen: GenConfig):
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids, mask = pad_sequences(prompts, tokenizer.pad_token_id, side="left")
    # a full GenerationConfig, so a model's own defaults (top_k=50, repetition_penalty, ...) cannot change what
    # is sampled behind the RL trainer's back
    sampling = {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k}
    config = GenerationConfig(
        max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=True, return_dict_in_generate=True, output_logits=True,
        **(sampling if gen.temperature > 0 else {"do_sample": False}))
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    new = out.sequences[:, ids.shape[1]:]  # (B, T)
    logits = torch.stack(out.logits, 1).float()  # (B, T, V) raw, before any processor
    temperature = gen.temperature if gen.temperature > 0 else 1.0
    lp = torch.log_softmax(logits / temperature, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return _trim(new.tolist(), lp.tolist(), tokenizer.eos_token_id)


def _trim(rows: list[list[int]], lps: list[list[float]], eos: int):
    completions, finished, logprobs = [], [], []
    for row, lp in zip(rows, lps):
        n = row.index(eos) + 1 if eos in row else len(row)
        completions.append(row[:n])
        logprobs.append(lp[:n])
        finished.append(eos in row)
    return completions, finished, logprobs


# ----------------------------------------------------------------------------------------------------------------
# Fast backend: weights


def _unwrap(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fast_unsupported_reason(model: Any) -> str | None:
    """None when FastDecoder can run `model`, else why not."""
    inner = _unwrap(model)
    cfg = getattr(inner, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAST_MODEL_TYPES:
        return f"model type {kind!r} is not one of {', '.join(FAST_MODEL_TYPES)}"
    for mod in inner.modules():
        if getattr(mod, "lora_magnitude_vector", None):  # DoRA rescales per column; not implemented here
            return "DoRA adapters are not supported"
    embed = inner.get_input_embeddings()
    if hasattr(embed, "base_layer") or hasattr(getattr(inner, "lm_head", None), "lora_embedding_A"):
        return "LoRA on the embeddings is not supported"
    if kind == "gpt2":
        if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn or not cfg.scale_attn_weights:
            return ("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn) are not "
                    "supported")
        return None
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") == "dynamic":
        return "dynamic RoPE scaling is not supported"
    layer_types = getattr(cfg, "layer_types", None) or []
    window = getattr(cfg, "sliding_window", None)
    if any(t != "full_attention" for t in layer_types) or (window and getattr(cfg, "use_sliding_window", True)
                                                         and kind == "mistral"):
        return "sliding-window attention is not supported"
    return None


def _linear(mod: Any, conv1d: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) of a Linear, a GPT-2 Conv1D, or a PEFT LoRA layer with its active adapters merged."""
    base = getattr(mod, "base_layer", mod)
    w, b = base.weight, base.bias
    if base is not mod and not getattr(mod, "merged", False) and not getattr(mod, "disable_adapters", False):
        for name in mod.active_adapters:
            if name in mod.lora_A:
                w = w + mod.get_delta_weight(name)  # in the base layer's own orientation
    return (w.t() if conv1d else w), b


def _rotate_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows (or entries of a bias) of a q/k projection reordered so that x @ result.T == rotate_half(x @ w.T):
    per head, (-second half, first half). Negation and reordering are exact, so the folded projection gives
    the rotate_half of the plain one (and the flip costs no op at decode time)."""
    heads = w.unflatten(0, (n_heads, 2, -1))  # (H, 2, D/2, ...)
    return torch.cat([-heads[:, 1:], heads[:, :1]], 1).flatten(0, 2)


_ACTS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh"}
"""MLP activations the decoder implements itself: config name -> canonical name (`_act`, `_decode_layers`)."""
_ACT_FNS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
            "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
_ONEDNN_POST = {"silu": ("swish", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}
"""Canonical activation name -> oneDNN post-op (attr, algorithm), applied inside a prepacked product."""


def _fn_act(name: str, module: Any) -> tuple[Callable, str | None]:
    """The activation as a plain function (an nn.Module call costs a few microseconds per step) and its canonical
    name, with which the projection before it may apply it in the same kernel (oneDNN post-op, rlhfkit kernel); an
    activation not in _ACTS: the model's module, None."""
    canonical = _ACTS.get(name)
    if canonical is None:
        return module, None
    return _ACT_FNS[canonical], canonical


def _bias(biases: list, weights: list) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else w.new_zeros(len(w)) for b, w in zip(biases, weights)])


KERNEL_PRODUCTS = True
"""Whether CPU float32 projections use rlhfkit's compiled product kernel (`rlhfkit.kernels`, built on first use)
when it is available; False (or no kernel): oneDNN's prepacked products (`PACK_MIN_WEIGHTS`), else addmm."""

PACK_MIN_WEIGHTS = 2 ** 16
"""Smallest weight matrix (entries) worth prepacking for oneDNN (used without the kernel): a oneDNN call costs ~15 us
more than addmm, which the saved re-packing pays back from about this size on (256 x 256: even with the weights in
cache, and ahead once a decode step streams all the weights through the cache; measured at batch 8,
bench/README.md)."""

MM, ONEDNN, KERNEL = 0, 1, 2
"""_Proj.kind: addmm on Wᵀ, oneDNN's prepacked product, rlhfkit's kernel (the codes _decode_layers takes)."""


def _packable(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() >= PACK_MIN_WEIGHTS
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _kernel_applies(w: torch.Tensor) -> bool:
    return KERNEL_PRODUCTS and w.device.type == "cpu" and w.dtype == torch.float32 and kernels.available()


@dataclass(frozen=True)
class _Norm:
    """The normalisation a projection applies to its input first: RMSNorm (Llama: its weight is folded into the
    projection, weight None) or LayerNorm (GPT-2: weight and bias). Called: the eager norm."""

    code: int
    """kernels.RMS or kernels.LAYER."""
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm, or RMSNorm x / sqrt(mean(x²) + eps) computed in float32 as HF LlamaRMSNorm does."""
        if self.code == kernels.LAYER:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return F.rms_norm(x.float(), x.shape[-1:], self.weight, self.eps).to(x.dtype)


class _Proj:
    """y = x @ Wᵀ + b for x (N, in), optionally after a norm of x, with a fused activation or residual add.

    On CPU in float32 the weight is packed once per FastDecoder for rlhfkit's product kernel
    (`rlhfkit.kernels`, rlhfkit/csrc/small_linear.cpp: panels of 16 output columns; bias, ReLU / GELU-tanh / SiLU
    and the residual add in the kernel, other activations after it). At decode batch sizes it is about 2x faster than oneDNN's prepacked product
    with two threads on an AVX2 host, and no slower from 32 rows up (bench/bench_host.py). Without the kernel (no
    compiler, no AVX2, KERNEL_PRODUCTS False), weights of PACK_MIN_WEIGHTS entries or more are reordered into
    oneDNN's blocked layout (torch.ops.mkldnn._reorder_linear_weight, what torch.compile's CPU weight freezing uses:
    at decode batch sizes MKL's sgemm re-packs the whole weight on every call, so this is about 1.4x faster with one
    thread), bias, GELU/SiLU/ReLU and the residual add in the same kernel. Elsewhere (GPU, half precision): addmm
    on the weight as is. Naive equivalent (tested through FastDecoder == HF): act(x @ w.T + b) and h + x @ w.T + b.

    norm: the norm before the projection (the block's LayerNorm/RMSNorm, the final norm before the LM head). The
    kernel normalises the rows itself, with the norm's weight folded into W's columns and its bias into b
    (x̂ diag(g) Wᵀ + (b + W β)); otherwise the norm runs as its own op first."""

    __slots__ = ("w_t", "b", "packed", "kind", "n", "norm", "norm_code", "eps")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, rows: int, norm: _Norm | None = None):
        """w (out, in), b (out,) or None; rows: the typical N (a hint for oneDNN's blocked layout)."""
        self.b, self.n, self.w_t, self.packed = b, w.shape[0], None, None
        self.norm = norm  # the norm run as its own op first (None: none, or done by the kernel)
        self.norm_code, self.eps = (0, 0.0) if norm is None else (norm.code, norm.eps)
        if _kernel_applies(w):  # any strides: GPT-2's Conv1D weight is packed from its transposed view
            self.kind = KERNEL
            self.packed = kernels.pack(w, None if norm is None else norm.weight)
            if norm is not None:
                if norm.bias is not None:  # b + W β, in float64
                    shift = (w.double() @ norm.bias.double()).float()
                    self.b = shift if b is None else b + shift
                self.norm = None
        elif _packable(w):  # a transposed view (GPT-2's Conv1D) is read in place: the reorder takes any strides
            plain = w.is_contiguous() or w.t().is_contiguous()
            self.kind = ONEDNN
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w if plain else w.contiguous(), rows)
        else:
            self.kind, self.w_t = MM, w.t()

    @property
    def weight(self) -> torch.Tensor:
        """The weight as _decode_layers takes it: packed for the kernel or oneDNN, else Wᵀ."""
        return self.w_t if self.kind == MM else self.packed

    def __call__(self, x: torch.Tensor, name: str | None = None, act: Callable | None = None) -> torch.Tensor:
        """act(norm(x) @ Wᵀ + b) (act None: none); name: act's canonical name (_ACTS) where it has one, with which
        the kernel (kernels.ACTS) or oneDNN (_ONEDNN_POST) applies it in the product; else act runs after it."""
        if self.kind == KERNEL:
            code = kernels.ACTS.get(name, 0) if name else 0
            y = kernels.linear(x, self.packed, self.b, None, self.n, code, self.norm_code, self.eps)
            return y if act is None or code else act(y)
        if self.norm is not None:
            x = self.norm(x)
        if self.kind == ONEDNN:
            post = _ONEDNN_POST.get(name) if name else None
            attr, algo = post or ("none", "")
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, attr, [], algo)
            return y if act is None or post else act(y)
        y = torch.mm(x, self.w_t) if self.b is None else torch.addmm(self.b, x, self.w_t)
        return y if act is None else act(y)

    def add(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h + norm(x) @ Wᵀ + b: the residual add fused into the product."""
        if self.kind == KERNEL:
            return kernels.linear(x, self.packed, self.b, h, self.n, 0, self.norm_code, self.eps)
        if self.norm is not None:
            x = self.norm(x)
        if self.kind == ONEDNN:
            return torch.ops.mkldnn._linear_pointwise.binary(x, h, self.packed, self.b, "add")
        out = torch.addmm(h, x, self.w_t)
        return out if self.b is None else out.add_(self.b)


@dataclass
class _Layer:
    """One block's projections, with weights folded at build time."""

    qkv: _Proj
    """Llama [q, k, rot(q), rot(k), v] (RoPE folded in, see _rotate_rows), GPT-2 [q, k, v]; q rows pre-multiplied
    by the attention scale 1/sqrt(D); the block's first norm included (RMSNorm weight folded into its columns)."""
    o: _Proj
    fc_in: _Proj
    """gate and up stacked (gated MLP), or c_fc; the block's second norm included."""
    fc_out: _Proj
    act: Callable
    post: str | None
    """act's canonical name when fc_in may apply it in its product (non-gated MLPs, act in _ACTS), else None."""


def _llama_layers(inner: Any, n_heads: int, n_kv: int, rows: int) -> list[_Layer]:
    layers, rms = [], _Norm(kernels.RMS, inner.config.rms_norm_eps)
    act, _ = _fn_act(inner.config.hidden_act, inner.model.layers[0].mlp.act_fn)
    for blk in inner.model.layers:
        at, mlp = blk.self_attn, blk.mlp
        (wq, bq), (wk, bk), (wv, bv) = _linear(at.q_proj), _linear(at.k_proj), _linear(at.v_proj)
        wqr, wkr = _rotate_rows(wq, n_heads), _rotate_rows(wk, n_kv)
        bqr = None if bq is None else _rotate_rows(bq, n_heads)
        bkr = None if bk is None else _rotate_rows(bk, n_kv)
        (wg, bg), (wu, bu) = _linear(mlp.gate_proj), _linear(mlp.up_proj)
        s = (wq.shape[0] // n_heads) ** -0.5  # attention scale 1/sqrt(D), folded into the q rows
        bq, bqr = (None, None) if bq is None else (bq * s, bqr * s)
        # RMSNorm weights folded into the next projection: (x̂ ⊙ g) Wᵀ = x̂ (W diag g)ᵀ
        g1, g2 = blk.input_layernorm.weight, blk.post_attention_layernorm.weight
        layers.append(_Layer(
            qkv=_Proj(torch.cat([wq * s, wk, wqr * s, wkr, wv]) * g1,
                      _bias([bq, bk, bqr, bkr, bv], [wq, wk, wqr, wkr, wv]), rows, rms),
            o=_Proj(*_linear(at.o_proj), rows),
            fc_in=_Proj(torch.cat([wg, wu]) * g2, _bias([bg, bu], [wg, wu]), rows, rms),
            fc_out=_Proj(*_linear(mlp.down_proj), rows), act=act, post=None))
    return layers


def _gpt2_layers(inner: Any, rows: int) -> list[_Layer]:
    layers = []
    act, post = _fn_act(inner.config.activation_function, inner.transformer.h[0].mlp.act)
    for blk in inner.transformer.h:
        at, mlp = blk.attn, blk.mlp
        wqkv, bqkv = _linear(at.c_attn, conv1d=True)  # (out, in) view of the (in, out) Conv1D weight
        n = wqkv.shape[1]  # hidden size: rows [0, n) are q
        scale = torch.ones(wqkv.shape[0], dtype=wqkv.dtype, device=wqkv.device)
        scale[:n] = (n // inner.config.n_head) ** -0.5  # attention scale 1/sqrt(D), folded into the q rows
        wqkv, bqkv = wqkv * scale[:, None], None if bqkv is None else bqkv * scale
        eps = inner.config.layer_norm_epsilon
        ln1, ln2 = (_Norm(kernels.LAYER, eps, ln.weight, ln.bias) for ln in (blk.ln_1, blk.ln_2))
        layers.append(_Layer(qkv=_Proj(wqkv, bqkv, rows, ln1), o=_Proj(*_linear(at.c_proj, conv1d=True), rows),
                             fc_in=_Proj(*_linear(mlp.c_fc, conv1d=True), rows, ln2),
                             fc_out=_Proj(*_linear(mlp.c_proj, conv1d=True), rows), act=act, post=post))
    return layers


# ----------------------------------------------------------------------------------------------------------------
# Fast backend: decode loop

def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, computed in float32 for bf16/fp16 scores (as HF attention does)."""
    if scores.dtype == torch.float32:
        return torch.softmax(scores, -1)
    return torch.softmax(scores, -1, dtype=torch.float32).to(scores.dtype)


GROUPED_SCORES_MAX = 2 ** 20
"""Largest attention score tensor (entries, B x query heads x n x S) a multi-token pass of a grouped-query model
computes as explicit batched products (FastDecoder._forward); above it, SDPA on k/v repeated per query head, whose
fused kernel keeps memory linear in the length (measured at stories260k's shapes: the explicit products are
~2x faster up to ~2^19 entries, then page faults of the fresh score buffers make them slower, bench/README.md)."""

PACK_PADDING_MIN = 0.1
"""Share of padding positions from which a multi-token pass (FastDecoder._forward) runs its row-wise work on the
real tokens only (left-padded prompts of uneven length, completions that ended early). Nearly full batches keep
the plain path, where the scatter and gather around attention would cost about what the few padding rows do
(the benchmark's 97%-real GRPO rows: 18.2 ms packed vs 17.7 padded; HH-like 67-78%-real rows: 4-35% faster
packed, bench/README.md)."""

DECODE_ONE_THREAD_FLOPS = 2 ** 27
"""Decode steps whose weight products take fewer FLOPs than this (2 x batch x weights; 2^27 ~ 134M) may run on one
intra-op thread: a `generate` call times its first DECODE_TUNE_STEPS steps alternately on one thread and on
torch's thread count, and the faster (mean step time) is kept for that call and the next DECODE_RETUNE_EVERY - 1
calls of the same shape, prefill included. Their ops are microseconds long: on an idle
machine two threads still win (4-layer GPT-2 at batch 8: 3,300 vs 2,300 tokens/s), but every split op is a
thread-pool barrier, and with other jobs on the cores each barrier waits for a descheduled thread: there two
threads measured 3-10x slower than one (bench/README.md). Numbers are the same with either setting (the products
split rows and columns, never the sum), so the choice never changes a sample. Larger steps always use torch's."""
DECODE_TUNE_STEPS = 8
DECODE_RETUNE_EVERY = 16
_TUNED_THREADS: dict[tuple, list[int]] = {}  # (model kind, step FLOPs, batch, threads) -> [choice, calls since]


def _act(x: torch.Tensor, name: str) -> torch.Tensor:
    """_ACT_FNS[name](x) in a form TorchScript compiles; x itself for any other name."""
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return x


def _kernel_act(name: str) -> int:
    """kernels.ACTS[name] in a form TorchScript compiles; 0 (none) for any other name."""
    if name == "relu":
        return 1
    if name == "gelu_tanh":
        return 2
    if name == "silu":
        return 3
    return 0


def _proj(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], kind: int, n: int, act: str, attr: str,
          algo: str, norm: int, eps: float, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor]
          ) -> torch.Tensor:
    """_Proj.__call__: act(norm(x) @ Wᵀ + b); w is _Proj.weight for its kind (KERNEL 2, ONEDNN 1, MM 0), n the
    output width; attr/algo: act as a oneDNN post-op; norm: _Norm.code (0: none), applied by the kernel (weights
    folded) or else here with gamma/beta."""
    if kind == 2:
        code = _kernel_act(act)
        y = torch.ops.rlhfkit.small_linear(x, w, b, None, n, code, norm, eps)
        return y if code != 0 else _act(y, act)
    if norm == 2:
        x = F.layer_norm(x, [x.shape[1]], gamma, beta, eps)
    elif norm == 1:
        x = F.rms_norm(x, [x.shape[1]], gamma, eps)
    if kind == 1:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], algo)
    y = torch.mm(x, w) if b is None else torch.addmm(b, x, w)
    return _act(y, act)


def _proj_add(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], kind: int, n: int
              ) -> torch.Tensor:
    """_Proj.add: h + x @ Wᵀ + b."""
    if kind == 2:
        return torch.ops.rlhfkit.small_linear(x, w, b, h, n)
    if kind == 1:
        return torch.ops.mkldnn._linear_pointwise(x, h, w, b, "add")
    out = torch.addmm(h, x, w)
    return out if b is None else out.add_(b)


def _decode_layers(h: torch.Tensor, t: int, n_heads: int, n_kv: int, head_dim: int, eps: float,
                   ws: List[torch.Tensor], bs: List[Optional[torch.Tensor]], kinds: List[int], ns: List[int],
                   norms: List[int], gammas: List[Optional[torch.Tensor]], betas: List[Optional[torch.Tensor]],
                   act: str, attr: str, algo: str, split_sizes: List[int],
                   k_w: List[torch.Tensor], keys: List[torch.Tensor], v_w: List[torch.Tensor],
                   values: List[torch.Tensor], mask: torch.Tensor, cos: torch.Tensor, sin: Optional[torch.Tensor]
                   ) -> torch.Tensor:
    """FastDecoder._step's layers as one function, compiled by TorchScript (`_scripted_layers`) so that its ~15
    tensor ops per layer run without Python between them: CPU float32 only, where a small model's decode step is
    bound by per-op overhead (a kept-decoder sample() of 8 x 32 tokens: stories260k 40.7 -> 36.4 ms, the
    benchmark's gpt2 103 -> 95 ms, medians of 37 alternating calls on an AVX2 host). The same ops in the same
    order as the eager `_step`, run without TorchScript's graph optimizations (with them, a tiny GPT-2's biased
    products changed in their last bits): samples and log-probs are bit-identical (tested). Layer i's projections
    are ws/bs/kinds/ns/norms/gammas/betas[4i .. 4i+3] = qkv, o, fc_in, fc_out (`_Proj`: weight, bias, kind,
    output width, norm code, the norm's weight and bias where it is not folded); sin is None for GPT-2 (no RoPE,
    plain MLP with act fused into fc_in) and given for Llama (gated MLP). mask: the full additive step mask
    (B*Hkv, 1, slots), narrowed here to slot t."""
    n = h.shape[0]
    group = n_heads // n_kv
    step_mask = mask.narrow(2, 0, t + 1)
    for i in range(len(k_w)):
        j = 4 * i
        qkv = _proj(h, ws[j], bs[j], kinds[j], ns[j], "", "none", "", norms[j], eps, gammas[j], betas[j])
        parts = qkv.view(n, -1, head_dim).split_with_sizes(split_sizes, 1)
        if sin is None:  # [q; k; v]
            q, v = parts[0], parts[2]
            k_w[i].select(3, t).copy_(parts[1])
        else:  # [q; k; rot(q); rot(k); v]
            q, v = torch.addcmul(parts[0] * cos, parts[2], sin), parts[4]
            torch.addcmul(parts[1] * cos, parts[3], sin, out=k_w[i].select(3, t))
        v_w[i].select(2, t).copy_(v)
        scores = torch.baddbmm(step_mask, q.reshape(n * n_kv, group, head_dim), keys[i].narrow(2, 0, t + 1))
        a = torch.bmm(torch.softmax(scores, -1), values[i].narrow(1, 0, t + 1))
        h = _proj_add(a.view(n, n_heads * head_dim), h, ws[j + 1], bs[j + 1], kinds[j + 1], ns[j + 1])
        if sin is None:  # plain MLP, act fused into fc_in
            x = _proj(h, ws[j + 2], bs[j + 2], kinds[j + 2], ns[j + 2], act, attr, algo, norms[j + 2], eps,
                      gammas[j + 2], betas[j + 2])
        else:  # gated MLP
            gate, up = _proj(h, ws[j + 2], bs[j + 2], kinds[j + 2], ns[j + 2], "", "none", "", norms[j + 2], eps,
                             gammas[j + 2], betas[j + 2]).chunk(2, dim=-1)
            x = _act(gate, act).mul_(up)
        h = _proj_add(x, h, ws[j + 3], bs[j + 3], kinds[j + 3], ns[j + 3])
    return h


_SCRIPTED: list = []  # [compiled _decode_layers or None], filled on first use


def _scripted_layers() -> Callable | None:
    """_decode_layers compiled by TorchScript once per process, or None where that fails (a torch without
    TorchScript: the eager step runs instead). torch.jit.script warns that it is deprecated; the warning is
    silenced here, as nothing is saved or exported, and the fallback keeps every path working without it.
    TorchScript compiles from the source file on disk: if that file changed after the import (rlhfkit edited or
    upgraded under a running process) it may compile other lines, so a result whose arguments are not
    _decode_layers' is dropped too."""
    if not _SCRIPTED:
        kernels.available()  # registers torch.ops.rlhfkit.small_linear (the kernel, or a stand-in), which it names
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = torch.jit.script(_decode_layers)
            names = [a.name for a in compiled.schema.arguments]
            _SCRIPTED.append(compiled if names == list(inspect.signature(_decode_layers).parameters) else None)
        except Exception:  # noqa: BLE001 - any failure to compile means: run the eager step
            _SCRIPTED.append(None)
    return _SCRIPTED[0]


SCRIPTED_DECODE = True
"""Whether FastDecoder runs its CPU float32 decode steps through the TorchScript-compiled `_decode_layers`
(False: the eager `_step`, the same ops one Python call at a time)."""


class FastDecoder:
    """KV-cache decoding with plain torch ops on the HF model's own weights.

    Built by `sample()` (`decoder_for`: kept for the next call while no weight changes): fused projections and LoRA
    merges are computed then, so it always decodes with the current weights.
    `generate(prompts, gen, eos, pad)` -> (completions, finished, logprobs).
    The prompt goes once through `_prefill` (`_forward`: causal + padding mask; SDPA, or batched products for
    small grouped-query passes); each new token through `_step`,
    on (B, H) rows. Weight folding done at build time, so no decode step pays for it:
      - q, k, rotate_half(q), rotate_half(k), v come out of one matrix product (`_rotate_rows`), so RoPE is
        q·cos + q_rot·sin (two elementwise ops) with cos/sin rows gathered once per generate call;
      - the attention scale 1/sqrt(D) sits in the q rows, RMSNorm weights (the final one too) in the next
        projection's columns;
      - weights are prepacked for oneDNN (`_Proj`); bias, activation and residual adds are fused into the products.
    A GPT-2 step is 4 + 16 per layer tensor ops plus sampling (HF generate: about 4x as many, plus module calls).
    `completion_logprobs` runs whole rows through the same multi-token `_forward` without sampling: the no-gradient
    scoring of a frozen model (the RL trainers' reference, `rlhfkit.rl.frozen_decoder`).
    """

    def __init__(self, model: Any, batch: int = 8):
        reason = fast_unsupported_reason(model)
        if reason is not None:
            raise UserError(f"gen.backend=fast: {reason}")
        inner = _unwrap(model)
        cfg = inner.config
        self.kind = cfg.model_type
        first = next(inner.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.n_heads = cfg.num_attention_heads
        lm_w, lm_b = _linear(inner.lm_head)
        if self.kind == "gpt2":
            self.n_kv = self.n_heads
            self.head_dim = cfg.n_embd // cfg.n_head
            self.eps = cfg.layer_norm_epsilon
            self.embed, self.wpe = inner.transformer.wte.weight, inner.transformer.wpe.weight
            self.layers = _gpt2_layers(inner, batch)
            ln_f = inner.transformer.ln_f
            norm_f = _Norm(kernels.LAYER, self.eps, ln_f.weight, ln_f.bias)
            self.max_positions = cfg.n_positions
        else:
            self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
            self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
            self.eps = cfg.rms_norm_eps
            self.embed, self.wpe = inner.model.embed_tokens.weight, None
            self.layers = _llama_layers(inner, self.n_heads, self.n_kv, batch)
            norm_f = _Norm(kernels.RMS, self.eps)
            lm_w = lm_w * inner.model.norm.weight  # final RMSNorm weight folded into the head's columns
            self.rotary = inner.model.rotary_emb
            self.max_positions = None
        self.lm_head = _Proj(lm_w, lm_b, batch, norm_f)  # the final norm included
        Hq, Hkv = self.n_heads, self.n_kv
        self.split_sizes = [Hq, Hkv, Hkv] if self.kind == "gpt2" else [Hq, Hkv, Hq, Hkv, Hkv]
        self.step_flops = 2 * sum(p.numel() for p in inner.parameters() if p.dim() == 2)  # per row, about
        self._buffers: dict[str, torch.Tensor] = {}  # KV caches generate() reuses across its calls (_caches)
        act = _ACTS.get(cfg.activation_function if self.kind == "gpt2" else cfg.hidden_act)
        self._script_args = None  # the layer weights as _decode_layers takes them, where it applies
        if self.device.type == "cpu" and self.dtype == torch.float32 and act is not None:
            projs = [p for ly in self.layers for p in (ly.qkv, ly.o, ly.fc_in, ly.fc_out)]
            eager = [p.norm or _Norm(0, 0.0) for p in projs]  # the norms _decode_layers runs itself (not folded)
            self._script_args = ([p.weight for p in projs], [p.b for p in projs], [p.kind for p in projs],
                                 [p.n for p in projs], [p.norm_code for p in projs], [e.weight for e in eager],
                                 [e.bias for e in eager], act, *_ONEDNN_POST[act])

    def _split(self, qkv: torch.Tensor) -> tuple:
        """qkv (N, out) -> (q, k, v, q_rot, k_rot) as (N, heads, D) views; the rot parts are None for GPT-2."""
        x = qkv.view(qkv.shape[0], -1, self.head_dim)  # (N, heads, D)
        if self.wpe is not None:  # [q; k; v]
            return (*x.split_with_sizes(self.split_sizes, 1), None, None)
        q, k, q_rot, k_rot, v = x.split_with_sizes(self.split_sizes, 1)  # [q; k; rot(q); rot(k); v]
        return q, k, v, q_rot, k_rot

    def _mlp_block(self, ly: _Layer, h: torch.Tensor) -> torch.Tensor:
        if self.wpe is None:
            gate, up = ly.fc_in(h).chunk(2, dim=-1)
            x = ly.act(gate).mul_(up)
        else:
            x = ly.fc_in(h, ly.post, ly.act)
        return ly.fc_out.add(x, h)

    def _prefill(self, ids: torch.Tensor, pos: torch.Tensor, caches: list, mask: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
        """The whole left-padded prompt ids (B, P) at positions pos; fills the caches' first P slots; returns the
        last position's logits (B, V). mask: additive (B, 1, P, P); valid: (B, P) bool, real tokens (packing)."""
        h = self._forward(ids, pos, caches, mask, valid=valid)[:, -1]
        return self.lm_head(h)  # (B, V)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, caches: list, mask: torch.Tensor, start: int = 0,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ids (B, n) at positions pos (B, n), written to cache slots [start, start + n) and attending to
        slots [0, start + n) under the additive mask (B, 1, n, start + n). Returns the last block's hidden states
        (B, n, H); the LM head (which includes the final norm) takes only the rows a caller reads.

        valid (B, n) bool, the real tokens: when padding fills at least PACK_PADDING_MIN of the rows, the
        row-wise work (embeddings, norms, projections, MLP) runs on the real tokens only, packed; attention
        scatters them back to the (B, n) layout (padding keys and values zero, which the mask hides anyway).
        The returned hidden states of padding positions are then zero, not the model's (meaningless) values."""
        B, n = ids.shape
        S = start + n  # cache slots read
        Hq, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        rows = self._packed_rows(valid)  # (N,) the real tokens' flat (B*n) indices, or None: no packing
        flat_ids, flat_pos = ids.flatten(), pos.flatten()
        if rows is not None:
            flat_ids, flat_pos = flat_ids[rows], flat_pos[rows]
        h = F.embedding(flat_ids, self.embed)  # (N, H), N = B*n unpacked
        if self.wpe is not None:
            h = h + F.embedding(flat_pos, self.wpe)
        else:
            cos, sin = self.cos[pos].flatten(0, 1).unsqueeze(1), self.sin[pos].flatten(0, 1).unsqueeze(1)
        G = Hq // Hkv
        grouped = G > 1 and B * Hq * n * S <= GROUPED_SCORES_MAX
        if grouped:  # the mask for grouped rows (below), built once for all layers: (B*Hkv, G*n, S)
            grouped_mask = mask[:, :, None].expand(B, Hkv, G, n, S).reshape(B * Hkv, G * n, S)
        for ly, (k_w, keys, v_w, values) in zip(self.layers, caches):
            qkv = ly.qkv(h)
            if rows is not None:  # back to the (B*n) layout for attention; padding rows stay zero
                qkv = qkv.new_zeros(B * n, qkv.shape[1]).index_copy_(0, rows, qkv)
            q, k, v, q_rot, k_rot = self._split(qkv)
            if q_rot is not None:  # q·cos + rotate_half(q)·sin (HF apply_rotary_pos_emb)
                q, k = torch.addcmul(q * cos, q_rot, sin), torch.addcmul(k * cos, k_rot, sin)
            k_w[..., start:S] = k.unflatten(0, (B, n)).permute(0, 2, 3, 1)  # (B, Hkv, D, n)
            v_w[:, :, start:S] = v.unflatten(0, (B, n)).transpose(1, 2)  # (B, Hkv, n, D)
            if grouped:  # grouped-query attention: SDPA with enable_gqa would take its slow math path; here the
                # G query heads of a kv head are one (G*n, D) matrix against that head's cached keys and values
                qg = q.view(B, n, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B * Hkv, G * n, D)
                probs = _softmax(torch.baddbmm(grouped_mask, qg, keys.narrow(2, 0, S)))
                a = torch.bmm(probs, values.narrow(1, 0, S)).view(B, Hkv, G, n, D).permute(0, 3, 1, 2, 4)
            else:  # SDPA's fused kernel, which never holds the (n, S) scores of a head at once
                k_a, v_a = k_w[..., :S].transpose(-1, -2), v_w[:, :, :S]  # (B, Hkv, S, D)
                if G > 1:  # kv head j serves query heads j*G .. j*G+G-1 (HF repeat_kv order)
                    k_a, v_a = k_a.repeat_interleave(G, 1), v_a.repeat_interleave(G, 1)
                a = F.scaled_dot_product_attention(q.unflatten(0, (B, n)).transpose(1, 2), k_a, v_a, attn_mask=mask,
                                                   scale=1.0)  # (B, Hq, n, D); q carries the scale
                a = a.transpose(1, 2)
            a = a.reshape(B * n, Hq * D)
            h = ly.o.add(a if rows is None else a[rows], h)
            h = self._mlp_block(ly, h)
        if rows is not None:
            h = h.new_zeros(B * n, h.shape[1]).index_copy_(0, rows, h)
        return h.view(B, n, -1)

    @staticmethod
    def _packed_rows(valid: torch.Tensor | None) -> torch.Tensor | None:
        """Flat indices of valid's True entries when padding fills at least PACK_PADDING_MIN of it, else None."""
        real = 0 if valid is None else int(valid.sum())
        if real == 0 or real > (1.0 - PACK_PADDING_MIN) * valid.numel():
            return None
        return valid.flatten().nonzero().squeeze(1)

    def _step(self, tok: torch.Tensor, t: int, caches: list, mask: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor | None, cache_lists: list) -> torch.Tensor:
        """One new token per row, tok (B,), stored in cache slot t; mask: additive (B*Hkv, 1, slots), read up to
        slot t; cos/sin: this step's RoPE rows (B, 1, D) (GPT-2: cos = its position embeddings (B, H), sin None).
        Logits (B, V). cache_lists: caches unzipped into 4 lists (k_w, keys, v_w, values), made once per call.
        On CPU in float32 the layers run as the TorchScript-compiled `_decode_layers` (SCRIPTED_DECODE), the
        same ops as the loop below (`generate` turns TorchScript's graph optimizations off around the call).

        Keys are cached transposed, (B*Hkv, D, slots), values as (B*Hkv, slots, D): attention is
        baddbmm(mask, q, keys) -> softmax -> bmm(values) without copies; q head j*G + g uses kv head j (HF
        repeat_kv order). RoPE'd keys are written straight into their cache slot (addcmul out=)."""
        B = tok.shape[0]
        Hq, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        h = F.embedding(tok, self.embed)  # (B, H)
        if sin is None:
            h = h + cos
        scripted = _scripted_layers() if SCRIPTED_DECODE and self._script_args is not None else None
        if scripted is not None:
            h = scripted(h, t, Hq, Hkv, D, self.eps, *self._script_args, self.split_sizes, *cache_lists, mask, cos,
                         sin)
            return self.lm_head(h)
        mask = mask.narrow(2, 0, t + 1)
        for ly, (k_w, keys, v_w, values) in zip(self.layers, caches):
            q, k, v, q_rot, k_rot = self._split(ly.qkv(h))
            if q_rot is not None:
                q = torch.addcmul(q * cos, q_rot, sin)  # (B, Hq, D) contiguous
                torch.addcmul(k * cos, k_rot, sin, out=k_w.select(3, t))
            else:
                k_w.select(3, t).copy_(k)
            v_w.select(2, t).copy_(v)
            scores = torch.baddbmm(mask, q.reshape(B * Hkv, Hq // Hkv, D), keys.narrow(2, 0, t + 1))
            a = torch.bmm(_softmax(scores), values.narrow(1, 0, t + 1))  # (B*Hkv, G, D)
            h = ly.o.add(a.view(B, Hq * D), h)
            h = self._mlp_block(ly, h)
        return self.lm_head(h)  # (B, V)

    def completion_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                            prompt_width: int, completion_ids: torch.Tensor, temperature: float, group: int = 0
                            ) -> torch.Tensor:
        """Log-probs (B, T) float32 of completion_ids under softmax(logits / temperature), for rows [prompt
        left-padded to P = prompt_width; completion (B, T)] with their attention mask and position ids: the numbers
        of `rlhfkit.rl.forward_logprobs` (to float rounding), without gradient, on this decoder's folded weights.
        The RL trainers score their frozen reference with it (`rlhfkit.rl.frozen_decoder`).

        group > 1: consecutive runs of `group` rows share one prompt (GRPO/RLOO), which runs once: its first P - 1
        columns fill a cache copied to the run's rows; then every row runs its last prompt token and completion on
        top of it (the layout of rl.shared_prompt_logprobs)."""
        B, L = input_ids.shape
        P, T = prompt_width, L - prompt_width
        if T == 0:
            return torch.zeros(B, 0, device=self.device)
        with torch.inference_mode():
            ids, pos = input_ids.to(self.device), position_ids.to(self.device)
            valid = attention_mask.to(self.device).bool()
            self._set_rope(int(pos.max()) + 1)
            if group <= 1 or P < 2:
                allowed = additive_mask(causal_padding_allowed(valid), self.dtype)
                h = self._forward(ids, pos, self._caches(B, L), allowed, valid=valid)[:, P - 1: L - 1]
            else:
                caches, first = self._caches(B, L), self._caches(B // group, P - 1)
                self._forward(ids[::group, :P - 1], pos[::group, :P - 1], first,
                              additive_mask(causal_padding_allowed(valid[::group, :P - 1]), self.dtype),
                              valid=valid[::group, :P - 1])
                rows = torch.arange(B, device=self.device) // group
                for (k_w, _, v_w, _), (k_u, _, v_u, _) in zip(caches, first):
                    k_w[..., :P - 1] = k_u[rows]
                    v_w[:, :, :P - 1] = v_u[rows]
                allowed = causal_padding_allowed(valid)[:, :, P - 1:]  # queries P-1 .. L-1 over all L keys
                h = self._forward(ids[:, P - 1:], pos[:, P - 1:], caches, additive_mask(allowed, self.dtype),
                                  start=P - 1, valid=valid[:, P - 1:])[:, :T]  # position P-1+t predicts token t
            lp = self._completion_logprobs(h, valid[:, P:], completion_ids, temperature)  # (B, T)
        return lp.clone()  # a normal tensor (autograd may read it), not an inference-mode one

    def _completion_logprobs(self, h: torch.Tensor, real: torch.Tensor, completion_ids: torch.Tensor,
                             temperature: float) -> torch.Tensor:
        """(B, T) log-probs of completion_ids from the hidden states h (B, T, H) that predict them; with enough
        padding (PACK_PADDING_MIN) the LM head runs on the real tokens' rows only and padding positions get 0."""
        B, T = real.shape
        labels = completion_ids.to(self.device)
        rows = self._packed_rows(real)
        if rows is None:
            logits = self.lm_head(h.reshape(B * T, -1)).view(B, T, -1)
            return gather_logprobs(logits, labels, temperature)
        logits = self.lm_head(h.reshape(B * T, -1)[rows])  # (N, V)
        lp = gather_logprobs(logits[None], labels.flatten()[rows][None], temperature)[0]
        return torch.zeros(B * T, dtype=lp.dtype, device=lp.device).index_copy_(0, rows, lp).view(B, T)

    def _set_rope(self, positions: int) -> None:
        """Llama: the cos/sin rows of positions 0 .. positions-1 (self.cos, self.sin), from the model's rotary module."""
        if self.wpe is None:
            cos, sin = self.rotary(self.embed[:1], torch.arange(positions, device=self.device)[None])
            self.cos, self.sin = cos[0], sin[0]

    def _caches(self, rows: int, slots: int, keep: str = "") -> list[tuple]:
        """Per layer: keys (write view (rows, Hkv, D, slots), read view (rows*Hkv, D, slots)), values (write view
        (rows, Hkv, slots, D), read view (rows*Hkv, slots, D)), zero-filled.
        keep: the name of a buffer this decoder keeps and reuses for the next call of the same or smaller size
        (`generate`: a decoder kept between sample() calls then zero-fills memory it already holds instead of
        faulting in fresh pages, ~3 of 46 ms per call on the benchmark's GPT-2)."""
        Hkv, D = self.n_kv, self.head_dim
        per = rows * Hkv * D * slots
        need = 2 * per * len(self.layers)
        buf = self._buffers.get(keep) if keep else None
        if buf is None or buf.numel() < need:
            buf = torch.zeros(need, dtype=self.dtype, device=self.device)
            if keep:
                self._buffers[keep] = buf
        else:
            buf = buf[:need].zero_()
        caches = []
        for i in range(len(self.layers)):
            keys = buf[2 * i * per: (2 * i + 1) * per].view(rows * Hkv, D, slots)
            values = buf[(2 * i + 1) * per: (2 * i + 2) * per].view(rows * Hkv, slots, D)
            caches.append((keys.view(rows, Hkv, D, slots), keys, values.view(rows, Hkv, slots, D), values))
        return caches

    def decode_threads(self, batch: int) -> list[int]:
        """Intra-op thread counts the decode steps choose from (DECODE_ONE_THREAD_FLOPS): [1, torch's] for small
        steps on a CPU with several threads (timed at the start of each call), else [torch's]."""
        n = torch.get_num_threads()
        small = self.device.type == "cpu" and batch * self.step_flops < DECODE_ONE_THREAD_FLOPS
        return [1, n] if small and n > 1 else [n]

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], gen: GenConfig, eos: int, pad: int):
        if any(len(p) == 0 for p in prompts):
            raise UserError("sampling: a prompt encodes to zero tokens")
        threads = torch.get_num_threads()
        try:  # the scripted decode step (_decode_layers) runs its ops as written: no graph rewrites (thread-local)
            with torch.jit.optimized_execution(False):
                return self._generate(prompts, gen, eos, pad)
        finally:
            torch.set_num_threads(threads)

    def _generate(self, prompts: list[list[int]], gen: GenConfig, eos: int, pad: int):
        ids, valid = pad_sequences(prompts, pad, side="left")  # (B, P)
        ids, valid = ids.to(self.device), valid.to(self.device).bool()
        B, P = ids.shape
        T = gen.max_new_tokens
        total = P + T
        Hkv = self.n_kv
        lengths = valid.sum(-1)  # (B,) prompt lengths = position of the first new token
        if self.max_positions is not None and int(lengths.max()) + T > self.max_positions:
            raise UserError(f"sampling: prompt + gen.max_new_tokens exceeds the model's {self.max_positions} "
                            "positions")
        steps_pos = (lengths.unsqueeze(1) + torch.arange(T, device=self.device)).t()  # (T, B)
        self._set_rope(total)  # (P+T, D) cos/sin rows (Llama)
        if self.wpe is None:
            step_cos, step_sin = self.cos[steps_pos].unsqueeze(2), self.sin[steps_pos].unsqueeze(2)  # (T, B, 1, D)
        else:
            step_cos, step_sin = F.embedding(steps_pos, self.wpe), None  # (T, B, H) position embeddings
        caches = self._caches(B, total, keep="decode")
        neg = torch.finfo(self.dtype).min
        slots = torch.cat([valid, valid.new_ones(B, T)], 1)  # (B, P+T): cache slots holding real tokens
        step_mask = torch.zeros(B, Hkv, 1, total, dtype=self.dtype, device=self.device).masked_fill(
            ~slots[:, None, None, :], neg).view(B * Hkv, 1, total)
        # each distinct prompt is prefilled once (GRPO/RLOO repeat every prompt G times), then copied to its rows
        distinct, row_of = torch.unique(torch.cat([ids, valid.long()], 1), dim=0, return_inverse=True)
        U = distinct.shape[0]
        u_ids, u_valid = (distinct[:, :P], distinct[:, P:].bool()) if U < B else (ids, valid)
        prefill_mask = additive_mask(causal_padding_allowed(u_valid), self.dtype)  # (U, 1, P, P)

        choices, memo = self.decode_threads(B), None
        if len(choices) > 1:  # a recent call of this shape chose already: use it, re-time every few calls
            memo = _TUNED_THREADS.setdefault((self.kind, self.step_flops, B, choices[-1]), [choices[-1], 0])
            memo[1] = (memo[1] + 1) % DECODE_RETUNE_EVERY
            if memo[1] != 1:
                choices = [memo[0]]
        timings: dict[int, list[float]] = {c: [] for c in choices}
        self.tuned_threads = memo[0] if memo else choices[0]
        torch.set_num_threads(self.tuned_threads)  # the prefill runs on the last choice
        if U == B:
            logits = self._prefill(ids, position_ids_from_mask(valid.long()), caches, prefill_mask, valid)
        else:  # distinct rows in sorted order; row_of maps each row to its prompt
            prefilled = self._caches(U, P, keep="prefill")
            logits = self._prefill(u_ids, position_ids_from_mask(u_valid.long()), prefilled, prefill_mask,
                                   u_valid)[row_of]
            for (k_w, _, v_w, _), (k_u, _, v_u, _) in zip(caches, prefilled):
                k_w[..., :P] = k_u[row_of]
                v_w[:, :, :P] = v_u[row_of]
        cache_lists = [list(c) for c in zip(*caches)]  # (k_w, keys, v_w, values) per layer -> 4 lists
        tokens = torch.empty(B, T, dtype=torch.long, device=self.device)
        lps = torch.empty(B, T, dtype=torch.float32, device=self.device)
        done = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        n = T
        for t in range(T):
            early = t < gen.min_new_tokens  # EOS is banned: no row can finish at this step
            tok, lp = sample_next(logits, gen, ban=eos if early else None)  # (B, 1) each
            tokens[:, t: t + 1] = tok
            lps[:, t: t + 1] = lp
            if not early:
                done |= tok == eos
                if bool(done.all()):
                    n = t + 1
                    break
            if t == T - 1:
                break
            tuning = len(choices) > 1 and t < DECODE_TUNE_STEPS
            if tuning:  # alternate the candidates; the faster is kept for the rest of this call and the next ones
                torch.set_num_threads(choices[t % len(choices)])
                start = time.perf_counter()
            logits = self._step(tok.view(B), P + t, caches, step_mask, step_cos[t],
                                None if step_sin is None else step_sin[t], cache_lists)
            if tuning:
                timings[choices[t % len(choices)]].append(time.perf_counter() - start)
                if t == DECODE_TUNE_STEPS - 1 or t == T - 2:
                    self.tuned_threads = min(choices, key=lambda c: statistics.fmean(timings[c] or [math.inf]))
                    torch.set_num_threads(self.tuned_threads)
                    memo[0] = self.tuned_threads
        return _trim(tokens[:, :n].tolist(), lps[:, :n].tolist(), eos)
