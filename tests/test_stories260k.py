"""The bundled stories260k folder (rlhfkit/assets/stories260k) is a faithful conversion of karpathy's model.

Reference: llama2.c run.c greedy output (../shared/data/tinyllamas-stories260K/expected_greedy_t0_n200.txt,
its token ids also stored in tests/fixtures/ so the main check runs on a fresh clone), the `sentencepiece`
package for the tokenizer, and a from-scratch llama2.c-layout forward pass for the logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "rlhfkit" / "assets" / "stories260k"
SHARED = REPO.parent / "shared" / "data" / "tinyllamas-stories260K"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "stories260k_expected_greedy.json"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"source checkpoint folder {SHARED} is absent (read-only shared data, not in git)")

BOS, EOS, UNK = 1, 2, 0


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ASSET)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()
    assert m.dtype == torch.float32
    return m


@pytest.fixture(scope="module")
def expected():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def greedy_ids(model):
    # run.c with -n 200 runs forward at positions 0..199 (BOS at 0) and samples one token after each:
    # 200 new tokens, i.e. max_new_tokens=200 (201 ids with BOS). It stops only if it samples BOS (id 1).
    with torch.no_grad():
        out = model.generate(torch.tensor([[BOS]]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                             do_sample=False, max_new_tokens=200)
    return out[0].tolist()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- (a) greedy

def test_greedy_generate_reproduces_llama2c_run_c(greedy_ids, expected, tok):
    assert len(greedy_ids) == 1 + expected["run_c_steps"] == 201
    assert greedy_ids[0] == BOS
    assert greedy_ids[1:] == expected["token_ids"]
    assert tok.decode(greedy_ids, skip_special_tokens=True) == expected["text"]
    assert expected["text"].startswith("Once upon a time, there was a little girl named Lily.")


def test_manual_greedy_loop_matches_generate(model, greedy_ids):
    """Full forward over the growing sequence (no KV cache), argmax each step: same ids as generate()."""
    ids = torch.tensor([[BOS]])
    with torch.no_grad():
        for _ in range(200):
            logits = model(ids, use_cache=False).logits[0, -1]
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    assert ids[0].tolist() == greedy_ids


def test_greedy_batch_with_left_padding_matches_unpadded(model, tok):
    """Left padding with pad=<unk> and the attention mask must not change greedy continuations."""
    prompts = ["Once upon a time", "Lily saw a big red ball and"]
    assert tok.padding_side == "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0].item() == UNK and batch["attention_mask"][0, 0].item() == 0
    with torch.no_grad():
        padded = model.generate(**batch, do_sample=False, max_new_tokens=12)
        for row, p in enumerate(prompts):
            one = tok(p, return_tensors="pt")
            alone = model.generate(**one, do_sample=False, max_new_tokens=12)
            assert padded[row, -12:].tolist() == alone[0, -12:].tolist()


@needs_shared
def test_fixture_matches_shared_expected_text(expected):
    import sentencepiece as spm

    raw = (SHARED / "expected_greedy_t0_n200.txt").read_bytes()
    assert sha256(SHARED / "expected_greedy_t0_n200.txt") == expected["source_sha256"]
    text = raw.decode("utf-8")
    # run.c prints the 200 pieces (leading space of the first piece dropped after BOS), then "\n".
    assert text == expected["text"] + "\n"
    sp = spm.SentencePieceProcessor(model_file=str(SHARED / "tok512.model"))
    assert sp.encode(text[:-1]) == expected["token_ids"]


@needs_shared
def test_logits_match_llama2c_layout_reference(model):
    """Independent forward pass on the raw .bin (interleaved-pair RoPE, unpermuted q/k), float64."""
    raw = (SHARED / "stories260K.bin").read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    hd, kv_dim = dim // n_heads, n_kv * dim // n_heads
    flat = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = flat[pos:pos + n].reshape(shape)
        pos += n
        return out

    emb, rms_att = take(vocab, dim), take(n_layers, dim)
    wq, wk, wv, wo = take(n_layers, dim, dim), take(n_layers, kv_dim, dim), take(n_layers, kv_dim, dim), take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)

    def rmsnorm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

    def rope(x, n):  # x: (T, n*hd); rotate pairs (2i, 2i+1) by pos * 10000^(-2i/hd), as run.c does
        x = x.reshape(T, n, hd // 2, 2)
        ang = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0], x[..., 1]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(T, n * hd)

    tokens = [BOS, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298]
    T = len(tokens)
    x = emb[tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(n_layers):
        h = rmsnorm(x, rms_att[layer])
        q = rope(h @ wq[layer].T, n_heads).reshape(T, n_heads, hd)
        k = rope(h @ wk[layer].T, n_kv).reshape(T, n_kv, hd)
        v = (h @ wv[layer].T).reshape(T, n_kv, hd)
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", att, v).reshape(T, dim) @ wo[layer].T
        h = rmsnorm(x, rms_ffn[layer])
        g = h @ w1[layer].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w3[layer].T)) @ w2[layer].T
    ref = rmsnorm(x, rms_final) @ emb.T

    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    assert np.abs(got - ref).max() < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


# ---------------------------------------------------------------------------------------------- (b) tokenizer

TOKENIZER_STRINGS = [
    "Once upon a time",
    "Lily's mom said, \"Lily, let's go to the park.\"",
    "The cat sat.\nThe dog ran!\n\nEnd",
    "5 apples\tand 12 pears?",
    "Ümlaut café, Ω and 日本",  # not in the 512 pieces: byte fallback
    "a \n b",
]


def test_tokenizer_is_fast_with_expected_special_ids(tok):
    assert tok.is_fast
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert len(tok) == 512
    assert tok("Once upon a time")["input_ids"] == [1, 403, 407, 261, 378]
    assert tok("Once upon a time", add_special_tokens=False)["input_ids"] == [403, 407, 261, 378]


@pytest.mark.parametrize("text", TOKENIZER_STRINGS)
def test_tokenizer_matches_sentencepiece(tok, text):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ASSET / "tokenizer.model"))
    ids = tok(text)["input_ids"]
    assert ids == [BOS] + sp.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]) == text


def test_tokenizer_byte_fallback_pieces(tok):
    ids = tok("Ω", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["▁", "<0xCE>", "<0xA9>"]  # U+03A9 is CE A9 in UTF-8
    assert tok.decode(ids) == "Ω"
    assert tok.decode(ids[1:2]) == "\ufffd"  # half a UTF-8 character decodes to the replacement char
    assert tok.convert_ids_to_tokens(tok("\n", add_special_tokens=False)["input_ids"]) == ["▁", "<0x0A>"]


def test_tokenizer_known_difference_from_sentencepiece_on_extra_spaces(tok):
    """Documented quirk, pinned so a transformers change is noticed.

    tok512.model keeps sentencepiece's default remove_extra_whitespaces=True: sentencepiece drops leading and
    trailing spaces and collapses runs of spaces. The transformers LlamaTokenizer has no such normalizer and
    encodes each extra space as a lone "▁" (id 410), so decode(encode(s)) == s for HF but not for sentencepiece.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ASSET / "tokenizer.model"))
    assert sp.encode("a  b") == [261, 268] == sp.encode(" a b ")
    assert tok("a  b", add_special_tokens=False)["input_ids"] == [261, 410, 268]
    assert tok.decode(tok("a  b")["input_ids"], skip_special_tokens=True) == "a  b"


@needs_shared
def test_bundled_tokenizer_model_is_the_source_file():
    assert (ASSET / "tokenizer.model").read_bytes() == (SHARED / "tok512.model").read_bytes()


# ---------------------------------------------------------------------------------------------- (c) reproducible

@needs_shared
def test_converter_rerun_reproduces_bundled_folder(tmp_path):
    out = tmp_path / "stories260k"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_stories260k.py"), "--bin", str(SHARED / "stories260K.bin"),
         "--tokenizer", str(SHARED / "tok512.model"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    digest = sha256(ASSET / "model.safetensors")
    assert f"sha256 model.safetensors: {digest}" in proc.stdout
    for name in ("model.safetensors", "tokenizer.model"):
        assert (out / name).read_bytes() == (ASSET / name).read_bytes(), name
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json"):
        new, old = json.loads((out / name).read_text()), json.loads((ASSET / name).read_text())
        new.pop("transformers_version", None), old.pop("transformers_version", None)
        assert new == old, name
    assert not [p for p in tmp_path.iterdir() if p.name != "stories260k"]  # temp folder cleaned up


def test_bundled_weights_are_float32_and_tied():
    from safetensors import safe_open

    with safe_open(str(ASSET / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
        n_params = sum(f.get_tensor(k).numel() for k in keys)
    assert "lm_head.weight" not in keys and len(keys) == 47
    assert n_params == 260_032  # 512*64 emb + 5*(2*64 + 64*64*2 + 32*64*2 + 3*64*172) + 64
    assert (ASSET / "LICENSE").is_file() and "Andrej Karpathy" in (ASSET / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- (d) pad / eos

def test_pad_is_not_eos(tok, model):
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(ASSET)
    assert tok.eos_token_id == model.config.eos_token_id == gen.eos_token_id == EOS
    assert tok.pad_token_id == model.config.pad_token_id == gen.pad_token_id == UNK
    assert tok.pad_token_id != tok.eos_token_id
    assert gen.bos_token_id == model.config.bos_token_id == tok.bos_token_id == BOS
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
