"""Padding token sequences into batches, with masks built from lengths (never from pad ids)."""

from __future__ import annotations

import torch


def pad_sequences(seqs: list[list[int]], pad_id: int, side: str = "right",
                  length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), attention_mask (B, L)) with padding on `side` ("left" for generation prompts)."""
    width = max(length or 0, max((len(s) for s in seqs), default=0))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if not seq:
            continue
        t = torch.as_tensor(seq, dtype=torch.long)
        if side == "right":
            ids[i, : len(seq)] = t
            mask[i, : len(seq)] = 1
        else:
            ids[i, width - len(seq):] = t
            mask[i, width - len(seq):] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens: cumsum(mask) - 1, clamped at 0 (PITFALLS 1, left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
