"""Rollout speed: rlhfkit's fast decode loop vs Hugging Face `generate()` on the same model, batch and lengths.

    nice -n 10 python bench/bench_rollout.py                      # both models, 2 threads, batch 8, 32 new tokens
    nice -n 10 python bench/bench_rollout.py --models gpt2 --reps 9

Models: the bundled stories260k (Llama, 5 layers, d=64, vocab 512) and a randomly initialised 4-layer GPT-2
(n_embd 256, 4 heads, fp32) with a 4096-token byte-level BPE trained here on the bundled TinyStories (`gpt2`) or
with the GPT-2 vocabulary of 50,257 tokens from ../shared/data/cs336-fixtures (`gpt2-50k`). With the latter the
LM head is a 51 MB fp32 matrix, larger than this machine's 32 MB L3 cache, read once per generated token by both
backends. For each model the script also times the weight matrix products of one decode step alone (the floor no
decoder loop can go below: at batch 8 they are bound by memory bandwidth) and prints each backend's time above it.
Prompts: TinyStories text cut to 16-32 tokens (seeded), left-padded; exactly --new-tokens new tokens per row
(min_new_tokens = max_new_tokens, so EOS never ends a row early), temperature 1, no top-k/top-p.
Timing: each backend runs --warmup times, then A B A B ... --reps times each; the medians are reported, as
tokens per wall-clock second and, less sensitive to other jobs on a shared machine, as the ratio of CPU seconds.
A = HF `model.generate(...)` called directly (the baseline a user would write); B = `rlhfkit.rollout.sample` with
gen.backend=fast, end to end (padding, decoder set-up, sampling log-probs, conversion to lists); C = the same with
reuse=True, which builds the decoder (folded, prepacked weights) once and keeps it while the weights do not change,
as a generation loop on fixed weights can (an RL update changes the weights, so the trainers rebuild: B is their case).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhfkit.config import GenConfig
from rlhfkit.rollout import sample

FIXTURES = REPO.parent / "shared" / "data" / "cs336-fixtures"


def stories_texts(n: int) -> list[str]:
    path = REPO / "rlhfkit" / "assets" / "data" / "tinystories_train.jsonl.gz"
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            texts.append(rec.get("text") or (rec.get("prompt", "") + rec.get("completion", "")))
            if len(texts) >= n:
                break
    return texts


def load_stories260k():
    from rlhfkit import models as M
    from rlhfkit.config import ModelConfig

    tok = M.load_tokenizer("stories260k")
    tok.model_max_length = 10**6  # we cut the stories ourselves
    model = M.load_causal_lm(ModelConfig(dtype="float32"), torch.device("cpu"))
    model.set_attn_implementation("sdpa")  # HF generate as a user runs it (rlhfkit switches small models' attention)
    return model.eval(), tok


def gpt2_tokenizer(vocab: str):
    """`bpe4096`: a 4096-token byte-level BPE trained here on the bundled TinyStories (a few seconds);
    `gpt2`: the GPT-2 vocabulary (50,257 tokens) from ../shared/data/cs336-fixtures."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab == "gpt2":
        if not (FIXTURES / "gpt2_vocab.json").exists():
            raise SystemExit(f"missing {FIXTURES}/gpt2_vocab.json (shared data) for the GPT-2 tokenizer")
        # GPT2TokenizerFast(vocab_file=..., merges_file=...) loads an empty vocabulary in transformers 5; this works:
        bpe = ByteLevelBPETokenizer(str(FIXTURES / "gpt2_vocab.json"), str(FIXTURES / "gpt2_merges.txt"))
    else:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(stories_texts(20000), vocab_size=4096, min_frequency=2,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=10**6)


def load_gpt2(vocab: str = "bpe4096"):
    """Random-init GPT-2: 4 layers, n_embd 256, 4 heads, fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer(vocab)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=len(tok), n_positions=256,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(config).eval(), tok


def make_prompts(tok, batch: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for text in stories_texts(200):
        ids = tok(text)["input_ids"]
        if len(ids) >= 32:
            out.append(ids[: rng.randint(16, 32)])
        if len(out) == batch:
            return out
    raise SystemExit("not enough long stories for the prompts")


def hf_generate(model, tok, prompts, new_tokens: int) -> None:
    from rlhfkit.data.collate import pad_sequences

    ids, mask = pad_sequences(prompts, tok.pad_token_id, side="left")
    model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id)


def bench_model(name: str, model, tok, args) -> dict:
    prompts = make_prompts(tok, args.batch, args.seed)
    gen = GenConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, temperature=1.0,
                    batch_size=args.batch, backend="fast")
    runs = {"hf": lambda: hf_generate(model, tok, prompts, args.new_tokens),
            "fast": lambda: sample(model, tok, prompts, gen, seed=args.seed),
            "reuse": lambda: sample(model, tok, prompts, gen, seed=args.seed, reuse=True)}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for fn in runs.values():
                fn()
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.reps):
            for key, fn in runs.items():  # A B A B: both see the same machine load
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
    tokens = args.batch * args.new_tokens
    res = {k: tokens / statistics.median(v) for k, v in wall.items()}
    res["ratio"] = res["fast"] / res["hf"]
    res["ratio_reuse"] = res["reuse"] / res["hf"]
    # CPU seconds of this process (all its threads): less sensitive than wall time to other jobs on the machine
    res["cpu_ratio"] = statistics.median(cpu["hf"]) / statistics.median(cpu["fast"])
    lengths = [len(p) for p in prompts]
    res["floor_ms_per_step"] = weight_floor_ms(model, args)
    print(f"{name:<12} prompts {min(lengths)}-{max(lengths)} tok | HF generate {res['hf']:8.0f} tok/s | "
          f"fast {res['fast']:8.0f} tok/s | ratio {res['ratio']:.2f}x (wall) {res['cpu_ratio']:.2f}x (CPU time) | "
          f"reused decoder {res['reuse']:8.0f} tok/s, {res['ratio_reuse']:.2f}x  [medians of {args.reps}]", flush=True)
    hf_ms, fast_ms = (tokens / res[k] / args.new_tokens * 1e3 for k in ("hf", "fast"))
    floor = res["floor_ms_per_step"]
    print(f"{'':<12} per step: HF {hf_ms:.2f} ms, fast {fast_ms:.2f} ms; weight-matmul floor {floor:.2f} ms "
          f"-> time above the floor: HF {hf_ms - floor:.2f} ms, fast {fast_ms - floor:.2f} ms", flush=True)
    return res


def weight_floor_ms(model, args) -> float:
    """Median time per decode step of only the weight matrix products (every Linear/Conv1D weight once, then the
    LM head, in model order, batch rows x hidden): what any decoder that reads fp32 weights must pay per token."""
    mats = []
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(mod, torch.nn.Embedding):
            mats.append(w if type(mod).__name__ == "Conv1D" else w.t())  # as (in, out)
    head = model.get_output_embeddings().weight
    if all(m.data_ptr() != head.data_ptr() for m in mats):
        mats.append(head.t())
    xs = {m.shape[0]: torch.randn(args.batch, m.shape[0]) for m in mats}
    times = []
    with torch.inference_mode():
        for _ in range(args.reps * 4):
            t0 = time.perf_counter()
            for m in mats:
                torch.mm(xs[m.shape[0]], m)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stories260k,gpt2",
                    help="comma list: stories260k, gpt2 (4096-token BPE), gpt2-50k (GPT-2 vocabulary)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaders = {"stories260k": load_stories260k, "gpt2": load_gpt2, "gpt2-50k": lambda: load_gpt2("gpt2")}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.new_tokens} new tokens, fp32, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    results = {}
    for name in args.models.split(","):
        model, tok = loaders[name]()
        results[name] = bench_model(name, model, tok, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
