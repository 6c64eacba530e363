"""Convert karpathy's tinyllamas stories260K (llama2.c legacy v0 checkpoint) to a transformers folder.

Usage (from the repo root; this is how rlhfkit/assets/stories260k/ was made):

    python scripts/convert_stories260k.py \
        --bin ../shared/data/tinyllamas-stories260K/stories260K.bin \
        --tokenizer ../shared/data/tinyllamas-stories260K/tok512.model \
        --out rlhfkit/assets/stories260k

The output folder holds config.json, generation_config.json, model.safetensors (float32, tied
embeddings), tokenizer.model (the SentencePiece file, byte for byte), tokenizer.json and
tokenizer_config.json. It is written into a temporary sibling folder and renamed into place, so a
failed run never leaves a half-written folder. The run is deterministic: re-running it reproduces
model.safetensors byte for byte (its sha256 is printed).

Checkpoint layout (llama2.c legacy v0, see PROVENANCE.md): 7 int32 header fields (dim, hidden_dim,
n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size would mean an untied
classifier), then fp32 tensors emb, rms_att[L], wq[L], wk[L], wv[L], wo[L], rms_ffn[L], w1[L],
w2[L], w3[L], rms_final, freq_cis_real, freq_cis_imag. Linear weights are stored as (out, in),
which is also torch.nn.Linear's layout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# The Llama config documented in ../shared/data/tinyllamas-stories260K/PROVENANCE.md.
EXPECTED_HEADER = {"dim": 64, "hidden_dim": 172, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4,
                   "vocab_size": 512, "seq_len": 512}
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = UNK_ID  # pad must not be EOS (PITFALLS.md #4); <unk> never occurs in generated text


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_llama2c_v0(path: Path) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Read a llama2.c legacy v0 checkpoint into a header dict and fp32 arrays (llama2.c names)."""
    raw = path.read_bytes()
    header = dict(zip(HEADER_FIELDS, struct.unpack("<7i", raw[:28])))
    if header["vocab_size"] < 0:
        raise ValueError(f"{path}: untied classifier (negative vocab_size) is not supported")
    if header != EXPECTED_HEADER:
        raise ValueError(f"{path}: header {header} differs from the stories260K config {EXPECTED_HEADER}")
    dim, hidden, n_layers = header["dim"], header["hidden_dim"], header["n_layers"]
    n_heads, n_kv, vocab, seq_len = header["n_heads"], header["n_kv_heads"], header["vocab_size"], header["seq_len"]
    head_dim = dim // n_heads
    kv_dim = n_kv * head_dim
    shapes = [
        ("emb", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    n_floats = sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != 28 + 4 * n_floats:
        raise ValueError(f"{path}: {len(raw)} bytes, expected {28 + 4 * n_floats} for this header")
    flat = np.frombuffer(raw, dtype="<f4", offset=28)
    tensors, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        tensors[name] = flat[pos:pos + n].reshape(shape).copy()
        pos += n
    # The stored RoPE tables must be the standard theta=10000 ones, otherwise the config would be wrong.
    freqs = 1.0 / (ROPE_THETA ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(seq_len, dtype=np.float64), freqs)
    if not (np.allclose(tensors["freq_cis_real"], np.cos(angles), atol=1e-4)
            and np.allclose(tensors["freq_cis_imag"], np.sin(angles), atol=1e-4)):
        raise ValueError(f"{path}: stored RoPE tables do not match rope_theta={ROPE_THETA}")
    return header, tensors


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows from llama2.c's interleaved RoPE pairs (0,1),(2,3).. to HF rotate_half halves.

    Within each head, row 2i and 2i+1 form a rotated pair in llama2.c; HF rotates row i with row
    i + head_dim/2. Same permutation as transformers' convert_llama_weights_to_hf.py.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def build_model(header: dict[str, int], t: dict[str, np.ndarray]):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=header["vocab_size"],
        hidden_size=header["dim"],
        intermediate_size=header["hidden_dim"],
        num_hidden_layers=header["n_layers"],
        num_attention_heads=header["n_heads"],
        num_key_value_heads=header["n_kv_heads"],
        max_position_embeddings=header["seq_len"],
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        dtype="float32",
    )
    torch.manual_seed(0)  # init values are all overwritten below; seeded anyway for determinism
    model = LlamaForCausalLM(config).to(torch.float32).eval()

    sd = {"model.embed_tokens.weight": t["emb"], "model.norm.weight": t["rms_final"]}
    for i in range(header["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = permute_rotary(t["wq"][i], header["n_heads"])
        sd[p + "self_attn.k_proj.weight"] = permute_rotary(t["wk"][i], header["n_kv_heads"])
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    sd = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens")
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model


def build_tokenizer(sp_model: Path, workdir: Path):
    """Load tok512.model the way TOOLCHAIN.md says works in transformers 5.x (folder + config)."""
    from transformers import AutoTokenizer

    try:
        import google.protobuf  # noqa: F401  transformers needs it to read tokenizer.model
    except ImportError as e:
        raise SystemExit("error: converting tokenizer.model needs the 'protobuf' package (pip install protobuf)") from e
    src = workdir / "tok_src"
    src.mkdir()
    shutil.copyfile(sp_model, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "model_max_length": EXPECTED_HEADER["seq_len"],
    }, indent=2))
    tok = AutoTokenizer.from_pretrained(str(src))
    if (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) != (BOS_ID, EOS_ID, UNK_ID, PAD_ID):
        raise RuntimeError("unexpected special token ids: "
                           f"{(tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id)}")
    ids = tok("Once upon a time")["input_ids"]
    if ids != [1, 403, 407, 261, 378]:
        raise RuntimeError(f"tokenizer sanity check failed: 'Once upon a time' -> {ids}")
    return tok


def fix_tokenizer_config(path: Path) -> None:
    """Restore settings that transformers 5.x drops from tokenizer_config.json on save_pretrained.

    Without `legacy: true` the reloaded LlamaTokenizer uses Metaspace prepend_scheme "first" instead of
    "always"; without add_bos_token/add_eos_token the attributes read False and any later
    update_post_processor() call would silently stop adding BOS. `is_local`/`local_files_only`
    describe the machine that ran the conversion and do not belong in a shipped folder.
    """
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg.update({"add_bos_token": True, "add_eos_token": False, "legacy": True,
                "pad_token": "<unk>", "model_max_length": EXPECTED_HEADER["seq_len"]})
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def convert(bin_path: Path, tokenizer_path: Path, out: Path) -> str:
    """Write the converted folder to `out` (replacing it) and return the sha256 of model.safetensors."""
    out = out.resolve()
    header, tensors = read_llama2c_v0(bin_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        stage = tmp_root / out.name
        model = build_model(header, tensors)
        model.save_pretrained(str(stage))
        tok = build_tokenizer(tokenizer_path, tmp_root)
        tok.save_pretrained(str(stage))
        # Ship the SentencePiece model itself too (for sentencepiece-based checks and other tools).
        shutil.copyfile(tokenizer_path, stage / "tokenizer.model")
        fix_tokenizer_config(stage / "tokenizer_config.json")
        for f in stage.iterdir():
            f.chmod(0o644)  # save_pretrained writes model.safetensors as 0600
        if not (stage / "model.safetensors").is_file() or not (stage / "tokenizer.json").is_file():
            raise RuntimeError(f"save_pretrained did not write the expected files: {sorted(os.listdir(stage))}")
        # Keep hand-added files (README.md, LICENSE) of an existing output folder.
        if out.is_dir():
            for name in ("README.md", "LICENSE"):
                if (out / name).is_file() and not (stage / name).exists():
                    shutil.copy2(out / name, stage / name)
        old = tmp_root / "old"
        if out.exists():
            os.rename(out, old)
        os.rename(stage, out)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return sha256_file(out / "model.safetensors")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, type=Path, help="llama2.c v0 checkpoint (stories260K.bin)")
    ap.add_argument("--tokenizer", required=True, type=Path, help="SentencePiece model (tok512.model)")
    ap.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    args = ap.parse_args(argv)
    for p in (args.bin, args.tokenizer):
        if not p.is_file():
            print(f"error: {p}: no such file", file=sys.stderr)
            return 2
    print(f"sha256 {args.bin.name}: {sha256_file(args.bin)}")
    print(f"sha256 {args.tokenizer.name}: {sha256_file(args.tokenizer)}")
    digest = convert(args.bin, args.tokenizer, args.out)
    print(f"wrote {args.out}")
    print(f"sha256 model.safetensors: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
