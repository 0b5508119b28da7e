"""Comparison helpers for tests: relative error against a float64 reference, with a verbose failure message."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64 (the plain norm of the difference when ref is zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


HALF_TOL = 1e-2  # fp16/bf16 against float64
HALF_FLOOR = 1e-5  # fp32's tolerance: below it "twice PyTorch's error" is rounding noise, not a bar


def assert_half_precision(err: float, torch_err: float, name: str) -> None:
    """The half-precision standard for an error already measured against float64: ≤ 1e-2, and never worse than
    twice PyTorch's own error in that dtype (``torch_err``, the same computation in PyTorch at that precision).
    Where PyTorch's error is below fp32's tolerance (a gradient both compute in fp32: fp32 adapters' dA under
    autocast), the bound is that tolerance, ``HALF_FLOOR``."""
    assert err <= HALF_TOL, f"{name}: half-precision error {err:.2e} > {HALF_TOL:.0e}"
    assert err <= max(2 * torch_err, HALF_FLOOR), f"{name}: error {err:.2e} > 2 x PyTorch's own {torch_err:.2e}"


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "tensor") -> None:
    """Assert ‖out − ref‖/‖ref‖ ≤ tol; on failure report the error and the first mismatching indices."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    if err <= tol:
        return
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    bad = ((o - r).abs() > tol * r.abs().clamp_min(1e-12) + 1e-12).nonzero()[:5].tolist()
    detail = ", ".join(f"{tuple(i)}: {o[tuple(i)].item():.6g} vs {r[tuple(i)].item():.6g}" for i in bad)
    raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; first mismatches {detail}")


def ref_grads64(x, w, b, a, bb, s, p, mask, fifo, dy):
    """Float64 (y, xa, dx, dA, dB) of the reference with the given keep-mask (None: no dropout): the oracle the
    kernel tests compare each launcher output and gradient with. xa is the kernels' saved (M, r) product."""
    from lora_fast.reference import lora_linear_ref

    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, bb))
    y = lora_linear_ref(x64, w, b, a64, b64, s, dropout_p=p, keep_mask=mask, fan_in_fan_out=fifo, upcast=True)
    y.backward(dy.double())
    xa = (x64 * mask / (1 - p) if mask is not None else x64) @ a64.t()
    return y.detach(), xa.detach(), x64.grad, a64.grad, b64.grad


def transformers_major() -> int:
    """transformers' major version (4 or 5): where a test must build or call something by the version's own API."""
    import transformers

    return int(transformers.__version__.split(".")[0])


# Why a test skips when an optional module is missing, and where it runs instead (pytest.importorskip's reason)
MISSING = {
    "peft": "peft is in the [dev] extra (CI installs it); PEFT parity and interop run wherever it is installed",
    "transformers": "transformers is a dependency of lora_fast (CI installs it); these tests run wherever it is",
    "accelerate": "accelerate is not a dependency; this test runs where it is installed (HF Trainer users have it)",
    "triton": "triton is a dependency on Linux (CI installs it); the kernel launch tests run wherever it is installed",
}
