"""The spectral stage of the multi-resolution STFT loss: magnitudes, the loss, and its
gradient with respect to the spectra.

For each resolution ``r`` with ``K`` bins (``F`` frames of ``S`` rows, ``n//2 + 1`` bins each)
and ``R`` resolutions (auraloss's definition)::

    Px = max(|X|^2, eps),  Mx = sqrt(Px)                                (likewise Py, My)
    L_r = w_sc ||My - Mx|| / ||My|| + w_log mean|ln(Mx / My)| + w_lin mean|Mx - My|
    MRSTFT = mean_r L_r

and its gradient, with ``D = Mx - My``::

    dL/dMx = a_r D + c_log sign(ln Mx/My) / Mx + c_lin sign(D)
    dL/dMy = -a_r D - b_r My - c_log sign(ln Mx/My) / My - c_lin sign(D)
      a_r = w_sc / (R ||D|| ||My||)  (0 where ||D|| = 0, as torch.norm's backward),
      b_r = w_sc ||D|| / (R ||My||^3),
      c_log = w_log / (R K),  c_lin = w_lin / (R K)
    G = dL/dX = h_k dL/dMx X / Mx where |X|^2 >= eps, else 0 (the clamp holds),
        h_k = 1/2 but for DC and Nyquist (the inverse rfft counts the other bins twice)

``_spectral_partials_kernel`` sums ``(D^2, My^2, |ln Mx/My|, |D|)`` per program over every P-th
tile of its resolution; an epilogue (``_mrstft_epilogue_kernel``, or the combined loss's,
through ``mrstft_from_partials``) sums the partials in a fixed order into the loss and the
scalars ``(a_r, b_r, c_log, c_lin)``; ``_spectral_grad_kernel`` writes ``G`` over the spectra.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    ONE_PROGRAM,
    divide,
    empty,
    kernel_op,
    reciprocal,
    signum,
    tl_dtype,
    wrap_triton,
)
from .stft_plan import (
    BINS,
    BINS_M,
    BINS_S,
    FFT_N,
    FRAMES,
    GRAD_TILE0,
    META,
    N_FFT,
    SPEC_OFF,
    SPEC_ROW_M,
    SPEC_ROW_S,
    SPEC_SIDE,
    STRIDE,
    STRIDE_M,
    STRIDE_S,
    resolution_of,
    spectral_warps,
)

# The partials an epilogue reads at a time.
EPILOGUE_BLOCK = 1024


@triton.jit
def _magnitudes(spec_ptr, index, mask, eps):
    """Re, Im, clamped power and magnitude of complex element ``index`` (real-pair layout)."""
    re = tl.load(spec_ptr + 2 * index, mask=mask, other=0.0)
    im = tl.load(spec_ptr + 2 * index + 1, mask=mask, other=0.0)
    power = re * re + im * im
    clamped = tl.where(power < eps, eps, power)
    return re, im, power, clamped, tl.sqrt(clamped)


@triton.jit
def spectral_terms(spec_ptr, x_index, y_index, mask, eps):
    """``(D^2, My^2, |ln Mx/My|, |D|)`` of the complex elements ``x_index`` (X) and ``y_index``
    (Y), each 0 where not ``mask`` (the summands of the spectral sums)."""
    _, _, _, py, my = _magnitudes(spec_ptr, y_index, mask, eps)
    _, _, _, _, mx = _magnitudes(spec_ptr, x_index, mask, eps)
    diff = mx - my
    return (tl.where(mask, diff * diff, 0.0), tl.where(mask, py, 0.0),
            tl.where(mask, tl.abs(tl.log(mx / my)), 0.0), tl.where(mask, tl.abs(diff), 0.0))


@triton.jit(do_not_specialize=["n_programs", "signals"])
def _spectral_partials_kernel(
    # the spectra (real pairs) and the plan: meta table, (w_sc, w_log, w_lin, eps)
    spec_ptr,
    meta_ptr,
    params_ptr,
    signals,
    # the output: [R, n_programs, 4] partial sums
    partials_ptr,
    n_programs,
    # compile-time
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Grid ``(P, R)``: program p of resolution r sums tiles ``p, p + P, p + 2P, ...`` of r's
    (row, frame, bin) elements, in that order, into
    ``partials[r, p] = (sum D^2, sum My^2, sum |ln Mx/My|, sum |D|)``."""
    r = tl.program_id(1)
    program = tl.program_id(0)
    row_meta = meta_ptr + r * META
    n_fft = tl.load(row_meta + N_FFT)
    spec_off = tl.load(row_meta + SPEC_OFF)
    spec_side = tl.load(row_meta + SPEC_SIDE)
    spec_row = tl.load(row_meta + FFT_N) // 2 + 1
    stride = tl.load(row_meta + STRIDE)
    bins = n_fft // 2 + 1
    count = signals * tl.load(row_meta + FRAMES) * bins
    bins_m = tl.load(row_meta + BINS_M)
    bins_s = tl.load(row_meta + BINS_S)
    eps = tl.load(params_ptr + 3).to(ACC)
    sum_d2 = tl.zeros([BLOCK], dtype=ACC)
    sum_py = tl.zeros([BLOCK], dtype=ACC)
    sum_log = tl.zeros([BLOCK], dtype=ACC)
    sum_d = tl.zeros([BLOCK], dtype=ACC)
    start = program * BLOCK
    if WIDE:
        start = start.to(tl.int64)
    while start < count:  # a while loop, not range(): see _common.py
        e = start + tl.arange(0, BLOCK)
        mask = e < count
        row = divide(e, bins, bins_m, bins_s, WIDE)
        x_index = spec_off + row * spec_row + (e - row * bins) * stride
        d2, py, log_ratio, d = spectral_terms(spec_ptr, x_index, x_index + spec_side, mask, eps)
        sum_d2 += d2
        sum_py += py
        sum_log += log_ratio
        sum_d += d
        start += n_programs * BLOCK
    out = partials_ptr + (r * n_programs + program) * 4
    # One slot per program: in range by construction (grid == (P, R)).
    tl.store(out, tl.sum(sum_d2, axis=0))
    tl.store(out + 1, tl.sum(sum_py, axis=0))
    tl.store(out + 2, tl.sum(sum_log, axis=0))
    tl.store(out + 3, tl.sum(sum_d, axis=0))


@triton.jit
def mrstft_from_partials(
    # the spectral sums' partials and the plan
    partials_ptr,
    n_programs,
    meta_ptr,
    params_ptr,
    signals,
    # the output: [R, 4] gradient scalars
    scalars_ptr,
    # compile-time: which terms have a non-zero weight
    USE_SC: tl.constexpr,
    USE_LOG: tl.constexpr,
    USE_LIN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    N_RES: tl.constexpr,
):
    """(Inside a single-program epilogue; ``params = (w_sc, w_log, w_lin, eps)``.) Sums each
    resolution's partials in a fixed order, writes the gradient scalars
    ``(a_r, b_r, c_log, c_lin)`` to ``scalars[r]`` and returns ``MRSTFT = mean_r L_r``. Terms
    whose weight is 0 are left out, as auraloss leaves them."""
    zero = tl.sum(tl.zeros([1], dtype=ACC), axis=0)
    total = zero
    w_sc = tl.load(params_ptr).to(ACC)
    w_log = tl.load(params_ptr + 1).to(ACC)
    w_lin = tl.load(params_ptr + 2).to(ACC)
    inv_res = reciprocal(N_RES, ACC)
    for r in tl.static_range(N_RES):
        acc = tl.zeros([4, BLOCK], dtype=ACC)
        start = 0
        while start < n_programs:
            idx = start + tl.arange(0, BLOCK)
            q = tl.arange(0, 4)
            ptrs = partials_ptr + (r * n_programs + idx[None, :]) * 4 + q[:, None]
            acc += tl.load(ptrs, mask=(idx < n_programs)[None, :], other=0.0).to(ACC)
            start += BLOCK
        sums = tl.sum(acc, axis=1)
        q = tl.arange(0, 4)
        num = tl.sqrt(tl.sum(tl.where(q == 0, sums, 0.0), axis=0))
        den = tl.sqrt(tl.sum(tl.where(q == 1, sums, 0.0), axis=0))
        count = (signals * tl.load(meta_ptr + r * META + FRAMES)
                 * tl.load(meta_ptr + r * META + BINS)).to(ACC)
        # Three divisions per resolution, the rest products: in fp64 each division is a call
        # to a division routine, and values live across calls can spill.
        inv_count = 1.0 / count
        loss_r = zero
        a_r = zero
        b_r = zero
        if USE_SC:
            inv_den = 1.0 / den
            loss_r += w_sc * (num * inv_den)
            a_r = tl.where(num == 0, 0.0, w_sc * inv_res * inv_den / num)  # NaN stays NaN
            b_r = w_sc * inv_res * num * inv_den * inv_den * inv_den
        if USE_LOG:
            loss_r += w_log * (tl.sum(tl.where(q == 2, sums, 0.0), axis=0) * inv_count)
        if USE_LIN:
            loss_r += w_lin * (tl.sum(tl.where(q == 3, sums, 0.0), axis=0) * inv_count)
        total += loss_r
        # One row per resolution: in range by construction (r < N_RES).
        tl.store(scalars_ptr + r * 4, a_r)
        tl.store(scalars_ptr + r * 4 + 1, b_r)
        tl.store(scalars_ptr + r * 4 + 2, w_log * inv_res * inv_count)
        tl.store(scalars_ptr + r * 4 + 3, w_lin * inv_res * inv_count)
    return total * inv_res


@triton.jit(do_not_specialize=["n_programs", "signals"])
def _mrstft_epilogue_kernel(
    # the spectral sums' partials and the plan
    partials_ptr,
    n_programs,
    meta_ptr,
    params_ptr,
    signals,
    # the outputs: [R, 4] gradient scalars, the loss
    scalars_ptr,
    loss_ptr,
    # compile-time
    USE_SC: tl.constexpr,
    USE_LOG: tl.constexpr,
    USE_LIN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    N_RES: tl.constexpr,
):
    """One program: the MRSTFT value (the module's loss) and the gradient scalars."""
    loss = mrstft_from_partials(partials_ptr, n_programs, meta_ptr, params_ptr, signals,
                                scalars_ptr, USE_SC, USE_LOG, USE_LIN, ACC, BLOCK, N_RES)
    tl.store(loss_ptr, loss)


@triton.jit(do_not_specialize=["signals"])
def _spectral_grad_kernel(
    # the spectra (real pairs), overwritten by G; the plan; the epilogue's [R, 4] scalars
    spec_ptr,
    meta_ptr,
    params_ptr,
    signals,
    scalars_ptr,
    # compile-time: which sides want a gradient, which terms have a non-zero weight
    GRAD_X: tl.constexpr,
    GRAD_Y: tl.constexpr,
    USE_SC: tl.constexpr,
    USE_LOG: tl.constexpr,
    USE_LIN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    N_RES: tl.constexpr,
    WIDE: tl.constexpr,
):
    """One program per tile of a resolution's ``[S, F, bins of its FFT]`` elements (the
    resolutions' tiles one after the other): ``G = h dL/dM X / M`` (masked by the clamp),
    written over ``X`` (and over ``Y`` for the target's gradient). Each element is read and
    written by one program, so the update in place is safe."""
    pid = tl.program_id(0)
    r = resolution_of(meta_ptr, pid, GRAD_TILE0, N_RES)
    row_meta = meta_ptr + r * META
    n_fft = tl.load(row_meta + N_FFT)
    spec_side = tl.load(row_meta + SPEC_SIDE)
    spec_row = tl.load(row_meta + FFT_N) // 2 + 1
    stride = tl.load(row_meta + STRIDE)
    e = (pid - tl.load(row_meta + GRAD_TILE0)) * BLOCK + tl.arange(0, BLOCK)
    mask = e < signals * tl.load(row_meta + FRAMES) * spec_row
    eps = tl.load(params_ptr + 3).to(ACC)
    # Every bin of the (shared) FFT row is written: bins that are not this resolution's
    # (not a multiple of the stride) get 0, so that the irfft sees only this resolution's G.
    row = divide(e, spec_row, tl.load(row_meta + SPEC_ROW_M),
                 tl.load(row_meta + SPEC_ROW_S), WIDE)
    bin_ = e - row * spec_row
    j = divide(bin_, stride, tl.load(row_meta + STRIDE_M),
               tl.load(row_meta + STRIDE_S), WIDE)
    used = mask & (bin_ == j * stride)
    x_index = tl.load(row_meta + SPEC_OFF) + e
    xre, xim, px, _, mx = _magnitudes(spec_ptr, x_index, used, eps)
    yre, yim, py, _, my = _magnitudes(spec_ptr, x_index + spec_side, used, eps)
    a_r = tl.load(scalars_ptr + r * 4)
    b_r = tl.load(scalars_ptr + r * 4 + 1)
    c_log = tl.load(scalars_ptr + r * 4 + 2)
    c_lin = tl.load(scalars_ptr + r * 4 + 3)
    diff = mx - my
    sign_log = signum(tl.log(mx / my))
    sign_lin = signum(diff)
    half = tl.where(used, tl.where((j == 0) | (2 * j == n_fft), 1.0, 0.5), 0.0)
    if GRAD_X:
        g = tl.zeros_like(diff)
        if USE_SC:
            g += a_r * diff
        if USE_LOG:
            g += c_log * sign_log / mx
        if USE_LIN:
            g += c_lin * sign_lin
        coef = tl.where(px >= eps, g / mx, 0.0) * half
        tl.store(spec_ptr + 2 * x_index, coef * xre, mask=mask)
        tl.store(spec_ptr + 2 * x_index + 1, coef * xim, mask=mask)
    if GRAD_Y:
        g = tl.zeros_like(diff)
        if USE_SC:
            g += -a_r * diff - b_r * my
        if USE_LOG:
            g += -c_log * sign_log / my
        if USE_LIN:
            g += -c_lin * sign_lin
        coef = tl.where(py >= eps, g / my, 0.0) * half
        tl.store(spec_ptr + 2 * (x_index + spec_side), coef * yre, mask=mask)
        tl.store(spec_ptr + 2 * (x_index + spec_side) + 1, coef * yim, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _real_dtype(spec: torch.Tensor) -> torch.dtype:
    return torch.float64 if spec.dtype == torch.complex128 else torch.float32


def launch_spectral_partials(spec: torch.Tensor, meta: torch.Tensor, params: torch.Tensor,
                             signals: int, n_res: int, n_programs: int, tile: int,
                             wide: bool) -> torch.Tensor:
    """``[R, n_programs, 4]`` partial sums (inside a custom op: one launch)."""
    dtype = _real_dtype(spec)
    partials = empty((n_res, n_programs, 4), dtype, spec.device)
    wrap_triton(_spectral_partials_kernel)[(n_programs, n_res)](
        torch.view_as_real(spec), meta, params, signals, partials, n_programs,
        ACC=tl_dtype(dtype), BLOCK=tile, WIDE=wide, num_warps=2 * spectral_warps(dtype))
    return partials


@kernel_op("distill_fused::mrstft_reduce", mutates_args=())
def mrstft_reduce_op(spec: torch.Tensor, meta: torch.Tensor, params: torch.Tensor,
                     signals: int, n_res: int, n_programs: int, tile: int,
                     use_terms: List[bool], wide: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(MRSTFT, gradient scalars [R, 4])`` from the spectra: partials, then the epilogue."""
    dtype = _real_dtype(spec)
    partials = launch_spectral_partials(spec, meta, params, signals, n_res, n_programs, tile,
                                        wide)
    loss, scalars = empty((), dtype, spec.device), empty((n_res, 4), dtype, spec.device)
    wrap_triton(_mrstft_epilogue_kernel)[(1,)](
        partials, n_programs, meta, params, signals, scalars, loss,
        USE_SC=use_terms[0], USE_LOG=use_terms[1], USE_LIN=use_terms[2], ACC=tl_dtype(dtype),
        BLOCK=EPILOGUE_BLOCK, N_RES=n_res, **ONE_PROGRAM)
    return loss, scalars


@kernel_op("distill_fused::stft_spectral_grad", mutates_args=("spec",))
def stft_spectral_grad_op(spec: torch.Tensor, meta: torch.Tensor, scalars: torch.Tensor,
                          params: torch.Tensor, signals: int, n_res: int, tiles: int, tile: int,
                          grad_x: bool, grad_y: bool, use_terms: List[bool],
                          wide: bool) -> None:
    """``G`` over the spectra of the sides that want a gradient, in place."""
    wrap_triton(_spectral_grad_kernel)[(tiles,)](
        torch.view_as_real(spec), meta, params, signals, scalars,
        GRAD_X=grad_x, GRAD_Y=grad_y,
        USE_SC=use_terms[0], USE_LOG=use_terms[1], USE_LIN=use_terms[2],
        ACC=tl_dtype(_real_dtype(spec)), BLOCK=tile, N_RES=n_res, WIDE=wide,
        num_warps=spectral_warps(_real_dtype(spec), int(grad_x) + int(grad_y)))
