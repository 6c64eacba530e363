"""The main job on bundled defaults: fine-tune the bundled stories260K model on bundled TinyStories text, then
generate from held-out story openings, before and after.

    rlhfkit demo                      # about a minute on 2 CPU cores
    rlhfkit demo run.output_dir=runs/demo sft_steps=100
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from rlhfkit.config import GenConfig, RunConfig, load_config
from rlhfkit.trainers import generate as G
from rlhfkit.trainers import sft as S


@dataclass
class DemoConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/demo"))
    sft_steps: int = 60
    """SFT optimizer steps on bundled TinyStories text."""
    prompts: int = 4
    """Held-out story openings to complete before and after SFT."""
    gen: GenConfig = field(default_factory=lambda: GenConfig(max_new_tokens=80, temperature=0.7, top_k=40))
    """Sampling settings for the before/after samples."""


def main(cfg: DemoConfig, argv: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    out = cfg.run.output_dir
    sft_cfg = load_config(S.SFTConfig, None, {
        "run.output_dir": f"{out}/sft", "run.seed": cfg.run.seed, "run.progress": cfg.run.progress,
        "data.train": "bundled:tinystories_train.jsonl.gz", "data.eval": "bundled:tinystories_eval.jsonl.gz",
        "data.max_length": 128, "train.steps": cfg.sft_steps, "optim.lr": 3e-4})
    result = S.main(sft_cfg, argv)
    samples = {}
    for name, model in (("before", "stories260k"), ("after", f"{out}/sft/model")):
        gen_cfg = load_config(G.GenerateConfig, None, {
            "model.name": model, "data.prompts": "bundled:tinystories_eval_prompts.jsonl",
            "data.limit": cfg.prompts, "output": f"{out}/samples_{name}.jsonl", "seed": cfg.run.seed,
            "progress": cfg.run.progress})
        gen_cfg.gen = cfg.gen
        G.main(gen_cfg)
        samples[name] = [json.loads(line) for line in open(f"{out}/samples_{name}.jsonl", encoding="utf-8")]
    print("\n== samples (held-out openings; before -> after SFT) ==")
    for before, after in zip(samples["before"], samples["after"]):
        print(f"\n[prompt] {before['prompt']}\n[before] {before['completions'][0]}\n[after]  {after['completions'][0]}")
    summary = {"sft_eval_loss": result.get("loss/eval"), "sft_tokens_per_s": result.get("time/tokens_per_s"),
               "seconds": time.perf_counter() - t0}
    print(f"\ndemo: done in {summary['seconds']:.0f}s; outputs in {out}")
    return summary
