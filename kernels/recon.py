"""Reconstruction terms of the combined loss, fused: one pass over ``recon`` and ``target``.

With ``rm, ri = recon[:, 0], recon[:, 1]``, ``tm, ti = target[:, 0], target[:, 1]`` and
``N = B*H*W``::

    mag = S_mag / N,                S_mag = sum |rm - tm|
    if  = (S_if / N) / (S_tm / N + 1e-8),   S_if = sum |ri - ti| * tm,   S_tm = sum tm

Derivatives, with ``M = S_tm / N``, ``e = 1e-8``, ``g_mag``/``g_if`` the incoming gradients
and ``sign(0) = 0`` (``torch.abs``'s rule at ties)::

    d/drm = g_mag sign(rm - tm) / N                 d/dtm = -d/drm + g_if (|ri - ti| - if)
    d/dri = g_if sign(ri - ti) tm / (N (M + e))                      / (N (M + e))
                                                    d/dti = -d/dri

``|ri - ti| - if`` cancels where the two are close (with N = 1 it is ``|ri - ti| e / (M + e)``):
there a float32 computation keeps few correct digits, and two float32 computations (this one,
the oracle's) disagree at random. So the IF products are summed exactly (fp32 products are
exact in fp64), ``if`` is carried to about fp64 accuracy as ``if_hi + if_lo`` (``if_hi`` in
the accumulator dtype, ``if_lo`` the residual, found with fp64 multiplies, no fp64 division),
and the difference is taken in fp64. ``mag`` and ``if`` leave in fp64 too: the IF term is
negative where ``tm`` is, and ``recon_loss = w (w_mag mag + w_if if)`` may cancel to a small
part of its terms, so it is formed in fp64 and rounded once (by the caller, or the fused
epilogue of ``combined.py``).

Forward: ``_recon_partials_kernel`` (at most ``SUM_PROGRAMS`` programs, three partial sums
each, in fp64: the IF sums run over a signed ``tm`` and can cancel) and
``_recon_finalize_kernel`` (one program summing the partials in a fixed order: deterministic,
no atomics). Backward: ``_recon_backward_kernel``, one pass that reads each input once and
writes the gradients. The fused combined loss (``combined.py``) runs the same partials and
the same per-element gradients (``recon_grads``, ``store_recon_grads``) in its own launches.
Writing the sign terms in the forward pass instead would move as many bytes (4N read + 2N
written forward, 2N read + 2N written backward, against 4N forward and 4N read + 2N written
backward) and keep a 2N buffer alive between the passes, so the gradient is left to the
backward kernel.

Inputs may have any strides (no copy is made). Index math is 32-bit (divisions by
multiply-shift, ``divide``) unless an input reaches past ``INDEX_LIMIT`` elements (``WIDE``).
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
    is_wide,
    joined,
    kernel_op,
    reciprocal,
    signum,
    tl_dtype,
    wrap_triton,
)
from .channels import geometry, load_channels, store_recon_grads, tile_start

IF_EPS = 1e-8
BLOCK = 1024
FINAL_BLOCK = 1024
# The sums run in at most this many programs, each summing every SUM_PROGRAMS-th tile: enough
# to fill an H100's 132 SMs four times over, and a bounded number of partials to read after.
SUM_PROGRAMS = 528
# Their launch options: 8 warps (4 elements a thread), whose fp64 sums stay within 128
# registers (at 4 warps they take up to 132: under 25% occupancy).
SUM_LAUNCH = {"num_warps": 8}


@triton.jit(do_not_specialize=["n_programs"])
def _recon_partials_kernel(
    # the inputs, N = B*H*W elements a channel, read in place (see ``channels.py``)
    recon_ptr,
    target_ptr,
    n_elements,
    hw,
    hw_m,
    hw_s,
    width,
    width_m,
    width_s,
    r_sb,
    r_sc,
    r_sh,
    r_sw,
    t_sb,
    t_sc,
    t_sh,
    t_sw,
    # the output: [3, n_programs] partial sums
    partials_ptr,
    n_programs,
    # compile-time
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Program p sums tiles ``p, p + P, ...`` (``P = n_programs``), in that order:
    ``partials[0|1|2, p] = S_mag, S_if, S_tm`` over their elements, each element's term
    computed exactly in fp64 and summed there: ``S_if`` and ``S_tm`` run over a signed ``tm``
    and may cancel (the IF term is ill-conditioned where mean(tm) is near 0), and the weighted
    sum of the two terms may cancel too."""
    program = tl.program_id(0)
    s_mag = tl.zeros([BLOCK], dtype=tl.float64)
    s_if = tl.zeros([BLOCK], dtype=tl.float64)
    s_tm = tl.zeros([BLOCK], dtype=tl.float64)
    start = tile_start(program, BLOCK, WIDE)
    while start < n_elements:  # a while loop, not range(): see _common.py
        index = start + tl.arange(0, BLOCK)
        mask = index < n_elements
        rm, ri, tm, ti = load_channels(recon_ptr, target_ptr, index, mask, hw, hw_m, hw_s,
                                       width, width_m, width_s, r_sb, r_sc, r_sh, r_sw,
                                       t_sb, t_sc, t_sh, t_sw, ACC, WIDE)
        tm64 = tm.to(tl.float64)
        s_mag += tl.abs(rm.to(tl.float64) - tm64)
        s_if += tl.abs(ri.to(tl.float64) - ti.to(tl.float64)) * tm64
        s_tm += tm64
        start += n_programs * BLOCK
    # One slot per program: the three stores are in range by construction (grid == n_programs).
    tl.store(partials_ptr + program, tl.sum(s_mag, axis=0))
    tl.store(partials_ptr + n_programs + program, tl.sum(s_if, axis=0))
    tl.store(partials_ptr + 2 * n_programs + program, tl.sum(s_tm, axis=0))


@triton.jit
def recon_terms_from_partials(
    partials_ptr,
    n_programs,
    n_elements,
    if_eps,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(Inside a single program.) Fixed-order fp64 sums of the partials, then
    ``(mag, if, if_hi, if_lo, M)``: ``mag`` and ``if`` in fp64 (the caller combines them
    before rounding: the IF term may be negative and cancel the magnitude term), the rest in
    the accumulator dtype ``ACC``. ``if_eps``: the 1e-8 of the IF weight, in fp64."""
    s_mag = tl.zeros([BLOCK], dtype=tl.float64)
    s_if = tl.zeros([BLOCK], dtype=tl.float64)
    s_tm = tl.zeros([BLOCK], dtype=tl.float64)
    start = 0
    while start < n_programs:  # a while loop, not range(): see _common.py
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n_programs
        s_mag += tl.load(partials_ptr + idx, mask=mask, other=0.0)
        s_if += tl.load(partials_ptr + n_programs + idx, mask=mask, other=0.0)
        s_tm += tl.load(partials_ptr + 2 * n_programs + idx, mask=mask, other=0.0)
        start += BLOCK
    # The sums are exact enough in fp64. if = S_if / D with D = S_tm + N e = N (M + e): its
    # quotient in ACC, then the residual S_if - if_hi D in fp64 (no fp64 division routine in
    # an fp32 program) for if_lo. Likewise 1/N: in ACC, then one Newton step in fp64.
    inv_n = reciprocal(n_elements, ACC)
    n64 = tl.cast(n_elements, tl.float64)
    inv_n64 = inv_n.to(tl.float64) * (2.0 - n64 * inv_n.to(tl.float64))
    total_if = tl.sum(s_if, axis=0)
    total_tm = tl.sum(s_tm, axis=0)
    denom = total_tm + n64 * if_eps
    if_hi = total_if.to(ACC) / denom.to(ACC)
    if_lo = (total_if - if_hi.to(tl.float64) * denom).to(ACC) / denom.to(ACC)
    mag = tl.sum(s_mag, axis=0) * inv_n64
    if_loss = if_hi.to(tl.float64) + if_lo.to(tl.float64)
    return mag, if_loss, if_hi, if_lo, total_tm.to(ACC) * inv_n


@triton.jit(do_not_specialize=["n_programs"])
def _recon_finalize_kernel(
    # the partial sums
    partials_ptr,
    n_programs,
    n_elements,
    if_eps_hi,
    if_eps_lo,
    # the outputs: the two terms (fp64), the statistics (if_hi, if_lo, M)
    mag_ptr,
    if_ptr,
    stats_ptr,
    # compile-time
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: fixed-order sums of the partials, then ``mag``, ``if`` (fp64) and the
    statistics ``(if_hi, if_lo, M)`` the backward pass needs."""
    mag, if_loss, if_hi, if_lo, mean_tm = recon_terms_from_partials(
        partials_ptr, n_programs, n_elements, joined(if_eps_hi, if_eps_lo, tl.float64), ACC,
        BLOCK)
    tl.store(mag_ptr, mag)
    tl.store(if_ptr, if_loss)
    tl.store(stats_ptr, if_hi)
    tl.store(stats_ptr + 1, if_lo)
    tl.store(stats_ptr + 2, mean_tm)


@triton.jit
def recon_grads(
    rm,
    ri,
    tm,
    ti,
    # the incoming gradients of the two terms, and the forward's statistics
    g_mag,
    g_if,
    if_hi,
    if_lo,
    mean_tm,
    n_elements,
    if_eps,
    # which terms a gradient reaches
    MAG: tl.constexpr,
    IF: tl.constexpr,
    ACC: tl.constexpr,
):
    """``(d/drm, d/dri, d/dtm)`` for incoming gradients ``g_mag``, ``g_if`` (d/dti = -d/dri).
    A term that no gradient reaches (``MAG``/``IF`` false) contributes exactly 0; one that is
    reached is multiplied in as autograd does it (a reached term with weight 0 sends
    ``0 * nan = nan`` where its own gradient is NaN, as in the oracle)."""
    inv_n = reciprocal(n_elements, ACC)
    grad_rm = tl.zeros_like(rm)
    grad_ri = tl.zeros_like(rm)
    grad_tm = tl.zeros_like(rm)
    if MAG:
        grad_rm = g_mag * (inv_n * signum(rm - tm))
        grad_tm = -grad_rm
    if IF:
        if_scale = inv_n / (mean_tm + if_eps)
        grad_ri = g_if * (if_scale * signum(ri - ti) * tm)
        gap = (tl.abs(ri.to(tl.float64) - ti.to(tl.float64)) - if_hi.to(tl.float64)
               - if_lo.to(tl.float64))
        grad_tm += g_if * (if_scale * gap.to(ACC))
    return grad_rm, grad_ri, grad_tm


@triton.jit
def _recon_backward_kernel(
    # the inputs (see ``channels.py``)
    recon_ptr,
    target_ptr,
    n_elements,
    hw,
    hw_m,
    hw_s,
    width,
    width_m,
    width_s,
    r_sb,
    r_sc,
    r_sh,
    r_sw,
    t_sb,
    t_sc,
    t_sh,
    t_sw,
    # the forward's statistics, the incoming gradients, the IF weight's 1e-8
    stats_ptr,
    g_mag_ptr,
    g_if_ptr,
    if_eps_hi,
    if_eps_lo,
    # the outputs
    grad_recon_ptr,
    grad_target_ptr,
    # compile-time: which terms a gradient reaches; whether target wants one
    HAS_G_MAG: tl.constexpr,
    HAS_G_IF: tl.constexpr,
    GRAD_TARGET: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Gradients for ``recon`` (and ``target`` when ``GRAD_TARGET``), written contiguous
    ``[B, 2, H, W]`` in the inputs' dtype, from the incoming gradients of the terms that one
    reaches (``HAS_G_*``). The scalars come in as tensors: no host sync."""
    index = tile_start(tl.program_id(0), BLOCK, WIDE) + tl.arange(0, BLOCK)
    mask = index < n_elements
    rm, ri, tm, ti = load_channels(recon_ptr, target_ptr, index, mask, hw, hw_m, hw_s, width,
                                   width_m, width_s, r_sb, r_sc, r_sh, r_sw, t_sb, t_sc, t_sh,
                                   t_sw, ACC, WIDE)

    grad_rm, grad_ri, grad_tm = recon_grads(
        rm, ri, tm, ti, tl.load(g_mag_ptr).to(ACC), tl.load(g_if_ptr).to(ACC),
        tl.load(stats_ptr).to(ACC), tl.load(stats_ptr + 1).to(ACC),
        tl.load(stats_ptr + 2).to(ACC), n_elements, joined(if_eps_hi, if_eps_lo, ACC),
        HAS_G_MAG, HAS_G_IF, ACC)
    store_recon_grads(grad_recon_ptr, grad_target_ptr, index, mask, hw, hw_m, hw_s, grad_rm,
                      grad_ri, grad_tm, True, GRAD_TARGET, WIDE)


def sum_programs(n_elements: int) -> int:
    """Programs of the reconstruction sums: one per tile, at most ``SUM_PROGRAMS``."""
    return min(triton.cdiv(n_elements, BLOCK), SUM_PROGRAMS)


def _forward_outputs(recon: torch.Tensor, target: torch.Tensor):
    acc = compute_dtype(recon, target)
    return (empty((), torch.float64, recon.device), empty((), torch.float64, recon.device),
            empty((3,), acc, recon.device))


def _backward_outputs(recon: torch.Tensor, target: torch.Tensor, grad_target: bool):
    grad_dtype = torch.promote_types(recon.dtype, target.dtype)
    return (empty(recon.shape, grad_dtype, recon.device),
            empty(target.shape if grad_target else (0,), grad_dtype, target.device))


def launch_recon_partials(recon: torch.Tensor, target: torch.Tensor
                          ) -> Tuple[torch.Tensor, int, int]:
    """``(partials [3, P], N, P)``: the sums' first stage (inside a custom op: one launch)."""
    n, *shape = geometry(recon)
    n_programs = sum_programs(n)
    partials = empty((3, n_programs), torch.float64, recon.device)
    wrap_triton(_recon_partials_kernel)[(n_programs,)](
        recon, target, n, *shape, *recon.stride(), *target.stride(), partials, n_programs,
        ACC=tl_dtype(compute_dtype(recon, target)), BLOCK=BLOCK,
        WIDE=is_wide(BLOCK, recon, target), **SUM_LAUNCH)
    return partials, n, n_programs


@kernel_op("distill_fused::recon_terms", mutates_args=())
def recon_terms_op(recon: torch.Tensor, target: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mag, if, stats)``: the two loss terms (0-dim, fp64) and ``stats = (if_hi, if_lo, M)``
    for backward."""
    partials, n, n_programs = launch_recon_partials(recon, target)
    mag, if_loss, stats = _forward_outputs(recon, target)
    wrap_triton(_recon_finalize_kernel)[(1,)](
        partials, n_programs, n, *f64_parts(IF_EPS), mag, if_loss, stats,
        ACC=tl_dtype(compute_dtype(recon, target)), BLOCK=FINAL_BLOCK, **ONE_PROGRAM)
    return mag, if_loss, stats


@kernel_op("distill_fused::recon_terms_backward", mutates_args=())
def recon_terms_backward_op(recon: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
                            grad_mag: Optional[torch.Tensor], grad_if: Optional[torch.Tensor],
                            grad_target: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``grad_mag``/``grad_if``: ``None`` for a term no gradient reaches."""
    n, *shape = geometry(recon)
    outputs = _backward_outputs(recon, target, grad_target)
    wrap_triton(_recon_backward_kernel)[(triton.cdiv(n, BLOCK),)](
        recon, target, n, *shape, *recon.stride(), *target.stride(),
        stats, stats if grad_mag is None else grad_mag, stats if grad_if is None else grad_if,
        *f64_parts(IF_EPS), *outputs,
        HAS_G_MAG=grad_mag is not None, HAS_G_IF=grad_if is not None,
        GRAD_TARGET=grad_target, ACC=tl_dtype(compute_dtype(recon, target)), BLOCK=BLOCK,
        WIDE=is_wide(BLOCK, recon, target))
    return outputs


def _setup_context(ctx, inputs, output):
    recon, target = inputs
    ctx.set_materialize_grads(False)  # an unused term's gradient stays None: it sends nothing
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(recon, target, output[2])
    ctx.grad_target = ctx.needs_input_grad[1]


def _backward(ctx, grad_mag, grad_if, _grad_stats):
    recon, target, stats = ctx.saved_tensors
    with torch.no_grad():  # the op has no autograd formula: see first_order_only
        grad_recon, grad_target = recon_terms_backward_op(recon, target, stats, grad_mag,
                                                          grad_if, ctx.grad_target)
    return first_order_only("triton", (
        grad_recon.to(recon.dtype) if ctx.needs_input_grad[0] else None,
        grad_target.to(target.dtype) if ctx.grad_target else None), (recon, target))


class _ReconTerms(torch.autograd.Function):
    """``recon_terms_op`` with its gradient (a Function rather than the op's registered autograd,
    which ``torch.func`` transforms do not support)."""

    forward = staticmethod(recon_terms_op)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def recon_terms(recon: torch.Tensor, target: torch.Tensor):
    """``(mag_recon_loss, if_recon_loss)`` of ``[B, 2, H, W]`` tensors of any strides, computed
    in the inputs' accumulator dtype and returned unrounded, in float64 (round them after
    combining them: the IF term may be negative and cancel the magnitude term)."""
    mag, if_loss, _ = _ReconTerms.apply(recon, target)
    return mag, if_loss
