"""What every RL trainer (PPO, GRPO, RLOO) shares besides the math in rlhfkit.core: plain functions, no base class.

    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in prompts], max_length=256)
    batch = generate_rollout(policy, tokenizer, prompts, prompt_ids, gen, seed=step)   # RolloutBatch
    logprobs, entropy = forward_logprobs(policy, batch, temperature)                   # (B, T) each
    ref_logprobs = reference_logprobs(policy, ref_model, batch, temperature)           # ref_model None: LoRA off
    values = forward_values(value_model, batch)                                        # (B, T)

Layout of a RolloutBatch: the prompt left-padded to width P, then the completion right-padded to width T, in one
(B, P + T) tensor; position ids are cumsum(attention_mask) - 1, exactly the positions the sampler used, and
logits are divided by the sampling temperature, so the training forward reproduces the sampling log-probs
(PITFALLS 1; the PPO ratio is exactly 1 on the first minibatch of an update, PITFALLS 2).
Rows selected from a batch keep both widths: a row's numbers never depend on which other rows share its forward.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from rlhfkit import models as M
from rlhfkit.config import GenConfig, ModelConfig
from rlhfkit.core import entropy_from_logits, gather_logprobs, has_eos, masked_mean, masked_sum, response_mask
from rlhfkit.data.collate import additive_mask, causal_padding_allowed, pad_sequences, position_ids_from_mask
from rlhfkit.errors import UserError
from rlhfkit.heads import scalar_outputs
from rlhfkit.rollout import DECODER_REUSE_MAX_BYTES, FastDecoder, decoder_for, fast_unsupported_reason, sample


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor
    """(B, P + T): prompt left-padded to P, completion right-padded to T."""
    attention_mask: torch.Tensor
    """(B, P + T): 1 on real prompt and completion tokens (through EOS)."""
    position_ids: torch.Tensor
    """(B, P + T): cumsum(attention_mask) - 1, clamped at 0."""
    completion_ids: torch.Tensor
    """(B, T) sampled ids, pad after the end."""
    completion_mask: torch.Tensor
    """(B, T) 1 up to and including the first EOS (the tokens that get log-probs, rewards and losses)."""
    has_eos: torch.Tensor
    """(B,) bool: the completion ended with EOS (else it was cut at gen.max_new_tokens)."""
    rollout_logprobs: torch.Tensor
    """(B, T) log-probs reported by the sampler (diagnostics; trainers recompute them with forward_logprobs)."""
    prompt_width: int
    """P."""
    prompts: list
    """The prompts as given (strings or chat messages), one per row."""
    completions: list[str]
    """Decoded completion text (cut at EOS), one per row."""
    columns: dict
    """Extra prompt-record fields as lists (passed to reward functions that ask for them)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor | list[int]) -> RolloutBatch:
        """Rows idx, same P and T."""
        idx_list = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        index = torch.as_tensor(idx_list, dtype=torch.long, device=self.input_ids.device)
        tensors = {f.name: getattr(self, f.name).index_select(0, index) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **tensors, prompts=[self.prompts[i] for i in idx_list],
                       completions=[self.completions[i] for i in idx_list],
                       columns={k: [v[i] for i in idx_list] for k, v in self.columns.items()})

    def to(self, device: torch.device) -> RolloutBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


# ----------------------------------------------------------------------------------------------------------------
# Prompts and rollouts


def encode_prompts(tokenizer: Any, prompts: list[Any], max_length: int) -> list[list[int]]:
    """Token ids of each prompt (chat template for conversations); longer prompts keep their last max_length
    tokens (the end of a prompt is what the completion continues)."""
    out = []
    for p in prompts:
        ids = M.encode_prompt(tokenizer, p)
        if not ids:
            raise UserError(f"data.prompts: prompt {str(p)[:40]!r} encodes to zero tokens")
        out.append(ids[-max_length:])
    return out


def prompt_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of n prompts for pass `epoch` over the prompt set, depending only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Prompt indices of batch `step`: items [step*B, (step+1)*B) of the stream that visits all n_items in a
    fresh seeded permutation per pass. Resumable from the step alone."""
    orders: dict[int, torch.Tensor] = {}
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_items)
        if epoch not in orders:
            orders[epoch] = prompt_order(n_items, seed, epoch)
        out.append(int(orders[epoch][pos]))
    return out


def make_rollout_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]],
                       rollout_logprobs: list[list[float]] | None, *, pad_id: int, eos_id: int,
                       prompts: list, completions: list[str], columns: dict | None = None) -> RolloutBatch:
    """Pack prompts and sampled completions into a RolloutBatch (CPU tensors)."""
    prompt, prompt_mask = pad_sequences(prompt_ids, pad_id, side="left")  # (B, P)
    width = max(1, max(len(c) for c in completion_ids))
    completion, filled = pad_sequences(completion_ids, pad_id, side="right", length=width)  # (B, T)
    lengths = filled.sum(-1)  # (B,)
    mask = response_mask(completion, eos_id, lengths)  # (B, T), through the first EOS
    eos = has_eos(completion, eos_id, lengths)  # (B,)
    lp = torch.zeros(completion.shape, dtype=torch.float32)
    if rollout_logprobs is not None:
        for i, row in enumerate(rollout_logprobs):
            lp[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    attention = torch.cat([prompt_mask, mask], 1)  # (B, P+T)
    return RolloutBatch(
        input_ids=torch.cat([prompt, completion], 1), attention_mask=attention,
        position_ids=position_ids_from_mask(attention), completion_ids=completion, completion_mask=mask,
        has_eos=eos, rollout_logprobs=lp, prompt_width=prompt.shape[1], prompts=list(prompts),
        completions=list(completions), columns=dict(columns or {}))


def generate_rollout(policy: Any, tokenizer: Any, prompts: list, prompt_ids: list[list[int]], gen: GenConfig,
                     seed: int, columns: dict | None = None, device: torch.device | None = None) -> RolloutBatch:
    """Sample one completion per prompt (repeat prompts for groups) and pack the result; tensors on `device`."""
    samples = sample(policy, tokenizer, prompt_ids, gen, seed=seed)
    texts = [M.decode_completion(tokenizer, c, p) for c, p in zip(samples.completion_ids, samples.prompt_ids)]
    batch = make_rollout_batch(samples.prompt_ids, samples.completion_ids, samples.logprobs,
                               pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, prompts=prompts,
                               completions=texts, columns=columns)
    return batch.to(device) if device is not None else batch


# ----------------------------------------------------------------------------------------------------------------
# Training forward passes


def sampling_temperature(gen: GenConfig) -> float:
    """The temperature the training forward divides logits by: gen.temperature, 1 for greedy."""
    return gen.temperature if gen.temperature > 0 else 1.0


def forward_logprobs(model: Any, batch: RolloutBatch, temperature: float, with_entropy: bool = False,
                     group: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the completion tokens, (B, T) float32, under softmax(logits / temperature); with_entropy also
    returns the per-token entropy of that distribution (no gradient). Differentiable when grad is enabled.

    Logits at position P-1+t predict completion token t; only those T positions go through the LM head.
    group > 1 (GRPO/RLOO): consecutive runs of `group` rows share one prompt, which then goes through the model
    once, its KV cache shared by the run's completions (`shared_prompt_logprobs`); the numbers equal the one-pass
    forward's to float rounding. A trainer passes the same group to every pass of a run, so the old, reference and
    training log-probs of a row are computed the same way. Rows not in such runs take the one-pass forward."""
    if group > 1 and _in_runs(batch, group) and _sharing_works(model, batch, temperature, group):
        return shared_prompt_logprobs(model, batch, temperature, with_entropy, group)
    T = batch.completion_ids.shape[1]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, :-1]  # (B, T, V): positions P-1 .. P+T-2
    return _completion_logprobs(logits, batch.completion_ids, temperature, with_entropy)


def prompt_group(G: int, world: Any, rows: tuple[int, ...]) -> int:
    """G when the forwards of a run may compute each prompt once for its G rows (shared_prompt_logprobs), else 0.
    rows: the global sizes a pass sees (rollout batch, minibatch, micro-batch); each rank's share of the first two
    and the micro-batch must hold whole groups, and the trainer then draws its minibatches as whole groups. Every
    micro-batch then holds the same number of prompts, so a row's log-probs do not depend on which groups share its
    forward (the first ratio stays exactly 1). Not under FSDP / ZeRO-3 (sharded layers expect one forward per
    step)."""
    *global_sizes, micro = rows
    units = [n // world.size for n in global_sizes] + [micro]
    return G if G > 1 and not world.shards_params and all(n % G == 0 for n in units) else 0


def shared_prompt_logprobs(model: Any, batch: RolloutBatch, temperature: float, with_entropy: bool = False,
                           group: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """forward_logprobs for B rows in consecutive runs of `group` rows with the same prompt (GRPO's layout): pass 1
    runs the B / group prompts (left-padded, width P) to fill a KV cache, which is cut to the first P - 1 columns
    and indexed to the B rows (autograd sums the rows' gradients into the shared prompt); pass 2 runs, per row, the
    prompt's last token and the T completion tokens at positions P-1.. on top of it: its first T logits predict the
    completion. Skips (G-1)/G of the prompt tokens in the forward and the backward: the longer the prompt, the
    larger the saving (docs/critic_free.md).

    A row's numbers never depend on what the other rows hold, which keeps the first PPO ratio exactly 1: the runs,
    not the prompts' text, decide pass 1's rows; pass 1 gets a 4D mask (from a 2D mask without padding transformers
    would pick another attention kernel); and the last position of each pass is one nobody reads (the cut column,
    the token after the completion), because torch's elementwise kernels round the last few elements of a
    contiguous tensor differently (scalar tail), as in the one-pass forward, whose last position is never read."""
    P, device = batch.prompt_width, batch.input_ids.device
    row_of = torch.arange(len(batch), device=device) // group  # (B,) run of each row
    mask = additive_mask(causal_padding_allowed(batch.attention_mask[::group, :P].bool()),
                         model.get_input_embeddings().weight.dtype)  # (U, 1, P, P)
    first = model(input_ids=batch.input_ids[::group, :P], attention_mask=mask,
                  position_ids=batch.position_ids[::group, :P], use_cache=True, logits_to_keep=1)
    cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
    if cache is None:
        raise _NoCache
    cache.crop(-1)  # drop column P-1 (negative: "remove this many", in every transformers version)
    cache.batch_select_indices(row_of)
    logits = model(input_ids=batch.input_ids[:, P - 1:], attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids[:, P - 1:], use_cache=True,
                   **{_cache_keyword(model): cache}).logits[:, :-1]  # (B, T, V)
    return _completion_logprobs(logits, batch.completion_ids, temperature, with_entropy)


def _completion_logprobs(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float,
                         with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, V) logits that predict the (B, T) completion tokens -> their log-probs and (no gradient) entropy."""
    logprobs = gather_logprobs(logits, completion_ids, temperature)  # (B, T)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.float() / temperature)  # (B, T)
    return logprobs, entropy


class _NoCache(Exception):
    """The model returned no KV cache (e.g. gradient checkpointing in training mode turns it off)."""


def _cache_keyword(model: Any) -> str:
    """The forward's name of the KV-cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


_SHARING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _in_runs(batch: RolloutBatch, group: int) -> bool:
    """Whether the rows come in consecutive runs of `group` rows with the same prompt (ids and mask)."""
    if len(batch) % group or batch.prompt_width < 2:  # (a prompt width of 1 leaves nothing to share)
        return False
    P = batch.prompt_width
    key = torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P]], 1).unflatten(0, (-1, group))
    return bool((key == key[:, :1]).all())


def _sharing_works(model: Any, batch: RolloutBatch, temperature: float, group: int) -> bool:
    """Whether shared_prompt_logprobs reproduces the one-pass forward for this model (checked once per model on
    its first batch, without gradient: max |Δ log-prob| < 1e-3 in float32, 5e-2 in half precision). Architectures
    whose cache cannot be indexed or extended this way fall back to the one-pass forward, with a note."""
    try:
        return _SHARING[model]
    except (KeyError, TypeError):
        pass
    reason = ""
    try:
        with torch.no_grad():
            shared, _ = shared_prompt_logprobs(model, batch, temperature, group=group)
            full, _ = forward_logprobs(model, batch, temperature)
        real = batch.completion_mask.bool()
        diff = float((shared - full).abs()[real].max()) if bool(real.any()) else 0.0
        tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
        if not diff < tol:
            reason = f"log-probs differ by {diff:.2g}"
    except Exception as err:  # any architecture-specific failure means: do not share
        reason = f"{type(err).__name__}: {str(err)[:120]}"
    if reason:
        print(f"note: prompt sharing off for {type(model).__name__} ({reason}); one forward pass per row",
              file=sys.stderr, flush=True)
    with contextlib.suppress(TypeError):
        _SHARING[model] = not reason
    return not reason


def forward_values(value_model: Any, batch: RolloutBatch) -> torch.Tensor:
    """Value of the state before each completion token, (B, T) float32: the scalar head at position P-1+t
    (the same hidden state that predicts token t), lm-human-preferences / TRL convention."""
    P = batch.prompt_width
    v = scalar_outputs(value_model, batch.input_ids, batch.attention_mask, batch.position_ids)  # (B, P+T)
    return v[:, P - 1: -1]


def adapter_disabled(model: Any):
    """Context manager: a PEFT model with its adapters off (the LoRA reference policy); others unchanged."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


@torch.no_grad()
def reference_logprobs(policy: Any, ref_model: Any | None, batch: RolloutBatch, temperature: float,
                       group: int = 0, fast: bool = True) -> torch.Tensor:
    """(B, T) log-probs under the reference policy: ref_model, or (ref_model None) the LoRA policy with its
    adapter disabled, which is the frozen base model without a second copy in memory.
    fast (gen.backend other than hf): a frozen ref_model that FastDecoder supports is scored on its folded weights
    (`frozen_decoder`), built once per run; the numbers equal forward_logprobs' to float rounding."""
    if ref_model is not None:
        engine = frozen_decoder(ref_model) if fast else None
        if engine is None:
            return forward_logprobs(ref_model, batch, temperature, group=group)[0]
        return engine.completion_logprobs(batch.input_ids, batch.attention_mask, batch.position_ids,
                                          batch.prompt_width, batch.completion_ids, temperature,
                                          group if group > 1 and _in_runs(batch, group) else 0)
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("reference_logprobs: ref_model is None but the policy has no LoRA adapter to disable")
    with adapter_disabled(policy):
        return forward_logprobs(policy, batch, temperature, group=group)[0]


def frozen_decoder(model: Any) -> FastDecoder | None:
    """A FastDecoder over a frozen model (every parameter requires_grad False) on CPU, built on first use and kept
    (`rollout.decoder_for`, reuse): a no-gradient forward on folded, prepacked weights with none of the modules'
    per-call overhead (GPT-2 reference pass 2-3x faster, bench/README.md). It is rebuilt when a weight changes
    through torch (a new tensor or an in-place op: load_state_dict, copy_); changes made through `.data` are not
    seen, so a caller that edits a reference that way must not rely on this. None (use the modules) on GPU, under
    autocast, for an architecture FastDecoder does not implement, for a model with trainable weights, or above
    rollout.DECODER_REUSE_MAX_BYTES."""
    params = list(model.parameters())
    if (not params or params[0].device.type != "cpu" or any(p.requires_grad for p in params)
            or torch.is_autocast_enabled("cpu") or fast_unsupported_reason(model) is not None
            or sum(p.numel() * p.element_size() for p in params) > DECODER_REUSE_MAX_BYTES):
        return None
    return decoder_for(model, 8, reuse=True)


def load_reference(policy: Any, cfg: ModelConfig, device: torch.device) -> Any | None:
    """The frozen reference policy: None for a LoRA policy without model.reference (use the adapter-off base), else
    a fresh load of model.reference (default: the starting model.name) in eval mode without gradients."""
    reference = getattr(cfg, "reference", "")
    if hasattr(policy, "disable_adapter") and not reference:
        return None
    ref = M.load_causal_lm(cfg, device, name=reference or None).eval()
    ref.requires_grad_(False)
    return ref


def micro_batches(indices: torch.Tensor | list[int], size: int) -> Iterator[list[int]]:
    """Consecutive chunks of `size` indices."""
    idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    for i in range(0, len(idx), size):
        yield idx[i: i + size]


@torch.no_grad()
def score_rollout_forward(model: Any, batch: RolloutBatch, temperature: float, micro_batch_size: int,
                          with_entropy: bool = False, group: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """forward_logprobs over the whole batch in micro-batches (no gradient): (B, T) log-probs, (B, T) entropy."""
    lps, ents = [], []
    for idx in micro_batches(range(len(batch)), micro_batch_size):
        lp, ent = forward_logprobs(model, batch.select(idx), temperature, with_entropy, group)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), (torch.cat(ents) if with_entropy else None)


@torch.no_grad()
def values_forward(value_model: Any, batch: RolloutBatch, micro_batch_size: int) -> torch.Tensor:
    """forward_values over the whole batch in micro-batches (no gradient): (B, T)."""
    return torch.cat([forward_values(value_model, batch.select(idx))
                      for idx in micro_batches(range(len(batch)), micro_batch_size)])


# ----------------------------------------------------------------------------------------------------------------
# Statistics and sample tables


def per_sequence_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t over real tokens: (B, T) -> (B,)."""
    return masked_sum(values, mask, dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens (1: perfect critic, 0: no better than a constant)."""
    def var(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    denom = var(returns)
    return float(1 - var(returns - values) / denom) if float(denom) > 0 else 0.0


def sample_rows(batch: RolloutBatch, scores: torch.Tensor, kl: torch.Tensor, n: int) -> list[dict]:
    """The first n rows as {prompt, completion, score, kl} (kl: per-sequence sum)."""
    rows = []
    for i in range(min(n, len(batch))):
        prompt = batch.prompts[i]
        rows.append({"prompt": prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False),
                     "completion": batch.completions[i], "score": round(float(scores[i]), 4),
                     "kl": round(float(kl[i]), 4)})
    return rows


def format_sample_table(step: int, rows: list[dict], width: int = 100) -> str:
    """A plain-text table of sample rows for the console (lm-human-preferences print_samples)."""
    lines = [f"--- samples at update {step} ---"]
    for r in rows:
        text = (r["prompt"] + " ⟶ " + r["completion"]).replace("\n", "⏎")
        lines.append(f"score {r['score']:+.3f}  kl {r['kl']:+.3f}  {text[:width]}")
    return "\n".join(lines)


def write_samples(output_dir: Path, step: int, rows: list[dict]) -> None:
    """Append the rows, tagged with the update number, to output_dir/samples.jsonl."""
    with open(Path(output_dir) / "samples.jsonl", "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n" for r in rows)


def truncate_samples(output_dir: Path, step: int) -> None:
    """On resume: drop sample rows written after `step` (their updates will be redone); fresh run: remove all."""
    path = Path(output_dir) / "samples.jsonl"
    if not path.exists():
        return
    kept = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint weights


def load_weights(model: Any, folder: Path) -> None:
    """Load save_pretrained weights from `folder` into `model` in place (PEFT adapters or a full model)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise UserError(f"--resume: checkpoint {folder} does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
