"""Sampling completions from a causal LM: batched, left-padded, stops at EOS.

`sample(model, tokenizer, prompt_ids, gen, seed)` returns the completion ids of each prompt (EOS included when the
model stopped). Backends: `hf` uses transformers `generate()` (any architecture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.config import GenConfig
from rlhfkit.data.collate import pad_sequences


@dataclass
class Samples:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    """Generated ids without padding; the last one is EOS when `finished`."""
    finished: list[bool]
    """True when the completion ended with EOS (False: it hit max_new_tokens)."""


def _hf_generate(model: Any, tokenizer: Any, prompts: list[list[int]], gen: GenConfig) -> list[list[int]]:
    device = next(model.parameters()).device
    ids, mask = pad_sequences(prompts, tokenizer.pad_token_id, side="left")
    kwargs: dict[str, Any] = dict(max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens or None,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  use_cache=True)
    if gen.temperature > 0:
        kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    new = out[:, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    result = []
    for row in new:
        result.append(row[: row.index(eos) + 1] if eos in row else row)
    return result


@torch.no_grad()
def sample(model: Any, tokenizer: Any, prompt_ids: list[list[int]], gen: GenConfig, seed: int | None = None,
           progress: Any = None) -> Samples:
    """Sample one completion per entry of prompt_ids (repeat prompts for several samples)."""
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    completions: list[list[int]] = []
    for i in range(0, len(prompt_ids), gen.batch_size):
        chunk = prompt_ids[i: i + gen.batch_size]
        completions.extend(_hf_generate(model, tokenizer, chunk, gen))
        if progress is not None:
            progress.update(len(chunk))
    if was_training:
        model.train()
    eos = tokenizer.eos_token_id
    return Samples(list(prompt_ids), completions, [bool(c) and c[-1] == eos for c in completions])
