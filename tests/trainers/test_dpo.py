"""DPO trainer: log 2 at step 0 through the trainer's forward, padded batches score like single sequences,
precomputed = on-the-fly reference, LoRA adapter-off reference = base model, accumulation = full batch, exact
resume, ties skipped, held-out preference accuracy improves on bundled pairs, CLI errors exit 2."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import models as M
from rlhfkit import train_utils as U
from rlhfkit.config import load_config
from rlhfkit.data import load_preferences
from rlhfkit.errors import UserError
from rlhfkit.trainers.dpo import (DPOConfig, Reference, main, make_batch, packing_works, pair_logps,
                                  pair_loss, tokenize_pairs)

TRAIN = "bundled:tinystories_fluency_pairs.jsonl.gz"
EVAL = "bundled:tinystories_fluency_pairs_eval.jsonl.gz"
BASE = [f"data.train={TRAIN}", "data.eval_fraction=0", "train.batch_size=8", "train.micro_batch_size=8",
        "run.progress=false", "run.log_every=1", "optim.warmup_steps=0", "optim.lr=1e-3", "run.threads=1"]
LOG2 = math.log(2)  # -log σ(0): policy log-ratio equals the reference's


def dpo(out, *overrides):
    cfg = load_config(DPOConfig, None, BASE + [f"run.output_dir={out}", *overrides])
    return cfg, main(cfg, [])


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok():
    return M.load_tokenizer("stories260k")


@pytest.fixture(scope="module")
def pairs(tok):
    data, _ = tokenize_pairs(load_preferences(TRAIN).pairs[:6], tok, 512)
    return data


def fresh(cfg_overrides=()):
    cfg = load_config(DPOConfig, None, [f"data.train={TRAIN}", *cfg_overrides])
    return cfg, M.apply_lora(M.load_causal_lm(cfg.model, torch.device("cpu")), cfg.model)


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", LOG2), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_first_step_loss_is_log2_when_policy_equals_reference(tmp_path, loss_type, expected):
    # step 1 logs the loss of the forward before the first update: policy == reference, h = 0, so
    # sigmoid: -log σ(0) = log 2 = 0.693147; ipo: (0 - 1/(2β))^2 = (1/0.2)^2 = 25; every implicit reward is 0
    _, result = dpo(tmp_path, "train.steps=1", f"train.loss_type={loss_type}")
    first = rows(tmp_path)[0]
    assert first["loss/train"] == pytest.approx(expected, abs=1e-5)
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["rewards/accuracies"] == 0
    assert first["logps/chosen"] > first["logps/rejected"]  # the pretrained model already prefers fluent text
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("packed", [False, True])
def test_batched_logps_equal_each_sequence_alone(tiny_gpt2_dir, packed):
    # Left padding must not shift positions (PITFALLS 1): GPT-2's learned position embeddings would change the
    # logits, Llama's RoPE (relative) would not - check both. Packed rows [prompt, chosen, rejected] must give each
    # completion exactly the context prompt + itself. The reference computation is the naive log_softmax over one
    # unpadded prompt + completion at a time.
    for name in ("stories260k", str(tiny_gpt2_dir)):
        cfg = load_config(DPOConfig, None, [f"data.train={TRAIN}", f"model.name={name}"])
        model, tk = M.load_causal_lm(cfg.model, torch.device("cpu")), M.load_tokenizer(name)
        data, _ = tokenize_pairs(load_preferences(TRAIN).pairs[:4], tk, 512)
        data[1] = (data[1][0][:3], data[1][1], data[1][2][:2])  # uneven prompt and completion lengths
        with torch.no_grad():
            chosen, rejected = pair_logps(model, make_batch(data, tk.pad_token_id, packed), average=False)
            alone = {1: [], 2: []}
            for side in (1, 2):
                for pair in data:
                    ids = torch.tensor([pair[0] + pair[side]])
                    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)  # (L-1, V)
                    token_logps = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(pair[0]) - 1:]  # completion
                    alone[side].append(token_logps.sum())
            averaged = pair_logps(model, make_batch(data, tk.pad_token_id, packed), average=True)
        torch.testing.assert_close(chosen, torch.stack(alone[1]), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(rejected, torch.stack(alone[2]), rtol=1e-5, atol=1e-4)
        lengths = torch.tensor([[len(c), len(r)] for _, c, r in data], dtype=torch.float32)
        torch.testing.assert_close(averaged[1], rejected / lengths[:, 1])  # IPO: mean over completion tokens


def test_packing_check_rejects_a_model_that_ignores_the_attention_mask(pairs):
    cfg, model = fresh()
    assert packing_works(model, pairs[:4], 0, "cpu")

    class DropsMask(torch.nn.Module):  # e.g. remote code that ignores custom 4D masks
        def __init__(self):
            super().__init__()
            self.inner = model

        def get_input_embeddings(self):
            return model.get_input_embeddings()

        def forward(self, input_ids, attention_mask, position_ids, **kwargs):
            mask = attention_mask if attention_mask.dim() == 2 else None
            return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)

    assert not packing_works(DropsMask(), pairs[:4], 0, "cpu")


def test_trainer_forward_gives_log2_for_separate_reference_and_lora(pairs):
    for packed in (False, True):
        cfg, policy = fresh()
        batcher = functools.partial(make_batch, pad_id=0, packed=packed)
        ref = Reference(M.load_causal_lm(cfg.model, torch.device("cpu")), False, False)
        loss, stats = pair_loss(policy, ref, "train", [0, 1, 2, 3], pairs, batcher, cfg.train)
        assert loss.item() == pytest.approx(LOG2, abs=1e-6) and stats["rewards/margins"].item() == 0
        # LoRA: B is initialised to zero, so the adapted policy equals its adapter-off reference at the start
        cfg, lora = fresh(["model.lora_r=4"])
        loss, _ = pair_loss(lora, Reference(lora, True, False), "train", [0, 1, 2, 3], pairs, batcher, cfg.train)
        assert loss.item() == pytest.approx(LOG2, abs=1e-6)


def test_lora_adapter_off_reference_equals_base_model(pairs):
    cfg, lora = fresh(["model.lora_r=4"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: the policy now differs from the base
    base = M.load_causal_lm(cfg.model, torch.device("cpu"))
    batch = make_batch(pairs, 0, packed=True)
    with torch.no_grad():
        base_logps = torch.stack(pair_logps(base, batch, average=False), dim=1)  # (n, 2)
        policy_logps = torch.stack(pair_logps(lora, batch, average=False), dim=1)
    ref_logps = Reference(lora, True, False).score(batch)
    torch.testing.assert_close(ref_logps, base_logps, rtol=0, atol=1e-5)
    assert (policy_logps - base_logps).abs().max() > 1e-2  # the adapter is back on after the reference pass


@pytest.mark.parametrize("variant", ["train.precompute_ref_logprobs=true", "train.share_prompt=false"])
def test_precomputed_reference_and_two_row_layout_give_the_same_losses(tmp_path, variant):
    _, a = dpo(tmp_path / "live", "train.steps=3")
    _, b = dpo(tmp_path / "table", "train.steps=3", variant)
    for ra, rb in zip(rows(tmp_path / "live"), rows(tmp_path / "table")):
        # not rewards/accuracies: at step 1 the rewards are exactly 0 live but ±1e-7 from the table (its batches
        # are padded differently), and the strict r_chosen > r_rejected flips on such float noise
        for key in ("loss/train", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-5), key
    assert rows(tmp_path / "live")[-1]["loss/train"] < LOG2  # it trained


def test_gradient_accumulation_equals_full_batch(tmp_path):
    dpo(tmp_path / "full", "train.steps=2", "train.batch_size=8", "train.micro_batch_size=8")
    dpo(tmp_path / "accum", "train.steps=2", "train.batch_size=8", "train.micro_batch_size=2")
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "accum" / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6)  # float summation order differs only
    la, lb = rows(tmp_path / "full")[1]["loss/train"], rows(tmp_path / "accum")[1]["loss/train"]
    assert la == pytest.approx(lb, abs=1e-5)


@pytest.mark.parametrize("extra", ["train.share_prompt=true", "model.lora_r=4"])
def test_resume_is_bit_identical(tmp_path, extra):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ["train.steps=4", "train.batch_size=4", "train.micro_batch_size=2", extra]
    dpo(straight, *args)
    dpo(stopped, *args, "run.stop_after_steps=2")
    assert not (stopped / "model").exists() and U.latest_checkpoint(stopped).name == "step-0000002"
    dpo(stopped, *args, "run.resume=true")
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(stopped / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in rows(stopped)] == [1, 2, 3, 4]
    assert [r["loss/train"] for r in rows(stopped)] == [r["loss/train"] for r in rows(straight)]


def test_dpo_improves_held_out_preference_accuracy(tmp_path):
    # fluency pairs: chosen = a story's next 12 words, rejected = the same words shuffled. At step 0 every implicit
    # reward is 0 (accuracy 0 by the strict >); chance for a random direction is 0.5.
    _, result = dpo(tmp_path, f"data.eval={EVAL}", "train.steps=8", "train.batch_size=16",
                    "train.micro_batch_size=16", "train.eval_batch_size=100", "optim.lr=2e-3", "run.log_every=4")
    assert result["eval/rewards/accuracies"] >= 0.85, result
    assert result["eval/rewards/margins"] > 0 and result["loss/eval"] < LOG2
    base = load_file(M.bundled_path("stories260k") / "model.safetensors")
    trained = load_file(tmp_path / "model" / "model.safetensors")
    unchanged = [k for k in base if torch.equal(base[k], trained[k])]
    assert not unchanged, unchanged  # every parameter was trained (the tied lm head included)


def test_ties_and_both_bad_are_skipped_and_counted(tmp_path, jsonl):
    good = [{"prompt": "Once upon a time", "chosen": f" there was a cat {i}.", "rejected": f" cat a was {i} there."}
            for i in range(6)]
    path = jsonl(good + [dict(good[0], label="tie", chosen=" a dog."), dict(good[1], label="both_bad", chosen=" x")])
    _, result = dpo(tmp_path, f"data.train={path}", "train.steps=1", "train.batch_size=2", "train.micro_batch_size=2")
    assert result["skipped_ties"] == 1 and result["skipped_both_bad"] == 1
    with pytest.raises(UserError, match="no training pairs"):
        only_ties = jsonl([dict(g, label="tie") for g in good])
        dpo(tmp_path, f"data.train={only_ties}", "train.steps=1")


def test_hh_transcripts_and_conversations_train(tmp_path, jsonl):
    hh = {"chosen": "\n\nHuman: Tell me a story.\n\nAssistant: Once upon a time there was a cat.",
          "rejected": "\n\nHuman: Tell me a story.\n\nAssistant: No."}
    chat = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, friend!"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go."}]}
    path = jsonl([hh, chat] * 2)
    _, result = dpo(tmp_path, f"data.train={path}", "train.steps=2", "train.batch_size=2", "train.micro_batch_size=1")
    assert result["step"] == 2 and math.isfinite(result["loss/train"])
    assert rows(tmp_path)[0]["loss/train"] == pytest.approx(LOG2, abs=1e-5)


def test_truncation_keeps_prompt_end_and_fits_max_length(tok):
    pair = load_preferences(TRAIN).pairs[0]
    (p, c, r), = tokenize_pairs([pair], tok, 512)[0]
    (tp, tc, tr), = tokenize_pairs([pair], tok, 16)[0]
    assert len(tp) + max(len(tc), len(tr)) <= 16 and tp == p[len(p) - len(tp):]
    assert tc == c[: len(tc)] and tr == r[: len(tr)] and c[-1] == tok.eos_token_id


@pytest.mark.parametrize("override, message", [
    ("train.label_smoothing=0.1", "only for loss_type conservative or robust"),
    ("train.beta=0", "train.beta: must be > 0"),
    ("train.loss_type=hinge", "train.loss_type"),
    ("train.micro_batch_size=3", "not divisible"),
])
def test_bad_config_is_a_user_error(override, message):
    with pytest.raises(UserError, match=message):
        load_config(DPOConfig, None, [f"data.train={TRAIN}", override])


def test_bad_data_is_a_user_error(tmp_path, jsonl):
    with pytest.raises(UserError, match="missing.jsonl: file not found"):
        dpo(tmp_path, f"data.train={tmp_path / 'missing.jsonl'}")
    bad = jsonl([{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": 3, "rejected": " c"}])
    with pytest.raises(UserError, match=r":2: field 'chosen'"):
        dpo(tmp_path, f"data.train={bad}")


def test_cli_bad_input_exits_2_with_one_line(cli, tmp_path, jsonl):
    bad = jsonl([{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": 3, "rejected": " c"}])
    proc = cli("dpo", f"run.output_dir={tmp_path / 'out'}", f"data.train={bad}", "train.loss_type=ipo")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ":2: field 'chosen'" in proc.stderr
