"""Supervised fine-tuning: next-token loss on completion tokens (the prompt is masked).

    rlhfkit sft data.train=stories.jsonl run.output_dir=runs/sft train.steps=200
    rlhfkit sft --config runs/sft/config.yaml --resume        # continue an interrupted run
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8 -m rlhfkit sft ...  # data parallel

Data: {"prompt", "completion"}, {"messages"} (loss on the final assistant turn) or {"text"} (loss on every token).
The loss is the token mean over every completion token of the optimizer batch, so gradient accumulation gives the
same update as one big batch (PITFALLS 7). Data parallel: each rank takes a contiguous share of the micro-batches
and divides by N / world size, so the gradient averaged over ranks is that same update (rlhfkit.distributed).
The final model is saved (save_pretrained) in `output_dir/model`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit import distributed as D
from rlhfkit import models as M
from rlhfkit import train_utils as U
from rlhfkit.config import ModelConfig, OptimConfig, RunConfig
from rlhfkit.data import load_sft
from rlhfkit.data.collate import pad_sequences
from rlhfkit.errors import UserError, exact_div


@dataclass
class SFTDataConfig:
    train: str = ""
    """Training data: JSONL or JSONL.gz of {"prompt","completion"}, {"messages"} or {"text"} records."""
    eval: str = ""
    """Held-out data in the same formats; empty splits data.eval_fraction off data.train."""
    eval_fraction: float = 0.05
    """Share of data.train held out for eval loss when data.eval is empty (0 disables eval)."""
    max_length: int = 512
    """Longest prompt + completion in tokens; longer prompts lose their start, then completions their end."""


@dataclass
class SFTTrainConfig:
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per optimizer step."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass; batch_size / micro_batch_size is the gradient accumulation."""
    completion_only_loss: bool = True
    """Mask the prompt out of the loss (False trains on prompt tokens too)."""


@dataclass
class SFTConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/sft"))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))

    def validate(self) -> None:
        if not self.data.train:
            raise UserError("data.train: required (a JSONL file of prompt/completion, messages or text records)")
        if self.train.steps < 1:
            raise UserError(f"train.steps: must be >= 1, got {self.train.steps}")
        exact_div(self.train.batch_size, self.train.micro_batch_size, "train.batch_size / train.micro_batch_size")
        if not 0 <= self.data.eval_fraction < 1:
            raise UserError(f"data.eval_fraction: must be in [0, 1), got {self.data.eval_fraction}")
        if self.data.max_length < 2:
            raise UserError(f"data.max_length: must be >= 2, got {self.data.max_length}")


def tokenize_examples(examples, tokenizer, max_length: int) -> tuple[list[tuple[list[int], int]], int]:
    """[(ids, n_prompt_tokens)], truncated to max_length; also returns how many were truncated."""
    out, truncated = [], 0
    for ex in examples:
        p_ids, c_ids = M.encode_pair(tokenizer, ex.prompt, ex.completion)
        if len(p_ids) + len(c_ids) > max_length:
            truncated += 1
            keep_prompt = min(len(p_ids), max(1, max_length // 2))
            p_ids = p_ids[len(p_ids) - keep_prompt:] if len(p_ids) > keep_prompt else p_ids
            c_ids = c_ids[: max_length - len(p_ids)]
        out.append((p_ids + c_ids, len(p_ids)))
    return out, truncated


def make_batch(items: list[tuple[list[int], int]], pad_id: int, completion_only: bool):
    """input_ids, attention_mask (B, L) and loss_mask (B, L-1) over the predicted positions."""
    ids, attn = pad_sequences([seq for seq, _ in items], pad_id, side="right")
    loss_mask = attn[:, 1:].clone()
    if completion_only:
        for i, (_, n_prompt) in enumerate(items):
            loss_mask[i, : max(0, n_prompt - 1)] = 0
    return ids, attn, loss_mask


def token_nll(model, ids: torch.Tensor, attn: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token negative log-likelihood over masked positions."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # (B, L-1, V)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                            reduction="none").view_as(loss_mask)
    return (nll * loss_mask).sum()


@torch.no_grad()
def evaluate(model, data, pad_id: int, micro: int, device, completion_only: bool) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(data), micro):
        ids, attn, lm = make_batch(data[i: i + micro], pad_id, completion_only)
        total += float(token_nll(model, ids.to(device), attn.to(device), lm.to(device)))
        tokens += int(lm.sum())
    return total / max(1, tokens)


def sample_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def main(cfg: SFTConfig, argv: list[str] | None = None) -> dict:
    world = D.init_world(cfg.run)  # one process, or a rank of `accelerate launch` / `torchrun`
    out = world.setup_run(cfg, argv)
    device = world.device
    tokenizer = M.tokenizer_for(cfg.model)
    examples = load_sft(cfg.data.train)
    if cfg.data.eval:
        eval_examples = load_sft(cfg.data.eval)
    else:
        n_eval = int(len(examples) * cfg.data.eval_fraction)
        order = sample_order(len(examples), cfg.run.seed, -1).tolist()
        eval_examples = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in order[n_eval:]]
    if not examples:
        raise UserError(f"data.train: {cfg.data.train} leaves no training examples after the eval split")
    train_data, truncated = tokenize_examples(examples, tokenizer, cfg.data.max_length)
    eval_data, _ = tokenize_examples(eval_examples, tokenizer, cfg.data.max_length)

    model = M.apply_lora(M.load_causal_lm(cfg.model, device), cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = U.make_optimizer(params, cfg.optim, list(model.named_parameters()))
    scheduler = U.make_scheduler(optimizer, cfg.optim, cfg.train.steps)
    start_step = 0
    if cfg.run.resume:
        ckpt = U.latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume: no complete checkpoint in {out}/checkpoints")
        state = U.load_trainer_state(ckpt)
        _load_weights(model, ckpt)
        if state["optimizer"] is not None:  # None: FSDP / DeepSpeed keep it in engine/ (world.load_engine_state)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        U.set_rng_state(state["rng"])
        start_step = state["step"]
    B, micro = cfg.train.batch_size, cfg.train.micro_batch_size
    world.check_split(B // micro, "train.batch_size / train.micro_batch_size (micro-batches per step)",
                      f"; set train.micro_batch_size <= {B // world.size} (micro-batches are per process)")
    runner, optimizer = world.prepare(optimizer, micro, cfg.optim.max_grad_norm, model=model)  # DDP/FSDP/DeepSpeed
    world.load_engine_state(U.latest_checkpoint(out) if cfg.run.resume else None)
    logger = world.logger(out, cfg.run.report_to, resume_step=start_step if cfg.run.resume else None)
    print(f"sft: {len(train_data)} train / {len(eval_data)} eval examples ({truncated} truncated), "
          f"{M.count_parameters(model, True):,} trainable parameters, device {device}, {world.describe()}", flush=True)

    end_step = cfg.train.steps
    if cfg.run.stop_after_steps:
        end_step = min(end_step, start_step + cfg.run.stop_after_steps)
    orders: dict[int, torch.Tensor] = {}

    def next_sample(k: int):
        """Sample k of the training stream: epoch e visits the data in a permutation seeded by (seed, e)."""
        epoch, pos = divmod(k, len(train_data))
        if epoch not in orders:
            orders[epoch] = sample_order(len(train_data), cfg.run.seed, epoch)
        return train_data[int(orders[epoch][pos])]

    bar = U.progress(cfg.train.steps, "sft", cfg.run.progress and world.is_main, initial=start_step)
    tokens_seen, t0, last = 0, time.perf_counter(), {}
    model.train()
    for step in range(start_step, end_step):
        batch = [next_sample(k) for k in range(step * B, (step + 1) * B)]  # resumable from the step alone
        micro_batches = [make_batch(batch[i: i + micro], tokenizer.pad_token_id, cfg.train.completion_only_loss)
                         for i in range(0, B, micro)]
        n_tokens = sum(int(lm.sum()) for _, _, lm in micro_batches)  # over the global batch
        loss_sum = 0.0
        local = world.shard(micro_batches)  # this rank's share; gradients are averaged over ranks, hence N / W
        for j, (ids, attn, lm) in enumerate(local):
            with world.accumulate(runner, last=j == len(local) - 1):
                nll = runner(lambda m, *x: token_nll(m.model, *x), ids.to(device), attn.to(device), lm.to(device))
                loss = nll / (max(1, n_tokens) / world.size)
                world.backward(loss)
            loss_sum += loss.detach().item()
        tokens_seen += sum(int(attn.sum()) for _, attn, _ in micro_batches)  # the global batch: every rank's share
        grad_norm = world.clip_and_step(params, optimizer, scheduler, cfg.optim.max_grad_norm, runner)
        if world.size > 1:  # rank r holds W x its share of the mean loss
            loss_sum = world.reduce_floats({"loss": loss_sum / world.size})["loss"]
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"step {step + 1}: loss is {loss_sum}")
        done = step + 1
        speed = tokens_seen / max(1e-9, time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{speed:,.0f}")
        last = {"loss/train": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "time/tokens_per_s": speed, "dist/world_size": world.size}
        if eval_data and ((cfg.run.eval_every and done % cfg.run.eval_every == 0) or done == cfg.train.steps):
            last["loss/eval"] = evaluate(model, eval_data, tokenizer.pad_token_id, micro, device,
                                         cfg.train.completion_only_loss)
            model.train()
        if done % max(1, cfg.run.log_every) == 0 or done == end_step or "loss/eval" in last:
            logger.log(done, last)
        if (cfg.run.save_every and done % cfg.run.save_every == 0) or (done == end_step and done < cfg.train.steps):
            world.save_checkpoint(runner, out, done, models={"model": model}, tokenizer=tokenizer,
                                  optimizer=optimizer, scheduler=scheduler, state={}, keep=cfg.run.keep_checkpoints)
    bar.close()
    logger.close()
    result = {**last, "step": end_step, "seconds": time.perf_counter() - t0}
    if end_step == cfg.train.steps:
        final = world.savable(runner, model)  # full weights on rank 0 (gathered under FSDP / ZeRO-3)
        if world.is_main:
            save_final(final, tokenizer, out / "model")
        world.barrier()
        result["model_dir"] = str(out / "model")
        print(f"sft: saved {out / 'model'}" + (f"; eval loss {last['loss/eval']:.4f}" if "loss/eval" in last else ""))
    else:
        print(f"sft: stopped at step {end_step} of {cfg.train.steps}; continue with --resume")
    return result


def _load_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    target = model
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = set(getattr(target, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise UserError(f"--resume: checkpoint {folder} does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")


def save_final(model, tokenizer, folder: Path) -> None:
    """Save a plain transformers folder; LoRA adapters are merged into a copy (the adapter is saved beside)."""
    if hasattr(model, "peft_config"):
        U.save_model_folder(folder.with_name("adapter"), model, tokenizer)
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    U.save_model_folder(folder, model, tokenizer)
