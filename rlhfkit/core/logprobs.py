"""Log-probabilities, entropy and masked statistics over (B, T) token tensors.

Pure torch. Shapes: B batch, T completion length, V vocab.
Tests: `pytest tests/core/test_logprobs.py -q`.

Masks may be bool, int or float; a position counts when mask != 0. Masked-out positions never
reach an arithmetic op (we use `torch.where`, not `values * mask`), so a NaN/inf at a pad does not leak.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows of the flattened (B*T, V) logits processed at once. 1024 rows x 128k vocab x 4 bytes = 512 MiB peak
# for the float32 copy inside logsumexp, instead of the whole (B, T, V) log_softmax.
_CHUNK_ROWS = 1024


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logsumexp loses precision (see TRL selective_log_softmax); compute and return >= fp32.
    return torch.promote_types(dtype, torch.float32)


def _rowwise(fn, logits: Tensor, labels: Tensor | None = None) -> Tensor:
    """Apply fn(z (..., V), labels (...) | None) -> (...) to chunks of logits (..., T, V), giving (..., T).

    Chunks are blocks of whole sequences of about _CHUNK_ROWS positions (one set of ops per block, so the cost
    does not grow with the batch: per-row slices would also each build a full-size zero gradient in backward),
    or slices of _CHUNK_ROWS positions of one sequence when a sequence is longer; a slice such as logits[:, :-1]
    (non-contiguous) is never copied whole.
    """
    lead, V = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, lead[-1], V) if len(lead) > 1 else logits.reshape(1, -1, V)  # (N, T, V)
    label_rows = None if labels is None else labels.reshape(rows.shape[:2])  # (N, T)
    N, T = rows.shape[:2]
    dtype = _out_dtype(logits.dtype)
    out = []
    if T <= _CHUNK_ROWS:
        per = max(1, _CHUNK_ROWS // max(1, T))  # sequences per block
        for n in range(0, N, per):
            z = rows[n: n + per].to(dtype)  # (b, T, V)
            lab = None if label_rows is None else label_rows[n: n + per]  # (b, T)
            out.append(fn(z, lab))  # (b, T)
    else:
        for n in range(N):
            row = []
            for start in range(0, T, _CHUNK_ROWS):
                z = rows[n, start: start + _CHUNK_ROWS].to(dtype)  # (c, V)
                lab = None if label_rows is None else label_rows[n, start: start + _CHUNK_ROWS]  # (c,)
                row.append(fn(z, lab))  # (c,)
            out.append(torch.cat(row).unsqueeze(0))  # (1, T)
    if not out:
        return logits.new_zeros(lead, dtype=dtype)
    return (out[0] if len(out) == 1 else torch.cat(out)).reshape(lead)


def gather_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(label) under softmax(logits / temperature), memory-lean.

    logits: (B, T, V), labels: (B, T) ids in [0, V) -> (B, T) in fp32 (fp64 if logits are fp64).
    logits[:, t] must already be the prediction for labels[:, t] (the caller shifts by one).
    Pad positions need a valid id (e.g. the pad id, not -100); mask them afterwards.

    Computes  z[label] - logsumexp(z)  with z = logits / temperature, row-chunked, so the full
    (B, T, V) log_softmax is never materialised. Naive equivalent (tested):
        torch.log_softmax(logits / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    Pass the sampling temperature: the training pass must score the distribution that sampled
    (Huang et al. 2023, "The N Implementation Details of RLHF with PPO").
    Under autograd each chunk still saves its input for backward; the saving is mainly for no-grad
    scoring (old/ref logprobs), like TRL's selective_log_softmax.
    """

    def pick(z: Tensor, lab: Tensor) -> Tensor:
        if temperature != 1.0:
            z = z / temperature
        return z.gather(-1, lab.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)  # (c,)

    return _rowwise(pick, logits, labels)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: H = logsumexp(z) - sum_v softmax(z)_v z_v.

    logits: (..., V) -> (...), fp32 or wider. Row-chunked like gather_logprobs.
    Naive equivalent (tested): -(p * log p).sum(-1) with p = softmax(logits).
    """

    def ent(z: Tensor, _: None) -> Tensor:
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)  # (c,)

    return _rowwise(ent, logits)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum over positions with mask != 0; over all elements if dim is None, else along dim."""
    kept = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(values * mask) / sum(mask), over everything or along dim.

    A slice with no unmasked element gives 0 (not NaN): the count is clamped to >= 1.
    Example (tested): values [1, 2, 9], mask [1, 1, 0] -> (1 + 2) / 2 = 1.5.
    """
    count = mask.bool().to(values.dtype)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the unmasked elements (all dims), a 0-dim tensor.

    unbiased=True (default): sample variance, sum((x - mean)^2) / (n - 1), as torch.var and TRL's
    masked_var. unbiased=False: population variance / n, as numpy.var, tf.nn.moments
    (lm-human-preferences) and OpenRLHF. n <= 1 gives 0 instead of raising (no host sync).
    """
    mean = masked_mean(values, mask)
    sq_dev = masked_sum((values - mean) ** 2, mask)
    n = mask.bool().sum().to(values.dtype)
    denom = (n - 1) if unbiased else n
    return sq_dev / denom.clamp(min=1)


def masked_whiten(
    values: Tensor, mask: Tensor, shift_mean: bool = True, *, unbiased: bool = True, eps: float = 1e-8
) -> Tensor:
    """(values - mean) / sqrt(var + eps) over unmasked elements; masked positions are set to 0.

    shift_mean=False adds the mean back: only the scale changes. lm-human-preferences whitens
    rewards without shifting and advantages with shifting. Variance: masked_var(unbiased=...),
    sample variance by default. Statistics are over the tensor you pass: for data parallel,
    pass the gathered global batch (or whiten before sharding), not one rank's shard.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask, unbiased=unbiased) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))
