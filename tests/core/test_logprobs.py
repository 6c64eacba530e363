"""Hand-computed and reference-equality tests for rlhfkit.core.logprobs."""

import math

import pytest
import torch

from rlhfkit.core import entropy_from_logits, gather_logprobs, masked_mean, masked_sum, masked_var, masked_whiten
from rlhfkit.core import logprobs as logprobs_module


def naive_logprobs(logits, labels, temperature=1.0):
    return torch.log_softmax(logits / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def test_gather_logprobs_hand_computed():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; label 1 -> ln 0.75 = -0.28768
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert gather_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    # temperature 2 on [0, 2 ln 3] gives the same distribution
    logits_t = torch.tensor([[[0.0, 2 * math.log(3.0)]]])
    assert gather_logprobs(logits_t, torch.tensor([[1]]), temperature=2.0).item() == pytest.approx(math.log(0.75))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("chunk_rows", [1024, 16, 2])  # 16: blocks of 2 whole rows; 2: several chunks per row
def test_gather_logprobs_equals_naive(monkeypatch, temperature, chunk_rows):
    monkeypatch.setattr(logprobs_module, "_CHUNK_ROWS", chunk_rows)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 7), generator=g)
    expected = naive_logprobs(logits, labels, temperature)
    torch.testing.assert_close(gather_logprobs(logits, labels, temperature), expected)
    # non-contiguous slice, as used for next-token prediction: logits[:, :-1] vs ids[:, 1:]
    sliced = logits[:, :-1]
    assert not sliced.is_contiguous()
    torch.testing.assert_close(
        gather_logprobs(sliced, labels[:, 1:], temperature), naive_logprobs(sliced, labels[:, 1:], temperature)
    )


def test_gather_logprobs_gradient_equals_naive(monkeypatch):
    monkeypatch.setattr(logprobs_module, "_CHUNK_ROWS", 3)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g)
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    (gather_logprobs(a, labels, 0.8) * weights).sum().backward()
    (naive_logprobs(b, labels, 0.8) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_gather_logprobs_bf16_returns_fp32_close_to_fp32_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 50, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 4), generator=g)
    out = gather_logprobs(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_logprobs(logits.float(), labels))


def test_entropy_hand_computed_and_naive(monkeypatch):
    # uniform over 4 tokens -> ln 4 = 1.3863; one-hot-ish (logit gap 100) -> ~0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4.0), 0.0]]))
    monkeypatch.setattr(logprobs_module, "_CHUNK_ROWS", 2)
    x = torch.randn(3, 5, 9, generator=torch.Generator().manual_seed(3))
    p = torch.softmax(x, -1)
    torch.testing.assert_close(entropy_from_logits(x), -(p * p.log()).sum(-1))


def test_masked_mean_and_sum_hand_computed():
    values = torch.tensor([1.0, 2.0, 9.0])
    mask = torch.tensor([1, 1, 0])
    assert masked_sum(values, mask).item() == 3.0  # 1 + 2
    assert masked_mean(values, mask).item() == 1.5  # (1 + 2) / 2
    # along a dim: rows [1, 2 | 9 masked] -> 1.5 and [4 | 5, 6 masked] -> 4; empty row -> 0 (not NaN)
    v = torch.tensor([[1.0, 2.0, 9.0], [4.0, 5.0, 6.0], [7.0, 7.0, 7.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(masked_mean(v, m, dim=-1), torch.tensor([1.5, 4.0, 0.0]))


def test_masked_ops_ignore_nan_at_masked_positions():
    values = torch.tensor([1.0, 3.0, float("nan"), float("-inf")])
    mask = torch.tensor([True, True, False, False])
    assert masked_mean(values, mask).item() == 2.0
    assert masked_var(values, mask).item() == 2.0  # (1 + 1) / (2 - 1)


def test_masked_var_sample_vs_population():
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 2; squared deviations 1 + 0 + 1 = 2; sample 2 / (3 - 1) = 1; population 2 / 3
    assert masked_var(values, mask).item() == pytest.approx(1.0)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    assert masked_var(values, mask).item() == pytest.approx(values[:3].var().item())  # torch.var is unbiased


def test_masked_whiten_hand_computed():
    values = torch.tensor([2.0, 4.0, 6.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 4, sample var (4 + 0 + 4) / 2 = 4, std 2 -> [-1, 0, 1]; pad -> 0
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    # shift_mean=False adds the mean back: [3, 4, 5] (only the scale changed)
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), torch.tensor([3.0, 4.0, 5.0, 0.0]))
    # population var 8/3 -> std 1.63299 -> ±1.22474
    out = masked_whiten(values, mask, unbiased=False)
    torch.testing.assert_close(out, torch.tensor([-1.2247449, 0.0, 1.2247449, 0.0]))
