"""Reward sources for RL trainers, and the shaping of their scores (normalisation, missing-EOS penalty, clipping).

    reward.function=rewards.py:positivity      # fn(prompts, completions) -> list[float], via rlhfkit.plugins
    reward.model=runs/rm                       # a trained reward model, via rlhfkit.reward.load_reward_model

    scorer = load_scorer(cfg.reward, device)             # .score(prompts, completions, columns) -> list[float]
    raw = score_tensor(scorer, prompts, completions)     # (B,) float32, checked: one finite number per completion
    shaped = shape_scores(raw, has_eos, cfg.reward, normalizer)

`score` is the scalar per sequence (STYLE.md §3). Prompts are passed as they appear in the prompts file (a string,
or a list of chat messages); completions are the decoded text after the prompt, cut at EOS. Extra fields of the
prompt records (e.g. a `reference`) reach reward functions that name them as keyword arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from rlhfkit.errors import UserError
from rlhfkit.plugins import call_scorer, load_function


@dataclass
class RewardConfig:
    function: str = ""
    """Python reward: PATH.py:FUNCTION or MODULE:FUNCTION, called as fn(prompts, completions) -> list[float]."""
    model: str = ""
    """Reward model folder (from `rlhfkit rm train`) instead of reward.function."""
    normalize: Literal["none", "initial", "running"] = "initial"
    """Score normalisation: initial = shift and scale so scores of the initial (reference) policy's samples have
    mean 0 and std 1 (lm-human-preferences); running = by the running mean/std of all scores so far; none."""
    normalize_samples: int = 64
    """Completions sampled from the initial policy to fit the `initial` normalisation."""
    missing_eos_penalty: float = 0.0
    """Penalty for completions that reach gen.max_new_tokens without EOS, applied after normalisation; 0 disables."""
    missing_eos_mode: Literal["subtract", "replace"] = "subtract"
    """subtract: score - penalty (TRL); replace: the score becomes -penalty (OpenAI's fixed penalty_reward_value)."""
    clip: float = 0.0
    """Clip the (normalised, penalised) score to [-clip, clip]; 0 disables."""

    def validate(self) -> None:
        if bool(self.function) == bool(self.model):
            raise UserError("reward: give exactly one of reward.function=PATH.py:FN (or MODULE:FN) and "
                            "reward.model=DIR")
        if self.normalize_samples < 2:
            raise UserError(f"reward.normalize_samples: must be >= 2, got {self.normalize_samples}")
        if self.missing_eos_penalty < 0 or self.clip < 0:
            raise UserError("reward.missing_eos_penalty and reward.clip: must be >= 0")


class Scorer(Protocol):
    def score(self, prompts: list[Any], completions: list[str], columns: dict[str, list] | None = None
              ) -> list[float]: ...


class FunctionScorer:
    """A user function fn(prompts, completions, **columns) -> list[float] (see rlhfkit.plugins)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_function(spec, "reward.function")

    def score(self, prompts: list[Any], completions: list[str], columns: dict[str, list] | None = None
              ) -> list[float]:
        try:
            return call_scorer(self.fn, prompts, completions, columns, what=f"reward.function {self.spec}")
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 (the user's code failed: name it, one line, no traceback)
            raise UserError(f"reward.function {self.spec}: raised {type(err).__name__}: {err}") from None


class ModelScorer:
    """A trained reward model: anything with .score(prompts, completions) -> list[float]."""

    def __init__(self, model: Any, name: str = "reward.model"):
        self.model, self.name = model, name

    def score(self, prompts: list[Any], completions: list[str], columns: dict[str, list] | None = None
              ) -> list[float]:
        return check_scores(self.model.score(prompts, completions), len(completions), self.name)


def load_scorer(cfg: RewardConfig, device: torch.device | str | None = None) -> Scorer:
    """FunctionScorer for reward.function, ModelScorer for reward.model (rlhfkit.reward imported lazily)."""
    if cfg.function:
        return FunctionScorer(cfg.function)
    try:
        from rlhfkit.reward import load_reward_model
    except ImportError as err:
        raise UserError(f"reward.model: the reward-model package is unavailable ({err})") from None
    return ModelScorer(load_reward_model(cfg.model, None if device is None else str(device), key="reward.model"),
                       f"reward.model {cfg.model}")


def check_scores(values: Any, n: int, what: str) -> list[float]:
    """values as a list of n finite floats, or a one-line UserError naming `what`."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"{what}: must return a list of numbers, got {type(values).__name__}") from None
    if len(out) != n:
        raise UserError(f"{what}: returned {len(out)} scores for {n} completions")
    bad = [i for i, v in enumerate(out) if not math.isfinite(v)]
    if bad:
        raise UserError(f"{what}: returned a non-finite score ({out[bad[0]]}) for completion {bad[0]}")
    return out


def score_tensor(scorer: Scorer, prompts: list[Any], completions: list[str],
                 columns: dict[str, list] | None = None) -> torch.Tensor:
    """Raw scores (B,) float32 on the CPU."""
    return torch.tensor(scorer.score(prompts, completions, columns), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Shaping


class ScoreNormalizer:
    """Shift and scale scores: (s - mean) / std, with the statistics fixed once (`initial`), tracked over every
    score seen so far (`running`, updated with the batch before it is normalised), or off (`none`).
    std is the population std (divide by n, as tf.nn.moments in lm-human-preferences), floored at 1e-8.
    Checkpoint `state_dict()` to resume exactly."""

    def __init__(self, mode: str = "none"):
        if mode not in ("none", "initial", "running"):
            raise ValueError(f"unknown normalisation {mode!r}")
        self.mode = mode
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # Chan et al. parallel variance (exact merge of batches)

    @property
    def fitted(self) -> bool:
        return self.mode == "none" or self.count > 0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0

    def update(self, scores: torch.Tensor) -> None:
        x = scores.double()
        n, mean = x.numel(), float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def fit(self, scores: torch.Tensor) -> None:
        """`initial`: fix the statistics to these scores (from the initial policy)."""
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.update(scores)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return scores
        if self.mode == "running":
            self.update(scores)
        if not self.count:
            raise RuntimeError("ScoreNormalizer(initial) used before fit()")
        return ((scores.double() - self.mean) / max(self.std, 1e-8)).to(scores.dtype)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.mode, self.count, self.mean, self.m2 = state["mode"], state["count"], state["mean"], state["m2"]


def shape_scores(raw: torch.Tensor, has_eos: torch.Tensor, cfg: RewardConfig,
                 normalizer: ScoreNormalizer) -> torch.Tensor:
    """Scores that enter the reward: normalise, then the missing-EOS penalty, then clip. (B,) -> (B,)."""
    from rlhfkit.core import missing_eos_penalty

    scores = normalizer(raw)
    if cfg.missing_eos_penalty > 0:
        penalty = cfg.missing_eos_penalty if cfg.missing_eos_mode == "subtract" else -cfg.missing_eos_penalty
        scores = missing_eos_penalty(scores, has_eos.to(scores.device), penalty, cfg.missing_eos_mode)
    if cfg.clip > 0:
        scores = scores.clamp(-cfg.clip, cfg.clip)
    return scores
