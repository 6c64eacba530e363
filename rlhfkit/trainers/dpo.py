"""Direct preference optimisation (DPO, IPO, conservative and robust DPO) on preference pairs, no reward model.

    rlhfkit dpo model.name=stories260k data.train=bundled:hh_helpful_pairs.jsonl.gz run.output_dir=runs/dpo
    rlhfkit dpo ... train.loss_type=ipo train.beta=0.5                  # IPO (length-averaged log-probs)
    rlhfkit dpo ... model.lora_r=8                                      # reference = the base, adapter off
    rlhfkit dpo --config runs/dpo/config.yaml --resume                  # continue an interrupted run

Data: any preference format (rlhfkit.data.formats; Anthropic HH .jsonl.gz as is, conversations). DPO has no use
for pairs without an order: `tie` and `both_bad` pairs are skipped and counted, `margin` is not used.
A step: the chosen and rejected completions of a micro-batch go through ONE forward pass (2n rows, left-padded so
every completion ends in the last column, position ids from the mask), the policy's log-probs of the completion
tokens are summed (averaged for IPO), the frozen reference's come from a no-grad pass (or from a table computed
once up front, train.precompute_ref_logprobs), and rlhfkit.core.losses.dpo_loss gives the loss and the implicit
rewards r = β(log π(y) - log π_ref(y)). The final model is saved in `output_dir/model`.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from rlhfkit import models as M
from rlhfkit import train_utils as U
from rlhfkit.config import ModelConfig, OptimConfig, RunConfig
from rlhfkit.core.logprobs import gather_logprobs, masked_sum
from rlhfkit.core.losses import dpo_loss
from rlhfkit.data import load_preferences
from rlhfkit.data.collate import pad_sequences, position_ids_from_mask
from rlhfkit.errors import UserError, exact_div
from rlhfkit.trainers.rm import split_pairs
from rlhfkit.trainers.sft import _load_weights, sample_order, save_final

STAT_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")


@dataclass
class DPOModelConfig(ModelConfig):
    reference: str = ""
    """Reference model π_ref (hub id or folder); empty = the starting policy model.name. With LoRA and an empty
    reference, π_ref is the policy with its adapter disabled (no second copy in memory)."""


@dataclass
class DPODataConfig:
    train: str = ""
    """Preference pairs: JSONL/JSONL.gz/JSON of {"prompt","chosen","rejected"}, Anthropic HH transcripts or
    conversations (see docs/usage.md). Ties and both_bad pairs are skipped and counted."""
    eval: str = ""
    """Held-out pairs in the same formats; empty holds out data.eval_fraction of data.train."""
    eval_fraction: float = 0.1
    """Share of the data.train pairs held out when data.eval is empty (0 disables eval)."""
    split_seed: int = 0
    """Seed of the held-out split (separate from run.seed so every run sees the same split)."""
    max_length: int = 512
    """Longest prompt + completion in tokens; longer pairs lose the start of the prompt, then the completions' ends."""


@dataclass
class DPOTrainConfig:
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Preference pairs per optimizer step."""
    micro_batch_size: int = 8
    """Pairs per forward/backward pass (2x that many sequences); batch_size / micro_batch_size = accumulation."""
    eval_batch_size: int = 16
    """Pairs per forward pass in eval and when precomputing reference log-probs."""
    beta: float = 0.1
    """β: strength of the implicit KL constraint to π_ref (DPO's temperature; IPO's regularisation τ)."""
    loss_type: Literal["sigmoid", "ipo", "robust", "conservative"] = "sigmoid"
    """sigmoid (DPO), ipo (squared loss on length-averaged log-ratios), conservative (cDPO) or robust
    (rDPO); both of the last use train.label_smoothing as the assumed label-flip rate ε."""
    label_smoothing: float = 0.0
    """ε in [0, 0.5): probability that a label is flipped (conservative / robust only)."""
    precompute_ref_logprobs: bool = False
    """Score every pair under the frozen reference once before training (then free the reference model), instead of
    a reference forward pass per step. Faster when pairs are seen more than once; also saves memory."""


@dataclass
class DPOConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/dpo"))
    model: DPOModelConfig = field(default_factory=DPOModelConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_steps=10))

    def validate(self) -> None:
        t = self.train
        if not self.data.train:
            raise UserError("data.train: required (a file of preference pairs: prompt/chosen/rejected or HH)")
        for key in ("steps", "batch_size", "micro_batch_size", "eval_batch_size"):
            if getattr(t, key) < 1:
                raise UserError(f"train.{key}: must be >= 1, got {getattr(t, key)}")
        exact_div(t.batch_size, t.micro_batch_size, "train.batch_size / train.micro_batch_size")
        if not (t.beta > 0 and math.isfinite(t.beta)):
            raise UserError(f"train.beta: must be > 0, got {t.beta}")
        if not 0 <= t.label_smoothing < 0.5:
            raise UserError(f"train.label_smoothing: must be in [0, 0.5), got {t.label_smoothing}")
        if t.label_smoothing and t.loss_type not in ("conservative", "robust"):
            raise UserError(f"train.label_smoothing: only for loss_type conservative or robust, not {t.loss_type}")
        if not 0 <= self.data.eval_fraction < 1:
            raise UserError(f"data.eval_fraction: must be in [0, 1), got {self.data.eval_fraction}")
        if self.data.max_length < 4:
            raise UserError(f"data.max_length: must be >= 4, got {self.data.max_length}")


# ----------------------------------------------------------------------------------------------------------------
# Data: pairs -> token ids -> left-padded batches


def load_pairs(cfg: DPOConfig) -> tuple[list, list, dict]:
    """(train pairs, eval pairs, counts); only pairs labelled "chosen" are kept (ties / both_bad skipped)."""
    data = load_preferences(cfg.data.train)
    counts = {"read": data.read, "dropped_identical": data.dropped_identical, "dropped_empty": data.dropped_empty,
              "skipped_ties": data.ties, "skipped_both_bad": data.both_bad}
    pairs = [p for p in data.pairs if p.label == "chosen"]
    if cfg.data.eval:
        eval_pairs = [p for p in load_preferences(cfg.data.eval).pairs if p.label == "chosen"]
    elif cfg.data.eval_fraction > 0:
        pairs, eval_pairs = split_pairs(pairs, cfg.data.eval_fraction, cfg.data.split_seed)
    else:
        eval_pairs = []
    if not pairs:
        raise UserError(f"data.train: {cfg.data.train} leaves no training pairs ({data.summary()}; ties and "
                        "both_bad pairs are skipped, then data.eval_fraction is held out)")
    return pairs, eval_pairs, counts


def tokenize_pairs(pairs: list, tokenizer, max_length: int) -> tuple[list[tuple[list, list, list]], int]:
    """[(prompt_ids, chosen_ids, rejected_ids)] with EOS closing each completion; also how many were truncated.

    Too long: the prompt keeps its last max(max_length - longest completion, max_length // 2) tokens, then the
    completions are cut to fit. An empty prompt becomes [BOS] (or [EOS]) so the first token has a prediction."""
    out, truncated = [], 0
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for pair in pairs:
        p_ids, c_ids = M.encode_pair(tokenizer, pair.prompt, pair.chosen)
        _, r_ids = M.encode_pair(tokenizer, pair.prompt, pair.rejected)
        p_ids = p_ids or [start]
        longest = max(len(c_ids), len(r_ids))
        if len(p_ids) + longest > max_length:
            truncated += 1
            keep = min(len(p_ids), max(max_length - longest, max_length // 2))
            p_ids = p_ids[len(p_ids) - keep:]
            c_ids, r_ids = c_ids[: max_length - keep], r_ids[: max_length - keep]
        out.append((p_ids, c_ids, r_ids))
    return out, truncated


def make_batch(items: list[tuple[list, list, list]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """One batch for n pairs: rows 0..n-1 = prompt + chosen, rows n..2n-1 = prompt + rejected.

    Left padding to the batch's longest row, so every completion ends in the last column and the logits of the
    last K+1 columns (K = longest completion) cover every completion token. Returns input_ids, attention_mask,
    position_ids (2n, L) and completion_mask (2n, K): True where target column L-K+k is a completion token."""
    seqs = [p + c for p, c, _ in items] + [p + r for p, _, r in items]
    lengths = torch.tensor([len(c) for _, c, _ in items] + [len(r) for _, _, r in items])  # (2n,)
    ids, attn = pad_sequences(seqs, pad_id, side="left")  # (2n, L)
    K = int(lengths.max())
    completion_mask = torch.arange(K) >= (K - lengths).unsqueeze(1)  # (2n, K)
    return ids, attn, position_ids_from_mask(attn), completion_mask


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes logits_to_keep (transformers >= 4.50 causal LMs do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def completion_logps(model, batch: tuple[torch.Tensor, ...], average: bool, keep_logits: bool) -> torch.Tensor:
    """(2n,) log π(completion | prompt): sum of token log-probs over completion tokens (mean if average, for IPO).

    The lm head runs on the last K+1 positions only (logits_to_keep), and gather_logprobs never builds the full
    (2n, K, V) log-softmax. Naive equivalent (tested): log_softmax(model(ids).logits[:, :-1]).gather(ids[:, 1:])
    summed over the completion tokens of each row."""
    ids, attn, pos, completion_mask = batch
    K = completion_mask.shape[1]
    kwargs = {"logits_to_keep": K + 1} if keep_logits else {}
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, **kwargs).logits
    logits = logits[:, -(K + 1):-1]  # (2n, K, V): column L-K-1+k predicts target column L-K+k
    logps = gather_logprobs(logits, ids[:, -K:])  # (2n, K)
    total = masked_sum(logps, completion_mask, dim=-1)  # (2n,)
    return total / completion_mask.sum(-1) if average else total


class Reference:
    """π_ref log-probs: from a table computed up front, a frozen model, or the LoRA policy with its adapter off."""

    def __init__(self, model, adapter_off: bool, average: bool, keep_logits: bool):
        self.model, self.adapter_off, self.average, self.keep_logits = model, adapter_off, average, keep_logits
        self.table: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def score(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # dropout is off in every model we load, so the policy's train mode gives the same function as eval
        if self.adapter_off:
            with self.model.disable_adapter():
                out = completion_logps(self.model, batch, self.average, self.keep_logits)
        else:
            out = completion_logps(self.model, batch, self.average, self.keep_logits)
        return out.clone()

    def precompute(self, name: str, data: list, pad_id: int, micro: int, device) -> None:
        """Store (chosen, rejected) log-probs of every pair of `data` as table[name] (N, 2), on `device`."""
        rows = []
        for i in range(0, len(data), micro):
            chunk = data[i: i + micro]
            logps = self.score(tuple(t.to(device) for t in make_batch(chunk, pad_id)))  # (2n,)
            rows.append(torch.stack([logps[: len(chunk)], logps[len(chunk):]], dim=1))  # (n, 2)
        self.table[name] = torch.cat(rows) if rows else torch.zeros(0, 2, device=device)

    def lookup(self, name: str, index: list[int], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if name in self.table:
            pick = self.table[name][torch.as_tensor(index, device=self.table[name].device)]  # (n, 2)
            return torch.cat([pick[:, 0], pick[:, 1]])  # (2n,) chosen then rejected, like make_batch
        return self.score(batch)


def pair_loss(model, ref: Reference, name: str, index: list[int], data: list, cfg: DPOTrainConfig, pad_id: int,
              device, keep_logits: bool):
    """DPO loss (mean over the pairs in `index`) and its stats, via one forward over chosen + rejected."""
    batch = tuple(t.to(device) for t in make_batch([data[i] for i in index], pad_id))
    n = len(index)
    policy = completion_logps(model, batch, cfg.loss_type == "ipo", keep_logits)  # (2n,)
    reference = ref.lookup(name, index, batch)  # (2n,)
    loss, stats = dpo_loss(policy_chosen_logps=policy[:n], policy_rejected_logps=policy[n:],
                           ref_chosen_logps=reference[:n], ref_rejected_logps=reference[n:], beta=cfg.beta,
                           loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
    stats["logps/chosen"], stats["logps/rejected"] = policy[:n].detach().mean(), policy[n:].detach().mean()
    return loss, stats


@torch.no_grad()
def evaluate(model, ref: Reference, data: list, cfg: DPOTrainConfig, pad_id: int, device, keep_logits: bool) -> dict:
    """Mean loss and implicit-reward stats over the held-out pairs; eval/rewards/accuracies is the held-out
    preference accuracy: the share of pairs with r(chosen) > r(rejected)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(data), cfg.eval_batch_size):
        index = list(range(i, min(len(data), i + cfg.eval_batch_size)))
        loss, stats = pair_loss(model, ref, "eval", index, data, cfg, pad_id, device, keep_logits)
        for key, value in {"loss": loss, **stats}.items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(index)
    model.train(was_training)
    return {("loss/eval" if k == "loss" else f"eval/{k}"): v / len(data) for k, v in sums.items()}


def main(cfg: DPOConfig, argv: list[str] | None = None) -> dict:
    out = U.setup_run(cfg, argv)
    device = M.pick_device(cfg.run.device)
    tokenizer = M.load_tokenizer(cfg.model.tokenizer or cfg.model.name, cfg.model.trust_remote_code)
    pairs, eval_pairs, counts = load_pairs(cfg)
    train_data, truncated = tokenize_pairs(pairs, tokenizer, cfg.data.max_length)
    eval_data, _ = tokenize_pairs(eval_pairs, tokenizer, cfg.data.max_length)
    pad_id, t = tokenizer.pad_token_id, cfg.train

    model = M.apply_lora(M.load_causal_lm(cfg.model, device), cfg.model)
    keep_logits = _keeps_logits(model)
    adapter_off = cfg.model.lora_r > 0 and not cfg.model.reference
    if adapter_off:
        ref_model = model
    else:  # a frozen copy: a fresh load of the starting weights (or model.reference), also on --resume
        ref_model = M.load_causal_lm(cfg.model, device, name=cfg.model.reference or None).requires_grad_(False)
        ref_model.eval()
    ref = Reference(ref_model, adapter_off, t.loss_type == "ipo", keep_logits)
    if t.precompute_ref_logprobs:
        ref.precompute("train", train_data, pad_id, t.eval_batch_size, device)
        ref.precompute("eval", eval_data, pad_id, t.eval_batch_size, device)
        if not adapter_off:
            ref.model = ref_model = None  # the table replaces the frozen copy

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = U.make_optimizer(params, cfg.optim, list(model.named_parameters()))
    scheduler = U.make_scheduler(optimizer, cfg.optim, t.steps)
    start_step = 0
    if cfg.run.resume:
        ckpt = U.latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume: no complete checkpoint in {out}/checkpoints")
        state = U.load_trainer_state(ckpt)
        _load_weights(model, ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        U.set_rng_state(state["rng"])
        start_step = state["step"]
    logger = U.MetricLogger(out, cfg.run.report_to, resume_step=start_step if cfg.run.resume else None)
    print(f"dpo: {len(train_data)} train / {len(eval_data)} eval pairs ({truncated} truncated; skipped "
          f"{counts['skipped_ties']} ties, {counts['skipped_both_bad']} both-bad), reference "
          f"{'table' if t.precompute_ref_logprobs else 'adapter off' if adapter_off else 'model'}, "
          f"{M.count_parameters(model, True):,} trainable parameters, device {device}", flush=True)

    B, micro = t.batch_size, t.micro_batch_size
    end_step = t.steps if not cfg.run.stop_after_steps else min(t.steps, start_step + cfg.run.stop_after_steps)
    orders: dict[int, torch.Tensor] = {}

    def sample_index(k: int) -> int:
        """Pair k of the training stream: epoch e visits the pairs in a permutation seeded by (seed, e)."""
        epoch, pos = divmod(k, len(train_data))
        if epoch not in orders:
            orders[epoch] = sample_order(len(train_data), cfg.run.seed, epoch)
        return int(orders[epoch][pos])

    bar = U.progress(t.steps, "dpo", cfg.run.progress, initial=start_step)
    pairs_seen, t0, last = 0, time.perf_counter(), {}
    model.train()
    for step in range(start_step, end_step):
        index = [sample_index(k) for k in range(step * B, (step + 1) * B)]  # resumable from the step alone
        sums = dict.fromkeys(("loss/train",) + STAT_KEYS, 0.0)
        for i in range(0, B, micro):
            loss, stats = pair_loss(model, ref, "train", index[i: i + micro], train_data, t, pad_id, device,
                                    keep_logits)
            (loss * (micro / B)).backward()  # micro-batch means weighted micro/B sum to the full-batch mean
            for key, value in {"loss/train": loss.detach(), **stats}.items():
                sums[key] += float(value) * micro / B
        grad_norm = U.clip_and_step(params, optimizer, scheduler, cfg.optim.max_grad_norm)
        if not math.isfinite(sums["loss/train"]):
            raise FloatingPointError(f"step {step + 1}: loss is {sums['loss/train']}")
        done, pairs_seen = step + 1, pairs_seen + B
        speed = pairs_seen / max(1e-9, time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss/train']:.3f}", acc=f"{sums['rewards/accuracies']:.2f}",
                        pairs_s=f"{speed:.1f}")
        last = {**sums, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "time/pairs_per_s": speed}
        if eval_data and ((cfg.run.eval_every and done % cfg.run.eval_every == 0) or done == t.steps):
            last.update(evaluate(model, ref, eval_data, t, pad_id, device, keep_logits))
        if done % max(1, cfg.run.log_every) == 0 or done == end_step or "loss/eval" in last:
            logger.log(done, last)
        if (cfg.run.save_every and done % cfg.run.save_every == 0) or (done == end_step and done < t.steps):
            U.save_checkpoint(out, done, models={"model": model}, tokenizer=tokenizer, optimizer=optimizer,
                              scheduler=scheduler, state={}, keep=cfg.run.keep_checkpoints)
    bar.close()
    logger.close()
    result = {**last, "step": end_step, "seconds": time.perf_counter() - t0, **counts}
    if end_step == t.steps:
        save_final(model, tokenizer, out / "model")
        result["model_dir"] = str(out / "model")
        held = f"; held-out preference accuracy {last['eval/rewards/accuracies']:.3f}" if "loss/eval" in last else ""
        print(f"dpo: saved {out / 'model'}{held}")
    else:
        print(f"dpo: stopped at step {end_step} of {t.steps}; continue with --resume")
    return result
