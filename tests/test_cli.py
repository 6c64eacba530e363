"""The `rlhfkit` command through a real subprocess: help, contracts, and user errors without tracebacks."""

from __future__ import annotations

import json

from rlhfkit.cli import COMMANDS


def test_help_lists_every_command(cli):
    res = cli("--help")
    assert res.returncode == 0
    for name in COMMANDS:
        assert f"  {name}" in res.stdout


def test_stage_help_documents_options(cli):
    res = cli("sft", "--help")
    assert res.returncode == 0
    assert "data.train (str, default '')" in res.stdout and "Optimizer steps." in res.stdout


def test_unknown_command_and_key_exit_2_without_traceback(cli):
    for args, text in [(("sfft",), "unknown command 'sfft' (did you mean 'sft'?)"),
                       (("sft", "data.train=x.jsonl", "train.stepz=3"), "unknown config key 'train.stepz'"),
                       (("sft", "data.train=x.jsonl", "train.steps=many"), "train.steps: expected int")]:
        res = cli(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines() == [f"error: {res.stderr.strip()[7:]}"] and text in res.stderr


def test_bad_data_file_exit_2_one_line(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 5}\n')
    res = cli("sft", f"data.train={bad}", f"run.output_dir={tmp_path / 'out'}", "train.steps=1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{bad}:2: field 'completion': expected a string, got int" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_generate_contract(cli, jsonl, tmp_path):
    prompts = jsonl([{"prompt": "Once upon a time"}, {"prompt": "The little dog", "id": 7}])
    out = tmp_path / "gen.jsonl"
    res = cli("generate", "model.name=stories260k", f"data.prompts={prompts}", "gen.temperature=0",
              "gen.max_new_tokens=60", f"output={out}")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Once upon a time", "The little dog"]
    assert all(len(r["completions"]) == 1 for r in rows) and rows[1]["id"] == 7
    # greedy from the bundled model: the well-known opening of stories260K, and no prompt echoed
    assert rows[0]["completions"][0].startswith(", there was a little")
    assert not rows[0]["completions"][0].startswith("Once upon")


def test_jsonl_output_under_another_format_name_is_refused_before_any_work(cli, jsonl, tmp_path):
    """generate/bon/rm score/annotate export write JSON Lines; out.csv would be read back as CSV (out.txt as one
    record per line, out.json as an array), so the name is refused at once, naming the key, and nothing is written."""
    prompts = jsonl([{"prompt": "Once upon a time"}])
    for args, key, name, fix in [
            (("generate", "model.name=stories260k", f"data.prompts={prompts}"), "output", "gen.csv", "gen.jsonl"),
            (("generate", "model.name=stories260k", f"data.prompts={prompts}"), "output", "gen.txt.gz", "gen.jsonl.gz"),
            (("bon", "reward.function=rlhfkit.gold:sentiment", f"data.prompts={prompts}", "num_samples=2",
              f"output={tmp_path / 'sft.jsonl'}"), "pairs_output", "pairs.json", "pairs.jsonl"),
            (("rm", "score", "model.path=runs/rm", f"input={prompts}"), "output", "scored.tsv", "scored.jsonl"),
            (("annotate", "export", f"db={tmp_path / 'f.db'}", "project=p"), "output", "prefs.csv", "prefs.jsonl")]:
        out = tmp_path / name
        res = cli(*args, f"{key}={out}")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"error: {key}: '{out}' would be read back as" in res.stderr and f"name it {fix}" in res.stderr
        assert not out.exists()


def test_sft_then_generate_from_local_folder(cli, jsonl, tmp_path):
    data = jsonl([{"prompt": "Q: colour of the sky?\nA:", "completion": " blue"}] * 8)
    res = cli("sft", f"data.train={data}", f"run.output_dir={tmp_path / 'sft'}", "train.steps=3",
              "train.batch_size=4", "train.micro_batch_size=2", "data.eval_fraction=0")
    assert res.returncode == 0, res.stderr
    prompts = jsonl([{"prompt": "Q: colour of the sky?\nA:"}])
    res = cli("generate", f"model.name={tmp_path / 'sft' / 'model'}", f"data.prompts={prompts}",
              "gen.max_new_tokens=5", "num_samples=3", "gen.temperature=1.0", f"output={tmp_path / 'g.jsonl'}")
    assert res.returncode == 0, res.stderr
    row = json.loads((tmp_path / "g.jsonl").read_text())
    assert len(row["completions"]) == 3


def test_print_config_and_reproduce(cli, tmp_path):
    res = cli("sft", "data.train=bundled:tinystories_train.jsonl.gz", "train.steps=7", "--print-config")
    assert res.returncode == 0 and "steps: 7" in res.stdout
    path = tmp_path / "c.yaml"
    path.write_text(res.stdout)
    again = cli("sft", "--config", str(path), "--print-config")
    assert again.stdout == res.stdout


def test_print_config_before_required_keys_are_given(cli):
    # rloo needs a reward source: --print-config still prints the defaults (to start a YAML from) and says what is
    # missing; a real run refuses with the same message and a non-zero exit
    res = cli("rloo", "--print-config")
    assert res.returncode == 0 and "num_generations:" in res.stdout
    assert "note: not runnable as it is" in res.stderr and "reward.function" in res.stderr
    run = cli("rloo", "train.steps=1")
    assert run.returncode != 0 and "reward.function" in run.stderr and "Traceback" not in run.stderr
