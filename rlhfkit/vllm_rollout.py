"""Optional vLLM rollout engine for the RL trainers (gen.backend=vllm): one engine per GPU, colocated with training.

    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 8 -m rlhfkit ppo \\
        gen.backend=vllm gen.vllm_gpu_memory_utilization=0.3 ...

Each rank starts a vLLM `LLM` in its own process on its own GPU (distributed_executor_backend="external_launcher",
tensor parallel 1: the data-parallel ranks are already the parallelism), samples its share of the rollout there,
and after every policy update loads the new weights into it (`sync`; a LoRA adapter is merged for the copy, then
unmerged). vLLM is imported only here, only when gen.backend=vllm: CPU users never need it.

Seeds: vLLM takes one seed per request, so row i of a chunk sampled with seed s gets s + 10_007 i, which is
rlhfkit.distributed.chunk_seed of that row's own offset: a row's completion depends on its global index only.
The sampler's log-probs (`rollout_logprobs`) are vLLM's own, after temperature (logprobs_mode processed_logprobs);
the trainers recompute every log-prob they train on, so they are diagnostics (`rollout/logprob_diff_max`).
Not tested on this project's CPU machines (no vLLM, no GPU); docs/scaling.md says what was checked.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rlhfkit.errors import UserError

ROW_SEED_STRIDE = 10_007  # = the offset stride of rlhfkit.distributed.chunk_seed


def import_vllm() -> Any:
    """The vllm module, or a one-line UserError saying how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise UserError(f"gen.backend=vllm: vLLM is not installed ({err}); `pip install vllm` on a machine with a "
                        "CUDA GPU, or use gen.backend=auto") from None
    return vllm


def make_sampler(gen: Any, model_cfg: Any, world: Any) -> VLLMSampler | None:
    """A VLLMSampler when gen.backend is vllm (checked: vLLM importable, CUDA present), else None."""
    if gen.backend != "vllm":
        return None
    vllm = import_vllm()
    if not torch.cuda.is_available() or world.device.type != "cuda":
        raise UserError("gen.backend=vllm: needs a CUDA GPU per process (this run's device is "
                        f"{world.device}); use gen.backend=auto on CPU")
    if world.shards_params:
        raise UserError("gen.backend=vllm: weight sync needs the whole policy on every rank: use DDP or ZeRO-2 "
                        "(configs/accelerate/ddp.yaml, zero2.yaml), not FSDP / ZeRO-3")
    return VLLMSampler(vllm, model_cfg, gen, world)


class VLLMSampler:
    """sample(prompt_ids, gen, seed) -> rlhfkit.rollout.Samples; sync(policy) after each optimizer update."""

    def __init__(self, vllm: Any, model_cfg: Any, gen: Any, world: Any):
        from rlhfkit.models import resolve_model_name

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights reachable
        self.vllm = vllm
        self.llm = vllm.LLM(
            model=resolve_model_name(model_cfg.name),
            tokenizer=resolve_model_name(model_cfg.tokenizer or model_cfg.name),
            dtype=model_cfg.dtype,  # auto, float32, bfloat16, float16: the same names in vLLM
            trust_remote_code=model_cfg.trust_remote_code, tensor_parallel_size=1,
            distributed_executor_backend="external_launcher" if world.size > 1 else None,
            gpu_memory_utilization=gen.vllm_gpu_memory_utilization, seed=world.rank,
            enable_prefix_caching=True, logprobs_mode="processed_logprobs")

    def params(self, gen: Any, seed: int, n: int) -> list:
        """One SamplingParams per row (per-request seeds: W-invariant rollouts); rlhfkit's GenConfig semantics:
        top_k 0 = off (vLLM -1), min_new_tokens forbids EOS before it, logprobs of the sampled token."""
        return [self.vllm.SamplingParams(n=1, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or -1,
                                         max_tokens=gen.max_new_tokens, min_tokens=gen.min_new_tokens, logprobs=0,
                                         seed=seed + ROW_SEED_STRIDE * i) for i in range(n)]

    def sample(self, prompt_ids: list[list[int]], gen: Any, seed: int) -> Any:
        from rlhfkit.rollout import Samples

        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids],
                                 self.params(gen, seed, len(prompt_ids)), use_tqdm=False)
        completions, finished, logprobs = [], [], []
        for out in outs:
            o = out.outputs[0]
            ids = list(o.token_ids)
            completions.append(ids)
            finished.append(o.finish_reason == "stop")
            logprobs.append([float(step[tok].logprob) for step, tok in zip(o.logprobs or [], ids)]
                            + [0.0] * (len(ids) - len(o.logprobs or [])))
        return Samples(list(prompt_ids), completions, finished, logprobs)

    def sync(self, policy: Any) -> None:
        """Load the policy's current weights into the engine (LoRA: merged for the copy) and drop cached prefixes."""
        peft = hasattr(policy, "merge_adapter")
        if peft:
            policy.merge_adapter()
        try:
            state = {}
            for name, tensor in policy.state_dict().items():
                if "lora_" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                state[name] = tensor
            engine_model(self.llm).load_weights(state.items())
        finally:
            if peft:
                policy.unmerge_adapter()
        self.llm.reset_prefix_cache()


def engine_model(llm: Any) -> Any:
    """The torch model inside an in-process vLLM engine (the attribute path moved between vLLM versions)."""
    executor = llm.llm_engine.model_executor
    worker = executor.driver_worker
    for path in (("model_runner", "model"), ("worker", "model_runner", "model")):
        obj = worker
        for attr in path:
            obj = getattr(obj, attr, None)
        if obj is not None and hasattr(obj, "load_weights"):
            return obj
    raise UserError("gen.backend=vllm: cannot reach the model inside this vLLM version for the weight sync "
                    "(tried driver_worker.model_runner.model and driver_worker.worker.model_runner.model)")
