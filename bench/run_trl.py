"""TRL 1.16's side of the benchmark suite (RewardTrainer, DPOTrainer, GRPOTrainer, RLOOTrainer) and the two
baselines that TRL has no trainer for: HF `generate()` (rollout) and a hand-written PyTorch PPO loop (ppo).

Every TRL config: use_cpu=True, bf16=False, gradient_checkpointing=False, disable_dropout=True, no logging, no
saving, no dataloader workers, 8 sequences per step; GRPO/RLOO: beta 0.05 with a reference model, one update per
generation (num_iterations 1), exactly 32 new tokens (generation_kwargs min_new_tokens = max_completion_length),
temperature 1, no top-k/top-p. Step boundaries: TrainerCallback.on_step_end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from workload import BATCH, NEW_TOKENS, Workload  # noqa: E402

BETA = 0.05


def _common(out: Path, steps: int) -> dict:
    return dict(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=1e-5,
                use_cpu=True, bf16=False, gradient_checkpointing=False, disable_dropout=True, report_to="none",
                logging_steps=100000, save_strategy="no", dataloader_num_workers=0, seed=0, lr_scheduler_type="cosine",
                max_grad_norm=1.0, warmup_steps=0)


def _callback(stamp: Callable[[], None]):
    from transformers import TrainerCallback

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamp()

    return Stamp()


def _tokenizer(w: Workload):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(w.model_dir)
    assert tok.pad_token_id is not None
    return tok


def run(task: str, w: Workload, out: Path, steps: int, threads: int, stamp: Callable[[], None],
        num_generations: int) -> dict:
    torch.set_num_threads(threads)
    if task in ("rollout", "rollout_rebuild"):
        return _hf_generate(w, steps, stamp)
    if task == "ppo":
        from torch_ppo import run_ppo

        return run_ppo(w, steps, stamp)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = _tokenizer(w)
    cb = [_callback(stamp)]
    if task == "rm":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(w.model_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(**_common(out, steps)), processing_class=tok,
                                train_dataset=load_dataset("json", data_files=str(w.pairs), split="train"),
                                callbacks=cb)
    elif task == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(w.model_dir, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=DPOConfig(**_common(out, steps), beta=BETA), processing_class=tok,
                             train_dataset=load_dataset("json", data_files=str(w.pairs), split="train"),
                             callbacks=cb)
    elif task in ("grpo", "rloo"):
        import trl
        from reward_fn import positive_words

        cfg_cls, trainer_cls = ((trl.GRPOConfig, trl.GRPOTrainer) if task == "grpo" else
                                (trl.RLOOConfig, trl.RLOOTrainer))
        args = cfg_cls(**_common(out, steps), beta=BETA, num_generations=num_generations, num_iterations=1,
                       max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
                       temperature=1.0, top_k=0, top_p=1.0, log_completions=False)
        model = AutoModelForCausalLM.from_pretrained(w.model_dir, dtype=torch.float32)
        trainer = trainer_cls(model=model, reward_funcs=[positive_words], args=args, processing_class=tok,
                              train_dataset=load_dataset("json", data_files=str(w.prompts), split="train"),
                              callbacks=cb)
    else:
        raise SystemExit(f"trl: no task {task!r}")
    trainer.train()
    return {}


def _hf_generate(w: Workload, steps: int, stamp: Callable[[], None]) -> dict:
    """HF generate called directly, as a user would: left-padded batch of 8 prompts, exactly 32 new tokens."""
    import json

    from transformers import AutoModelForCausalLM

    tok = _tokenizer(w)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(w.model_dir, dtype=torch.float32).eval()
    prompts = [json.loads(x)["prompt"] for x in w.prompts.read_text().splitlines()[:BATCH]]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        for i in range(steps):
            torch.manual_seed(i)
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            stamp()
    assert out.shape[1] == enc["input_ids"].shape[1] + NEW_TOKENS
    return {"prompt_tokens": enc["attention_mask"].sum(-1).tolist()}
