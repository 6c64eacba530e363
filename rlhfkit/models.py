"""Loading models and tokenizers, and turning prompts/completions into token ids.

- `model.name` is `stories260k` (the bundled pretrained 260K Llama), a Hugging Face hub id, or a local folder.
- Pad token: when a tokenizer has none we use its `unk` token if that differs from EOS, else EOS. Padding is
  always tracked with attention masks and lengths, never by comparing ids with the pad id, so pad == EOS can never
  hide a real EOS from a loss (trl#1623).
- Conversations are rendered with the tokenizer's chat template; a tokenizer without one gets
  `DEFAULT_CHAT_TEMPLATE`, the Anthropic HH layout ("\\n\\nHuman: ...\\n\\nAssistant: ..."), so HH transcripts and
  message lists tokenize the same.
- Dropout is switched off in every model we load (PITFALLS 1): sampling and training must see the same function.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from rlhfkit.attention import use_small_attention
from rlhfkit.config import ModelConfig
from rlhfkit.errors import UserError

BUNDLED = {"stories260k": "stories260k"}

DEFAULT_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] }}"
    "{%- elif m['role'] == 'user' -%}{{ '\\n\\nHuman: ' + m['content'] }}"
    "{%- else -%}{{ '\\n\\nAssistant: ' + m['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\nAssistant:' }}{%- endif -%}"
)


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("rlhfkit") / "assets" / BUNDLED[name]))


def resolve_model_name(name: str) -> str:
    """Map `stories260k` to the bundled folder; keep folders and hub ids as they are."""
    if name in BUNDLED:
        path = bundled_path(name)
        if not (path / "config.json").exists():
            raise UserError(f"model.name: the bundled {name} model is missing at {path} (broken install?)")
        return str(path)
    return name


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"run.device: unknown device {spec!r} (cpu, cuda, cuda:N, mps, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"run.device: {spec} asked for but CUDA is not available on this machine")
    return device


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def _from_pretrained(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    local = os.path.isdir(name)
    if not local and (name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)):
        raise UserError(f"{what}: folder {name!r} not found")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "folder" if local else "hub id (is it in the local Hugging Face cache? this machine may be offline)"
        raise UserError(f"{what}: cannot load {name!r} as a {where}: {first}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False, key: str = "model.tokenizer") -> Any:
    """AutoTokenizer with a pad token and a chat template guaranteed; errors name the config key that gave `name`."""
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, resolve_model_name(name), key, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise UserError(f"{key}: {name!r} has no EOS token; completions could never end")
    if tok.pad_token_id is None:
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def tokenizer_for(cfg: ModelConfig) -> Any:
    """The tokenizer of cfg.tokenizer, or of the model cfg.name when that is empty (the usual case); an error names
    whichever of the two keys was used."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    return load_tokenizer(cfg.name, cfg.trust_remote_code, key="model.name")


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "summary_first_dropout"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def fuse_activations(model: torch.nn.Module) -> int:
    """Swap transformers' tanh-GELU written as a Python formula (NewGELUActivation: GPT-2's `gelu_new`, ~8
    elementwise ops forward and more backward) for the same function as one kernel (GELUTanh, F.gelu with
    approximate="tanh"; equal to float rounding, ~1e-7). The config is untouched, so saved models do not change.
    A training step of the 4-layer GPT-2 spends ~15% less time (bench/README.md). Returns the number swapped."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def prepare_loaded(model: torch.nn.Module) -> None:
    """What every model rlhfkit loads gets: dropout off, GPT-2's GELU as one kernel, small-head attention."""
    disable_dropout(model)
    fuse_activations(model)
    use_small_attention(model)


def load_causal_lm(cfg: ModelConfig, device: torch.device, name: str | None = None, key: str = "") -> Any:
    """AutoModelForCausalLM from `name` (default cfg.name), dropout off, on `device` in cfg.dtype. Errors name `key`,
    the config key that gave the model (default: model.reference for a `name`, else model.name)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_name(name or cfg.name)
    key = key or ("model.reference" if name else "model.name")
    model = _from_pretrained(AutoModelForCausalLM, path, key, dtype=pick_dtype(cfg.dtype, device),
                             trust_remote_code=cfg.trust_remote_code)
    prepare_loaded(model)
    model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = True  # keep the KV cache for sampling (PITFALLS 11)
    return model


def apply_lora(model: Any, cfg: ModelConfig) -> Any:
    """Wrap `model` with PEFT LoRA adapters when cfg.lora_r > 0 (else return it unchanged)."""
    if cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets: Any = cfg.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def gpt2_tokenizer_from_files(vocab_file: str, merges_file: str) -> Any:
    """A GPT-2 fast tokenizer from vocab.json + merges.txt (e.g. ../shared/data/cs336-fixtures).

    transformers 5 ignores vocab_file/merges_file in GPT2Tokenizer(...) and builds an empty vocabulary, so the
    tokenizer is built with the `tokenizers` library and wrapped."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    for path in (vocab_file, merges_file):
        if not os.path.isfile(path):
            raise UserError(f"{path}: tokenizer file not found")
    bpe = ByteLevelBPETokenizer(vocab_file, merges_file)
    eos = "<|endoftext|>"
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, unk_token=eos, bos_token=eos, eos_token=eos)


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def render_prompt(tokenizer: Any, prompt: Any) -> str:
    """A prompt as text: strings stay; conversations go through the chat template with a generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def render_completion(tokenizer: Any, prompt: Any, completion: Any) -> str:
    """A completion as the text that follows render_prompt(prompt)."""
    if isinstance(completion, str):
        return completion
    head = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full.startswith(head):
        raise UserError("chat template: the rendered conversation does not start with the rendered prompt")
    return full[len(head):]


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    bos = tokenizer.bos_token
    if special and bos and text.startswith(bos):
        special = False  # the template already wrote BOS
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    return _encode(tokenizer, render_prompt(tokenizer, prompt), special=True)


def encode_pair(tokenizer: Any, prompt: Any, completion: Any, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) with EOS closing the completion.

    The completion is cut from the joint encoding of prompt + completion when that starts with the prompt's ids
    (so a word split across the boundary tokenizes as it would in running text); otherwise encoded alone."""
    p_text, c_text = render_prompt(tokenizer, prompt), render_completion(tokenizer, prompt, completion)
    p_ids = _encode(tokenizer, p_text, special=True)
    full = _encode(tokenizer, p_text + c_text, special=True)
    if full[: len(p_ids)] == p_ids:
        c_ids = full[len(p_ids):]
    else:
        c_ids = _encode(tokenizer, c_text, special=False)
    if add_eos and (not c_ids or c_ids[-1] != tokenizer.eos_token_id):
        c_ids = c_ids + [tokenizer.eos_token_id]
    return p_ids, c_ids


def decode_completion(tokenizer: Any, ids: list[int], prompt_ids: list[int] | None = None) -> str:
    """Text of generated ids, stopping before the first EOS.

    With prompt_ids the text is decode(prompt + completion) minus decode(prompt), which keeps the leading space
    that SentencePiece tokenizers drop when a completion is decoded alone (so prompt + completion reads right)."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    if prompt_ids:
        head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        full = tokenizer.decode(list(prompt_ids) + list(ids), skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head):]
    return tokenizer.decode(ids, skip_special_tokens=True)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
