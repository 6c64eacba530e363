"""The command contract: `accelerate launch ... --num_processes 2 -m rlhfkit sft ...` runs on CPU (gloo), logs the
world size, writes once, and equals one process with the same global batch (tolerance: dist_helpers.TOL).

It uses the shipped configs/accelerate/ddp.yaml with --mixed_precision no (the file asks for bf16 for GPUs). On a
machine without GPUs, accelerate starts several processes only for a config like that file or with --multi_gpu;
`accelerate launch --num_processes 2` alone starts one there (rlhfkit prints a note saying so).
"""

from __future__ import annotations

import pytest
import torch
from dist_helpers import accelerate_launch, assert_same_metrics, assert_same_weights, command, rows

from rlhfkit import train_utils as U


def test_accelerate_launch_sft_on_two_processes_equals_one(reference, tmp_path):
    out = tmp_path / "sft"
    proc = accelerate_launch("--config_file", "configs/accelerate/ddp.yaml", "--mixed_precision", "no",
                             "--num_processes", "2", "-m", "rlhfkit", *command("sft", out, "run.save_every=2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    started = [ln for ln in proc.stdout.splitlines() if ln.startswith("sft: ") and "world size" in ln]
    assert len(started) == 1 and "world size 2 (engine ddp, backend gloo, rank 0" in started[0], proc.stdout
    assert [r["dist/world_size"] for r in rows(out)] == [2.0, 2.0, 2.0]
    one = reference("sft")
    assert_same_metrics(one, out)  # losses, grad norms, eval loss; one line per step: rank 0 wrote alone
    assert_same_weights(one, out, "sft")
    assert [s for s, _ in U.list_checkpoints(out)] == [2]  # checkpoint written once (run.save_every=2)
    assert (out / "config.yaml").is_file() and (out / "command.txt").read_text().startswith("rlhfkit sft ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the note is for machines without GPUs")
def test_one_process_started_by_accelerate_on_a_cpu_machine_gets_a_note(monkeypatch, capsys):
    """`accelerate launch --num_processes 2` without --multi_gpu or a multi-process config starts ONE process on a
    machine without GPUs (accelerate's rule); its environment marks it, and rlhfkit says how to get two."""
    from rlhfkit import distributed as D
    from rlhfkit.config import RunConfig

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # set by every accelerate launch
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = D.init_world(RunConfig(device="cpu"))
    assert world.size == 1 and world.accelerator is None
    assert "add --multi_gpu" in capsys.readouterr().err
