"""The Triton kernels one by one against plain-torch formulas (the oracle's own ops), on CPU
under TRITON_INTERPRET=1 and on CUDA when a GPU is present. Every buffer a kernel writes is
poisoned with NaN first (conftest.py), so an element it skips shows up."""

import pytest
import torch

from conftest import (
    cuda_marks,
    float64_and_float32,
    rel_err,
    requires_triton,
    with_and_without_target_grad,
)

pytestmark = pytest.mark.kernels

DEVICES = [pytest.param("cpu", marks=requires_triton), pytest.param("cuda", marks=cuda_marks())]

triton = pytest.importorskip("triton", reason="Triton is not installed")


def _gen(seed, device):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape, dtype=torch.float64: torch.randn(*shape, generator=g,
                                                           dtype=torch.float64).to(device, dtype)


def _recon_reference(recon, target):
    rm, ri, tm, ti = recon[:, 0], recon[:, 1], target[:, 0], target[:, 1]
    mag = torch.nn.functional.l1_loss(rm, tm)
    if_loss = (torch.abs(ri - ti) * (tm / (tm.mean() + 1e-8))).mean()
    return mag, if_loss


def _check_recon(recon, target, dtype, grad_target, tol_loss, tol_grad):
    from distill_fused.kernels.recon import recon_terms

    def run(fn, r, t, dt=dtype):
        r = r.detach().to(dt).requires_grad_()
        t = t.detach().to(dt).requires_grad_(grad_target)
        mag, if_loss = fn(r, t)
        (0.7 * mag + 1.3 * if_loss).backward()
        return mag.detach(), if_loss.detach(), r.grad, t.grad

    recon, target = recon.to(dtype), target.to(dtype)  # the inputs the kernel gets
    got = run(recon_terms, recon, target)
    ref = run(_recon_reference, recon, target, torch.float64)
    tols = _tolerances(run, _recon_reference, recon, target, ref, dtype,
                       [tol_loss, tol_loss, tol_grad, tol_grad])
    for a, b, tol in zip(got[:2], ref[:2], tols):
        assert a.dtype == torch.float64  # unrounded: the caller combines the terms, then rounds
        assert rel_err(a, b) <= tol
    assert got[2].dtype == dtype and torch.isfinite(got[2]).all()
    assert rel_err(got[2], ref[2]) <= tols[2]
    if grad_target:
        assert got[3].dtype == dtype and rel_err(got[3], ref[3]) <= tols[3]
    else:
        assert got[3] is None
    return got


def _tolerances(run, reference, a, b, ref, dtype, base):
    """float64: ``base``. Lower precision: no worse than ``base`` or twice the error of the
    plain-torch formula itself in that precision (the spec's rule), both against the float64
    formula on the same inputs."""
    if dtype == torch.float64:
        return base
    ref_low = run(reference, a, b)
    return [max(tol, 2 * rel_err(x, y)) if x is not None else tol
            for tol, x, y in zip(base, ref_low, ref)]


@pytest.mark.parametrize("device", DEVICES)
@float64_and_float32
@pytest.mark.parametrize("shape", [(3, 7, 53), (1, 1, 1), (2, 32, 32), (1, 5, 211)],
                         ids=["not-block-multiple", "single", "block-multiple", "B1"])
@with_and_without_target_grad
def test_recon_kernel(device, dtype, shape, grad_target, seed):
    randn = _gen(seed, device)
    b, h, w = shape
    target = randn(b, 2, h, w)
    target[:, 0] = target[:, 0].abs()
    recon = target + randn(b, 2, h, w)
    tol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-6, 1e-6)
    _check_recon(recon, target, dtype, grad_target, *tol)


@pytest.mark.parametrize("device", DEVICES)
def test_recon_kernel_ties_give_zero_gradient(device, seed):
    randn = _gen(seed, device)
    target = randn(2, 2, 9, 31).abs()
    recon = target.clone()
    recon[:, :, ::2] += randn(2, 2, 5, 31)  # every other row differs, the rest are ties
    got = _check_recon(recon, target, torch.float64, True, 1e-12, 1e-12)
    assert torch.all(got[2][:, :, 1::2] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_recon_kernel_takes_any_strides(device, seed):
    randn = _gen(seed, device)
    recon, target = randn(2, 2, 12, 41), randn(2, 2, 12, 41).abs()
    layouts = [lambda t: t.contiguous(memory_format=torch.channels_last),
               lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
               lambda t: torch.cat([t, t], dim=1)[:, 1:3]]
    for layout in layouts:
        r, t = layout(recon), layout(target)
        assert not r.is_contiguous()
        _check_recon(r, t, torch.float64, True, 1e-12, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.cuda)],
                         ids=["f16", "bf16"])
def test_recon_kernel_half_inputs_accumulate_in_float32(device, dtype, seed):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter has no bf16 (numpy lacks it)")
    randn = _gen(seed, device)
    recon, target = randn(2, 2, 8, 37).to(dtype), randn(2, 2, 8, 37).abs().to(dtype)
    from distill_fused.kernels.recon import recon_terms
    r = recon.clone().requires_grad_()
    mag, if_loss = recon_terms(r, target)
    (mag + if_loss).backward()
    ref_r = recon.float().requires_grad_()
    ref = _recon_reference(ref_r, target.float())
    (ref[0] + ref[1]).backward()
    assert mag.dtype == torch.float64 and r.grad.dtype == dtype
    assert rel_err(mag, ref[0]) <= 1e-6 and rel_err(if_loss, ref[1]) <= 1e-6
    assert rel_err(r.grad.float(), ref_r.grad.to(dtype).float()) <= 1e-2


def _kl_reference(mu, logvar, free_bits):
    k = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    return torch.clamp(k, min=free_bits).sum(dim=1).mean()


def _check_kl(mu, logvar, free_bits, dtype, tol):
    from distill_fused.kernels.kl import free_bits_kl

    def run(fn, m, v, dt=dtype):
        m, v = m.detach().to(dt).requires_grad_(), v.detach().to(dt).requires_grad_()
        kl = fn(m, v, free_bits)
        (2.5 * kl).backward()
        return kl.detach(), m.grad, v.grad

    mu, logvar = mu.to(dtype), logvar.to(dtype)  # the inputs the kernel gets
    got = run(free_bits_kl, mu, logvar)
    ref = run(_kl_reference, mu, logvar, torch.float64)
    tols = _tolerances(run, _kl_reference, mu, logvar, ref, dtype, [tol] * 3)
    assert rel_err(got[0], ref[0]) <= tols[0]
    assert got[1].dtype == dtype and rel_err(got[1], ref[1]) <= tols[1]
    assert got[2].dtype == dtype and rel_err(got[2], ref[2]) <= tols[2]
    return got


@pytest.mark.parametrize("device", DEVICES)
@float64_and_float32
@pytest.mark.parametrize("shape", [(32, 128), (3, 700), (1, 1), (5, 1), (1, 2049)],
                         ids=["user", "multi-tile", "B1-D1", "D1", "B1"])
def test_kl_kernel(device, dtype, shape, seed):
    randn = _gen(seed, device)
    mu, logvar = randn(*shape), 0.7 * randn(*shape)
    _check_kl(mu, logvar, 0.1, dtype, 1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_kernel_passes_the_gradient_at_the_free_bits_floor(device, seed):
    """k == free_bits exactly: torch.clamp passes the gradient there, and so must the kernel."""
    randn = _gen(seed, device)
    mu, logvar = randn(4, 9), randn(4, 9)
    mu[:, :4], logvar[:, :4] = 0.0, 0.0          # k = 0 exactly
    got = _check_kl(mu, logvar, 0.0, torch.float64, 1e-12)
    assert torch.equal(got[1][:, :4], torch.zeros_like(got[1][:, :4]))  # d/dmu = mu / B = 0
    # d/dlogvar = 0.5 (exp(0) - 1) / B = 0 too, so pick points where only the mask decides:
    mu2 = randn(3, 5)
    mu2[0, 0] = 0.5
    logvar2 = torch.zeros_like(mu2)
    # k = -0.5 (1 + 0 - 0.25 - 1) = 0.125 exactly (every step is exact in binary): the boundary.
    got = _check_kl(mu2, logvar2, 0.125, torch.float64, 1e-12)
    assert float(got[1][0, 0]) == pytest.approx(0.5 * 2.5 / 3, rel=1e-14)  # the clamp passes


@pytest.mark.parametrize("device", DEVICES)
def test_kl_kernel_takes_strided_inputs(device, seed):
    randn = _gen(seed, device)
    mu, logvar = randn(16, 6).t(), randn(6, 32)[:, ::2]
    assert not mu.is_contiguous() and not logvar.is_contiguous()
    _check_kl(mu, logvar, 0.1, torch.float64, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_kl_backward_zero_gradient_stays_zero(device, seed):
    """A zero incoming gradient (the non-finite guard's) gives zeros even where exp overflows."""
    from distill_fused.kernels.kl import free_bits_kl
    randn = _gen(seed, device)
    mu = randn(2, 5).requires_grad_()
    logvar = randn(2, 5)
    logvar[0, 0] = 1e5
    logvar.requires_grad_()
    kl = free_bits_kl(mu, logvar, 0.1)
    assert torch.isinf(kl)
    (0.0 * kl).backward()
    assert torch.equal(logvar.grad, torch.zeros_like(logvar.grad))
    assert torch.equal(mu.grad, torch.zeros_like(mu.grad))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_inputs_give_what_torch_gives(device):
    """A NaN makes the loss NaN; its gradient there is torch's: ``sign(nan) = 0``."""
    from distill_fused.kernels.recon import recon_terms
    recon = torch.ones(1, 2, 4, 5, dtype=torch.float64, device=device)
    target = torch.zeros_like(recon)
    recon[0, 0, 1, 1] = float("nan")
    r, r_torch = recon.clone().requires_grad_(), recon.clone().requires_grad_()
    mag, _ = recon_terms(r, target)
    mag.backward()
    torch.nn.functional.l1_loss(r_torch[:, 0], target[:, 0]).backward()
    assert torch.isnan(mag)
    assert torch.equal(r.grad, r_torch.grad)
