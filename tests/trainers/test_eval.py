"""`rlhfkit eval`: metrics on hand-made inputs (win rate, distinct-n, length, chrF/BLEU), the JSON and HTML outputs
from samples files, KL against the reference (exactly 0 for the same model), and one-line config errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlhfkit.config import load_config
from rlhfkit.errors import UserError
from rlhfkit.trainers import evaluate as E

FIXTURE = Path(__file__).resolve().parent / "fixtures_eval.py"


def test_distinct_n_by_hand():
    # unigrams a b a b a c: 6, distinct {a, b, c} -> 0.5; bigrams ab ba ab ac: 4, distinct 3 -> 0.75
    assert E.distinct_n(["a b a b", "a c"], 1) == 0.5
    assert E.distinct_n(["a b a b", "a c"], 2) == 0.75
    # trigrams aba bab (first text only): 2, both distinct
    assert E.distinct_n(["a b a b", "a c"], 3) == 1.0
    assert E.distinct_n(["", "x"], 2) == 0.0  # no bigram at all
    # punctuation is a token and case is folded: "Hi, hi" -> hi , hi: 3 unigrams, 2 distinct
    assert E.distinct_n(["Hi, hi"], 1) == pytest.approx(2 / 3)


def test_win_rate_by_hand():
    w = E.win_rate([3, 1, 2, 5], [1, 1, 5, 0])  # win, tie, loss, win -> (1 + .5 + 0 + 1) / 4 = 0.625
    assert w["win_rate"] == 0.625 and (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    # outcomes 1, .5, 0, 1: deviations .375 -.125 -.625 .375 -> squares sum .6875; sample var .6875/3;
    # se = sqrt(var / 4) = sqrt(.6875 / 12) = 0.23936
    assert w["stderr"] == pytest.approx(0.23936, abs=1e-5)
    assert E.win_rate([1.0], [1.0])["win_rate"] == 0.5
    with pytest.raises(ValueError):
        E.win_rate([1.0], [])


def test_text_and_translation_metrics():
    m = E.text_metrics(["one two three", "four"])
    assert m["length_words"] == 2.0 and m["length_chars"] == (13 + 4) / 2
    refs = [["le petit chat noir dort"], ["un grand chien court vite"]]
    same = E.translation_metrics([" le petit chat noir dort", "un grand chien court vite "], refs)
    assert same["chrf"] == pytest.approx(100.0) and same["bleu"] == pytest.approx(100.0)
    worse = E.translation_metrics(["le chien dort", "un chat court"], refs)
    assert worse["chrf"] < 60 and worse["bleu"] < 50


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_eval_from_samples_files(tmp_path):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "P1", "reference": "good good"},
                                           {"prompt": "P2", "reference": "fine"},
                                           {"prompt": "P3", "reference": "ok"}])
    # judge = number of words: A vs B per sample: (3 vs 1) win, (1 vs 1) tie, (1 vs 2) loss, (2 vs 2) tie ...
    a = write(tmp_path / "a.jsonl", [{"prompt": "P1", "completions": ["good good good", "x"]},
                                     {"prompt": "P2", "completions": ["fine", "y y"]},
                                     {"prompt": "P3", "completions": ["<b>ok</b>", "z"]}])
    b = write(tmp_path / "b.jsonl", [{"prompt": "P1", "completions": ["good", "x"]},
                                     {"prompt": "P2", "completions": ["fine fine", "y y"]},
                                     {"prompt": "P3", "completions": ["ok", "z z z"]}])
    cfg = load_config(E.EvalConfig, None, {
        "a.samples": a, "b.samples": b, "judge.function": f"{FIXTURE}:n_words", "data.prompts": prompts,
        "num_samples": "2", "output": str(tmp_path / "out" / "eval.json"), "progress": "false"})
    result = E.main(cfg)
    # words via \w+|[^\w\s]: "<b>ok</b>" -> < b > ok < / b > = 8 tokens vs "ok" 1
    # A: 3, 1, 1, 2, 8, 1   B: 1, 1, 2, 2, 1, 3 -> win tie loss tie win loss -> (1 + .5 + 0 + .5 + 1 + 0) / 6 = 0.5
    wr = result["win_rate"]["function"]
    assert (wr["wins"], wr["ties"], wr["losses"]) == (2, 2, 2) and wr["win_rate"] == 0.5
    assert result["policies"]["a"]["scores"]["function"] == pytest.approx((3 + 1 + 1 + 2 + 8 + 1) / 6)
    assert "chrf" in result["policies"]["a"] and "kl" not in result["policies"]["a"]  # no models: no KL
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["win_rate"] == result["win_rate"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[4]["a"] == "<b>ok</b>" and rows[4]["a_scores"]["function"] == 8
    html = (tmp_path / "out" / "eval.html").read_text()
    assert "&lt;b&gt;ok&lt;/b&gt;" in html and "<b>ok</b>" not in html  # model text is escaped
    assert re.search(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', html)
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html


def test_kl_is_zero_against_the_same_model(tmp_path):
    cfg = load_config(E.EvalConfig, None, {
        "a.model": "stories260k", "b.model": "stories260k", "judge.function": f"{FIXTURE}:n_words",
        "data.limit": "3", "gen.max_new_tokens": "6", "output": str(tmp_path / "e.json"), "report": "false",
        "progress": "false"})
    result, rows = E.evaluate(cfg)
    assert result["policies"]["a"]["kl"] == 0.0 and all(r["a_kl"] == 0.0 for r in rows)
    # same model, same seed: the same samples, so every comparison is a tie
    assert result["win_rate"]["function"]["ties"] == 3
    assert result["policies"]["a"]["length_tokens"] <= 6


@pytest.mark.parametrize("overrides, message", [
    ({"a.model": "x", "a.samples": "y"}, "exactly one of a.model"),
    ({"a.model": "x"}, "judge"),
    ({"a.model": "x", "judge.function": "m:f", "num_samples": "0"}, "num_samples"),
])
def test_config_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(E.EvalConfig, None, overrides)


def test_samples_file_too_short(tmp_path):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "P1"}, {"prompt": "P2"}])
    a = write(tmp_path / "a.jsonl", [{"prompt": "P1", "completion": "x"}])
    cfg = load_config(E.EvalConfig, None, {"a.samples": a, "judge.function": f"{FIXTURE}:n_words",
                                           "data.prompts": prompts, "output": str(tmp_path / "e.json")})
    with pytest.raises(UserError, match="1 rows for 2 prompts"):
        E.evaluate(cfg)
