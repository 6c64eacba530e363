"""Configuration: one dataclass per stage, read from defaults < `--config file.yaml` < CLI `key.sub=value`.

Every field carries a docstring right under it (cleanrl style); `rlhfkit STAGE --help` prints them. Unknown keys
and values of the wrong type raise a `UserError` that names the key. Cross-field rules live in each config's
`validate()`. Shared parts (run, model, optim, gen) are nested dataclasses defined here.

    cfg = parse_cli(SFTConfig, ["--config", "run.yaml", "train.steps=100"], prog="rlhfkit sft")
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import shlex
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhfkit.errors import UserError

# ----------------------------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class RunConfig:
    output_dir: str = "runs/run"
    """Folder for checkpoints, metrics.jsonl, the resolved config.yaml and command.txt."""
    seed: int = 0
    """Seed for Python, NumPy and torch random number generators (same seed + data = same run)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps, or auto (cuda if available, else mps, else cpu)."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir (same as the --resume flag)."""
    log_every: int = 10
    """Write a metrics line every N optimizer steps (and at the last step)."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps; 0 evaluates only at the end."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps; 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (the final model is always kept)."""
    report_to: str = "none"
    """Extra metric sinks besides metrics.jsonl: none, tensorboard, wandb, or a comma list."""
    progress: bool = True
    """Show progress bars (tqdm) on stderr."""
    stop_after_steps: int = 0
    """Stop (with a checkpoint) after this many steps in this invocation; 0 runs to the end. Continue with --resume."""

    def validate(self) -> None:
        if not self.output_dir:
            raise UserError("run.output_dir: must not be empty")
        for key in ("log_every", "eval_every", "save_every", "keep_checkpoints", "threads", "stop_after_steps"):
            if getattr(self, key) < 0:
                raise UserError(f"run.{key}: must be >= 0, got {getattr(self, key)}")
        for sink in self.report_to.split(","):
            if sink.strip() not in ("none", "tensorboard", "wandb", ""):
                raise UserError(f"run.report_to: unknown sink {sink.strip()!r} (none, tensorboard, wandb)")


@dataclass
class ModelConfig:
    name: str = "stories260k"
    """Model to start from: `stories260k` (bundled 260K-parameter Llama), a Hugging Face hub id, or a local folder."""
    tokenizer: str = ""
    """Tokenizer id or folder; empty means the same as model.name."""
    dtype: str = "auto"
    """auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models you trust)."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights. With LoRA the reference model is the base with the adapter disabled."""
    lora_alpha: int = 16
    """LoRA scaling numerator (alpha / r scales the update)."""
    lora_dropout: float = 0.0
    """Dropout inside LoRA layers (keep 0 for RL: dropout makes sampling and training disagree)."""
    lora_target_modules: str = "all-linear"
    """Comma list of module names that get LoRA adapters, or all-linear."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower; the KV cache stays on for sampling)."""

    def validate(self) -> None:
        if not self.name:
            raise UserError("model.name: must not be empty")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"model.dtype: expected auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.lora_r < 0:
            raise UserError(f"model.lora_r: must be >= 0, got {self.lora_r}")


@dataclass
class PolicyModelConfig(ModelConfig):
    """The model section of stages that keep a frozen reference policy (PPO, GRPO/RLOO, DPO)."""

    reference: str = ""
    """Frozen reference policy π_ref (hub id or folder); empty = the starting policy model.name. With LoRA and an empty
    reference, π_ref is the policy with its adapter disabled (no second copy in memory)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.999
    """AdamW β2."""
    eps: float = 1e-5
    """AdamW ε. 1e-5 rather than PyTorch's 1e-8, as TensorFlow-era RLHF used (Huang et al. 2023)."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to the peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (cosine and linear)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise UserError(f"optim.lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm < 0:
            raise UserError(f"optim.max_grad_norm: must be >= 0, got {self.max_grad_norm}")


@dataclass
class GenConfig:
    max_new_tokens: int = 64
    """Most tokens to sample after the prompt."""
    min_new_tokens: int = 0
    """EOS is forbidden before this many new tokens."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding. RL trainers divide logits by it in training too."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p (1 disables)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 disables)."""
    batch_size: int = 64
    """Prompts sampled together in one forward pass (per process; also the unit of rollout seeding, so RL rollouts
    are the same for any number of processes when it divides rollout_batch_size / world size)."""
    backend: Literal["auto", "fast", "hf", "vllm"] = "auto"
    """fast: rlhfkit's lean KV-cache decode loop; hf: transformers generate(); auto: fast when supported; vllm (RL
    trainers, CUDA, `pip install vllm`): a vLLM engine on each GPU, weights synced after every update."""
    vllm_gpu_memory_utilization: float = 0.3
    """gen.backend=vllm: share of each GPU's memory vLLM may take for its weights and KV cache (the rest trains)."""

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"gen.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserError("gen.min_new_tokens: must be between 0 and gen.max_new_tokens")
        if self.temperature < 0:
            raise UserError(f"gen.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"gen.top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"gen.top_k: must be >= 0, got {self.top_k}")
        if self.batch_size < 1:
            raise UserError(f"gen.batch_size: must be >= 1, got {self.batch_size}")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise UserError("gen.vllm_gpu_memory_utilization: must be in (0, 1), got "
                            f"{self.vllm_gpu_memory_utilization}")


# ----------------------------------------------------------------------------------------------------------------
# Introspection: field docstrings and types


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (`x: int = 1` then `\"\"\"doc\"\"\"`), including inherited ones."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any, key: str, from_cli: bool = False) -> Any:
    """Return `value` converted to type `tp`, or raise a UserError naming `key`.

    CLI values arrive as strings and are converted; YAML values must already have the right type
    (an int is accepted for a float, and a string such as "1e-4" is read as a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, from_cli)
            except UserError:
                pass
        raise bad
    if origin is Literal:
        for choice in args:
            try:
                if coerce(value, type(choice), key, from_cli) == choice:
                    return choice
            except UserError:
                pass
        raise UserError(f"{key}: expected one of {', '.join(map(str, args))}; got {value!r}")
    if origin is list:
        if from_cli and isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v != ""]
            return [coerce(v, args[0], key, from_cli=not text.startswith("[")) for v in value]
        if not isinstance(value, list):
            raise bad
        return [coerce(v, args[0] if args else Any, key) for v in value]
    if origin is dict or tp is dict:
        if from_cli and isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise bad from None
        if not isinstance(value, dict):
            raise bad
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


# ----------------------------------------------------------------------------------------------------------------
# Merging YAML and overrides


def _section_keys(cfg: Any, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cfg):
        val = getattr(cfg, f.name)
        out.append(prefix + f.name)
        if is_dataclass(val):
            out.extend(_section_keys(val, prefix + f.name + "."))
    return out


def _unknown(root: Any, key: str) -> UserError:
    close = difflib.get_close_matches(key, _section_keys(root), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key '{key}'{hint}; see --help for the keys")


def set_key(root: Any, key: str, value: Any, from_cli: bool) -> None:
    """Set dotted `key` on the config tree `root`, converting and checking the value's type."""
    node = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in fields(node)}
        if part not in names:
            raise _unknown(root, key)
        current = getattr(node, part)
        path = ".".join(parts[: i + 1])
        if i < len(parts) - 1:
            if not is_dataclass(current):
                raise _unknown(root, key)
            node = current
            continue
        if is_dataclass(current):
            if from_cli or not isinstance(value, dict):
                raise UserError(f"{path}: is a section; set its keys, e.g. {path}.{fields(current)[0].name}=...")
            for sub, sub_value in value.items():
                set_key(root, f"{path}.{sub}", sub_value, from_cli=False)
            return
        setattr(node, part, coerce(value, _hints(type(node))[part], path, from_cli))


def apply_dict(cfg: Any, data: dict, source: str) -> None:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of config keys at the top level")
    for key, value in data.items():
        try:
            set_key(cfg, str(key), value, from_cli=False)
        except UserError as err:
            raise UserError(f"{source}: {err}") from None


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{p}: not valid UTF-8 ({err.reason})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    return data or {}


def validate_tree(cfg: Any) -> None:
    """Call `validate()` on every nested section, then on the root (whose rules may span sections)."""
    for f in fields(cfg):
        val = getattr(cfg, f.name)
        if is_dataclass(val):
            validate_tree(val)
    if hasattr(cfg, "validate"):
        cfg.validate()


def load_config(cls: type, yaml_path: str | None = None, overrides: list[str] | dict | None = None,
                validate: bool = True) -> Any:
    """Build `cls` from defaults, then a YAML file, then `key=value` overrides (strings or a dict)."""
    cfg = cls()
    if yaml_path:
        apply_dict(cfg, load_yaml(yaml_path), str(yaml_path))
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            set_key(cfg, key, value, from_cli=isinstance(value, str))
    else:
        for item in overrides or []:
            if "=" not in item:
                raise UserError(f"expected key=value, got {item!r}")
            key, value = item.split("=", 1)
            set_key(cfg, key.strip(), value, from_cli=True)
    if validate:
        validate_tree(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def help_text(cls: type, prog: str, description: str = "") -> str:
    lines = [f"usage: {prog} [--config FILE] [--print-config] [--resume] [key=value ...]", ""]
    positional = getattr(cls, "positional", ())
    if positional:
        lines[0] = f"usage: {prog} {' '.join(p.upper() for p in positional)} [--config FILE] [key=value ...]"
    if getattr(cls, "config_positional", False):
        lines[0] = f"usage: {prog} CONFIG.yaml [--print-config] [--resume] [key=value ...]"
    flags = getattr(cls, "flags", ())
    if description:
        lines += [description.strip(), ""]
    lines += ["options:",
              "  --config FILE     read keys from a YAML file (CLI key=value overrides it)",
              "  --print-config    print the resolved config as YAML and exit",
              "  --resume          continue from the newest checkpoint in run.output_dir (if the stage has one)",
              *[f"  --{f:<16}same as {f}=true" for f in flags],
              "", "keys (key=value; dotted keys reach nested sections):"]

    def walk(klass: type, obj: Any, prefix: str) -> None:
        docs, hints = field_docs(klass), _hints(klass)
        for f in fields(obj):
            val = getattr(obj, f.name)
            if is_dataclass(val):
                walk(type(val), val, prefix + f.name + ".")
                continue
            lines.append(f"  {prefix}{f.name} ({_type_name(hints[f.name])}, default {val!r})")
            if docs.get(f.name):
                lines.extend("      " + ln for ln in textwrap.wrap(docs[f.name], 100))
    walk(cls, cls(), "")
    return "\n".join(lines)


def parse_cli(cls: type, argv: list[str], prog: str, description: str = "") -> Any:
    """Parse `argv` into a validated `cls`. Handles --help, --config, --print-config, --resume.

    A config class may declare `positional = ("key", ...)` (bare arguments fill those keys), `config_positional =
    True` (the bare argument is the YAML file, as in `rlhfkit pipeline recipe.yaml`) and `flags = ("name", ...)`
    (`--name` means name=true)."""
    yaml_path, overrides, positional_values = None, [], []
    print_config, resume = False, False
    flags = set(getattr(cls, "flags", ()))
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            print(help_text(cls, prog, description))
            raise SystemExit(0)
        if arg == "--config" or arg.startswith("--config="):
            if yaml_path:
                raise UserError("give one config file (--config or the positional file), not two")
            yaml_path = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if not yaml_path:
                raise UserError("--config needs a file path")
        elif arg == "--print-config":
            print_config = True
        elif arg == "--resume":
            resume = True
        elif arg.startswith("--") and arg[2:].replace("-", "_") in flags:
            overrides.append(f"{arg[2:].replace('-', '_')}=true")
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg!r}; see {prog} --help")
        elif "=" in arg:
            overrides.append(arg)
        elif getattr(cls, "config_positional", False) and yaml_path is None:
            yaml_path = arg
        else:
            positional_values.append(arg)
    positional = list(getattr(cls, "positional", ()))
    if len(positional_values) > len(positional):
        extra = positional_values[len(positional):]
        raise UserError(f"unexpected argument {extra[0]!r}: options are key=value; see {prog} --help")
    pos_overrides = [f"{name}={value}" for name, value in zip(positional, positional_values)]
    cfg = load_config(cls, yaml_path, pos_overrides + overrides, validate=False)
    if resume:
        if not hasattr(cfg, "run"):
            raise UserError(f"{prog} has no checkpoints to resume")
        cfg.run.resume = True
    if print_config:  # a starting point for a YAML file: printed even before its required keys are given
        sys.stdout.write(to_yaml(cfg))
        try:
            validate_tree(cfg)
        except UserError as e:
            print(f"note: not runnable as it is: {e}", file=sys.stderr)
        raise SystemExit(0)
    validate_tree(cfg)
    return cfg


def write_run_files(cfg: Any, output_dir: str | os.PathLike, argv: list[str] | None = None) -> None:
    """Write the resolved config.yaml and the command line into the run folder (atomically)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    command = argv if argv is not None else sys.argv
    atomic_write_text(out / "command.txt", " ".join(shlex.quote(a) for a in command) + "\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
