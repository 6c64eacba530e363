"""PPO with a KL leash, as in InstructGPT / OpenAI lm-human-preferences: maximise a reward while a per-token KL
penalty keeps the policy near the frozen reference.

    rlhfkit ppo model.name=stories260k reward.function=rewards.py:positivity run.output_dir=runs/ppo train.steps=100
    rlhfkit ppo model.name=runs/sft/model reward.model=runs/rm data.prompts=prompts.jsonl
    rlhfkit ppo --config runs/ppo/config.yaml --resume        # continue an interrupted run

One update (a `step` in metrics.jsonl):
  1. sample train.rollout_batch_size completions (rlhfkit.rollout, fast KV-cache loop), score them (raw `score`),
     normalise / penalise a missing EOS / clip them (reward.*);
  2. without gradients: old log-probs, reference log-probs and values by the training forward (rlhfkit.rl);
  3. rewards_t = -β KL_t + score at the last real token; optional reward whitening (scale only); GAE (γ, λ);
     advantages whitened (shift and scale) over the rollout batch (rlhfkit.core);
  4. train.update_epochs passes over train.num_minibatches shuffled minibatches: loss = clipped policy loss
     + vf_coef * clipped value loss, token-mean over the minibatch (micro-batches accumulate to the same
     gradient); an update stops early when a minibatch's approx KL exceeds approx_kl_stop;
  5. the adaptive KL controller (target_kl > 0) moves β; one line of metrics is written.
The new/old ratio on the first minibatch of each update is logged (policy/ratio_first_min/max) and is exactly 1:
rollout scoring and training use the same forward (PITFALLS 2).
Data parallel (accelerate launch / torchrun, rlhfkit.distributed): each rank samples, scores and runs the no-grad
forwards for its share of the rollout; the shares are then gathered, so normalisation, whitening and minibatch
orders are those of one process; each rank trains on its share of every minibatch, normaliser N / world size.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from rlhfkit import core
from rlhfkit import distributed as D
from rlhfkit import models as M
from rlhfkit import rl as R
from rlhfkit import scoring as S
from rlhfkit import train_utils as U
from rlhfkit.config import GenConfig, OptimConfig, PolicyModelConfig, RunConfig
from rlhfkit.core.losses import Aggregation
from rlhfkit.data import load_prompts
from rlhfkit.errors import UserError, exact_div
from rlhfkit.heads import head_of, load_scalar_model
from rlhfkit.trainers.sft import save_final
from rlhfkit.vllm_rollout import make_sampler


@dataclass
class PPODataConfig:
    prompts: str = "bundled:tinystories_prompts.jsonl"
    """Prompts file: JSONL of {"prompt"} or {"messages"}; other fields reach reward functions as keyword arguments."""
    max_prompt_length: int = 128
    """Longer prompts keep their last max_prompt_length tokens."""


@dataclass
class PPOTrainConfig:
    steps: int = 60
    """PPO updates; each samples one rollout batch and trains on it."""
    rollout_batch_size: int = 64
    """Completions sampled per update (lm-human-preferences `batch_size`)."""
    num_minibatches: int = 4
    """Optimizer steps per epoch over the rollout batch; minibatch = rollout_batch_size / num_minibatches."""
    update_epochs: int = 4
    """Passes over the rollout batch per update, each in a fresh random order."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass; a minibatch is accumulated from minibatch / micro_batch_size of them."""
    sample_every: int = 10
    """Print a table of samples and append them to samples.jsonl every N updates (0: never)."""
    num_samples_shown: int = 4
    """Rows in each sample table."""


@dataclass
class PPOConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/ppo", log_every=1))
    model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, schedule="linear", max_grad_norm=1.0))
    gen: GenConfig = field(default_factory=lambda: GenConfig(max_new_tokens=48, temperature=1.0, batch_size=64))
    data: PPODataConfig = field(default_factory=PPODataConfig)
    reward: S.RewardConfig = field(default_factory=S.RewardConfig)
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    kl_coef: float = 0.2
    """β: weight of the per-token KL penalty in the reward (initial value when target_kl > 0); 0.2 as
    lm-human-preferences, for scores normalised to unit std."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward (k1 = log π - log π_ref, as lm-human-preferences and TRL)."""
    target_kl: float = 0.0
    """> 0: adaptive β steering the mean per-sequence KL towards this value (Ziegler et al. 2019); 0: fixed β."""
    kl_horizon: int = 10000
    """Adaptive KL horizon in sequences: β moves by at most 20% per horizon."""
    gamma: float = 1.0
    """γ: discount over completion tokens."""
    gae_lambda: float = 0.95
    """λ: GAE bias/variance trade-off."""
    clip_coef: float = 0.2
    """ε: policy ratio clip range [1 - ε, 1 + ε]."""
    clip_coef_high: float = 0.0
    """> 0: a separate upper clip, [1 - clip_coef, 1 + clip_coef_high] (DAPO's clip-higher, e.g. 0.28); 0: clip_coef."""
    value_clip_coef: float = 0.2
    """Value clip range around the rollout values; 0 disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (lm-human-preferences 0.1)."""
    whiten_rewards: bool = False
    """Rescale per-token rewards to unit variance over the rollout batch, keeping their mean (lm-human-preferences)."""
    loss_aggregation: Aggregation = "token-mean"
    """token-mean (every token weighs the same; default), seq-mean-token-mean or seq-mean-token-sum."""
    approx_kl_stop: float = 0.0
    """> 0: end an update early once a minibatch's approx KL(π_old || π) exceeds this; 0: never."""
    value_model: Literal["policy", "reward"] = "policy"
    """Value-model backbone: a copy of the policy, or the reward model's (reward.model of kind deep)."""

    def validate(self) -> None:
        t = self.train
        if t.steps < 1 or t.update_epochs < 1 or t.num_minibatches < 1 or t.micro_batch_size < 1:
            raise UserError("train.steps, update_epochs, num_minibatches and micro_batch_size: must be >= 1")
        minibatch = exact_div(t.rollout_batch_size, t.num_minibatches, "train.rollout_batch_size / num_minibatches")
        exact_div(minibatch, t.micro_batch_size, "minibatch size (rollout_batch_size / num_minibatches) / "
                  "train.micro_batch_size")
        if self.gen.temperature <= 0:
            raise UserError("gen.temperature: PPO needs sampling, must be > 0")
        if self.whiten_rewards and t.rollout_batch_size < 8:
            raise UserError("whiten_rewards: needs train.rollout_batch_size >= 8 (lm-human-preferences)")
        for key in ("kl_coef", "target_kl", "approx_kl_stop", "value_clip_coef", "vf_coef", "clip_coef_high"):
            if getattr(self, key) < 0:
                raise UserError(f"{key}: must be >= 0")
        if not 0 < self.clip_coef < 1 or not 0 <= self.gae_lambda <= 1 or not 0 <= self.gamma <= 1:
            raise UserError("clip_coef must be in (0, 1); gamma and gae_lambda in [0, 1]")
        if self.value_model == "reward" and not self.reward.model:
            raise UserError("value_model=reward: needs reward.model=DIR")


def load_value_model(cfg: PPOConfig, device: torch.device, tokenizer) -> torch.nn.Module:
    """Scalar-head model with the head zeroed (V = 0 at the start): a copy of the policy, or the backbone of the
    deep reward model in reward.model (its tokenizer must be the policy's)."""
    if cfg.value_model == "policy":
        return load_scalar_model(cfg.model, device, init="zero")
    from rlhfkit.reward import load_reward_model

    rm = load_reward_model(cfg.reward.model, str(device), key="reward.model")
    backbone, rm_tok = getattr(rm, "model", None), getattr(rm, "tokenizer", None)
    if backbone is None or rm_tok is None or rm_tok.get_vocab() != tokenizer.get_vocab():
        raise UserError("value_model=reward: needs a deep reward model sharing the policy's tokenizer")
    value = copy.deepcopy(backbone.merge_and_unload() if hasattr(backbone, "merge_and_unload") else backbone)
    with torch.no_grad():
        head = head_of(value)
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    return value.to(device).requires_grad_(True)


def main(cfg: PPOConfig, argv: list[str] | None = None) -> dict:
    world = D.init_world(cfg.run)  # one process, or a rank of `accelerate launch` / `torchrun`
    out = world.setup_run(cfg, argv)
    device = world.device
    tokenizer = M.tokenizer_for(cfg.model)
    records = load_prompts(cfg.data.prompts)
    prompt_ids = R.encode_prompts(tokenizer, [r.prompt for r in records], cfg.data.max_prompt_length)
    scorer = S.load_scorer(cfg.reward, device)
    policy = M.apply_lora(M.load_causal_lm(cfg.model, device), cfg.model).eval()
    ref_model = R.load_reference(policy, cfg.model, device)
    value_model = load_value_model(cfg, device, tokenizer).eval()
    named = [(f"policy.{n}", p) for n, p in policy.named_parameters()] + \
            [(f"value.{n}", p) for n, p in value_model.named_parameters()]
    params = [p for _, p in named if p.requires_grad]
    optimizer = U.make_optimizer(params, cfg.optim, named)
    scheduler = U.make_scheduler(optimizer, cfg.optim, cfg.train.steps)  # stepped once per update
    kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl > 0
              else core.FixedKLController(cfg.kl_coef))
    normalizer = S.ScoreNormalizer(cfg.reward.normalize)
    temperature = R.sampling_temperature(cfg.gen)
    t, B = cfg.train, cfg.train.rollout_batch_size
    minibatch = B // t.num_minibatches
    sampler = make_sampler(cfg.gen, cfg.model, world)  # gen.backend=vllm: a vLLM engine on this GPU; else None

    def rollout(indices: list[int], seed: int) -> R.RolloutBatch:
        """This rank's share of the completions for prompts `indices` (all of them in one process)."""
        columns = {k: [records[i].extra.get(k) for i in indices] for k in records[indices[0]].extra}
        return D.generate_rollout(world, policy, tokenizer, [records[i].prompt for i in indices],
                                  [prompt_ids[i] for i in indices], cfg.gen, seed=seed, columns=columns,
                                  device=device, sampler=sampler)

    start = 0
    if cfg.run.resume:
        ckpt = U.latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume: no complete checkpoint in {out}/checkpoints")
        state = U.load_trainer_state(ckpt)
        R.load_weights(policy, ckpt)
        R.load_weights(value_model, ckpt / "value")
        if state["optimizer"] is not None:  # None: FSDP / DeepSpeed keep it in engine/ (world.load_engine_state)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        U.set_rng_state(state["rng"])
        kl_ctl.value = state["kl_coef"]
        normalizer.load_state_dict(state["normalizer"])
        start = state["step"]
    elif normalizer.mode == "initial":  # fit on samples of the initial policy, which is the reference
        idx = R.batch_indices(len(records), cfg.reward.normalize_samples, 0, cfg.run.seed + 7919)
        ref_batch = rollout(idx, seed=cfg.run.seed + 7919)
        normalizer.fit(world.gather(S.score_tensor(scorer, ref_batch.prompts, ref_batch.completions,
                                                   ref_batch.columns)))  # every rank's scores
        print(f"ppo: score normalisation from {len(idx)} initial samples: mean {normalizer.mean:.4g}, "
              f"std {normalizer.std:.4g}", flush=True)
    if cfg.run.resume and world.is_main:
        R.truncate_samples(out, start)
    elif world.is_main:
        (out / "samples.jsonl").unlink(missing_ok=True)
    world.check_split(minibatch, "minibatch size (train.rollout_batch_size / train.num_minibatches)")
    runner, optimizer = world.prepare(optimizer, t.micro_batch_size, cfg.optim.max_grad_norm, policy=policy,
                                      value=value_model)  # one engine (DDP/FSDP/DeepSpeed) for both trained models
    world.load_engine_state(U.latest_checkpoint(out) if cfg.run.resume else None)
    logger = world.logger(out, cfg.run.report_to, resume_step=start if cfg.run.resume else None)
    print(f"ppo: {len(records)} prompts, {M.count_parameters(policy, True):,} trainable policy + "
          f"{M.count_parameters(value_model, True):,} value parameters, device {device}, "
          f"reference: {'LoRA adapter off' if ref_model is None else 'frozen copy'}, {world.describe()}", flush=True)

    end = cfg.train.steps if not cfg.run.stop_after_steps else min(cfg.train.steps, start + cfg.run.stop_after_steps)
    bar = U.progress(cfg.train.steps, "ppo", cfg.run.progress and world.is_main, initial=start, unit="update")
    t_run, metrics = time.perf_counter(), {}
    for step in range(start, end):
        t0 = time.perf_counter()
        # 1. rollout and scores (this rank's share of the rollout)
        batch = rollout(R.batch_indices(len(records), B, step, cfg.run.seed), seed=cfg.run.seed * 100_003 + step)
        raw = S.score_tensor(scorer, batch.prompts, batch.completions, batch.columns)
        t_sample = time.perf_counter() - t0
        # 2. old log-probs, reference log-probs, values (same forward as training, no gradient)
        with world.autocast():  # the launcher's mixed precision, as in the training forward
            old_logprobs, entropy = R.score_rollout_forward(policy, batch, temperature, t.micro_batch_size, True)
            ref_logprobs = torch.cat([R.reference_logprobs(policy, ref_model, batch.select(i), temperature,
                                                           fast=cfg.gen.backend != "hf")
                                      for i in R.micro_batches(range(len(batch)), t.micro_batch_size)])
            old_values = R.values_forward(value_model, batch, t.micro_batch_size)
        # every rank now holds the global rollout: score normalisation and whitening over it (PITFALLS 8)
        batch, (raw, old_logprobs, entropy, ref_logprobs, old_values) = D.gather_rollout(
            world, batch, raw, old_logprobs, entropy, ref_logprobs, old_values)
        scores = S.shape_scores(raw, batch.has_eos, cfg.reward, normalizer).to(device)
        mask = batch.completion_mask
        # 3. rewards and advantages
        with torch.no_grad():
            rewards, non_score, kl = core.per_token_rewards(scores=scores, logprobs=old_logprobs,
                                                            ref_logprobs=ref_logprobs, mask=mask,
                                                            kl_coef=kl_ctl.value, estimator=cfg.kl_estimator)
            if cfg.whiten_rewards:
                rewards = core.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = core.gae(rewards=rewards, values=old_values, mask=mask, gamma=cfg.gamma,
                                           lam=cfg.gae_lambda)
            advantages = core.masked_whiten(advantages, mask, shift_mean=True)
        # 4. epochs x minibatches x micro-batches
        t_update = time.perf_counter()
        stats, first, stopped = [], {}, False
        order_gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
        for epoch in range(t.update_epochs):
            order = torch.randperm(B, generator=order_gen)
            for mb_start in range(0, B, minibatch):
                mb = order[mb_start: mb_start + minibatch].tolist()
                mb_stats = train_minibatch(cfg, batch, mb, runner, world, old_logprobs, old_values, advantages,
                                           returns, temperature)
                mb_stats["grad_norm"] = world.clip_and_step(params, optimizer, None, cfg.optim.max_grad_norm, runner)
                stats.append(mb_stats)
                if not first:
                    first = {"policy/ratio_first_min": mb_stats["ratio_min"],
                             "policy/ratio_first_max": mb_stats["ratio_max"]}
                if cfg.approx_kl_stop and mb_stats["approx_kl"] > cfg.approx_kl_stop:
                    stopped = True
                    break
            if stopped:
                break
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if sampler is not None:
            sampler.sync(policy)  # the vLLM engine samples the next rollout from the updated weights
        # 5. KL controller, metrics, samples, checkpoints
        seq_kl = R.per_sequence_sum(kl, mask)  # (B,)
        kl_coef = kl_ctl.value
        kl_ctl.update(float(seq_kl.mean()), B)
        done = step + 1
        elapsed = time.perf_counter() - t0
        n_tokens = int(mask.sum())
        mean = functools.partial(_mean, stats)
        metrics = {
            "objective/score": float(raw.mean()),
            "objective/score_shaped": float(scores.mean()),
            "objective/kl": float(seq_kl.mean()),
            "objective/kl_coef": kl_coef,
            "objective/entropy": float(R.per_sequence_sum(-old_logprobs, mask).mean()),
            "objective/non_score_reward": float(R.per_sequence_sum(non_score, mask).mean()),
            "objective/rlhf_reward": float(scores.mean() + R.per_sequence_sum(non_score, mask).mean()),
            "loss/policy": mean("loss_policy"), "loss/value": mean("loss_value"),
            "policy/clipfrac": mean("clipfrac"), "policy/approx_kl": mean("approx_kl"),
            "policy/entropy": float(core.masked_mean(entropy, mask)), **first,
            "policy/early_stop": float(stopped), "policy/minibatches": float(len(stats)),
            "val/explained_var": R.explained_variance(old_values, returns, mask),
            "val/clipfrac": mean("vf_clipfrac"), "val/mean": float(core.masked_mean(old_values, mask)),
            "returns/mean": float(core.masked_mean(returns, mask)),
            "gen/length": float(mask.sum(-1).float().mean()), "gen/eos_share": float(batch.has_eos.float().mean()),
            "rollout/logprob_diff_max": float(torch.where(mask.bool(), (batch.rollout_logprobs.to(device)
                                                                        - old_logprobs).abs(), 0).max()),
            "lr": lr, "grad_norm": mean("grad_norm"),
            "time/rollout": t_sample / elapsed, "time/update": (time.perf_counter() - t_update) / elapsed,
            "time/tokens_per_s": n_tokens / max(t_sample, 1e-9), "time/step_s": elapsed,
            "dist/world_size": world.size,
        }
        if done % max(1, cfg.run.log_every) == 0 or done == end:
            logger.log(done, metrics)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['objective/score']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if t.sample_every and (done % t.sample_every == 0 or done == 1):
            rows = R.sample_rows(batch, raw, seq_kl, t.num_samples_shown)
            if world.is_main:
                R.write_samples(out, done, rows)
            bar.write(R.format_sample_table(done, rows))  # above the progress bar (printed when it is off too)
        if (cfg.run.save_every and done % cfg.run.save_every == 0) or (done == end and done < cfg.train.steps):
            world.save_checkpoint(runner, out, done, models={"policy": policy, "value": value_model},
                                  tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                                  keep=cfg.run.keep_checkpoints,
                                  state={"kl_coef": kl_ctl.value, "normalizer": normalizer.state_dict()})
    bar.close()
    logger.close()
    result = {**metrics, "step": end, "seconds": time.perf_counter() - t_run}
    if end == cfg.train.steps:
        final = {"policy": world.savable(runner, policy), "value": world.savable(runner, value_model)}  # full weights
        if world.is_main:
            save_final(final["policy"], tokenizer, out / "model")
            U.save_model_folder(out / "value_model", final["value"], tokenizer)
        world.barrier()
        result["model_dir"] = str(out / "model")
        print(f"ppo: saved {out / 'model'} (score {metrics.get('objective/score', float('nan')):.4f}, "
              f"kl {metrics.get('objective/kl', float('nan')):.4f})")
    else:
        print(f"ppo: stopped at update {end} of {cfg.train.steps}; continue with --resume")
    return result


def _mean(stats: list[dict], key: str) -> float:
    return sum(s[key] for s in stats) / len(stats)


def policy_and_values(modules, sub: R.RolloutBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The training forward of both models, (B, T) log-probs and values; run inside the engine's wrapper."""
    return R.forward_logprobs(modules.policy, sub, temperature)[0], R.forward_values(modules.value, sub)


def train_minibatch(cfg: PPOConfig, batch: R.RolloutBatch, mb: list[int], runner: D.Runner, world: D.World,
                    old_logprobs: torch.Tensor, old_values: torch.Tensor, advantages: torch.Tensor,
                    returns: torch.Tensor, temperature: float) -> dict[str, float]:
    """Forward/backward of one minibatch in micro-batches; gradients sum to the full-minibatch token mean.
    Data parallel: this rank takes its contiguous share of mb; N / world size as normaliser, since the engine
    averages the ranks' gradients. Returns token-weighted stats over the whole minibatch (all ranks agree)."""
    mask = batch.completion_mask
    n_tokens = int(mask[mb].sum())
    normalizer = (n_tokens if cfg.loss_aggregation == "token-mean" else len(mb)) / world.size
    acc = {"loss_policy": 0.0, "loss_value": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "vf_clipfrac": 0.0,
           "ratio_min": float("inf"), "ratio_max": float("-inf")}
    local = list(R.micro_batches(world.shard(mb), cfg.train.micro_batch_size))
    for k, idx in enumerate(local):
        sub = batch.select(idx)
        index = torch.as_tensor(idx, device=mask.device)
        m = mask[index]
        with world.accumulate(runner, last=k == len(local) - 1):
            logprobs, values = runner(policy_and_values, sub, temperature)
            pg_loss, pg = core.ppo_policy_loss(logprobs=logprobs, old_logprobs=old_logprobs[index],
                                               advantages=advantages[index], mask=m, clip_coef=cfg.clip_coef,
                                               clip_coef_high=cfg.clip_coef_high or None,
                                               aggregation=cfg.loss_aggregation, normalizer=normalizer)
            vf_loss, vf = core.value_loss(values=values, old_values=old_values[index], returns=returns[index],
                                          mask=m, clip_coef=cfg.value_clip_coef or None,
                                          aggregation=cfg.loss_aggregation, normalizer=normalizer)
            loss = pg_loss + cfg.vf_coef * vf_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"PPO loss is {loss.item()} (policy {pg_loss.item()}, value {vf_loss.item()})")
            world.backward(loss)
        share = int(m.sum()) / max(1, n_tokens)
        acc["loss_policy"] += pg_loss.item() / world.size  # a rank's loss is W x its share of the minibatch's
        acc["loss_value"] += vf_loss.item() / world.size
        for key, val in (("clipfrac", pg["clipfrac"]), ("approx_kl", pg["approx_kl"]),
                         ("vf_clipfrac", vf["vf_clipfrac"])):
            acc[key] += float(val) * share
        acc["ratio_min"] = min(acc["ratio_min"], float(pg["ratio_min"]))
        acc["ratio_max"] = max(acc["ratio_max"], float(pg["ratio_max"]))
    if world.size > 1:  # sums of the ranks' shares; the same numbers on every rank, so early stops agree
        low, high = world.reduce_floats({"min": acc.pop("ratio_min"), "-max": -acc.pop("ratio_max")}, "min").values()
        acc = {**world.reduce_floats(acc), "ratio_min": low, "ratio_max": -high}
    return acc
