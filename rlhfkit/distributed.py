"""Data-parallel training on accelerate (DDP, FSDP, DeepSpeed ZeRO) for every stage: one `World` per run.

    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8 -m rlhfkit sft ...
    torchrun --nproc_per_node 8 -m rlhfkit dpo ...                                  # DDP without accelerate's CLI
    accelerate launch --multi_gpu --num_processes 2 -m rlhfkit sft ...             # CPU-only machine: gloo DDP

A trainer uses it like this (single process: the same calls, no accelerate, bit-identical to a plain loop):

    world = D.init_world(cfg.run)                    # rank, size, device; accelerate only when launched
    out = world.setup_run(cfg, argv)                 # rank 0 writes config.yaml; every rank seeds alike
    runner, optimizer = world.prepare(optimizer, model=model)   # DDP / FSDP / DeepSpeed engine, or the plain model
    batch = ...the GLOBAL batch of this step (every rank builds the same one: data position = global samples)
    for ids, ... in world.shard(micro_batches):      # this rank's contiguous share
        with world.accumulate(runner, last=...):     # gradient sync only on the last micro-batch
            loss = runner(lambda m: nll(m.model, ids)) / (n_tokens_global / world.size)
            world.backward(loss)
    grad_norm = world.clip_and_step(params, optimizer, scheduler, max_grad_norm)
    world.save_checkpoint(runner, out, step, models={"model": model}, ...)   # rank 0 writes, full weights

Design (docs/scaling.md):
- Every rank builds the same global batch; `shard` gives rank r the contiguous slice r of it. Losses are sums over
  the rank's rows divided by (global count / world size): engines average gradients over ranks, so the update is
  the single-process one over the global batch (PITFALLS 7-8; rlhfkit.core.aggregate's `normalizer`).
- Statistics over the batch (score normalisation, reward/advantage whitening) use the global batch: RL trainers
  gather the (small) rollout tensors after the sharded generation and no-grad forwards (`gather_rollout`), or use
  `masked_whiten` here, which all-reduces the moments.
- Only rank 0 writes (config, metrics, samples, checkpoints, final models); other ranks' stdout is silenced.
- Training forwards go through the engine's wrapper, `runner(fn)` = fn(modules) inside the wrapper's forward, so
  DDP/FSDP/DeepSpeed see every forward (a call that bypasses DDP's forward silently skips the gradient sync).
- accelerate (and so DeepSpeed, vLLM) is imported only when a launcher started several processes or asked for an
  engine: single-process CPU users import neither.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit.errors import UserError

ENGINE_ENV = {"ACCELERATE_USE_DEEPSPEED": "deepspeed", "ACCELERATE_USE_FSDP": "fsdp"}


class Modules(torch.nn.Module):
    """The trained models of a run under one module, so one engine (DDP/FSDP/DeepSpeed) and one optimizer hold
    them all; forward(fn, *args) runs fn(self, *args), any computation on the named children."""

    def __init__(self, **models: torch.nn.Module):
        super().__init__()
        for name, model in models.items():
            self.add_module(name, model)
        # FSDP's transformer auto-wrap reads the layer classes to shard from here (as on a transformers model)
        self._no_split_modules = sorted({c for m in models.values() for c in _no_split(m)})

    def forward(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)


def _no_split(model: Any) -> list[str]:
    for m in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        names = getattr(m, "_no_split_modules", None)
        if names:
            return list(names)
    return []


class Runner:
    """runner(fn, *args) = fn(modules, *args) through the engine's forward; `.modules` is the unwrapped Modules."""

    def __init__(self, modules: Modules, wrapped: Any):
        self.modules, self.wrapped = modules, wrapped

    def __call__(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(fn, *args, **kwargs)


@dataclass
class World:
    """Where this process sits: rank, world size, device, and the accelerate.Accelerator when launched."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def engine(self) -> str:
        """single (no launcher), ddp, fsdp or deepspeed."""
        if self.accelerator is None:
            return "single"
        name = self.accelerator.distributed_type.name
        if name in ("DEEPSPEED", "FSDP"):
            return name.lower()
        return "ddp" if self.size > 1 else "single"

    @property
    def shards_params(self) -> bool:
        """True when no rank holds the full weights (FSDP, ZeRO-3): saving gathers them, forwards run in lockstep."""
        if self.engine == "fsdp":
            return True
        return self.engine == "deepspeed" and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def describe(self) -> str:
        if self.accelerator is None:
            return "world size 1 (single process)"
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        mp = self.accelerator.mixed_precision
        return (f"world size {self.size} (engine {self.engine}, backend {backend}, rank {self.rank}, device "
                f"{self.device}{', mixed precision ' + mp if mp != 'no' else ''})")

    # ------------------------------------------------------------------------------------------------------------
    # Run setup and rank-0-only output

    def setup_run(self, cfg: Any, argv: list[str] | None = None) -> Path:
        """rlhfkit.train_utils.setup_run on rank 0 (config.yaml, command.txt, old checkpoints); seeds and threads on
        every rank (the same seed: identical model inits and data order); the others wait for rank 0."""
        from rlhfkit import train_utils as U

        if self.is_main:
            out = U.setup_run(cfg, argv)
        else:
            if cfg.run.threads:
                torch.set_num_threads(cfg.run.threads)
            U.seed_everything(cfg.run.seed)
            out = Path(cfg.run.output_dir)
        self.barrier()
        return out

    def logger(self, output_dir: Path, report_to: str = "none", resume_step: int | None = None, **kwargs: Any):
        """MetricLogger (metrics.jsonl) on rank 0, a no-op logger elsewhere."""
        from rlhfkit import train_utils as U

        if self.is_main:
            return U.MetricLogger(output_dir, report_to, resume_step=resume_step, **kwargs)
        return _NullLogger()

    def check_split(self, n: int, what: str, hint: str = "") -> int:
        """n / world size, or a UserError: a global batch must split evenly over the processes."""
        if n % self.size:
            raise UserError(f"{what}: {n} does not split over {self.size} processes{hint}")
        return n // self.size

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of a global list (len divisible by the world size: see check_split)."""
        n = self.check_split(len(items), "batch")
        return items[self.rank * n: (self.rank + 1) * n]

    # ------------------------------------------------------------------------------------------------------------
    # The engine: prepare, forward, backward, step

    def prepare(self, optimizer: Any, micro_batch_size: int = 1, max_grad_norm: float = 0.0,
                **models: torch.nn.Module) -> tuple[Runner, Any]:
        """Put the trained models under one engine with the optimizer: returns (runner, optimizer to step).

        Single process: the plain models. Launched: accelerate's prepare picks DDP, FSDP or DeepSpeed from the
        accelerate config. The optimizer must have been built over these models' parameters."""
        modules = Modules(**models)
        if self.accelerator is None:
            return Runner(modules, modules), optimizer
        if self.engine == "deepspeed":
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = micro_batch_size  # no dataloader to fill "auto" from
            ds["gradient_clipping"] = max_grad_norm  # DeepSpeed clips inside its step: use optim.max_grad_norm
        if self.shards_params and any(hasattr(m, "peft_config") for m in models.values()):
            raise UserError("model.lora_r: LoRA with FSDP or ZeRO-3 is not supported; LoRA training fits DDP or "
                            "ZeRO-2 (configs/accelerate/ddp.yaml, zero2.yaml; docs/scaling.md)")
        wrapped, optimizer = self.accelerator.prepare(modules, optimizer)
        return Runner(modules, wrapped), optimizer

    def accumulate(self, runner: Runner, last: bool):
        """Context for one micro-batch's forward + backward: gradients are synchronised across ranks only on the
        last micro-batch of an optimizer step (DDP no_sync; DeepSpeed's accumulation boundary)."""
        if self.accelerator is None:
            return contextlib.nullcontext()
        self.accelerator.gradient_state._set_sync_gradients(last)  # read by accelerator.backward (DeepSpeed)
        if last or self.engine == "deepspeed":
            return contextlib.nullcontext()
        return self.accelerator.no_sync(runner.wrapped)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_and_step(self, params: list, optimizer: Any, scheduler: Any, max_grad_norm: float,
                      runner: Runner | None = None) -> float:
        """Clip, step, zero the gradients; returns the global gradient norm (train_utils.clip_and_step under DDP,
        whose gradients are whole on every rank; the engine's own clipping under FSDP and DeepSpeed)."""
        from rlhfkit import train_utils as U

        if self.engine in ("single", "ddp"):
            return U.clip_and_step(params, optimizer, scheduler, max_grad_norm)
        if self.engine == "deepspeed":  # the engine clipped and stepped inside backward() of the last micro-batch
            norm = float(self.accelerator.clip_grad_norm_(params, max_grad_norm) or 0.0)
        else:
            wrapped_params = list(runner.wrapped.parameters()) if runner is not None else params
            norm = float(self.accelerator.clip_grad_norm_(wrapped_params, max_grad_norm or float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(torch.tensor(norm)):
            raise FloatingPointError(f"gradient norm is {norm}: the loss diverged (try a lower optim.lr)")
        if scheduler is not None:
            scheduler.step()
        return norm

    def autocast(self):
        """The launcher's mixed precision (accelerate --mixed_precision bf16) for forwards outside the engine's
        wrapper (sampling, reference and old log-probs), so they match the training forward."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------------------
    # Collectives (no-ops in a single process)

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """sum, mean, max or min over ranks, returned as a new tensor (the input is left as it was)."""
        if self.size == 1:
            return tensor.clone()
        out = tensor.detach().clone().to(self._comm_device())
        red = {"sum": torch.distributed.ReduceOp.SUM, "mean": torch.distributed.ReduceOp.SUM,
               "max": torch.distributed.ReduceOp.MAX, "min": torch.distributed.ReduceOp.MIN}[op]
        torch.distributed.all_reduce(out, red)
        if op == "mean":
            out = out / self.size
        return out.to(tensor.device)

    def reduce_floats(self, values: dict[str, float], op: str = "sum") -> dict[str, float]:
        """Python floats reduced over ranks in one float64 all-reduce (logging statistics)."""
        if self.size == 1 or not values:
            return dict(values)
        total = self.all_reduce(torch.tensor(list(values.values()), dtype=torch.float64), op)
        return dict(zip(values, total.tolist()))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0 in rank order (dim 0 may differ between ranks; the other
        dims must agree)."""
        if self.size == 1:
            return tensor
        device = tensor.device
        local = tensor.detach().to(self._comm_device())
        sizes = [int(n) for n in self.gather_objects(local.shape[0])]
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(device)

    def gather_objects(self, obj: Any) -> list:
        """Every rank's picklable object, in rank order."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def _comm_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def savable(self, runner: Runner, model: Any) -> Any:
        """`model` for rank 0's save_pretrained: itself when its weights are whole on rank 0, else a proxy that
        saves the full weights gathered from all ranks (a collective: every rank calls this)."""
        if not self.shards_params:
            return model
        name = next(n for n, m in runner.modules.named_children() if m is model)
        full = self.accelerator.get_state_dict(runner.wrapped)
        if not self.is_main:
            return None
        prefix = name + "."
        return _FullWeights(model, {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})

    def trainable_state(self, runner: Runner, model: Any) -> dict[str, torch.Tensor]:
        """{name: CPU tensor} of model's trainable parameters, whole even under FSDP / ZeRO-3 (collective)."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.shards_params:
            params = dict(model.named_parameters())
            return {n: params[n].detach().cpu() for n in names}
        full = self.savable(runner, model)
        return {} if full is None else {n: full.state[n].cpu() for n in names if n in full.state}

    def save_checkpoint(self, runner: Runner, output_dir: Path, step: int, *, models: dict[str, Any],
                        **kwargs: Any) -> None:
        """train_utils.save_checkpoint written by rank 0 with full weights. The optimizer state in it is whole
        under DDP (resumable on any number of processes); FSDP / DeepSpeed add their sharded engine state in
        engine/ (resumable on the same number of processes)."""
        from rlhfkit import train_utils as U

        full = {key: self.savable(runner, model) for key, model in models.items()}
        sharded = self.engine in ("fsdp", "deepspeed")
        if self.is_main:
            if sharded:
                kwargs["optimizer"] = None  # its state is in engine/
            U.save_checkpoint(output_dir, step, models=full, **kwargs)
        self.barrier()
        if sharded:
            self.accelerator.save_state(str(Path(output_dir) / "checkpoints" / f"step-{step:07d}" / "engine"))
            self.barrier()

    def load_engine_state(self, checkpoint: Path | None) -> None:
        """After prepare(): restore FSDP / DeepSpeed optimizer state from checkpoint/engine (no-op otherwise)."""
        if checkpoint is not None and self.engine in ("fsdp", "deepspeed"):
            folder = Path(checkpoint) / "engine"
            if not folder.is_dir():
                raise UserError(f"--resume: {checkpoint} has no engine/ state (written by a DDP run?); resume with "
                                "the engine and number of processes that wrote it")
            self.accelerator.load_state(str(folder))


class _FullWeights:
    """A model whose save_pretrained writes the given full state dict (gathered from FSDP / ZeRO-3 shards)."""

    def __init__(self, model: Any, state: dict[str, torch.Tensor]):
        self.model, self.state = model, state

    def save_pretrained(self, folder: Any, **kwargs: Any) -> None:
        self.model.save_pretrained(folder, state_dict=self.state, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class _NullLogger:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _Silent:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Starting


def launched() -> bool:
    """True when a launcher started several processes or asked for an engine / mixed precision via accelerate."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    if any(os.environ.get(k, "false").lower() == "true" for k in ENGINE_ENV):
        return True
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no") not in ("no", "")


def init_world(run: Any) -> World:
    """The World of this process. Without a launcher: one process on run.device, accelerate not imported.
    Under `accelerate launch` / `torchrun`: an accelerate.Accelerator (CPU-only machines get gloo, so
    `--multi_gpu` works there too); the device is the local rank's GPU (run.device is ignored)."""
    from rlhfkit import models as M

    if not launched():
        if os.environ.get("ACCELERATE_DYNAMO_BACKEND") is not None and not torch.cuda.is_available():
            print("note: accelerate started 1 process; on a machine without GPUs add --multi_gpu (or --config_file "
                  "configs/accelerate/ddp.yaml) to get --num_processes N processes", file=sys.stderr)
        return World(device=M.pick_device(run.device))
    try:
        from accelerate import Accelerator
    except ImportError as err:  # accelerate is a dependency; a broken install still gets one line
        raise UserError(f"distributed launch: accelerate is not importable ({err})") from None
    cpu = run.device == "cpu" or not torch.cuda.is_available()
    wanted = [name for key, name in ENGINE_ENV.items() if os.environ.get(key, "false").lower() == "true"]
    if wanted and cpu:  # accelerate would fall back to DDP without a word
        raise UserError(f"accelerate config asks for {wanted[0]}, which needs CUDA GPUs; on CPU use DDP "
                        "(accelerate launch --multi_gpu ..., or --config_file configs/accelerate/ddp.yaml)")
    if "deepspeed" in wanted and importlib.util.find_spec("deepspeed") is None:
        raise UserError("accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed")
    acc = Accelerator(cpu=cpu)
    world = World(rank=acc.process_index, size=acc.num_processes, device=acc.device, accelerator=acc)
    if not world.is_main and os.environ.get("RLHFKIT_ALL_RANKS_PRINT", "") != "1":
        sys.stdout = _Silent()  # one console story: rank 0's (errors still reach stderr from every rank)
    return world


# ----------------------------------------------------------------------------------------------------------------
# Global statistics over sharded tensors (for trainers that keep rollouts sharded)


def global_count(mask: torch.Tensor, world: World) -> int:
    """Σ mask over every rank's shard: the token count N of the global batch (aggregate(normalizer=N / W))."""
    return int(world.all_reduce(mask.bool().sum().to(torch.float64)).item())


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, world: World, shift_mean: bool = True, *,
                  unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """rlhfkit.core.masked_whiten with the mean and variance of the GLOBAL batch (all ranks' shards), from two
    all-reduces: [Σ m·x, Σ m] then Σ m·(x - mean)². Equal to core.masked_whiten on the concatenated shards up to
    float summation order (tested). Same variance convention (sample variance unless unbiased=False)."""
    from rlhfkit.core import masked_sum

    keep = mask.bool()
    moments = torch.stack([masked_sum(values.double(), keep), keep.sum().double()])
    total, n = world.all_reduce(moments).unbind()
    mean = total / n.clamp(min=1)
    sq_dev = world.all_reduce(masked_sum((values.double() - mean) ** 2, keep))
    var = sq_dev / ((n - 1) if unbiased else n).clamp(min=1)
    whitened = (values - mean.to(values.dtype)) * torch.rsqrt(var + eps).to(values.dtype)
    if not shift_mean:
        whitened = whitened + mean.to(values.dtype)
    return torch.where(keep, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# ----------------------------------------------------------------------------------------------------------------
# Rollouts: sharded sampling, global widths, the gathered global batch


def chunk_seed(seed: int, chunk: int, offset: int = 0) -> int:
    """Sampling seed of rows [offset, ...) of chunk `chunk` (global rows [chunk g, (chunk + 1) g), g = gen.batch_size).
    Chunk 0 from its first row keeps `seed`: a rollout of one chunk samples as rlhfkit.rollout.sample(seed) does."""
    return seed + 1_000_003 * chunk + 10_007 * offset


def generate_rollout(world: World, policy: Any, tokenizer: Any, prompts: list, prompt_ids: list[list[int]], gen: Any,
                     seed: int, columns: dict | None = None, device: torch.device | None = None,
                     sampler: Any = None) -> Any:
    """This rank's share of a global rollout: prompts, prompt_ids and columns list the whole batch (B rows, the same on
    every rank); rank r samples rows [rB/W, (r+1)B/W). Rows are sampled in chunks of gen.batch_size on a grid fixed
    by the global row index, chunk c with chunk_seed(seed, c): when gen.batch_size divides B/W, every row's
    completion is the one a single process samples, whatever the number of processes. The RolloutBatch is padded to
    the global prompt and completion widths (P, T), so its rows are those of the single-process batch and
    `gather_rollout` can stack the shards. sampler: an object with .sample(prompt_ids, gen, seed) -> Samples
    (the vLLM engine); None samples with rlhfkit.rollout.sample."""
    from rlhfkit import models as M
    from rlhfkit import rl as R
    from rlhfkit.rollout import forget_decoder, sample

    n = world.check_split(len(prompt_ids), "train.rollout_batch_size (rows per update)")
    lo, hi, g = world.rank * n, (world.rank + 1) * n, gen.batch_size
    completions, logprobs = [], []
    try:  # the chunks share one decoder (reuse), dropped before the update changes the weights
        for c in range(lo // g, -(-hi // g)):
            a, b = max(lo, c * g), min(hi, (c + 1) * g)
            s = chunk_seed(seed, c, a - c * g)
            with world.autocast():
                out = sampler.sample(prompt_ids[a:b], gen, s) if sampler else sample(
                    policy, tokenizer, prompt_ids[a:b], gen, seed=s, reuse=True)
            completions += out.completion_ids
            logprobs += out.logprobs
    finally:
        forget_decoder(policy)
    rows = range(lo, hi)
    texts = [M.decode_completion(tokenizer, comp, prompt_ids[i]) for comp, i in zip(completions, rows)]
    cols = {k: v[lo:hi] for k, v in (columns or {}).items()}
    batch = R.make_rollout_batch([prompt_ids[i] for i in rows], completions, logprobs, pad_id=tokenizer.pad_token_id,
                                 eos_id=tokenizer.eos_token_id, prompts=prompts[lo:hi], completions=texts, columns=cols)
    P = max(len(p) for p in prompt_ids)  # the global widths (T: the longest completion on any rank)
    T = int(world.all_reduce(torch.tensor(batch.completion_ids.shape[1]), "max"))
    batch = pad_rollout(batch, P, T, tokenizer.pad_token_id)
    return batch.to(device) if device is not None else batch


def pad_rollout(batch: Any, P: int, T: int, pad_id: int) -> Any:
    """A RolloutBatch re-padded to prompt width P and completion width T (>= its own): prompts gain pad columns on
    the left, completions on the right, masked out; position ids are recomputed (unchanged on real tokens)."""
    from dataclasses import replace

    from rlhfkit.data.collate import position_ids_from_mask

    left, right = P - batch.prompt_width, T - batch.completion_ids.shape[1]
    if left == 0 and right == 0:
        return batch
    F = torch.nn.functional

    def pad(x: torch.Tensor, before: int, value: float) -> torch.Tensor:
        return F.pad(x, (before, right), value=value)

    attention = pad(batch.attention_mask, left, 0)
    return replace(batch, input_ids=pad(batch.input_ids, left, pad_id), attention_mask=attention,
                   position_ids=position_ids_from_mask(attention), completion_ids=pad(batch.completion_ids, 0, pad_id),
                   completion_mask=pad(batch.completion_mask, 0, 0), rollout_logprobs=pad(batch.rollout_logprobs, 0, 0),
                   prompt_width=P)


def gather_rollout(world: World, batch: Any, *tensors: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
    """Every rank's share stacked in rank order: the global RolloutBatch (identical on every rank) and the given
    per-row tensors (scores, log-probs, values: dim 0 = rows) likewise. Costs one all-gather per tensor of a few
    bytes per token, small next to sampling; afterwards global statistics (score normalisation, whitening,
    group baselines) and minibatch orders are computed as in one process (PITFALLS 8)."""
    from dataclasses import fields, replace

    if world.size == 1:
        return batch, list(tensors)
    stacked = {f.name: world.gather(getattr(batch, f.name)) for f in fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor)}
    text = world.gather_objects((batch.prompts, batch.completions, batch.columns))
    columns = {k: [v for _, _, cols in text for v in cols[k]] for k in batch.columns}
    batch = replace(batch, **stacked, prompts=[p for ps, _, _ in text for p in ps],
                    completions=[c for _, cs, _ in text for c in cs], columns=columns)
    return batch, [world.gather(t) for t in tensors]
