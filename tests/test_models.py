"""Model and tokenizer loading: bundled, local folders (gpt2 path), hub ids offline, chat template, padding."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.config import GenConfig, ModelConfig
from rlhfkit.errors import UserError
from rlhfkit.models import (DEFAULT_CHAT_TEMPLATE, decode_completion, encode_pair, encode_prompt,
                            gpt2_tokenizer_from_files, load_causal_lm, load_tokenizer, pick_device, pick_dtype,
                            resolve_model_name, tokenizer_for)
from rlhfkit.rollout import sample


def test_bundled_model_loads_with_distinct_pad():
    tok = load_tokenizer("stories260k")
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0 and tok.pad_token_id != tok.eos_token_id
    model = load_causal_lm(ModelConfig(), torch.device("cpu"))
    assert model.dtype == torch.float32 and not any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def test_local_folder_and_gpt2_architecture(tiny_gpt2_dir):
    cfg = ModelConfig(name=str(tiny_gpt2_dir))
    model = load_causal_lm(cfg, torch.device("cpu"))
    assert model.config.model_type == "gpt2"
    tok = load_tokenizer(str(tiny_gpt2_dir))
    assert tok.pad_token_id == tok.eos_token_id  # GPT-2 has no unk distinct from EOS
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE


def test_gpt2_tokenizer_files_from_shared(shared, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    root = shared("cs336-fixtures")
    tok = gpt2_tokenizer_from_files(str(root / "gpt2_vocab.json"), str(root / "gpt2_merges.txt"))
    assert tok("Hello world")["input_ids"] == [15496, 995]  # the real GPT-2 ids
    tok.save_pretrained(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)).save_pretrained(tmp_path / "gpt2")
    loaded = load_tokenizer(str(tmp_path / "gpt2"))
    assert loaded("Hello world")["input_ids"] == [15496, 995] and loaded.eos_token_id == 50256
    assert load_causal_lm(ModelConfig(name=str(tmp_path / "gpt2")), torch.device("cpu")).config.n_layer == 1


def test_missing_folder_and_unknown_hub_id_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not found"):
        load_causal_lm(ModelConfig(name=str(tmp_path / "no" / "such" / "folder")), torch.device("cpu"))
    with pytest.raises(UserError, match="cannot load 'nobody/no-such-model'"):
        load_tokenizer("nobody/no-such-model")


def test_load_errors_name_the_key_that_gave_the_folder(tmp_path):
    """model.tokenizer defaults to model.name, so a wrong model.name must be reported as model.name; a reference
    load as model.reference."""
    missing = str(tmp_path / "missing")
    with pytest.raises(UserError, match=r"^model\.name: folder '.*missing' not found"):
        tokenizer_for(ModelConfig(name=missing))
    with pytest.raises(UserError, match=r"^model\.tokenizer: folder '.*missing' not found"):
        tokenizer_for(ModelConfig(name="stories260k", tokenizer=missing))
    assert tokenizer_for(ModelConfig(name="stories260k")).eos_token_id == 2
    with pytest.raises(UserError, match=r"^model\.reference: folder '.*missing' not found"):
        load_causal_lm(ModelConfig(), torch.device("cpu"), name=missing)
    with pytest.raises(UserError, match=r"^b\.model: folder"):
        load_causal_lm(ModelConfig(), torch.device("cpu"), name=missing, key="b.model")


def test_default_chat_template_matches_anthropic_hh_text():
    tok = load_tokenizer("stories260k")
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Tell me a joke."}]
    hh = "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert encode_prompt(tok, messages) == encode_prompt(tok, hh)
    p_msgs, c_msgs = encode_pair(tok, messages, [{"role": "assistant", "content": "No."}])
    p_text, c_text = encode_pair(tok, hh, " No.")
    assert (p_msgs, c_msgs) == (p_text, c_text) and c_text[-1] == tok.eos_token_id


def test_devices_and_dtypes():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(UserError, match="unknown device"):
        pick_device("tpu9")


def test_left_padded_greedy_batch_equals_one_by_one():
    tok = load_tokenizer("stories260k")
    model = load_causal_lm(ModelConfig(), torch.device("cpu"))
    prompts = [encode_prompt(tok, p) for p in ["Once upon a time", "The dog", "Lily and her mom went to the"]]
    gen = GenConfig(max_new_tokens=12, temperature=0.0, backend="hf")
    batch = sample(model, tok, prompts, gen).completion_ids
    single = [sample(model, tok, [p], gen).completion_ids[0] for p in prompts]
    assert batch == single
    text = decode_completion(tok, batch[2], prompts[2])
    assert text.startswith(" ")  # the space between prompt and completion survives decoding
    assert "Lily and her mom went to the" + text == tok.decode(prompts[2] + batch[2], skip_special_tokens=True)


def test_resolve_keeps_folders_and_ids(tmp_path):
    assert resolve_model_name(str(tmp_path)) == str(tmp_path)
    assert resolve_model_name("gpt2") == "gpt2"
    assert resolve_model_name("stories260k").endswith("assets/stories260k")


def test_fuse_activations_swaps_gpt2_gelu_new_for_the_same_function_in_one_kernel():
    """GPT-2's gelu_new (a Python formula) becomes GELUTanh (F.gelu approximate="tanh"): logits and gradients
    unchanged to float rounding, config untouched."""
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import GELUTanh, NewGELUActivation

    from rlhfkit.models import disable_dropout, fuse_activations

    torch.manual_seed(0)
    plain = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    disable_dropout(plain)
    fused = copy.deepcopy(plain)
    assert fuse_activations(fused) == 2
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, GELUTanh) for m in fused.modules()) == 2
    assert fused.config.activation_function == "gelu_new"
    ids = torch.randint(0, 100, (3, 11))
    a, b = plain(ids).logits, fused(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)
