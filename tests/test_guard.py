"""Spec step 7: a non-finite total falls back to recon_loss, with recon_loss's gradients only,
and no NaN from the other terms reaches a gradient. No host sync (see test_no_sync.py)."""

import pytest
import torch

from conftest import FAST_BACKENDS, leaf_copies, make_batch, rel_err, run_loss


def _with_blowup(batch, where):
    recon, target, mu, logvar = (t.clone() for t in batch)
    if where == "kl":          # exp(logvar) overflows: kl = inf
        logvar[0, 0] = 1e5
    elif where == "stft":      # power overflows in float32: stft = inf/nan, recon terms finite
        recon[0, 0, 3, 5] = 1e30
    elif where == "both":
        logvar[0, 0] = 1e5
        recon[0, 0, 3, 5] = 1e30
    return recon, target, mu, logvar


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("where", ["kl", "stft", "both"])
def test_non_finite_total_falls_back_to_recon(backend, where, seed):
    batch = _with_blowup(make_batch("realistic", torch.float32, seed), where)
    ref_out, ref_grads = run_loss(batch, "reference", torch.float32, kl_weight=0.5)
    out, grads = run_loss(batch, backend, torch.float32, kl_weight=0.5)
    assert torch.isfinite(out["recon_loss"])
    raw_total = out["stft_loss"] + out["recon_loss"] + 0.5 * out["kl_loss"]
    assert not torch.isfinite(raw_total)
    assert torch.equal(out["total_loss"], out["recon_loss"])
    torch.testing.assert_close(out["total_loss"], ref_out["total_loss"], rtol=1e-6, atol=0)
    for g, g_ref in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert rel_err(g, g_ref) <= 1e-5
    # The latent gets nothing: its only term was dropped.
    assert torch.equal(grads[2], torch.zeros_like(grads[2]))
    assert torch.equal(grads[3], torch.zeros_like(grads[3]))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fallback_gradient_is_the_recon_loss_gradient(backend, seed):
    batch = _with_blowup(make_batch("noise", torch.float64, seed), "kl")
    leaves = leaf_copies(batch)
    from distill_fused import compute_combined_loss
    out = compute_combined_loss(*leaves, kl_weight=1.0, backend=backend)
    (g_total,) = torch.autograd.grad(out["total_loss"], leaves[0], retain_graph=True)
    (g_recon,) = torch.autograd.grad(out["recon_loss"], leaves[0])
    assert rel_err(g_total, g_recon) <= 1e-12


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_nan_in_the_latent_alone_falls_back_with_finite_gradients(backend, seed):
    recon, target, mu, logvar = make_batch("noise", torch.float64, seed)
    mu[1, 2] = float("nan")
    out, grads = run_loss((recon, target, mu, logvar), backend, kl_weight=0.1)
    ref_out, ref_grads = run_loss((recon, target, mu, logvar), "reference", kl_weight=0.1)
    assert torch.equal(out["total_loss"], out["recon_loss"])
    assert torch.isnan(out["kl_loss"])
    for g, g_ref in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert rel_err(g, g_ref) <= 1e-10
