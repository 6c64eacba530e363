"""rlhfkit's one compiled kernel: the fast decoder's float32 products on AVX2 CPUs (rlhfkit/csrc/small_linear.cpp).

    from rlhfkit import kernels
    if kernels.available():                      # built (once per machine) and loaded
        packed = kernels.pack(w)                 # w (out, in), any strides
        y = kernels.linear(x, packed, b, h, n)   # x (rows, in) -> x @ w.T + b + h, (rows, out)

`available()` compiles the C++ source with torch.utils.cpp_extension on its first call on a machine (g++ and
ninja, about 15 s, announced on stderr; a lock left by a killed build is removed after STALE_LOCK_S) and loads the cached library afterwards (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions). It is False, with one note on stderr saying why, on a non-x86 CPU, a CPU without AVX2,
with RLHFKIT_KERNELS=0, or when the build fails (no compiler): the decoder then uses oneDNN's prepacked products,
which give the same results to float rounding. Either way the ops `torch.ops.rlhfkit.small_linear[_pack]` exist
afterwards (a plain-torch reference stands in for the failed build), so TorchScript code that names them compiles.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "small_linear.cpp"
NAME = "rlhfkit_small_linear"
PANEL = 16
"""Output columns per packed panel (the kernel's NR)."""
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]

_STATE: dict = {}  # "ok": bool, "reason": why not, "lib": the stand-in library (kept alive)


def available() -> bool:
    """Whether the compiled kernel is loaded (building it on the first call on a machine)."""
    if "ok" not in _STATE:
        reason = _load()
        _STATE["ok"], _STATE["reason"] = reason is None, reason
        if reason is not None:
            print(f"note: rlhfkit's CPU product kernel is off ({reason}); the fast decoder uses oneDNN's products",
                  file=sys.stderr, flush=True)
            _define_reference()
    return _STATE["ok"]


def unavailable_reason() -> str | None:
    """Why available() is False (None when it is True)."""
    available()
    return _STATE["reason"]


def pack(w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """w (out, in) float32 CPU, any strides -> (ceil(out / 16), in, 16): panels of 16 output columns, k-major;
    scale (in,): pack w diag(scale) instead (a norm's weight folded in, without a copy of w first)."""
    if "ok" not in _STATE:
        available()  # loads the kernel (or the stand-in) that defines the op
    return torch.ops.rlhfkit.small_linear_pack(w, scale)


ACTS = {"relu": 1, "gelu_tanh": 2, "silu": 3}
"""Activations the kernel applies after the bias: canonical name (rlhfkit.rollout._ACTS) -> its `act` code."""


RMS, LAYER = 1, 2
"""Row normalisations the kernel applies to x first (`norm`): RMSNorm and LayerNorm, without their weights (fold
them into W and the bias)."""


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
           n: int, act: int = 0, norm: int = 0, eps: float = 0.0) -> torch.Tensor:
    """act(norm(x) (rows, in) @ Wᵀ + bias) + residual, (rows, n) float32, for packed = pack(W) of an (n, in) W;
    act: 0 none or an ACTS code; norm: 0 none, RMS or LAYER (with eps). A bf16/fp16 x or residual (CPU autocast)
    is converted: the product is a float32 one."""
    if "ok" not in _STATE:
        available()
    return torch.ops.rlhfkit.small_linear(x, packed, bias, residual, n, act, norm, eps)


def _load() -> str | None:
    """Load (building if needed) the kernel library; None on success, else the reason it is off."""
    if os.environ.get("RLHFKIT_KERNELS", "1").strip() == "0":
        return "RLHFKIT_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU, this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith(("AVX2", "AVX512")):
        return f"needs AVX2, torch reports CPU capability {capability}"
    try:
        from torch.utils import cpp_extension

        _prepare_build(cpp_extension)
        with _ninja_on_path():
            cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                               is_python_module=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: run without the kernel
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"build failed: {type(err).__name__}: {first[:160]}"
    return None


STALE_LOCK_S = 600
"""A build lock older than this is left over from a build that was killed (torch would wait for it forever)."""


def _prepare_build(cpp_extension) -> None:
    """Before cpp_extension.load: remove a stale build lock, and say on stderr when no built library is cached yet
    (the build takes a while)."""
    try:
        build_dir = Path(cpp_extension._get_build_directory(NAME, False))
    except Exception:  # noqa: BLE001 - a private helper; without it, neither
        return
    lock = build_dir / "lock"
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            print(f"note: removed a stale build lock {lock} (a killed build of rlhfkit's kernel)", file=sys.stderr,
                  flush=True)
    if not any(build_dir.glob(f"{NAME}*.so")):
        print(f"note: building rlhfkit's CPU product kernel ({SOURCE.name}) once for this machine, about 15 s",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def _ninja_on_path():
    """PATH with the `ninja` package's binary folder first (cpp_extension runs `ninja` from PATH; a venv's python
    run without activating the venv would not find the pip-installed one)."""
    old = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    except (ImportError, AttributeError):
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _reference_pack(w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    w = w if scale is None else w * scale
    n, k = w.shape
    panels = -(-n // PANEL)
    padded = w.new_zeros(panels * PANEL, k)
    padded[:n] = w
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def _reference_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                      residual: torch.Tensor | None, n: int, act: int = 0, norm: int = 0, eps: float = 0.0
                      ) -> torch.Tensor:
    w_t = packed.transpose(0, 1).reshape(packed.shape[1], -1)[:, :n]  # (in, n)
    x, residual = x.float(), None if residual is None else residual.float()
    if norm == RMS:
        x = torch.nn.functional.rms_norm(x, x.shape[-1:], None, eps)
    elif norm == LAYER:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], None, None, eps)
    y = x @ w_t if bias is None else torch.addmm(bias, x, w_t)
    y = {0: y, 1: y.relu(), 2: torch.nn.functional.gelu(y, approximate="tanh"), 3: torch.nn.functional.silu(y)}[act]
    return y if residual is None else y + residual


def _define_reference() -> None:
    """The ops' schemas with plain-torch implementations, for a process without the compiled kernel: TorchScript
    code that names torch.ops.rlhfkit.* then still compiles (the decoder never calls them without the kernel)."""
    if hasattr(torch.ops.rlhfkit, "small_linear"):
        return
    lib = torch.library.Library("rlhfkit", "DEF")
    lib.define("small_linear_pack(Tensor w, Tensor? scale=None) -> Tensor")
    lib.define("small_linear(Tensor x, Tensor packed, Tensor? bias, Tensor? residual, int n, int act=0, "
               "int norm=0, float eps=0.0) -> Tensor")
    lib.impl("small_linear_pack", _reference_pack, "CompositeExplicitAutograd")
    lib.impl("small_linear", _reference_linear, "CompositeExplicitAutograd")
    _STATE["lib"] = lib
