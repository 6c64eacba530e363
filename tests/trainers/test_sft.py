"""SFT: it learns, the loss mask is right (EOS trained, prompt masked), resume is exact, checkpoints are atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import train_utils as U
from rlhfkit.config import load_config
from rlhfkit.data import load_sft
from rlhfkit.models import encode_pair, load_causal_lm, load_tokenizer
from rlhfkit.trainers.sft import SFTConfig, evaluate, main, make_batch, tokenize_examples

BASE = ["data.train=bundled:tinystories_train.jsonl.gz", "data.max_length=96", "train.batch_size=8",
        "train.micro_batch_size=4", "run.progress=false", "optim.warmup_steps=2"]


def sft(tmp_path, *overrides):
    cfg = load_config(SFTConfig, None, BASE + [f"run.output_dir={tmp_path}", *overrides])
    return cfg, main(cfg, [])


def test_sft_lowers_held_out_loss(tmp_path):
    cfg, result = sft(tmp_path, "data.eval=bundled:tinystories_eval.jsonl.gz", "train.steps=30", "optim.lr=3e-4",
                      "train.batch_size=16", "train.micro_batch_size=16")
    tok = load_tokenizer("stories260k")
    base = load_causal_lm(cfg.model, torch.device("cpu"))
    held_out, _ = tokenize_examples(load_sft("bundled:tinystories_eval.jsonl.gz"), tok, 96)
    before = evaluate(base, held_out, tok.pad_token_id, 16, "cpu", True)
    assert result["loss/eval"] < before - 0.002, (before, result["loss/eval"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and "loss/train" in rows[-1] and "time/tokens_per_s" in rows[-1]
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "model" / "config.json").exists()


def test_loss_mask_keeps_eos_and_masks_prompt(tiny_gpt2_dir):
    # GPT-2's pad token is its EOS: a mask built from `ids != pad` would drop the EOS from the loss (trl#1623)
    tok = load_tokenizer(str(tiny_gpt2_dir))
    assert tok.pad_token_id == tok.eos_token_id
    p_ids, c_ids = encode_pair(tok, "Once upon a time", " there was a cat.")
    assert c_ids[-1] == tok.eos_token_id
    ids, attn, loss_mask = make_batch([(p_ids + c_ids, len(p_ids)), (p_ids, len(p_ids))], tok.pad_token_id, True)
    # position t of loss_mask predicts token t+1: the prompt's own tokens are not targets, the completion's are
    n_p, n_c = len(p_ids), len(c_ids)
    assert loss_mask[0, : n_p - 1].sum() == 0
    assert loss_mask[0, n_p - 1: n_p - 1 + n_c].sum() == n_c  # includes the EOS target
    assert ids[0, n_p + n_c - 1] == tok.eos_token_id and loss_mask[0, n_p + n_c - 2] == 1
    assert loss_mask[1].sum() == 0  # padding (also EOS ids) never counts


def test_resume_is_bit_identical(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    sft(straight, "train.steps=4")
    sft(stopped, "train.steps=4", "run.stop_after_steps=2")
    assert not (stopped / "model").exists() and U.latest_checkpoint(stopped).name == "step-0000002"
    sft(stopped, "train.steps=4", "run.resume=true")
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(stopped / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # no duplicated or missing log lines after resume


def test_same_seed_same_weights_and_config_reproduces(tmp_path):
    sft(tmp_path / "a", "train.steps=2", "run.seed=5")
    cfg = load_config(SFTConfig, str(tmp_path / "a" / "config.yaml"), [f"run.output_dir={tmp_path / 'b'}"])
    main(cfg, [])
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_half_written_checkpoints_are_ignored(tmp_path):
    sft(tmp_path, "train.steps=4", "run.save_every=2", "run.stop_after_steps=2")
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".step-0000004.tmp999").mkdir()  # a save killed before its rename
    (ckpts / "step-0000003").mkdir()  # a folder without trainer_state.pt is not a checkpoint
    assert U.latest_checkpoint(tmp_path).name == "step-0000002"
    _, result = sft(tmp_path, "train.steps=4", "run.resume=true")
    assert result["step"] == 4


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match="no complete checkpoint"):
        sft(tmp_path, "train.steps=2", "run.resume=true")


def test_lora_sft_saves_merged_model_and_adapter(tmp_path):
    sft(tmp_path, "train.steps=2", "model.lora_r=4", "optim.lr=1e-2")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    merged = load_file(tmp_path / "model" / "model.safetensors")
    base = load_file(Path(__file__).resolve().parents[2] / "rlhfkit/assets/stories260k/model.safetensors")
    changed = [k for k in base if "q_proj" in k and not torch.equal(base[k], merged[k])]
    assert changed, "LoRA training did not change the merged q_proj weights"
    assert not any("lora" in k for k in merged)


def test_gradient_accumulation_equals_full_batch(tmp_path):
    sft(tmp_path / "full", "train.steps=2", "train.batch_size=8", "train.micro_batch_size=8", "optim.lr=1e-2")
    sft(tmp_path / "accum", "train.steps=2", "train.batch_size=8", "train.micro_batch_size=2", "optim.lr=1e-2")
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "accum" / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6)  # float summation order differs only
