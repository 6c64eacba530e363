"""Reward models: linear R = wᵀφ(x) over cached features, and deep scalar-head transformers.

    from rlhfkit.reward import load_reward_model
    rm = load_reward_model("runs/rm")                      # a run folder of `rlhfkit rm train`, or its model/
    rm.kind                                                # "linear" or "deep"
    rm.score(["\\n\\nHuman: Hi\\n\\nAssistant:"], [" Hello! How can I help?"])   # normalised scores, list[float]

Prompts are text or chat messages; a completion is the text that follows the prompt. `rm.raw_scores` gives the
scores before the stored normalisation ((raw − shift) / scale, see reward_model.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhfkit.errors import UserError
from rlhfkit.reward.features import (Extractor, FeatureCache, completion_text, featurize, make_extractor,
                                     prompt_text)
from rlhfkit.reward.linear import LinearRewardModel, fit_linear
from rlhfkit.reward.metrics import pairwise_metrics

META_FILE = "reward_model.json"


def resolve_model_dir(path: str | Path, key: str = "model.path") -> Path:
    """The folder holding reward_model.json: `path` itself or `path/model` (a training run folder). key: the
    config key that named it, for error messages."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key}: {p} not found")
    for candidate in (p, p / "model"):
        if (candidate / META_FILE).is_file():
            return candidate
    raise UserError(f"{key}: {p} is not a reward model folder (no {META_FILE}; train one with `rlhfkit rm "
                    "train`)")


def load_reward_model(path: str | Path, device: str | None = None, cache: bool = False,
                      key: str = "model.path") -> Any:
    """Load a linear or deep reward model from its folder. `.score(prompts, completions) -> list[float]`, `.kind`.

    device: cpu, cuda, ... (None = auto). cache: reuse/store features in the on-disk feature cache (linear).
    key: the config key that named the folder (reward.model, judge.model, ...), for error messages."""
    folder = resolve_model_dir(path, key)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{folder / META_FILE}: not valid JSON ({err})") from None
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "linear":
        from rlhfkit.models import pick_device

        return LinearRewardModel.load(folder, device=str(pick_device(device or "auto")), cache=cache)
    if kind == "deep":
        from rlhfkit.reward.deep import DeepRewardModel

        return DeepRewardModel.load(folder, device)
    raise UserError(f"{folder / META_FILE}: unknown reward model kind {kind!r} (expected linear or deep)")


__all__ = ["Extractor", "FeatureCache", "LinearRewardModel", "completion_text", "featurize", "fit_linear",
           "load_reward_model", "make_extractor", "pairwise_metrics", "prompt_text", "resolve_model_dir"]
