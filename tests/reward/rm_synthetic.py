"""Synthetic preference data for reward-model tests: the chosen reply contains a target word, the rejected not."""

from __future__ import annotations

import random

WORDS = ("the cat sat on a mat and the sun was warm . a girl ran to the park with her mom . they played all day "
         "and then went home to eat soup . the boy had a red ball and a big box").split()


def sentence(rng: random.Random, n: int, banned: str) -> list[str]:
    return [w for w in (rng.choice(WORDS) for _ in range(n)) if w != banned]


def word_pairs(n: int, seed: int = 0, word: str = "dog") -> list[dict]:
    """n pairs {"prompt","chosen","rejected"}: chosen = a random sentence with `word` inserted, rejected without.

    Both replies have the same number of words, so length cannot separate them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(6, 12)
        base_c, base_r = sentence(rng, k, word)[: k - 1], sentence(rng, k, word)[: k - 1]
        while len(base_r) < len(base_c) + 1:
            base_r.append(rng.choice([w for w in WORDS if w != word]))
        base_c.insert(rng.randint(0, len(base_c)), word)
        rows.append({"prompt": "Tell me a story: ", "chosen": " ".join(base_c), "rejected": " ".join(base_r)})
    return rows
