"""The fast decode loop (rlhfkit.rollout, gen.backend=fast) against HF generate and the training forward.

Reference: transformers `generate()` (greedy tokens must be identical) and rlhfkit.rl.forward_logprobs (the
sampling log-probs must equal the training forward's, PITFALLS 1). Models: the bundled stories260k, tiny random
Llama (GQA), Qwen2 (q/k/v biases) and GPT-2 models, and stories260k with a LoRA adapter.
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch

from rlhfkit import models as M
from rlhfkit import rl as R
from rlhfkit import rollout
from rlhfkit.config import GenConfig, ModelConfig
from rlhfkit.errors import UserError
from rlhfkit.rollout import FastDecoder, resolve_backend, sample

TOK = SimpleNamespace(eos_token_id=2, pad_token_id=0)  # sample() only reads these two ids


@pytest.fixture(scope="module")
def stories():
    torch.manual_seed(0)
    return M.load_causal_lm(ModelConfig(), torch.device("cpu")).eval()


def random_prompts(n: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 17) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def tiny_model(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    if kind == "llama-gqa":
        cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2-bias":
        cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # make the q/k/v biases matter (they start at 0)
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        cfg = GPT2Config(vocab_size=300, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=2,
                         eos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharpen the random model so greedy choices are far from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    M.disable_dropout(model)
    return model.eval()


def assert_same_greedy(model, prompts, max_new_tokens=24):
    gen = GenConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=len(prompts))
    hf = sample(model, TOK, prompts, GenConfig(**{**gen.__dict__, "backend": "hf"}))
    fast = sample(model, TOK, prompts, GenConfig(**{**gen.__dict__, "backend": "fast"}))
    assert fast.completion_ids == hf.completion_ids
    assert fast.finished == hf.finished
    for a, b in zip(fast.logprobs, hf.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    return fast


def test_greedy_tokens_equal_hf_generate_stories260k(stories):
    prompts = random_prompts(6, 512, lo=2, hi=20)  # left padding of 0..17 tokens
    fast = assert_same_greedy(stories, prompts, max_new_tokens=40)
    assert len({tuple(c) for c in fast.completion_ids}) > 1


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias", "gpt2"])
def test_greedy_tokens_equal_hf_generate_tiny_random(kind):
    model = tiny_model(kind)
    assert resolve_backend(model, "auto") == "fast"
    assert_same_greedy(model, random_prompts(5, 300, seed=3))


def test_greedy_tokens_equal_hf_generate_with_lora(stories):
    import copy

    lora = M.apply_lora(copy.deepcopy(stories), ModelConfig(lora_r=4, lora_alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at 0; give the adapter a real effect
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    prompts = random_prompts(4, 512, seed=5)
    fast = assert_same_greedy(lora.eval(), prompts)
    base = sample(stories, TOK, prompts, GenConfig(max_new_tokens=24, temperature=0.0, backend="fast"))
    assert fast.completion_ids != base.completion_ids  # the adapter was used
    with lora.disable_adapter():  # adapter off: the decoder sees the base weights
        off = sample(lora, TOK, prompts, GenConfig(max_new_tokens=24, temperature=0.0, backend="fast"))
    assert off.completion_ids == base.completion_ids


@pytest.mark.parametrize("kind", ["stories", "gpt2"])
def test_repeated_prompts_prefilled_once_decode_as_distinct(stories, kind, monkeypatch):
    """GRPO/RLOO batches repeat each prompt G times, interleaved with other prompts: the decoder prefills each
    distinct prompt once and copies its cache to its rows. Greedy tokens and log-probs equal HF generate's, and
    the prefill really ran on the distinct prompts only."""
    model = stories if kind == "stories" else tiny_model("gpt2")
    distinct = random_prompts(3, 300, seed=7, lo=2, hi=14)
    prompts = [distinct[i] for i in (2, 0, 2, 1, 0, 2, 1)]  # 7 rows, 3 prompts, unsorted
    rows = []
    prefill = FastDecoder._prefill
    monkeypatch.setattr(FastDecoder, "_prefill", lambda self, ids, *a: rows.append(ids.shape[0]) or
                        prefill(self, ids, *a))
    fast = assert_same_greedy(model, prompts)
    assert rows == [3]
    assert fast.completion_ids[0] == fast.completion_ids[2] == fast.completion_ids[5]
    assert fast.completion_ids[1] != fast.completion_ids[0]


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_sampling_logprobs_equal_training_forward(stories, backend):
    """Left-padded batch, temperature 0.7: the training forward (position_ids = cumsum(mask) - 1, logits / T)
    reproduces the log-probs the sampler drew with (PITFALLS 1)."""
    prompts = random_prompts(8, 512, seed=11, lo=1, hi=25)
    gen = GenConfig(max_new_tokens=20, temperature=0.7, backend=backend)
    s = sample(stories, TOK, prompts, gen, seed=0)
    batch = R.make_rollout_batch(s.prompt_ids, s.completion_ids, s.logprobs, pad_id=0, eos_id=2,
                                 prompts=[""] * 8, completions=[""] * 8)
    assert batch.attention_mask[:, 0].min() == 0  # really left-padded
    with torch.no_grad():
        lp, _ = R.forward_logprobs(stories, batch, 0.7)
    mask = batch.completion_mask.bool()
    diff = (lp - batch.rollout_logprobs).abs()[mask]
    assert diff.max() < 1e-4, diff.max()
    # and the temperature matters: scoring at T=1 gives clearly different numbers
    with torch.no_grad():
        lp1, _ = R.forward_logprobs(stories, batch, 1.0)
    assert (lp1 - batch.rollout_logprobs).abs()[mask].max() > 1e-2


def rigged_eos_model(eos_logit: float):
    """Tiny Llama whose lm_head gives EOS (id 2) a fixed extra logit: EOS comes at random steps per row."""
    model = tiny_model("llama-gqa")
    with torch.no_grad():
        model.lm_head.weight[2].zero_()
        model.lm_head.bias = None
        model.lm_head.weight[2].add_(0.0)
        model.model.norm.weight.fill_(1.0)
    bias = torch.zeros(300)
    bias[2] = eos_logit
    head = torch.nn.Linear(64, 300, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(bias)
    model.lm_head = head
    return model


def test_stops_on_eos_per_sequence_and_batch_stops_early():
    model = rigged_eos_model(eos_logit=3.0)
    prompts = random_prompts(16, 300, seed=2)
    s = sample(model, TOK, prompts, GenConfig(max_new_tokens=30, temperature=1.0, backend="fast"), seed=0)
    lengths = [len(c) for c in s.completion_ids]
    assert len(set(lengths)) > 3  # rows stop at different steps
    for c, f in zip(s.completion_ids, s.finished):
        assert f == (c[-1] == 2) and 2 not in c[:-1]  # EOS once, at the end, when finished
        assert f or len(c) == 30
    # min_new_tokens bans EOS before step 5; an EOS-certain model then stops every row at step 5 at once. With
    # an EOS logit of 200 every other token's probability underflows to 0 in float32: the banned rows must still
    # renormalise, and their log-probs stay finite (about -200) instead of -inf
    sure = rigged_eos_model(eos_logit=200.0)
    s = sample(sure, TOK, prompts, GenConfig(max_new_tokens=30, min_new_tokens=5, temperature=1.0,
                                             backend="fast"), seed=0)
    assert all(len(c) == 6 and f for c, f in zip(s.completion_ids, s.finished))
    lps = torch.tensor(s.logprobs)  # (16, 6)
    assert torch.isfinite(lps).all() and (lps[:, :5] < -100).all() and (lps[:, 5] > -1e-3).all()


def test_sample_next_filters_and_inverse_cdf():
    from rlhfkit.rollout import sample_next

    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(20000, 4).contiguous()
    tok, lp = sample_next(logits, GenConfig(temperature=1.0))
    assert tok.shape == lp.shape == (20000, 1)
    tok, lp = tok.squeeze(-1), lp.squeeze(-1)
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert torch.allclose(freq, probs, atol=0.015) and freq[3] == 0  # zero probability never drawn
    assert torch.allclose(lp, probs.log()[tok], atol=1e-6)
    # top-k 1 and a tiny top-p are greedy; a banned token is never drawn; greedy scores at T = 1
    for gen in (GenConfig(temperature=1.0, top_k=1), GenConfig(temperature=1.0, top_p=0.1)):
        assert (sample_next(logits[:100], gen)[0] == 0).all()
    banned, _ = sample_next(logits[:2000], GenConfig(temperature=1.0), ban=0)
    assert (banned != 0).all()
    g_tok, g_lp = sample_next(logits[:3] / 0.5, GenConfig(temperature=0.0))
    assert (g_tok == 0).all() and torch.allclose(g_lp, torch.log_softmax(logits[:3] / 0.5, -1)[:, :1])
    # top-p keeps the smallest set reaching p: 0.5 + 0.3 >= 0.7 -> only tokens 0 and 1
    tp, _ = sample_next(logits[:5000], GenConfig(temperature=1.0, top_p=0.7))
    assert set(tp.flatten().tolist()) == {0, 1}


def test_seed_determinism_and_caller_rng_untouched(stories):
    prompts = random_prompts(4, 512, seed=4)
    gen = GenConfig(max_new_tokens=16, temperature=1.0, backend="fast")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sample(stories, TOK, prompts, gen, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = sample(stories, TOK, prompts, gen, seed=7)
    c = sample(stories, TOK, prompts, gen, seed=8)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert a.completion_ids != c.completion_ids
    # without a seed, successive calls draw fresh samples from the global RNG
    d, e = sample(stories, TOK, prompts, gen), sample(stories, TOK, prompts, gen)
    assert d.completion_ids != e.completion_ids and not torch.equal(torch.get_rng_state(), before)


def test_backend_resolution_and_hf_fallback():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    assert resolve_backend(opt, "auto") == "hf"
    with pytest.raises(UserError, match="gen.backend=fast"):
        resolve_backend(opt, "fast")
    with pytest.raises(UserError, match="gen.backend=fast"):
        FastDecoder(opt)
    s = sample(opt, TOK, random_prompts(2, 300), GenConfig(max_new_tokens=5, temperature=0.0, backend="auto"))
    assert all(len(c) <= 5 for c in s.completion_ids) and len(s.logprobs) == 2


def test_sample_next_ban_renormalises_the_rest_and_scores_unfiltered():
    """EOS banned (min_new_tokens): the other tokens keep their relative odds (0.3 : 0.2 -> 0.6 : 0.4), log-probs are
    those of the unfiltered distribution; a row whose whole float32 mass sits on the banned token (its softmax
    rounds the others to 0) still draws from the rest, through the log-space path."""
    from rlhfkit.rollout import sample_next

    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(20000, 4).contiguous()
    tok, lp = sample_next(logits, GenConfig(temperature=1.0), ban=0)
    tok, lp = tok.squeeze(-1), lp.squeeze(-1)
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert freq[0] == 0 and freq[3] == 0 and abs(freq[1] - 0.6) < 0.015 and abs(freq[2] - 0.4) < 0.015
    assert torch.allclose(lp, probs.log()[tok], atol=1e-6)
    sure = torch.tensor([[0.0, -200.0, -201.0, -1e4]]).expand(2000, 4).contiguous()  # softmax: [1, 0, 0, 0]
    tok, lp = sample_next(sure, GenConfig(temperature=1.0), ban=0)
    freq = torch.bincount(tok.squeeze(-1), minlength=4).float() / len(tok)
    e = 1 / (1 + torch.exp(torch.tensor(-1.0)))  # p(1 | not 0) = e^-200 / (e^-200 + e^-201)
    assert freq[0] == 0 and freq[3] == 0 and abs(freq[1] - e) < 0.03
    assert torch.isfinite(lp).all() and (lp < -199).all()


@pytest.mark.parametrize("kernel", [True, False])
def test_prepacked_projections_equal_naive_with_fused_post_ops(kernel, monkeypatch):
    """_Proj on CPU float32 (rlhfkit's kernel; without it oneDNN's prepacked weights, small ones plain addmm):
    act(x Wᵀ + b) and h + x Wᵀ + b equal the plain products; an activation without a oneDNN post-op is applied
    after the product (it used to be dropped)."""
    from rlhfkit import kernels
    from rlhfkit import rollout as R

    monkeypatch.setattr(R, "KERNEL_PRODUCTS", kernel)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1024, 256, generator=g), torch.randn(1024, generator=g)
    x, h = torch.randn(8, 256, generator=g), torch.randn(8, 1024, generator=g)
    proj = R._Proj(w, b, rows=8)
    onednn = torch.backends.mkldnn.is_available()
    expected = R.KERNEL if kernel and kernels.available() else R.ONEDNN if onednn else R.MM
    assert proj.kind == expected
    ref = x @ w.t() + b
    torch.testing.assert_close(proj(x), ref, rtol=1e-5, atol=1e-4)
    tanh = lambda y: torch.nn.functional.gelu(y, approximate="tanh")  # noqa: E731
    torch.testing.assert_close(proj(x, ("gelu", "tanh"), tanh), tanh(ref), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(proj(x, None, torch.sigmoid), torch.sigmoid(ref), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(proj.add(x, h), h + ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(proj(torch.randn(37, 256, generator=g)).shape, torch.Size([37, 1024]))
    # GPT-2's Conv1D weight is (in, out): its transposed view is packed in place, other strides after a copy
    conv1d = w.t().contiguous()
    torch.testing.assert_close(R._Proj(conv1d.t(), b, rows=8)(x), ref, rtol=1e-5, atol=1e-4)
    wide = torch.randn(1024, 512, generator=g)
    torch.testing.assert_close(R._Proj(wide[:, ::2], None, rows=8)(x), x @ wide[:, ::2].t(), rtol=1e-5, atol=1e-4)
    small = R._Proj(w[:64, :64], None, rows=8)  # below PACK_MIN_WEIGHTS: oneDNN is not worth it, the kernel is
    assert small.kind == (R.KERNEL if expected == R.KERNEL else R.MM)
    torch.testing.assert_close(small(x[:, :64]), x[:, :64] @ w[:64, :64].t())
    # a LayerNorm before the product (GPT-2's ln_1 / ln_2 / ln_f): the kernel folds its weight and bias into W, b
    gamma, beta = torch.rand(256, generator=g) + 0.5, torch.randn(256, generator=g)
    ln = R._Proj(conv1d.t(), b, rows=8, norm=R._Norm(kernels.LAYER, 1e-5, gamma, beta))
    normed = torch.nn.functional.layer_norm(x * 4 + 3, (256,), gamma, beta, 1e-5)
    torch.testing.assert_close(ln(x * 4 + 3), normed @ w.t() + b, rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(ln.add(x * 4 + 3, h), h + normed @ w.t() + b, rtol=1e-5, atol=2e-4)


def test_gpt2_large_enough_to_prepack_equals_hf_and_thread_count_does_not_change_samples():
    """A GPT-2 with n_embd 256 (its projections are prepacked): greedy tokens equal HF generate's, and sampling
    gives the same tokens whatever the decode thread count (the products split rows and columns, not sums)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=300, n_positions=128, n_embd=256, n_layer=2, n_head=4, bos_token_id=2,
                     eos_token_id=2)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    M.disable_dropout(model)
    model.eval()
    dec = FastDecoder(model, batch=6)
    if torch.backends.mkldnn.is_available():
        assert dec.layers[0].qkv.packed is not None and dec.lm_head.packed is not None  # kernel or oneDNN
    prompts = random_prompts(6, 300, seed=5)
    assert_same_greedy(model, prompts, max_new_tokens=20)
    gen = GenConfig(max_new_tokens=20, temperature=1.0, batch_size=6, backend="fast")
    import rlhfkit.rollout as rollout_module

    n, old = torch.get_num_threads(), rollout_module.DECODE_ONE_THREAD_FLOPS
    try:
        torch.set_num_threads(1)
        assert dec.decode_threads(6) == [1]
        one = sample(model, TOK, prompts, gen, seed=3)  # every op on one thread
        torch.set_num_threads(2)
        # small steps: timed on 1 and on 2 threads at the start of each call, the faster kept; large: always 2
        assert dec.decode_threads(6) == [1, 2] and dec.decode_threads(10 ** 6) == [2]
        tuned = FastDecoder(model, batch=6)
        tuned.generate(prompts, gen, eos=TOK.eos_token_id, pad=0)
        assert tuned.tuned_threads in (1, 2) and torch.get_num_threads() == 2  # restored after the call
        mixed = sample(model, TOK, prompts, gen, seed=3)  # thread counts change between steps of this call
        rollout_module.DECODE_ONE_THREAD_FLOPS = 0  # every decode step on 2 threads
        two = sample(model, TOK, prompts, gen, seed=3)
    finally:
        rollout_module.DECODE_ONE_THREAD_FLOPS = old
        torch.set_num_threads(n)
    assert one.completion_ids == mixed.completion_ids == two.completion_ids


@pytest.mark.parametrize("n_embd", [64, 256])
def test_gpt2_activation_the_decoder_does_not_implement_is_still_applied(n_embd):
    """A GPT-2 whose activation is not in rollout._ACTS (gelu_fast) runs the model's own activation module after
    fc_in: greedy tokens and log-probs equal HF's (the activation used to be skipped: log-probs off by 0.1-0.3)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=n_embd, n_layer=2, n_head=4,
                                       bos_token_id=2, eos_token_id=2, activation_function="gelu_fast"))
    M.disable_dropout(model)
    model.eval()
    assert_same_greedy(model, random_prompts(4, 300, seed=9), max_new_tokens=16)


@pytest.mark.parametrize("kind", ["stories260k", "llama-gqa", "qwen2-bias", "gpt2", "gpt2-packed", "unknown-act"])
def test_scripted_decode_step_samples_exactly_like_the_eager_step(stories, kind, monkeypatch):
    """On CPU float32 the decode step's layers run as the TorchScript-compiled rollout._decode_layers: the same
    tokens and bit-identical sampling log-probs as the eager FastDecoder._step, with GQA, q/k/v biases, GPT-2
    LayerNorm + fused GELU, prepacked weights; an activation it does not implement keeps the eager step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if kind == "stories260k":
        model = stories
    elif kind in ("gpt2-packed", "unknown-act"):
        torch.manual_seed(3)
        act = "gelu_new" if kind == "gpt2-packed" else "gelu_fast"  # gelu_fast: not in rollout._ACTS
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=128, n_embd=256, n_layer=2, n_head=4,
                                           bos_token_id=2, eos_token_id=2, activation_function=act))
        M.disable_dropout(model)
        model.eval()
    else:
        model = tiny_model(kind)
    dec = FastDecoder(model, batch=5)
    assert (dec._script_args is None) == (kind == "unknown-act")
    assert rollout._scripted_layers() is not None
    if kind == "gpt2-packed" and torch.backends.mkldnn.is_available():
        assert all(dec._script_args[3])  # every projection packed (kernel or oneDNN)
    compiled = []
    original = rollout._scripted_layers
    monkeypatch.setattr(rollout, "_scripted_layers", lambda: compiled.append(1) or original())
    vocab = model.config.vocab_size
    prompts = random_prompts(5, vocab, seed=7)
    gen = GenConfig(max_new_tokens=12, min_new_tokens=4, temperature=1.0, batch_size=5, backend="fast")
    monkeypatch.setattr(rollout, "DECODE_ONE_THREAD_FLOPS", 0)  # no thread tuning: MKL's sums follow the count
    runs = {}
    for scripted in (True, False):
        monkeypatch.setattr(rollout, "SCRIPTED_DECODE", scripted)
        compiled.clear()
        runs[scripted] = sample(model, TOK, prompts, gen, seed=11)
        assert bool(compiled) == (scripted and kind != "unknown-act")  # the scripted layers ran (or not)
    assert runs[True].completion_ids == runs[False].completion_ids
    assert runs[True].logprobs == runs[False].logprobs


def test_scripted_step_compiled_from_other_source_lines_is_dropped(stories, monkeypatch):
    """TorchScript reads the source file at compile time; when rollout.py changed under a running process it
    compiled another function's lines (seen: _proj_add's) and the first decode step failed. A compiled function
    whose arguments are not _decode_layers' is now dropped: the eager step runs and sampling works."""
    script = torch.jit.script
    monkeypatch.setattr(rollout, "_SCRIPTED", [])
    monkeypatch.setattr(torch.jit, "script", lambda fn: script(rollout._proj_add))  # what a stale file compiles
    assert rollout._scripted_layers() is None
    gen = GenConfig(max_new_tokens=6, temperature=1.0, batch_size=3, backend="fast")
    out = sample(stories, TOK, random_prompts(3, 512, seed=1), gen, seed=0)  # raised with the stale function
    assert len(out.completion_ids) == 3 and all(1 <= len(c) <= 6 for c in out.completion_ids)
    monkeypatch.setattr(torch.jit, "script", script)
    monkeypatch.setattr(rollout, "_SCRIPTED", [])
    assert rollout._scripted_layers() is not None  # the real source compiles


@pytest.mark.parametrize("kind", ["stories", "llama-gqa", "gpt2"])
def test_half_precision_decoder_scores_like_the_training_forward(stories, kind):
    """bf16 weights: the decoder runs (attention softmax in fp32, as HF does) and its sampling log-probs agree
    with the bf16 training forward to bf16 rounding (measured: mean 0.003-0.03, max 0.01-0.18 nats)."""
    import copy

    model = copy.deepcopy(stories if kind == "stories" else tiny_model(kind)).to(torch.bfloat16)
    prompts = random_prompts(6, 300, seed=11, lo=1, hi=25)
    s = sample(model, TOK, prompts, GenConfig(max_new_tokens=16, temperature=1.0, backend="fast"), seed=0)
    batch = R.make_rollout_batch(s.prompt_ids, s.completion_ids, s.logprobs, pad_id=0, eos_id=2,
                                 prompts=[""] * 6, completions=[""] * 6)
    with torch.no_grad():
        lp, _ = R.forward_logprobs(model, batch, 1.0)
    diff = (lp.float() - batch.rollout_logprobs).abs()[batch.completion_mask.bool()]
    assert torch.isfinite(batch.rollout_logprobs).all()
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean(), diff.max())


@pytest.mark.parametrize("kind", ["stories", "llama-gqa", "qwen2-bias", "gpt2"])
@pytest.mark.parametrize("attention", ["grouped", "sdpa"])
@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_frozen_reference_scores_like_the_modules(stories, kind, attention, packing, monkeypatch):
    """The trainers' frozen reference is scored on the decoder's folded weights (rl.frozen_decoder): the log-probs
    equal the HF modules' forward (rl.forward_logprobs) on left-padded rows with completions of different lengths
    (EOS, pads after it), at temperature 0.7, one-pass and with each prompt shared by a run of 3 rows; the
    decoder is built once and rebuilt when a weight changes in place. Grouped-query models run both attention
    paths of FastDecoder._forward (explicit grouped products for small score tensors, SDPA on repeated k/v), and
    every pass runs with its real tokens packed (PACK_PADDING_MIN 0) and in the padded layout (1.0)."""
    monkeypatch.setattr(rollout, "PACK_PADDING_MIN", 0.0 if packing == "packed" else 1.0)
    packed = []
    rows_of = FastDecoder._packed_rows
    monkeypatch.setattr(FastDecoder, "_packed_rows", staticmethod(lambda v: packed.append(rows_of(v)) or packed[-1]))
    if attention == "sdpa":
        monkeypatch.setattr(rollout, "GROUPED_SCORES_MAX", 0)
        if kind != "gpt2":  # the prefill takes the same path: greedy decoding still equals HF generate's
            assert_same_greedy(stories if kind == "stories" else tiny_model(kind), random_prompts(4, 300, seed=9))
    model = stories if kind == "stories" else tiny_model(kind)
    ref = copy.deepcopy(model).requires_grad_(False)
    vocab = ref.get_output_embeddings().weight.shape[0]
    distinct = random_prompts(3, vocab, seed=5, lo=1, hi=12)
    prompts = [p for p in distinct for _ in range(3)]  # GRPO layout: runs of 3
    rng = random.Random(3)
    completions = [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 9))] + [2] * rng.randrange(2)
                   for _ in prompts]
    batch = R.make_rollout_batch(prompts, completions, None, pad_id=0, eos_id=2, prompts=[""] * 9,
                                 completions=[""] * 9)
    mask = batch.completion_mask.bool()
    with torch.no_grad():
        expected, _ = R.forward_logprobs(ref, batch, 0.7)
    engine = R.frozen_decoder(ref)
    assert engine is not None and R.frozen_decoder(ref) is engine  # built once
    for group in (0, 3):
        got = R.reference_logprobs(None, ref, batch, 0.7, group=group)
        assert not got.is_inference()
        assert (got - expected).abs()[mask].max() < 2e-5, (group, (got - expected).abs()[mask].max())
    with torch.no_grad():
        ref.get_output_embeddings().weight.mul_(0.5)  # an in-place change: the decoder is rebuilt
        expected, _ = R.forward_logprobs(ref, batch, 0.7)
    assert R.frozen_decoder(ref) is not engine
    assert (R.reference_logprobs(None, ref, batch, 0.7) - expected).abs()[mask].max() < 2e-5
    # modules instead: gen.backend=hf, or a model with trainable weights
    assert torch.equal(R.reference_logprobs(None, ref, batch, 0.7, fast=False), expected)
    assert R.frozen_decoder(model if kind != "stories" else copy.deepcopy(model).requires_grad_(True)) is None
    if packing == "packed":  # every pass had padding, so every pass ran packed
        assert packed and all(r is not None for r in packed)
    else:
        assert packed and all(r is None for r in packed)


def test_sample_reuses_the_decoder_until_a_weight_changes(monkeypatch):
    """Repeated sample() calls on unchanged weights decode with the kept FastDecoder (no rebuild) and sample exactly
    what a fresh one samples; an optimizer step (the trainers' fused AdamW), load_state_dict and reuse=False each
    give a decoder built from the current weights."""
    from rlhfkit.config import OptimConfig
    from rlhfkit.train_utils import make_optimizer

    model = tiny_model("gpt2")
    builds = []
    init = FastDecoder.__init__
    monkeypatch.setattr(FastDecoder, "__init__", lambda self, *a, **k: (builds.append(1), init(self, *a, **k))[1])
    prompts = random_prompts(4, 300, seed=3)
    gen = GenConfig(max_new_tokens=12, temperature=1.0, batch_size=4, backend="fast")

    def fresh(seed):
        return sample(model, TOK, prompts, gen, seed=seed).completion_ids  # reuse=False, the default

    first = sample(model, TOK, prompts, gen, seed=5, reuse=True)
    assert len(builds) == 1
    again = sample(model, TOK, prompts, gen, seed=5, reuse=True)
    assert len(builds) == 1 and again.completion_ids == first.completion_ids == fresh(5)
    assert len(builds) == 2  # reuse=False builds and keeps nothing
    sample(model, TOK, prompts, gen, seed=6, reuse=True)
    assert len(builds) == 2
    # the kept KV buffers serve calls of other shapes: longer prompts, repeated prompts (prefilled once), shorter
    longer, repeated = random_prompts(4, 300, seed=4, lo=20, hi=30), [prompts[0]] * 2 + [prompts[1]] * 2
    for other in (longer, repeated, prompts):
        kept = sample(model, TOK, other, gen, seed=7, reuse=True)
        assert kept.completion_ids == sample(model, TOK, other, gen, seed=7).completion_ids
        assert kept.logprobs == sample(model, TOK, other, gen, seed=7).logprobs
    assert model in rollout._DECODERS

    opt = make_optimizer(model.parameters(), OptimConfig(lr=0.5, weight_decay=0.0))
    versions = [p._version for p in model.parameters()]
    model.train()
    out = model(torch.tensor(prompts[0])[None], labels=torch.tensor(prompts[0])[None])
    out.loss.backward()
    opt.step()
    model.eval()
    assert [p._version for p in model.parameters()] == versions  # the fused step leaves the version counters alone
    n = len(builds)
    stepped = sample(model, TOK, prompts, gen, seed=5, reuse=True)
    assert len(builds) == n + 1  # rebuilt after the step
    assert stepped.completion_ids == fresh(5) and stepped.completion_ids != first.completion_ids

    state = copy.deepcopy(tiny_model("gpt2").state_dict())
    model.load_state_dict(state)
    n = len(builds)
    assert sample(model, TOK, prompts, gen, seed=5, reuse=True).completion_ids == first.completion_ids
    assert len(builds) == n + 1
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # an in-place op on one tensor
    assert sample(model, TOK, prompts, gen, seed=5, reuse=True).completion_ids == fresh(5) != first.completion_ids
    assert len(builds) == n + 3


def test_sample_does_not_reuse_the_decoder_of_a_lora_model(stories):
    model = M.apply_lora(copy.deepcopy(stories), ModelConfig(lora_r=4))
    gen = GenConfig(max_new_tokens=4, temperature=0.0, batch_size=2, backend="fast")
    sample(model, TOK, random_prompts(2, 512), gen, reuse=True)
    assert model not in rollout._DECODERS
