"""The main job on bundled defaults: the whole RLHF loop on the bundled stories260K model, offline, on a CPU.

    rlhfkit demo                                   # writes runs/demo/report.html and runs/demo/summary.json
    rlhfkit demo run.output_dir=DIR --open         # also print the report's path and file:// URL at the end
    rlhfkit demo method=dpo                        # DPO on the labelled pairs instead of PPO (grpo, rloo: when present)
    rlhfkit demo --human                           # people label in the web app (URL and login printed) before training

1. generate: the policy writes 4 continuations of each of 512 bundled TinyStories openings;
2. annotate: a crowd of 5 simulated annotators labels every pair of them through the feedback app's HTTP API
   (SQLite database in DIR/feedback.db). Their hidden "human" preference is the gold function
   rlhfkit.gold:sentiment (happier, kinder stories: VADER sentiment of the continuation) plus Bradley-Terry noise;
3. rm: a linear reward model on MiniLM sentence embeddings learns the preference from the labels;
4. ppo: the policy is tuned against the reward model with a KL penalty to the original model;
5. eval: tuned vs original on 200 held-out openings, judged by the gold function (which the RL never saw);
6. report: DIR/report.html (one self-contained file) and DIR/summary.json.
It is `rlhfkit pipeline` with its default config (docs/pipeline.md): every key of the pipeline works here, and a
re-run skips the finished stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.config import RunConfig
from rlhfkit.errors import UserError
from rlhfkit.trainers.pipeline import PipelineConfig, format_summary, run_pipeline


@dataclass
class DemoConfig(PipelineConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/demo", threads=1))
    """run.threads=1: on a busy 2-core machine two torch threads made small models 5-12x slower (docs/demo.md)."""
    method: str = ""
    """Shortcut for rl.method: ppo, grpo, rloo or dpo (empty keeps rl.method)."""
    human: bool = False
    """Shortcut for annotate.source=human with a human-sized task: 32 prompts x 2 continuations, one label each,
    asking which is happier and kinder. The web app's URL and a login are printed; training starts when every pair
    is labelled; the gold function (annotate.preference) still judges the result."""
    open: bool = False
    """Print the report's path and file:// URL at the end (the report is one self-contained HTML file)."""
    flags = ("open", "human")  # `--open` / `--human` on the command line mean open=true / human=true
    config_positional = False

    def validate(self) -> None:
        if self.method and self.method not in ("ppo", "grpo", "rloo", "dpo"):
            raise UserError(f"method: expected ppo, grpo, rloo or dpo, got {self.method!r}")
        super().validate()


HUMAN_TASK = {"generate.prompts_per_round": 32, "generate.num_samples": 2, "annotate.k": 1,
              "annotate.instructions": "Which continuation of the story is happier and kinder?"}
"""What human=true changes: a task a person finishes in a few minutes, with the demo's criterion spelt out (the
gold function still judges the result: eval.judge defaults to annotate.preference)."""

DPO_ARGS = {"train.steps": 120, "train.batch_size": 16, "train.micro_batch_size": 16, "train.beta": 0.1,
            "optim.lr": 1e-4, "train.precompute_ref_logprobs": True}
"""rl.args for method=dpo when rl.args is still the PPO default."""


def apply_shortcuts(cfg: DemoConfig) -> DemoConfig:
    """Turn method/human into the pipeline keys they stand for (documented on the fields), validated again."""
    from rlhfkit.config import set_key, validate_tree

    if cfg.method:
        if cfg.method == "dpo" and cfg.rl.args == PipelineConfig().rl.args:
            cfg.rl.args = dict(DPO_ARGS)
        cfg.rl.method = cfg.method
    if cfg.human:
        cfg.annotate.source = "human"
        for key, value in HUMAN_TASK.items():
            set_key(cfg, key, value, from_cli=False)
        cfg.eval.judge = cfg.eval.judge or cfg.annotate.preference
    validate_tree(cfg)
    return cfg


def main(cfg: DemoConfig, argv: list[str] | None = None) -> dict:
    cfg = apply_shortcuts(cfg)
    out = Path(cfg.run.output_dir)
    print(f"demo: the RLHF loop on {cfg.model.name} -> {out} (progress per stage below; a re-run skips finished "
          "stages)", flush=True)
    summary = run_pipeline(cfg, argv)
    print(format_summary(summary, out, cfg.report))
    if cfg.open and cfg.report:
        report = (out / "report.html").resolve()
        print(f"report: {report}\n        {report.as_uri()}")
    return summary
