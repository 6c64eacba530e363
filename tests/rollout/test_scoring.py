"""rlhfkit.scoring: reward functions and reward models as scorers, bad-output errors, score shaping."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch

from rlhfkit import scoring as S
from rlhfkit.errors import UserError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "positive_reward.py"


def write_reward(tmp_path, body: str) -> str:
    path = tmp_path / "reward_fn.py"
    path.write_text(f"def fn(prompts, completions):\n    {body}\n")
    return f"{path}:fn"


def test_function_scorer_from_py_path():
    scorer = S.load_scorer(S.RewardConfig(function=f"{FIXTURE}:positivity"))
    # "happy" and "fun" are positive: 2 of 4 words; none in the second
    assert scorer.score(["p", "q"], ["A happy fun day", "The cat sat"]) == [0.5, 0.0]
    t = S.score_tensor(scorer, ["p"], ["happy"])
    assert t.dtype == torch.float32 and t.tolist() == [1.0]


def test_function_scorer_passes_columns_it_asks_for(tmp_path):
    path = tmp_path / "ref_reward.py"
    path.write_text("def fn(prompts, completions, reference):\n"
                    "    return [float(c == r) for c, r in zip(completions, reference)]\n")
    scorer = S.load_scorer(S.RewardConfig(function=f"{path}:fn"))
    assert scorer.score(["p", "p"], ["a", "b"], {"reference": ["a", "a"], "other": [1, 2]}) == [1.0, 0.0]


@pytest.mark.parametrize("body, message", [
    ("return [1.0]", "returned 1 scores for 2 completions"),
    ("return [1.0, float('nan')]", "non-finite score"),
    ("return 'oops'", "list of numbers"),
    ("raise KeyError('boom')", "raised KeyError"),
])
def test_bad_reward_function_output_is_a_user_error(tmp_path, body, message):
    scorer = S.load_scorer(S.RewardConfig(function=write_reward(tmp_path, body)))
    with pytest.raises(UserError, match=message):
        scorer.score(["p", "q"], ["a", "b"])


def test_missing_reward_file_and_config_rules(tmp_path):
    with pytest.raises(UserError, match="not found"):
        S.load_scorer(S.RewardConfig(function=f"{tmp_path}/nope.py:fn"))
    for cfg in (S.RewardConfig(), S.RewardConfig(function="a.py:f", model="dir")):
        with pytest.raises(UserError, match="exactly one"):
            cfg.validate()


def test_reward_model_path_uses_load_reward_model(monkeypatch):
    """reward.model goes through rlhfkit.reward.load_reward_model(path, device, key) and its .score(); a tiny
    stand-in replaces the real package here."""
    calls = {}

    class StandIn:
        def score(self, prompts, completions):
            return [float(len(c)) for c in completions] if calls["ok"] else [1.0]

    def load_reward_model(path, device=None, key="model.path"):
        calls["args"] = (path, device, key)
        return StandIn()

    monkeypatch.setitem(sys.modules, "rlhfkit.reward", types.SimpleNamespace(load_reward_model=load_reward_model))
    calls["ok"] = True
    scorer = S.load_scorer(S.RewardConfig(model="runs/rm"), "cpu")
    assert calls["args"] == ("runs/rm", "cpu", "reward.model")  # errors name reward.model
    assert scorer.score([[{"role": "user", "content": "hi"}], "p"], ["ab", "abcd"]) == [2.0, 4.0]
    calls["ok"] = False
    with pytest.raises(UserError, match="reward.model runs/rm: returned 1 scores for 2"):
        scorer.score(["p", "q"], ["a", "b"])


def test_normalizer_initial_running_none():
    init = S.ScoreNormalizer("initial")
    init.fit(torch.tensor([1.0, 3.0]))  # mean 2, population std 1
    assert init(torch.tensor([2.0, 4.0, 0.0])).tolist() == [0.0, 2.0, -2.0]
    assert init.mean == 2.0 and init.std == 1.0  # fixed: using it does not move the statistics
    run = S.ScoreNormalizer("running")
    out1 = run(torch.tensor([1.0, 3.0]))  # stats over [1, 3]: mean 2, std 1
    assert out1.tolist() == [-1.0, 1.0]
    run(torch.tensor([5.0, 7.0]))  # stats now over [1, 3, 5, 7]: mean 4, var 5
    assert run.mean == 4.0 and math.isclose(run.std, math.sqrt(5.0))
    clone = S.ScoreNormalizer("running")
    clone.load_state_dict(run.state_dict())
    assert torch.equal(clone(torch.tensor([4.0])), run(torch.tensor([4.0])))
    assert torch.equal(S.ScoreNormalizer("none")(torch.tensor([5.0])), torch.tensor([5.0]))


def test_shape_scores_normalise_then_penalise_then_clip():
    norm = S.ScoreNormalizer("initial")
    norm.fit(torch.tensor([0.0, 2.0]))  # mean 1, std 1
    raw = torch.tensor([1.0, 4.0, -3.0])
    has_eos = torch.tensor([True, False, True])
    cfg = S.RewardConfig(function="x:y", missing_eos_penalty=1.0, clip=2.5)
    # normalised [0, 3, -4]; row 2 lacks EOS: 3 - 1 = 2; clip to [-2.5, 2.5]: [0, 2, -2.5]
    assert S.shape_scores(raw, has_eos, cfg, norm).tolist() == [0.0, 2.0, -2.5]
    cfg = S.RewardConfig(function="x:y", missing_eos_penalty=1.0, missing_eos_mode="replace")
    # replace: a row without EOS scores -penalty = -1 (OpenAI's penalty_reward_value)
    assert S.shape_scores(raw, has_eos, cfg, norm).tolist() == [0.0, -1.0, -4.0]
