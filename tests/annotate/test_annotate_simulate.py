"""Simulated annotators: Bradley-Terry noise, biases, agreement with the noise-free labels, and the one-call
Python API the demo uses (LocalServer + simulate + export)."""

from __future__ import annotations

import math
import random

import pytest

from rlhfkit.annotate.api import collect_preferences
from rlhfkit.annotate.simulate import CrowdSpec, noise_free_choice, noisy_choice, rating_value
from rlhfkit.data import load_preferences


def test_bradley_terry_choice_frequency():
    rng = random.Random(0)
    spec = CrowdSpec(temperature=1.0)
    n = 20_000
    wins = sum(noisy_choice(rng, 1.0, 0.0, spec)[0] == "A" for _ in range(n))
    # P(A) = sigmoid((1 - 0) / 1) = 0.7311; binomial sd = sqrt(.73 * .27 / 20000) = 0.0031
    assert wins / n == pytest.approx(1 / (1 + math.exp(-1)), abs=0.012)
    hot = CrowdSpec(temperature=4.0)  # sigmoid(1/4) = 0.5622
    wins = sum(noisy_choice(rng, 1.0, 0.0, hot)[0] == "A" for _ in range(n))
    assert wins / n == pytest.approx(0.5622, abs=0.012)
    cold = CrowdSpec(temperature=0.0)
    assert {noisy_choice(rng, 0.1, 0.0, cold) for _ in range(100)} == {("A", 1)}
    assert noisy_choice(rng, 3.0, 0.0, cold) == ("A", 3)  # strength 1 + [d > 1] + [d > 2]
    assert noisy_choice(rng, 0.2, 0.0, CrowdSpec(temperature=0.0, tie_margin=0.5)) == ("tie", None)
    assert noise_free_choice(0.0, 1.0) == "B" and noise_free_choice(1.0, 1.0) == "tie"
    assert rating_value(0.0, 1, 7, 1.0) == 4 and rating_value(100.0, 1, 7, 1.0) == 7


def score_by_number(prompts, completions):
    """Utility = the number written in the completion ("answer 7" -> 7)."""
    return [float(c.split()[-1]) for c in completions]


CANDS = [{"prompt": f"question {i}", "completions": [f"answer {i % 5}", f"a much longer answer {(i + 2) % 7}"]}
         for i in range(24)]


def test_noise_free_crowd_labels_exactly(tmp_path):
    out = collect_preferences(CANDS, tmp_path / "prefs.jsonl", score_by_number, crowd=3, k=3, temperature=0.0)
    sim = out["simulation"]
    assert sim["labels"] == 24 * 3
    assert sim["agreement_with_noise_free"] == 1.0 and sim["majority_agreement_with_noise_free"] == 1.0
    equal = sum(i % 5 == (i + 2) % 7 for i in range(24))  # equal numbers: unanimous ties, not exported
    assert out["rows"] == 24 - equal and out["skipped"] == {"majority_tie": equal}
    for pair in load_preferences(tmp_path / "prefs.jsonl").pairs:
        assert float(pair.chosen.split()[-1]) > float(pair.rejected.split()[-1])
        assert pair.extra["agreement"] == 1.0
    # the next round of the loop on the same database: only the new candidates are imported and labelled
    more = [{"prompt": "new question", "completions": ["answer 1", "answer 9"]}]
    again = collect_preferences(CANDS + more, tmp_path / "prefs2.jsonl", score_by_number, db=out["db"], crowd=3, k=3,
                                temperature=0.0)
    assert again["import"]["added"] == 1 and again["simulation"]["labels"] == 3
    assert again["rows"] == out["rows"] + 1


def test_noise_and_bias_move_the_labels(tmp_path):
    noisy = collect_preferences(CANDS, tmp_path / "noisy.jsonl", score_by_number, crowd=5, k=5, temperature=3.0,
                                seed=1)["simulation"]
    assert 0.4 < noisy["agreement_with_noise_free"] < 0.9
    assert noisy["majority_agreement_with_noise_free"] >= noisy["agreement_with_noise_free"] - 0.1
    # a crowd that loves long answers (+10 utility per word) picks the long completion whatever its number
    biased = collect_preferences(CANDS, tmp_path / "long.jsonl", score_by_number, crowd=3, k=3, temperature=0.0,
                                 length_bias=10.0)
    pairs = load_preferences(tmp_path / "long.jsonl").pairs
    assert all(p.chosen.startswith("a much longer") for p in pairs)
    assert biased["simulation"]["agreement_with_noise_free"] < 0.8


def test_crowd_over_http_on_postgresql(tmp_path):
    """The whole loop on the PostgreSQL server that .ci/services.sh starts (skipped with the reason if absent)."""
    from annotate_helpers import PG_URL, pg_reason, reset_pg

    reason = pg_reason()
    if reason:
        pytest.skip(reason)
    reset_pg()
    out = collect_preferences(CANDS, tmp_path / "pg.jsonl", score_by_number, db=PG_URL, crowd=4, k=3,
                              temperature=0.0)
    assert out["simulation"]["labels"] == 24 * 3 and out["simulation"]["agreement_with_noise_free"] == 1.0
    assert len(load_preferences(tmp_path / "pg.jsonl").pairs) == out["rows"] > 0
