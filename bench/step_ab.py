"""rlhfkit's side of a suite task, with and without an environment setting, in alternating fresh processes.

    nice -n 10 bench/.venv/bin/python bench/step_ab.py --task grpo --model gpt2 --steps 45 --pairs 4 \
        --env RLHFKIT_SOMETHING=1

Each pair runs the task's real trainer once as is (A) and once with --env set (B), each in a fresh suite worker
(`suite.py`'s, the suite's workload and step stamps), and prints per run the median step time, CPU time per step,
minor page faults per step (medians over the measured steps, after --warmup) and peak RSS, then the medians over
the pairs. Used to measure process-level settings such as glibc's malloc thresholds (bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from suite import spawn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="grpo", help="a suite task that runs a trainer: grpo, rloo, dpo, rm, ppo")
    ap.add_argument("--model", default="gpt2", help="gpt2 or stories260k")
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--steps", type=int, default=45, help="measured steps per run")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--env", required=True, help="NAME=VALUE set for the B runs")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rlhfkit_bench"))
    args = ap.parse_args()
    name, _, value = args.env.partition("=")
    before = os.environ.get(name)
    print(f"{args.task} {args.model}, {args.warmup} + {args.steps} steps per run; A: as is, B: {args.env}", flush=True)
    results: dict[str, list[dict]] = {"A": [], "B": []}
    try:
        for pair in range(args.pairs):
            for side in ("A", "B"):
                os.environ.pop(name, None)  # the worker inherits this process's environment
                if side == "B":
                    os.environ[name] = value
                res = spawn(args.task, "rlhfkit", args.model, args)
                r = {"step_ms": statistics.median(res["wall"]) * 1e3, "cpu_ms": statistics.median(res["cpu"]) * 1e3,
                     "faults": statistics.median(res["faults"]), "rss_mb": res["rss_mb"]}
                results[side].append(r)
                print(f"pair {pair + 1} {side} step {r['step_ms']:7.1f} ms  CPU {r['cpu_ms']:7.1f} ms/step  "
                      f"faults {r['faults']:7.0f}/step  peak RSS {r['rss_mb']:6.0f} MB", flush=True)
    finally:
        os.environ.pop(name, None)
        if before is not None:
            os.environ[name] = before
    for side in ("A", "B"):
        med = {k: statistics.median(r[k] for r in results[side]) for k in results[side][0]}
        print(f"median {side} step {med['step_ms']:7.1f} ms  CPU {med['cpu_ms']:7.1f} ms/step  "
              f"faults {med['faults']:7.0f}/step  peak RSS {med['rss_mb']:6.0f} MB")


if __name__ == "__main__":
    main()
