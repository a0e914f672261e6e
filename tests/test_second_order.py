"""Higher-order gradients: the fast backends compute first-order gradients only and say so at
the double backward; the reference computes them. ``torch.func.grad`` works on every backend."""

import pytest
import torch

from conftest import FAST_BACKENDS, TINY_RESOLUTIONS, leaf_copies, make_batch, rel_err, tiny_config
from distill_fused import MultiResolutionSTFTLoss, compute_combined_loss

SMALL = tiny_config()


def _batch(seed):
    return make_batch("realistic", torch.float64, seed, batch=2, height=4, width=20,
                      latent_dim=3)


def _total(backend, kl_weight=0.1, **kwargs):
    def total(recon, target, mu, logvar):
        return compute_combined_loss(recon, target, mu, logvar, SMALL, kl_weight,
                                     backend=backend, **kwargs)["total_loss"]
    return total


@pytest.mark.parametrize("input_index", [0, 2], ids=["recon", "mu"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_double_backward_is_a_clear_error(backend, input_index, seed):
    leaves = leaf_copies(_batch(seed))
    grad, = torch.autograd.grad(_total(backend)(*leaves), leaves[input_index], create_graph=True)
    # The first-order gradient itself is unchanged by create_graph=True.
    plain = leaf_copies(leaves)
    expected, = torch.autograd.grad(_total(backend)(*plain), plain[input_index])
    assert torch.equal(grad.detach(), expected)
    v = torch.randn_like(grad)
    with pytest.raises(RuntimeError, match=rf"'{backend}' backend computes first-order "
                                           r"gradients only.*backend='reference'"):
        torch.autograd.grad((grad * v).sum(), leaves[input_index])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_double_backward_of_the_stft_module_is_a_clear_error(backend, seed):
    loss_fn = MultiResolutionSTFTLoss(**TINY_RESOLUTIONS, backend=backend)
    x, y = (torch.randn(2, 1, 80, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed + i)) for i in range(2))
    x.requires_grad_()
    grad, = torch.autograd.grad(loss_fn(x, y), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        grad.sum().backward()


def test_reference_hessian_vector_product_is_finite_and_non_zero(seed):
    """The reference's HVP exists and is not zero (what the fast backends refuse to fake)."""
    leaves = leaf_copies(_batch(seed))
    grad, = torch.autograd.grad(_total("reference")(*leaves), leaves[0], create_graph=True)
    hvp, = torch.autograd.grad((grad * torch.randn_like(grad)).sum(), leaves[0])
    assert torch.isfinite(hvp).all() and hvp.norm() > 0


@pytest.mark.parametrize("kind", ["config", "callable-stft"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_torch_func_grad_equals_the_reference(backend, kind, seed):
    kwargs = {}
    if kind == "callable-stft":  # the modular path of the triton backend
        kwargs["_stft_loss_fn"] = lambda x, y: (x - y).abs().mean()
    batch = _batch(seed)
    got = torch.func.grad(_total(backend, **kwargs), argnums=(0, 1, 2, 3))(*batch)
    expected = torch.func.grad(_total("reference", **kwargs), argnums=(0, 1, 2, 3))(*batch)
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= 1e-8


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_nested_torch_func_grad_is_a_clear_error(backend, seed):
    recon, target, mu, logvar = _batch(seed)

    def grad_norm(r):
        return torch.func.grad(lambda r_: _total(backend)(r_, target, mu, logvar))(r).sum()

    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.func.grad(grad_norm)(recon)
