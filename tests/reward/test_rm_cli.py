"""`rlhfkit rm train|eval|score` end to end (linear handcrafted models: fast) and every bad input case."""

import gzip
import json

import pytest

from rlhfkit.cli import main as cli_main

from rm_synthetic import word_pairs


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def run(*args) -> int:
    """Run the CLI in-process; returns the exit code (0 when main returns)."""
    try:
        cli_main(list(args))
    except SystemExit as err:
        return int(err.code or 0)
    return 0


@pytest.fixture
def trained(tmp_path):
    data = _jsonl(tmp_path / "train.jsonl", word_pairs(60, seed=0))
    out = tmp_path / "run"
    assert run("rm", "train", "model.kind=linear", "model.features=handcrafted", f"data.train={data}",
               f"run.output_dir={out}", "run.progress=false", f"train.cache_dir={tmp_path / 'cache'}") == 0
    return out


def test_train_eval_score_linear(tmp_path, trained, capsys):
    assert (trained / "model" / "reward_model.json").is_file() and (trained / "eval.json").is_file()
    heldout = _jsonl(tmp_path / "heldout.jsonl", word_pairs(20, seed=1))
    out_json = tmp_path / "report" / "eval.json"
    assert run("rm", "eval", f"model.path={trained}", f"data.eval={heldout}", f"output={out_json}",
               "progress=false") == 0
    m = json.loads(out_json.read_text())
    for key in ("accuracy", "pairs", "bt_loss", "ece", "reliability", "accuracy_by_length",
                "accuracy_by_length_order", "length_heuristic_accuracy", "mean_gap", "plots"):
        assert key in m, key
    assert m["pairs"] == 20 and isinstance(m["accuracy"], float) and 0 <= m["ece"] <= 1
    for png in m["plots"].values():
        assert png.startswith(str(tmp_path / "report" / "eval_")) and open(png, "rb").read(4) == b"\x89PNG"
    inp = _jsonl(tmp_path / "in.jsonl", [{"prompt": "Tell me a story: ", "completion": "the dog sat", "id": 7},
                                        {"prompt": [{"role": "user", "content": "hi"}],
                                         "completions": ["the dog", "a cat"]}])
    out = tmp_path / "scored.jsonl"
    assert run("rm", "score", f"model.path={trained}/model", f"input={inp}", f"output={out}", "progress=false") == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["id"] == 7 and isinstance(rows[0]["score"], float)
    assert len(rows[1]["scores"]) == 2 and "score" not in rows[1]


def test_ties_both_bad_duplicates_identical_are_counted(tmp_path):
    rows = word_pairs(30, seed=2)
    rows.append(dict(rows[0]))  # duplicate
    rows.append({"prompt": "p: ", "chosen": "same text", "rejected": "same text"})  # chosen == rejected
    rows.append({**word_pairs(1, seed=9)[0], "label": "tie"})
    rows.append({**word_pairs(1, seed=8)[0], "label": "both_bad"})
    data = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    assert run("rm", "train", "model.kind=linear", "model.features=handcrafted", f"data.train={data}",
               f"run.output_dir={out}", "run.progress=false", "data.eval_fraction=0",
               f"train.cache_dir={tmp_path / 'cache'}") == 0
    meta = json.loads((out / "model" / "reward_model.json").read_text())["data"]
    assert (meta["read"], meta["dropped_identical"], meta["duplicates"], meta["ties"], meta["both_bad"]) == \
        (34, 1, 1, 1, 1)
    assert meta["train_pairs"] == 32 and meta["train_ties"] == 1  # 30 + duplicate + tie; both-bad skipped


def test_hh_jsonl_gz_as_is(tmp_path, shared):
    hh = shared("anthropic-hh-rlhf", "helpful-base-test.jsonl.gz")
    small = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "rt") as fh:
        lines = [next(fh) for _ in range(400)]
    with gzip.open(small, "wt") as fh:
        fh.writelines(lines)
    out = tmp_path / "run"
    assert run("rm", "train", "model.kind=linear", "model.features=length", f"data.train={small}",
               f"run.output_dir={out}", "run.progress=false", f"train.cache_dir={tmp_path / 'cache'}") == 0
    m = json.loads((out / "eval.json").read_text())
    assert m["pairs"] == 80 and m["accuracy"] == m["length_heuristic_accuracy"]  # w > 0 learnt: longer wins


def bad_cases(tmp_path, trained):
    good = _jsonl(tmp_path / "good.jsonl", word_pairs(10, seed=3))
    rating = _jsonl(tmp_path / "ratings.jsonl", [{"prompt": "p", "completion": "c", "score": "high"}])
    malformed = _jsonl(tmp_path / "bad.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', "{not json"])
    identical = _jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "just a prompt"}])
    no_comp = _jsonl(tmp_path / "nocomp.jsonl", [{"prompt": "p", "text": "c"}])
    comps_str = _jsonl(tmp_path / "compstr.jsonl", [{"prompt": "p", "completions": "c"}])
    comp_num = _jsonl(tmp_path / "compnum.jsonl", [{"prompt": "p", "completion": 3}])
    hh_nosplit = _jsonl(tmp_path / "hh.jsonl", [{"chosen": "Human: a", "rejected": "Human: b"}])
    out = tmp_path / "o"
    train = ["rm", "train", f"run.output_dir={out}", "run.progress=false", f"train.cache_dir={tmp_path / 'c'}"]
    return {
        "no data.train": ([*train, "model.kind=linear"], "data.train: required"),
        "missing file": ([*train, "data.train=/nonexistent.jsonl"], "file not found"),
        "malformed json": ([*train, "model.kind=linear", "model.features=handcrafted", f"data.train={malformed}"],
                           "bad.jsonl:2: malformed JSON"),
        "unknown kind": ([*train, "model.kind=tree", f"data.train={good}"], "model.kind"),
        "unknown features": ([*train, "model.kind=linear", "model.features=bogus", f"data.train={good}"],
                             "unknown extractor"),
        "missing lm folder": ([*train, "model.kind=linear", "model.features=lm:./no/such/model", f"data.train={good}"],
                              "not found"),
        "missing deep model": ([*train, "model.kind=deep", "model.name=./no/such/model", f"data.train={good}"],
                               "not found"),
        "bad rating": ([*train, "model.kind=linear", "model.features=handcrafted", f"data.train={rating}"],
                       "field 'score'"),
        "only identical pairs": ([*train, "model.kind=linear", f"data.train={identical}"], "no usable preference"),
        "prompts only": ([*train, "model.kind=linear", f"data.train={prompts}"], "expected preference pairs"),
        "hh without assistant turn": ([*train, "model.kind=linear", f"data.train={hh_nosplit}"], "Assistant"),
        "indivisible batch": ([*train, f"data.train={good}", "train.batch_size=5", "train.micro_batch_size=2"],
                              "not divisible"),
        "bad eval fraction": ([*train, f"data.train={good}", "data.eval_fraction=1.5"], "eval_fraction"),
        "unknown key": ([*train, f"data.train={good}", "train.lr=1"], "unknown config key"),
        "eval no model": (["rm", "eval", f"model.path={tmp_path}", f"data.eval={good}", "output=x.json"],
                          "not a reward model folder"),
        "eval missing path": (["rm", "eval", "model.path=/no/such", f"data.eval={good}", "output=x.json"],
                              "not found"),
        "eval no output": (["rm", "eval", f"model.path={trained}", f"data.eval={good}"], "output: required"),
        "eval ratings file": (["rm", "eval", f"model.path={trained}", f"data.eval={rating}", "output=x.json"],
                              "missing field 'chosen'"),
        "score no completion": (["rm", "score", f"model.path={trained}", f"input={no_comp}", "output=o.jsonl"],
                                "missing field 'completion'"),
        "score completions not list": (["rm", "score", f"model.path={trained}", f"input={comps_str}",
                                        "output=o.jsonl"], "expected a non-empty list"),
        "score completion not text": (["rm", "score", f"model.path={trained}", f"input={comp_num}",
                                       "output=o.jsonl"], "expected a string"),
        "unknown subcommand": (["rm", "fit"], "unknown command 'fit'"),
    }


def test_bad_inputs_exit_2_with_one_line(tmp_path, trained, capsys):
    capsys.readouterr()
    for name, (args, expected) in bad_cases(tmp_path, trained).items():
        code = run(*args)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (name, code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert expected in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_bad_input_through_a_real_subprocess(tmp_path, cli):
    result = cli("rm", "train", "model.kind=linear", "data.train=/nonexistent.jsonl", f"run.output_dir={tmp_path}/o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: /nonexistent.jsonl: file not found"]


def test_ratings_only_linear_least_squares(tmp_path):
    good = [{"prompt": "Q: ", "completion": r["chosen"], "score": 4.0} for r in word_pairs(40, seed=10)]
    bad = [{"prompt": "Q: ", "completion": "Sorry, I can't. " + r["rejected"], "score": 1.0}
           for r in word_pairs(40, seed=11)]
    data = _jsonl(tmp_path / "ratings.jsonl", good + bad)
    out = tmp_path / "run"
    assert run("rm", "train", "model.kind=linear", "model.features=handcrafted", f"data.train={data}",
               f"run.output_dir={out}", "run.progress=false", "train.l2=0.01",
               f"train.cache_dir={tmp_path / 'cache'}") == 0
    meta = json.loads((out / "model" / "reward_model.json").read_text())
    assert meta["training"]["solver"] == "least_squares" and meta["data"]["ratings"] == 80
    from rlhfkit.reward import load_reward_model

    rm = load_reward_model(out)
    s = rm.score(["Q: ", "Q: "], ["the cat sat on a mat", "Sorry, I can't. the cat sat on a mat"])
    assert s[0] > s[1] + 1.0
