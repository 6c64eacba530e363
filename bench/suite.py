"""The peer benchmark (issue 9): rlhfkit against TRL 1.16 on the same workload, alternately, in one run.

    bash bench/setup_env.sh                                     # once: bench/.venv = the main venv + trl==1.16.0
    nice -n 10 bench/.venv/bin/python bench/suite.py            # every task, both models, 3 rounds
    nice -n 10 bench/.venv/bin/python bench/suite.py --tasks dpo,rollout --models gpt2 --rounds 5
    bench/.venv/bin/python bench/suite.py --report bench/results/latest.json    # print a saved run again

Tasks and their pairs (A = rlhfkit, B = the baseline):
    rm       reward-model training, pairs/s          rlhfkit `rm train` (deep)  vs TRL RewardTrainer
    dpo      DPO training, pairs/s                   rlhfkit `dpo`              vs TRL DPOTrainer
    grpo     GRPO, samples/s and generated tokens/s  rlhfkit `grpo`             vs TRL GRPOTrainer
    rloo     RLOO, samples/s and generated tokens/s  rlhfkit `rloo`             vs TRL RLOOTrainer
    rollout  generation alone, tokens/s              rlhfkit.rollout.sample     vs HF model.generate
             (reuse=True: fixed weights, the decoder is built once, as a generation loop can do)
    rollout_rebuild  the same with the decoder rebuilt on every call (reuse=False), as the RL trainers do
    ppo      PPO, samples/s and tokens/s             rlhfkit `ppo`              vs a hand-written PyTorch loop
             (bench/torch_ppo.py; TRL 1.16 has no PPOTrainer)
    peak     fp32 matrix-product peak of this CPU (square matmuls, --threads threads), for MFU
The workload is in bench/workload.py and bench/README.md. Each (task, model) runs --rounds rounds of A then B,
each side in a fresh process (so peak RSS is its own): the process trains/generates warm-up + measured steps; the
time of every measured step is taken in wall-clock seconds and in CPU seconds of the process (all its threads;
steadier than wall time when other jobs share the CPUs). Reported: the median over all measured steps of a side,
throughput = sequences (or tokens) per step / median step time, the ratio A/B of both, peak RSS (max over rounds),
and for rm and dpo the model-FLOPs utilisation against the peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workload import BATCH, MODELS, NEW_TOKENS  # noqa: E402

PAIRS = {"rm": ("rlhfkit", "trl"), "dpo": ("rlhfkit", "trl"), "grpo": ("rlhfkit", "trl"),
         "rloo": ("rlhfkit", "trl"), "rollout": ("rlhfkit", "hf"),
         "rollout_rebuild": ("rlhfkit", "hf"), "ppo": ("rlhfkit", "torch")}
BASELINE = {"trl": "TRL 1.16", "hf": "HF generate", "torch": "plain PyTorch loop"}
STEPS = {"rm": (5, 20), "dpo": (5, 20), "grpo": (2, 6), "rloo": (2, 6), "rollout": (3, 10),
         "rollout_rebuild": (3, 10), "ppo": (2, 6)}
"""(warm-up, measured) steps per run."""
UNIT = {"rm": "pairs/s", "dpo": "pairs/s", "grpo": "samples/s", "rloo": "samples/s", "rollout": "tokens/s",
        "rollout_rebuild": "tokens/s",
        "ppo": "samples/s"}
NUM_GENERATIONS = 4
"""GRPO/RLOO group size G: 8 sequences per step = 2 prompts x 4 completions (both libraries)."""


# ----------------------------------------------------------------------------------------------------------------
# Worker: one side of one round, in its own process


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_peak(threads: int, reps: int = 12) -> dict:
    """fp32 matmul throughput, square sizes 512-2048: the median over reps of FLOP/s (wall) and FLOP per
    CPU-second; the peak is the best size."""
    import torch

    torch.set_num_threads(threads)
    best = {"gflops_wall": 0.0, "gflops_per_cpu_s": 0.0}
    for n in (512, 1024, 1536, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        wall, cpu = [], []
        for _ in range(reps):
            t, c = time.perf_counter(), time.process_time()
            a @ b
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        flops = 2 * n ** 3
        best["gflops_wall"] = max(best["gflops_wall"], flops / statistics.median(wall) / 1e9)
        best["gflops_per_cpu_s"] = max(best["gflops_per_cpu_s"], flops / max(statistics.median(cpu), 1e-9) / 1e9)
    return best


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result: dict = {"task": args.task, "impl": args.impl, "model": args.model, "load_start": os.getloadavg()[0]}
    if args.task == "peak":
        result.update(measure_peak(args.threads))
    else:
        from workload import build

        w = build(args.model, Path(args.work))
        stamps: list[tuple[float, float, int]] = []

        def stamp() -> None:  # wall, CPU seconds, minor page faults so far
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            stamps.append((time.perf_counter(), time.process_time(), faults))

        warmup, measured = args.warmup, args.steps
        runner = __import__("run_rlhfkit" if args.impl == "rlhfkit" else "run_trl")
        with tempfile.TemporaryDirectory(prefix=f"bench_{args.task}_{args.impl}_") as out:
            extra = runner.run(args.task, w, Path(out), warmup + measured + 1, args.threads, stamp, NUM_GENERATIONS)
        # stamps[k] ends step k+1; durations of the last `measured` steps (the first warmup + 1 are dropped)
        steps = [tuple(y - x for x, y in zip(a, b)) for a, b in zip(stamps, stamps[1:])][-measured:]
        if len(steps) < measured:
            raise SystemExit(f"{args.task}/{args.impl}: only {len(stamps)} steps were stamped")
        result.update(extra, wall=[s[0] for s in steps], cpu=[s[1] for s in steps], faults=[s[2] for s in steps],
                      threads=torch.get_num_threads())
    result["rss_mb"] = peak_rss_mb()
    result["load_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(result) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Orchestrator


def spawn(task: str, impl: str, model: str, args: argparse.Namespace) -> dict:
    warmup, steps = STEPS.get(task, (0, 0))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, impl, model, "--out", out,
           "--threads", str(args.threads), "--work", args.work, "--warmup", str(args.warmup or warmup),
           "--steps", str(args.steps or steps)]
    log = Path(args.work) / "logs" / f"{task}_{impl}_{model}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=HERE.parent)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{task}/{impl}/{model} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    res["seconds"] = time.perf_counter() - t0
    return res


def summarize(task: str, model: str, runs: dict[str, list[dict]], peak: dict | None) -> dict:
    a, b = PAIRS[task]
    row: dict = {"task": task, "model": model, "unit": UNIT[task], "baseline": BASELINE[b], "rounds": len(runs[a])}
    for side, impl in (("a", a), ("b", b)):
        wall = statistics.median(x for r in runs[impl] for x in r["wall"])
        cpu = statistics.median(x for r in runs[impl] for x in r["cpu"])
        per_step = BATCH * NEW_TOKENS if task.startswith("rollout") else BATCH
        row[f"{side}_wall_s"], row[f"{side}_cpu_s"] = wall, cpu
        row[f"{side}_per_s"], row[f"{side}_per_cpu_s"] = per_step / wall, per_step / cpu
        row[f"{side}_rss_mb"] = max(r["rss_mb"] for r in runs[impl])
        if task in ("grpo", "rloo", "ppo"):
            row[f"{side}_tokens_per_s"] = BATCH * NEW_TOKENS / wall
    row["ratio_wall"] = row["b_wall_s"] / row["a_wall_s"]
    row["ratio_cpu"] = row["b_cpu_s"] / row["a_cpu_s"]
    paired = [statistics.median(rb["wall"]) / statistics.median(ra["wall"]) for ra, rb in zip(runs[a], runs[b])]
    row["ratio_wall_per_round"] = paired
    if task in ("rm", "dpo") and peak:
        from workload import build, model_shape, pair_lengths, pair_step_flops

        w = build(model, Path(ARGS.work))
        lengths = pair_lengths(w)
        flops = pair_step_flops(model_shape(w.model_dir), lengths, policy_head=task == "dpo",
                                reference=task == "dpo") * BATCH / len(lengths)
        row["step_gflop"] = flops / 1e9
        for side in ("a", "b"):
            row[f"{side}_mfu_wall"] = flops / row[f"{side}_wall_s"] / (peak["gflops_wall"] * 1e9)
            row[f"{side}_mfu_cpu"] = flops / row[f"{side}_cpu_s"] / (peak["gflops_per_cpu_s"] * 1e9)
    return row


def fmt_table(rows: list[dict], peak: dict | None) -> str:
    head = ("| task | model | unit | rlhfkit (wall) | baseline (wall) | ratio wall | ratio CPU time | "
            "rlhfkit / baseline peak RSS MB | MFU rlhfkit / baseline (wall; CPU time) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        mfu = (f"{r['a_mfu_wall']:.0%} / {r['b_mfu_wall']:.0%}; {r['a_mfu_cpu']:.0%} / {r['b_mfu_cpu']:.0%}"
               if "a_mfu_wall" in r else "")
        extra = (f" ({r['a_tokens_per_s']:,.0f} / {r['b_tokens_per_s']:,.0f} tok/s)"
                 if "a_tokens_per_s" in r else "")
        lines.append(f"| {r['task']} | {r['model']} | {r['unit']} | {r['a_per_s']:,.1f} | {r['b_per_s']:,.1f} "
                     f"({r['baseline']}){extra} | {r['ratio_wall']:.2f}x | {r['ratio_cpu']:.2f}x | "
                     f"{r['a_rss_mb']:,.0f} / {r['b_rss_mb']:,.0f} | {mfu} |")
    if peak:
        lines.append(f"\nfp32 matmul peak (median of the peak runs): {peak['gflops_wall']:.0f} GFLOP/s wall, "
                     f"{peak['gflops_per_cpu_s']:.0f} GFLOP per CPU-second")
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> None:
    import torch
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    tasks, models = args.tasks.split(","), args.models.split(",")
    if trl_version is None and any(PAIRS.get(t, ("", ""))[1] == "trl" for t in tasks):
        raise SystemExit("trl is not importable: run `bash bench/setup_env.sh` and use bench/.venv/bin/python")
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": os.getloadavg(), "cpus": os.cpu_count(),
            "cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "caches": _caches(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version, "threads": args.threads,
            "rounds": args.rounds, "command": " ".join(sys.argv)}
    print(f"# {meta['started']}  load {meta['load_start'][0]:.1f}  {meta['cpu']} x{meta['cpus']} "
          f"({meta['cpu_capability']}; {meta['caches']})  torch {meta['torch']}"
          f"  transformers {meta['transformers']}  trl {trl_version}  threads {args.threads}", flush=True)
    peaks = [spawn("peak", "torch", "-", args)]
    print(f"peak: {peaks[-1]['gflops_wall']:.0f} GFLOP/s wall, {peaks[-1]['gflops_per_cpu_s']:.0f} GFLOP/CPU-s",
          flush=True)
    rows = []
    for task in tasks:
        for model in models:
            a, b = PAIRS[task]
            runs: dict[str, list[dict]] = {a: [], b: []}
            for rnd in range(args.rounds):
                for impl in (a, b):  # A B A B ...: both sides see the same drift of the machine's load
                    res = spawn(task, impl, model, args)
                    runs[impl].append(res)
                    print(f"{task:<8} {model:<12} round {rnd} {impl:<8} median step "
                          f"{statistics.median(res['wall']):.3f} s wall, {statistics.median(res['cpu']):.3f} s CPU, "
                          f"RSS {res['rss_mb']:.0f} MB, load {res['load_start']:.1f} ({res['seconds']:.0f} s)",
                          flush=True)
            peaks.append(spawn("peak", "torch", "-", args))
            peak = {k: statistics.median(p[k] for p in peaks) for k in ("gflops_wall", "gflops_per_cpu_s")}
            rows.append(summarize(task, model, runs, peak))
            rows[-1]["runs"] = runs
            print(fmt_table(rows[-1:], None), flush=True)
    meta["load_end"] = os.getloadavg()
    meta["peaks"] = peaks
    result = {"meta": meta, "rows": rows, "peak": peak}
    print(report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def report(result: dict) -> str:
    m = result["meta"]
    return (f"\n## rlhfkit vs baselines, {m['started']}, load average {m['load_start'][0]:.1f} at start, "
            f"{m['load_end'][0]:.1f} at end; {m['cpu']} x{m['cpus']}{_host(m)}, {m['threads']} torch threads; "
            f"torch "
            f"{m['torch']}, transformers {m['transformers']}, trl {m['trl']}; {m['rounds']} rounds A B\n\n"
            + fmt_table(result["rows"], result.get("peak")))


def _host(meta: dict) -> str:
    """' (AVX2; L2 512K, L3 32768K)' where the run recorded it (runs before T did not)."""
    if "cpu_capability" not in meta:
        return ""
    return f" ({meta['cpu_capability']}; {meta['caches']})"


def _caches() -> str:
    """L2 and L3 sizes of CPU 0 as Linux reports them ('L2 1024K, L3 32768K'), or '' where unreadable. Figures of
    the suite depend on the host: the lean paths of rlhfkit are bound by small products and per-op overhead, which
    vary more between CPUs than TRL's Python overhead does (docs/benchmarks.md, run T)."""
    out = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            if level in ("2", "3") and kind in ("Unified", "Data"):
                out.append(f"L{level} {(index / 'size').read_text().strip()}")
        except OSError:
            continue
    return ", ".join(out)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="rm,dpo,grpo,rloo,rollout,rollout_rebuild,ppo")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps per run (0: the task's default)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per run (0: the task's default)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rlhfkit_bench"),
                    help="cache of models and data, and the workers' logs")
    ap.add_argument("--json", default=str(HERE / "results" / "latest.json"), help="write all results here")
    ap.add_argument("--report", default="", help="print the table of a saved --json file and exit")
    ap.add_argument("--worker", nargs=3, metavar=("TASK", "IMPL", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global ARGS
    ARGS = args
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
    elif args.worker:
        args.task, args.impl, args.model = args.worker
        worker(args)
    else:
        orchestrate(args)


ARGS: argparse.Namespace
if __name__ == "__main__":
    main()
