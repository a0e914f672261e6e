"""The whole combined loss of ``compute_combined_loss`` in a handful of launches.

The loss of ``distill_fused.api.losses``, fused. From the reconstruction partials of
``recon.py`` and the spectral partials of ``stft_spectral.py`` (over the frames and spectra of
``mrstft.py``'s stages), one epilogue program computes every output::

    stft  = max(MRSTFT, 0)                          recon = w_rec (w_mag mag + w_if if)
    kl    = mean_b sum_d max(k, free_bits)          total = w_stft stft + recon (+ kw kl)
    F     = isfinite(total);  total = F ? total : recon

Backward, for incoming gradients ``g_total, g_stft, g_mag, g_if, g_kl, g_recon`` (absent ones
are 0), every input's gradient is a combination of per-term gradients::

    c_recon = g_recon + g_total
    c_mag   = g_mag + w_rec w_mag c_recon          c_if = g_if + w_rec w_if c_recon
    c_stft  = [MRSTFT >= 0] (g_stft + F w_stft g_total)
    c_kl    = g_kl + F kw g_total

A term sends exactly zero unless a present incoming gradient reaches it (the reconstruction
terms through ``g_mag``/``g_if``/``g_recon``/``g_total``, the STFT term through ``g_stft`` or,
where ``F = 1``, ``g_total``, the KL through ``g_kl`` or, where ``F = 1`` and ``kw > 0``,
``g_total``): so ``0 * nan`` from a term outside the differentiated output never reaches an
input, and with ``F = 0`` the total's gradients are ``recon``'s alone. A reached term is
multiplied in as autograd would (a weight of 0 times a NaN gradient is NaN, as in the oracle).

Launches per forward+backward (R resolutions; the default R = 3 gives 14, with the one that
``backward()`` makes for its seed gradient): forward ``_frame_kernel``, R ``rfft``,
``_recon_partials_kernel``, ``_spectral_partials_kernel``, ``_combined_epilogue_kernel`` (the
KL and its gradient inside), and when a gradient is wanted ``_spectral_grad_kernel``, R
``irfft``, ``_frames_adjoint_kernel``; backward ``_combined_backward_kernel`` (recon, target,
mu and logvar gradients in one grid).

This module composes the others' pieces: their launchers (``frame_signals``, ``spectra_of``,
``launch_recon_partials``, ``launch_spectral_partials``, ``signal_gradient``) and, inside its
two kernels, their ``@triton.jit`` functions (``mrstft_from_partials``,
``recon_terms_from_partials``, ``free_bits_kl_loop``, ``load_channels``, ``recon_grads``,
``store_recon_grads``). The config's weights reach the kernels as one float64 device tensor
(``loss_weights``), ``kl_weight`` as another (``device_kl_weight``): values, not compile-time
constants, and no host copy per step.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..core.gradients import first_order_only
from ..core.outputs import LOSS_KEYS, compute_dtype
from ..core.tracing import tracing
from ._common import (
    ONE_PROGRAM,
    device_constants,
    empty,
    gated_grad,
    index_dtype,
    is_wide,
    kernel_op,
    tl_dtype,
    wrap_triton,
)
from .channels import geometry, load_channels, store_recon_grads, tile_start
from .kl import free_bits_kl_loop
from .mrstft import signal_gradient, spectra_of
from .recon import IF_EPS, launch_recon_partials, recon_grads, recon_terms_from_partials
from .stft_frames import frame_signals
from .stft_plan import make_plan, stft_dtype
from .stft_spectral import launch_spectral_partials, mrstft_from_partials

# Tiles of the backward grid, and the partials (and latents) the epilogue reads at a time.
BLOCK = 1024
# Columns of the weights tensor (``loss_weights``).
W_STFT, W_REC, W_MAG, W_IF, FREE_BITS, EPS_IF = (tl.constexpr(column) for column in range(6))


@triton.jit(do_not_specialize=["n_recon_programs", "n_stft_programs", "signals"])
def _combined_epilogue_kernel(
    # the spectral sums' partials and the STFT plan
    stft_partials_ptr,
    n_stft_programs,
    meta_ptr,
    params_ptr,
    signals,
    # the reconstruction sums' partials
    recon_partials_ptr,
    n_recon_programs,
    n_elements,
    # the latents [B, D], read in place
    mu_ptr,
    logvar_ptr,
    kl_numel,
    latent_dim,
    mu_sb,
    mu_sd,
    lv_sb,
    lv_sd,
    # the weights (float64: see ``loss_weights``) and kl_weight
    weights_ptr,
    kw_ptr,
    # the outputs: the six losses, the STFT gradient scalars [R, 4], aux [5], the KL gradients
    total_ptr,
    stft_ptr,
    mag_ptr,
    if_ptr,
    kl_ptr,
    recon_ptr,
    scalars_ptr,
    aux_ptr,
    grad_mu_ptr,
    grad_logvar_ptr,
    # compile-time
    USE_SC: tl.constexpr,
    USE_LOG: tl.constexpr,
    USE_LIN: tl.constexpr,
    WRITE_KL_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    KL_INDEX: tl.constexpr,
    N_RES: tl.constexpr,
):
    """One program: every output, the per-resolution gradient scalars, the KL gradients, and
    ``aux = (F, [MRSTFT >= 0], if_hi, if_lo, M)`` for backward."""
    mrstft = mrstft_from_partials(stft_partials_ptr, n_stft_programs, meta_ptr, params_ptr,
                                  signals, scalars_ptr, USE_SC, USE_LOG, USE_LIN, ACC, BLOCK,
                                  N_RES)
    stft = tl.where(mrstft < 0, 0.0, mrstft)  # torch.clamp(min=0): NaN stays NaN
    mag, if_loss, if_hi, if_lo, mean_tm = recon_terms_from_partials(
        recon_partials_ptr, n_recon_programs, n_elements, tl.load(weights_ptr + EPS_IF), ACC,
        BLOCK)
    kl = free_bits_kl_loop(mu_ptr, logvar_ptr, kl_numel, latent_dim, mu_sb, mu_sd, lv_sb,
                           lv_sd, tl.load(weights_ptr + FREE_BITS).to(ACC), grad_mu_ptr,
                           grad_logvar_ptr, WRITE_KL_GRAD, ACC, BLOCK, KL_INDEX)
    # The weighted sums in fp64 (mag and if come in fp64), each output rounded once: the IF
    # term may be negative, and recon or the total cancel to a small part of their terms.
    recon64 = tl.load(weights_ptr + W_REC) * (tl.load(weights_ptr + W_MAG) * mag
                                              + tl.load(weights_ptr + W_IF) * if_loss)
    total64 = tl.load(weights_ptr + W_STFT) * stft.to(tl.float64) + recon64
    kw = tl.load(kw_ptr).to(tl.float64)
    # The KL term is left out for kl_weight <= 0.
    total64 += tl.where(kw > 0, kw * kl.to(tl.float64), 0.0)
    total = total64.to(ACC)
    recon = recon64.to(ACC)
    finite = (total == total) & (tl.abs(total) != float("inf"))
    tl.store(total_ptr, tl.where(finite, total, recon))
    tl.store(stft_ptr, stft)
    tl.store(mag_ptr, mag.to(ACC))
    tl.store(if_ptr, if_loss.to(ACC))
    tl.store(kl_ptr, kl)
    tl.store(recon_ptr, recon)
    tl.store(aux_ptr, finite.to(ACC))
    tl.store(aux_ptr + 1, (mrstft >= 0).to(ACC))
    tl.store(aux_ptr + 2, if_hi)
    tl.store(aux_ptr + 3, if_lo)
    tl.store(aux_ptr + 4, mean_tm)


@triton.jit
def _incoming(ptr, HAS: tl.constexpr, ACC: tl.constexpr):
    """An output's incoming gradient, or 0 where it has none (``HAS`` false)."""
    if HAS:
        return tl.load(ptr).to(ACC)
    else:
        return tl.sum(tl.zeros([1], dtype=ACC), axis=0)


@triton.jit(do_not_specialize=["unit_y_row0"])
def _combined_backward_kernel(
    # the inputs [B, 2, H, W], read in place (see ``channels.py``)
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
    # what the forward saved: the STFT term's signal gradient (x rows, then y rows from row
    # unit_y_row0), aux, the KL gradients
    unit_ptr,
    unit_y_row0,
    aux_ptr,
    kl_grad_mu_ptr,
    kl_grad_lv_ptr,
    kl_numel,
    # the incoming gradients of the six outputs (read where HAS_G_*)
    g_total_ptr,
    g_stft_ptr,
    g_mag_ptr,
    g_if_ptr,
    g_kl_ptr,
    g_recon_ptr,
    # the weights and kl_weight
    weights_ptr,
    kw_ptr,
    # the outputs, and the programs of the recon/target part of the grid (the rest: latents)
    grad_recon_ptr,
    grad_target_ptr,
    grad_mu_ptr,
    grad_logvar_ptr,
    n_recon_programs,
    # compile-time: which outputs have an incoming gradient, which inputs want one
    HAS_G_TOTAL: tl.constexpr,
    HAS_G_STFT: tl.constexpr,
    HAS_G_MAG: tl.constexpr,
    HAS_G_IF: tl.constexpr,
    HAS_G_KL: tl.constexpr,
    HAS_G_RECON: tl.constexpr,
    GRAD_RECON: tl.constexpr,
    GRAD_TARGET: tl.constexpr,
    HAS_UNIT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Programs ``[0, n_recon_programs)``: ``recon`` (and ``target``) gradients, the STFT term's
    through the saved signal gradient ``unit``; the rest: ``mu``/``logvar`` gradients."""
    g_total = _incoming(g_total_ptr, HAS_G_TOTAL, ACC)
    finite = tl.load(aux_ptr).to(ACC) != 0
    pid = tl.program_id(0)
    if pid < n_recon_programs:
        c_recon = _incoming(g_recon_ptr, HAS_G_RECON, ACC) + g_total
        w_rec = tl.load(weights_ptr + W_REC).to(ACC)
        c_mag = (_incoming(g_mag_ptr, HAS_G_MAG, ACC)
                 + w_rec * tl.load(weights_ptr + W_MAG).to(ACC) * c_recon)
        c_if = (_incoming(g_if_ptr, HAS_G_IF, ACC)
                + w_rec * tl.load(weights_ptr + W_IF).to(ACC) * c_recon)
        # The STFT term is reached by its own output, or by the total where the guard kept it.
        stft_reached = HAS_G_STFT | (HAS_G_TOTAL & finite)
        from_total = tl.where(finite, tl.load(weights_ptr + W_STFT).to(ACC) * g_total, 0.0)
        # Through torch.clamp(min=0): 0 where MRSTFT < 0 or is NaN, yet multiplied in (0 * nan
        # is nan, as in the oracle) wherever the term is reached.
        c_stft = tl.where(tl.load(aux_ptr + 1) != 0,
                          _incoming(g_stft_ptr, HAS_G_STFT, ACC) + from_total, 0.0)
        index = tile_start(pid, BLOCK, WIDE) + tl.arange(0, BLOCK)
        mask = index < n_elements
        rm, ri, tm, ti = load_channels(recon_ptr, target_ptr, index, mask, hw, hw_m, hw_s,
                                       width, width_m, width_s, r_sb, r_sc, r_sh, r_sw,
                                       t_sb, t_sc, t_sh, t_sw, ACC, WIDE)
        grad_rm, grad_ri, grad_tm = recon_grads(
            rm, ri, tm, ti, c_mag, c_if, tl.load(aux_ptr + 2).to(ACC),
            tl.load(aux_ptr + 3).to(ACC), tl.load(aux_ptr + 4).to(ACC), n_elements,
            tl.load(weights_ptr + EPS_IF).to(ACC), HAS_G_MAG | HAS_G_RECON | HAS_G_TOTAL,
            HAS_G_IF | HAS_G_RECON | HAS_G_TOTAL, ACC)
        if HAS_UNIT:
            if GRAD_RECON:
                unit_x = tl.load(unit_ptr + index, mask=mask, other=0.0).to(ACC)
                grad_rm += gated_grad(stft_reached, c_stft, unit_x)
            if GRAD_TARGET:
                unit_y = tl.load(unit_ptr + unit_y_row0 * hw + index, mask=mask,
                                 other=0.0).to(ACC)
                grad_tm += gated_grad(stft_reached, c_stft, unit_y)
        store_recon_grads(grad_recon_ptr, grad_target_ptr, index, mask, hw, hw_m, hw_s,
                          grad_rm, grad_ri, grad_tm, GRAD_RECON, GRAD_TARGET, WIDE)
    else:
        kw = tl.load(kw_ptr).to(ACC)
        # Reached by its own output, or by the total where the guard kept it and kw > 0.
        total_reaches_kl = HAS_G_TOTAL & finite & (kw > 0)
        kl_reached = HAS_G_KL | total_reaches_kl
        c_kl = _incoming(g_kl_ptr, HAS_G_KL, ACC) + tl.where(total_reaches_kl, kw * g_total,
                                                             0.0)
        index = tile_start(pid - n_recon_programs, BLOCK, WIDE) + tl.arange(0, BLOCK)
        mask = index < kl_numel
        g_mu = tl.load(kl_grad_mu_ptr + index, mask=mask, other=0.0).to(ACC)
        g_lv = tl.load(kl_grad_lv_ptr + index, mask=mask, other=0.0).to(ACC)
        tl.store(grad_mu_ptr + index, gated_grad(kl_reached, c_kl, g_mu).to(
            grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_logvar_ptr + index, gated_grad(kl_reached, c_kl, g_lv).to(
            grad_logvar_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# The weights as device tensors
# --------------------------------------------------------------------------------------------

def loss_weights(loss_config, device: torch.device) -> torch.Tensor:
    """``[w_stft, w_rec, w_mag, w_if, free_bits, 1e-8]`` (the columns ``W_STFT`` ...
    ``EPS_IF``) in float64 on ``device``: full float64 values in every kernel (Triton would
    pass Python floats as float32)."""
    rc = loss_config.reconstruction
    return device_constants((loss_config.stft.weight, rc.weight, rc.magnitude_weight,
                              rc.if_weight, loss_config.kl.free_bits, IF_EPS), device)


def device_kl_weight(kl_weight, device: torch.device) -> torch.Tensor:
    """``kl_weight`` (a Python float or a one-element tensor) as a float64 tensor on
    ``device``, which the kernels read: a value that changes every step (a warm-up schedule)
    is then data, not a compile-time constant, and a compiled step is not recompiled for it."""
    if isinstance(kl_weight, torch.Tensor):
        return kl_weight.detach().to(device=device, dtype=torch.float64).reshape(())
    if tracing():
        # An addition, not a factory: torch.compile passes a float as a graph input, which
        # arithmetic keeps symbolic (torch.full would specialize the graph on its value).
        return torch.zeros((), dtype=torch.float64, device=device) + kl_weight
    return device_constants((kl_weight,), device)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _epilogue_outputs(recon, target, mu, logvar, n_res, write_kl_grad):
    acc = compute_dtype(recon, target, mu, logvar)
    dev = recon.device
    kl_shape = mu.shape if write_kl_grad else (0,)
    return ([empty((), acc, dev) for _ in LOSS_KEYS]
            + [empty((n_res, 4), acc, dev), empty((5,), acc, dev),
               empty(kl_shape, acc, dev), empty(kl_shape, acc, dev)])


@kernel_op("distill_fused::combined_reduce", mutates_args=())
def combined_reduce_op(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor,
                       logvar: torch.Tensor, spec: torch.Tensor, meta: torch.Tensor,
                       params: torch.Tensor, signals: int, n_res: int, n_stft_programs: int,
                       stft_tile: int, use_terms: List[bool], weights: torch.Tensor,
                       kl_weight: torch.Tensor, write_kl_grad: bool,
                       wide: bool) -> List[torch.Tensor]:
    """The six losses, then ``scalars [R, 4]``, ``aux [5]``, ``dkl/dmu``, ``dkl/dlogvar``:
    reconstruction partials, STFT partials, and the epilogue (three launches)."""
    recon_partials, n, n_recon_programs = launch_recon_partials(recon, target)
    stft_partials = launch_spectral_partials(spec, meta, params, signals, n_res,
                                             n_stft_programs, stft_tile, wide)
    outs = _epilogue_outputs(recon, target, mu, logvar, n_res, write_kl_grad)
    wrap_triton(_combined_epilogue_kernel)[(1,)](
        stft_partials, n_stft_programs, meta, params, signals,
        recon_partials, n_recon_programs, n,
        mu, logvar, mu.numel(), mu.shape[1], *mu.stride(), *logvar.stride(),
        weights, kl_weight,
        *outs,
        USE_SC=use_terms[0], USE_LOG=use_terms[1], USE_LIN=use_terms[2],
        WRITE_KL_GRAD=write_kl_grad, ACC=tl_dtype(compute_dtype(recon, target, mu, logvar)),
        BLOCK=BLOCK, KL_INDEX=index_dtype(BLOCK, mu, logvar), N_RES=n_res, **ONE_PROGRAM)
    return outs


def _backward_outputs(recon, target, mu, logvar_dtype, grad_recon, grad_target, grad_latent):
    dev = recon.device
    return [empty(recon.shape if grad_recon else (0,), recon.dtype, dev),
            empty(target.shape if grad_target else (0,), target.dtype, dev),
            empty(mu.shape if grad_latent else (0,), mu.dtype, dev),
            empty(mu.shape if grad_latent else (0,), logvar_dtype, dev)]


@kernel_op("distill_fused::combined_backward", mutates_args=())
def combined_backward_op(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor,
                         logvar_dtype: torch.dtype, unit: Optional[torch.Tensor],
                         aux: torch.Tensor, kl_grad_mu: torch.Tensor,
                         kl_grad_logvar: torch.Tensor, grads: List[Optional[torch.Tensor]],
                         weights: torch.Tensor, kl_weight: torch.Tensor, grad_recon: bool,
                         grad_target: bool, grad_latent: bool) -> List[torch.Tensor]:
    """Gradients for ``recon``, ``target``, ``mu``, ``logvar`` (empty where not wanted), in one
    launch."""
    n, *shape = geometry(recon)
    outs = _backward_outputs(recon, target, mu, logvar_dtype, grad_recon, grad_target,
                             grad_latent)
    n_recon_programs = triton.cdiv(n, BLOCK) if (grad_recon or grad_target) else 0
    kl_numel = mu.numel() if grad_latent else 0
    present = [g for g in grads if g is not None]
    dummy = present[0] if present else aux
    grid = (n_recon_programs + triton.cdiv(kl_numel, BLOCK),)
    if grid[0] == 0:
        return outs
    # 8 warps (4 elements a thread): at 4, ptxas holds the bf16 specialization for sm_80 to
    # 72 registers and spills.
    wrap_triton(_combined_backward_kernel)[grid](
        recon, target, n, *shape, *recon.stride(), *target.stride(),
        unit if unit is not None else aux, recon.shape[0] if grad_recon else 0,
        aux, kl_grad_mu, kl_grad_logvar, kl_numel,
        *[g if g is not None else dummy for g in grads],
        weights, kl_weight,
        *outs, n_recon_programs,
        HAS_G_TOTAL=grads[0] is not None, HAS_G_STFT=grads[1] is not None,
        HAS_G_MAG=grads[2] is not None, HAS_G_IF=grads[3] is not None,
        HAS_G_KL=grads[4] is not None, HAS_G_RECON=grads[5] is not None,
        GRAD_RECON=grad_recon, GRAD_TARGET=grad_target, HAS_UNIT=unit is not None,
        ACC=tl_dtype(aux.dtype), BLOCK=BLOCK, WIDE=is_wide(BLOCK, recon, target, mu),
        num_warps=8)
    return outs


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

class _CombinedLoss(torch.autograd.Function):
    """Forward: the six losses, with every gradient that depends only on the inputs computed
    on the way (the STFT term's as a signal-domain gradient, the KL's per element). Backward:
    one kernel combining them with the incoming gradients. Gradients of unused outputs are not
    materialised (no zero-filling launches)."""

    @staticmethod
    def forward(recon, target, mu, logvar, weights, kl_weight, settings, fft_grouping, needs_grad):
        grad_recon, grad_target, grad_mu, grad_logvar = needs_grad
        b, _, h, w = recon.shape
        plan = make_plan(settings, b, h * w, recon.device,
                         stft_dtype(compute_dtype(recon, target, mu, logvar), fft_grouping),
                         fft_grouping)
        x, y = recon[:, 0], target[:, 0]
        frames, spec = frame_signals(x, y, _spectrogram_layout(x), _spectrogram_layout(y),
                                     plan)
        spec = spectra_of(frames, spec, plan)
        outs = combined_reduce_op(recon, target, mu, logvar, spec, plan.meta, plan.params, b,
                                  plan.n_res, plan.spec_programs, plan.partial_tile,
                                  list(plan.use_terms), weights, kl_weight,
                                  grad_mu or grad_logvar, plan.wide)
        scalars, aux, kl_grad_mu, kl_grad_logvar = outs[6:]
        unit = None
        if grad_recon or grad_target:
            unit = signal_gradient(spec, frames, scalars, plan, grad_recon, grad_target)
        return (*outs[:6], aux, kl_grad_mu, kl_grad_logvar, unit)

    @staticmethod
    def setup_context(ctx, inputs, output):
        recon, target, mu, logvar, weights, kl_weight, _, _, needs_grad = inputs
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in output[6:] if t is not None))
        ctx.save_for_backward(recon, target, mu, logvar, weights, kl_weight, *output[6:])
        ctx.config = (logvar.dtype, needs_grad)

    @staticmethod
    def backward(ctx, *grads):
        (recon, target, mu, logvar, weights, kl_weight, aux, kl_grad_mu, kl_grad_logvar,
         unit) = ctx.saved_tensors
        logvar_dtype, (grad_recon, grad_target, grad_mu, grad_logvar) = ctx.config
        with torch.no_grad():  # the op has no autograd formula: see first_order_only
            g_recon, g_target, g_mu, g_logvar = combined_backward_op(
                recon, target, mu, logvar_dtype, unit, aux, kl_grad_mu, kl_grad_logvar,
                list(grads[:6]), weights, kl_weight, grad_recon, grad_target,
                grad_mu or grad_logvar)
        input_grads = first_order_only("triton", (
            g_recon if grad_recon else None, g_target if grad_target else None,
            g_mu if grad_mu else None, g_logvar if grad_logvar else None),
            (recon, target, mu, logvar))
        return (*input_grads, None, None, None, None, None)


def _spectrogram_layout(t: torch.Tensor):
    """``[B, H, W]`` flattened row-major -> the framing kernel's ``(channels, width, strides)``."""
    return 1, t.shape[2], (t.stride(0), 0, t.stride(1), t.stride(2))


def combined_loss(recon, target, mu, logvar, settings, loss_config, kl_weight, fft_grouping):
    """The six losses of ``compute_combined_loss`` (inputs already validated; ``kl_weight`` a
    Python float or a one-element tensor that needs no gradient; the STFT term's FFTs grouped
    by ``fft_grouping``) by name, and the guard's decision ``F`` (0-dim, 1 where the total was
    finite). Under ``torch.no_grad()`` no gradient is computed."""
    needs_grad = tuple(torch.is_grad_enabled() and t.requires_grad
                       for t in (recon, target, mu, logvar))
    *losses, aux, _, _, _ = _CombinedLoss.apply(
        recon, target, mu, logvar, loss_weights(loss_config, recon.device),
        device_kl_weight(kl_weight, recon.device), settings, fft_grouping, needs_grad)
    return dict(zip(LOSS_KEYS, losses)), aux[0]
