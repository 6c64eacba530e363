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


def causal_padding_allowed(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True where a query may attend to a key: causal, real keys only (valid (B, L) bool), and
    every position to itself, so a pad query's softmax row is never empty (its output is never read)."""
    L = valid.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, None, :]) | eye


def pair_segments_allowed(segment: torch.Tensor) -> torch.Tensor:
    """(n, 1, L, L) bool for packed pair rows whose columns are labelled 0 pad, 1 prompt, 2 chosen, 3 rejected:
    causal, no pad keys, rejected queries never see chosen keys, every position itself (prefix sharing, used by
    rlhfkit.trainers.dpo and rlhfkit.reward.packing)."""
    L = segment.shape[-1]
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)  # (n, L, 1), (n, 1, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=segment.device).tril()
    allowed = causal & (key > 0) & ~((query == 3) & (key == 2))  # (n, L, L)
    allowed |= torch.eye(L, dtype=torch.bool, device=segment.device)
    return allowed.unsqueeze(1)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask as the additive float mask transformers' eager and sdpa attention take: 0 where
    allowed, the dtype's most negative number elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
