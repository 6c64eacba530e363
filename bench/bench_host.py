"""What this host gives the decode loop: the weight products of one decode step per implementation, and the cost
of small operators. Run it before comparing suite runs from different machines (docs/benchmarks.md, run T).

    python bench/bench_host.py                    # 1 and 2 threads, batch 8, the benchmark's 4-layer GPT-2 shapes
    python bench/bench_host.py --threads 2 --rows 8 --reps 100

Products: the 17 weight matrices a decode step of the benchmark's gpt2 reads (4 layers x [qkv 256->768,
out 256->256, fc 256->1024, proj 1024->256] + the 4,096-token head), random, each timed as a whole step of
`--rows` rows, median of `--reps`:
  - rlhfkit's kernel (`rlhfkit.kernels`, the fast decoder's products where it builds: `rlhfkit.rollout._Proj`);
  - oneDNN prepacked (`torch.ops.mkldnn._linear_pointwise`, the decoder's products without the kernel);
  - MKL `torch.mm(x, w.t())` on an (out, in) weight (nn.Linear) and on an (in, out) one (GPT-2's Conv1D, HF);
  - MKL packed (`torch.ops.mkl._mkl_linear`), and the transposed product w @ x.t();
  - a sum over the same 17 MB of weights (how long reading them takes, cache-warm).
Small operators: median time of one call on a (rows, 64) tensor: add, a view, an RMSNorm (F.rms_norm), softmax.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rlhfkit import kernels

SHAPES = [(256, 768), (256, 256), (256, 1024), (1024, 256)] * 4 + [(256, 4096)]  # (in, out) per product


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def products(rows: int, reps: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=g) * 0.02 for i, o in SHAPES]
    xs = {i: torch.randn(rows, i, generator=g) for i, _ in SHAPES}
    impls = {
        "onednn prepacked": (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows),
                             lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")),
        "mm, (out, in) weight": (lambda w: w, lambda x, p: torch.mm(x, p.t())),
        "mm, (in, out) weight": (lambda w: w.t().contiguous(), lambda x, p: torch.mm(x, p)),
        "w @ x.t()": (lambda w: w, lambda x, p: torch.mm(p, x.t())),
    }
    if kernels.available():  # rlhfkit's own (rlhfkit/csrc/small_linear.cpp), what the fast decoder uses
        impls["rlhfkit kernel"] = (lambda w: (kernels.pack(w), w.shape[0]),
                                   lambda x, p: kernels.linear(x, p[0], None, None, p[1]))
    if hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") and torch._C.has_mkl:
        impls["mkl packed"] = (lambda w: (torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w),
                               lambda x, p: torch.ops.mkl._mkl_linear(x, p[0], p[1], None, rows))
    out = {}
    for name, (prep, call) in impls.items():
        try:
            packed = [prep(w) for w in ws]
        except RuntimeError as e:  # a build without oneDNN/MKL
            print(f"  {name}: unavailable ({str(e).splitlines()[0]})")
            continue
        pairs = [(xs[w.shape[1]], p) for w, p in zip(ws, packed)]
        out[name] = median_ms(lambda: [call(x, p) for x, p in pairs], reps)
    flat = torch.cat([w.flatten() for w in ws])
    out["sum over the weights (read)"] = median_ms(flat.sum, reps)
    return out


def small_ops(rows: int, reps: int) -> dict[str, float]:
    a, b = torch.randn(rows, 64), torch.randn(rows, 64)
    ops = {"add": lambda: torch.add(a, b), "view": lambda: a.view(-1),
           "rms_norm": lambda: F.rms_norm(a, (64,), None, 1e-5), "softmax": lambda: torch.softmax(a, -1)}
    return {name: median_ms(fn, reps * 20) * 1e3 for name, fn in ops.items()}  # microseconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    weights_mb = sum(i * o for i, o in SHAPES) * 4 / 2 ** 20
    flops = 2 * args.rows * sum(i * o for i, o in SHAPES)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.rows} rows, {len(SHAPES)} products, {weights_mb:.1f} MB of fp32 weights per step")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s): one decode step's weight products, ms (GFLOP/s)")
        for name, ms in products(args.rows, args.reps).items():
            extra = f"{weights_mb / 1024 / (ms / 1e3):.0f} GB/s" if name.startswith("sum") else \
                f"{flops / (ms / 1e3) / 1e9:.0f} GFLOP/s"
            print(f"  {name:<28} {ms:7.3f} ms  ({extra})")
        print(f"{threads} thread(s): small operators on ({args.rows}, 64), us per call")
        for name, us in small_ops(args.rows, args.reps).items():
            print(f"  {name:<28} {us:7.2f} us")


if __name__ == "__main__":
    main()
