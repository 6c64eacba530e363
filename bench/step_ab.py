"""rlhfkit's side of a suite task, with and without an environment setting, in alternating fresh processes.

    nice -n 10 bench/.venv/bin/python bench/step_ab.py --task grpo --model gpt2 --steps 60 --pairs 4 \
        --env RLHFKIT_MALLOC=default

Each pair runs the task's real trainer (bench/run_rlhfkit.py, the suite's workload) once as is (A) and once with
--env set (B), each in a fresh process, and prints per run the median step time over the last 3/4 of the steps,
CPU time per step, minor page faults per step and peak RSS, then the medians over the pairs. Used to measure
process-level settings such as `train_utils.keep_freed_memory` (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(task: str, model: str, steps: int, work: str) -> None:
    sys.path.insert(0, str(HERE))
    import run_rlhfkit
    import workload

    w = workload.build(model, Path(work))
    marks = []

    def stamp() -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        marks.append((time.perf_counter(), r.ru_utime + r.ru_stime, r.ru_minflt))

    with tempfile.TemporaryDirectory() as out:
        run_rlhfkit.run(task, w, Path(out) / "run", steps, 2, stamp, 4)
    first = len(marks) // 4
    walls = [b[0] - a[0] for a, b in zip(marks[first:], marks[first + 1:])]
    n = len(marks) - 1 - first
    print(json.dumps({"step_ms": statistics.median(walls) * 1e3,
                      "cpu_ms": (marks[-1][1] - marks[first][1]) / n * 1e3,
                      "faults": (marks[-1][2] - marks[first][2]) / n,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="grpo", help="a suite task that runs a trainer: grpo, rloo, dpo, rm, ppo")
    ap.add_argument("--model", default="gpt2", help="gpt2 or stories260k")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--env", required=True, help="NAME=VALUE set for the B runs")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rlhfkit_bench"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.task, args.model, args.steps, args.work)
    name, _, value = args.env.partition("=")
    print(f"{args.task} {args.model}, {args.steps} steps per run; A: as is, B: {args.env}", flush=True)
    results: dict[str, list[dict]] = {"A": [], "B": []}
    for pair in range(args.pairs):
        for side in ("A", "B"):
            env = {k: v for k, v in os.environ.items() if k != name}
            if side == "B":
                env[name] = value
            cmd = [sys.executable, __file__, "--worker", "--task", args.task, "--model", args.model,
                   "--steps", str(args.steps), "--work", args.work, "--env", args.env]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"worker failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[side].append(r)
            print(f"pair {pair + 1} {side} step {r['step_ms']:7.1f} ms  CPU {r['cpu_ms']:7.1f} ms/step  "
                  f"faults {r['faults']:7.0f}/step  peak RSS {r['rss_mb']:6.0f} MB", flush=True)
    for side in ("A", "B"):
        med = {k: statistics.median(r[k] for r in results[side]) for k in results[side][0]}
        print(f"median {side} step {med['step_ms']:7.1f} ms  CPU {med['cpu_ms']:7.1f} ms/step  "
              f"faults {med['faults']:7.0f}/step  peak RSS {med['rss_mb']:6.0f} MB")


if __name__ == "__main__":
    main()
