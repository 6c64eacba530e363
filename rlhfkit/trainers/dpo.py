"""Direct preference optimisation (DPO, IPO, conservative and robust DPO) on preference pairs, no reward model.

    rlhfkit dpo model.name=stories260k data.train=bundled:tinystories_fluency_pairs.jsonl.gz run.output_dir=runs/dpo
    rlhfkit dpo model.name=HUB_ID_OR_FOLDER data.train=hh-rlhf/train.jsonl.gz run.output_dir=runs/dpo_hh
    rlhfkit dpo ... train.loss_type=ipo train.beta=0.5                  # IPO (length-averaged log-probs)
    rlhfkit dpo ... model.lora_r=8                                      # reference = the base, adapter off
    rlhfkit dpo --config runs/dpo/config.yaml --resume                  # continue an interrupted run
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8 -m rlhfkit dpo ...  # data parallel

Data: any preference format (rlhfkit.data.formats; Anthropic HH .jsonl.gz as is, conversations). DPO has no use
for pairs without an order: `tie` and `both_bad` pairs are skipped and counted, `margin` is not used.
A step: n pairs go through ONE policy forward as n packed rows [prompt, chosen, rejected] (rejected tokens cannot
see chosen ones, so the prompt is computed once; train.share_prompt=false: 2n rows), left-padded, logits only at
completion positions; log-probs are summed over completion tokens (averaged for IPO); the frozen reference scores
the same rows without grad (or once up front: train.precompute_ref_logprobs); core.losses.dpo_loss gives the loss
and the implicit rewards r = β(log π(y) - log π_ref(y)). Explained in docs/dpo.md. Data parallel: each rank takes a
contiguous share of a step's micro-batches, weighted so the gradient averaged over ranks is the global-batch mean.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import torch

from rlhfkit import distributed as D
from rlhfkit import models as M
from rlhfkit import train_utils as U
from rlhfkit.config import OptimConfig, PolicyModelConfig, RunConfig
from rlhfkit.core.logprobs import gather_logprobs, masked_sum
from rlhfkit.core.losses import dpo_loss
from rlhfkit.data import load_preferences
from rlhfkit.data.collate import additive_mask, pad_sequences, pair_segments_allowed, position_ids_from_mask
from rlhfkit.errors import UserError, exact_div
from rlhfkit.reward.data import split_pairs  # the same held-out pairs as `rlhfkit rm train`
from rlhfkit.trainers.sft import _load_weights, sample_order, save_final

STAT_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")  # logged per step (train) and, prefixed eval/, per evaluation


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
    share_prompt: bool = True
    """Pack each pair into one row [prompt, chosen, rejected] with an attention mask that hides chosen from rejected,
    so the prompt is computed once, not twice (prefix sharing). Same numbers as two rows (checked on the first
    pairs; models that ignore custom 4D attention masks fall back to two rows). Saves most with long prompts; with
    tiny models on short texts (attention-bound) it is about even."""
    precompute_ref_logprobs: bool = False
    """Score every pair under the frozen reference once before training (then free the reference model), instead of
    a reference forward pass per step. Faster when pairs are seen more than once; also saves memory."""


@dataclass
class DPOConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/dpo"))
    model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
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


class PairBatch(NamedTuple):
    """n pairs as token tensors, in one of two layouts (make_batch). Targets are the last K token columns."""
    input_ids: torch.Tensor  # (rows, L)
    attention_mask: torch.Tensor  # (rows, L), or (n, 1, L, L) bool (True = may attend) when packed
    position_ids: torch.Tensor  # (rows, L)
    chosen_mask: torch.Tensor  # (rows, K) True where target column L-K+k is a chosen token
    rejected_mask: torch.Tensor  # (rows, K) likewise for rejected tokens (packed: all but the first)
    first_rejected: torch.Tensor | None  # packed: (n, 2) = [k of the prompt's last token, rejected[0] id]
    lengths: torch.Tensor  # (n, 2) chosen and rejected lengths in tokens

    def to(self, device) -> "PairBatch":
        return PairBatch(*(None if x is None else x.to(device) for x in self))


def make_batch(items: list[tuple[list, list, list]], pad_id: int, packed: bool, device="cpu") -> PairBatch:
    """Left-pad n pairs so every row ends in the last column; the logits of the last K+1 columns then cover every
    completion token, K = longest completion(s) of a row.

    packed=False: 2n rows, prompt + chosen (rows 0..n-1) then prompt + rejected (rows n..2n-1).
    packed=True (prefix sharing, Wang et al. 2024, arXiv:2410.20305): n rows [prompt, chosen, rejected]; the
    rejected tokens may not attend to the chosen ones and their positions restart after the prompt, so each
    completion sees exactly prompt + itself, while the prompt is computed once instead of twice. The first rejected
    token is predicted from the prompt's last position (first_rejected)."""
    P, C, R = (torch.tensor([len(x[j]) for x in items]).unsqueeze(1) for j in range(3))  # (n, 1) each
    lengths = torch.cat([C, R], dim=1)  # (n, 2)
    if not packed:
        ids, attn = pad_sequences([p + c for p, c, _ in items] + [p + r for p, _, r in items], pad_id, side="left")
        K, n = int(lengths.max()), len(items)
        completion = torch.arange(K).unsqueeze(0) >= K - torch.cat([C, R])  # (2n, K)
        is_chosen = (torch.arange(2 * n) < n).unsqueeze(1)  # (2n, 1)
        return PairBatch(ids, attn, position_ids_from_mask(attn), completion & is_chosen, completion & ~is_chosen,
                         None, lengths).to(device)
    ids, _ = pad_sequences([p + c + r for p, c, r in items], pad_id, side="left")  # (n, L)
    L = ids.shape[1]
    col = torch.arange(L).unsqueeze(0)  # (1, L)
    start = L - P - C - R  # (n, 1) first real column
    segment = (col >= start).long() + (col >= L - R - C).long() + (col >= L - R).long()  # 0 pad 1 prompt 2 ch 3 rej
    position_ids = torch.where(segment == 3, col - start - C, col - start).clamp(min=0)  # (n, L)
    K = int((C + R).max())
    k = torch.arange(K).unsqueeze(0)  # (1, K)
    first = torch.cat([K - R - C, torch.tensor([r[0] for _, _, r in items]).unsqueeze(1)], dim=1)  # (n, 2)
    return PairBatch(ids, pair_segments_allowed(segment), position_ids, (k >= K - R - C) & (k < K - R), k > K - R,
                     first, lengths).to(device)


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes logits_to_keep (transformers >= 4.50 causal LMs do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def pair_logps(model, batch: PairBatch, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log π(completion | prompt), each (n,): sums of completion-token log-probs (means for IPO).

    The lm head runs on the last K+1 positions only (logits_to_keep), and gather_logprobs never builds the full
    log-softmax. Naive equivalent (tested): for each pair and side separately,
    log_softmax(model(prompt + completion).logits[:-1]).gather(next tokens) summed over the completion."""
    ids, attn, pos, chosen_mask, rejected_mask, first, lengths = batch
    K = chosen_mask.shape[1]
    if attn.dim() == 4:  # additive float mask: works for the eager and sdpa attention of transformers
        attn = additive_mask(attn, model.get_input_embeddings().weight.dtype)
    kwargs = {"logits_to_keep": K + 1} if _keeps_logits(model) else {}
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, **kwargs).logits
    logits = logits[:, -(K + 1):-1]  # (rows, K, V): column L-K-1+k predicts target column L-K+k
    token_logps = gather_logprobs(logits, ids[:, -K:])  # (rows, K)
    chosen, rejected = masked_sum(token_logps, chosen_mask, dim=-1), masked_sum(token_logps, rejected_mask, dim=-1)
    if first is None:
        n = ids.shape[0] // 2
        chosen, rejected = chosen[:n], rejected[n:]
    else:
        at_prompt_end = logits[torch.arange(ids.shape[0], device=ids.device), first[:, 0]]  # (n, V)
        rejected = rejected + gather_logprobs(at_prompt_end.unsqueeze(1), first[:, 1:]).squeeze(1)
    if average:
        return chosen / lengths[:, 0], rejected / lengths[:, 1]
    return chosen, rejected


def packing_works(model, items: list, pad_id: int, device) -> bool:
    """Whether the packed layout scores like the two-row one for this model (it needs custom 4D attention masks)."""
    try:
        with torch.no_grad():
            a = torch.cat(pair_logps(model, make_batch(items, pad_id, True, device), False))
            b = torch.cat(pair_logps(model, make_batch(items, pad_id, False, device), False))
    except (RuntimeError, ValueError, TypeError):
        return False
    tol = 1e-4 if model.get_input_embeddings().weight.dtype == torch.float32 else 2e-2
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * 10))


class Reference:
    """π_ref log-probs: from a table computed up front, a frozen model, or the LoRA policy with its adapter off."""

    def __init__(self, model, adapter_off: bool, average: bool, world: D.World | None = None):
        self.model, self.adapter_off, self.average = model, adapter_off, average
        self.world = world or D.World()
        self.table: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def score(self, batch: PairBatch) -> torch.Tensor:
        """(n, 2) reference log-probs of (chosen, rejected)."""
        # dropout is off in every model we load, so the policy's train mode gives the same function as eval
        with self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext():
            chosen, rejected = pair_logps(self.model, batch, self.average)
        return torch.stack([chosen, rejected], dim=1).clone()  # clone: a normal tensor, usable under autograd

    def precompute(self, name: str, data: list, batcher: Callable[[list], PairBatch], size: int) -> None:
        """Score every pair of `data` once: table[name] (N, 2). Data parallel: rank r scores chunks r, r + W, ...
        and the ranks swap them (the same chunks as in one process, so the same numbers)."""
        starts, w = list(range(0, len(data), size)), self.world
        chunks = {i: self.score(batcher(data[i: i + size])) for i in starts[w.rank::w.size]}
        if w.size > 1:
            device = next(iter(chunks.values())).device if chunks else w.device
            chunks = {i: c.to(device) for part in w.gather_objects({i: c.cpu() for i, c in chunks.items()})
                      for i, c in part.items()}
        self.table[name] = torch.cat([chunks[i] for i in starts]) if starts else torch.zeros(0, 2)

    def lookup(self, name: str, index: list[int], batch: PairBatch) -> torch.Tensor:
        if name in self.table:
            return self.table[name][torch.as_tensor(index, device=self.table[name].device)]  # (n, 2)
        return self.score(batch)


def pair_loss(model, ref: Reference, name: str, index: list[int], data: list, batcher: Callable[[list], PairBatch],
              cfg: DPOTrainConfig) -> tuple[torch.Tensor, dict]:
    """DPO loss (mean over the pairs data[index]) and its stats, from one policy forward over chosen + rejected."""
    batch = batcher([data[i] for i in index])
    chosen, rejected = pair_logps(model, batch, cfg.loss_type == "ipo")  # (n,) each
    reference = ref.lookup(name, index, batch)  # (n, 2)
    loss, stats = dpo_loss(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                           ref_chosen_logps=reference[:, 0], ref_rejected_logps=reference[:, 1], beta=cfg.beta,
                           loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
    stats["logps/chosen"], stats["logps/rejected"] = chosen.detach().mean(), rejected.detach().mean()
    return loss, stats


@torch.no_grad()
def evaluate(model, ref: Reference, data: list, batcher: Callable[[list], PairBatch], cfg: DPOTrainConfig) -> dict:
    """Mean loss and implicit-reward stats over the held-out pairs; eval/rewards/accuracies is the held-out
    preference accuracy: the share of pairs with r(chosen) > r(rejected)."""
    sums: dict[str, float] = {}
    for i in range(0, len(data), cfg.eval_batch_size):
        index = list(range(i, min(len(data), i + cfg.eval_batch_size)))
        loss, stats = pair_loss(model, ref, "eval", index, data, batcher, cfg)
        for key, value in {"loss": loss, **stats}.items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(index)
    return {("loss/eval" if k == "loss" else f"eval/{k}"): v / len(data) for k, v in sums.items()}


def main(cfg: DPOConfig, argv: list[str] | None = None) -> dict:
    world = D.init_world(cfg.run)  # one process, or a rank of `accelerate launch` / `torchrun`
    out = world.setup_run(cfg, argv)
    device = world.device
    tokenizer = M.tokenizer_for(cfg.model)
    pairs, eval_pairs, counts = load_pairs(cfg)
    train_data, truncated = tokenize_pairs(pairs, tokenizer, cfg.data.max_length)
    eval_data, _ = tokenize_pairs(eval_pairs, tokenizer, cfg.data.max_length)
    pad_id, t = tokenizer.pad_token_id, cfg.train

    model = M.apply_lora(M.load_causal_lm(cfg.model, device), cfg.model)
    adapter_off = cfg.model.lora_r > 0 and not cfg.model.reference
    if adapter_off:
        ref_model = model
    else:  # a frozen copy: a fresh load of the starting weights (or model.reference), also on --resume
        ref_model = M.load_causal_lm(cfg.model, device, name=cfg.model.reference or None).requires_grad_(False)
        ref_model.eval()
    packed = t.share_prompt and all(packing_works(m, train_data[:4], pad_id, device) for m in {model, ref_model})
    batcher = functools.partial(make_batch, pad_id=pad_id, packed=packed, device=device)  # items -> PairBatch
    ref = Reference(ref_model, adapter_off, t.loss_type == "ipo", world)
    if t.precompute_ref_logprobs:
        ref.precompute("train", train_data, batcher, t.eval_batch_size)
        ref.precompute("eval", eval_data, batcher, t.eval_batch_size)
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
        if state["optimizer"] is not None:  # None: FSDP / DeepSpeed keep it in engine/ (world.load_engine_state)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        U.set_rng_state(state["rng"])
        start_step = state["step"]
    B, micro = t.batch_size, t.micro_batch_size
    world.check_split(B // micro, "train.batch_size / train.micro_batch_size (micro-batches per step)",
                      f"; set train.micro_batch_size <= {B // world.size} (micro-batches are per process)")
    runner, optimizer = world.prepare(optimizer, micro, cfg.optim.max_grad_norm, model=model)  # DDP/FSDP/DeepSpeed
    world.load_engine_state(U.latest_checkpoint(out) if cfg.run.resume else None)
    logger = world.logger(out, cfg.run.report_to, resume_step=start_step if cfg.run.resume else None)
    print(f"dpo: {len(train_data)} train / {len(eval_data)} eval pairs ({truncated} truncated; skipped "
          f"{counts['skipped_ties']} ties, {counts['skipped_both_bad']} both-bad), reference "
          f"{'table' if t.precompute_ref_logprobs else 'adapter off' if adapter_off else 'model'}, "
          f"{'packed' if packed else 'two'} rows per pair, {M.count_parameters(model, True):,} trainable parameters, "
          f"device {device}, {world.describe()}", flush=True)

    end_step = t.steps if not cfg.run.stop_after_steps else min(t.steps, start_step + cfg.run.stop_after_steps)
    orders: dict[int, torch.Tensor] = {}

    def sample_index(k: int) -> int:
        """Pair k of the training stream: epoch e visits the pairs in a permutation seeded by (seed, e)."""
        epoch, pos = divmod(k, len(train_data))
        if epoch not in orders:
            orders[epoch] = sample_order(len(train_data), cfg.run.seed, epoch)
        return int(orders[epoch][pos])

    bar = U.progress(t.steps, "dpo", cfg.run.progress and world.is_main, initial=start_step)
    pairs_seen, train_seconds, t0, last = 0, 0.0, time.perf_counter(), {}
    model.train()
    for step in range(start_step, end_step):
        started = time.perf_counter()
        index = [sample_index(k) for k in range(step * B, (step + 1) * B)]  # resumable from the step alone
        sums: dict[str, torch.Tensor | float] = dict.fromkeys(("loss/train",) + STAT_KEYS, 0.0)
        local = world.shard([index[i: i + micro] for i in range(0, B, micro)])  # this rank's micro-batches
        for j, part in enumerate(local):
            with world.accumulate(runner, last=j == len(local) - 1):
                loss, stats = runner(lambda m, part: pair_loss(m.model, ref, "train", part, train_data, batcher, t),
                                     part)
                # micro-batch means weighted micro/B sum to the full-batch mean; x W: ranks' gradients are averaged
                world.backward(loss * (micro / B * world.size))
            for key, value in {"loss/train": loss.detach(), **stats}.items():
                sums[key] = sums[key] + value * (micro / B)
        grad_norm = world.clip_and_step(params, optimizer, scheduler, cfg.optim.max_grad_norm, runner)
        sums = dict(zip(sums, torch.stack(list(sums.values())).tolist()))  # one device sync per step
        sums = world.reduce_floats(sums)  # each rank holds its share of the global means
        if not math.isfinite(sums["loss/train"]):
            raise FloatingPointError(f"step {step + 1}: loss is {sums['loss/train']}")
        done, pairs_seen = step + 1, pairs_seen + B
        train_seconds += time.perf_counter() - started
        speed = pairs_seen / max(1e-9, train_seconds)  # training only: eval and checkpoints excluded
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss/train']:.3f}", acc=f"{sums['rewards/accuracies']:.2f}",
                        pairs_s=f"{speed:.1f}")
        last = {**sums, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "time/pairs_per_s": speed,
                "dist/world_size": world.size}
        if eval_data and ((cfg.run.eval_every and done % cfg.run.eval_every == 0) or done == t.steps):
            last.update(evaluate(model, ref, eval_data, batcher, t))
        if done % max(1, cfg.run.log_every) == 0 or done == end_step or "loss/eval" in last:
            logger.log(done, last)
        if (cfg.run.save_every and done % cfg.run.save_every == 0) or (done == end_step and done < t.steps):
            world.save_checkpoint(runner, out, done, models={"model": model}, tokenizer=tokenizer,
                                  optimizer=optimizer, scheduler=scheduler, state={}, keep=cfg.run.keep_checkpoints)
    bar.close()
    logger.close()
    result = {**last, "step": end_step, "seconds": time.perf_counter() - t0, **counts}
    if end_step == t.steps:
        final = world.savable(runner, model)  # full weights on rank 0 (gathered under FSDP / ZeRO-3)
        if world.is_main:
            save_final(final, tokenizer, out / "model")
        world.barrier()
        result["model_dir"] = str(out / "model")
        held = f"; held-out preference accuracy {last['eval/rewards/accuracies']:.3f}" if "loss/eval" in last else ""
        print(f"dpo: saved {out / 'model'}{held}")
    else:
        print(f"dpo: stopped at step {end_step} of {t.steps}; continue with --resume")
    return result
