"""The application recipes (recipes/*.yaml, docs/recipes.md): every YAML loads and its stage args pass the stage
commands' checks; the data preparation (rlhfkit.recipes.data, scripts/prepare_recipe_data.py) on hand-made inputs;
the bundled HH dialogue files; and tiny end-to-end translation pipelines on a hand-made Multi30k-like folder:
the prepare stage, ${run.output_dir} paths, RL on a chrF reward with no generate/annotate stages, and a simulated
crowd whose hidden chrF preference gets each prompt's reference. The full-size runs are in docs/recipes.md."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_config, to_dict
from rlhfkit.data import load_preferences, load_prompts, load_sft
from rlhfkit.errors import UserError
from rlhfkit.recipes import data as D
from rlhfkit.trainers import pipeline as P
from rlhfkit.trainers import pipeline_stages as S

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_there_are_recipes_for_the_three_applications():
    names = {p.stem for p in RECIPES}
    assert {"text_generation", "text_generation_hh_rm", "dialogue_hh", "translation_chrf", "translation_rm"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_every_stage_config_validates(path, tmp_path):
    cfg = load_config(P.PipelineConfig, path, {"run.output_dir": str(tmp_path / "run")})
    S.expand_output_dir(cfg)
    S.check_stage_args(cfg)  # builds and validates sft / generate / rm / rl / eval configs: wrong keys fail here
    assert cfg.run.output_dir == str(tmp_path / "run")
    assert "${" not in json.dumps(to_dict(cfg))
    text = path.read_text()
    assert text.startswith("# ") and "rlhfkit pipeline recipes/" + path.name in text  # says how to run it
    assert f"recipes/{path.name}" in (REPO / "docs" / "recipes.md").read_text()


def test_text_generation_recipe_is_the_demo():
    from rlhfkit.trainers.demo import DemoConfig

    recipe = to_dict(load_config(P.PipelineConfig, REPO / "recipes" / "text_generation.yaml"))
    demo = to_dict(DemoConfig())
    for key in ("method", "human", "open"):
        demo.pop(key)
    recipe["run"]["output_dir"] = demo["run"]["output_dir"]
    assert recipe == demo


def test_recipes_reading_shared_data_name_it():
    for path in RECIPES:
        if "../shared" in path.read_text().split("\nrun:")[1]:
            assert "Needs ../shared" in path.read_text(), path.name


# ----------------------------------------------------------------------------------------------------------------
# Data preparation

EN = ["A dog runs.", "A man sits.", "Two women walk.", "A child plays.", "A cat sleeps.", "A man runs."]
FR = ["Un chien court.", "Un homme est assis.", "Deux femmes marchent.", "Un enfant joue.", "Un chat dort.",
      "Un homme court."]


def fake_multi30k(folder: Path, n_train: int = 24) -> Path:
    """A Multi30k-shaped folder: {train,val}.{en,fr}.gz, line i of each language aligned."""
    folder.mkdir(parents=True, exist_ok=True)
    en, fr = (EN * 10)[:n_train], (FR * 10)[:n_train]
    for split, (e, f) in {"train": (en, fr), "val": (EN, FR)}.items():
        (folder / f"{split}.en.gz").write_bytes(gzip.compress(("\n".join(e) + "\n").encode(), mtime=0))
        (folder / f"{split}.fr.gz").write_bytes(gzip.compress(("\n".join(f) + "\n").encode(), mtime=0))
    return folder


def test_prepare_multi30k_writes_prompts_with_references(tmp_path):
    src = fake_multi30k(tmp_path / "m30k")
    res = D.prepare_multi30k(tmp_path / "out", source=str(src), rl_prompts=4, valid=3)
    assert res["counts"] == {"sft": 24, "rl": 4, "valid": 3}
    sft = load_sft(res["files"]["sft"])
    assert sft[0].prompt == "Translate to French: A dog runs.\nFrench:" and sft[0].completion == " Un chien court."
    rl = load_prompts(res["files"]["rl"])
    assert len(rl) == 4 and rl[1].extra == {"reference": "Un homme est assis."}
    assert [r.extra["reference"] for r in load_prompts(res["files"]["valid"])] == FR[:3]
    first = {k: Path(v).read_bytes() for k, v in res["files"].items()}
    D.prepare_multi30k(tmp_path / "out", source=str(src), rl_prompts=4, valid=3)
    assert first == {k: Path(v).read_bytes() for k, v in res["files"].items()}  # deterministic


def test_prepare_multi30k_without_the_data_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"train.en.gz not found: this recipe reads Multi30k \(research-only"):
        D.prepare_multi30k(tmp_path / "out", source=str(tmp_path / "nowhere"))


def test_translation_recipe_without_shared_data_exits_2_with_one_line(cli, tmp_path):
    proc = cli("pipeline", "recipes/translation_chrf.yaml", f"run.output_dir={tmp_path / 'run'}",
               f"prepare.args={{source: {tmp_path / 'nowhere'}, target: fr}}", "run.progress=false")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: prepare: ") and "research-only" in err[0], proc.stderr


def test_hh_messages_and_recent_turns():
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman\n\nHuman: How do I boil an egg?\n\nAssistant:"
    msgs = D._clean(D.hh_messages(prompt))
    assert msgs == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "How do I boil an egg?"}]
    # 8 + 6 + 22 = 36 characters in all: a limit of 30 keeps only the last user turn (whole turns, user first)
    assert D.keep_recent_turns(msgs, 36) == msgs
    assert D.keep_recent_turns(msgs, 30) == msgs[2:]
    assert D.keep_recent_turns(msgs, 10) == [{"role": "user", "content": "...an egg?"}]


def test_hh_layout_round_trips_through_the_default_chat_template():
    from rlhfkit.models import load_tokenizer, render_prompt

    tok = load_tokenizer("stories260k")
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant:"
    assert render_prompt(tok, D.hh_messages(prompt)) == prompt


def test_bundled_hh_dialogue_files():
    pairs = load_preferences("bundled:hh_dialogue_pairs.jsonl.gz")
    held_out = load_preferences("bundled:hh_dialogue_pairs_eval.jsonl.gz")
    sft = load_sft("bundled:hh_dialogue_sft.jsonl.gz")
    assert (len(pairs.pairs), len(held_out.pairs), len(sft)) == (1886, 462, 1886)
    key = lambda p: json.dumps(p.prompt)  # noqa: E731
    assert not {key(p) for p in pairs.pairs} & {key(p) for p in held_out.pairs}  # split by dialogue
    assert all(isinstance(p.prompt, list) and p.prompt[0]["role"] == "user" and p.prompt[-1]["role"] == "user"
               for p in pairs.pairs + held_out.pairs)
    assert all(sum(len(m["content"]) for m in p.prompt) <= 700 for p in pairs.pairs)
    assert sum(len(p.prompt) > 1 for p in pairs.pairs) > 900  # multi-turn contexts are kept
    assert [s.completion[0]["content"] for s in sft[:5]] == [p.chosen for p in pairs.pairs[:5]]
    readme = (REPO / "rlhfkit" / "assets" / "data" / "README.md").read_text()
    for name in ("hh_dialogue_pairs.jsonl.gz", "hh_dialogue_pairs_eval.jsonl.gz", "hh_dialogue_sft.jsonl.gz"):
        assert name in readme


# ----------------------------------------------------------------------------------------------------------------
# Tiny translation pipelines (hand-made data; a few seconds each)

TINY_MT = {
    "run.progress": False, "gen.max_new_tokens": 8, "rl.checkpoints": 2,
    "sft.args": {"data.train": "${run.output_dir}/data/mt_sft_train.jsonl", "data.eval_fraction": 0.0,
                 "train.steps": 2, "train.batch_size": 4, "train.micro_batch_size": 4},
    "rl.args": {"train.steps": 2, "train.rollout_batch_size": 8, "train.num_minibatches": 2,
                "train.micro_batch_size": 4, "train.update_epochs": 1, "reward.normalize_samples": 8},
    "eval.args": {"num_samples": 1, "gen.temperature": 0}}


def run_recipe(name: str, out: Path, src: Path, **more) -> tuple[dict, str]:
    cfg = load_config(P.PipelineConfig, REPO / "recipes" / name, {
        **TINY_MT, "run.output_dir": str(out), "prepare.args": {"source": str(src), "target": "fr"}, **more})
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            summary = P.main(cfg, ["rlhfkit", "pipeline"])
    finally:
        torch.set_num_threads(threads)
    return summary, buf.getvalue()


def test_tiny_translation_chrf_pipeline(tmp_path):
    src = fake_multi30k(tmp_path / "m30k")
    out = tmp_path / "run"
    summary, _ = run_recipe("translation_chrf.yaml", out, src, **{"eval.curve_prompts": 0})
    # RL on a reward function: no generate / annotate / rm stages
    assert list(summary["stage_seconds"]) == ["prepare", "sft", "round 1: rloo", "eval"]
    assert (out / "data" / "mt_valid.jsonl").is_file() and (out / "sft" / "model" / "config.json").is_file()
    for key in ("chrf_before", "chrf_after", "bleu_before", "bleu_after", "gold_score_before", "gold_score_after"):
        assert isinstance(summary[key], float) and 0 <= summary[key] <= 100, key
    rl_cfg = (out / "round1" / "rl" / "config.yaml").read_text()
    assert f"prompts: {out}/data/mt_rl_prompts.jsonl" in rl_cfg and "function: rlhfkit.rewards.mt:chrf" in rl_cfg
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert ev["prompts"] == 6 and ev["judges"]["function"] == "rlhfkit.rewards.mt:chrf"
    # a re-run skips every stage, the prepare stage included
    summary2, stdout = run_recipe("translation_chrf.yaml", out, src, **{"eval.curve_prompts": 0})
    assert stdout.count("finished earlier") == 4 and summary2["chrf_after"] == summary["chrf_after"]
    # changed data (a prepare argument) re-runs everything after it
    _, stdout = run_recipe("translation_chrf.yaml", out, fake_multi30k(tmp_path / "m30k_b", n_train=12),
                           **{"eval.curve_prompts": 0})
    assert "finished earlier" not in stdout


def test_tiny_translation_rm_pipeline_simulated_crowd_sees_the_reference(tmp_path):
    src = fake_multi30k(tmp_path / "m30k")
    out = tmp_path / "run"
    summary, stdout = run_recipe("translation_rm.yaml", out, src, **{
        "generate.prompts_per_round": 6, "generate.num_samples": 3, "eval.curve_prompts": 3,
        "annotate.temperature": 0.01,  # near noise-free, so the labels must follow chrF against the reference
        "rm.args": {"model.kind": "linear", "model.features": "handcrafted", "train.cache_dir": "none",
                    "data.eval_fraction": 0.3}})
    assert list(summary["stage_seconds"]) == ["prepare", "sft", "round 1: generate", "round 1: annotate (simulate)",
                                              "round 1: rm", "round 1: ppo", "eval"]
    cands = [json.loads(x) for x in (out / "round1" / "generate" / "candidates.jsonl").read_text().splitlines()]
    assert all("reference" in c for c in cands)
    # labels follow chrF against the reference (it would raise without one): with almost no noise the crowd agrees
    # with the noise-free chrF order, and the gold check on held-out pairs ran with references too
    done = json.loads((out / "round1" / "annotate" / "DONE.json").read_text())["result"]
    assert done["simulation"]["agreement_with_noise_free"] >= 0.9
    assert "rm_gold_accuracy" in summary and "chrf_before" in summary
    assert "simulate.preference" not in stdout
