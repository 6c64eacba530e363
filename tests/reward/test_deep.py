"""Deep reward model: last-token scores under left/right padding, a tiny synthetic task, gradient accumulation,
exact resume, LoRA, ratings, normalisation."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import ModelConfig, load_config
from rlhfkit.reward import load_reward_model
from rlhfkit.reward.deep import DeepRewardModel, encode, load_rm_tokenizer, needs_eos, score_ids
from rlhfkit.heads import load_scalar_model
from rlhfkit.trainers.rm import RMTrainConfig, main

from rm_synthetic import word_pairs


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train(tmp_path, name, data, **over):
    base = {"model.kind": "deep", "model.name": "stories260k", "data.train": data, "run.output_dir": str(tmp_path / name),
            "run.progress": "false", "data.max_length": "40", "train.steps": "6", "train.batch_size": "4",
            "train.micro_batch_size": "2", "optim.lr": "3e-3", "optim.warmup_steps": "0", "run.log_every": "1",
            "data.eval_fraction": "0", "train.normalize_samples": "20"}
    cfg = load_config(RMTrainConfig, overrides={**base, **{k: str(v) for k, v in over.items()}})
    return main(cfg, ["test"]), tmp_path / name


def _padding_case(model_dir, tok_name=None):
    dev = torch.device("cpu")
    torch.manual_seed(0)
    model = load_scalar_model(ModelConfig(name=model_dir), dev, init="normal").eval()
    tok = load_rm_tokenizer(tok_name or model_dir)
    texts = [("Once upon a time", " there was a dog."), ("Hi", "!"), ("The sun", " was warm and the cat slept all day")]
    seqs = [encode(tok, p, c, 64, needs_eos(tok)) for p, c in texts]
    assert len({len(s) for s in seqs}) == 3 and all(s[-1] == tok.eos_token_id for s in seqs)
    alone = np.array([score_ids(model, [s], tok.pad_token_id, dev)[0] for s in seqs])
    right = score_ids(model, seqs, tok.pad_token_id, dev, side="right")
    left = score_ids(model, seqs, tok.pad_token_id, dev, side="left")
    np.testing.assert_allclose(right, alone, atol=1e-5)
    np.testing.assert_allclose(left, alone, atol=1e-5)
    # the score is the head at the last real token: recompute it by hand from the hidden states
    ids = torch.tensor([seqs[0]])
    hidden = model.base_model(input_ids=ids).last_hidden_state[0, -1]
    head = model.score if hasattr(model, "score") else model.classifier
    assert float(head(hidden).detach()) == pytest.approx(alone[0], abs=1e-5)
    return alone


def test_last_token_score_with_left_and_right_padding():
    _padding_case("stories260k")


def test_last_token_score_when_pad_is_eos(tiny_gpt2_dir):
    # GPT-2: pad == EOS, so "first pad token" pooling (HF's own) would stop at the real EOS or a pad; ours reads
    # the last position whose mask is 1, which is the completion's EOS
    tok = load_rm_tokenizer(str(tiny_gpt2_dir))
    assert tok.pad_token_id == tok.eos_token_id
    _padding_case(str(tiny_gpt2_dir))


def test_deep_rm_learns_synthetic_preference(tmp_path):
    train = _write(tmp_path / "train.jsonl", word_pairs(256, seed=0))
    heldout = _write(tmp_path / "heldout.jsonl", word_pairs(100, seed=1))
    result, out = _train(tmp_path, "run", train, **{"train.steps": 12, "train.batch_size": 16,
                                                     "train.micro_batch_size": 16, "data.eval": heldout})
    assert result["eval/accuracy"] > 0.9, result
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["pairs"] == 100 and metrics["accuracy"] > 0.9
    rm = load_reward_model(out)
    assert rm.kind == "deep"
    s = rm.score(["Tell me a story: "] * 2, ["the dog ran to the park", "the cat ran to the park"])
    assert s[0] > s[1]


def test_gradient_accumulation_equals_full_batch(tmp_path):
    data = _write(tmp_path / "d.jsonl", word_pairs(16, seed=2))
    _, a = _train(tmp_path, "full", data, **{"train.steps": 2, "train.micro_batch_size": 4})
    _, b = _train(tmp_path, "accum", data, **{"train.steps": 2, "train.micro_batch_size": 1})
    # the same loss and gradient (norm logged before clipping) as one big batch, up to float32 summation order
    ra, rb = ([json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b))
    for x, y in zip(ra, rb):
        assert x["loss/train"] == pytest.approx(y["loss/train"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    wa, wb = load_file(str(a / "model/model.safetensors")), load_file(str(b / "model/model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=3e-5, rtol=1e-3)


def test_exact_resume(tmp_path):
    data = _write(tmp_path / "d.jsonl", word_pairs(10, seed=3))  # 10 pairs, 4 per step: epochs wrap mid-run
    _, straight = _train(tmp_path, "straight", data)
    first, resumed = _train(tmp_path, "resumed", data, **{"run.stop_after_steps": 3})
    assert first["step"] == 3 and not (resumed / "model").exists()
    assert (resumed / "checkpoints/step-0000003/trainer_state.pt").exists()
    _train(tmp_path, "resumed", data, **{"run.resume": "true"})
    wa, wb = (load_file(str(p / "model/model.safetensors")) for p in (straight, resumed))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)
    la = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss/train"] for x in la] == [x["loss/train"] for x in lb]


def test_lora_trains_adapters_and_head_and_saves_merged(tmp_path):
    data = _write(tmp_path / "d.jsonl", word_pairs(16, seed=4))
    _train(tmp_path, "lora", data, **{"model.lora_r": 4, "train.steps": 3})
    rm = load_reward_model(tmp_path / "lora")
    before = load_scalar_model(ModelConfig(name="stories260k"), torch.device("cpu"))
    after = rm.model
    changed = [n for n, p in after.named_parameters()
               if not torch.equal(p, dict(before.named_parameters())[n])]
    assert "score.weight" in changed  # the head is trained in full
    assert any("q_proj" in n or "o_proj" in n or "mlp" in n for n in changed)  # merged LoRA deltas
    assert not any("lora" in n for n, _ in after.named_parameters())  # a plain transformers folder


def test_ratings_and_pairs_together_and_normalisation(tmp_path):
    pairs = _write(tmp_path / "p.jsonl", word_pairs(16, seed=5))
    ratings = _write(tmp_path / "r.jsonl", [{"prompt": "Tell me a story: ", "completion": r["chosen"], "score": 5}
                                           for r in word_pairs(8, seed=6)] +
                     [{"prompt": "Tell me a story: ", "completion": r["rejected"], "score": 1}
                      for r in word_pairs(8, seed=6)])
    result, out = _train(tmp_path, "both", pairs, **{"data.ratings": ratings, "train.rating_batch_size": 4,
                                                     "train.normalize_std": "true", "train.normalize_samples": 1000})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/bt" in r and "loss/rating" in r for r in rows)
    meta = json.loads((out / "model/reward_model.json").read_text())
    assert meta["normalization"]["n"] == 32 + 16 and meta["normalization"]["std_normalized"]
    # the stored shift/scale make the reference set mean 0, std 1
    rm = load_reward_model(out)
    prompts = ["Tell me a story: "] * 48
    comps = [c for r in word_pairs(16, seed=5) for c in (r["chosen"], r["rejected"])] + \
        [r["chosen"] for r in word_pairs(8, seed=6)] + [r["rejected"] for r in word_pairs(8, seed=6)]
    s = np.array(rm.score(prompts, comps))
    assert abs(s.mean()) < 1e-6 and s.std() == pytest.approx(1.0, abs=1e-6)


def test_deep_model_folder_is_transformers_loadable(tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = _write(tmp_path / "d.jsonl", word_pairs(8, seed=7))
    _train(tmp_path, "run", data, **{"train.steps": 1})
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run/model")
    assert hf.config.num_labels == 1
    rm = DeepRewardModel.load(tmp_path / "run/model", "cpu")
    raw = rm.raw_scores(["Tell me a story: "], ["the dog sat"])
    assert np.isfinite(raw).all()


def test_train_layers_freezes_the_bottom_and_bf16_autocast_trains(tmp_path):
    data = _write(tmp_path / "d.jsonl", word_pairs(16, seed=8))
    _train(tmp_path, "top1", data, **{"model.train_layers": 1, "train.bf16_autocast": "true", "train.steps": 2})
    after = load_file(str(tmp_path / "top1/model/model.safetensors"))
    before = {n: p for n, p in load_scalar_model(ModelConfig(name="stories260k"), torch.device("cpu")).state_dict()
              .items()}
    n_layers = 5  # stories260k
    changed = {k for k in after if k in before and not torch.equal(after[k], before[k])}
    assert "score.weight" in changed
    assert any(k.startswith(f"model.layers.{n_layers - 1}.") for k in changed)
    assert not any(k.startswith("model.layers.0.") or "embed" in k for k in changed)
    assert after["score.weight"].dtype == torch.float32  # autocast leaves the weights in float32
