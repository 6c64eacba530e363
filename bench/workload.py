"""The fixed workload of the peer benchmark (issue 9): models, tokenizers, data files and model-FLOP counts.

    from workload import build
    w = build("gpt2", work_dir)       # Workload(model_dir, pairs, prompts, ...) cached in work_dir/gpt2

Models (fp32, dropout off in the saved config):
- `gpt2`: a 4-layer GPT-2 (n_embd 256, 4 heads, 256 positions) built from a config with random init (seed 0) and a
  byte-level BPE of 4,096 tokens trained here on the bundled TinyStories (deterministic: same data, same merges);
- `stories260k`: the bundled pretrained 260K-parameter Llama (rlhfkit/assets/stories260k, 512-token vocabulary).
Data, per model (its own tokenizer), from the bundled TinyStories text:
- pairs.jsonl: {"prompt": the first 16-32 tokens of a story, "chosen": its next 32 tokens, "rejected": 32 tokens of
  another story at the same offset}, decoded to text; both frameworks read the same file;
- prompts.jsonl: {"prompt": the first 16-32 tokens of a story} for GRPO, RLOO, PPO and rollout.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "rlhfkit" / "assets" / "data" / "tinystories_train.jsonl.gz"
STORIES260K = REPO / "rlhfkit" / "assets" / "stories260k"
MODELS = ("gpt2", "stories260k")
NEW_TOKENS = 32
"""Completion length of every pair side and every sampled completion (min_new_tokens = max_new_tokens)."""
BATCH = 8
"""Sequences per step (pairs per step for RM and DPO)."""


@dataclass
class Workload:
    name: str
    model_dir: Path
    """A transformers causal-LM folder with its tokenizer (pad token set)."""
    pairs: Path
    prompts: Path
    work: Path


def stories(n: int | None = None) -> list[str]:
    out = []
    with gzip.open(STORIES, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            out.append(rec.get("text") or rec.get("prompt", "") + rec.get("completion", ""))
            if n is not None and len(out) >= n:
                break
    return out


def _build_gpt2(folder: Path) -> None:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(stories(), vocab_size=4096, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save(str(folder / "tokenizer.json"))
    eos = "<|endoftext|>"
    tok = GPT2TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), unk_token=eos, bos_token=eos,
                            eos_token=eos, pad_token=eos)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=256, n_layer=4, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)


def _build_stories260k(folder: Path) -> None:
    """A copy of the bundled model whose tokenizer carries its pad token (unk, id 0, as rlhfkit pads it), so TRL and
    rlhfkit load the very same folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES260K)
    tok.pad_token = tok.unk_token
    tok.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(STORIES260K)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)


def _write_data(w: Workload, seed: int = 0) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(w.model_dir)
    rng = random.Random(seed)
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in stories(3000)]
    ids = [x for x in ids if len(x) >= 32 + 2 * NEW_TOKENS]
    pairs, prompts = [], []
    for i, x in enumerate(ids):
        k, other = rng.randint(16, 32), ids[(i + 7) % len(ids)]
        prompt = tok.decode(x[:k])
        pairs.append({"prompt": prompt, "chosen": tok.decode(x[k: k + NEW_TOKENS]),
                      "rejected": tok.decode(other[k: k + NEW_TOKENS])})
        prompts.append({"prompt": prompt})
    w.pairs.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    w.prompts.write_text("".join(json.dumps(r) + "\n" for r in prompts))


def build(name: str, work: Path) -> Workload:
    """Create (once) and return the workload files of model `name` under work/name."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    base = Path(work) / name
    w = Workload(name, base / "model", base / "pairs.jsonl", base / "prompts.jsonl", base)
    if not (w.model_dir / "config.json").exists():
        (_build_gpt2 if name == "gpt2" else _build_stories260k)(w.model_dir)
    if not w.prompts.exists():
        _write_data(w)
    return w


# ----------------------------------------------------------------------------------------------------------------
# Model FLOPs (for MFU): the matrix products the model needs for the nominal workload, counted from the config


@dataclass
class Shape:
    layers: int
    d: int
    """Hidden size (= attention width here)."""
    block_params: int
    """Weights of the matrix products in one transformer block (q, k, v, o, MLP)."""
    vocab: int


def model_shape(model_dir: Path) -> Shape:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    if c.model_type == "gpt2":
        d, ff = c.n_embd, c.n_inner or 4 * c.n_embd
        return Shape(c.n_layer, d, 4 * d * d + 2 * d * ff, c.vocab_size)
    d, ff = c.hidden_size, c.intermediate_size
    heads = c.num_attention_heads
    kv = (c.num_key_value_heads or heads) * (getattr(c, "head_dim", None) or d // heads)
    return Shape(c.num_hidden_layers, d, 2 * d * d + 2 * d * kv + 3 * d * ff, c.vocab_size)


def forward_flops(s: Shape, length: int, head_positions: int) -> float:
    """FLOPs of one forward pass over a sequence of `length` tokens (causal attention: token i attends to i+1
    keys), with the LM head (or a scalar head: head_positions=0) applied at head_positions positions.
    2 FLOPs per multiply-add; per token 2·block_params per layer, plus 4·d·(i+1) per layer for QKᵀ and AV."""
    blocks = 2 * s.block_params * length * s.layers
    attention = 4 * s.d * s.layers * length * (length + 1) / 2
    return blocks + attention + 2 * s.d * s.vocab * head_positions


def pair_step_flops(s: Shape, pairs: list[tuple[int, int, int]], policy_head: bool, reference: bool) -> float:
    """Model FLOPs of one training step over pairs (prompt, chosen, rejected token counts): chosen and rejected
    each as their own sequence prompt + completion (what the model needs, whatever the implementation shares);
    training = forward + backward (2x forward) = 3x forward; a frozen reference adds one forward. policy_head: the
    LM head at the completion positions (DPO); False: a scalar head (RM, negligible)."""
    total = 0.0
    for p, c, r in pairs:
        for n in (c, r):
            fwd = forward_flops(s, p + n, n if policy_head else 0)
            total += 3 * fwd + (fwd if reference else 0)
    return total


def pair_lengths(w: Workload, n: int = 256) -> list[tuple[int, int, int]]:
    """(prompt, chosen + EOS, rejected + EOS) token counts of the first n pairs, as both trainers tokenise them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(w.model_dir)
    out = []
    for line in w.pairs.read_text().splitlines()[:n]:
        r = json.loads(line)
        p = len(tok(r["prompt"])["input_ids"])
        out.append((p, len(tok(r["chosen"], add_special_tokens=False)["input_ids"]) + 1,
                    len(tok(r["rejected"], add_special_tokens=False)["input_ids"]) + 1))
    return out
