"""The highest training-step MFU any implementation can reach on this CPU with PyTorch's fp32 matrix products.

    nice -n 10 .venv/bin/python bench/mfu_ceiling.py                       # rm and dpo, both workload models
    nice -n 10 .venv/bin/python bench/mfu_ceiling.py --models stories260k --reps 31

The suite (bench/suite.py) reports model-FLOPs utilisation, MFU = model FLOPs of a step / step time / fp32 matmul
peak, with the step's model FLOPs counted by `workload.pair_step_flops` (every pair as two unpadded sequences,
attention included, backward = 2x forward, DPO's frozen reference = 1x forward). This script times a program that
does nothing but the step's *weight* matrix products, in the most favourable form PyTorch offers:
- every token of the step (8 pairs = 16 sequences) in one matrix, so each weight is one product of N rows;
- q, k and v as one fused (d, d + 2·kv) weight, a gated MLP's gate and up as one (d, 2·ff) weight (GPT-2's c_attn
  and c_fc are fused already);
- per weight: the forward product, and for the trained policy the two backward products (grad input g·Wᵀ and
  grad weight xᵀ·g); the LM head only at the positions a loss reads (DPO: the completion tokens); DPO's reference
  is one more forward; RM's scalar head (d x 1) is left out.
Norms, softmax, the loss, the optimizer and all framework overhead take no time in it. A real training step does all
of that too, so its time is at least this program's, and

    MFU ceiling = model FLOPs of the step (attention included) / time of the weight products alone / peak

bounds the MFU of every implementation built on these kernels (oneDNN / MKL through torch.mm), rlhfkit's and
TRL's alike. A second, lower bound adds attention's score products, which every implementation also runs: per
layer QKᵀ and PV forward and their four backward products (dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q), as
batched products over the step's sequences padded to the step's longest (what a batched implementation computes;
the model FLOPs count only the causal half), in the faster of two layouts: one batch entry per query head, or the
G query heads that share a key/value head stacked as one matrix (rlhfkit's `attention.py`). Its ceiling is

    MFU ceiling with attention = model FLOPs of the step / time of weight and attention products / peak

It bounds every implementation that runs attention as batched products (rlhfkit's; PyTorch's SDPA kernel, which
TRL's models call, is slower still at these shapes: `bench/bench_attention.py`). On gpt2 the attention products
cost little (84% against 88-89% on 2026-12-03); on stories260k, 64 columns and 8-dim heads, they halve the ceiling
(42-45% against 82-85%): only hand-written attention and product kernels could go above that. The peak is
measured here as the suite does (square fp32 products of 512-2048, the best size), in groups timed alternately
with the programs. Threads: 2, as the workload.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_host import median_ms  # noqa: E402
from suite import measure_peak  # noqa: E402
from workload import BATCH, build, model_shape, pair_lengths, pair_step_flops  # noqa: E402


def weight_shapes(model_dir: Path) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """One block's weight products as (in, out), fused as described above, repeated per layer; and the LM head."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    if c.model_type == "gpt2":
        d, ff = c.n_embd, c.n_inner or 4 * c.n_embd
        block = [(d, 3 * d), (d, d), (d, ff), (ff, d)]
        layers, vocab = c.n_layer, c.vocab_size
    else:
        d, ff = c.hidden_size, c.intermediate_size
        heads = c.num_attention_heads
        kv = (c.num_key_value_heads or heads) * (getattr(c, "head_dim", None) or d // heads)
        block = [(d, d + 2 * kv), (d, d), (d, 2 * ff), (ff, d)]
        layers, vocab = c.num_hidden_layers, c.vocab_size
    return block * layers, (d, vocab)


def attention_shape(model_dir: Path) -> tuple[int, int, int, int]:
    """(layers, query heads, key/value heads, head dim) of the model."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    if c.model_type == "gpt2":
        return c.n_layer, c.n_head, c.n_head, c.n_embd // c.n_head
    heads = c.num_attention_heads
    return (c.num_hidden_layers, heads, c.num_key_value_heads or heads,
            getattr(c, "head_dim", None) or c.hidden_size // heads)


def attention_program(shape: tuple[int, int, int, int], sequences: int, length: int, train: bool, reference: bool,
                      stacked: bool):
    """A function running one step's attention score products (batched, every sequence padded to `length`):
    stacked=False one batch entry per query head, True the G query heads of a key/value head as one matrix."""
    layers, heads, kv, dim = shape
    batch, rows = (sequences * kv, heads // kv * length) if stacked else (sequences * heads, length)
    q, k, v = torch.randn(batch, rows, dim), torch.randn(batch, length, dim), torch.randn(batch, length, dim)
    p, g = torch.randn(batch, rows, length), torch.randn(batch, rows, dim)
    kt, vt, pt = k.transpose(1, 2), v.transpose(1, 2), p.transpose(1, 2)

    def run() -> None:
        for _ in range((1 + reference if train else 1) * layers):
            torch.bmm(q, kt)
            torch.bmm(p, v)
        if train:
            for _ in range(layers):
                torch.bmm(g, vt)  # dP
                torch.bmm(pt, g)  # dV
                torch.bmm(p, k)  # dQ (dS in P's place: same shape)
                torch.bmm(pt, q)  # dK (dSᵀ·Q)

    return run


def products_program(shapes: list[tuple[int, int]], head: tuple[int, int], tokens: int, head_rows: int,
                     train: bool, reference: bool):
    """A function running one step's weight products on random data of the given sizes (buffers made once)."""
    xs = {n: torch.randn(tokens, n) for n in {s for pair in shapes for s in pair}}
    ws = [torch.randn(i, o) for i, o in shapes]
    w_head = torch.randn(*head)
    x_head, g_head = torch.randn(head_rows, head[0]), torch.randn(head_rows, head[1])

    def run() -> None:
        for _ in range(1 + reference if train else 1):  # the reference: one more forward
            for w in ws:
                torch.mm(xs[w.shape[0]], w)
            if head_rows:
                torch.mm(x_head, w_head)
        if train:  # backward: grad input and grad weight of every product
            if head_rows:
                torch.mm(g_head, w_head.t())
                torch.mm(x_head.t(), g_head)
            for w in reversed(ws):
                g = xs[w.shape[1]]
                torch.mm(g, w.t())
                torch.mm(xs[w.shape[0]].t(), g)

    return run


def ceiling(task: str, model: str, work: Path, reps: int, threads: int) -> dict:
    w = build(model, work)
    lengths = pair_lengths(w)
    steps = [lengths[i: i + BATCH] for i in range(0, len(lengths) - BATCH + 1, BATCH)]
    flops = statistics.fmean(pair_step_flops(model_shape(w.model_dir), s, policy_head=task == "dpo",
                                             reference=task == "dpo") for s in steps)
    tokens = round(statistics.fmean(sum(2 * p + c + r for p, c, r in s) for s in steps))
    head_rows = round(statistics.fmean(sum(c + r for _, c, r in s) for s in steps)) if task == "dpo" else 0
    length = round(statistics.fmean(max(p + max(c, r) for p, c, r in s) for s in steps))
    shapes, head = weight_shapes(w.model_dir)
    attn = attention_shape(w.model_dir)
    torch.set_num_threads(threads)
    with torch.inference_mode():
        run = products_program(shapes, head, tokens, head_rows, train=True, reference=task == "dpo")
        layouts = [attention_program(attn, 2 * BATCH, length, train=True, reference=task == "dpo", stacked=st)
                   for st in ((False, True) if attn[1] != attn[2] else (False,))]
        times, attention, peaks = [], [], []
        for _ in range(max(1, reps // 7)):  # the products and the peak alternately: both see the same machine
            times.append(median_ms(run, 7) / 1e3)
            attention.append(min(median_ms(a, 7) for a in layouts) / 1e3)
            peaks.append(measure_peak(threads, reps=3)["gflops_wall"])
    t, ta, peak = statistics.median(times), statistics.median(attention), statistics.median(peaks)
    return {"task": task, "model": model, "step_gflop": flops / 1e9, "tokens": tokens, "padded_length": length,
            "products_ms": t * 1e3, "attention_ms": ta * 1e3, "peak_gflops": peak,
            "products_gflops": flops / t / 1e9, "ceiling": flops / t / (peak * 1e9),
            "ceiling_attention": flops / (t + ta) / (peak * 1e9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stories260k,gpt2")
    ap.add_argument("--tasks", default="dpo,rm")
    ap.add_argument("--reps", type=int, default=21, help="timed runs of each program (in groups of 7)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rlhfkit_bench"),
                    help="the suite's workload folder (built on first use)")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load:.1f}")
    print("| task | model | model GFLOP per step | tokens per step | weight products alone, ms | attention products "
          "(padded length), ms | fp32 peak GFLOP/s | MFU ceiling (weight products) | MFU ceiling (with attention) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for task in args.tasks.split(","):
            r = ceiling(task, model, Path(args.work), args.reps, args.threads)
            print(f"| {task} | {model} | {r['step_gflop']:.2f} | {r['tokens']} | {r['products_ms']:.1f} | "
                  f"{r['attention_ms']:.1f} ({r['padded_length']}) | {r['peak_gflops']:.0f} | **{r['ceiling']:.0%}** "
                  f"| **{r['ceiling_attention']:.0%}** |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
