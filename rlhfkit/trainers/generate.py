"""Sample completions for every prompt of a prompts file.

    rlhfkit generate model.name=runs/sft/model data.prompts=prompts.jsonl num_samples=2 output=candidates.jsonl

Writes one JSON line per prompt: {"prompt": ..., "completions": [...]} (completions exclude the prompt; other
fields of the prompt record are kept). This is the candidate format `rlhfkit annotate import` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhfkit import models as M
from rlhfkit.config import GenConfig, ModelConfig
from rlhfkit.data import check_jsonl_output, load_prompts, write_jsonl
from rlhfkit.errors import UserError
from rlhfkit.rollout import sample
from rlhfkit.train_utils import progress, seed_everything


@dataclass
class GenerateDataConfig:
    prompts: str = ""
    """Prompts file: JSONL of {"prompt"} or {"messages"} (preference and SFT files work too)."""
    limit: int = 0
    """Use only the first N prompts (0: all)."""


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: GenerateDataConfig = field(default_factory=GenerateDataConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    num_samples: int = 1
    """Completions per prompt."""
    output: str = ""
    """Output JSONL file (.gz compresses)."""
    seed: int = 0
    """Sampling seed."""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        if not self.data.prompts:
            raise UserError("data.prompts: required (a JSONL file of {\"prompt\": ...} records)")
        if not self.output:
            raise UserError("output: required (the JSONL file to write)")
        check_jsonl_output(self.output, "output")
        if self.num_samples < 1:
            raise UserError(f"num_samples: must be >= 1, got {self.num_samples}")


def main(cfg: GenerateConfig, argv: list[str] | None = None) -> dict:
    seed_everything(cfg.seed)
    prompts = load_prompts(cfg.data.prompts)
    if cfg.data.limit:
        prompts = prompts[: cfg.data.limit]
    device = M.pick_device(cfg.device)
    tokenizer = M.tokenizer_for(cfg.model)
    model = M.load_causal_lm(cfg.model, device)
    ids = [M.encode_prompt(tokenizer, p.prompt) for p in prompts]
    flat = [x for x in ids for _ in range(cfg.num_samples)]
    bar = progress(len(flat), "generate", cfg.progress, unit="seq")
    samples = sample(model, tokenizer, flat, cfg.gen, seed=cfg.seed, progress=bar)
    bar.close()
    texts = [M.decode_completion(tokenizer, c, p) for c, p in zip(samples.completion_ids, samples.prompt_ids)]
    rows = []
    for i, p in enumerate(prompts):
        row = {"prompt": p.prompt, "completions": texts[i * cfg.num_samples: (i + 1) * cfg.num_samples]}
        row.update({k: v for k, v in p.extra.items() if k not in row})
        rows.append(row)
    n = write_jsonl(cfg.output, rows)
    print(f"generate: wrote {n} prompts x {cfg.num_samples} completions to {cfg.output}")
    return {"rows": n, "output": cfg.output}
