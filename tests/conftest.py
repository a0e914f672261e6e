"""Shared helpers: fresh random seeds, the oracle, and the spec's tolerances."""

import os

import pytest
import torch

from distill_fused.backends import available_backends
from distill_fused import compute_combined_loss
from distill_fused.synthetic import noise_batch, realistic_batch

LOSS_KEYS = ("total_loss", "stft_loss", "mag_recon_loss", "if_recon_loss", "kl_loss",
             "recon_loss")

# Fast backends checked against the oracle: on CPU, triton runs under TRITON_INTERPRET=1.
FAST_BACKENDS = [b for b in ("torch", "triton") if b in available_backends("cpu")]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="no CUDA GPU present: CUDA variant skipped")


@pytest.fixture(autouse=True)
def poisoned_kernel_outputs(monkeypatch):
    """Every buffer a Triton kernel writes starts as NaN, in every test: an element a kernel
    fails to write shows up as a NaN in the result."""
    if "triton" not in FAST_BACKENDS:
        return

    import distill_fused.kernels.combined as combined
    import distill_fused.kernels.kl as kl
    import distill_fused.kernels.recon as recon
    import distill_fused.kernels.stft as stft

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in (combined, kl, recon, stft):
        monkeypatch.setattr(module, "empty", poisoned)


class Launches(list):
    def __init__(self):
        super().__init__()
        self.constexprs = []


@pytest.fixture
def triton_launches(monkeypatch):
    """Every Triton kernel launch of distill_fused.kernels, by name; ``launched.constexprs``:
    the keyword (constexpr and launch) arguments of each. Empty where Triton is not usable."""
    launched = Launches()
    if "triton" not in FAST_BACKENDS:
        return launched
    import distill_fused.kernels.combined as combined
    import distill_fused.kernels.kl as kl
    import distill_fused.kernels.recon as recon
    import distill_fused.kernels.stft as stft

    def counting(kernel):
        def at(grid):
            def launch(*args, **kwargs):
                launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
                launched.constexprs.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch
        return type("Counting", (), {"__getitem__": lambda self, grid: at(grid)})()

    for module in (combined, kl, recon, stft):
        monkeypatch.setattr(module, "wrap_triton", counting)
    return launched


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed so that a failure can be replayed: the environment
    variable ``DISTILL_TEST_SEED`` sets it instead."""
    forced = os.environ.get("DISTILL_TEST_SEED")
    value = int(forced) if forced else int.from_bytes(os.urandom(6), "little")
    print(f"seed for {request.node.name}: {value} (replay: DISTILL_TEST_SEED={value} "
          f"pytest '{request.node.nodeid}')")
    return value


def make_batch(kind, dtype, seed, batch=2, height=16, width=67, latent_dim=8, device="cpu"):
    make = realistic_batch if kind == "realistic" else noise_batch
    return make(batch, height, width, latent_dim, dtype=dtype, device=device, seed=seed)


def run_loss(batch, backend, dtype=None, grad_target=False, **kwargs):
    """Loss dict and gradients (recon, target, mu, logvar; zeros where none flowed)."""
    leaves = [t.detach().clone().to(dtype or t.dtype) for t in batch]
    for i, leaf in enumerate(leaves):
        leaf.requires_grad_(i != 1 or grad_target)
    out = compute_combined_loss(*leaves, backend=backend, **kwargs)
    out["total_loss"].backward()
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    return {k: v.detach() for k, v in out.items()}, grads


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def assert_same_results(got, ref, loss_tol, grad_tol):
    """``got``/``ref``: ``(losses, grads)`` from ``run_loss``."""
    (out, grads), (ref_out, ref_grads) = got, ref
    for key in out:
        assert rel_err(out[key], ref_out[key]) <= loss_tol, key
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) <= grad_tol


def assert_matches_oracle(batch64, backend, dtype, grad_target=False, **kwargs):
    """The spec's tolerances: float64 within 1e-10 (losses) and 1e-8 (gradients); float32
    inputs against the float64 oracle (run on those same inputs, exactly upcast) within 1e-5
    (losses) and max(1e-3, 2 x the float32 oracle's own error) on each gradient."""
    batch64 = [t.to(dtype).double() for t in batch64]
    ref_out, ref_grads = run_loss(batch64, "reference", torch.float64, grad_target, **kwargs)
    out, grads = run_loss(batch64, backend, dtype, grad_target, **kwargs)
    loss_tol, grad_tols = 1e-10, [1e-8] * 4
    if dtype != torch.float64:
        loss_tol = 1e-5
        _, ref32_grads = run_loss(batch64, "reference", dtype, grad_target, **kwargs)
        grad_tols = [max(1e-3, 2 * rel_err(g32, g)) for g32, g in zip(ref32_grads, ref_grads)]
    for key in LOSS_KEYS:
        assert out[key].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert out[key].shape == ()
        err = rel_err(out[key], ref_out[key])
        assert err <= loss_tol, f"{key}: relative error {err:.3g} > {loss_tol:g}"
    names = ("recon", "target", "mu", "logvar")
    for name, g, g_ref, tol in zip(names, grads, ref_grads, grad_tols):
        assert g.dtype == dtype
        err = rel_err(g, g_ref)
        assert err <= tol, f"d/d{name}: relative error {err:.3g} > {tol:.3g}"
    return out, grads
