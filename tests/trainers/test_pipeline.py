"""`rlhfkit pipeline`: the positional YAML with CLI overrides, checks before anything runs, stage fingerprints,
people labelling in the web app (`annotate.source=human`), and a DPO pipeline on a preference file with a Python
judge. The simulated-crowd PPO loop with rounds, skipping and resuming is in test_demo.py."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_config, parse_cli
from rlhfkit.errors import UserError
from rlhfkit.trainers import pipeline as P
from rlhfkit.trainers import pipeline_stages as S

JUDGE = f"{Path(__file__).resolve().parent / 'fixtures_eval.py'}:n_words"


def test_positional_yaml_then_cli_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rounds: 3\nrl:\n  method: dpo\n  args: {train.steps: 7}\nannotate: {crowd: 2}\n")
    argv = ["rlhfkit", "pipeline", str(recipe), "annotate.crowd=4", "run.output_dir=runs/x"]
    cfg = parse_cli(P.PipelineConfig, argv[2:], "rlhfkit pipeline")
    assert (cfg.rounds, cfg.rl.method, cfg.rl.args, cfg.annotate.crowd, cfg.run.output_dir) == \
        (3, "dpo", {"train.steps": 7}, 4, "runs/x")
    assert cfg.rm.args == P.PipelineConfig().rm.args  # keys the YAML does not set keep their defaults
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl:\n  methd: ppo\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key 'rl.methd' \(did you mean 'rl.method'\?\)"):
        parse_cli(P.PipelineConfig, [str(bad)], "rlhfkit pipeline")
    with pytest.raises(UserError, match="not two"):
        parse_cli(P.PipelineConfig, [str(recipe), "--config", str(recipe)], "rlhfkit pipeline")


def test_cli_error_is_one_line(cli, tmp_path):
    proc = cli("pipeline", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.yaml'}: config file not found"]


@pytest.mark.parametrize("overrides, message", [
    ({"annotate.source": "file"}, "annotate.file: required"),
    ({"annotate.source": "file", "annotate.file": "x.jsonl", "rounds": 2}, "rounds > 1 needs new labels"),
    ({"rm.enabled": False}, "needs a reward"),
    ({"rl.method": "a2c"}, "rl.method: 'a2c' is not available"),
    ({"rounds": 0}, "rounds: must be >= 1"),
])
def test_config_rules(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(P.PipelineConfig, None, overrides)


def test_a_wrong_stage_key_fails_before_anything_runs(tmp_path):
    cfg = load_config(P.PipelineConfig, None, {"run.output_dir": str(tmp_path / "out"),
                                               "rl.args": {"train.stpes": 3}})
    with pytest.raises(UserError, match=r"rl.args: unknown config key 'train.stpes' \(did you mean 'train.steps'"):
        P.run_pipeline(cfg)
    assert not (tmp_path / "out").exists()


def test_fingerprints():
    a = P.fingerprint("rl", {"args": {"train.steps": 2, "run.stop_after_steps": 1, "run.threads": 2}}, ["x"])
    assert a == P.fingerprint("rl", {"args": {"train.steps": 2}}, ["x"])  # how it runs, not what it computes
    assert a != P.fingerprint("rl", {"args": {"train.steps": 3}}, ["x"])
    assert a != P.fingerprint("rl", {"args": {"train.steps": 2}}, ["y"])  # an upstream change propagates


def test_people_label_in_the_web_app(tmp_path, capsys):
    """annotate.source=human: the app is served, a login is printed, the stage waits for every item's label."""
    from rlhfkit.annotate.simulate import CrowdSpec, simulate
    from rlhfkit.plugins import load_function

    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"prompt": f"P{i}", "completions": [f"good {i}", f"bad {i} bad"]}) + "\n"
                             for i in range(3)))
    cfg = load_config(P.PipelineConfig, None, {"annotate.source": "human", "annotate.port": 0, "annotate.k": 1,
                                               "generate.num_samples": 2, "run.progress": False})
    labelled = []

    def person(server, project):  # someone opens the page and labels: here through the same HTTP API
        def work():
            labelled.append(simulate(server.url, server.admin_token(), project, load_function(JUDGE),
                                     spec=CrowdSpec(crowd=1, temperature=0)))
        threading.Thread(target=work, daemon=True).start()

    db = str(tmp_path / "fb.db")
    result = S.collect_human(cfg, cands, tmp_path / "prefs.jsonl", db, "round1", on_ready=person)
    out = capsys.readouterr().out
    assert result["rows"] == 3 and labelled[0].labels == 3
    rows = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert all(r["chosen"].startswith("bad") for r in rows)  # the judge counts words: longer wins
    line = next(x for x in out.splitlines() if "password" in x)
    password = line.split("password ")[1].split()[0]
    from rlhfkit.annotate.store import Store

    store = Store(db)
    try:
        assert store.check_password(name="annotator", password=password) is not None
    finally:
        store.close()
    assert "/projects/" in out and "http://127.0.0.1:" in out


def test_dpo_on_a_preference_file_with_a_python_judge(tmp_path):
    threads = torch.get_num_threads()
    cfg = load_config(P.PipelineConfig, None, {
        "run.output_dir": str(tmp_path / "out"), "run.progress": False, "annotate.source": "file",
        "annotate.file": "bundled:tinystories_fluency_pairs.jsonl.gz", "rm.enabled": False, "rl.method": "dpo",
        "rl.checkpoints": 1, "rl.args": {"train.steps": 2, "train.batch_size": 4, "train.micro_batch_size": 4,
                                         "data.max_length": 48, "data.eval_fraction": 0.0},
        "eval.judge": JUDGE, "eval.curve_prompts": 0, "eval.args": {"data.limit": 3},
        "gen.max_new_tokens": 8})
    try:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            summary = P.main(cfg, ["rlhfkit", "pipeline"])
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "out"
    assert list(summary["stage_seconds"]) == ["round 1: dpo", "eval"]
    assert summary["method"] == "dpo" and "gold_score_before" in summary and "rm_accuracy" not in summary
    assert (out / "round1" / "rl" / "model" / "config.json").is_file() and not (out / "round1" / "generate").exists()
    import yaml

    dpo_cfg = yaml.safe_load((out / "round1" / "rl" / "config.yaml").read_text())
    assert dpo_cfg["data"]["train"] == "bundled:tinystories_fluency_pairs.jsonl.gz"
    html = (out / "report.html").read_text()
    assert "Held-out evaluation" in html and "data:image/png;base64," in html
