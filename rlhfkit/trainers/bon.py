"""Best-of-n rejection sampling: sample n completions per prompt, score them, keep the best as SFT data.

    rlhfkit bon model.name=stories260k reward.function=tests/fixtures/positive_reward.py:positivity \\
        num_samples=8 output=runs/bon/sft.jsonl pairs_output=runs/bon/pairs.jsonl
    rlhfkit sft data.train=runs/bon/sft.jsonl ...       # fine-tune on the winners (rejection-sampling fine-tuning)
    rlhfkit dpo data.train=runs/bon/pairs.jsonl ...     # or DPO on best-vs-worst pairs

The baseline every RL method should beat: its expected score is that of the best of n samples of the starting
policy, for the price of n samples per prompt and no training. Reward sources are PPO's (reward.function or
reward.model, with the missing-EOS penalty and clipping of reward.*; normalisation is refused: it cannot change the
ranking of one prompt's completions). Completions that are empty or whitespace are never picked (the SFT and
preference readers reject empty text). Ties: the earliest sampled wins.

Writes `output`: one {"prompt", "completion", "score"} per prompt (the SFT format `rlhfkit sft` reads), and with
`pairs_output`: {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} (best vs worst) for prompts
whose best score beats the worst by more than `min_score_gap` (the preference format `rlhfkit dpo`/`rm` read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhfkit import models as M
from rlhfkit import rl as R
from rlhfkit import scoring as S
from rlhfkit.config import GenConfig, ModelConfig
from rlhfkit.data import check_jsonl_output, load_prompts, write_jsonl
from rlhfkit.errors import UserError
from rlhfkit.rollout import sample
from rlhfkit.train_utils import progress, seed_everything


@dataclass
class BoNDataConfig:
    prompts: str = "bundled:tinystories_prompts.jsonl"
    """Prompts file: JSONL of {"prompt"} or {"messages"}; other fields reach reward functions as keyword arguments."""
    limit: int = 0
    """Use only the first N prompts (0: all)."""
    max_prompt_length: int = 128
    """Longer prompts keep their last max_prompt_length tokens."""


@dataclass
class BoNConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: BoNDataConfig = field(default_factory=BoNDataConfig)
    gen: GenConfig = field(default_factory=lambda: GenConfig(max_new_tokens=48, temperature=1.0, batch_size=64))
    reward: S.RewardConfig = field(default_factory=lambda: S.RewardConfig(normalize="none"))
    num_samples: int = 8
    """n: completions sampled per prompt."""
    output: str = ""
    """SFT JSONL (.gz compresses): the best completion of each prompt."""
    pairs_output: str = ""
    """Optional preference JSONL: best vs worst completion of each prompt."""
    min_score_gap: float = 0.0
    """A pair is written only when score(best) - score(worst) > this (equal scores never make a pair)."""
    seed: int = 0
    """Sampling seed."""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        if not self.output:
            raise UserError("output: required (the SFT JSONL file to write)")
        check_jsonl_output(self.output, "output")
        if self.pairs_output:
            check_jsonl_output(self.pairs_output, "pairs_output")
        if self.num_samples < 1:
            raise UserError(f"num_samples: must be >= 1, got {self.num_samples}")
        if self.pairs_output and self.num_samples < 2:
            raise UserError("pairs_output: needs num_samples >= 2")
        if self.reward.normalize != "none":
            raise UserError("reward.normalize: bon ranks the completions of one prompt, which normalisation does "
                            "not change; leave it at none")
        if self.min_score_gap < 0 or self.data.limit < 0 or self.threads < 0:
            raise UserError("min_score_gap, data.limit, threads: must be >= 0")


def pick(scores: list[float], texts: list[str]) -> tuple[int, int] | None:
    """(index of the best, index of the worst) among the non-empty texts; the earliest wins a tie, and the worst is
    chosen among texts that differ from the best's (-1 when there is none). None when every text is empty."""
    ok = [i for i, text in enumerate(texts) if text.strip()]
    if not ok:
        return None
    best = max(ok, key=lambda i: (scores[i], -i))
    others = [i for i in ok if texts[i] != texts[best]]
    worst = min(others, key=lambda i: (scores[i], i)) if others else -1
    return best, worst


def main(cfg: BoNConfig, argv: list[str] | None = None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    records = load_prompts(cfg.data.prompts)[: cfg.data.limit or None]
    device = M.pick_device(cfg.device)
    tokenizer = M.tokenizer_for(cfg.model)
    model = M.load_causal_lm(cfg.model, device).eval()
    scorer = S.load_scorer(cfg.reward, device)
    n = cfg.num_samples
    ids = R.encode_prompts(tokenizer, [r.prompt for r in records], cfg.data.max_prompt_length)
    bar = progress(len(records) * n, "bon", cfg.progress, unit="seq")
    samples = sample(model, tokenizer, [x for x in ids for _ in range(n)], cfg.gen, seed=cfg.seed, progress=bar)
    bar.close()
    texts = [M.decode_completion(tokenizer, c, p) for c, p in zip(samples.completion_ids, samples.prompt_ids)]
    rows = [i for i in range(len(records)) for _ in range(n)]
    columns = {k: [records[i].extra.get(k) for i in rows] for k in (records[0].extra if records else {})}
    raw = S.score_tensor(scorer, [records[i].prompt for i in rows], texts, columns)
    scores = S.shape_scores(raw, torch.tensor(samples.finished), cfg.reward, S.ScoreNormalizer("none")).tolist()

    sft, pairs, best_scores, worst_scores, skipped = [], [], [], [], 0
    for k, rec in enumerate(records):
        group_scores, group_texts = scores[k * n: (k + 1) * n], texts[k * n: (k + 1) * n]
        chosen = pick(group_scores, group_texts)
        if chosen is None:
            skipped += 1
            continue
        best, worst = chosen
        extra = {key: v for key, v in rec.extra.items() if key not in ("prompt", "completion", "score")}
        sft.append({"prompt": rec.prompt, "completion": group_texts[best], "score": group_scores[best], **extra})
        best_scores.append(group_scores[best])
        if worst >= 0:
            worst_scores.append(group_scores[worst])
            if group_scores[best] - group_scores[worst] > cfg.min_score_gap:
                pairs.append({"prompt": rec.prompt, "chosen": group_texts[best], "rejected": group_texts[worst],
                              "score_chosen": group_scores[best], "score_rejected": group_scores[worst]})
    if not sft:
        raise UserError(f"bon: every completion of every prompt was empty ({len(records)} prompts x {n})")
    write_jsonl(cfg.output, sft)
    if cfg.pairs_output:
        write_jsonl(cfg.pairs_output, pairs)
    result = {"prompts": len(records), "num_samples": n, "sft_rows": len(sft), "pairs": len(pairs),
              "skipped_empty": skipped, "mean_score": sum(scores) / len(scores),
              "mean_best_score": sum(best_scores) / len(best_scores),
              "mean_worst_score": sum(worst_scores) / max(1, len(worst_scores)), "output": cfg.output}
    print(f"bon: {len(records)} prompts x {n}: mean score {result['mean_score']:.4f}, best-of-{n} "
          f"{result['mean_best_score']:.4f}; wrote {len(sft)} rows to {cfg.output}"
          + (f" and {len(pairs)} pairs to {cfg.pairs_output}" if cfg.pairs_output else ""), flush=True)
    return result
