"""rlhfkit.kernels: the compiled float32 product kernel of the fast decoder (rlhfkit/csrc/small_linear.cpp)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from rlhfkit import kernels

CAN_BUILD = (platform.machine().lower() in ("x86_64", "amd64")
             and torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))
             and shutil.which("c++") is not None and os.environ.get("RLHFKIT_KERNELS", "1") != "0")


def test_kernel_builds_where_it_can():
    """On an x86-64 AVX2 machine with a C++ compiler the kernel is built and loaded; elsewhere it says why not."""
    assert kernels.available() == CAN_BUILD, kernels.unavailable_reason()
    assert (kernels.unavailable_reason() is None) == CAN_BUILD


def _case(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g),
            torch.randn(m, n, generator=g))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 64, 65, 130])
@pytest.mark.parametrize("k,n", [(1, 1), (7, 15), (64, 16), (64, 17), (300, 100), (256, 48)])
def test_small_linear_equals_the_float64_product(m, k, n):
    """x Wᵀ, + b, + b + h for every tile size (1-6 rows, tiles of 4 above 6, 64-row blocks), partial panels
    (n not a multiple of 16) and odd k, against the float64 product."""
    x, w, b, h = _case(m, k, n)
    packed = kernels.pack(w)
    assert packed.shape == (-(-n // 16), k, 16)
    exact = x.double() @ w.double().t()
    tol = dict(rtol=1e-5, atol=1e-5 * k ** 0.5)
    torch.testing.assert_close(kernels.linear(x, packed, None, None, n), exact.float(), **tol)
    torch.testing.assert_close(kernels.linear(x, packed, b, None, n), (exact + b.double()).float(), **tol)
    torch.testing.assert_close(kernels.linear(x, packed, b, h, n), (exact + b.double() + h.double()).float(), **tol)


def test_rows_threads_and_strides_never_change_a_result():
    """A row's result is the same bits whether it is computed alone or among others, with 1 or 2 threads, from
    a strided x or a transposed (Conv1D) weight view: the decoder's samples cannot depend on the batch layout."""
    x, w, b, h = _case(70, 256, 1000, seed=1)
    packed = kernels.pack(w)
    full = kernels.linear(x, packed, b, h, 1000)
    alone = torch.cat([kernels.linear(x[i:i + 1], packed, b, h[i:i + 1], 1000) for i in range(70)])
    assert torch.equal(full, alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear(x, packed, b, h, 1000)
        torch.set_num_threads(2)
        two = kernels.linear(x, packed, b, h, 1000)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full) and torch.equal(two, full)
    assert torch.equal(kernels.pack(w.t().contiguous().t()), packed)  # GPT-2's Conv1D: (in, out) storage
    wide = torch.cat([x, x], 1)[:, ::2]  # non-unit inner stride: copied first
    assert torch.equal(kernels.linear(wide, packed, b, h.t().contiguous().t(), 1000),
                       kernels.linear(wide.contiguous(), packed, b, h, 1000))


def test_plain_torch_stand_in_computes_the_same():
    """The stand-in that replaces the kernel where it cannot be built (so TorchScript code naming the op still
    compiles) computes the same products."""
    x, w, b, h = _case(9, 40, 33, seed=2)
    packed = kernels._reference_pack(w)
    assert torch.equal(packed, kernels.pack(w))
    torch.testing.assert_close(kernels._reference_linear(x, packed, b, h, 33), kernels.linear(x, packed, b, h, 33))


def test_bad_inputs_are_refused_with_a_message():
    x, w, b, h = _case(4, 32, 20)
    packed = kernels.pack(w)
    with pytest.raises(RuntimeError, match="floating-point"):
        kernels.linear(x.long(), packed, b, None, 20)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.pack(w.double())
    # bf16 activations (CPU autocast): converted, a float32 product
    assert torch.equal(kernels.linear(x.bfloat16(), packed, b, h.bfloat16(), 20),
                       kernels.linear(x.bfloat16().float(), packed, b, h.bfloat16().float(), 20))
    with pytest.raises(RuntimeError, match="packed must be"):
        kernels.linear(x[:, :16], packed, b, None, 20)
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels.linear(x, packed, b, None, 40)
    with pytest.raises(RuntimeError, match="bias has"):
        kernels.linear(x, packed, b[:5], None, 20)
    with pytest.raises(RuntimeError, match="residual must be"):
        kernels.linear(x, packed, b, h[:2], 20)


def test_switched_off_the_decoder_uses_onednn_and_samples_the_same_tokens():
    """RLHFKIT_KERNELS=0: available() is False with the reason, projections fall back to oneDNN (or addmm), and a
    greedy decode gives the tokens the kernel gives (the products agree to float rounding)."""
    code = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_fast_decoder import TOK, random_prompts
from transformers import GPT2Config, GPT2LMHeadModel
from rlhfkit import kernels, rollout
from rlhfkit.config import GenConfig
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=256, n_layer=2, n_head=4)).eval()
dec = rollout.FastDecoder(model, batch=4)
out = rollout.sample(model, TOK, random_prompts(4, 300, seed=1), GenConfig(max_new_tokens=12, temperature=0.0,
                     batch_size=4, backend="fast"))
print(kernels.available(), kernels.unavailable_reason(), dec.lm_head.kind, out.completion_ids)
"""
    here = os.path.dirname(__file__)
    lines = {}
    for flag in ("0", "1"):
        env = {**os.environ, "RLHFKIT_KERNELS": flag}
        proc = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines[flag] = proc.stdout.strip().splitlines()[-1]
        if flag == "0":
            assert "rlhfkit's CPU product kernel is off (RLHFKIT_KERNELS=0)" in proc.stderr
    off_ok, off_reason, off_kind, off_ids = lines["0"].split(" ", 3)
    on_ok, _, on_kind, on_ids = lines["1"].split(" ", 3)
    assert (off_ok, off_reason) == ("False", "RLHFKIT_KERNELS=0") and off_kind != "2"
    assert on_ok == str(CAN_BUILD) and (on_kind == "2") == CAN_BUILD
    assert off_ids == on_ids


def test_fused_activations_match_torch():
    """act codes 1-3 (ReLU, GELU-tanh, SiLU) applied in the kernel after the bias and before the residual equal
    torch's functions to a few ulp, including far in the tails (no overflow to inf or NaN); the decoder's
    TorchScript mapping names the same codes."""
    from rlhfkit.rollout import _kernel_act

    F = torch.nn.functional
    x = torch.linspace(-1, 1, 1000).unsqueeze(1)
    w = torch.tensor([[100.0], [9.0], [1.0], [0.01]])  # outputs from -100 to 100
    packed, b, h = kernels.pack(w), torch.tensor([0.0, 0.5, -0.25, 0.0]), torch.randn(1000, 4)
    base = x @ w.t() + b
    for name, fn in (("relu", F.relu), ("gelu_tanh", lambda y: F.gelu(y, approximate="tanh")), ("silu", F.silu)):
        code = kernels.ACTS[name]
        assert _kernel_act(name) == code
        got = kernels.linear(x, packed, b, h, 4, code)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, fn(base) + h, rtol=2e-6, atol=2e-6)
    assert _kernel_act("gelu") == 0
    nan = torch.full((2, 1), float("nan"))  # a NaN stays a NaN through every activation, as in torch
    for code in (1, 2, 3):
        assert torch.isnan(kernels.linear(nan, packed, b, None, 4, code)).all()
    with pytest.raises(RuntimeError, match="act must be"):
        kernels.linear(x, packed, b, None, 4, 7)


@pytest.mark.parametrize("m", [1, 8, 100])
def test_row_norms_in_the_kernel_match_torch(m):
    """norm RMS / LAYER normalise x's rows first (statistics in float64): equal to F.rms_norm / F.layer_norm and
    then the product, also with rows whose mean is far from 0; pack(w, scale) packs w diag(scale)."""
    F = torch.nn.functional
    x, w, b, h = _case(m, 256, 40, seed=3)
    x = x * 3 + torch.linspace(-50, 50, m).unsqueeze(1)  # large row means: LayerNorm must centre first
    g = torch.rand(256) + 0.5
    packed = kernels.pack(w, g)
    assert torch.equal(packed, kernels.pack(w * g))
    for code, norm in ((kernels.RMS, lambda y: F.rms_norm(y, (256,), None, 1e-5)),
                       (kernels.LAYER, lambda y: F.layer_norm(y, (256,), None, None, 1e-5))):
        want = (norm(x).double() * g.double()) @ w.double().t() + b.double() + h.double()
        got = kernels.linear(x, packed, b, h, 40, 0, code, 1e-5)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(kernels._reference_linear(x, packed, b, h, 40, 0, code, 1e-5), got, rtol=1e-5,
                                   atol=1e-4)
    with pytest.raises(RuntimeError, match="norm must be"):
        kernels.linear(x, packed, b, None, 40, 0, 5, 1e-5)
    with pytest.raises(RuntimeError, match="scale has"):
        kernels.pack(w, g[:10])


def test_a_stale_build_lock_is_removed(tmp_path, monkeypatch, capsys):
    """A lock file left by a killed build would make torch wait forever: one older than STALE_LOCK_S is removed
    (with a note), a fresh one (a build running in another process) is left alone."""
    fake = type("cpp_extension", (), {"_get_build_directory": staticmethod(lambda name, verbose: str(tmp_path))})
    lock = tmp_path / "lock"
    lock.write_text("")
    kernels._prepare_build(fake)
    assert lock.exists()
    old = lock.stat().st_mtime - kernels.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    kernels._prepare_build(fake)
    assert not lock.exists()
    err = capsys.readouterr().err
    assert "removed a stale build lock" in err and "building rlhfkit's CPU product kernel" in err
