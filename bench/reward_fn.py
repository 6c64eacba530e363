"""The reward of the RL benchmarks (GRPO, RLOO, PPO): the share of words of a completion that are in a small list of
positive words. Cheap next to the model (the benchmark measures the trainers), and callable by both libraries:
rlhfkit `reward.function=bench/reward_fn.py:positive_words` and TRL `reward_funcs=[positive_words]`."""

import re

POSITIVE = frozenset("happy good great fun love nice kind smile smiled friend friends best play played laugh laughed "
                     "glad joy beautiful sunny sweet warm together helped thank".split())


def positive_words(prompts, completions, **kwargs) -> list[float]:
    out = []
    for text in completions:
        if not isinstance(text, str):  # TRL passes chat messages for conversational prompts
            text = " ".join(m.get("content", "") for m in text)
        words = re.findall(r"[a-z']+", text.lower())
        out.append(sum(w in POSITIVE for w in words) / max(1, len(words)))
    return out
