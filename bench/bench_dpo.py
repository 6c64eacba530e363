"""DPO training speed, rlhfkit vs TRL's DPOTrainer, on the workload of issue 9 (pairs/s, same run, A B A B ...).

    pip install trl==1.16.0                      # the bench extra; or --no-deps into a folder on PYTHONPATH
    nice -n 10 python bench/bench_dpo.py --rounds 3 --steps 25 --threads 2
    nice -n 10 python bench/bench_dpo.py --threads 1 --cpu-time   # process CPU time: steadier on a shared machine

Workload: a 4-layer GPT-2 (n_embd 256, 4 heads, random init, dropout off) with a byte-level BPE of 4,096 tokens
trained on the bundled TinyStories; 511 pairs whose prompt is 16-32 tokens of a story, chosen its next 32 tokens,
rejected 32 tokens of another story; fp32, 8 pairs per step, β = 0.05, a frozen reference model, no precompute,
no gradient checkpointing, TRL with use_cpu=True and bf16=False. Each run trains --steps steps; the figure is the
median time between optimizer steps after 5 warm-up steps (wall time, or process CPU time with --cpu-time).
"""

import argparse
import gzip
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(work: Path) -> tuple[Path, Path]:
    """The model folder and the pairs file (cached in `work`)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    model_dir, data = work / "gpt2", work / "pairs.jsonl"
    stories = [json.loads(line)["text"] for line in
               gzip.open(ROOT / "rlhfkit/assets/data/tinystories_train.jsonl.gz", "rt", encoding="utf-8")]
    if not (model_dir / "config.json").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(stories, vocab_size=4096, min_frequency=2, special_tokens=["<|endoftext|>"],
                                show_progress=False)
        bpe.save(str(model_dir / "tokenizer.json"))
        tok = GPT2TokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), unk_token="<|endoftext|>",
                                bos_token="<|endoftext|>", eos_token="<|endoftext|>")
        tok.save_pretrained(model_dir)
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=256, n_layer=4, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    if not data.exists():
        tok = GPT2TokenizerFast.from_pretrained(model_dir)
        rng = random.Random(0)
        ids = [x for x in (tok(s)["input_ids"] for s in stories) if len(x) >= 70]
        rows = []
        for i, x in enumerate(ids):
            k, other = rng.randint(16, 32), ids[(i + 7) % len(ids)]
            rows.append({"prompt": tok.decode(x[:k]), "chosen": tok.decode(x[k:k + 32]),
                         "rejected": tok.decode(other[k:k + 32])})
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def clock(cpu: bool) -> float:
    return time.process_time() if cpu else time.perf_counter()


def run_rlhfkit(model_dir: Path, data: Path, work: Path, steps: int, threads: int, cpu: bool) -> list[float]:
    from rlhfkit.config import load_config
    from rlhfkit.trainers import dpo

    stamps, step = [], dpo.U.clip_and_step

    def timed(*args, **kwargs):
        out = step(*args, **kwargs)
        stamps.append(clock(cpu))
        return out

    dpo.U.clip_and_step = timed
    try:
        cfg = load_config(dpo.DPOConfig, None, [
            f"model.name={model_dir}", "model.dtype=float32", f"data.train={data}", "data.eval_fraction=0",
            f"run.output_dir={work / 'out_rlhfkit'}", f"train.steps={steps}", "train.batch_size=8",
            "train.micro_batch_size=8", "train.beta=0.05", "run.progress=false", f"run.threads={threads}",
            "run.log_every=1000", "optim.warmup_steps=0"])
        dpo.main(cfg, [])
    finally:
        dpo.U.clip_and_step = step
    return stamps


def run_trl(model_dir: Path, data: Path, work: Path, steps: int, threads: int, cpu: bool) -> list[float]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(clock(cpu))

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(work / "out_trl"), per_device_train_batch_size=8, max_steps=steps,
                     learning_rate=5e-5, beta=0.05, use_cpu=True, bf16=False, gradient_checkpointing=False,
                     report_to="none", logging_steps=1000, save_strategy="no", disable_dropout=True,
                     dataloader_num_workers=0, seed=0, lr_scheduler_type="cosine", max_grad_norm=1.0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(data),
                                                                              split="train"),
                         processing_class=tok, callbacks=[Stamp()])
    trainer.train()
    return stamps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall time")
    ap.add_argument("--only", choices=["rlhfkit", "trl"], default=None)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rlhfkit_bench_dpo"))
    a = ap.parse_args()
    work = Path(a.work)
    model_dir, data = build(work)
    speeds: dict[str, list[float]] = {"rlhfkit": [], "trl": []}
    for r in range(a.rounds):
        for name, fn in (("rlhfkit", run_rlhfkit), ("trl", run_trl)):
            if a.only and name != a.only:
                continue
            stamps = fn(model_dir, data, work, a.steps, a.threads, a.cpu_time)[5:]  # after 5 warm-up steps
            step = statistics.median(b - s for s, b in zip(stamps, stamps[1:]))
            speeds[name].append(8 / step)
            print(f"round {r} {name}: {8 / step:.1f} pairs/s (median step {step * 1000:.0f} ms)", flush=True)
    for name, values in speeds.items():
        if values:
            print(f"{name}: median {statistics.median(values):.1f} pairs/s over {len(values)} runs")
    if speeds["rlhfkit"] and speeds["trl"]:
        print(f"ratio rlhfkit / trl: {statistics.median(speeds['rlhfkit']) / statistics.median(speeds['trl']):.2f}")


if __name__ == "__main__":
    main()
