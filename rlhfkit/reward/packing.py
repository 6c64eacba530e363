"""Prefix sharing for reward-model pairs: a pair's chosen and rejected sequences in one row, their common prefix
(the prompt) computed once, each side scored at its own last token.

    batch = pack_pairs([(chosen_ids, rejected_ids), ...], pad_id, torch.float32)
    scores = packed_scores(model, batch)          # (n, 2): chosen, rejected

Row = [common prefix, rest of chosen, rest of rejected], right-padded. The rejected tokens may not attend to the
chosen ones and their positions restart after the prefix, so each side sees exactly its own sequence: the same
scores as two rows (Wang et al. 2024, arXiv:2410.20305; rlhfkit.trainers.dpo packs its pairs the same way), with
the prompt's tokens computed once instead of twice. Only causal decoders see it that way: `packing_matches` checks
the model at hand numerically (bidirectional encoders fail it and keep two rows per pair).
Naive equivalent (tested): sequence_scores(model, pad_sequences(chosen + rejected)).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from rlhfkit.data.collate import additive_mask, pad_sequences, pair_segments_allowed
from rlhfkit.heads import scalar_outputs, sequence_scores


class PackedPairs(NamedTuple):
    input_ids: torch.Tensor  # (n, L)
    attention_mask: torch.Tensor  # (n, 1, L, L) additive: 0 where a query may attend to a key, dtype-min elsewhere
    position_ids: torch.Tensor  # (n, L)
    ends: torch.Tensor  # (n, 2) columns of the last chosen and the last rejected token

    def to(self, device: Any) -> "PackedPairs":
        return PackedPairs(*(x.to(device) for x in self))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pack_pairs(pairs: list[tuple[list[int], list[int]]], pad_id: int, dtype: torch.dtype) -> PackedPairs:
    """One row per (chosen, rejected) token-id pair; each side keeps at least its last token outside the shared
    prefix, so its score is read from its own segment."""
    rows, segments, positions, ends = [], [], [], []
    for c, r in pairs:
        k = min(_common_prefix(c, r), len(c) - 1, len(r) - 1)
        rows.append(c + r[k:])
        segments.append([1] * k + [2] * (len(c) - k) + [3] * (len(r) - k))  # 1 prefix, 2 chosen, 3 rejected
        positions.append(list(range(len(c))) + list(range(k, len(r))))
        ends.append([len(c) - 1, len(c) + len(r) - k - 1])
    ids, _ = pad_sequences(rows, pad_id, side="right")  # (n, L)
    seg, _ = pad_sequences(segments, 0, side="right")  # (n, L), 0 = pad
    pos, _ = pad_sequences(positions, 0, side="right")
    return PackedPairs(ids, additive_mask(pair_segments_allowed(seg), dtype), pos, torch.tensor(ends))


def packed_scores(model: Any, batch: PackedPairs) -> torch.Tensor:
    """(n, 2) scores of (chosen, rejected): the scalar head at each side's last token. Differentiable."""
    values = scalar_outputs(model, batch.input_ids, batch.attention_mask, batch.position_ids)  # (n, L)
    return values.gather(1, batch.ends)


@torch.no_grad()
def packing_matches(model: Any, pairs: list[tuple[list[int], list[int]]], pad_id: int, device: Any) -> bool:
    """Whether packed rows score like separate ones for this model (causal attention taking a 4D mask)."""
    if not pairs:
        return False
    was_training = model.training
    model.eval()
    try:
        dtype = model.get_input_embeddings().weight.dtype
        packed = packed_scores(model, pack_pairs(pairs, pad_id, dtype).to(device))  # (n, 2)
        ids, mask = pad_sequences([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
        plain = sequence_scores(model, ids.to(device), mask.to(device)).view(2, -1).t()  # (n, 2)
    except (RuntimeError, ValueError, TypeError):
        return False
    finally:
        model.train(was_training)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return bool(torch.allclose(packed.float(), plain.float(), rtol=tol, atol=tol * 0.1))
