"""Attention alone: transformers' SDPA attention against rlhfkit's small-problem attention (rlhfkit/attention.py).

    nice -n 10 .venv/bin/python bench/bench_attention.py
    nice -n 10 .venv/bin/python bench/bench_attention.py --shapes 8x8x4x90x8,8x4x4x90x64 --reps 200

Each shape is batch x query heads x key/value heads x tokens x head dim, queries and keys in transformers' layout,
with a causal additive mask (the trainers' 4D masks). Per shape and implementation: forward alone (no gradient)
and forward + backward (gradients of query, key and value), alternating the two implementations call by call after
a warm-up; medians in ms, and the minor page faults per forward + backward. Shapes above rlhfkit's limits
(SMALL_ATTENTION_SCORES, SMALL_ATTENTION_HEAD_DIM) run SDPA on both sides.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhfkit.attention import small_attention_forward  # noqa: E402

DEFAULT = "8x8x4x90x8,16x8x4x58x8,8x8x4x33x56x8,8x8x8x90x16,8x8x8x90x32,8x4x4x90x64"


class Attn(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench(shape: list[int], reps: int) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if len(shape) == 5:
        B, H, Hkv, L, D = shape
        Lq = Lk = L
    else:  # queries after cached keys: B x H x Hkv x Lq x Lk x D
        B, H, Hkv, Lq, Lk, D = shape
    module = Attn(H // Hkv)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    mask = torch.zeros(B, 1, Lq, Lk).masked_fill(~allowed, torch.finfo(torch.float32).min)
    q = torch.randn(B, Lq, H, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Lk, Hkv, D).transpose(1, 2).requires_grad_()
    v = torch.randn(B, Lk, Hkv, D).transpose(1, 2).requires_grad_()
    grad = torch.randn(B, Lq, H, D)
    impls = {"sdpa": sdpa_attention_forward, "rlhfkit": small_attention_forward}
    times = {(name, kind): [] for name in impls for kind in ("fwd", "fwd+bwd", "faults")}
    for i in range(reps + 10):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(module, q, k, v, mask)
            t1 = time.perf_counter()
            f0 = faults()
            t2 = time.perf_counter()
            out, _ = fn(module, q, k, v, mask)
            torch.autograd.grad(out, (q, k, v), grad)
            t3 = time.perf_counter()
            if i >= 10:
                times[name, "fwd"].append(t1 - t0)
                times[name, "fwd+bwd"].append(t3 - t2)
                times[name, "faults"].append(faults() - f0)
    med = {key: statistics.median(val) for key, val in times.items()}
    return {"shape": "x".join(map(str, shape)), **{f"{n}_{k}": v for (n, k), v in med.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, medians of {args.reps}")
    print("| shape B x H x Hkv x L (x Lk) x D | forward SDPA / rlhfkit ms | speed-up | forward + backward SDPA / "
          "rlhfkit ms | speed-up | page faults per fwd + bwd SDPA / rlhfkit |")
    print("|---|---|---|---|---|---|")
    for text in args.shapes.split(","):
        r = bench([int(x) for x in text.split("x")], args.reps)
        print(f"| {r['shape']} | {r['sdpa_fwd'] * 1e3:.2f} / {r['rlhfkit_fwd'] * 1e3:.2f} | "
              f"{r['sdpa_fwd'] / r['rlhfkit_fwd']:.2f}x | {r['sdpa_fwd+bwd'] * 1e3:.2f} / "
              f"{r['rlhfkit_fwd+bwd'] * 1e3:.2f} | {r['sdpa_fwd+bwd'] / r['rlhfkit_fwd+bwd']:.2f}x | "
              f"{r['sdpa_faults']:.0f} / {r['rlhfkit_faults']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
