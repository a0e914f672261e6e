"""Multi-resolution STFT loss on the GPU: Triton kernels around ``torch.fft`` (cuFFT).

For signals ``x`` (input) and ``y`` (target), ``S`` rows of ``T`` samples, and each resolution
``r = (n, hop, window w)`` with ``F`` frames and ``n//2 + 1`` bins (auraloss's definition)::

    frame[s, f, c] = w[c] * sig[s, reflect(f*hop - n//2 + c)]          (center=True, reflect)
    X = rfft(frame_x),  Px = max(|X|^2, eps),  Mx = sqrt(Px)            (likewise Y, My)
    L_r = w_sc ||My - Mx|| / ||My|| + w_log mean|ln(Mx / My)| + w_lin mean|Mx - My|
    MRSTFT = mean_r L_r

and its gradient, with ``D = Mx - My``, ``K`` the bins of ``r``, ``R`` resolutions::

    dL/dMx = a_r D + c_log sign(ln Mx/My) / Mx + c_lin sign(D)
    dL/dMy = -a_r D - b_r My - c_log sign(ln Mx/My) / My - c_lin sign(D)
      a_r = w_sc / (R ||D|| ||My||)  (0 where ||D|| = 0, as torch.norm's backward),
      b_r = w_sc ||D|| / (R ||My||^3),
      c_log = w_log / (R K),  c_lin = w_lin / (R K)
    G = dL/dX = h_k dL/dMx X / Mx where |X|^2 >= eps, else 0 (the clamp holds)
    dL/dframe = irfft(G, norm="forward") * w,   h_k = 1/2 but for DC and Nyquist (irfft counts
                                                 the other bins twice)
    dL/dsig[t] = sum over the (up to 3) padded positions p that reflect onto t, and the frames f
                 covering p, of dL/dframe[f, p - f*hop]                     (a gather: no atomics)

The path, one launch each: ``_frame_kernel`` (all resolutions, x and y, written straight into
the rows ``rfft`` wants), one ``rfft`` per FFT group, ``_spectral_partials_kernel`` (all
resolutions at once: per tile ``sum D^2, sum My^2, sum |ln Mx/My|, sum |D|``), an epilogue that
sums the partials in a fixed order, ``_spectral_grad_kernel`` (G, written over X in place), one
``irfft`` per FFT group (written over the frames), ``_frames_adjoint_kernel``. The gradient is
computed in the forward pass: the spectra are freed at its end and only a ``[S, T]`` gradient is
kept for backward, which scales it by the incoming gradient.

An FFT group is one resolution (``per_resolution``, the default) or, with
``DISTILL_FFT_GROUPING=shared``, every resolution whose n divides the group's FFT size m: its
frames are zero-padded to m and its bin j read at bin ``(m/n) j`` (see ``fft_groups``).
Per-resolution geometry lives in a small int64 device table (``meta``), built once per shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ..gradients import first_order_only, scale_clamped_grad
from ..tracing import tracing
from ._common import ONE_PROGRAM, empty, kernel_op, reciprocal, signum, tl_dtype, wrap_triton

BLOCK = 1024
# Columns of the meta table: per resolution, its FFT size, hop, frame count, bins; where its
# rows start in the frame and spectrum buffers and how far the target's rows lie from the
# input's (``*_SIDE``); its window; the FFT size its group runs (``FFT_N``) and the bin stride
# that maps its bin j to bin ``STRIDE * j`` of that FFT.
# They are ``tl.constexpr``: jit code may read a module global only if it is one (compiled
# Triton raises NameError for a plain int; the interpreter does not check, the ahead-of-time
# compile test does).
(N_FFT, HOP, FRAMES, BINS, FRAME_OFF, FRAME_SIDE, SPEC_OFF, SPEC_SIDE, WIN_OFF, FFT_N,
 STRIDE, META) = (tl.constexpr(column) for column in range(12))
# Launch options of the two heaviest grid kernels (``_spectral_grad_kernel``,
# ``_frames_adjoint_kernel``): left to ptxas, at 4 warps (8 elements per thread) they take up
# to 255 registers (and spill, or keep 2 programs per SM), and at 8 warps still up to 214 (B = 1
# on sm_80, fp64 with both gradients). At 16 warps (2 elements per thread) capped at 128
# registers, one program (16 warps) stays resident per SM, without spills (the compile test
# checks both).
GATHER = {"num_warps": 16, "maxnreg": 128}
GROUPING_ENV = "DISTILL_FFT_GROUPING"
GROUPINGS = ("per_resolution", "shared")


@dataclass(frozen=True, eq=False)
class STFTPlan:
    """Geometry of ``S`` signals of ``T`` samples under some settings, on one device/dtype."""

    signals: int
    length: int
    resolutions: Tuple[Tuple[int, ...], ...]  # meta rows
    groups: Tuple[Tuple[int, int, int, int], ...]  # (fft_n, frame_start, spec_start, rows/side)
    frames_numel: int      # real elements of the frame buffer (all resolutions, x and y)
    spec_numel: int        # complex elements of the spectrum buffer
    max_frame_tiles: int
    max_spec_tiles: int    # tiles over a resolution's (row, bin) elements
    max_grad_tiles: int    # tiles over a resolution's rows of its group's bins
    max_cover: int         # most frames covering one padded sample, over resolutions
    meta: torch.Tensor     # int64 [R, META] on the device
    windows: torch.Tensor  # the windows, zero-padded to n_fft and concatenated
    params: torch.Tensor   # (w_sc, w_log, w_lin, eps) in the compute dtype, on the device
    use_terms: Tuple[bool, bool, bool]  # which weights are non-zero (terms auraloss computes)

    @property
    def n_res(self) -> int:
        return len(self.resolutions)


def fft_groups(fft_sizes, grouping: str) -> List[List[int]]:
    """Resolutions that share one ``rfft`` call. ``per_resolution``: one call each.
    ``shared``: a frame zero-padded from n to m = k*n samples has, in its length-m DFT, bin
    ``k*j`` equal to bin j of its length-n DFT; so one FFT of the largest size serves every
    resolution whose n divides it (fewer launches, more FLOPs and bytes)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"{GROUPING_ENV} must be one of {GROUPINGS}, got {grouping!r}")
    if grouping == "per_resolution":
        return [[i] for i in range(len(fft_sizes))]
    groups: List[List[int]] = []
    for i in sorted(range(len(fft_sizes)), key=lambda i: -fft_sizes[i]):
        for group in groups:
            if fft_sizes[group[0]] % fft_sizes[i] == 0:
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def fft_grouping() -> str:
    """``DISTILL_FFT_GROUPING``: ``per_resolution`` (the default: less memory) or ``shared``."""
    return os.environ.get(GROUPING_ENV, "per_resolution")


def stft_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the STFT runs in (frames, spectra, their gradients) for a loss computed in
    ``dtype``: ``dtype`` itself, but float64 under the shared grouping.

    A larger, zero-padded FFT rounds differently from the resolution's own FFT (which
    ``torch.stft``, and so the oracle, runs), and the log-magnitude gradient divides by small
    magnitudes, which amplifies rounding some 1e4-1e5 times. In float32 a shared FFT's gradient
    error is therefore an independent draw of the float32 oracle's own, at times 3-4 times it
    (beyond the contract's bound on about 1 input in 150); in float64 it stays below 1e-11.
    """
    return torch.float64 if fft_grouping() == "shared" else dtype


def make_plan(settings, signals: int, length: int, device, dtype) -> STFTPlan:
    """The plan for these shapes in ``dtype`` (see ``stft_dtype``), built once and cached on
    ``settings``. The FFT grouping comes from ``DISTILL_FFT_GROUPING``."""
    grouping = fft_grouping()
    key = ("triton-plan", signals, length, torch.device(device), dtype, grouping)
    plan = settings.cache.get(key)
    if plan is not None:
        return plan
    sizes = [r.n_fft for r in settings.resolutions]
    frames = [1 + (length + 2 * (r.n_fft // 2) - r.n_fft) // r.hop for r in settings.resolutions]
    rows: List[Tuple[int, ...]] = [()] * len(sizes)
    groups = []
    frame_start = spec_start = 0
    max_frame_tiles = max_spec_tiles = max_grad_tiles = 0
    for members in fft_groups(sizes, grouping):
        fft_n = sizes[members[0]]
        spec_row = fft_n // 2 + 1
        side_rows = sum(signals * frames[i] for i in members)
        groups.append((fft_n, frame_start, spec_start, side_rows))
        row = 0
        for i in members:
            res, n = settings.resolutions[i], sizes[i]
            rows[i] = (n, res.hop, frames[i], n // 2 + 1,
                       frame_start + row * fft_n, side_rows * fft_n,
                       spec_start + row * spec_row, side_rows * spec_row,
                       sum(sizes[:i]), fft_n, fft_n // n)
            row += signals * frames[i]
            max_frame_tiles = max(max_frame_tiles,
                                  triton.cdiv(2 * signals * frames[i] * fft_n, BLOCK))
            max_spec_tiles = max(max_spec_tiles,
                                 triton.cdiv(signals * frames[i] * (n // 2 + 1), BLOCK))
            max_grad_tiles = max(max_grad_tiles, triton.cdiv(signals * frames[i] * spec_row,
                                                             BLOCK))
        frame_start += 2 * side_rows * fft_n
        spec_start += 2 * side_rows * spec_row
    windows = [settings.padded_window(i, "cpu", dtype) for i in range(len(sizes))]
    plan = STFTPlan(
        signals=signals, length=length, resolutions=tuple(rows), groups=tuple(groups),
        frames_numel=frame_start, spec_numel=spec_start, max_frame_tiles=max_frame_tiles,
        max_spec_tiles=max_spec_tiles, max_grad_tiles=max_grad_tiles,
        max_cover=max(-(-r.n_fft // r.hop) for r in settings.resolutions),
        meta=torch.tensor(rows, dtype=torch.int64).to(device),
        windows=torch.cat(windows).to(device),
        params=torch.tensor([settings.w_sc, settings.w_log_mag, settings.w_lin_mag, settings.eps],
                            dtype=dtype).to(device),
        use_terms=(settings.w_sc != 0, settings.w_log_mag != 0, settings.w_lin_mag != 0),
    )
    # A traced step keeps its own (graph constants; fake tensors under fake-tensor tracing).
    if not tracing():
        settings.cache[key] = plan
    return plan


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _frame_geometry(meta_ptr, r):
    """Resolution r's frame layout: ``n_fft, hop, frames, frame_off, frame_side, win_off,
    fft_n`` (meta rows are in range by construction: ``r < R``)."""
    row = meta_ptr + r * META
    return (tl.load(row + N_FFT), tl.load(row + HOP), tl.load(row + FRAMES),
            tl.load(row + FRAME_OFF), tl.load(row + FRAME_SIDE), tl.load(row + WIN_OFF),
            tl.load(row + FFT_N))


@triton.jit
def _frame_kernel(
    x_ptr, y_ptr, frames_ptr, meta_ptr, win_ptr, signals, length, channels, width,
    x_s0, x_s1, x_s2, x_s3, y_s0, y_s1, y_s2, y_s3,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """``frames[r][side, s, f, c] = w_r[c] * sig_side[s, reflect(f*hop - n//2 + c)]``.

    Grid ``(tiles, R)``. Sample ``t`` of row ``s`` is read at
    ``(s // channels)*s0 + (s % channels)*s1 + (t // width)*s2 + (t % width)*s3``: any strides,
    no copy of the inputs.
    """
    r = tl.program_id(1)
    n_fft, hop, n_frames, frame_off, frame_side, win_off, fft_n = _frame_geometry(meta_ptr, r)
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < 2 * signals * n_frames * fft_n
    row = e // fft_n
    c = e - row * fft_n
    side = row // (signals * n_frames)
    rest = row - side * signals * n_frames
    s = rest // n_frames
    f = rest - s * n_frames
    in_frame = c < n_fft  # columns past n_fft: the zero padding of a shared, larger FFT
    u = f * hop - n_fft // 2 + c
    u = tl.where(u < 0, -u, u)
    u = tl.where(u >= length, 2 * (length - 1) - u, u)
    sb = s // channels
    sc = s - sb * channels
    th = u // width
    tw = u - th * width
    is_x = side == 0
    live = mask & in_frame
    xv = tl.load(x_ptr + sb * x_s0 + sc * x_s1 + th * x_s2 + tw * x_s3, mask=live & is_x,
                 other=0.0)
    yv = tl.load(y_ptr + sb * y_s0 + sc * y_s1 + th * y_s2 + tw * y_s3, mask=live & (side == 1),
                 other=0.0)
    w = tl.load(win_ptr + win_off + c, mask=live, other=0.0)
    value = tl.where(is_x, xv.to(ACC), yv.to(ACC)) * w
    tl.store(frames_ptr + frame_off + side * frame_side + rest * fft_n + c, value, mask=mask)


@triton.jit
def _spectrum_geometry(meta_ptr, r):
    """Resolution r's spectrum layout: ``n_fft, frames, spec_off, spec_side``, the bins of its
    FFT group's rows and its bin stride there."""
    row = meta_ptr + r * META
    return (tl.load(row + N_FFT), tl.load(row + FRAMES), tl.load(row + SPEC_OFF),
            tl.load(row + SPEC_SIDE), tl.load(row + FFT_N) // 2 + 1, tl.load(row + STRIDE))


@triton.jit
def _magnitudes(spec_ptr, index, mask, eps):
    """Re, Im, clamped power and magnitude of complex element ``index`` (real-pair layout)."""
    re = tl.load(spec_ptr + 2 * index, mask=mask, other=0.0)
    im = tl.load(spec_ptr + 2 * index + 1, mask=mask, other=0.0)
    power = re * re + im * im
    clamped = tl.where(power < eps, eps, power)
    return re, im, power, clamped, tl.sqrt(clamped)


@triton.jit
def _spectral_partials_kernel(
    spec_ptr, partials_ptr, meta_ptr, params_ptr, signals, max_tiles,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(tiles, R)``: ``partials[r, tile] = (sum D^2, sum My^2, sum |ln Mx/My|, sum |D|)``
    over the tile's (row, frame, bin) elements. Idle tiles of short resolutions write zeros."""
    r = tl.program_id(1)
    tile = tl.program_id(0)
    n_fft, n_frames, spec_off, spec_side, spec_row, stride = _spectrum_geometry(meta_ptr, r)
    bins = n_fft // 2 + 1
    count = signals * n_frames * bins
    e = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < count
    eps = tl.load(params_ptr + 3).to(ACC)
    row = e // bins
    x_index = spec_off + row * spec_row + (e - row * bins) * stride
    _, _, _, py, my = _magnitudes(spec_ptr, x_index + spec_side, mask, eps)
    _, _, _, _, mx = _magnitudes(spec_ptr, x_index, mask, eps)
    diff = mx - my
    log_ratio = tl.log(mx / my)
    out = partials_ptr + (r * max_tiles + tile) * 4
    # One slot per program: in range by construction (grid == (max_tiles, R)).
    tl.store(out, tl.sum(tl.where(mask, diff * diff, 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(mask, py, 0.0), axis=0))
    tl.store(out + 2, tl.sum(tl.where(mask, tl.abs(log_ratio), 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(mask, tl.abs(diff), 0.0), axis=0))


@triton.jit
def mrstft_from_partials(
    partials_ptr, meta_ptr, scalars_ptr, max_tiles, signals, params_ptr,
    USE_SC: tl.constexpr, USE_LOG: tl.constexpr, USE_LIN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, N_RES: tl.constexpr,
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
        while start < max_tiles:
            idx = start + tl.arange(0, BLOCK)
            q = tl.arange(0, 4)
            ptrs = partials_ptr + (r * max_tiles + idx[None, :]) * 4 + q[:, None]
            acc += tl.load(ptrs, mask=(idx < max_tiles)[None, :], other=0.0).to(ACC)
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


@triton.jit
def _mrstft_epilogue_kernel(
    partials_ptr, meta_ptr, scalars_ptr, loss_ptr, max_tiles, signals, params_ptr,
    USE_SC: tl.constexpr, USE_LOG: tl.constexpr, USE_LIN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, N_RES: tl.constexpr,
):
    """One program: the MRSTFT value (the module's loss) and the gradient scalars."""
    loss = mrstft_from_partials(partials_ptr, meta_ptr, scalars_ptr, max_tiles, signals,
                                params_ptr, USE_SC, USE_LOG, USE_LIN, ACC, BLOCK, N_RES)
    tl.store(loss_ptr, loss)


@triton.jit
def _spectral_grad_kernel(
    spec_ptr, meta_ptr, scalars_ptr, params_ptr, signals,
    GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr,
    USE_SC: tl.constexpr, USE_LOG: tl.constexpr, USE_LIN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(tiles, R)``: ``G = h dL/dM X / M`` (masked by the clamp), written over ``X``
    (and over ``Y`` for the target's gradient). Each element is read and written by one
    program, so the update in place is safe."""
    r = tl.program_id(1)
    n_fft, n_frames, spec_off, spec_side, spec_row, stride = _spectrum_geometry(meta_ptr, r)
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < signals * n_frames * spec_row
    eps = tl.load(params_ptr + 3).to(ACC)
    # Every bin of the (shared) FFT row is written: bins that are not this resolution's
    # (not a multiple of the stride) get 0, so that the irfft sees only this resolution's G.
    row = e // spec_row
    bin_ = e - row * spec_row
    used = mask & (bin_ % stride == 0)
    j = bin_ // stride
    x_index = spec_off + row * spec_row + bin_
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


@triton.jit
def _frames_adjoint_kernel(
    frames_ptr, meta_ptr, win_ptr, out_ptr, n_res, signals, length, rows, first_side,
    max_cover, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """``out[row, t] = sum_r sum_{p -> t} sum_{f covers p} w_r[c] * dframe_r[f, c]``,
    ``c = p - f*hop``, over the padded positions ``p`` that reflect onto ``t``: ``t + pad``,
    ``pad - t`` (for ``1 <= t <= pad``) and ``pad + 2(T-1) - t`` (for ``T-1-pad <= t <= T-2``).
    A gather in a fixed order: every output written once, bit-identical run to run."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < rows * length
    row = e // length
    t = e - row * length
    side = first_side + row // signals
    s = row - (side - first_side) * signals
    acc = tl.zeros([BLOCK], dtype=ACC)
    r = 0
    while r < n_res:  # a while loop, not range(): see _common.py
        n_fft, hop, n_frames, frame_off, frame_side, win_off, fft_n = _frame_geometry(meta_ptr,
                                                                                      r)
        pad = n_fft // 2
        base = frame_off + side * frame_side + s * n_frames * fft_n
        for k in tl.static_range(3):
            if k == 0:
                p = t + pad
                valid = mask
            elif k == 1:
                p = pad - t
                valid = mask & (t >= 1) & (t <= pad)
            else:
                p = pad + 2 * (length - 1) - t
                valid = mask & (t >= length - 1 - pad) & (t <= length - 2)
            last = p // hop
            j = 0
            while j < max_cover:
                f = last - j
                c = p - f * hop
                ok = valid & (f >= 0) & (f < n_frames) & (c < n_fft)
                g = tl.load(frames_ptr + base + f * fft_n + c, mask=ok, other=0.0)
                w = tl.load(win_ptr + win_off + c, mask=ok, other=0.0)
                acc += g.to(ACC) * w
                j += 1
        r += 1
    tl.store(out_ptr + e, acc, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers (custom ops) and the FFT steps between them
# --------------------------------------------------------------------------------------------

@kernel_op("distill_fused::stft_frames", mutates_args=())
def stft_frames_op(x: torch.Tensor, y: torch.Tensor, x_strides: List[int],
                   y_strides: List[int], channels: int, width: int, signals: int, length: int,
                   meta: torch.Tensor, windows: torch.Tensor, frames_numel: int,
                   spec_numel: int, max_tiles: int, n_res: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The windowed frames of every resolution, x rows then y rows, in one flat buffer; and,
    not yet written, the flat complex buffer of their spectra (``spectra_of`` fills it, the
    gradient kernel writes over it): allocated here, as every buffer a kernel writes is, by a
    launcher."""
    frames = empty((frames_numel,), windows.dtype, windows.device)
    complex_dtype = torch.complex128 if windows.dtype == torch.float64 else torch.complex64
    spec = empty((spec_numel,), complex_dtype, windows.device)
    wrap_triton(_frame_kernel)[(max_tiles, n_res)](
        x, y, frames, meta, windows, signals, length, channels, width, *x_strides, *y_strides,
        ACC=tl_dtype(windows.dtype), BLOCK=BLOCK)
    return frames, spec


def frame_signals(x: torch.Tensor, y: torch.Tensor, x_layout, y_layout, plan: STFTPlan
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(frames, spectrum buffer)`` (see ``stft_frames_op``). ``x_layout``/``y_layout``:
    ``(channels, width, (s0, s1, s2, s3))`` (see the kernel)."""
    channels, width, xs = x_layout
    _, _, ys = y_layout
    return stft_frames_op(x, y, list(xs), list(ys), channels, width, plan.signals, plan.length,
                          plan.meta, plan.windows, plan.frames_numel, plan.spec_numel,
                          plan.max_frame_tiles, plan.n_res)


def spectra_of(frames: torch.Tensor, spec: torch.Tensor, plan: STFTPlan) -> torch.Tensor:
    """One ``rfft`` per FFT group, each written into its slot of ``spec``, which it returns."""
    for fft_n, frame_start, spec_start, side_rows in plan.groups:
        rows = 2 * side_rows
        src = frames[frame_start:frame_start + rows * fft_n].view(rows, fft_n)
        dst = spec[spec_start:spec_start + rows * (fft_n // 2 + 1)].view(rows, fft_n // 2 + 1)
        torch.fft.rfft(src, dim=-1, out=dst)
    return spec


def inverse_into_frames(spec: torch.Tensor, frames: torch.Tensor, plan: STFTPlan,
                        sides: slice) -> None:
    """``irfft(G, norm="forward")`` per FFT group for the rows of ``sides`` (0: x, 1: y),
    written over the frames (no longer needed once the spectra exist)."""
    for fft_n, frame_start, spec_start, side_rows in plan.groups:
        spec_row = fft_n // 2 + 1
        first, rows = sides.start * side_rows, (sides.stop - sides.start) * side_rows
        src = spec[spec_start + first * spec_row:][:rows * spec_row].view(rows, spec_row)
        dst = frames[frame_start + first * fft_n:][:rows * fft_n].view(rows, fft_n)
        torch.fft.irfft(src, n=fft_n, dim=-1, norm="forward", out=dst)


def _real_dtype(spec: torch.Tensor) -> torch.dtype:
    return torch.float64 if spec.dtype == torch.complex128 else torch.float32


def launch_spectral_partials(spec: torch.Tensor, meta: torch.Tensor, params: torch.Tensor,
                             signals: int, n_res: int, max_tiles: int) -> torch.Tensor:
    """``[R, max_tiles, 4]`` partial sums (inside a custom op: one launch)."""
    dtype = _real_dtype(spec)
    partials = empty((n_res, max_tiles, 4), dtype, spec.device)
    wrap_triton(_spectral_partials_kernel)[(max_tiles, n_res)](
        torch.view_as_real(spec), partials, meta, params, signals, max_tiles,
        ACC=tl_dtype(dtype), BLOCK=BLOCK)
    return partials


@kernel_op("distill_fused::mrstft_reduce", mutates_args=())
def mrstft_reduce_op(spec: torch.Tensor, meta: torch.Tensor, params: torch.Tensor,
                     signals: int, n_res: int, max_tiles: int, use_terms: List[bool]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(MRSTFT, gradient scalars [R, 4])`` from the spectra: partials, then the epilogue."""
    dtype = _real_dtype(spec)
    partials = launch_spectral_partials(spec, meta, params, signals, n_res, max_tiles)
    loss, scalars = empty((), dtype, spec.device), empty((n_res, 4), dtype, spec.device)
    wrap_triton(_mrstft_epilogue_kernel)[(1,)](
        partials, meta, scalars, loss, max_tiles, signals, params,
        USE_SC=use_terms[0], USE_LOG=use_terms[1], USE_LIN=use_terms[2], ACC=tl_dtype(dtype),
        BLOCK=BLOCK, N_RES=n_res, **ONE_PROGRAM)
    return loss, scalars


@kernel_op("distill_fused::stft_spectral_grad", mutates_args=("spec",))
def stft_spectral_grad_op(spec: torch.Tensor, meta: torch.Tensor, scalars: torch.Tensor,
                          params: torch.Tensor, signals: int, n_res: int, max_tiles: int,
                          grad_x: bool, grad_y: bool, use_terms: List[bool]) -> None:
    wrap_triton(_spectral_grad_kernel)[(max_tiles, n_res)](
        torch.view_as_real(spec), meta, scalars, params, signals, GRAD_X=grad_x, GRAD_Y=grad_y,
        USE_SC=use_terms[0], USE_LOG=use_terms[1], USE_LIN=use_terms[2],
        ACC=tl_dtype(_real_dtype(spec)), BLOCK=BLOCK, **GATHER)


@kernel_op("distill_fused::stft_frames_adjoint", mutates_args=())
def stft_frames_adjoint_op(frames: torch.Tensor, meta: torch.Tensor, windows: torch.Tensor,
                           n_res: int, signals: int, length: int, first_side: int, sides: int,
                           max_cover: int) -> torch.Tensor:
    rows = sides * signals
    out = empty((rows, length), frames.dtype, frames.device)
    wrap_triton(_frames_adjoint_kernel)[(triton.cdiv(rows * length, BLOCK),)](
        frames, meta, windows, out, n_res, signals, length, rows, first_side, max_cover,
        ACC=tl_dtype(frames.dtype), BLOCK=BLOCK, **GATHER)
    return out


def signal_gradient(spec, frames, scalars, plan: STFTPlan, grad_x: bool,
                    grad_y: bool) -> torch.Tensor:
    """``dMRSTFT/dsignal`` for the x rows, the y rows or both (``[rows, T]``), from the spectra
    and the epilogue's scalars. Overwrites ``spec`` and ``frames``."""
    stft_spectral_grad_op(spec, plan.meta, scalars, plan.params, plan.signals, plan.n_res,
                          plan.max_grad_tiles, grad_x, grad_y, list(plan.use_terms))
    sides = slice(0 if grad_x else 1, 2 if grad_y else 1)
    inverse_into_frames(spec, frames, plan, sides)
    return stft_frames_adjoint_op(frames, plan.meta, plan.windows, plan.n_res, plan.signals,
                                  plan.length, sides.start, sides.stop - sides.start,
                                  plan.max_cover)


# --------------------------------------------------------------------------------------------
# The standalone MRSTFT loss (what ``create_stft_loss`` returns runs this on the triton backend)
# --------------------------------------------------------------------------------------------

def _signal_rows_layout(t: torch.Tensor):
    """``[B, C, T]`` -> the framing kernel's ``(channels, width, strides)``."""
    return t.shape[1], t.shape[2], (t.stride(0), t.stride(1), 0, t.stride(2))


class _MRSTFTLoss(torch.autograd.Function):
    """MRSTFT of ``[B, C, T]`` signals, its gradient computed in the forward pass. With
    ``clamped``: ``max(MRSTFT, 0)``, the gradient passed as through ``torch.clamp`` (0 where
    MRSTFT < 0 or is NaN, multiplied in wherever a gradient reaches the term)."""

    @staticmethod
    def forward(x, y, settings, grad_x, grad_y, clamped):
        dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
        signals, length = x.shape[0] * x.shape[1], x.shape[2]
        plan = make_plan(settings, signals, length, x.device, stft_dtype(dtype))
        frames, spec = frame_signals(x, y, _signal_rows_layout(x), _signal_rows_layout(y),
                                     plan)
        spec = spectra_of(frames, spec, plan)
        loss, scalars = mrstft_reduce_op(spec, plan.meta, plan.params, signals, plan.n_res,
                                         plan.max_spec_tiles, list(plan.use_terms))
        grad = (signal_gradient(spec, frames, scalars, plan, grad_x, grad_y)
                if grad_x or grad_y else None)
        loss = loss.to(dtype)
        # The unclamped value is what the clamp's gradient needs (and only it).
        return (loss.clamp_min(0.0), loss, grad) if clamped else (loss, None, grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y = inputs[:2]
        _, loss, grad = output
        ctx.mark_non_differentiable(*(t for t in (loss, grad) if t is not None))
        ctx.save_for_backward(loss, grad, x, y)
        ctx.shapes = (x.shape, x.dtype, y.dtype)

    @staticmethod
    def backward(ctx, grad_output, _grad_loss, _grad_grad):
        loss, grad, x, y = ctx.saved_tensors
        shape, x_dtype, y_dtype = ctx.shapes
        grad = scale_clamped_grad(grad, grad_output, loss)
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            gx, gy = grad.chunk(2)
        else:
            gx, gy = (grad, None) if ctx.needs_input_grad[0] else (None, grad)
        grads = (None if gx is None else gx.view(shape).to(x_dtype),
                 None if gy is None else gy.view(shape).to(y_dtype))
        return (*first_order_only("triton", grads, (x, y)), None, None, None, None)


def mrstft_loss(x: torch.Tensor, y: torch.Tensor, settings, clamped: bool = False
                ) -> torch.Tensor:
    """MRSTFT of ``[B, C, T]`` tensors of any strides and float dtypes (see the docstring), or
    ``max(MRSTFT, 0)`` with ``clamped``; no gradient is computed under ``torch.no_grad()``."""
    grad_x, grad_y = (torch.is_grad_enabled() and t.requires_grad for t in (x, y))
    loss, _, _ = _MRSTFTLoss.apply(x, y, settings, grad_x, grad_y, clamped)
    return loss
