"""Transformer backbones with a scalar head: reward models (score at the last real token) and value models
(a value at every token).

Saved and loaded as `AutoModelForSequenceClassification` folders with `num_labels=1`, so a trained reward model
is an ordinary transformers folder. We do not use that class's own pooling (it finds the last token by looking
for the pad id, which breaks when pad == EOS or with left padding, PITFALLS 3): `scalar_outputs` returns the
head applied to every position and `last_token_scores` reads it at the last position whose attention mask is 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhfkit.config import ModelConfig
from rlhfkit.data.collate import position_ids_from_mask
from rlhfkit.models import _from_pretrained, pick_dtype, prepare_loaded, resolve_model_name


def head_of(model: Any) -> torch.nn.Linear:
    """The final Linear(hidden, 1) of a sequence-classification model (named `score` or `classifier`)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return head
        if head is not None and isinstance(getattr(head, "out_proj", None), torch.nn.Linear):
            return head.out_proj
    raise ValueError(f"{type(model).__name__} has no scalar head (score/classifier)")


def load_scalar_model(cfg: ModelConfig, device: torch.device, name: str | None = None,
                      init: str | None = None) -> Any:
    """AutoModelForSequenceClassification(num_labels=1) from `name` (default cfg.name), dropout off.

    init: None keeps a trained head; "zero" zeroes it (value models start at V = 0); "normal" draws it from
    N(0, 1/(d+1)) with zero bias (reward heads, as in lm-human-preferences)."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_name(name or cfg.name)
    model = _from_pretrained(AutoModelForSequenceClassification, path, "model.name", num_labels=1,
                             dtype=pick_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code)
    prepare_loaded(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0  # only read by HF's own pooling, which we never use
    head = head_of(model)
    with torch.no_grad():
        if init == "zero":
            head.weight.zero_()
        elif init == "normal":
            head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
        if init is not None and head.bias is not None:
            head.bias.zero_()
    return model.to(device)


def scalar_outputs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Head applied to the last hidden state at every position: (B, L) float32.

    position_ids default to cumsum(mask) - 1 so left-padded rows see the same positions as unpadded ones."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    base = model.base_model
    kwargs = {"position_ids": position_ids} if _takes_position_ids(base) else {}
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # (B, L, H)
    head = head_of(model)
    return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values (B, L) read at the last position whose mask is 1 (works for left and right padding): (B,)."""
    L = attention_mask.shape[1]
    positions = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    return values.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score of each sequence: head output at its last real token, (B,)."""
    return last_token_scores(scalar_outputs(model, input_ids, attention_mask), attention_mask)


def _takes_position_ids(module: Any) -> bool:
    import inspect

    try:
        return "position_ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
