"""Loading user Python functions named on the command line: `module.sub:function` or `path/to/file.py:function`.
A module is looked up on sys.path, then in the current folder; a file's own folder goes on sys.path, so either can
import its neighbours.

Reward functions, simulated-annotator preferences and gold scores all use the same signature:
    fn(prompts: list[str], completions: list[str], **columns) -> list[float]
`columns` holds extra fields of the prompt records (e.g. a translation `reference`) when fn accepts them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Callable

from rlhfkit.errors import UserError


def load_function(spec: str, what: str = "reward.function") -> Callable:
    if ":" not in spec:
        raise UserError(f"{what}: expected MODULE:FUNCTION or path/to/file.py:FUNCTION, got {spec!r}")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise UserError(f"{what}: file {target!r} not found")
        _on_path(path.resolve().parent)  # as `python file.py` does: the file may import modules beside it
        mod_name = f"rlhfkit_user_{abs(hash(str(path.resolve())))}"
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except Exception as err:  # user code failing at import is a user error with its own message
            raise UserError(f"{what}: importing {target} failed: {type(err).__name__}: {err}") from None
    else:
        try:
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as err:
                if err.name != target.split(".")[0] or not _on_path(Path.cwd()):
                    raise
                module = importlib.import_module(target)  # a module in the current folder, as `python -m` finds
        except ImportError as err:
            raise UserError(f"{what}: cannot import module {target!r} ({err})") from None
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise UserError(f"{what}: {target!r} has no function {name!r}")
    return fn


def _on_path(folder: Path) -> bool:
    """Put folder on sys.path (first, as Python does for a script's folder); False if it was there already."""
    entries = {Path(p or ".").resolve() for p in sys.path}
    if folder.resolve() in entries:
        return False
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    return True


def call_scorer(fn: Callable, prompts: list[Any], completions: list[str], columns: dict[str, list] | None = None,
                what: str = "reward.function") -> list[float]:
    """Call fn(prompts, completions, **columns) and check it returns one finite float per completion."""
    kwargs = {}
    if columns:
        params = inspect.signature(fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs = dict(columns)
        else:
            kwargs = {k: v for k, v in columns.items() if k in params}
    out = fn(prompts, completions, **kwargs)
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise UserError(f"{what}: must return a list of numbers, got {type(out).__name__}") from None
    if len(values) != len(completions):
        raise UserError(f"{what}: returned {len(values)} scores for {len(completions)} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(f"{what}: returned a non-finite score ({values[bad[0]]}) for completion {bad[0]}")
    return values
