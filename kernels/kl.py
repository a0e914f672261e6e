"""Free-bits KL, value and gradients in one pass over ``mu`` and ``logvar``.

For ``mu, logvar`` of shape ``[B, D]`` and ``k = -0.5 (1 + logvar - mu^2 - exp(logvar))``::

    kl = (1 / B) sum_{b, d} max(k, free_bits)

    dkl/dmu     = mu / B                      where k >= free_bits, else 0
    dkl/dlogvar = 0.5 (exp(logvar) - 1) / B   where k >= free_bits, else 0

(``torch.clamp`` passes the gradient at the boundary ``k == free_bits``, and so does this.)

``_kl_forward_kernel`` is a single program looping over ``[B, D]`` in tiles: a VAE's latent is
small (``B*D`` in the thousands), so one program is as fast as a two-stage reduction, needs no
partials buffer and no second launch, and sums in a fixed order. It writes the gradients in the
same pass; ``_kl_backward_kernel`` scales them by the incoming gradient, where an incoming
exact zero gives exactly zero (the non-finite guard sends zero, and ``0 * inf`` must not reach
an input).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..core.gradients import first_order_only
from ..core.outputs import compute_dtype
from ._common import (
    ONE_PROGRAM,
    empty,
    f64_parts,
    gated_grad,
    index_dtype,
    joined,
    kernel_op,
    reciprocal,
    tl_dtype,
    wrap_triton,
)

BLOCK = 1024


@triton.jit
def free_bits_kl_loop(
    # the latents [B, D], read in place, and their strides
    mu_ptr,
    logvar_ptr,
    n_elements,
    latent_dim,
    mu_sb,
    mu_sd,
    lv_sb,
    lv_sd,
    free_bits,
    # the outputs: dkl/dmu and dkl/dlogvar, contiguous [B, D] (written when WRITE_GRAD)
    grad_mu_ptr,
    grad_logvar_ptr,
    # compile-time
    WRITE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    INDEX: tl.constexpr,
):
    """(Inside a single program.) The KL over ``[B, D]`` in tiles, gradients written when
    ``WRITE_GRAD``; returns ``kl``. ``free_bits`` in ``ACC``; index math in ``INDEX``
    (``index_dtype``)."""
    inv_batch = reciprocal(n_elements // latent_dim, ACC)
    total = tl.zeros([BLOCK], dtype=ACC)
    start = tl.cast(0, INDEX)
    while start < n_elements:  # a while loop, not range(): see _common.py
        index = start + tl.arange(0, BLOCK)
        mask = index < n_elements
        b = index // latent_dim
        d = index - b * latent_dim
        mu = tl.load(mu_ptr + b * mu_sb + d * mu_sd, mask=mask, other=0.0).to(ACC)
        logvar = tl.load(logvar_ptr + b * lv_sb + d * lv_sd, mask=mask, other=0.0).to(ACC)
        var = tl.exp(logvar)
        k = -0.5 * (1.0 + logvar - mu * mu - var)
        # torch.clamp(k, min=free_bits): NaN stays NaN.
        clamped = tl.where(k < free_bits, free_bits, k)
        total += tl.where(mask, clamped, 0.0)
        if WRITE_GRAD:
            # A product with the 0/1 mask, not a select: where k is NaN the mask is 0 and a NaN
            # or infinite mu or exp(logvar) still gives NaN, as the chain rule through
            # torch.clamp does (0 * nan).
            active = (k >= free_bits).to(ACC) * inv_batch
            dtype = grad_mu_ptr.dtype.element_ty
            tl.store(grad_mu_ptr + index, (mu * active).to(dtype), mask=mask)
            tl.store(grad_logvar_ptr + index, (0.5 * (var - 1.0) * active).to(dtype), mask=mask)
        start += BLOCK
    return tl.sum(total, axis=0) * inv_batch


@triton.jit
def _kl_forward_kernel(
    # the latents (see ``free_bits_kl_loop``)
    mu_ptr,
    logvar_ptr,
    n_elements,
    latent_dim,
    mu_sb,
    mu_sd,
    lv_sb,
    lv_sd,
    fb_hi,
    fb_lo,
    # the outputs: kl, dkl/dmu, dkl/dlogvar
    kl_ptr,
    grad_mu_ptr,
    grad_logvar_ptr,
    # compile-time
    WRITE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    INDEX: tl.constexpr,
):
    """One program: the KL and, when ``WRITE_GRAD``, its gradients."""
    kl = free_bits_kl_loop(mu_ptr, logvar_ptr, n_elements, latent_dim, mu_sb, mu_sd, lv_sb,
                           lv_sd, joined(fb_hi, fb_lo, ACC), grad_mu_ptr, grad_logvar_ptr,
                           WRITE_GRAD, ACC, BLOCK, INDEX)
    tl.store(kl_ptr, kl)


@triton.jit
def _kl_backward_kernel(
    # the saved gradients, [B*D] each, and the incoming gradient (0-dim)
    grad_mu_ptr,
    grad_logvar_ptr,
    n_elements,
    grad_out_ptr,
    # the outputs
    out_mu_ptr,
    out_logvar_ptr,
    # compile-time
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out = saved * grad_out``, and exactly 0 where ``grad_out == 0`` (``gated_grad``)."""
    pid = tl.program_id(0)
    index = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n_elements
    grad_out = tl.load(grad_out_ptr).to(ACC)
    g_mu = tl.load(grad_mu_ptr + index, mask=mask, other=0.0)
    g_lv = tl.load(grad_logvar_ptr + index, mask=mask, other=0.0)
    reached = grad_out != 0
    scale_mu = gated_grad(reached, grad_out, g_mu)
    scale_lv = gated_grad(reached, grad_out, g_lv)
    tl.store(out_mu_ptr + index, scale_mu.to(out_mu_ptr.dtype.element_ty), mask=mask)
    tl.store(out_logvar_ptr + index, scale_lv.to(out_logvar_ptr.dtype.element_ty), mask=mask)


def _forward_outputs(mu: torch.Tensor, logvar: torch.Tensor, write_grad: bool):
    acc = compute_dtype(mu, logvar)
    shape = mu.shape if write_grad else (0,)
    return (empty((), acc, mu.device), empty(shape, acc, mu.device),
            empty(shape, acc, mu.device))


def _backward_outputs(grad_mu, grad_logvar, mu_dtype, logvar_dtype):
    return (empty(grad_mu.shape, mu_dtype, grad_mu.device),
            empty(grad_logvar.shape, logvar_dtype, grad_logvar.device))


@kernel_op("distill_fused::free_bits_kl", mutates_args=())
def free_bits_kl_op(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float, write_grad: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl, dkl/dmu, dkl/dlogvar)``, the gradients in the accumulator dtype (empty unless
    ``write_grad``)."""
    kl, grad_mu, grad_logvar = _forward_outputs(mu, logvar, write_grad)
    wrap_triton(_kl_forward_kernel)[(1,)](
        mu, logvar, mu.numel(), mu.shape[1], *mu.stride(), *logvar.stride(),
        *f64_parts(free_bits), kl, grad_mu, grad_logvar,
        WRITE_GRAD=write_grad, ACC=tl_dtype(compute_dtype(mu, logvar)), BLOCK=BLOCK,
        INDEX=index_dtype(BLOCK, mu, logvar), **ONE_PROGRAM)
    return kl, grad_mu, grad_logvar


@kernel_op("distill_fused::free_bits_kl_backward", mutates_args=())
def free_bits_kl_backward_op(grad_mu: torch.Tensor, grad_logvar: torch.Tensor,
                             grad_out: torch.Tensor, mu_dtype: torch.dtype,
                             logvar_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    out_mu, out_logvar = _backward_outputs(grad_mu, grad_logvar, mu_dtype, logvar_dtype)
    n = grad_mu.numel()
    wrap_triton(_kl_backward_kernel)[(triton.cdiv(n, BLOCK),)](
        grad_mu, grad_logvar, n, grad_out, out_mu, out_logvar,
        ACC=tl_dtype(grad_mu.dtype), BLOCK=BLOCK)
    return out_mu, out_logvar


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2], inputs[0], inputs[1])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _backward(ctx, grad_kl, _grad_mu_out, _grad_logvar_out):
    grad_mu, grad_logvar, mu, logvar = ctx.saved_tensors
    with torch.no_grad():  # the op has no autograd formula: see first_order_only
        out_mu, out_logvar = free_bits_kl_backward_op(grad_mu, grad_logvar, grad_kl,
                                                      *ctx.dtypes)
    grads = (out_mu if ctx.needs_input_grad[0] else None,
             out_logvar if ctx.needs_input_grad[1] else None)
    return (*first_order_only("triton", grads, (mu, logvar)), None, None)


class _FreeBitsKL(torch.autograd.Function):
    """``free_bits_kl_op`` with its gradient (a Function rather than the op's registered
    autograd, which ``torch.func`` transforms do not support)."""

    forward = staticmethod(free_bits_kl_op)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Free-bits KL of ``[B, D]`` tensors of any strides (see the module docstring), computed
    in the inputs' accumulator dtype and returned as ``dtype`` (default: that one)."""
    write_grad = torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad)
    kl, _, _ = _FreeBitsKL.apply(mu, logvar, float(free_bits), write_grad)
    return kl.to(dtype or kl.dtype)
