"""PPO trainer (rlhfkit ppo): tiny end-to-end runs on the bundled stories260k with a programmatic reward.

Checks: metrics keys per update; the PPO ratio is exactly 1 (min and max) on the first minibatch of every update
(PITFALLS 2); KL exactly 0 on the first update (policy == reference); every trainable parameter changed; the
saved model reloads; config.yaml written; bit-identical resume; the LoRA adapter-off reference; one-line errors.
The long "reward rises" run is in test_ppo_slow.py (-m slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from spies import initial_parameters  # tests/trainers/spies.py

from rlhfkit import cli
from rlhfkit.config import load_config
from rlhfkit.trainers import ppo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "positive_reward.py"
REWARD = f"{FIXTURE}:positivity"
REQUIRED_KEYS = ["objective/score", "objective/kl", "objective/entropy", "loss/policy", "loss/value",
                 "policy/clipfrac", "policy/approx_kl", "val/explained_var", "time/rollout", "time/update",
                 "time/tokens_per_s"]
TINY = {"train.rollout_batch_size": "8", "train.num_minibatches": "2", "train.micro_batch_size": "2",
        "train.update_epochs": "2", "gen.max_new_tokens": "10", "train.sample_every": "1",
        "reward.normalize_samples": "8", "run.progress": "false", "optim.lr": "1e-3", "run.threads": "1"}
# One thread: on a shared 2-core machine, 2 OpenMP threads make these tiny ops wait on each other (10x slower).


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny_cfg(out: Path, **overrides):
    return load_config(ppo.PPOConfig, None, {"reward.function": REWARD, "run.output_dir": str(out),
                                             "train.steps": "2", **TINY, **overrides})


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run, with the initial and final parameters of both trained models captured."""
    out = tmp_path_factory.mktemp("ppo")
    with initial_parameters() as captured:
        result = ppo.main(tiny_cfg(out), ["rlhfkit", "ppo"])
    return out, result, captured


def test_metrics_every_update_with_exact_first_ratio(tiny_run):
    out, result, _ = tiny_run
    lines = rows(out)
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        for key in REQUIRED_KEYS:
            assert key in r and isinstance(r[key], float), key
        # sampling/scoring and training agree: the ratio is exactly 1 before the first optimizer step
        assert r["policy/ratio_first_min"] == 1.0 and r["policy/ratio_first_max"] == 1.0
        assert r["rollout/logprob_diff_max"] < 1e-4  # the sampler's own log-probs agree too
        assert 0 <= r["objective/score"] <= 1 and r["time/rollout"] + r["time/update"] <= 1
    # policy == reference before any update (the frozen reference runs through rl.frozen_decoder: float rounding)
    assert abs(lines[0]["objective/kl"]) < 1e-4
    assert abs(lines[1]["objective/kl"]) > 1e-3
    assert result["step"] == 2 and (out / "config.yaml").is_file() and (out / "command.txt").is_file()
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and set(samples[0]) == {"step", "prompt", "completion", "score", "kl"}


def test_every_trainable_parameter_changed_and_model_reloads(tiny_run):
    out, _, captured = tiny_run
    named = dict(captured["named"])
    unchanged = [n for n, before in captured["before"].items() if torch.equal(before, named[n].detach())]
    assert not unchanged, unchanged[:5]
    assert any(n.startswith("value.") for n in named) and any(n.startswith("policy.") for n in named)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    trained = {n[len("policy."):]: p for n, p in named.items() if n.startswith("policy.")}
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, trained[name].detach()), name
    assert (out / "value_model" / "config.json").is_file()


def test_resume_is_bit_identical(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    ppo.main(tiny_cfg(straight, **{"train.steps": "3"}), [])
    ppo.main(tiny_cfg(split, **{"train.steps": "3", "run.stop_after_steps": "2"}), [])
    assert not (split / "model").exists() and (split / "checkpoints").is_dir()
    ppo.main(tiny_cfg(split, **{"train.steps": "3", "run.resume": "true"}), [])

    def strip(r):
        return {k: v for k, v in r.items() if not k.startswith("time/")}

    assert [strip(r) for r in rows(split)] == [strip(r) for r in rows(straight)]
    from safetensors.torch import load_file

    for sub in ("model", "value_model"):
        a, b = load_file(straight / sub / "model.safetensors"), load_file(split / sub / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_policy_with_adapter_off_reference(tmp_path):
    """Also runs the HF generate backend (gen.backend=hf) end to end."""
    out = tmp_path / "lora"
    cfg = tiny_cfg(out, **{"model.lora_r": "4", "model.lora_alpha": "16", "optim.lr": "5e-3", "gen.backend": "hf"})
    ppo.main(cfg, [])
    lines = rows(out)
    assert lines[0]["objective/kl"] == 0.0  # adapter B starts at 0: policy == base == reference
    assert lines[1]["objective/kl"] != 0.0
    assert all(r["policy/ratio_first_min"] == 1.0 == r["policy/ratio_first_max"] for r in lines)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # the adapter, and the merged model
    from transformers import AutoModelForCausalLM

    from rlhfkit import models as M
    from rlhfkit.config import ModelConfig

    merged = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    base = dict(M.load_causal_lm(ModelConfig(), torch.device("cpu")).named_parameters())
    changed = [n for n in base if not torch.equal(base[n], merged[n])]
    assert changed and all("proj" in n for n in changed)  # only adapted linear layers moved


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        cli.main(["ppo", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return exc.value.code, [line for line in err if line.startswith("error:")], err


def test_contract_command_and_bad_inputs(tmp_path, capsys, jsonl):
    prompts = jsonl([{"prompt": "Once upon a time"}, {"prompt": "Lily had a"}], name="prompts.jsonl")
    base = ["model.name=stories260k", f"data.prompts={prompts}", f"run.output_dir={tmp_path / 'cli'}",
            "train.steps=1"] + [f"{k}={v}" for k, v in TINY.items()] + ["reward.normalize=none"]
    result = cli.run_command(["ppo", f"reward.function={REWARD}", *base])
    assert result["step"] == 1 and len(rows(tmp_path / "cli")) == 1

    code, errors, _ = run_cli(capsys, f"reward.function={tmp_path}/missing.py:fn", *base)
    assert code == 2 and errors == [f"error: reward.function: file '{tmp_path}/missing.py' not found"]
    bad = tmp_path / "bad.py"
    bad.write_text("def short(p, c):\n    return [1.0]\n\ndef nan(p, c):\n    return [float('nan')] * len(c)\n\n"
                   "def huge(p, c):\n    return [1e30] * len(c)\n")
    code, errors, lines = run_cli(capsys, f"reward.function={bad}:short", *base)
    assert code == 2 and len(errors) == 1 and "returned 1 scores for 8 completions" in errors[0]
    assert not any("Traceback" in line for line in lines)
    code, errors, _ = run_cli(capsys, f"reward.function={bad}:nan", *base)
    assert code == 2 and "non-finite score (nan)" in errors[0]
    code, errors, _ = run_cli(capsys, "reward.function=x.py:f", "reward.model=dir", *base)
    assert code == 2 and "exactly one" in errors[0]
    # scores of 1e30 overflow the value loss (squared returns): a divergence, exit 1, one line
    code, errors, _ = run_cli(capsys, f"reward.function={bad}:huge", *base)
    assert code == 1 and errors[0].startswith("error: training diverged")


def test_value_model_on_the_reward_model_backbone(tmp_path, monkeypatch):
    """value_model=reward: the value model is a copy of the deep reward model's backbone with a zeroed head; a
    stand-in for rlhfkit.reward.load_reward_model (same interface: .score, plus .model and .tokenizer)."""
    import sys
    import types

    from rlhfkit import models as M
    from rlhfkit.config import ModelConfig
    from rlhfkit.heads import head_of, load_scalar_model

    rm_backbone = load_scalar_model(ModelConfig(), torch.device("cpu"), init="normal")
    rm_head = head_of(rm_backbone).weight.detach().clone()

    class StandIn:
        model, tokenizer = rm_backbone, M.load_tokenizer("stories260k")

        def score(self, prompts, completions):
            return [float(len(c.split())) for c in completions]

    monkeypatch.setitem(sys.modules, "rlhfkit.reward",
                        types.SimpleNamespace(load_reward_model=lambda path, device=None, key="": StandIn()))
    cfg = tiny_cfg(tmp_path, **{"reward.function": "", "reward.model": "rm-dir", "value_model": "reward",
                                "train.steps": "1"})
    value = ppo.load_value_model(cfg, torch.device("cpu"), StandIn.tokenizer)
    assert value is not rm_backbone and torch.count_nonzero(head_of(value).weight) == 0
    assert torch.equal(head_of(rm_backbone).weight, rm_head)  # the reward model itself is untouched
    ppo.main(cfg, [])
    assert rows(tmp_path)[0]["val/mean"] == 0.0 and rows(tmp_path)[0]["objective/score"] > 0
