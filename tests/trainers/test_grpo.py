"""GRPO trainer (rlhfkit grpo; also REINFORCE++ and the shared loop of rlhfkit rloo): tiny end-to-end runs on the
bundled stories260k with a programmatic reward, and the trainer's advantage/normaliser functions by hand.

Checks: metrics keys; the ratio is exactly 1 on the first minibatch of every update (PITFALLS 2); KL exactly 0 on
the first update; every parameter changed; the model reloads; advantages are computed within each prompt's group;
the on-policy shortcut (no old-log-prob pass) gives bit-identical training; bit-identical resume; REINFORCE++ with a
LoRA adapter-off reference; config keys match `rlhfkit ppo`; one-line errors.
The "reward rises" runs of every method are in test_grpo_slow.py (-m slow).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from spies import initial_parameters  # tests/trainers/spies.py

from rlhfkit import cli
from rlhfkit import distributed as D
from rlhfkit.config import field_docs, load_config
from rlhfkit.errors import UserError
from rlhfkit.trainers import grpo, ppo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "positive_reward.py"
REWARD = f"{FIXTURE}:positivity"
REQUIRED_KEYS = ["objective/score", "objective/kl", "objective/entropy", "objective/rlhf_reward", "loss/policy",
                 "loss/kl", "policy/clipfrac", "policy/approx_kl", "policy/ratio_first_min", "policy/ratio_first_max",
                 "groups/score_std", "groups/zero_std_share", "time/rollout", "time/update", "time/tokens_per_s",
                 "time/samples_per_s"]
TINY = {"train.rollout_batch_size": "8", "train.num_generations": "4", "train.micro_batch_size": "2",
        "gen.max_new_tokens": "10", "train.sample_every": "1", "reward.normalize_samples": "8",
        "run.progress": "false", "optim.lr": "1e-3", "run.threads": "1"}
MULTI = {"train.update_epochs": "2", "train.num_minibatches": "2"}  # 4 optimizer steps per rollout
# One thread: on a shared 2-core machine, 2 OpenMP threads make these tiny ops wait on each other (10x slower).


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny_cfg(out: Path, cls=grpo.GRPOConfig, **overrides):
    return load_config(cls, None, {"reward.function": REWARD, "run.output_dir": str(out), "train.steps": "2",
                                   **TINY, **overrides})


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def strip_time(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("time/")}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """GRPO (KL in the loss), 2 epochs x 2 minibatches per rollout, initial and final parameters captured."""
    out = tmp_path_factory.mktemp("grpo")
    with initial_parameters() as captured:
        result = grpo.main(tiny_cfg(out, **MULTI), ["rlhfkit", "grpo"])
    return out, result, captured


def test_metrics_exact_first_ratio_and_kl(tiny_run):
    out, result, _ = tiny_run
    lines = rows(out)
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        for key in REQUIRED_KEYS:
            assert key in r and isinstance(r[key], float), key
        # old log-probs come from the training forward itself: the ratio is exactly 1 before the first step
        assert r["policy/ratio_first_min"] == 1.0 and r["policy/ratio_first_max"] == 1.0
        assert r["policy/minibatches"] == 4.0 and r["rollout/logprob_diff_max"] < 1e-4
        assert 0 <= r["objective/score"] <= 1 and r["loss/kl"] >= 0
    # policy == reference at first (the frozen reference runs through rl.frozen_decoder: equal to float rounding)
    assert abs(lines[0]["objective/kl"]) < 1e-4
    assert abs(lines[1]["objective/kl"]) > 1e-3 and lines[1]["loss/kl"] > 0
    assert lines[0]["policy/approx_kl"] > 0  # later minibatches of an update are off-policy
    assert result["step"] == 2 and (out / "config.yaml").is_file() and (out / "command.txt").is_file()
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}
    assert len({s["prompt"] for s in samples if s["step"] == 1}) == 1  # the first rows are one prompt's group


def test_every_parameter_changed_and_model_reloads(tiny_run):
    out, _, captured = tiny_run
    named = dict(captured["named"])
    assert not [n for n, before in captured["before"].items() if torch.equal(before, named[n].detach())]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, named[name].detach()), name


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_advantages_are_computed_within_each_prompts_group(tmp_path, monkeypatch, jsonl, advantage):
    """Rows [kG, (k+1)G) hold one prompt's G completions, and each row's advantage uses only its group's scores."""
    prompts_file = jsonl([{"prompt": p} for p in ("Once upon a time", "Lily had a", "The dog", "Tom and Sue",
                                                  "One day, the sun")])
    reward = tmp_path / "length.py"
    reward.write_text("def chars(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    seen = {}
    real_rollout, real_adv = D.generate_rollout, grpo.sequence_advantages

    def rollout_spy(*args, **kwargs):
        batch = real_rollout(*args, **kwargs)
        seen.setdefault("prompts", []).append(list(batch.prompts))
        return batch

    def adv_spy(cfg, scores):
        out = real_adv(cfg, scores)
        seen.setdefault("scores", []).append(scores.clone())
        seen.setdefault("adv", []).append(out.clone())
        return out

    monkeypatch.setattr(D, "generate_rollout", rollout_spy)
    monkeypatch.setattr(grpo, "sequence_advantages", adv_spy)
    G = 4
    grpo.main(tiny_cfg(tmp_path, **{"reward.function": f"{reward}:chars", "advantage": advantage,
                                    "data.prompts": str(prompts_file),
                                    "reward.normalize": "none", "gen.max_new_tokens": "24",
                                    "train.rollout_batch_size": "12", "train.steps": "1", "train.sample_every": "0"}))
    prompts, scores, adv = seen["prompts"][-1], seen["scores"][0].tolist(), seen["adv"][0].tolist()
    groups = [prompts[k: k + G] for k in range(0, 12, G)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3
    assert len(set(scores)) > 3  # completions of one prompt differ (else the check below is vacuous)
    for k in range(3):
        r = scores[k * G: (k + 1) * G]
        mean = sum(r) / G
        for i in range(G):
            if advantage == "rloo":  # r_i - mean of the other G - 1
                expected = r[i] - (sum(r) - r[i]) / (G - 1)
            else:  # (r_i - mean) / (unbiased std + 1e-4)
                std = (sum((x - mean) ** 2 for x in r) / (G - 1)) ** 0.5
                expected = (r[i] - mean) / (std + 1e-4)
            assert adv[k * G + i] == pytest.approx(expected, rel=1e-5, abs=1e-5), (k, i)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_on_policy_step_without_old_pass_is_identical(tmp_path, monkeypatch, method):
    """1 epoch x 1 minibatch: old log-probs and (rloo, KL in the reward) per-token advantages come from the training
    forward itself; forcing the separate no-grad pass must give the same metrics and bit-identical weights."""
    cls = grpo.RLOOConfig if method == "rloo" else grpo.GRPOConfig
    assert not grpo.needs_old_pass(tiny_cfg(tmp_path / "x", cls))
    grpo.main(tiny_cfg(tmp_path / "fast", cls), [])
    monkeypatch.setattr(grpo, "needs_old_pass", lambda cfg: True)
    grpo.main(tiny_cfg(tmp_path / "pass", cls), [])
    fast, slow = rows(tmp_path / "fast"), rows(tmp_path / "pass")
    assert [strip_time(r) for r in fast] == [strip_time(r) for r in slow]
    assert fast[1]["objective/kl"] != 0 and fast[0]["policy/approx_kl"] == 0.0
    a, b = weights(tmp_path / "fast" / "model"), weights(tmp_path / "pass" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_identical(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    grpo.main(tiny_cfg(straight, **MULTI, **{"train.steps": "3"}), [])
    grpo.main(tiny_cfg(split, **MULTI, **{"train.steps": "3", "run.stop_after_steps": "2"}), [])
    assert not (split / "model").exists() and (split / "checkpoints").is_dir()
    grpo.main(tiny_cfg(split, **MULTI, **{"train.steps": "3", "run.resume": "true"}), [])
    assert [strip_time(r) for r in rows(split)] == [strip_time(r) for r in rows(straight)]
    a, b = weights(straight / "model"), weights(split / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_sharing_keeps_first_ratio_and_first_kl_exact(tmp_path, monkeypatch):
    """micro_batch_size = G: every micro-batch holds whole groups, so the reference, old and training passes run each
    prompt once (rl.shared_prompt_logprobs) and minibatches are drawn as whole groups; a row's numbers still do not
    depend on which groups share its forward: first ratio exactly 1, first KL 0 (to float rounding: the frozen
    reference runs through rl.frozen_decoder, itself sharing prompts), groups kept whole."""
    from rlhfkit import rl as R

    calls, minibatches = [], []
    shared = R.shared_prompt_logprobs
    monkeypatch.setattr(R, "shared_prompt_logprobs", lambda m, b, *a, **k: calls.append(len(b)) or
                        shared(m, b, *a, **k))
    train = grpo.train_minibatch
    monkeypatch.setattr(grpo, "train_minibatch", lambda cfg, batch, mb, *a, **k: minibatches.append(mb) or
                        train(cfg, batch, mb, *a, **k))
    from rlhfkit.rollout import FastDecoder

    ref_groups = []
    score = FastDecoder.completion_logprobs
    monkeypatch.setattr(FastDecoder, "completion_logprobs", lambda self, *a, **k: ref_groups.append(a[-1]) or
                        score(self, *a, **k))
    out = tmp_path / "shared"
    cfg = tiny_cfg(out, **MULTI, **{"train.micro_batch_size": "4"})
    assert R.prompt_group(4, D.World(), rows=(8, 4, 4)) == 4 and R.prompt_group(4, D.World(), rows=(8, 4, 2)) == 0
    grpo.main(cfg, [])
    lines = rows(out)
    assert calls and set(calls) == {4}  # every pass of every micro-batch went through the shared forward
    assert ref_groups and set(ref_groups) == {4}  # the frozen reference too (rl.frozen_decoder)
    assert all(sorted(i // 4 for i in mb) == [mb[0] // 4] * 4 for mb in minibatches)  # one whole group each
    assert abs(lines[0]["objective/kl"]) < 1e-4 and abs(lines[1]["objective/kl"]) > 1e-3
    for r in lines:
        assert r["policy/ratio_first_min"] == 1.0 == r["policy/ratio_first_max"]
        assert r["rollout/logprob_diff_max"] < 1e-4


def test_reinforce_pp_with_lora_adapter_off_reference(tmp_path):
    """REINFORCE++: one completion per prompt, KL in the reward, advantages whitened over the batch."""
    out = tmp_path / "rpp"
    cfg = tiny_cfg(out, **{"advantage": "reinforce_pp", "kl_mode": "reward", "train.num_generations": "1",
                           "model.lora_r": "4", "model.lora_alpha": "16", "optim.lr": "5e-3"})
    assert grpo.needs_old_pass(cfg)
    grpo.main(cfg, [])
    lines = rows(out)
    assert "groups/score_std" not in lines[0]
    assert lines[0]["objective/kl"] == 0.0 and lines[1]["objective/kl"] != 0.0  # adapter B starts at 0
    for r in lines:
        assert r["policy/ratio_first_min"] == 1.0 == r["policy/ratio_first_max"]
        assert abs(r["advantages/mean"]) < 1e-5  # whitened (shifted) over every real token of the batch
    assert len({s["prompt"] for s in map(json.loads, (out / "samples.jsonl").read_text().splitlines())
                if s["step"] == 1}) > 1  # G = 1: every row its own prompt
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "model" / "config.json").is_file()


def test_reinforce_pp_baseline_centres_groups_then_whitens_the_batch(tmp_path, monkeypatch):
    """REINFORCE++-baseline: the group mean leaves each score, a group of equal scores gives no signal, and the
    per-token advantages are whitened over the batch (old-log-prob pass on)."""
    out, seen, real = tmp_path / "rppb", {}, grpo.sequence_advantages

    def spy(cfg, scores):
        seen["scores"], seen["adv"] = scores.clone(), real(cfg, scores)
        return seen["adv"]

    monkeypatch.setattr(grpo, "sequence_advantages", spy)
    cfg = tiny_cfg(out, **{"advantage": "reinforce_pp_baseline", "kl_mode": "reward", "train.steps": "1"})
    assert grpo.needs_old_pass(cfg)
    grpo.main(cfg, [])
    groups = seen["scores"].view(-1, 4)
    torch.testing.assert_close(seen["adv"].view(-1, 4), groups - groups.mean(-1, keepdim=True))
    line = rows(out)[0]
    assert abs(line["advantages/mean"]) < 1e-5 and line["policy/ratio_first_min"] == 1.0
    with pytest.raises(UserError, match="needs a group of >= 2"):
        tiny_cfg(tmp_path / "g1", **{"advantage": "reinforce_pp_baseline", "train.num_generations": "1"})


# ---------------------------------------------------------------- trainer functions by hand


def test_token_advantages_by_hand():
    # seq_adv 1, k1 KL per token [.1, .2, .3] + one pad, β = .5: rewards [-.05, -.1, -.15 + 1]
    # γ = 1 returns-to-go: t2 .85, t1 .75, t0 .70;  γ = .5: t1 = -.1 + .5·.85 = .325, t0 = -.05 + .5·.325 = .1125
    ref = torch.tensor([[-1.0, -1.0, -1.0, 0.0]])
    lp = ref + torch.tensor([[0.1, 0.2, 0.3, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    kw = {"seq_adv": torch.tensor([1.0]), "logprobs": lp, "ref_logprobs": ref, "mask": mask, "kl_coef": 0.5}
    cfg = grpo.GRPOConfig(kl_mode="reward")
    torch.testing.assert_close(grpo.token_advantages(cfg, **kw), torch.tensor([[0.70, 0.75, 0.85, 0.0]]))
    cfg.gamma = 0.5
    torch.testing.assert_close(grpo.token_advantages(cfg, **kw), torch.tensor([[0.1125, 0.325, 0.85, 0.0]]))
    # KL in the loss: the sequence advantage on every real token (γ = 1), or discounted from the end (γ = .5)
    torch.testing.assert_close(grpo.token_advantages(grpo.GRPOConfig(), **kw), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(grpo.token_advantages(grpo.GRPOConfig(gamma=0.5), **kw),
                               torch.tensor([[0.25, 0.5, 1.0, 0.0]]))


def test_loss_normalizer_dr_grpo_constant_and_token_mean():
    from rlhfkit.core import aggregate

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])  # 4 real tokens in 2 sequences
    loss = torch.ones(2, 4)
    cfg = grpo.GRPOConfig()
    cfg.gen.max_new_tokens = 4
    assert grpo.loss_normalizer(cfg, mask) == ("token-mean", 4.0)
    for mode, expected_norm, expected_loss in [("constant", 8.0, 4 / 8), ("seq-mean-token-mean", 2.0, 1.0),
                                               ("seq-mean-token-sum", 2.0, 4 / 2)]:
        cfg.loss_aggregation = mode
        core_mode, norm = grpo.loss_normalizer(cfg, mask)
        assert norm == expected_norm  # constant: Σ tokens / (2 sequences x 4 = max_new_tokens)
        assert aggregate(loss, mask, core_mode, norm).item() == pytest.approx(expected_loss)


def test_sequence_advantages_modes():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    cfg = grpo.GRPOConfig(train=grpo.GRPOTrainConfig(num_generations=4))
    torch.testing.assert_close(grpo.sequence_advantages(cfg, r), torch.tensor([0.86588, -0.86588, -0.86588, 0.86588]))
    cfg.scale_rewards = False  # Dr. GRPO: r - mean
    torch.testing.assert_close(grpo.sequence_advantages(cfg, r), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    cfg.advantage = "rloo"
    torch.testing.assert_close(grpo.sequence_advantages(cfg, r), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    cfg.advantage = "reinforce_pp"
    assert torch.equal(grpo.sequence_advantages(cfg, r), r)
    cfg.advantage = "reinforce_pp_baseline"  # group mean subtracted (then whitened over the batch in the trainer)
    r8 = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 1.0, 3.0])
    torch.testing.assert_close(grpo.sequence_advantages(cfg, r8), torch.tensor([0.5, -0.5, -0.5, 0.5, 1, -1, -1, 1.]))


# ---------------------------------------------------------------- config and command line


def keys(cls) -> set[str]:
    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            val = getattr(obj, f.name)
            yield from walk(val, prefix + f.name + ".") if dataclasses.is_dataclass(val) else [prefix + f.name]
    return set(walk(cls(), ""))


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_clip_coef_high_reaches_the_policy_loss(tmp_path, monkeypatch, method):
    """DAPO's clip-higher: clip_coef_high > 0 is the upper clip bound of every policy-loss call (0: clip_coef)."""
    from rlhfkit import core

    seen, real = [], core.ppo_policy_loss

    def spy(**kwargs):
        seen.append((kwargs["clip_coef"], kwargs.get("clip_coef_high")))
        return real(**kwargs)

    monkeypatch.setattr(core, "ppo_policy_loss", spy)
    trainer, cls = (grpo, grpo.GRPOConfig) if method == "grpo" else (ppo, ppo.PPOConfig)
    keys = {"reward.function": REWARD, "train.steps": "1", **TINY, **MULTI}
    if method == "ppo":
        del keys["train.num_generations"]
    for high, expected in (("0.28", 0.28), ("0", None)):
        seen.clear()
        trainer.main(load_config(cls, None, {**keys, "run.output_dir": str(tmp_path / high), "clip_coef_high": high}))
        assert seen and set(seen) == {(0.2, expected)}
    with pytest.raises(UserError, match="clip_coef_high"):
        load_config(cls, None, {**keys, "clip_coef_high": "-0.1"})


def test_same_keys_as_ppo_plus_num_generations():
    value_model_keys = {"gae_lambda", "vf_coef", "value_clip_coef", "value_model", "whiten_rewards"}
    assert keys(ppo.PPOConfig) - value_model_keys <= keys(grpo.GRPOConfig)
    assert keys(grpo.GRPOConfig) == keys(grpo.RLOOConfig) and "train.num_generations" in keys(grpo.GRPOConfig)
    for cls in (grpo.GRPOConfig, grpo.GRPOTrainConfig):
        plain = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(getattr(cls(), f.name))}
        assert set(field_docs(cls)) >= plain  # every key documented
    rloo = grpo.RLOOConfig()
    assert (rloo.advantage, rloo.kl_mode, rloo.run.output_dir) == ("rloo", "reward", "runs/rloo")
    assert (grpo.GRPOConfig().advantage, grpo.GRPOConfig().kl_mode) == ("grpo", "loss")


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return exc.value.code, [line for line in err if line.startswith("error:")]


def test_commands_and_bad_inputs(tmp_path, capsys):
    base = [f"reward.function={REWARD}", "train.steps=1", "reward.normalize=none"] + [f"{k}={v}" for k, v in TINY.items()]
    result = cli.run_command(["grpo", *base, f"run.output_dir={tmp_path / 'dr'}", "scale_rewards=false",
                              "loss_aggregation=constant"])  # Dr. GRPO
    assert result["step"] == 1 and "model_dir" in result and len(rows(tmp_path / "dr")) == 1
    result = cli.run_command(["rloo", *base, f"run.output_dir={tmp_path / 'rloo'}"])
    assert result["step"] == 1 and "advantage: rloo" in (tmp_path / "rloo" / "config.yaml").read_text()
    for bad, message in [(["train.rollout_batch_size=6"], "train.rollout_batch_size: 6 is not a multiple of "
                                                           "train.num_generations=4"),
                         (["train.num_generations=1"], "needs a group of >= 2"),
                         (["advantage=rloo", "scale_rewards=false"], "only for advantage=grpo"),
                         (["gen.temperature=0"], "needs sampling")]:
        code, errors = run_cli(capsys, "grpo", *base, f"run.output_dir={tmp_path / 'bad'}", *bad)
        assert code == 2 and len(errors) == 1 and message in errors[0], (bad, errors)
    with pytest.raises(UserError, match="num_generations"):
        tiny_cfg(tmp_path, **{"train.num_generations": "3"})


@pytest.mark.parametrize(("G", "minibatches", "micro", "expected"),
                         [(8, 1, 16, 64), (4, 1, 16, 64), (3, 1, 16, 48), (6, 1, 16, 48), (5, 1, 16, 80),
                          (7, 1, 16, 112), (3, 2, 4, 72), (64, 1, 16, 64)])
def test_auto_rollout_batch_size_fits_any_group_size(G, minibatches, micro, expected):
    """train.rollout_batch_size=0 (the default): whole groups in whole micro-batches of every minibatch, nearest
    to 64, so `rlhfkit grpo train.num_generations=6` works without other keys."""
    cfg = load_config(grpo.GRPOConfig, None, {"reward.function": REWARD, "train.num_generations": str(G),
                                              "train.num_minibatches": str(minibatches),
                                              "train.micro_batch_size": str(micro)})
    B = cfg.train.rollout_batch_size
    assert B == expected
    assert B % G == 0 and (B // minibatches) % micro == 0


def test_auto_batch_runs_with_a_group_of_three(tmp_path):
    overrides = {k: v for k, v in TINY.items() if k != "train.rollout_batch_size"}
    cfg = load_config(grpo.GRPOConfig, None, {"reward.function": REWARD, "run.output_dir": str(tmp_path),
                                              "train.steps": "1", **overrides, "train.num_generations": "3"})
    assert cfg.train.rollout_batch_size == 66  # lcm(3, 2) = 6, x 11 ~ 64
    grpo.main(cfg)
    (row,) = rows(tmp_path)
    assert row["step"] == 1 and "rollout_batch_size: 66" in (tmp_path / "config.yaml").read_text()
