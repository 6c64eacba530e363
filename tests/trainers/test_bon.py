"""Best-of-n (rlhfkit bon): the written SFT row of each prompt is the top-scored of its n sampled completions, pairs
are best vs worst, both files load with the SFT / preference readers; pick() by hand; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit import cli
from rlhfkit.data import load_preferences, load_sft
from rlhfkit.trainers import bon

RECORDING_REWARD = '''
import json, pathlib

def score(prompts, completions):
    """Characters that are vowels: deterministic, few ties. Records every call beside this file."""
    scores = [float(sum(ch in "aeiou" for ch in c)) for c in completions]
    with open(pathlib.Path(__file__).with_name("calls.jsonl"), "a") as fh:
        for p, c, s in zip(prompts, completions, scores):
            fh.write(json.dumps({"prompt": p, "completion": c, "score": s}) + "\\n")
    return scores
'''


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_best_of_n_writes_the_top_scored_completion_and_pairs(tmp_path, jsonl):
    prompts = ["Once upon a time", "Lily had a", "The dog", "Tom and Sue", "One day, the sun"]
    prompts_file = jsonl([{"prompt": p, "topic": i} for i, p in enumerate(prompts)])
    (tmp_path / "reward.py").write_text(RECORDING_REWARD)
    n = 4
    result = cli.run_command(["bon", f"reward.function={tmp_path / 'reward.py'}:score", f"data.prompts={prompts_file}",
                              f"num_samples={n}", "gen.max_new_tokens=12", f"output={tmp_path / 'sft.jsonl'}",
                              f"pairs_output={tmp_path / 'pairs.jsonl'}", "threads=1", "progress=false"])
    calls = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [c["prompt"] for c in calls] == [p for p in prompts for _ in range(n)]  # n per prompt, prompt-major
    sft = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in sft] == prompts and [r["topic"] for r in sft] == list(range(5))
    by_prompt = {p: [c for c in calls if c["prompt"] == p] for p in prompts}
    for row in sft:
        group = [c for c in by_prompt[row["prompt"]] if c["completion"].strip()]
        best = max(c["score"] for c in group)
        assert row["score"] == best and row["completion"] == next(c for c in group if c["score"] == best)["completion"]
    for pair in pairs:
        group = by_prompt[pair["prompt"]]
        assert pair["score_chosen"] == max(c["score"] for c in group) > pair["score_rejected"]
        assert pair["score_rejected"] == min(c["score"] for c in group if c["completion"] != pair["chosen"])
        assert {pair["chosen"], pair["rejected"]} <= {c["completion"] for c in group}
    assert len(pairs) >= 3  # prompts whose n completions all score the same make no pair
    all_scores = [c["score"] for c in calls]
    assert result["mean_score"] == pytest.approx(sum(all_scores) / len(all_scores))
    assert result["mean_best_score"] > result["mean_score"]
    assert len(load_sft(str(tmp_path / "sft.jsonl"))) == 5  # readable by `rlhfkit sft`
    assert len(load_preferences(str(tmp_path / "pairs.jsonl")).pairs) == len(pairs)  # and by `rlhfkit dpo` / `rm`


def test_pick_by_hand():
    assert bon.pick([1.0, 3.0, 3.0, 0.5], ["a", "b", "c", "d"]) == (1, 3)  # tie for best: the earliest
    assert bon.pick([9.0, 1.0, 2.0], ["  ", "x", "y"]) == (2, 1)  # an empty text never wins (nor loses)
    assert bon.pick([2.0, 1.0, 0.0], ["same", "same", "other"]) == (0, 2)  # worst differs from the best's text
    assert bon.pick([1.0, 1.0], ["same", "same"]) == (0, -1)  # no second text: no pair
    assert bon.pick([1.0, 2.0], ["", " \n"]) is None


def test_bad_inputs(tmp_path, capsys):
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "positive_reward.py"
    base = [f"reward.function={fixture}:positivity", f"output={tmp_path / 'o.jsonl'}"]
    for extra, message in [(["reward.normalize=initial"], "normalisation does not change"),
                           (["num_samples=1", f"pairs_output={tmp_path / 'p.jsonl'}"], "needs num_samples >= 2"),
                           (["output="], "output: required")]:
        with pytest.raises(SystemExit) as exc:
            cli.main(["bon", *base, *extra])
        errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert exc.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not Path(tmp_path / "o.jsonl").exists()
