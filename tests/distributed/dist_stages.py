"""Run several rlhfkit commands and the rlhfkit.distributed helper checks in ONE process group, so the tests pay the
process start-up and imports once:

    torchrun --standalone --nproc_per_node 2 tests/distributed/dist_stages.py SPEC.json RESULTS.json

SPEC.json: {"commands": {name: argv after `rlhfkit`}, "checks": run the helper checks, "checks_dir": folder for
tensors they save}. Each
command is `rlhfkit.cli.run_command(argv)`, exactly what `python -m rlhfkit ARGV` runs; every stage's
init_world reuses the process group. Rank 0 writes {"commands": {name: scalar results}, "checks": {...}}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rlhfkit import cli
from rlhfkit import distributed as D
from rlhfkit.config import GenConfig, ModelConfig, RunConfig


def check_whiten(world: D.World) -> dict:
    """distributed.masked_whiten on row shards == core.masked_whiten on the whole batch (both variance modes)."""
    from rlhfkit.core import masked_whiten

    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    rows = slice(3 * world.rank, 3 * world.rank + 3)
    out = {}
    for shift in (True, False):
        for unbiased in (True, False):
            local = D.masked_whiten(values[rows], mask[rows], world, shift_mean=shift, unbiased=unbiased)
            full = masked_whiten(values, mask, shift_mean=shift, unbiased=unbiased)[rows]
            diff = world.all_reduce((local - full).abs().max(), "max")
            out[f"shift={shift},unbiased={unbiased}"] = float(diff)
    out["global_count"] = D.global_count(mask[rows], world)
    out["expected_count"] = int(mask.sum())
    return out


def check_gather(world: D.World) -> dict:
    """Uneven shards (rank r holds r + 2 rows) come back stacked in rank order on every rank."""
    local = torch.arange(world.rank + 2, dtype=torch.float32).unsqueeze(1) + 10 * world.rank  # (r + 2, 1)
    gathered = world.gather(local).squeeze(1).tolist()
    agree = world.gather_objects(gathered)
    return {"gathered": gathered, "same_on_all_ranks": all(a == gathered for a in agree)}


def check_rollout(world: D.World, folder: Path) -> dict:
    """generate_rollout shards (gen.batch_size = 2 divides the 4 rows of each rank), stacked by gather_rollout:
    rank 0 saves the global batch for the test to compare with a single-process rollout."""
    from rlhfkit import models as M
    from rlhfkit import rl as R

    tok = M.load_tokenizer("stories260k")
    policy = M.load_causal_lm(ModelConfig(), world.device).eval()
    prompts = ["Once upon a time", "Lily had a", "The dog", "One day, Tom", "The sun was", "Mom said", "A little",
               "They went to"]
    ids = R.encode_prompts(tok, prompts, 32)
    gen = GenConfig(max_new_tokens=8, batch_size=2)
    batch = D.generate_rollout(world, policy, tok, prompts, ids, gen, seed=5, columns={"k": list(range(8))})
    local_rows = len(batch)
    batch, (lp,) = D.gather_rollout(world, batch, R.forward_logprobs(policy, batch, 1.0)[0])
    if world.is_main:
        torch.save({"batch": batch, "logprobs": lp}, folder / "rollout.pt")
    return {"local_rows": local_rows, "global_rows": len(batch), "columns": batch.columns["k"]}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    results: dict = {"commands": {}}
    for name, argv in spec["commands"].items():
        out = cli.run_command(argv)
        results["commands"][name] = {k: v for k, v in out.items() if isinstance(v, (int, float, str))}
    world = D.init_world(RunConfig(device="cpu"))
    results["checks"] = {"world_size": world.size}
    if spec["checks"]:
        results["checks"].update(whiten=check_whiten(world), gather=check_gather(world),
                                 rollout=check_rollout(world, Path(spec["checks_dir"])))
    if world.is_main:
        Path(sys.argv[2]).write_text(json.dumps(results))
    world.barrier()


if __name__ == "__main__":
    main()
