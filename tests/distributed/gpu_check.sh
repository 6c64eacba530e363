#!/usr/bin/env bash
# The GPU checks of docs/scaling.md as one short script for a machine with one CUDA GPU (about 5 minutes on an
# H100/H200 with the bundled stories260k model; nothing is downloaded). Not run by pytest.
#
#   bash tests/distributed/gpu_check.sh OUT_DIR
#
# Writes OUT_DIR/summary.json: per run the first/last loss, the first-minibatch PPO ratio, seconds per step, peak
# GPU memory; and the max weight difference of one-process FSDP2 / ZeRO-2 runs against the plain run (expected:
# bf16-level, since all three compute in bf16 autocast). Skips DeepSpeed / vLLM runs when they are not installed.
set -uo pipefail
OUT=${1:-/tmp/rlhfkit_gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
SFT="sft data.train=bundled:tinystories_train.jsonl.gz data.max_length=256 train.batch_size=64 train.micro_batch_size=16
     train.steps=30 data.eval_fraction=0 run.progress=false run.log_every=1"
PPO="ppo reward.function=tests/fixtures/positive_reward.py:positivity train.rollout_batch_size=256 gen.batch_size=256
     gen.max_new_tokens=64 train.num_minibatches=4 train.micro_batch_size=64 train.update_epochs=2 train.steps=5
     train.sample_every=0 reward.normalize_samples=64 run.progress=false"
BF16="python -m accelerate.commands.accelerate_cli launch --num_processes 1 --mixed_precision bf16"
run() { name=$1; shift; echo "== $name"; ( time "$@" ) > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log"; }

run sft_fp32 python -m rlhfkit $SFT run.output_dir="$OUT/sft_fp32"
run sft_bf16 $BF16 -m rlhfkit $SFT run.output_dir="$OUT/sft_bf16"
run sft_bf16_ckpt $BF16 -m rlhfkit $SFT model.gradient_checkpointing=true run.output_dir="$OUT/sft_bf16_ckpt"
run sft_fsdp python -m accelerate.commands.accelerate_cli launch --config_file configs/accelerate/fsdp.yaml \
    --num_processes 1 -m rlhfkit $SFT run.output_dir="$OUT/sft_fsdp"
if python -c "import deepspeed" 2>/dev/null; then
  run sft_zero2 python -m accelerate.commands.accelerate_cli launch --config_file configs/accelerate/zero2.yaml \
      --num_processes 1 -m rlhfkit $SFT run.output_dir="$OUT/sft_zero2"
fi
run ppo_fp32 python -m rlhfkit $PPO run.output_dir="$OUT/ppo_fp32"
run ppo_bf16 $BF16 -m rlhfkit $PPO run.output_dir="$OUT/ppo_bf16"
if python -c "import vllm" 2>/dev/null; then
  run ppo_vllm $BF16 -m rlhfkit $PPO gen.backend=vllm gen.vllm_gpu_memory_utilization=0.3 run.output_dir="$OUT/ppo_vllm"
fi

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); summary = {"gpu": (out / "gpu.txt").read_text().strip()}
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    log = (run.parent / f"{run.name}.log").read_text()
    row = {"rc": log.strip().splitlines()[-1], "steps": len(lines)}
    for key in ("loss/train", "loss/policy", "objective/score", "policy/ratio_first_min", "policy/ratio_first_max",
                "rollout/logprob_diff_max", "time/step_s", "time/tokens_per_s"):
        if lines and key in lines[0]:
            row[key] = [lines[0][key], lines[-1][key]]
    summary[run.name] = row
try:
    from safetensors.torch import load_file
    ref = load_file(str(out / "sft_bf16" / "model" / "model.safetensors"))
    for other in ("sft_fsdp", "sft_zero2"):
        path = out / other / "model" / "model.safetensors"
        if path.exists():
            b = load_file(str(path))
            summary[other]["max_weight_diff_vs_bf16"] = max(float((ref[k].float() - b[k].float()).abs().max()) for k in ref)
except Exception as err:  # noqa: BLE001 (a summary, not a test)
    summary["weight_diff_error"] = repr(err)
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
