"""`rlhfkit demo` (= the pipeline with its default config), on a tiny two-round configuration: the summary.json
contract, a self-contained report, `open`, iterated rounds, skipping finished stages on re-run, resuming after a
crash, and re-running only what a config change touches. The full-size demo is test_demo_slow.py (-m slow)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.trainers import demo, pipeline_stages

TINY = {
    "run.progress": False, "gen.max_new_tokens": 10, "generate.prompts_per_round": 10, "generate.num_samples": 3,
    "rm.args": {"model.kind": "linear", "model.features": "handcrafted", "train.cache_dir": "none"},
    "rl.checkpoints": 2,
    "rl.args": {"train.steps": 2, "train.rollout_batch_size": 8, "train.num_minibatches": 2,
                "train.micro_batch_size": 4, "train.update_epochs": 1, "reward.normalize_samples": 8,
                "kl_coef": 0.05, "optim.lr": 1e-3},
    "eval.curve_prompts": 4, "eval.args": {"data.limit": 6, "num_samples": 1}, "rounds": 2}
STAGES = ["generate", "annotate", "rm", "rl"]


def tiny_cfg(out: Path, **more):
    return load_config(demo.DemoConfig, None, {**TINY, "run.output_dir": str(out), **more})


def run_quiet(cfg) -> tuple[dict, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = demo.main(cfg, ["rlhfkit", "demo"])
    return summary, buf.getvalue()


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("demo") / "run"
    try:
        summary, stdout = run_quiet(tiny_cfg(out, open=True))
    finally:
        torch.set_num_threads(threads)
    return out, summary, stdout


@pytest.fixture
def forbid_stages(monkeypatch):
    """Make the given pipeline stage functions fail if called (they must be skipped)."""
    def forbid(*names):
        for name in names:
            def boom(*a, _name=name, **k):
                raise AssertionError(f"stage {_name} ran but should have been skipped")
            monkeypatch.setattr(pipeline_stages, name, boom)
    return forbid


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_summary_json_contract(tiny_demo):
    out, summary, _ = tiny_demo
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("gold_score_before", "gold_score_after", "win_rate", "rm_accuracy", "kl", "seconds"):
        assert isinstance(saved[key], float), key
    assert 0 <= saved["win_rate"] <= 1 and 0 <= saved["rm_accuracy"] <= 1 and saved["seconds"] > 0
    assert -1 <= saved["gold_score_before"] <= 1 and -1 <= saved["gold_score_after"] <= 1  # VADER compound
    assert saved["method"] == "ppo" and saved["rounds"] == 2
    assert list(saved["stage_seconds"]) == [f"round {r}: {s}" for r in (1, 2) for s in
                                            ("generate", "annotate (simulate)", "rm", "ppo")] + ["eval"]
    # the summary's numbers are the eval's numbers
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert saved["gold_score_after"] == ev["policies"]["a"]["scores"]["function"]
    assert saved["win_rate"] == ev["win_rate"]["function"]["win_rate"]
    assert ev["policies"]["b"]["source"] == "stories260k" and ev["prompts"] == 6


def test_report_is_one_self_contained_file(tiny_demo):
    out, summary, _ = tiny_demo
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 4 and all(len(b) > 1000 for b in images)  # rm scatter, curves, overopt, histogram
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html) and "<script" not in html
    assert "<link" not in html and "@import" not in html
    for heading in ("Reward model", "Training curves", "Gold score vs learned reward as KL grows",
                    "Held-out evaluation: tuned vs base", "Samples side by side"):
        assert heading in html
    first = json.loads((out / "eval" / "eval_samples.jsonl").read_text().splitlines()[0])
    from html import escape

    assert escape(first["a"]) in html and escape(first["b"]) in html  # before/after samples side by side
    assert f"{summary['win_rate']:.4f}" in html


def test_open_prints_the_report_path(tiny_demo):
    out, _, stdout = tiny_demo
    report = (out / "report.html").resolve()
    assert f"report: {report}" in stdout and report.as_uri() in stdout
    assert "win rate of tuned over base" in stdout and "reward model held-out accuracy" in stdout


def test_rounds_continue_from_the_previous_policy_with_all_labels(tiny_demo):
    out, _, _ = tiny_demo
    done = lambda r, s: json.loads((out / f"round{r}" / s / "DONE.json").read_text())["result"]  # noqa: E731
    assert done(1, "generate")["model"] == "stories260k"
    assert done(2, "generate")["model"] == str(out / "round1" / "rl" / "model")
    assert f"name: {out / 'round1' / 'rl' / 'model'}" in (out / "round2" / "rl" / "config.yaml").read_text()
    n1 = len((out / "round1" / "annotate" / "prefs.jsonl").read_text().splitlines())
    n2 = len((out / "round2" / "annotate" / "prefs.jsonl").read_text().splitlines())
    assert 0 < n1 <= 10 * 3 and 0 < n2 <= 10 * 3  # 10 prompts x 3 pairs, less pairs of identical completions
    assert len((out / "round2" / "rm" / "pairs.jsonl").read_text().splitlines()) == n1 + n2  # cumulative
    curve = json.loads((out / "eval" / "curve.json").read_text())
    assert [c["point"] for c in curve] == ["base", "round 1 step 1", "round 1 step 2", "round 2 step 1",
                                           "round 2 step 2"]
    assert curve[0]["kl"] == 0.0 and all("function" in c and "reward_model" in c for c in curve)


def test_rerun_skips_every_finished_stage(tiny_demo, tmp_path, forbid_stages):
    out = copy_run(tiny_demo[0], tmp_path)
    forbid_stages("run_generate", "run_annotate", "run_rm", "run_rl", "run_eval")
    summary, stdout = run_quiet(tiny_cfg(out))
    assert stdout.count("finished earlier") == 9
    assert summary["gold_score_after"] == tiny_demo[1]["gold_score_after"]
    assert (out / "report.html").is_file()


def test_resume_after_a_crash_in_the_middle_of_rl(tiny_demo, tmp_path, forbid_stages, monkeypatch):
    out = copy_run(tiny_demo[0], tmp_path)
    # the state a crash leaves after round 2's first PPO checkpoint: no DONE, no final model, no later checkpoint
    rl = out / "round2" / "rl"
    for path in (rl / "DONE.json", out / "eval" / "DONE.json"):
        path.unlink()
    shutil.rmtree(rl / "model")
    shutil.rmtree(rl / "checkpoints" / "step-0000002")
    forbid_stages("run_generate", "run_annotate", "run_rm")
    from rlhfkit.trainers import ppo

    calls = []
    real = ppo.main
    monkeypatch.setattr(ppo, "main", lambda cfg, argv=None: calls.append(cfg.run.resume) or real(cfg, argv))
    summary, stdout = run_quiet(tiny_cfg(out))
    assert calls == [True]  # round 2 continued from its checkpoint; round 1 was skipped
    assert "round 2: ppo (resuming)" in stdout
    steps = [json.loads(x)["step"] for x in (rl / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (rl / "model" / "config.json").is_file() and (rl / "DONE.json").is_file()
    assert (out / "eval" / "DONE.json").is_file() and isinstance(summary["win_rate"], float)


def test_crash_then_rerun_and_config_change(tiny_demo, tmp_path, forbid_stages, monkeypatch):
    out = copy_run(tiny_demo[0], tmp_path)
    (out / "eval" / "DONE.json").unlink()
    from rlhfkit.trainers import evaluate

    def crash(cfg, argv=None):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(evaluate, "main", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_quiet(tiny_cfg(out))
    assert not (out / "eval" / "DONE.json").exists() and (out / "eval" / "STARTED.json").exists()
    forbid_stages("run_generate", "run_annotate", "run_rm", "run_rl")
    _, stdout = run_quiet(tiny_cfg(out))  # the crashed stage runs, the others are skipped
    assert (out / "eval" / "DONE.json").is_file() and stdout.count("finished earlier") == 8
    # a changed eval setting re-runs the eval only
    _, stdout = run_quiet(tiny_cfg(out, **{"eval.args": {"data.limit": 4, "num_samples": 1}}))
    assert "eval: its config or inputs changed" in stdout
    assert json.loads((out / "eval" / "eval.json").read_text())["prompts"] == 4


def test_shortcuts():
    cfg = demo.apply_shortcuts(load_config(demo.DemoConfig, None, {"method": "dpo", "human": True}))
    assert cfg.rl.method == "dpo" and cfg.rl.args == demo.DPO_ARGS
    assert cfg.annotate.source == "human" and cfg.generate.prompts_per_round == 32
    assert cfg.generate.num_samples == 2 and cfg.annotate.k == 1 and "happier" in cfg.annotate.instructions
    assert cfg.eval.judge == "rlhfkit.gold:sentiment"  # the gold still judges what people taught
    own = demo.apply_shortcuts(load_config(demo.DemoConfig, None, {"method": "dpo", "rl.args": {"train.steps": 3}}))
    assert own.rl.args == {"train.steps": 3}  # the user's own DPO args are kept
    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match="method: expected ppo, grpo, rloo or dpo"):
        load_config(demo.DemoConfig, None, {"method": "a2c"})
