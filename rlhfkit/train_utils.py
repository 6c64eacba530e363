"""Small shared pieces of every training loop: seeding, optimizer and schedule, checkpoints, metrics, progress.

Checkpoints live in `output_dir/checkpoints/step-NNNNNNN/`: a save_pretrained model folder plus
`trainer_state.pt` (optimizer, scheduler, RNG states, step, data position and any trainer extras). Each is written
to a hidden temp folder and renamed into place, so a killed run never leaves a half-written checkpoint that
`--resume` would trust.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rlhfkit.config import OptimConfig, RunConfig, write_run_files
from rlhfkit.errors import UserError, exact_div  # noqa: F401 (re-exported)

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def setup_run(cfg: Any, argv: list[str] | None = None) -> Path:
    """Seed, set threads, create the output folder and write config.yaml + command.txt. Returns the folder.

    Without --resume an existing checkpoints/ folder from an earlier run is removed (with a notice), so two runs'
    checkpoints never mix."""
    run: RunConfig = cfg.run
    if run.threads:
        torch.set_num_threads(run.threads)
    seed_everything(run.seed)
    out = Path(run.output_dir)
    if not run.resume and (out / "checkpoints").is_dir():
        print(f"note: starting a new run in {out}: removing the old checkpoints (use --resume to continue them)",
              file=sys.stderr)
        shutil.rmtree(out / "checkpoints")
    write_run_files(cfg, out, argv)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(params: Any, cfg: OptimConfig, named: list[tuple[str, torch.nn.Parameter]] | None = None):
    """AdamW; weight decay skips biases and norm weights (1-d tensors) when named parameters are given."""
    if named is not None and cfg.weight_decay > 0:
        decay = [p for n, p in named if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in named if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for p in params if p.requires_grad], "weight_decay": cfg.weight_decay}]
    # fused: one kernel per parameter tensor instead of ~10 multi-tensor ops per step. On a CPU each op is a
    # thread-pool synchronisation; the fused step measured 3-30x faster on 2 shared cores (bench/README.md)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float64)
                for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **({"fused": True} if fused else {"foreach": True}))


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at step s: linear warm-up, then cosine/linear/constant decay."""

    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return fn


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))


def clip_and_step(model_params: list[torch.nn.Parameter], optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip gradients (when max_grad_norm > 0), step optimizer and scheduler, zero grads. Returns the grad norm."""
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model_params, max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model_params if p.grad is not None]))
    if not torch.isfinite(norm):
        raise FloatingPointError(f"gradient norm is {float(norm)}: the loss diverged (try a lower optim.lr)")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def atomic_save_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_folder), then rename tmp_folder to `final` (replacing an older one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_model_folder(folder: Path, model: Any, tokenizer: Any = None, extra_files: dict[str, str] | None = None):
    """save_pretrained of model (+ tokenizer) into `folder`, atomically."""

    def write(tmp: Path) -> None:
        target = model.module if hasattr(model, "module") else model
        target.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")

    return atomic_save_dir(folder, write)


def save_checkpoint(output_dir: Path, step: int, *, models: dict[str, Any], tokenizer: Any, optimizer,
                    scheduler, state: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-N with each model in a subfolder (or at the top for the key 'policy'/'model')."""
    folder = Path(output_dir) / "checkpoints" / f"step-{step:07d}"

    def write(tmp: Path) -> None:
        for key, model in models.items():
            sub = tmp if key in ("model", "policy") else tmp / key
            target = model.module if hasattr(model, "module") else model
            target.save_pretrained(sub, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state(), **state}, tmp / "trainer_state.pt")

    atomic_save_dir(folder, write)
    prune_checkpoints(Path(output_dir), keep)
    return folder


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and (child / "trainer_state.pt").exists():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    found = list_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)


def load_trainer_state(folder: Path) -> dict:
    return torch.load(Path(folder) / "trainer_state.pt", map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------------------------------------------
# Metrics and progress


class MetricLogger:
    """Appends one JSON object per log step to metrics.jsonl; optional TensorBoard / W&B mirrors."""

    def __init__(self, output_dir: Path, report_to: str = "none", resume_step: int | None = None,
                 config: dict | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.sinks: list[Any] = []
        sinks = {s.strip() for s in report_to.split(",")}
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("run.report_to: tensorboard asked for but not installed (pip install tensorboard)")
            self.sinks.append(SummaryWriter(str(Path(output_dir) / "tensorboard")))
        if "wandb" in sinks:
            try:
                import wandb
            except ImportError:
                raise UserError("run.report_to: wandb asked for but not installed (pip install wandb)") from None
            self.sinks.append(wandb.init(dir=str(output_dir), config=config, resume="allow"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                                for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            numeric = {k: v for k, v in row.items() if isinstance(v, float) and k != "step"}
            if hasattr(sink, "add_scalar"):
                for k, v in numeric.items():
                    sink.add_scalar(k, v, step)
                sink.flush()
            else:
                sink.log(numeric, step=step)

    def close(self) -> None:
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()
            elif hasattr(sink, "finish"):
                sink.finish()


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, leave=True)


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
