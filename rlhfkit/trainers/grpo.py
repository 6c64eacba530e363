"""Critic-free policy gradient with G completions per prompt: GRPO, Dr. GRPO, RLOO and REINFORCE++.

    rlhfkit grpo reward.function=tests/fixtures/positive_reward.py:positivity run.output_dir=runs/grpo
    rlhfkit grpo ... scale_rewards=false loss_aggregation=constant       # Dr. GRPO
    rlhfkit rloo reward.model=runs/rm data.prompts=prompts.jsonl          # RLOO, KL in the reward
    rlhfkit grpo ... advantage=reinforce_pp kl_mode=reward                # REINFORCE++ (_baseline: group mean first)
    rlhfkit grpo --config runs/grpo/config.yaml --resume                  # continue an interrupted run

Why one file: the methods differ only in how scores become advantages (rlhfkit.core functions) and in defaults;
loop, KL, checkpoints and metrics are shared. `rlhfkit rloo` = `rlhfkit grpo` with RLOOConfig's defaults. Keys:
`rlhfkit ppo`'s minus the value model's, plus train.num_generations, advantage, scale_rewards, kl_mode,
kl_loss_estimator. Explained, with measured runs, in docs/critic_free.md.

One update (`step` in metrics.jsonl), B = train.rollout_batch_size, G = train.num_generations:
  1. B / G prompts, each repeated G times, prompt-major (rows [kG, (k+1)G) share a prompt); sample, score, shape;
  2. reference log-probs in one no-grad pass; old log-probs in another only when the rollout feeds more than one
     optimizer step (or REINFORCE++); with one step (the default) the training forward's own detached log-probs
     are the old ones: ratio exactly 1, no extra pass;
  3. sequence advantages: grpo (r - mean_g) / (std_g + 1e-4), std unbiased (G - 1, as torch and TRL), no division
     with scale_rewards=false (Dr. GRPO); rloo r - mean of the other G - 1; reinforce_pp the score itself,
     reinforce_pp_baseline r - mean_g. Per token A_t = Σ_{s>=t} γ^{s-t} r_s, r_s = -β KL_s (kl_mode=reward) + that
     advantage on the last real token; both reinforce_pp modes whiten A over the batch;
  4. update_epochs x num_minibatches AdamW steps on the clipped policy loss (+ β k3 KL term, kl_mode=loss),
     token-mean over the minibatch by default; 5. adaptive β (target_kl > 0), metrics, samples, checkpoints.
Data parallel (accelerate launch / torchrun, rlhfkit.distributed): each rank samples, scores and runs the no-grad
passes for its share of the rollout; the shares are gathered, so group advantages, REINFORCE++ whitening and
minibatch orders are those of one process; each rank trains on its share of a minibatch, normaliser N / W.
"""

from __future__ import annotations

import math
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
from rlhfkit.data import load_prompts
from rlhfkit.errors import UserError, exact_div
from rlhfkit.trainers.ppo import PPODataConfig
from rlhfkit.trainers.sft import save_final
from rlhfkit.vllm_rollout import make_sampler


@dataclass
class GRPOTrainConfig:
    steps: int = 60
    """Updates; each samples one rollout batch and trains on it."""
    rollout_batch_size: int = 0
    """Completions sampled per update (B), num_generations per prompt: B / G prompts per update. 0 (auto): the
    multiple of lcm(num_generations, num_minibatches x micro_batch_size) nearest to 64 (64 for G = 2, 4, 8, 16;
    48 for G = 3, 6; 80 for G = 5), so any G works without other changes. A value given must be a multiple of G."""
    num_generations: int = 8
    """G: completions per prompt; a prompt's G completions form the group of its baseline (>= 2 for grpo, rloo)."""
    num_minibatches: int = 1
    """Optimizer steps per epoch over the rollout batch; minibatch = rollout_batch_size / num_minibatches."""
    update_epochs: int = 1
    """Passes over the rollout batch per update (GRPO's μ). With 1 x 1 the update is on-policy (ratio 1)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass; a minibatch is accumulated from minibatch / micro_batch_size of them.
    A multiple of num_generations (and a minibatch that is one) lets every pass run each prompt once for its group."""
    sample_every: int = 10
    """Print a table of samples and append them to samples.jsonl every N updates (0: never)."""
    num_samples_shown: int = 4
    """Rows in each sample table (the first rows: completions of one prompt)."""


@dataclass
class GRPOConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/grpo", log_every=1))
    model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, schedule="linear", max_grad_norm=1.0))
    gen: GenConfig = field(default_factory=lambda: GenConfig(max_new_tokens=48, temperature=1.0, batch_size=64))
    data: PPODataConfig = field(default_factory=PPODataConfig)
    reward: S.RewardConfig = field(default_factory=S.RewardConfig)
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)
    advantage: Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """grpo: group mean/std (Shao et al. 2024); rloo: leave-one-out mean (Ahmadian et al. 2024); reinforce_pp:
    returns whitened over the whole batch, no groups needed (Hu 2025); reinforce_pp_baseline: the group's mean score
    subtracted first, then the same (REINFORCE++-baseline, OpenRLHF's reinforce_baseline)."""
    scale_rewards: bool = True
    """grpo: divide by the group's std (unbiased, + 1e-4). false = Dr. GRPO (Liu et al. 2025): the division
    up-weights prompts that are almost always right or wrong; use with loss_aggregation=constant."""
    kl_mode: Literal["loss", "reward"] = "loss"
    """Where β KL(π || π_ref) enters: loss = a term of the loss (GRPO); reward = -β KL_t on every token, summed
    into the return of the tokens before it (PPO, RLOO, REINFORCE++)."""
    kl_coef: float = 0.2
    """β (initial value when target_kl > 0). 0.2 as PPO: on the tiny task (docs/critic_free.md) it holds the KL near
    PPO's; 0.05 let it drift 3x further."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward (kl_mode=reward) and in objective/kl (k1 = log π - log π_ref, as PPO)."""
    kl_loss_estimator: Literal["k3_is", "k3_plus", "k3"] = "k3_is"
    """kl_mode=loss: k3_is = k3 times π/π_old (unbiased gradient, trl PR#4638); k3_plus = k3's value with k2's
    gradient (veRL); k3 = the original GRPO term, whose gradient is biased (trl#4967)."""
    target_kl: float = 0.0
    """> 0: adaptive β steering the mean per-sequence KL (objective/kl) towards this value; 0: fixed β."""
    kl_horizon: int = 10000
    """Adaptive KL horizon in sequences: β moves by at most 20% per horizon."""
    gamma: float = 1.0
    """γ: discount of the per-token return (only matters with kl_mode=reward or reinforce_pp)."""
    clip_coef: float = 0.2
    """ε: policy ratio clip range [1 - ε, 1 + ε] (inactive in an on-policy update, where the ratio is 1)."""
    clip_coef_high: float = 0.0
    """> 0: a separate upper clip, [1 - clip_coef, 1 + clip_coef_high] (DAPO's clip-higher, e.g. 0.28); 0: clip_coef."""
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant"] = "token-mean"
    """token-mean: every token of the minibatch weighs the same (default; no length bias); seq-mean-token-mean:
    original GRPO (favours short answers); seq-mean-token-sum; constant: Σ tokens / (sequences x
    gen.max_new_tokens), Dr. GRPO's constant normaliser."""
    approx_kl_stop: float = 0.0
    """> 0: end an update early once a minibatch's approx KL(π_old || π) exceeds this; 0: never."""

    def validate(self) -> None:
        t = self.train
        if min(t.steps, t.update_epochs, t.num_minibatches, t.micro_batch_size, t.num_generations) < 1:
            raise UserError("train.steps, update_epochs, num_minibatches, micro_batch_size, num_generations: >= 1")
        if self.advantage != "reinforce_pp" and t.num_generations < 2:
            raise UserError(f"train.num_generations: advantage={self.advantage} needs a group of >= 2 completions "
                            f"per prompt, got {t.num_generations}")
        if t.rollout_batch_size == 0:
            t.rollout_batch_size = auto_rollout_batch_size(t.num_generations, t.num_minibatches * t.micro_batch_size)
        if t.rollout_batch_size % t.num_generations:
            raise UserError(f"train.rollout_batch_size: {t.rollout_batch_size} is not a multiple of "
                            f"train.num_generations={t.num_generations} (or leave it at 0 to pick one)")
        minibatch = exact_div(t.rollout_batch_size, t.num_minibatches, "train.rollout_batch_size / num_minibatches")
        exact_div(minibatch, t.micro_batch_size, "minibatch size (rollout_batch_size / num_minibatches) / "
                  "train.micro_batch_size")
        if self.gen.temperature <= 0:
            raise UserError("gen.temperature: policy-gradient training needs sampling, must be > 0")
        if not self.scale_rewards and self.advantage != "grpo":
            raise UserError("scale_rewards=false: only for advantage=grpo (rloo never divides by a std; "
                            "reinforce_pp whitens over the batch)")
        if min(self.kl_coef, self.target_kl, self.approx_kl_stop, self.clip_coef_high) < 0:
            raise UserError("kl_coef, target_kl, approx_kl_stop, clip_coef_high: must be >= 0")
        if not 0 < self.clip_coef < 1 or not 0 <= self.gamma <= 1:
            raise UserError("clip_coef must be in (0, 1); gamma in [0, 1]")


@dataclass
class RLOOConfig(GRPOConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/rloo", log_every=1))
    advantage: Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "rloo"
    kl_mode: Literal["loss", "reward"] = "reward"


def auto_rollout_batch_size(num_generations: int, rows_per_minibatch_unit: int, target: int = 64) -> int:
    """train.rollout_batch_size=0: the multiple of lcm(G, num_minibatches x micro_batch_size) nearest to `target`
    (at least one), so whole groups fill whole micro-batches of every minibatch."""
    unit = math.lcm(num_generations, rows_per_minibatch_unit)
    return unit * max(1, round(target / unit))


BATCH_WHITENED = ("reinforce_pp", "reinforce_pp_baseline")
"""Advantage modes whose per-token advantages are whitened over the whole batch."""


def needs_old_pass(cfg: GRPOConfig) -> bool:
    """True when old log-probs need their own no-grad pass: more than one optimizer step per rollout, or
    REINFORCE++ (its batch whitening needs every row's KL before any row trains)."""
    return cfg.train.update_epochs * cfg.train.num_minibatches > 1 or cfg.advantage in BATCH_WHITENED


def sequence_advantages(cfg: GRPOConfig, scores: torch.Tensor) -> torch.Tensor:
    """(B,) shaped scores, prompt-major groups of G -> (B,) per-sequence advantages (reinforce_pp: the scores)."""
    G = cfg.train.num_generations
    if cfg.advantage == "grpo":
        return core.grpo_advantages(scores, G, scale="std" if cfg.scale_rewards else "none")
    if cfg.advantage == "rloo":
        return core.rloo_advantages(scores, G)
    if cfg.advantage == "reinforce_pp_baseline":
        return core.grpo_advantages(scores, G, scale="none")  # r - group mean
    return scores


def token_advantages(cfg: GRPOConfig, *, seq_adv: torch.Tensor, logprobs: torch.Tensor,
                     ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B, T) advantages: A_t = Σ_{s>=t} γ^{s-t} r_s, r_s = -β KL_s (kl_mode=reward; 0 otherwise) + seq_adv on the
    last real token. Row-local: a row's advantages depend on that row alone (so micro-batches can compute them).
    kl_mode=loss, γ = 1: seq_adv on every real token."""
    if cfg.kl_mode == "loss" and cfg.gamma == 1.0:
        return seq_adv.unsqueeze(-1) * mask  # (B, T)
    rewards, _, _ = core.per_token_rewards(scores=seq_adv, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask,
                                           kl_coef=kl_coef if cfg.kl_mode == "reward" else 0.0,
                                           estimator=cfg.kl_estimator)
    return core.discounted_returns(rewards=rewards, mask=mask, gamma=cfg.gamma)  # (B, T)


def loss_normalizer(cfg: GRPOConfig, mask: torch.Tensor) -> tuple[str, float]:
    """(core aggregation mode, normaliser) for a minibatch with completion mask (b, T): its token count
    (token-mean), its sequence count (seq-*), or sequences x gen.max_new_tokens (constant, Dr. GRPO).
    Data parallel with averaged gradients: pass the global count / world size here (core.aggregate)."""
    if cfg.loss_aggregation == "constant":
        return "seq-mean-token-sum", float(mask.shape[0] * cfg.gen.max_new_tokens)
    if cfg.loss_aggregation == "token-mean":
        return "token-mean", float(mask.sum())
    return cfg.loss_aggregation, float(mask.shape[0])


def main(cfg: GRPOConfig, argv: list[str] | None = None) -> dict:
    name = "rloo" if isinstance(cfg, RLOOConfig) else "grpo"
    world = D.init_world(cfg.run)  # one process, or a rank of `accelerate launch` / `torchrun`
    out, device = world.setup_run(cfg, argv), world.device
    tokenizer = M.tokenizer_for(cfg.model)
    records = load_prompts(cfg.data.prompts)
    prompt_ids = R.encode_prompts(tokenizer, [r.prompt for r in records], cfg.data.max_prompt_length)
    scorer = S.load_scorer(cfg.reward, device)
    policy = M.apply_lora(M.load_causal_lm(cfg.model, device), cfg.model).eval()
    ref_model = R.load_reference(policy, cfg.model, device)
    named = list(policy.named_parameters())
    params = [p for _, p in named if p.requires_grad]
    optimizer = U.make_optimizer(params, cfg.optim, named)
    scheduler = U.make_scheduler(optimizer, cfg.optim, cfg.train.steps)  # stepped once per update
    kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl > 0
              else core.FixedKLController(cfg.kl_coef))
    normalizer = S.ScoreNormalizer(cfg.reward.normalize)
    temperature = R.sampling_temperature(cfg.gen)
    t, B, G = cfg.train, cfg.train.rollout_batch_size, cfg.train.num_generations
    minibatch = B // t.num_minibatches
    old_pass = needs_old_pass(cfg)
    share = R.prompt_group(G, world, rows=(B, minibatch, t.micro_batch_size))  # > 0: each prompt once per pass
    sampler = make_sampler(cfg.gen, cfg.model, world)  # gen.backend=vllm: a vLLM engine on this GPU; else None

    def rollout(indices: list[int], seed: int) -> R.RolloutBatch:
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
        print(f"{name}: score normalisation from {len(idx)} initial samples: mean {normalizer.mean:.4g}, "
              f"std {normalizer.std:.4g}", flush=True)
    if world.is_main:
        R.truncate_samples(out, start) if cfg.run.resume else (out / "samples.jsonl").unlink(missing_ok=True)
    world.check_split(minibatch, "minibatch size (train.rollout_batch_size / train.num_minibatches)")
    runner, optimizer = world.prepare(optimizer, t.micro_batch_size, cfg.optim.max_grad_norm, policy=policy)
    world.load_engine_state(U.latest_checkpoint(out) if cfg.run.resume else None)
    logger = world.logger(out, cfg.run.report_to, resume_step=start if cfg.run.resume else None)
    print(f"{name}: {len(records)} prompts, {B // G} x {G} completions per update, advantage {cfg.advantage}, "
          f"KL in the {cfg.kl_mode}, {M.count_parameters(policy, True):,} trainable parameters, device {device}, "
          f"reference: {'LoRA adapter off' if ref_model is None else 'frozen copy'}, {world.describe()}", flush=True)

    end = t.steps if not cfg.run.stop_after_steps else min(t.steps, start + cfg.run.stop_after_steps)
    bar = U.progress(t.steps, name, cfg.run.progress and world.is_main, initial=start, unit="update")
    t_run, metrics = time.perf_counter(), {}
    for step in range(start, end):
        t0 = time.perf_counter()
        # 1. rollout (this rank's share): each prompt G times, prompt-major; scores
        prompts = R.batch_indices(len(records), B // G, step, cfg.run.seed)
        batch = rollout([i for i in prompts for _ in range(G)], seed=cfg.run.seed * 100_003 + step)
        raw = S.score_tensor(scorer, batch.prompts, batch.completions, batch.columns)
        t_sample = time.perf_counter() - t0
        # 2. reference log-probs (and old ones when needed) of the share, no gradient; then the global batch
        rows = list(range(len(batch)))
        with world.autocast():  # the launcher's mixed precision, as in the training forward
            ref_logprobs = torch.cat([R.reference_logprobs(policy, ref_model, batch.select(i), temperature, share,
                                                           fast=cfg.gen.backend != "hf")
                                      for i in R.micro_batches(rows, t.micro_batch_size)])
            old = (R.score_rollout_forward(policy, batch, temperature, t.micro_batch_size, True, share) if old_pass
                   else ())
        batch, (raw, ref_logprobs, *old) = D.gather_rollout(world, batch, raw, ref_logprobs, *old)
        scores = S.shape_scores(raw, batch.has_eos, cfg.reward, normalizer).to(device)
        mask = batch.completion_mask
        # 3. advantages of the global batch now, or (on-policy step) in the training forward of each micro-batch
        seq_adv = sequence_advantages(cfg, scores)  # (B,)
        ro = {"ref_logprobs": ref_logprobs, "seq_adv": seq_adv, "old_logprobs": torch.zeros_like(ref_logprobs),
              "entropy": torch.zeros_like(ref_logprobs), "advantages": torch.zeros_like(ref_logprobs)}
        if old_pass:
            ro["old_logprobs"], ro["entropy"] = old
            with torch.no_grad():
                ro["advantages"] = token_advantages(cfg, seq_adv=seq_adv, logprobs=ro["old_logprobs"],
                                                    ref_logprobs=ref_logprobs, mask=mask, kl_coef=kl_ctl.value)
                if cfg.advantage in BATCH_WHITENED:  # whitened (shift and scale) over the global batch
                    ro["advantages"] = core.masked_whiten(ro["advantages"], mask, shift_mean=True)
        # 4. epochs x minibatches x micro-batches (this rank's share of each minibatch)
        t_update = time.perf_counter()
        stats, first, stopped = [], {}, False
        order_gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
        for epoch in range(t.update_epochs):
            order = (torch.randperm(B // G, generator=order_gen)[:, None] * G + torch.arange(G)).flatten() if share \
                else torch.randperm(B, generator=order_gen)  # sharing: whole groups (rl.prompt_group)
            for mb_start in range(0, B, minibatch):
                mb = order[mb_start: mb_start + minibatch].tolist()
                mb_stats = train_minibatch(cfg, batch, mb, runner, world, ro, kl_ctl.value, temperature,
                                           fill=not old_pass, share_prompts=share)
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
        if not old_pass and world.size > 1:  # each rank filled its own rows (zeros elsewhere): sum = all rows
            ro.update({k: world.all_reduce(ro[k]) for k in ("old_logprobs", "entropy", "advantages")})
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if sampler is not None:
            sampler.sync(policy)  # the vLLM engine samples the next rollout from the updated weights
        # 5. KL controller, metrics, samples, checkpoints
        old_logprobs = ro["old_logprobs"]
        kl = torch.where(mask.bool(), core.kl_estimate(cfg.kl_estimator, logprobs=old_logprobs,
                                                       ref_logprobs=ref_logprobs), 0.0)
        seq_kl = R.per_sequence_sum(kl, mask)  # (B,)
        kl_coef, mean_kl = kl_ctl.value, float(seq_kl.mean())
        kl_ctl.update(mean_kl, B)
        done = step + 1
        elapsed = time.perf_counter() - t0
        mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}.__getitem__  # over the minibatches
        metrics = {
            "objective/score": float(raw.mean()), "objective/score_shaped": float(scores.mean()),
            "objective/kl": mean_kl, "objective/kl_coef": kl_coef,
            "objective/entropy": float(R.per_sequence_sum(-old_logprobs, mask).mean()),
            "objective/non_score_reward": -kl_coef * mean_kl,
            "objective/rlhf_reward": float(scores.mean()) - kl_coef * mean_kl,
            **group_stats(raw, G),
            "advantages/mean": float(core.masked_mean(ro["advantages"], mask)),
            "advantages/abs_mean": float(core.masked_mean(ro["advantages"].abs(), mask)),
            "loss/policy": mean("loss_policy"), "loss/kl": mean("loss_kl"),
            "policy/clipfrac": mean("clipfrac"), "policy/approx_kl": mean("approx_kl"),
            "policy/entropy": float(core.masked_mean(ro["entropy"], mask)), **first,
            "policy/early_stop": float(stopped), "policy/minibatches": float(len(stats)),
            "gen/length": float(mask.sum(-1).float().mean()), "gen/eos_share": float(batch.has_eos.float().mean()),
            "rollout/logprob_diff_max": float(torch.where(mask.bool(), (batch.rollout_logprobs.to(device)
                                                                        - old_logprobs).abs(), 0).max()),
            "lr": lr, "grad_norm": mean("grad_norm"),
            "time/rollout": t_sample / elapsed, "time/update": (time.perf_counter() - t_update) / elapsed,
            "time/tokens_per_s": int(mask.sum()) / max(t_sample, 1e-9), "time/samples_per_s": B / elapsed,
            "time/step_s": elapsed, "dist/world_size": world.size}
        if done % max(1, cfg.run.log_every) == 0 or done == end:
            logger.log(done, metrics)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['objective/score']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if t.sample_every and (done % t.sample_every == 0 or done == 1):
            table = R.sample_rows(batch, raw, seq_kl, t.num_samples_shown)
            if world.is_main:
                R.write_samples(out, done, table)
            bar.write(R.format_sample_table(done, table))
        if (cfg.run.save_every and done % cfg.run.save_every == 0) or (done == end and done < t.steps):
            world.save_checkpoint(runner, out, done, models={"policy": policy}, tokenizer=tokenizer,
                                  optimizer=optimizer, scheduler=scheduler, keep=cfg.run.keep_checkpoints,
                                  state={"kl_coef": kl_ctl.value, "normalizer": normalizer.state_dict()})
    bar.close()
    logger.close()
    result = {**metrics, "step": end, "seconds": time.perf_counter() - t_run}
    if end == t.steps:
        final = world.savable(runner, policy)  # full weights (a collective under FSDP / ZeRO-3)
        if world.is_main:
            save_final(final, tokenizer, out / "model")
        world.barrier()
        result["model_dir"] = str(out / "model")
        print(f"{name}: saved {out / 'model'} (score {metrics.get('objective/score', float('nan')):.4f}, "
              f"kl {metrics.get('objective/kl', float('nan')):.4f})")
    else:
        print(f"{name}: stopped at update {end} of {t.steps}; continue with --resume")
    return result


def group_stats(raw: torch.Tensor, G: int) -> dict[str, float]:
    """Mean within-group std of the raw scores (unbiased) and the share of groups whose G scores are all equal
    (their grpo/rloo advantages are 0: no learning signal from that prompt). Empty for G = 1."""
    if G < 2:
        return {}
    groups = raw.reshape(-1, G)  # (B/G, G)
    return {"groups/score_std": float(groups.std(-1).mean()),
            "groups/zero_std_share": float((groups.max(-1).values == groups.min(-1).values).float().mean())}


def train_minibatch(cfg: GRPOConfig, batch: R.RolloutBatch, mb: list[int], runner: D.Runner, world: D.World,
                    ro: dict[str, torch.Tensor], kl_coef: float, temperature: float, fill: bool,
                    share_prompts: int = 0) -> dict[str, float]:
    """Forward/backward of this rank's share of one minibatch in micro-batches; the gradients (averaged over
    ranks by the engine) sum to the whole minibatch's aggregate. fill (on-policy single step): old log-probs are
    this forward's own, detached, and the rows' entropy, old log-probs and advantages are written into `ro`;
    otherwise they are read from it. Returns stats over the whole minibatch (all ranks agree)."""
    mask = batch.completion_mask
    mode, normalizer = loss_normalizer(cfg, mask[mb])
    normalizer /= world.size  # the engine averages the ranks' gradients
    n_tokens = mask[mb].sum().clamp(min=1)
    zero = torch.zeros((), device=mask.device)
    acc = {"loss_policy": zero, "loss_kl": zero, "clipfrac": zero, "approx_kl": zero}
    ratio_min, ratio_max = [], []
    local = list(R.micro_batches(world.shard(mb), cfg.train.micro_batch_size))
    for k, idx in enumerate(local):
        index = torch.as_tensor(idx, device=mask.device)
        m, ref = mask[index], ro["ref_logprobs"][index]
        with world.accumulate(runner, last=k == len(local) - 1):
            # the training forward inside the engine's wrapper (DDP sees it): (b, T) log-probs, entropy if fill
            logprobs, entropy = runner(lambda mods, sub: R.forward_logprobs(mods.policy, sub, temperature, fill,
                                                                            share_prompts), batch.select(idx))
            if fill:
                old = logprobs.detach()
                with torch.no_grad():
                    adv = token_advantages(cfg, seq_adv=ro["seq_adv"][index], logprobs=old, ref_logprobs=ref,
                                           mask=m, kl_coef=kl_coef)
                ro["old_logprobs"][index], ro["entropy"][index], ro["advantages"][index] = old, entropy, adv
            else:
                old, adv = ro["old_logprobs"][index], ro["advantages"][index]
            loss, pg = core.ppo_policy_loss(logprobs=logprobs, old_logprobs=old, advantages=adv, mask=m,
                                            clip_coef=cfg.clip_coef, clip_coef_high=cfg.clip_coef_high or None,
                                            aggregation=mode, normalizer=normalizer)
            acc["loss_policy"] = acc["loss_policy"] + loss.detach()
            if cfg.kl_mode == "loss" and kl_coef > 0:
                kl_loss, _ = core.kl_loss_term(logprobs=logprobs, ref_logprobs=ref, mask=m,
                                               old_logprobs=old if cfg.kl_loss_estimator == "k3_is" else None,
                                               estimator="k3_plus" if cfg.kl_loss_estimator == "k3_plus" else "k3",
                                               aggregation=mode, normalizer=normalizer)
                acc["loss_kl"] = acc["loss_kl"] + kl_loss.detach()
                loss = loss + kl_coef * kl_loss
            world.backward(loss)
        share = m.sum() / n_tokens  # token-weighted minibatch means
        acc["clipfrac"] = acc["clipfrac"] + pg["clipfrac"] * share
        acc["approx_kl"] = acc["approx_kl"] + pg["approx_kl"] * share
        ratio_min.append(pg["ratio_min"])
        ratio_max.append(pg["ratio_max"])
    # one device sync per minibatch; a rank's loss is W x its share of the minibatch's (normaliser N / W)
    out = world.reduce_floats({k: float(v) / (world.size if k.startswith("loss") else 1) for k, v in acc.items()})
    if not all(map(math.isfinite, out.values())):
        raise FloatingPointError(f"policy loss is {out['loss_policy']} (KL term {out['loss_kl']})")
    low, high = world.reduce_floats({"min": float(torch.stack(ratio_min).min()),
                                     "-max": -float(torch.stack(ratio_max).max())}, "min").values()
    return {**out, "ratio_min": low, "ratio_max": -high}
