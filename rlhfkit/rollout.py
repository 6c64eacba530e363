"""Sampling completions from a causal LM: batched, left-padded, stops at EOS, returns sampling log-probs.

    samples = sample(model, tokenizer, prompt_ids, gen, seed=0)   # Samples(prompt_ids, completion_ids, finished, logprobs)

Two backends (`gen.backend`):
- `fast` (default through `auto` for Llama / Mistral / Qwen2 / GPT-2 models, LoRA included): a lean decode loop in
  this file that reuses the model's own weight tensors with a preallocated KV cache. Small models on CPU spend
  most of HF `generate()`'s time in per-step Python (logits processors, cache objects, mask building); here one
  step is ~20 tensor ops per layer: fused QKV and gate/up projections, RoPE with a precomputed table, an
  in-place cache write and one `scaled_dot_product_attention`. `bench/bench_rollout.py` measures the speed-up.
- `hf`: transformers `generate()`, for every other architecture (`auto` falls back to it).

Both return, per generated token, log p(token) under softmax(logits / temperature) of the *unfiltered*
distribution (temperature 0 scores at temperature 1): the quantity an RL trainer's training forward recomputes
(PITFALLS 1). top-k / top-p / min_new_tokens change what is sampled but not that score, as in TRL and
lm-human-preferences; keep them off for strictly on-policy PPO.
Left padding: prompt tokens get positions cumsum(mask) - 1 and token t of a row's completion the position
len(prompt) + t, the same positions `rlhfkit.rl.forward_logprobs` uses in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rlhfkit.config import GenConfig
from rlhfkit.data.collate import pad_sequences, position_ids_from_mask
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
           progress: Any = None) -> Samples:
    """Sample one completion per entry of prompt_ids (repeat prompts for several samples), gen.batch_size at a time.

    With a seed the result depends only on (weights, prompts, gen, seed); the caller's global RNG is left as it was.
    """
    backend = resolve_backend(model, gen.backend)
    was_training = model.training
    model.eval()
    completions, finished, logprobs = [], [], []
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            if seed is not None:
                torch.manual_seed(seed)
            engine = FastDecoder(model) if backend == "fast" else None
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


def resolve_backend(model: Any, backend: str) -> str:
    """"fast" or "hf" for gen.backend auto/fast/hf; a UserError when fast is asked for an unsupported model."""
    if backend == "hf":
        return "hf"
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
    """One token per row from logits (B, V). Returns (tokens (B,), logprobs (B,)).

    logprobs = log softmax(logits / T)[token] (T = gen.temperature, or 1 for greedy) before any filtering.
    ban: a token id given probability 0 (EOS before gen.min_new_tokens). Sampling is by inverse CDF (one uniform
    per row, searchsorted in the cumulative probabilities): exact, and far cheaper on CPU than multinomial."""
    z = logits.float()
    if gen.temperature > 0 and gen.temperature != 1.0:
        z = z / gen.temperature
    if gen.temperature == 0:
        tokens = (z if ban is None else _filter(z, gen, ban)).argmax(-1, keepdim=True)  # (B, 1)
        return tokens.squeeze(-1), (z.gather(-1, tokens) - torch.logsumexp(z, -1, keepdim=True)).squeeze(-1)
    if ban is None and not gen.top_k and gen.top_p >= 1.0:
        probs = torch.softmax(z, -1)  # (B, V)
        tokens = _inverse_cdf(probs)
        return tokens.squeeze(-1), probs.gather(-1, tokens).log().squeeze(-1)
    logp = torch.log_softmax(z, -1)  # the unfiltered distribution, which the training forward scores
    tokens = _inverse_cdf(torch.softmax(_filter(z, gen, ban), -1))
    return tokens.squeeze(-1), logp.gather(-1, tokens).squeeze(-1)


def _inverse_cdf(probs: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of probs (B, V) (rows need not sum exactly to 1): (B, 1)."""
    cdf = probs.cumsum(-1)  # (B, V)
    # u < total strictly (the factor absorbs rounding of the product), and right=True sends u == cdf[i] to i + 1:
    # a token whose probability is 0 (a flat step of the cdf) is never drawn
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * (cdf[:, -1:] * (1 - 2.0 ** -22))
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)


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
    sampling = dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    config = GenerationConfig(
        max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=True, return_dict_in_generate=True, output_logits=True,
        **(sampling if gen.temperature > 0 else dict(do_sample=False)))
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
    if kind == "gpt2":
        if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn or not cfg.scale_attn_weights:
            return "GPT-2 attention variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn) are not supported"
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
    bit-for-bit the rotate_half of the plain one (and the flip costs no op at decode time)."""
    heads = w.unflatten(0, (n_heads, 2, -1))  # (H, 2, D/2, ...)
    return torch.cat([-heads[:, 1:], heads[:, :1]], 1).flatten(0, 2)


def _fn_act(name: str, module: Any) -> Callable:
    """The activation as a plain function (an nn.Module call costs a few microseconds per step)."""
    table = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
             "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
             "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
    return table.get(name, module)


def _bias(biases: list, weights: list) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else w.new_zeros(len(w)) for b, w in zip(biases, weights)])


@dataclass
class _Layer:
    norm1: tuple
    norm2: tuple
    wqkv: torch.Tensor
    """(out, in): Llama [q; k; rot(q); rot(k); v] (RoPE folded in, see _rotate_rows), GPT-2 [q; k; v]; q rows
    pre-multiplied by the attention scale 1/sqrt(D)."""
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    w_in: torch.Tensor
    """gate and up stacked (gated MLP) or c_fc."""
    b_in: torch.Tensor | None
    w_out: torch.Tensor
    b_out: torch.Tensor | None
    act: Callable


def _llama_layers(inner: Any, n_heads: int, n_kv: int) -> list[_Layer]:
    layers = []
    act = _fn_act(inner.config.hidden_act, inner.model.layers[0].mlp.act_fn)
    for blk in inner.model.layers:
        at, mlp = blk.self_attn, blk.mlp
        (wq, bq), (wk, bk), (wv, bv) = _linear(at.q_proj), _linear(at.k_proj), _linear(at.v_proj)
        wqr, wkr = _rotate_rows(wq, n_heads), _rotate_rows(wk, n_kv)
        bqr = None if bq is None else _rotate_rows(bq, n_heads)
        bkr = None if bk is None else _rotate_rows(bk, n_kv)
        (wg, bg), (wu, bu) = _linear(mlp.gate_proj), _linear(mlp.up_proj)
        wo, bo = _linear(at.o_proj)
        w_out, b_out = _linear(mlp.down_proj)
        s = (wq.shape[0] // n_heads) ** -0.5  # attention scale 1/sqrt(D), folded into the q rows
        bq, bqr = (None, None) if bq is None else (bq * s, bqr * s)
        layers.append(_Layer(
            norm1=(blk.input_layernorm.weight, None), norm2=(blk.post_attention_layernorm.weight, None),
            wqkv=torch.cat([wq * s, wk, wqr * s, wkr, wv]),
            bqkv=_bias([bq, bk, bqr, bkr, bv], [wq, wk, wqr, wkr, wv]),
            wo=wo, bo=bo, w_in=torch.cat([wg, wu]), b_in=_bias([bg, bu], [wg, wu]), w_out=w_out, b_out=b_out,
            act=act))
    return layers


def _gpt2_layers(inner: Any) -> list[_Layer]:
    layers = []
    act = _fn_act(inner.config.activation_function, inner.transformer.h[0].mlp.act)
    for blk in inner.transformer.h:
        at, mlp = blk.attn, blk.mlp
        wqkv, bqkv = _linear(at.c_attn, conv1d=True)
        n = wqkv.shape[1]  # hidden size: rows [0, n) are q
        scale = torch.ones(wqkv.shape[0], dtype=wqkv.dtype, device=wqkv.device)
        scale[:n] = (n // inner.config.n_head) ** -0.5  # attention scale 1/sqrt(D), folded into the q rows
        wqkv, bqkv = wqkv * scale[:, None], None if bqkv is None else bqkv * scale
        wo, bo = _linear(at.c_proj, conv1d=True)
        w_in, b_in = _linear(mlp.c_fc, conv1d=True)
        w_out, b_out = _linear(mlp.c_proj, conv1d=True)
        layers.append(_Layer(norm1=(blk.ln_1.weight, blk.ln_1.bias), norm2=(blk.ln_2.weight, blk.ln_2.bias),
                             wqkv=wqkv, bqkv=bqkv, wo=wo, bo=bo, w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out,
                             act=act))
    return layers


# ----------------------------------------------------------------------------------------------------------------
# Fast backend: decode loop


class FastDecoder:
    """KV-cache decoding with plain torch ops on the HF model's own weights.

    Built once per `sample()` call: fused projections and LoRA merges are computed then, so it always decodes with
    the current weights. `generate(prompts, gen, eos, pad)` -> (completions, finished, logprobs).
    The prompt is run once through `_prefill` (SDPA with a causal + padding mask); each new token then goes through
    `_step`, which works on (B, H) rows: ~14 compute ops per layer (attention is two small matmuls and a softmax
    over the cache; SDPA's fused CPU kernel costs more than that at one query per row).
    """

    def __init__(self, model: Any):
        reason = fast_unsupported_reason(model)
        if reason is not None:
            raise UserError(f"gen.backend=fast: {reason}")
        inner = _unwrap(model)
        cfg = inner.config
        self.kind = cfg.model_type
        first = next(inner.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.n_heads = cfg.num_attention_heads
        if self.kind == "gpt2":
            self.n_kv = self.n_heads
            self.head_dim = cfg.n_embd // cfg.n_head
            self.eps = cfg.layer_norm_epsilon
            self.embed, self.wpe = inner.transformer.wte.weight, inner.transformer.wpe.weight
            self.layers = _gpt2_layers(inner)
            self.norm_f = (inner.transformer.ln_f.weight, inner.transformer.ln_f.bias)
            self.max_positions = cfg.n_positions
        else:
            self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
            self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
            self.eps = cfg.rms_norm_eps
            self.embed, self.wpe = inner.model.embed_tokens.weight, None
            self.layers = _llama_layers(inner, self.n_heads, self.n_kv)
            self.norm_f = (inner.model.norm.weight, None)
            self.rotary = inner.model.rotary_emb
            self.max_positions = None
        self.lm_head = _linear(inner.lm_head)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "gpt2":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        xf = x.float()  # HF LlamaRMSNorm: normalise in float32, cast back, then scale
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _qkv(self, ly: _Layer, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
        """x (N, H) -> q (N, Hq, D), k and v (N, Hkv, D), RoPE applied; cos/sin broadcast to (N, 1, D)."""
        Hq, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        qkv = F.linear(x, ly.wqkv, ly.bqkv)  # (N, out)
        if cos is None:
            qkv = qkv.view(-1, Hq + 2 * Hkv, D)
            return qkv[:, :Hq], qkv[:, Hq: Hq + Hkv], qkv[:, Hq + Hkv:]
        n_qk = (Hq + Hkv) * D
        qk = qkv[:, :n_qk].unflatten(-1, (Hq + Hkv, D))  # (N, Hq+Hkv, D)
        qk_rot = qkv[:, n_qk: 2 * n_qk].unflatten(-1, (Hq + Hkv, D))  # rotate_half(qk)
        qk = torch.addcmul(qk * cos, qk_rot, sin)  # q·cos + rotate_half(q)·sin (HF apply_rotary_pos_emb)
        return qk[:, :Hq], qk[:, Hq:], qkv[:, 2 * n_qk:].unflatten(-1, (Hkv, D))

    @staticmethod
    def _residual(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """h + x @ w.T (+ b) as one addmm when there is no bias. h, x: (N, .)."""
        out = torch.addmm(h, x, w.t())
        return out if b is None else out.add_(b)

    def _mlp_block(self, ly: _Layer, h: torch.Tensor) -> torch.Tensor:
        x = F.linear(self._norm(h, *ly.norm2), ly.w_in, ly.b_in)
        if self.wpe is None:
            gate, up = x.chunk(2, dim=-1)
            x = ly.act(gate) * up
        else:
            x = ly.act(x)
        return self._residual(h, x, ly.w_out, ly.b_out)

    def _prefill(self, ids: torch.Tensor, pos: torch.Tensor, caches: list, mask: torch.Tensor) -> torch.Tensor:
        """The whole left-padded prompt ids (B, P) at positions pos; fills caches[:, :, :P]; last logits (B, V)."""
        B, P = ids.shape
        Hq, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        h = F.embedding(ids, self.embed).flatten(0, 1)  # (B*P, H)
        cos = sin = None
        if self.wpe is not None:
            h = h + F.embedding(pos, self.wpe).flatten(0, 1)
        else:
            cos, sin = self.cos[pos].flatten(0, 1).unsqueeze(1), self.sin[pos].flatten(0, 1).unsqueeze(1)
        for ly, (kc, vc) in zip(self.layers, caches):
            q, k, v = self._qkv(ly, self._norm(h, *ly.norm1), cos, sin)
            kc[:, :, :P] = k.unflatten(0, (B, P)).transpose(1, 2)  # (B, Hkv, P, D)
            vc[:, :, :P] = v.unflatten(0, (B, P)).transpose(1, 2)
            q = q.unflatten(0, (B, P)).transpose(1, 2)  # (B, Hq, P, D)
            a = F.scaled_dot_product_attention(q, kc[:, :, :P], vc[:, :, :P], attn_mask=mask,
                                               scale=1.0, enable_gqa=Hq != Hkv)  # (B, Hq, P, D)
            h = self._residual(h, a.transpose(1, 2).reshape(B * P, Hq * D), ly.wo, ly.bo)
            h = self._mlp_block(ly, h)
        last = self._norm(h.view(B, P, -1)[:, -1], *self.norm_f)  # (B, H)
        return F.linear(last, *self.lm_head)  # (B, V)

    def _step(self, tok: torch.Tensor, t: int, caches: list, mask: torch.Tensor, pos_embed: tuple) -> torch.Tensor:
        """One new token per row, tok (B,), written at cache slot t; mask: additive (B, 1, 1, t+1). Logits (B, V)."""
        B = tok.shape[0]
        Hq, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        h = F.embedding(tok, self.embed)  # (B, H)
        cos, sin = pos_embed
        if self.wpe is not None:
            h = h + cos  # GPT-2: cos holds the learned position embeddings of this step
            cos = sin = None
        for ly, (kc, vc) in zip(self.layers, caches):
            q, k, v = self._qkv(ly, self._norm(h, *ly.norm1), cos, sin)
            kc[:, :, t] = k  # (B, Hkv, D)
            vc[:, :, t] = v
            # GQA without copies: q head j*G + g attends with kv head j (HF repeat_kv order)
            scores = torch.matmul(q.reshape(B, Hkv, Hq // Hkv, D), kc[:, :, : t + 1].transpose(-1, -2))
            probs = torch.softmax(scores.add_(mask), dim=-1)  # (B, Hkv, G, t+1); q carries the scale
            a = torch.matmul(probs, vc[:, :, : t + 1])  # (B, Hkv, G, D)
            h = self._residual(h, a.view(B, Hq * D), ly.wo, ly.bo)
            h = self._mlp_block(ly, h)
        return F.linear(self._norm(h, *self.norm_f), *self.lm_head)  # (B, V)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], gen: GenConfig, eos: int, pad: int):
        if any(len(p) == 0 for p in prompts):
            raise UserError("sampling: a prompt encodes to zero tokens")
        ids, valid = pad_sequences(prompts, pad, side="left")  # (B, P)
        ids, valid = ids.to(self.device), valid.to(self.device).bool()
        B, P = ids.shape
        T = gen.max_new_tokens
        total = P + T
        lengths = valid.sum(-1)  # (B,) prompt lengths = position of the first new token
        if self.max_positions is not None and int(lengths.max()) + T > self.max_positions:
            raise UserError(f"sampling: prompt + gen.max_new_tokens exceeds the model's {self.max_positions} "
                            "positions")
        steps_pos = (lengths.unsqueeze(1) + torch.arange(T, device=self.device)).t()  # (T, B)
        if self.wpe is None:
            self.cos, self.sin = self.rotary(self.embed[:1], torch.arange(total, device=self.device)[None])
            self.cos, self.sin = self.cos[0], self.sin[0]  # (P+T, D)
            pos_embed = (self.cos[steps_pos].unsqueeze(2), self.sin[steps_pos].unsqueeze(2))  # (T, B, 1, D)
        else:
            pos_embed = (F.embedding(steps_pos, self.wpe), None)  # (T, B, H)
        caches = [(torch.zeros(B, self.n_kv, total, self.head_dim, dtype=self.dtype, device=self.device),
                   torch.zeros(B, self.n_kv, total, self.head_dim, dtype=self.dtype, device=self.device))
                  for _ in self.layers]
        neg = torch.finfo(self.dtype).min
        keys = torch.cat([valid, valid.new_ones(B, T)], 1)  # (B, P+T): cache slots holding real tokens
        step_mask = torch.zeros(B, 1, 1, total, dtype=self.dtype, device=self.device).masked_fill(
            ~keys[:, None, None, :], neg)
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()
        # pad query rows attend to themselves only, so no softmax row is empty (their outputs are never read)
        allowed = (causal & valid[:, None, None, :]) | torch.eye(P, dtype=torch.bool, device=self.device)
        prefill_mask = torch.zeros(B, 1, P, P, dtype=self.dtype, device=self.device).masked_fill(~allowed, neg)

        logits = self._prefill(ids, position_ids_from_mask(valid.long()), caches, prefill_mask)
        tokens, lps = [], []
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for t in range(T):
            tok, lp = sample_next(logits, gen, ban=eos if t < gen.min_new_tokens else None)
            tokens.append(tok)
            lps.append(lp)
            done |= tok == eos
            if t == T - 1 or bool(done.all()):
                break
            pe = (pos_embed[0][t], None if pos_embed[1] is None else pos_embed[1][t])
            logits = self._step(tok, P + t, caches, step_mask[..., : P + t + 1], pe)
        return _trim(torch.stack(tokens, 1).tolist(), torch.stack(lps, 1).tolist(), eos)
