"""Transparent "human" preferences: score functions that play the people in simulated feedback loops.

    from rlhfkit.gold import sentiment
    sentiment(["Once upon a time,"], [" Tom was sad and cried."])      # [-0.6908]
    rlhfkit annotate simulate ... preference=rlhfkit.gold:sentiment
    rlhfkit eval ... judge.function=rlhfkit.gold:sentiment

Each function has the rlhfkit.plugins signature fn(prompts, completions) -> list[float], like reward functions.
The demo (`rlhfkit demo`) uses `sentiment` as the gold preference: a crowd of simulated annotators prefers happier,
kinder stories with Bradley-Terry noise, a reward model learns that from their labels, and the gold function
judges whether RL made the stories happier (the learned reward is only a proxy of it).

`sentiment` is VADER's compound score (Hutto & Gilbert, 2014, "VADER: A Parsimonious Rule-based Model for
Sentiment Analysis of Social Media Text", ICWSM) of the completion alone: the lexicon valences of its words,
adjusted for negation, intensifiers, "but" and punctuation, summed and squashed to [-1, 1] by
s / sqrt(s² + 15). The lexicon and rules come from the PyPI package vaderSentiment (MIT license, C.J. Hutto),
which ships its lexicon file, so it works offline.
"""

from __future__ import annotations

import functools
from typing import Any

from rlhfkit.errors import UserError


@functools.lru_cache(maxsize=1)
def _analyzer() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise UserError("rlhfkit.gold.sentiment needs the package vaderSentiment (pip install vaderSentiment)"
                        ) from None
    return SentimentIntensityAnalyzer()


def _text(completion: Any) -> str:
    """A completion as text: a string, or chat messages (their contents joined)."""
    if isinstance(completion, str):
        return completion
    return "\n".join(str(m.get("content", "")) for m in completion)


def sentiment(prompts: list[Any], completions: list[Any]) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (0 for text without sentiment words).
    The prompt is ignored: the annotator judges what the model wrote."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(_text(c))["compound"]) for c in completions]


def chrf(prompts: list[Any], completions: list[Any], reference: list[str]) -> list[float]:
    """Sentence-level chrF (sacrebleu, 0-100) of each completion against its prompt record's "reference" field:
    a reward or judge for translation (rlhfkit ppo reward.function=rlhfkit.gold:chrf)."""
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        raise UserError("rlhfkit.gold.chrf needs the package sacrebleu (pip install sacrebleu)") from None
    metric = CHRF()
    if any(not isinstance(r, str) for r in reference):
        raise UserError("rlhfkit.gold.chrf: every prompt record needs a \"reference\" string")
    return [float(metric.sentence_score(_text(c).strip(), [r]).score) for c, r in zip(completions, reference)]
