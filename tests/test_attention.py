"""rlhfkit.attention: the plain-product attention for small CPU problems equals transformers' SDPA attention."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.integrations import sdpa_attention

from rlhfkit import attention as A
from rlhfkit.config import ModelConfig
from rlhfkit.data.collate import additive_mask
from rlhfkit.models import load_causal_lm

NEG = torch.finfo(torch.float32).min


class Attn(torch.nn.Module):
    """What transformers passes as `module`: GQA groups and causality."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def qkv(B, H, Hkv, Lq, Lk, D, seed=0):
    """Tensors in transformers' layout: (B, L, heads, D) transposed to (B, heads, L, D), leaves with gradients."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Lk, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, Lk, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    return q, k, v


def both(B, H, Hkv, Lq, Lk, D, mask, real=None, seed=0):
    """(ours, SDPA's) outputs and the gradients of a fixed weighting of the outputs at the `real` queries (B, Lq)
    (default all) for the same inputs."""
    res = []
    for fn in (A.small_attention_forward, sdpa_attention.sdpa_attention_forward):
        q, k, v = qkv(B, H, Hkv, Lq, Lk, D, seed)
        out, _ = fn(Attn(H // Hkv), q, k, v, mask)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
        keep = torch.ones(B, Lq, dtype=torch.bool) if real is None else real
        res.append((out, torch.autograd.grad((out * weight)[keep].sum(), (q, k, v))))
    return res


def padded_causal(B, Lq, Lk, pad):
    """(B, 1, Lq, Lk) bool, True = attend: causal (last query at the last key), row b left-padded by pad[b]."""
    allowed = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq).expand(B, 1, Lq, Lk).clone()
    for b, p in enumerate(pad):
        allowed[b, :, :, :p] = False
    return allowed


@pytest.mark.parametrize("H,Hkv,D", [(8, 4, 8), (4, 4, 16), (6, 2, 32)])
@pytest.mark.parametrize("kind", ["bool", "float", "none"])
def test_equals_sdpa_outputs_and_gradients(H, Hkv, D, kind):
    B, L, pad = 3, 11, [0, 3, 5]
    allowed = padded_causal(B, L, L, pad)
    mask = {"bool": allowed, "float": torch.zeros(B, 1, L, L).masked_fill(~allowed, NEG), "none": None}[kind]
    real = torch.ones(B, L, dtype=torch.bool)
    if kind != "none":  # padding queries see no key: SDPA gives 0 (bool mask) or a uniform mix; nobody reads them
        for b, p in enumerate(pad):
            real[b, :p] = False
    (out, grads), (ref, ref_grads) = both(B, H, Hkv, L, L, D, mask, real)
    assert torch.allclose(out[real], ref[real], atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5)


def test_cached_keys_decode_step_and_unmasked_causal_prefix():
    # a query block after cached keys with a mask (the prompt-sharing pass), one decode query, and transformers'
    # mask-less causal call with more keys than queries (aligned at the first key, as its sdpa does)
    for Lq, Lk, mask in [(5, 9, padded_causal(2, 5, 9, [0, 2])), (1, 9, padded_causal(2, 1, 9, [1, 0])),
                         (6, 9, None)]:
        (out, grads), (ref, ref_grads) = both(2, 8, 4, Lq, Lk, 8, mask, seed=3)
        assert torch.allclose(out, ref, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, atol=1e-5)


def test_large_deep_or_dropout_calls_go_to_sdpa(monkeypatch):
    calls = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    module = Attn(1)
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    A.small_attention_forward(module, q, k, v, None)
    assert calls == []  # small: the plain products
    q, k, v = qkv(1, 2, 2, 4, 4, A.SMALL_ATTENTION_HEAD_DIM * 2)
    A.small_attention_forward(module, q, k, v, None)
    assert len(calls) == 1  # head too deep
    monkeypatch.setattr(A, "SMALL_ATTENTION_SCORES", 2 * 2 * 4 * 4 - 1)
    q, k, v = qkv(2, 2, 2, 4, 4, 8)
    A.small_attention_forward(module, q, k, v, None)
    assert len(calls) == 2  # too many scores
    monkeypatch.setattr(A, "SMALL_ATTENTION_SCORES", 2 ** 20)
    module.train()
    A.small_attention_forward(module, q, k, v, None, dropout=0.1)
    assert len(calls) == 3  # attention dropout in training
    A.small_attention_forward(module.eval(), q, k, v, None, dropout=0.1)
    assert len(calls) == 3  # dropout is off in eval
    with pytest.raises(ValueError, match="softcap"):  # extras go to SDPA, which refuses this one
        A.small_attention_forward(module, q, k, v, None, softcap=30.0)


def test_reused_buffers_keep_two_live_graphs_apart():
    # two forwards before their backwards (both graphs hold score buffers): each gets its own gradients
    def grads(seeds):
        outs = []
        for s in seeds:
            q, k, v = qkv(2, 8, 4, 7, 7, 8, seed=s)
            o, _ = A.small_attention_forward(Attn(2), q, k, v, None)
            outs.append((o, (q, k, v)))
        return [torch.autograd.grad((o * o).sum(), inputs) for o, inputs in outs]

    together = grads([1, 2])
    alone = grads([1]) + grads([2])
    for a, b in zip(together, alone):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert A._POOL.free  # the score buffers went back to the pool


def test_model_switch_same_logits_and_not_saved(tmp_path):
    model = load_causal_lm(ModelConfig(), torch.device("cpu"))
    assert model.config._attn_implementation == A.NAME
    ids = torch.tensor([[0, 0, 5, 9, 33, 7], [4, 8, 15, 16, 23, 42]])
    valid = ids != 0
    mask4d = additive_mask(torch.ones(6, 6, dtype=torch.bool).tril() & valid[:, None, None, :], torch.float32)
    with torch.no_grad():
        ours = [model(input_ids=ids, attention_mask=valid.long()).logits,
                model(input_ids=ids, attention_mask=mask4d).logits]
        model.set_attn_implementation("sdpa")
        ref = [model(input_ids=ids, attention_mask=valid.long()).logits,
               model(input_ids=ids, attention_mask=mask4d).logits]
    for o, r in zip(ours, ref):
        assert torch.allclose(o[valid], r[valid], atol=1e-4)
    model.set_attn_implementation(A.NAME)
    model.save_pretrained(tmp_path)
    assert "rlhfkit" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_eager_models_are_left_alone(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, attn_implementation="eager")
    assert not A.use_small_attention(model)
    assert model.config._attn_implementation == "eager"


def test_buffers_from_inference_mode_are_not_reused_outside_it():
    q, k, v = qkv(2, 8, 4, 7, 7, 8)
    with torch.inference_mode():
        A.small_attention_forward(Attn(2), q, k, v, None)  # leaves inference buffers in the pool
    out, _ = A.small_attention_forward(Attn(2), q, k, v, None)  # would fail writing into one of them
    torch.autograd.grad(out.sum(), (q, k, v))


def test_bool_mask_edited_in_place_is_not_served_stale():
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    allowed = padded_causal(1, 4, 4, [0])
    first, _ = A.small_attention_forward(Attn(1), q, k, v, allowed)
    allowed[0, 0, 3, :3] = False  # the last query now sees only itself
    second, _ = A.small_attention_forward(Attn(1), q, k, v, allowed)
    assert torch.allclose(second[0, 3, :, :], v[0, :, 3, :], atol=1e-6)
    assert not torch.allclose(first[0, 3], second[0, 3])


def test_bool_masks_made_in_inference_mode():
    q, k, v = qkv(2, 8, 4, 7, 7, 8)
    with torch.inference_mode():
        allowed = padded_causal(2, 7, 7, [0, 2])  # an inference tensor: no version counter
        out, _ = A.small_attention_forward(Attn(2), q, k, v, allowed)
        ref, _ = sdpa_attention.sdpa_attention_forward(Attn(2), q, k, v, allowed)
    assert torch.allclose(out[0], ref[0], atol=1e-5) and torch.allclose(out[1, 2:], ref[1, 2:], atol=1e-5)


ARCHITECTURES = {  # tiny random models of several families (head dim 8), built from their configs
    "llama": {},
    "mistral": {"sliding_window": 4},  # the window lives in the mask
    "qwen3": {"head_dim": 8},
    "gpt_neox": {},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},
    "phi": {},
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_model_families_score_and_train_as_with_sdpa(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    if arch in ("gpt2", "opt", "gpt_neox", "phi"):
        base = {k: v for k, v in base.items() if k != "num_key_value_heads"}
    if arch == "gpt2":
        base = {"vocab_size": 100}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **base, **ARCHITECTURES[arch]),
                                             attn_implementation="sdpa").eval()
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3], mask[2, :5] = 0, 0  # left padding
    real = mask.bool()

    def run():
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits[real] * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach()[real], [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref, ref_grads = run()
    assert A.use_small_attention(model) and model.config._attn_implementation == A.NAME
    out, grads = run()
    assert torch.allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5 * max(1.0, float(r.abs().max())))
