"""The PPO baseline: a hand-written PPO-with-KL loop in plain PyTorch + transformers, as a user without an RL library
would write it (TRL 1.16 has no PPOTrainer). Same algorithm and sizes as `rlhfkit ppo` on the bench workload: per
update, sample 8 completions of exactly 32 tokens with HF `generate()` (KV cache on), score them, compute old,
reference and value estimates without gradients, per-token rewards -β·(log π - log π_ref) with the score on the last
token, GAE (γ 1, λ 0.95), whitened advantages, then one epoch of one minibatch: clipped policy loss + 0.1 × clipped
value loss (token mean), grad-norm clip 1, AdamW. Policy, frozen reference and value model (a scalar head on a copy
of the policy, zero-initialised) are separate models, as in rlhfkit.
"""

from __future__ import annotations

import copy
import json
from typing import Callable

import torch

from workload import BATCH, NEW_TOKENS, Workload

BETA, CLIP, VF_COEF, LAM = 0.05, 0.2, 0.1, 0.95


def _logprobs(model, ids, mask, pos, P):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1: -1]  # (B, T, V)
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, P:, None]).squeeze(-1)  # (B, T)


def _values(value_model, ids, mask, pos, P):
    hidden = value_model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    return value_model.score(hidden).squeeze(-1)[:, P - 1: -1]  # (B, T)


def _whiten(x):
    return (x - x.mean()) / (x.std() + 1e-8)


def run_ppo(w: Workload, steps: int, stamp: Callable[[], None]) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from reward_fn import positive_words

    tok = AutoTokenizer.from_pretrained(w.model_dir)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(w.model_dir, dtype=torch.float32)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    value_model = AutoModelForSequenceClassification.from_pretrained(w.model_dir, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        value_model.score.weight.zero_()
    params = list(policy.parameters()) + list(value_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, eps=1e-5)
    prompts = [json.loads(x)["prompt"] for x in w.prompts.read_text().splitlines()]
    for step in range(steps):
        batch = [prompts[(step * BATCH + i) % len(prompts)] for i in range(BATCH)]
        enc = tok(batch, return_tensors="pt", padding=True)
        P = enc["input_ids"].shape[1]
        policy.eval()
        with torch.no_grad():
            ids = policy.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # (B, P+T)
        texts = tok.batch_decode(ids[:, P:], skip_special_tokens=True)
        scores = torch.tensor(positive_words(batch, texts))  # (B,)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(ids[:, P:])], 1)  # no EOS: min = max new tokens
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        policy.train()
        with torch.no_grad():
            old_lp = _logprobs(policy, ids, mask, pos, P)
            ref_lp = _logprobs(ref, ids, mask, pos, P)
            old_v = _values(value_model, ids, mask, pos, P)
            rewards = -BETA * (old_lp - ref_lp)  # (B, T)
            rewards[:, -1] += scores
            adv, last = torch.zeros_like(rewards), torch.zeros(BATCH)
            for t in reversed(range(rewards.shape[1])):  # GAE, γ = 1, V after the last token = 0
                nxt = old_v[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros(BATCH)
                last = rewards[:, t] + nxt - old_v[:, t] + LAM * last
                adv[:, t] = last
            returns = adv + old_v
            adv = _whiten(adv)
        lp = _logprobs(policy, ids, mask, pos, P)
        ratio = torch.exp(lp - old_lp)
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP)).mean()
        v = _values(value_model, ids, mask, pos, P)
        v_clip = old_v + (v - old_v).clamp(-CLIP, CLIP)
        vf = 0.5 * torch.max((v - returns) ** 2, (v_clip - returns) ** 2).mean()
        (pg + VF_COEF * vf).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamp()
    return {}

