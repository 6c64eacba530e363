"""Prefix sharing for reward-model pairs (rlhfkit.reward.packing): one row per pair scores like two rows."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.collate import pad_sequences
from rlhfkit.heads import sequence_scores
from rlhfkit.models import disable_dropout
from rlhfkit.reward.packing import pack_pairs, packed_scores, packing_matches

PAIRS = [([5, 6, 7, 8, 9, 2], [5, 6, 7, 11, 2]),  # shared prompt of 3 tokens
         ([3, 4, 2], [9, 9, 9, 9, 2]),  # nothing shared
         ([5, 6, 7], [5, 6, 7, 8, 2]),  # chosen is a prefix of rejected: it keeps its last token
         ([5, 6, 7, 8, 2], [5, 6, 7])]  # and the other way round


def scalar_model(kind: str):
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                              LlamaConfig, LlamaForSequenceClassification)

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(vocab_size=20, n_positions=32, n_embd=32, n_layer=2,
                                                         n_head=2, num_labels=1, pad_token_id=0))
    elif kind == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=48,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, num_labels=1, pad_token_id=0))
    else:
        model = BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=2, intermediate_size=48, num_labels=1))
    disable_dropout(model)
    with torch.no_grad():  # larger weights than the 0.02-std init, so attention visibly matters
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model


def two_rows(model, pairs):
    ids, mask = pad_sequences([c for c, _ in pairs] + [r for _, r in pairs], 0)
    return sequence_scores(model, ids, mask).view(2, -1).t()  # (n, 2)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_packed_pairs_score_and_train_like_two_rows(kind):
    model = scalar_model(kind)
    batch = pack_pairs(PAIRS, 0, torch.float32)
    # row 0: prefix [5, 6, 7], then chosen 8 9 2, then rejected 11 2 at positions 3, 4
    assert batch.input_ids[0].tolist()[:8] == [5, 6, 7, 8, 9, 2, 11, 2]
    assert batch.position_ids[0].tolist()[:8] == [0, 1, 2, 3, 4, 5, 3, 4]
    assert batch.ends.tolist() == [[5, 7], [2, 7], [2, 5], [4, 5]]
    packed = packed_scores(model, batch)
    plain = two_rows(model, PAIRS)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    (packed[:, 0] - packed[:, 1]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (plain[:, 0] - plain[:, 1]).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    assert packing_matches(model, PAIRS, 0, "cpu")


def test_bidirectional_encoder_fails_the_check_and_keeps_two_rows():
    assert not packing_matches(scalar_model("bert"), PAIRS, 0, "cpu")
