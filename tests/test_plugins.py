"""Loading user functions (`reward.function=...`): file paths, modules beside the user, return types, errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from rlhfkit.errors import UserError
from rlhfkit.plugins import call_scorer, load_function


@pytest.fixture
def clean_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))


def test_module_in_the_current_folder_and_file_importing_its_neighbour(tmp_path, monkeypatch, clean_path):
    (tmp_path / "helpers_rf.py").write_text("def length(c):\n    return len(c)\n")
    (tmp_path / "my_rewards.py").write_text(
        "from helpers_rf import length\n\ndef score(prompts, completions):\n"
        "    return [length(c) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    sys.path[:] = [p for p in sys.path if p not in ("", ".", str(tmp_path))]
    fn = load_function("my_rewards:score")  # not on sys.path: found in the current folder
    assert fn(["p"], ["abc"]) == [3]
    other = tmp_path / "sub"
    other.mkdir()
    (other / "helper_sub.py").write_text("K = 2\n")
    (other / "rf.py").write_text("from helper_sub import K\n\ndef score(p, c):\n    return [K] * len(c)\n")
    monkeypatch.chdir("/")
    assert load_function(f"{other / 'rf.py'}:score")(["p"], ["x", "y"]) == [2, 2]
    with pytest.raises(UserError, match="cannot import module 'no_such_module_xyz'"):
        load_function("no_such_module_xyz:score")
    with pytest.raises(UserError, match="has no function 'nope'"):
        load_function("my_rewards:nope")


@pytest.mark.parametrize("out", [np.array([1, 2.5]), torch.tensor([1.0, 2.5]), (1, 2.5), [np.float32(1), 2.5]])
def test_scores_may_be_any_sequence_of_numbers(out):
    assert call_scorer(lambda p, c: out, ["a", "b"], ["x", "y"]) == [1.0, 2.5]


def test_bad_scores_are_user_errors():
    for out, message in [("ab", "list of numbers"), ([1.0], "returned 1 scores for 2"),
                         ([1.0, float("nan")], "non-finite score"), (None, "list of numbers")]:
        with pytest.raises(UserError, match=message):
            call_scorer(lambda p, c: out, ["a", "b"], ["x", "y"])


def test_reward_model_errors_name_the_key_that_gave_the_folder(tmp_path):
    from rlhfkit.scoring import RewardConfig, load_scorer

    with pytest.raises(UserError, match=f"^reward.model: {tmp_path / 'nope'} not found"):
        load_scorer(RewardConfig(model=str(tmp_path / "nope")))
    with pytest.raises(UserError, match=f"^reward.model: {tmp_path} is not a reward model folder"):
        load_scorer(RewardConfig(model=str(tmp_path)))
