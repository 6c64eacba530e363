"""Shared fixtures: repo paths, ../shared data (skips with a reason when absent), a tiny GPT-2 built from a config
with a tokenizer trained here, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never reach the network: hub lookups fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test (with the reason) when that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the read-only ../shared/data beside the repo; absent on a fresh clone)")
    return path


@pytest.fixture
def shared():
    return shared_path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path):
    counter = {"n": 0}

    def make(rows: list, name: str | None = None) -> Path:
        counter["n"] += 1
        return write_jsonl(tmp_path / (name or f"data{counter['n']}.jsonl"), rows)

    return make


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run `python -m rlhfkit ARGS` in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rlhfkit", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (n_embd 32) with random init and a 300-token byte-level BPE trained on bundled stories.

    Exercises the gpt2 code path (pad == EOS, no BOS) without any download."""
    import gzip

    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    out = tmp_path_factory.mktemp("tiny_gpt2")
    stories = [json.loads(line)["text"] for line in
               gzip.open(REPO / "rlhfkit/assets/data/tinystories_train.jsonl.gz", "rt", encoding="utf-8")][:200]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(stories, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save(str(out / "tokenizer.json"))
    # transformers 5 ignores vocab_file/merges_file here; tokenizer_file works
    tok = GPT2TokenizerFast(tokenizer_file=str(out / "tokenizer.json"), unk_token="<|endoftext|>",
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    assert len(tok("Once upon a time")["input_ids"]) > 1
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out
