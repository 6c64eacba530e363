"""The GPU path, as far as a CPU machine can check it: the shipped accelerate configs parse, DeepSpeed/FSDP/vLLM are
imported lazily and give one-line errors when they cannot run, bf16 autocast (accelerate --mixed_precision bf16)
keeps sampling and training on the same forward, gradient checkpointing keeps the KV cache for sampling, and the
vLLM rollout backend's contract (per-row seeds, weights synced after every update) against a stand-in engine.
docs/scaling.md lists what only a GPU run can check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from dist_helpers import COMMANDS, REPO

from rlhfkit import cli
from rlhfkit import distributed as D
from rlhfkit.config import GenConfig, ModelConfig, RunConfig
from rlhfkit.errors import UserError


def test_accelerate_configs_parse_and_ask_for_the_documented_engines():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = {n: load_config_from_file(str(REPO / "configs" / "accelerate" / f"{n}.yaml"))
           for n in ("ddp", "fsdp", "zero2", "zero3")}
    assert {n: c.distributed_type.name for n, c in cfg.items()} == {
        "ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    assert all(c.mixed_precision == "bf16" and c.num_processes == 8 for c in cfg.values())
    assert cfg["fsdp"].fsdp_config["fsdp_version"] == 2
    assert cfg["fsdp"].fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # rank 0 saves whole weights
    assert [cfg[n].deepspeed_config["zero_stage"] for n in ("zero2", "zero3")] == [2, 3]
    assert cfg["zero3"].deepspeed_config["zero3_save_16bit_model"]  # else get_state_dict cannot gather weights
    # rlhfkit accumulates micro-batches itself (accumulation boundary per micro-batch): DeepSpeed must not divide
    assert all(cfg[n].deepspeed_config["gradient_accumulation_steps"] == 1 for n in ("zero2", "zero3"))


def test_no_engine_or_vllm_import_for_single_process_users():
    code = ("import sys; from rlhfkit import distributed as D; from rlhfkit.config import RunConfig\n"
            "import rlhfkit.trainers.ppo, rlhfkit.trainers.dpo, rlhfkit.trainers.sft, rlhfkit.vllm_rollout\n"
            "w = D.init_world(RunConfig(device='cpu'))\n"
            "print(w.size, w.accelerator, sorted(m for m in ('vllm', 'deepspeed', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "WORLD_SIZE"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "None", "[]"]


@pytest.mark.parametrize("engine", ["DEEPSPEED", "FSDP"])
def test_sharding_engines_on_cpu_are_a_one_line_error(engine, monkeypatch):
    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    with pytest.raises(UserError, match="needs CUDA GPUs; on CPU use DDP"):
        D.init_world(RunConfig(device="cpu"))


def test_vllm_backend_without_vllm_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    from rlhfkit.vllm_rollout import make_sampler

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, as when not installed
    assert make_sampler(GenConfig(), ModelConfig(), D.World()) is None  # other backends never touch vLLM
    with pytest.raises(UserError, match=r"gen.backend=vllm: vLLM is not installed .*pip install vllm"):
        make_sampler(GenConfig(backend="vllm"), ModelConfig(), D.World())
    with pytest.raises(SystemExit) as exc:
        cli.main([*COMMANDS["ppo"], f"run.output_dir={tmp_path}", "gen.backend=vllm", "train.steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("error: gen.backend=vllm: vLLM is not installed")
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # installed, but this machine has no GPU
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        make_sampler(GenConfig(backend="vllm"), ModelConfig(), D.World())
    with pytest.raises(UserError, match="only the RL trainers"):  # rlhfkit generate and other sample() users
        from rlhfkit.rollout import resolve_backend

        resolve_backend(None, "vllm")


class StandInLLM:
    """Stands in for vllm.LLM (which needs CUDA): an HF copy of the model, loaded from the same folder, sampled with
    rlhfkit.rollout.sample one request at a time with the request's seed; load_weights copies into it."""

    def __init__(self, model: str, tokenizer: str, **kwargs):
        from rlhfkit import models as M

        self.kwargs, self.loads = kwargs, []
        self.model = M.load_causal_lm(ModelConfig(name=model), torch.device("cpu")).eval()
        self.tok = M.load_tokenizer(tokenizer)
        runner = types.SimpleNamespace(model=self)
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))

    def load_weights(self, items):
        state = dict(items)
        self.loads.append({k: v.detach().clone() for k, v in state.items()})
        _, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected  # names must be the plain transformers ones

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, params, use_tqdm=False):
        from rlhfkit.rollout import sample

        outs = []
        for prompt, p in zip(prompts, params):
            gen = GenConfig(max_new_tokens=p.max_tokens, min_new_tokens=p.min_tokens, temperature=p.temperature,
                            top_p=p.top_p, top_k=max(0, p.top_k))
            s = sample(self.model, self.tok, [prompt["prompt_token_ids"]], gen, seed=p.seed)
            ids, lps = s.completion_ids[0], s.logprobs[0]
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(
                token_ids=ids, finish_reason="stop" if s.finished[0] else "length",
                logprobs=[{t: types.SimpleNamespace(logprob=lp)} for t, lp in zip(ids, lps)])]))
        return outs


def test_vllm_backend_samples_per_row_seeds_and_syncs_weights_after_every_update(tmp_path, monkeypatch):
    from rlhfkit import vllm_rollout
    from rlhfkit.trainers import ppo

    fake = types.SimpleNamespace(LLM=StandInLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    made = []

    def make(gen, model_cfg, world):  # make_sampler minus its CUDA check
        made.append(vllm_rollout.VLLMSampler(fake, model_cfg, gen, world))
        return made[-1]

    monkeypatch.setattr(ppo, "make_sampler", make)
    threads = torch.get_num_threads()
    try:
        cli.run_command([*COMMANDS["ppo"], f"run.output_dir={tmp_path}", "gen.backend=vllm"])
    finally:
        torch.set_num_threads(threads)
    engine = made[0].llm
    assert engine.kwargs["tensor_parallel_size"] == 1 and engine.kwargs["distributed_executor_backend"] is None
    assert len(engine.loads) == 3  # after each of the 3 updates
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(torch.equal(engine.loads[-1][k], final[k]) for k in final)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the engine sampled every update from the policy's current weights: its log-probs are the trainer's own
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows), [r["rollout/logprob_diff_max"] for r in rows]
    assert all(r["policy/ratio_first_min"] == 1.0 == r["policy/ratio_first_max"] for r in rows)
    params = made[0].params(GenConfig(top_k=0), seed=7, n=3)
    assert [p.seed for p in params] == [7, 7 + 10_007, 7 + 2 * 10_007] and params[0].top_k == -1
    assert D.chunk_seed(7, 0, 2) == params[2].seed  # row 2 of a chunk = a chunk piece starting at row 2


@pytest.fixture
def bf16_world(monkeypatch):
    """accelerate --mixed_precision bf16 in one process (what `accelerate launch --num_processes 1` sets)."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    yield
    AcceleratorState._reset_state(True)


def test_bf16_autocast_samples_and_trains_with_one_forward(bf16_world, tmp_path, capsys):
    """old log-probs (no grad, world.autocast) and the training forward (accelerate's autocast on the engine's
    forward) run the same bf16 ops: the first-minibatch ratio stays 1 (PITFALLS 2) and it differs from float32."""
    threads = torch.get_num_threads()
    try:
        cli.run_command([*COMMANDS["ppo"], f"run.output_dir={tmp_path}", "train.steps=2"])
    finally:
        torch.set_num_threads(threads)
    assert "mixed precision bf16" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["policy/ratio_first_min"] == 1.0 == r["policy/ratio_first_max"] for r in rows)  # exact on CPU
    assert rows[0]["objective/kl"] == 0.0  # policy == reference, same precision
    # bf16 was on: the fast sampler's own log-probs (other op order) now differ from the training forward's by
    # ~1e-1; in float32 they agree within 1e-4 (tests/trainers/test_ppo.py)
    assert all(r["rollout/logprob_diff_max"] > 1e-3 for r in rows)


def test_gradient_checkpointing_keeps_the_kv_cache_for_sampling():
    """model.gradient_checkpointing=true recomputes activations in training, but generate() still decodes one new
    token per forward (the KV cache is on; TRL's online DPO lost it this way, PITFALLS 11)."""
    from rlhfkit import models as M
    from rlhfkit.rollout import sample

    model = M.load_causal_lm(ModelConfig(gradient_checkpointing=True), torch.device("cpu"))
    model.train()  # as during a training step
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    widths = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        tok = M.load_tokenizer("stories260k")
        sample(model, tok, [tok("Once upon a time")["input_ids"]], GenConfig(max_new_tokens=6, backend="hf",
                                                                             min_new_tokens=6), seed=0)
    finally:
        hook.remove()
    assert widths[0] > 1 and widths[1:] == [1] * (len(widths) - 1) and len(widths) >= 5, widths
    assert model.training  # sample() restores the training mode
