"""rlhfkit.rewards.mt: sentence chrF / BLEU against the prompt record's reference, on hand-made inputs, and the
path a `reference` column takes from a prompts file to the reward function (rlhfkit.plugins / rlhfkit.scoring)."""

from __future__ import annotations

import math

import pytest

from rlhfkit.errors import UserError
from rlhfkit.plugins import call_scorer, load_function
from rlhfkit.rewards import mt


def test_chrf_exact_empty_and_partial():
    out = mt.chrf(["p"] * 3, [" le chat ", "", "le chien"], reference=["le chat"] * 3)
    assert out[0] == pytest.approx(100.0)  # surrounding whitespace is stripped
    assert out[1] == 0.0
    assert 0.0 < out[2] < 100.0


def test_chrf_hand_computed_unigram_case():
    # hypothesis "ab", reference "ac"; sacrebleu averages the per-order F_beta (beta = 2) over the orders where both
    # sides have n-grams. n=1: {a, b} vs {a, c}: 1 match, P = R = 1/2, F = (1 + 4) P R / (4 P + R) = (5/4) / (5/2)
    # = 1/2. n=2: "ab" vs "ac": no match, F = 0. n >= 3: no n-grams, not counted. chrF = 100 * (1/2 + 0) / 2 = 25.
    (score,) = mt.chrf(["p"], ["ab"], reference=["ac"])
    assert score == pytest.approx(25.0, abs=1e-6)


def test_bleu_exact_and_zero_overlap():
    exact, none = mt.bleu(["p", "p"], ["un homme court", "xyz"], reference=["un homme court", "un homme court"])
    assert exact == pytest.approx(100.0)
    assert none == 0.0


def test_bleu_uses_the_chinese_tokenizer_for_chinese_references():
    # With the default 13a tokenizer the unsegmented sentence is one "word": a one-character change scores 0.
    # With tokenize="zh" (chosen because the reference has CJK characters) each character is a token, so the
    # near-miss keeps partial credit.
    (score,) = mt.bleu(["p"], ["我们试试看。"], reference=["我们试试吧。"])
    assert 0.0 < score < 100.0


def test_several_references_take_the_best_match():
    one = mt.chrf(["p"], ["a cat"], reference=["a dog"])[0]
    two = mt.chrf(["p"], ["a cat"], references=[["a dog", "a cat"]])[0]
    assert two == pytest.approx(100.0) and one < two


def test_chrf_bleu_is_the_mean():
    c = mt.chrf(["p"], ["un chien noir"], reference=["un chien blanc"])[0]
    b = mt.bleu(["p"], ["un chien noir"], reference=["un chien blanc"])[0]
    assert mt.chrf_bleu(["p"], ["un chien noir"], reference=["un chien blanc"])[0] == pytest.approx((c + b) / 2)


def test_missing_reference_is_a_one_line_user_error():
    with pytest.raises(UserError, match=r"completion 1 has no reference"):
        mt.chrf(["p", "q"], ["a", "b"], reference=["a", None])
    with pytest.raises(UserError, match="needs a \"reference\""):
        mt.chrf(["p"], ["a"])


def test_reference_column_reaches_the_reward_through_call_scorer():
    """The trainers pass prompt-record columns by name; unrelated columns are not passed to a function without
    **kwargs (so chrf(prompts, completions, reference, references) accepts a file with more fields)."""
    fn = load_function("rlhfkit.rewards.mt:chrf")
    out = call_scorer(fn, ["p", "q"], ["le chat", "le chien"],
                      {"reference": ["le chat", "le chat"], "source_id": [1, 2]})
    assert out[0] == pytest.approx(100.0) and out[1] < 100.0 and all(math.isfinite(x) for x in out)


def test_ppo_scorer_passes_the_reference_column(jsonl):
    """rlhfkit.scoring (what PPO calls each update) with prompt records carrying "reference"."""
    from rlhfkit.data import load_prompts
    from rlhfkit.scoring import RewardConfig, load_scorer

    path = jsonl([{"prompt": "Translate to French: A cat.\nFrench:", "reference": "Un chat."},
                  {"prompt": "Translate to French: A dog.\nFrench:", "reference": "Un chien."}])
    records = load_prompts(str(path))
    columns = {k: [r.extra.get(k) for r in records] for k in records[0].extra}
    scorer = load_scorer(RewardConfig(function="rlhfkit.rewards.mt:chrf"))
    scores = scorer.score([r.prompt for r in records], [" Un chat.", " Un chat."], columns)
    assert scores[0] == pytest.approx(100.0) and scores[1] < 60.0


def test_chrf1_weighs_precision_like_recall():
    # a translation padded with extra words keeps full recall: chrF (beta 2) barely penalises it, chrF1 does
    ref, padded = ["le chat dort"], ["le chat dort sur le grand tapis rouge"]
    beta2 = mt.chrf(["p"], padded, reference=ref)[0]
    beta1 = mt.chrf1(["p"], padded, reference=ref)[0]
    assert beta1 < beta2 - 10
    assert mt.chrf1(["p"], ["le chat dort"], reference=ref)[0] == 100.0
