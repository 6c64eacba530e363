"""rlhfkit.rl: rollout batch layout, the training forward (row independence = PPO ratio exactly 1), values at the
right positions, the LoRA adapter-off reference, resumable prompt order, explained variance."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhfkit import models as M
from rlhfkit import rl as R
from rlhfkit.config import GenConfig, ModelConfig, PolicyModelConfig
from rlhfkit.heads import load_scalar_model, scalar_outputs


@pytest.fixture(scope="module")
def stories():
    return M.load_causal_lm(ModelConfig(), torch.device("cpu")).eval()


@pytest.fixture(scope="module")
def tok():
    return M.load_tokenizer("stories260k")


def small_batch() -> R.RolloutBatch:
    # prompts of 3 and 1 tokens, completions [5, 2(EOS)] and [7, 8, 9] (no EOS); pad 0, EOS 2
    return R.make_rollout_batch([[1, 11, 12], [1]], [[5, 2], [7, 8, 9]], [[-0.5, -0.25], [-1.0, -2.0, -3.0]],
                                pad_id=0, eos_id=2, prompts=["a", "b"], completions=["x", "y"],
                                columns={"ref": ["r1", "r2"]})


def test_make_rollout_batch_layout():
    b = small_batch()
    assert b.prompt_width == 3 and b.completion_ids.shape == (2, 3)
    assert b.input_ids.tolist() == [[1, 11, 12, 5, 2, 0], [0, 0, 1, 7, 8, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    # positions count real tokens only: the left-padded row starts at 0 on its first real token
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert b.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.has_eos.tolist() == [True, False]
    assert b.rollout_logprobs.tolist() == [[-0.5, -0.25, 0.0], [-1.0, -2.0, -3.0]]
    sub = b.select([1])
    assert sub.input_ids.tolist() == [[0, 0, 1, 7, 8, 9]] and sub.prompt_width == 3
    assert sub.prompts == ["b"] and sub.completions == ["y"] and sub.columns == {"ref": ["r2"]}


def test_pad_equal_to_eos_keeps_the_real_eos():
    # GPT-2 style pad == EOS: the mask comes from lengths, so the real EOS keeps mask 1 (trl#1623)
    b = R.make_rollout_batch([[5], [5]], [[7, 3], [7, 8, 9, 3]], None, pad_id=3, eos_id=3, prompts=["", ""],
                             completions=["", ""])
    assert b.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert b.has_eos.tolist() == [True, True]


def test_training_forward_is_row_independent(stories, tok):
    """A row's log-probs do not depend on which rows share its forward pass (same padded widths): this is why the
    PPO ratio is exactly 1 on the first minibatch although old log-probs were computed in other micro-batches."""
    prompts = [tok(t)["input_ids"] for t in ["Once upon a time", "Lily", "The big red dog saw a cat and", "Tom"]]
    batch = R.generate_rollout(stories, tok, ["p"] * 4, prompts, GenConfig(max_new_tokens=12, temperature=1.0),
                               seed=0)
    with torch.no_grad():
        full, _ = R.forward_logprobs(stories, batch, 1.0)
        for rows in ([2], [3, 0], [1, 2, 3]):
            part, _ = R.forward_logprobs(stories, batch.select(rows), 1.0)
            assert torch.equal(part, full[rows])
        chunked, _ = R.score_rollout_forward(stories, batch, 1.0, micro_batch_size=3)
    assert torch.equal(chunked, full)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      eos_token_id=2, bos_token_id=1)).eval()


def grouped_batch(model, tok, order=(1, 1, 1, 0, 0, 0, 2, 2, 2, 1, 1, 1)) -> R.RolloutBatch:
    """Runs of 3 rows with one prompt (prompt 1 in two runs), prompts of different lengths; temperature 1 samples."""
    prompts = [tok(t)["input_ids"] for t in ["Once upon a time", "Lily", "The big red dog saw a cat and"]]
    return R.generate_rollout(model, tok, ["p"] * len(order), [prompts[i] for i in order],
                              GenConfig(max_new_tokens=10, temperature=1.0), seed=1)


@pytest.mark.parametrize("kind", ["stories", "gpt2", "lora"])
def test_shared_prompt_forward_equals_one_pass(stories, tok, kind):
    """Each run's prompt goes through the model once (4 rows in pass 1, not 12; a prompt in two runs counts twice,
    so pass 1 never depends on the prompts' text) and its cache serves the run's completions: log-probs, entropy
    and parameter gradients equal the one-pass forward's to float rounding."""
    model = {"stories": stories, "gpt2": tiny_gpt2()}.get(kind) or M.apply_lora(
        copy.deepcopy(stories), ModelConfig(lora_r=4, lora_alpha=8))
    batch = grouped_batch(model, tok)
    assert batch.attention_mask[:, 0].min() == 0 and not bool(batch.has_eos.all())  # left padding, ragged ends
    seen = []
    forward = type(model).forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model), "forward", lambda self, *a, **k: seen.append(k["input_ids"].shape) or
                   forward(self, *a, **k))
        shared, ent_s = R.shared_prompt_logprobs(model, batch, 0.8, with_entropy=True, group=3)
    assert seen[0] == (4, batch.prompt_width) and seen[1] == (12, batch.completion_ids.shape[1] + 1)
    full, ent_f = R.forward_logprobs(model, batch, 0.8, with_entropy=True)
    mask = batch.completion_mask.bool()
    assert (shared - full).abs()[mask].max() < 5e-5 and (ent_s - ent_f).abs()[mask].max() < 1e-4
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for lp in (shared, full):
        model.zero_grad()
        torch.where(mask, lp, 0.0).sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in trained])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6, ((a - b).abs().max(), b.abs().max())
    assert sum(float(g.abs().sum()) for g in grads[0]) > 0
    model.zero_grad()
    with torch.no_grad():  # through forward_logprobs (checked once per model, then used)
        assert torch.equal(R.forward_logprobs(model, batch, 0.8, group=3)[0],
                           R.shared_prompt_logprobs(model, batch, 0.8, group=3)[0])
        # rows not in runs of `group` (here: runs of 3 read as runs of 2) take the one-pass forward
        assert torch.equal(R.forward_logprobs(model, batch, 0.8, group=2)[0], R.forward_logprobs(model, batch, 0.8)[0])


def test_shared_prompt_forward_is_row_independent(stories, tok):
    """As the one-pass forward: a row's shared-prompt log-probs are bit-identical whichever groups share its
    micro-batch (prompts of other lengths, with or without padding), with and without gradient, and for a model
    with frozen weights (the reference) as for the trained one: the first ratio is exactly 1, the first KL 0."""
    texts = ["Once upon a time there was", "Lily", "The big red dog saw a cat and", "Tom went", "A bird sang"]
    prompts = [tok(t)["input_ids"] for t in texts]
    G = 3
    batch = R.generate_rollout(stories, tok, ["p"] * 15, [p for p in prompts for _ in range(G)],
                               GenConfig(max_new_tokens=12, temperature=1.0), seed=2)
    frozen = copy.deepcopy(stories).requires_grad_(False)

    def rows(groups):
        return [g * G + i for g in groups for i in range(G)]

    def run(model, pairing, grad):
        out = torch.empty(batch.completion_ids.shape)
        with torch.set_grad_enabled(grad):
            for groups in pairing:
                out[rows(groups)] = R.forward_logprobs(model, batch.select(rows(groups)), 1.0, group=G)[0].detach()
        return out

    base = run(stories, [[0, 1], [2, 3], [4]], False)
    for model, pairing, grad in [(stories, [[0, 4], [3, 1], [2]], False), (stories, [[1, 2], [4, 0], [3]], True),
                                 (frozen, [[3, 0], [2, 4], [1]], False)]:
        assert torch.equal(run(model, pairing, grad), base)


def test_shared_prompt_forward_falls_back_when_the_model_gives_no_cache(stories, tok, capsys):
    class NoCache(torch.nn.Module):  # e.g. a model whose cache cannot be returned or extended
        def __init__(self):
            super().__init__()
            self.inner = copy.deepcopy(stories)

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.cache = out.past_key_values = None
            return out

    model = NoCache()
    batch = grouped_batch(stories, tok)
    with torch.no_grad():
        lp, _ = R.forward_logprobs(model, batch, 1.0, group=3)
        full, _ = R.forward_logprobs(stories, batch, 1.0)
    assert torch.equal(lp, full)
    assert "prompt sharing off for NoCache" in capsys.readouterr().err


def test_forward_logprobs_matches_naive_and_entropy(stories):
    b = small_batch()
    with torch.no_grad():
        lp, ent = R.forward_logprobs(stories, b, 0.5, with_entropy=True)
        logits = stories(input_ids=b.input_ids, attention_mask=b.attention_mask,
                         position_ids=b.position_ids).logits  # (B, P+T, V)
        naive = torch.log_softmax(logits[:, 2:-1] / 0.5, -1)  # positions P-1 .. P+T-2 predict the completion
    assert torch.allclose(lp, naive.gather(-1, b.completion_ids.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    assert torch.allclose(ent, -(naive.exp() * naive).sum(-1), atol=1e-4)


def test_values_read_before_each_completion_token():
    value = load_scalar_model(ModelConfig(), torch.device("cpu"), init="normal").eval()
    b = small_batch()
    with torch.no_grad():
        v = R.forward_values(value, b)
        full = scalar_outputs(value, b.input_ids, b.attention_mask)
    assert v.shape == (2, 3)
    assert torch.equal(v, full[:, 2:5])  # hidden state at P-1+t predicts token t


def test_lora_reference_is_the_base_model_with_adapter_off(stories):
    lora = M.apply_lora(copy.deepcopy(stories), ModelConfig(lora_r=4)).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert R.load_reference(lora, ModelConfig(), torch.device("cpu")) is None
    b = small_batch()
    with torch.no_grad():
        ref = R.reference_logprobs(lora, None, b, 1.0)
        base, _ = R.forward_logprobs(stories, b, 1.0)
        policy, _ = R.forward_logprobs(lora, b, 1.0)
    assert torch.allclose(ref, base, atol=1e-6)
    assert not torch.allclose(policy, base, atol=1e-3)  # the adapter is back on afterwards
    full_ref = R.load_reference(stories, ModelConfig(), torch.device("cpu"))
    assert full_ref is not None and not any(p.requires_grad for p in full_ref.parameters())


def test_batch_indices_cover_every_prompt_per_pass_and_are_resumable():
    n, bs = 10, 4
    stream = [i for step in range(5) for i in R.batch_indices(n, bs, step, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a fresh order each pass
    assert R.batch_indices(n, bs, 3, seed=3) == stream[12:16]  # depends on the step alone


def test_explained_variance_hand_computed():
    mask = torch.tensor([[1, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    # perfect critic -> 1; constant critic at the mean -> 0; values = returns - [1, -1, 0]:
    # Var(returns) = 2/3, Var([1, -1, 0]) = 2/3 -> 0
    assert R.explained_variance(returns, returns, mask) == 1.0
    assert abs(R.explained_variance(torch.full_like(returns, 2.0), returns, mask)) < 1e-6
    assert abs(R.explained_variance(returns - torch.tensor([[1.0, -1.0, 0.0, 5.0]]), returns, mask)) < 1e-6
    # values = 0.5 * returns -> residual = 0.5 returns, Var = 1/6 -> 1 - (1/6)/(2/3) = 0.75
    assert abs(R.explained_variance(0.5 * returns, returns, mask) - 0.75) < 1e-6


def test_sample_table_and_files(tmp_path):
    b = small_batch()
    rows = R.sample_rows(b, torch.tensor([0.5, -1.0]), torch.tensor([0.25, 2.0]), 5)
    assert rows == [{"prompt": "a", "completion": "x", "score": 0.5, "kl": 0.25},
                    {"prompt": "b", "completion": "y", "score": -1.0, "kl": 2.0}]
    assert "score +0.500" in R.format_sample_table(3, rows)
    R.write_samples(tmp_path, 1, rows)
    R.write_samples(tmp_path, 2, rows)
    R.truncate_samples(tmp_path, 1)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2


def test_model_reference_is_the_kl_anchor(stories, tmp_path):
    # a different reference folder (e.g. the base policy in a later pipeline round) is loaded as π_ref,
    # also for a LoRA policy (which otherwise uses its adapter-off base)
    other = copy.deepcopy(stories)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    other.save_pretrained(tmp_path / "ref")
    cfg = PolicyModelConfig(reference=str(tmp_path / "ref"))
    b = small_batch()
    for policy in (stories, M.apply_lora(copy.deepcopy(stories), ModelConfig(lora_r=4))):
        ref_model = R.load_reference(policy, cfg, torch.device("cpu"))
        assert ref_model is not None
        with torch.no_grad():
            ref = R.reference_logprobs(policy, ref_model, b, 1.0)
            expected, _ = R.forward_logprobs(other, b, 1.0)
            own, _ = R.forward_logprobs(stories, b, 1.0)
        real = b.completion_mask.bool()  # pads are not scored (the fast reference leaves 0 there)
        assert torch.allclose(ref[real], expected[real], atol=1e-6) and not torch.allclose(ref[real], own[real],
                                                                                            atol=1e-3)
