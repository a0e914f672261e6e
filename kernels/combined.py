"""The whole combined loss of ``compute_combined_loss`` in a handful of launches.

Spec steps 1-7 (``distill_fused.losses``), fused. With the reconstruction sums and the STFT
partials of ``recon.py`` and ``stft.py``, one epilogue program computes every output::

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
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..gradients import first_order_only
from ..tracing import tracing
from ._common import (ONE_PROGRAM, accumulator_dtype, divide, empty, f64_parts, index_dtype,
                      is_wide, joined, kernel_op, tl_dtype, wrap_triton)
from .kl import free_bits_kl_loop
from .recon import BLOCK as RECON_BLOCK
from .recon import (IF_EPS, SUM_LAUNCH, _recon_partials_kernel, geometry, load_channels,
                    recon_grads, recon_terms_from_partials, sum_programs, tile_start)
from .stft import (BLOCK, frame_signals, launch_spectral_partials, make_plan,
                   mrstft_from_partials, signal_gradient, spectra_of, stft_dtype)

OUTPUTS = ("total_loss", "stft_loss", "mag_recon_loss", "if_recon_loss", "kl_loss",
           "recon_loss")


@triton.jit
def _combined_epilogue_kernel(
    stft_partials_ptr, meta_ptr, scalars_ptr, params_ptr, n_stft_programs, signals,
    recon_partials_ptr, n_recon_programs, n_elements,
    mu_ptr, logvar_ptr, grad_mu_ptr, grad_logvar_ptr, kl_numel, latent_dim,
    mu_sb, mu_sd, lv_sb, lv_sd,
    total_ptr, stft_ptr, mag_ptr, if_ptr, kl_ptr, recon_ptr, aux_ptr,
    if_eps_hi, if_eps_lo, fb_hi, fb_lo, w_stft_hi, w_stft_lo, w_rec_hi, w_rec_lo,
    w_mag_hi, w_mag_lo, w_if_hi, w_if_lo, kw_ptr,
    USE_SC: tl.constexpr, USE_LOG: tl.constexpr, USE_LIN: tl.constexpr,
    WRITE_KL_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    KL_INDEX: tl.constexpr, N_RES: tl.constexpr,
):
    """One program: every output of spec steps 1-7, the per-resolution gradient scalars, the
    KL gradients, and ``aux = (F, [MRSTFT >= 0], if_hi, if_lo, M)`` for backward."""
    mrstft = mrstft_from_partials(stft_partials_ptr, meta_ptr, scalars_ptr, n_stft_programs,
                                  signals, params_ptr, USE_SC, USE_LOG, USE_LIN, ACC, BLOCK,
                                  N_RES)
    stft = tl.where(mrstft < 0, 0.0, mrstft)  # torch.clamp(min=0): NaN stays NaN
    mag, if_loss, if_hi, if_lo, mean_tm = recon_terms_from_partials(
        recon_partials_ptr, n_recon_programs, n_elements, if_eps_hi, if_eps_lo, ACC, BLOCK)
    kl = free_bits_kl_loop(mu_ptr, logvar_ptr, grad_mu_ptr, grad_logvar_ptr, kl_numel,
                           latent_dim, mu_sb, mu_sd, lv_sb, lv_sd, fb_hi, fb_lo, WRITE_KL_GRAD,
                           ACC, BLOCK, KL_INDEX)
    # The weighted sums in fp64 (mag and if come in fp64), each output rounded once: the IF
    # term may be negative, and recon or the total cancel to a small part of their terms.
    recon64 = joined(w_rec_hi, w_rec_lo, tl.float64) * (
        joined(w_mag_hi, w_mag_lo, tl.float64) * mag
        + joined(w_if_hi, w_if_lo, tl.float64) * if_loss)
    total64 = joined(w_stft_hi, w_stft_lo, tl.float64) * stft.to(tl.float64) + recon64
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
    if HAS:
        return tl.load(ptr).to(ACC)
    else:
        return tl.sum(tl.zeros([1], dtype=ACC), axis=0)


@triton.jit
def _combined_backward_kernel(
    recon_ptr, target_ptr, unit_ptr, aux_ptr, kl_grad_mu_ptr, kl_grad_lv_ptr,
    g_total_ptr, g_stft_ptr, g_mag_ptr, g_if_ptr, g_kl_ptr, g_recon_ptr,
    grad_recon_ptr, grad_target_ptr, grad_mu_ptr, grad_logvar_ptr,
    n_elements, hw, hw_m, hw_s, width, width_m, width_s,
    r_sb, r_sc, r_sh, r_sw, t_sb, t_sc, t_sh, t_sw, unit_y_row0, kl_numel, n_recon_programs,
    if_eps_hi, if_eps_lo, w_stft_hi, w_stft_lo, w_rec_hi, w_rec_lo, w_mag_hi, w_mag_lo,
    w_if_hi, w_if_lo, kw_ptr,
    HAS_G_TOTAL: tl.constexpr, HAS_G_STFT: tl.constexpr, HAS_G_MAG: tl.constexpr,
    HAS_G_IF: tl.constexpr, HAS_G_KL: tl.constexpr, HAS_G_RECON: tl.constexpr,
    GRAD_RECON: tl.constexpr, GRAD_TARGET: tl.constexpr, HAS_UNIT: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
):
    """Programs ``[0, n_recon_programs)``: ``recon`` (and ``target``) gradients, the STFT term's
    through the saved signal gradient ``unit``; the rest: ``mu``/``logvar`` gradients."""
    g_total = _incoming(g_total_ptr, HAS_G_TOTAL, ACC)
    finite = tl.load(aux_ptr).to(ACC) != 0
    pid = tl.program_id(0)
    if pid < n_recon_programs:
        c_recon = _incoming(g_recon_ptr, HAS_G_RECON, ACC) + g_total
        w_rec = joined(w_rec_hi, w_rec_lo, ACC)
        c_mag = (_incoming(g_mag_ptr, HAS_G_MAG, ACC)
                 + w_rec * joined(w_mag_hi, w_mag_lo, ACC) * c_recon)
        c_if = _incoming(g_if_ptr, HAS_G_IF, ACC) + w_rec * joined(w_if_hi, w_if_lo, ACC) * c_recon
        # The STFT term is reached by its own output, or by the total where the guard kept it.
        stft_reached = HAS_G_STFT | (HAS_G_TOTAL & finite)
        from_total = tl.where(finite, joined(w_stft_hi, w_stft_lo, ACC) * g_total, 0.0)
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
            joined(if_eps_hi, if_eps_lo, ACC), HAS_G_MAG | HAS_G_RECON | HAS_G_TOTAL,
            HAS_G_IF | HAS_G_RECON | HAS_G_TOTAL, ACC)
        out = index + divide(index, hw, hw_m, hw_s, WIDE) * hw  # contiguous [B, 2, H, W]
        if GRAD_RECON:
            if HAS_UNIT:
                unit_x = tl.load(unit_ptr + index, mask=mask, other=0.0).to(ACC)
                grad_rm += tl.where(stft_reached, c_stft * unit_x, 0.0)
            dtype = grad_recon_ptr.dtype.element_ty
            tl.store(grad_recon_ptr + out, grad_rm.to(dtype), mask=mask)
            tl.store(grad_recon_ptr + out + hw, grad_ri.to(dtype), mask=mask)
        if GRAD_TARGET:
            if HAS_UNIT:
                unit_y = tl.load(unit_ptr + unit_y_row0 * hw + index, mask=mask,
                                 other=0.0).to(ACC)
                grad_tm += tl.where(stft_reached, c_stft * unit_y, 0.0)
            dtype = grad_target_ptr.dtype.element_ty
            tl.store(grad_target_ptr + out, grad_tm.to(dtype), mask=mask)
            tl.store(grad_target_ptr + out + hw, (-grad_ri).to(dtype), mask=mask)
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
        tl.store(grad_mu_ptr + index, tl.where(kl_reached, c_kl * g_mu, 0.0).to(
            grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_logvar_ptr + index, tl.where(kl_reached, c_kl * g_lv, 0.0).to(
            grad_logvar_ptr.dtype.element_ty), mask=mask)


def _weights(loss_config) -> List[float]:
    rc = loss_config.reconstruction
    return [float(v) for v in (loss_config.stft.weight, rc.weight, rc.magnitude_weight,
                               rc.if_weight)]


def _parts(values) -> List[float]:
    return [p for v in values for p in f64_parts(v)]


def _epilogue_outputs(recon, target, mu, logvar, n_res, write_kl_grad):
    acc = accumulator_dtype(recon, target, mu, logvar)
    dev = recon.device
    kl_shape = mu.shape if write_kl_grad else (0,)
    return ([empty((), acc, dev) for _ in OUTPUTS]
            + [empty((n_res, 4), acc, dev), empty((5,), acc, dev),
               empty(kl_shape, acc, dev), empty(kl_shape, acc, dev)])


@kernel_op("distill_fused::combined_reduce", mutates_args=())
def combined_reduce_op(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor,
                       logvar: torch.Tensor, spec: torch.Tensor, meta: torch.Tensor,
                       params: torch.Tensor, signals: int, n_res: int, n_stft_programs: int,
                       use_terms: List[bool], weights: List[float], free_bits: float,
                       kl_weight: torch.Tensor, write_kl_grad: bool,
                       wide: bool) -> List[torch.Tensor]:
    """The six losses, then ``scalars [R, 4]``, ``aux [5]``, ``dkl/dmu``, ``dkl/dlogvar``:
    reconstruction partials, STFT partials, and the epilogue (three launches)."""
    acc = accumulator_dtype(recon, target, mu, logvar)
    n, *shape = geometry(recon)
    n_recon_programs = sum_programs(n)
    recon_partials = empty((3, n_recon_programs), torch.float64, recon.device)
    wrap_triton(_recon_partials_kernel)[(n_recon_programs,)](
        recon, target, recon_partials, n, n_recon_programs, *shape, *recon.stride(),
        *target.stride(), ACC=tl_dtype(acc), BLOCK=RECON_BLOCK,
        WIDE=is_wide(RECON_BLOCK, recon, target), **SUM_LAUNCH)
    stft_partials = launch_spectral_partials(spec, meta, params, signals, n_res,
                                             n_stft_programs, wide)
    outs = _epilogue_outputs(recon, target, mu, logvar, n_res, write_kl_grad)
    scalars, aux, grad_mu, grad_logvar = outs[6:]
    wrap_triton(_combined_epilogue_kernel)[(1,)](
        stft_partials, meta, scalars, params, n_stft_programs, signals,
        recon_partials, n_recon_programs, n,
        mu, logvar, grad_mu, grad_logvar, mu.numel(), mu.shape[1], *mu.stride(),
        *logvar.stride(), *outs[:6], aux,
        *f64_parts(IF_EPS), *f64_parts(free_bits), *_parts(weights), kl_weight,
        USE_SC=use_terms[0], USE_LOG=use_terms[1], USE_LIN=use_terms[2],
        WRITE_KL_GRAD=write_kl_grad, ACC=tl_dtype(acc), BLOCK=BLOCK,
        KL_INDEX=index_dtype(BLOCK, mu, logvar), N_RES=n_res, **ONE_PROGRAM)
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
                         weights: List[float], kl_weight: torch.Tensor, grad_recon: bool,
                         grad_target: bool, grad_latent: bool) -> List[torch.Tensor]:
    """Gradients for ``recon``, ``target``, ``mu``, ``logvar`` (empty where not wanted), in one
    launch."""
    acc = aux.dtype
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
        recon, target, unit if unit is not None else aux, aux, kl_grad_mu, kl_grad_logvar,
        *[g if g is not None else dummy for g in grads], *outs,
        n, *shape, *recon.stride(), *target.stride(), recon.shape[0] if grad_recon else 0,
        kl_numel,
        n_recon_programs, *f64_parts(IF_EPS), *_parts(weights), kl_weight,
        HAS_G_TOTAL=grads[0] is not None, HAS_G_STFT=grads[1] is not None,
        HAS_G_MAG=grads[2] is not None, HAS_G_IF=grads[3] is not None,
        HAS_G_KL=grads[4] is not None, HAS_G_RECON=grads[5] is not None,
        GRAD_RECON=grad_recon, GRAD_TARGET=grad_target, HAS_UNIT=unit is not None,
        ACC=tl_dtype(acc), BLOCK=BLOCK, WIDE=is_wide(BLOCK, recon, target, mu),
        num_warps=8)
    return outs


class _CombinedLoss(torch.autograd.Function):
    """Forward: the six losses, with every gradient that depends only on the inputs computed
    on the way (the STFT term's as a signal-domain gradient, the KL's per element). Backward:
    one kernel combining them with the incoming gradients. Gradients of unused outputs are not
    materialised (no zero-filling launches)."""

    @staticmethod
    def forward(recon, target, mu, logvar, kl_weight, settings, loss_config, needs_grad):
        grad_recon, grad_target, grad_mu, grad_logvar = needs_grad
        dtype = accumulator_dtype(recon, target, mu, logvar)
        b, _, h, w = recon.shape
        plan = make_plan(settings, b, h * w, recon.device, stft_dtype(dtype))
        x, y = recon[:, 0], target[:, 0]
        frames, spec = frame_signals(x, y, _spectrogram_layout(x), _spectrogram_layout(y),
                                     plan)
        spec = spectra_of(frames, spec, plan)
        outs = combined_reduce_op(recon, target, mu, logvar, spec, plan.meta, plan.params, b,
                                  plan.n_res, plan.spec_programs, list(plan.use_terms),
                                  _weights(loss_config), float(loss_config.kl.free_bits),
                                  kl_weight, grad_mu or grad_logvar, plan.wide)
        scalars, aux, kl_grad_mu, kl_grad_logvar = outs[6:]
        unit = None
        if grad_recon or grad_target:
            unit = signal_gradient(spec, frames, scalars, plan, grad_recon, grad_target)
        return (*outs[:6], aux, kl_grad_mu, kl_grad_logvar, unit)

    @staticmethod
    def setup_context(ctx, inputs, output):
        recon, target, mu, logvar, kl_weight, _, loss_config, needs_grad = inputs
        aux, kl_grad_mu, kl_grad_logvar, unit = output[6:]
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in output[6:] if t is not None))
        ctx.save_for_backward(recon, target, mu, logvar, kl_weight, unit, aux, kl_grad_mu,
                              kl_grad_logvar)
        ctx.config = (_weights(loss_config), logvar.dtype, needs_grad)

    @staticmethod
    def backward(ctx, *grads):
        (recon, target, mu, logvar, kl_weight, unit, aux, kl_grad_mu,
         kl_grad_logvar) = ctx.saved_tensors
        weights, logvar_dtype, (grad_recon, grad_target, grad_mu, grad_logvar) = ctx.config
        with torch.no_grad():  # the op has no autograd formula: see first_order_only
            g_recon, g_target, g_mu, g_logvar = combined_backward_op(
                recon, target, mu, logvar_dtype, unit, aux, kl_grad_mu, kl_grad_logvar,
                list(grads[:6]), weights, kl_weight, grad_recon, grad_target,
                grad_mu or grad_logvar)
        input_grads = first_order_only("triton", (
            g_recon if grad_recon else None, g_target if grad_target else None,
            g_mu if grad_mu else None, g_logvar if grad_logvar else None),
            (recon, target, mu, logvar))
        return (*input_grads, None, None, None, None)


def _spectrogram_layout(t: torch.Tensor):
    """``[B, H, W]`` flattened row-major -> the framing kernel's ``(channels, width, strides)``."""
    return 1, t.shape[2], (t.stride(0), 0, t.stride(1), t.stride(2))


def device_kl_weight(kl_weight, device) -> torch.Tensor:
    """``kl_weight`` (a Python float or a one-element tensor) as a 0-dim float64 tensor on
    ``device``, which the kernels read: a value that changes every step (a warm-up schedule)
    is then data, not a compile-time constant, and a compiled step is not recompiled for it.
    Python floats are kept per value (a schedule has few), so an eager step makes no copy."""
    if isinstance(kl_weight, torch.Tensor):
        return kl_weight.detach().to(device=device, dtype=torch.float64).reshape(())
    if tracing():
        # An addition, not torch.full: torch.compile passes a float as a graph input, which
        # arithmetic keeps symbolic (torch.full would specialize the graph on its value).
        return torch.zeros((), dtype=torch.float64, device=device) + kl_weight
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Filled by a captured kernel, so only once the graph replays: not for the cache.
        return torch.full((), kl_weight, dtype=torch.float64, device=device)
    key = (kl_weight, device)
    value = _KL_WEIGHTS.get(key)
    if value is None:
        if len(_KL_WEIGHTS) >= 64:
            _KL_WEIGHTS.clear()
        value = _KL_WEIGHTS[key] = torch.full((), kl_weight, dtype=torch.float64,
                                              device=device)
    return value


_KL_WEIGHTS = {}


def combined_loss(recon, target, mu, logvar, settings, loss_config, kl_weight):
    """The six losses of ``compute_combined_loss`` (inputs already validated; ``kl_weight`` a
    Python float or a one-element tensor that needs no gradient) by name, and the guard's
    decision ``F`` (0-dim, 1 where the total was finite). Under ``torch.no_grad()`` no gradient
    is computed."""
    needs_grad = tuple(torch.is_grad_enabled() and t.requires_grad
                       for t in (recon, target, mu, logvar))
    *losses, aux, _, _, _ = _CombinedLoss.apply(
        recon, target, mu, logvar, device_kl_weight(kl_weight, recon.device), settings,
        loss_config, needs_grad)
    return dict(zip(OUTPUTS, losses)), aux[0]
