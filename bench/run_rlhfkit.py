"""rlhfkit's side of the benchmark suite: each task runs the real trainer (`rlhfkit <stage>`'s `main`) on the workload.

Step boundaries are taken at every optimizer step (rlhfkit.train_utils.clip_and_step, wrapped); with one minibatch
and one epoch per update that is once per RL update. Rollout: one `rlhfkit.rollout.sample` call per step
(reuse=True; rollout_rebuild: reuse=False).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from workload import BATCH, NEW_TOKENS, REPO, Workload

REWARD = f"{REPO / 'bench' / 'reward_fn.py'}:positive_words"
BETA = 0.05


def _common(w: Workload, out: Path, steps: int, threads: int) -> list[str]:
    return [f"model.name={w.model_dir}", "model.dtype=float32", f"run.output_dir={out}", f"train.steps={steps}",
            "run.progress=false", f"run.threads={threads}", "run.log_every=100000", "run.save_every=0",
            "optim.warmup_steps=0", "optim.lr=1e-5"]


@contextlib.contextmanager
def _stamped(stamp: Callable[[], None]):
    """Call stamp() after every optimizer step of any rlhfkit trainer."""
    from rlhfkit import train_utils as U

    step = U.clip_and_step

    def timed(*args, **kwargs):
        out = step(*args, **kwargs)
        stamp()
        return out

    U.clip_and_step = timed
    try:
        yield
    finally:
        U.clip_and_step = step


def _rl_overrides(w: Workload, out: Path, steps: int, threads: int) -> list[str]:
    return _common(w, out, steps, threads) + [
        f"data.prompts={w.prompts}", f"reward.function={REWARD}", "reward.normalize=none",
        f"train.rollout_batch_size={BATCH}", "train.num_minibatches=1", "train.update_epochs=1",
        f"train.micro_batch_size={BATCH}", "train.sample_every=0", f"gen.max_new_tokens={NEW_TOKENS}",
        f"gen.min_new_tokens={NEW_TOKENS}", f"gen.batch_size={BATCH}", "gen.temperature=1.0",
        f"kl_coef={BETA}"]


def run(task: str, w: Workload, out: Path, steps: int, threads: int, stamp: Callable[[], None],
        num_generations: int) -> dict:
    from rlhfkit.config import load_config

    if task in ("rollout", "rollout_rebuild"):
        return _rollout(w, steps, threads, stamp, reuse=task == "rollout")
    if task == "rm":
        from rlhfkit.trainers import rm as stage

        cfg = load_config(stage.RMTrainConfig, None, _common(w, out, steps, threads) + [
            "model.kind=deep", f"data.train={w.pairs}", "data.eval_fraction=0", "data.normalize_on=none",
            f"train.batch_size={BATCH}", f"train.micro_batch_size={BATCH}"])
        entry = stage.train
    elif task == "dpo":
        from rlhfkit.trainers import dpo as stage

        cfg = load_config(stage.DPOConfig, None, _common(w, out, steps, threads) + [
            f"data.train={w.pairs}", "data.eval_fraction=0", f"train.batch_size={BATCH}",
            f"train.micro_batch_size={BATCH}", f"train.beta={BETA}"])
        entry = stage.main
    elif task == "ppo":
        from rlhfkit.trainers import ppo as stage

        cfg = load_config(stage.PPOConfig, None, _rl_overrides(w, out, steps, threads))
        entry = stage.main
    elif task in ("grpo", "rloo"):
        from rlhfkit.trainers import grpo as stage

        cls = stage.GRPOConfig if task == "grpo" else stage.RLOOConfig
        cfg = load_config(cls, None, _rl_overrides(w, out, steps, threads) + [
            f"train.num_generations={num_generations}"])
        entry = stage.main
    else:
        raise SystemExit(f"rlhfkit: no task {task!r}")
    with _stamped(stamp):
        entry(cfg, [])
    return {}


def _rollout(w: Workload, steps: int, threads: int, stamp: Callable[[], None], reuse: bool) -> dict:
    import torch

    from rlhfkit import models as M
    from rlhfkit.config import GenConfig, ModelConfig
    from rlhfkit.data import load_prompts
    from rlhfkit.rl import encode_prompts
    from rlhfkit.rollout import sample

    torch.set_num_threads(threads)
    tok = M.load_tokenizer(str(w.model_dir))
    model = M.load_causal_lm(ModelConfig(name=str(w.model_dir), dtype="float32"), torch.device("cpu")).eval()
    prompts = encode_prompts(tok, [r.prompt for r in load_prompts(str(w.prompts))[:BATCH]], 256)
    gen = GenConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=1.0, batch_size=BATCH,
                    backend="fast")
    for i in range(steps):
        s = sample(model, tok, prompts, gen, seed=i, reuse=reuse)  # reuse: fixed weights, the decoder built once
        stamp()
    assert all(len(c) == NEW_TOKENS for c in s.completion_ids)
    return {"prompt_tokens": [len(p) for p in prompts]}
