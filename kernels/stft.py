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
resolutions at once: per program ``sum D^2, sum My^2, sum |ln Mx/My|, sum |D|`` over every
P-th tile of its resolution), an epilogue that sums the partials in a fixed order,
``_spectral_grad_kernel`` (G, written over X in place), one ``irfft`` per FFT group (written
over the frames), ``_frames_adjoint_kernel``. The gradient is computed in the forward pass: the
spectra are freed at its end and only a ``[S, T]`` gradient is kept for backward, which scales
it by the incoming gradient.

An FFT group is one resolution (``per_resolution``, the default) or, with
``DISTILL_FFT_GROUPING=shared``, every resolution whose n divides the group's FFT size m: its
frames are zero-padded to m and its bin j read at bin ``(m/n) j`` (see ``fft_groups``).
Per-resolution geometry lives in a small device table (``meta``), built once per shape. Index
math is 32-bit, its divisions a multiply and a shift by host-computed magic numbers
(``_common.divide``), unless a buffer passes ``_common.INDEX_LIMIT`` elements (``WIDE``: 64-bit
indices and divisions). Grids list every resolution's tiles one after the other (no program
idles where resolutions differ in size, as under the shared grouping).
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
from . import _common
from ._common import (ONE_PROGRAM, divide, empty, is_wide, kernel_op, magic, past_index_limit,
                      reciprocal, signum, tl_dtype, wrap_triton)

BLOCK = 1024
# Columns of the meta table, per resolution: its FFT size, hop, frame count, bins; where its
# rows start in the frame and spectrum buffers and how far the target's rows lie from the
# input's (``*_SIDE``); its window; the FFT size its group runs (``FFT_N``) and the bin stride
# that maps its bin j to bin ``STRIDE * j`` of that FFT; the first program of its tiles in the
# framing and gradient grids (``*_TILE0``: the grids list every resolution's tiles one after the
# other, so no program idles); and the ``magic`` pairs ``(m, s)`` of the divisors the kernels
# divide by (``*_M``, ``*_S``).
# They are ``tl.constexpr``: jit code may read a module global only if it is one (compiled
# Triton raises NameError for a plain int; the interpreter does not check, the ahead-of-time
# compile test does).
(N_FFT, HOP, FRAMES, BINS, FRAME_OFF, FRAME_SIDE, SPEC_OFF, SPEC_SIDE, WIN_OFF, FFT_N, STRIDE,
 FRAME_TILE0, GRAD_TILE0, HOP_M, HOP_S, FRAMES_M, FRAMES_S, BINS_M, BINS_S, FFT_N_M, FFT_N_S,
 SPEC_ROW_M, SPEC_ROW_S, STRIDE_M, STRIDE_S, META) = (tl.constexpr(column) for column in range(26))
# The spectral sums run in a fixed number of programs per resolution, each summing every
# PARTIAL_PROGRAMS-th tile: enough programs to fill an H100's 132 SMs four times over, and a
# bounded number of partials for the one-program epilogue to read (R x 4 x 176 values).
PARTIAL_PROGRAMS = 528
# Their tiles, at twice the warps of the gradient kernel (the same elements a thread).
PARTIAL_TILE = 2048
# The framing kernel's tiles: FRAME_TILE elements, FRAME_COLS columns (fewer where every FFT is
# shorter) of FRAME_TILE // FRAME_COLS frames, at 8 warps (8 elements a thread).
FRAME_TILE, FRAME_COLS = 2048, 256
# The adjoint's tiles: samples of one signal row per program.
ADJOINT_BLOCK = 1024


def adjoint_warps(dtype: torch.dtype, wide: bool) -> int:
    """Warps of the adjoint: 8 (4 samples a thread), 16 in float64 or with 64-bit indices,
    which with 4 samples a thread take up to 160 registers (19% occupancy) and spill on sm_80."""
    return 16 if dtype == torch.float64 or wide else 8


def spectral_warps(dtype: torch.dtype, sides: int = 1) -> int:
    """Warps of the spectral gradient kernel (the sums take twice as many, for tiles twice as
    large): 4 (8 elements a thread), twice as many in float64 and twice again for the
    gradients of both sides (x and y), so that each stays within 128 registers (25%
    occupancy): with 8 elements a thread, float64 takes up to 255 and both sides up to 149."""
    return 4 * (2 if dtype == torch.float64 else 1) * sides


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
    frame_tiles: int       # programs of the framing grid (every resolution's tiles)
    frame_tile: Tuple[int, int]  # (frames, columns) of a framing tile
    grad_tiles: int        # programs of the spectral gradient grid
    max_spec_tiles: int    # tiles of the spectral sums, over resolutions
    max_cover: int         # most frames covering one padded sample, over resolutions
    wide: bool             # 64-bit index math (a buffer past ``INDEX_LIMIT`` elements)
    meta: torch.Tensor     # [R, META] on the device: int32, int64 when ``wide``
    windows: torch.Tensor  # the windows, zero-padded to n_fft and concatenated
    params: torch.Tensor   # (w_sc, w_log, w_lin, eps) in the compute dtype, on the device
    use_terms: Tuple[bool, bool, bool]  # which weights are non-zero (terms auraloss computes)

    @property
    def n_res(self) -> int:
        return len(self.resolutions)

    @property
    def spec_programs(self) -> int:
        """Programs per resolution of the spectral sums (``PARTIAL_PROGRAMS`` in all)."""
        return min(self.max_spec_tiles, triton.cdiv(PARTIAL_PROGRAMS, self.n_res))


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
    key = ("triton-plan", signals, length, torch.device(device), dtype, grouping,
           _common.INDEX_LIMIT)
    plan = settings.cache.get(key)
    if plan is not None:
        return plan
    sizes = [r.n_fft for r in settings.resolutions]
    frames = [1 + (length + 2 * (r.n_fft // 2) - r.n_fft) // r.hop for r in settings.resolutions]
    layout: List[Tuple[int, ...]] = [()] * len(sizes)  # per resolution: where its rows lie
    groups = []
    frame_start = spec_start = 0
    for members in fft_groups(sizes, grouping):
        fft_n = sizes[members[0]]
        spec_row = fft_n // 2 + 1
        side_rows = sum(signals * frames[i] for i in members)
        groups.append((fft_n, frame_start, spec_start, side_rows))
        row = 0
        for i in members:
            layout[i] = (frame_start + row * fft_n, side_rows * fft_n,
                         spec_start + row * spec_row, side_rows * spec_row, fft_n)
            row += signals * frames[i]
        frame_start += 2 * side_rows * fft_n
        spec_start += 2 * side_rows * spec_row
    # The grids list every resolution's tiles in resolution order (``_resolution_of``).
    frame_cols = min(FRAME_COLS, triton.next_power_of_2(max(sizes)), FRAME_TILE)
    frame_rows = FRAME_TILE // frame_cols
    rows: List[Tuple[int, ...]] = []
    frame_tiles = grad_tiles = max_spec_tiles = 0
    for i, (n, res) in enumerate(zip(sizes, settings.resolutions)):
        frame_off, frame_side, spec_off, spec_side, fft_n = layout[i]
        bins, spec_row = n // 2 + 1, fft_n // 2 + 1
        rows.append((n, res.hop, frames[i], bins, frame_off, frame_side, spec_off, spec_side,
                     sum(sizes[:i]), fft_n, fft_n // n, frame_tiles, grad_tiles,
                     *magic(res.hop), *magic(frames[i]), *magic(bins), *magic(fft_n),
                     *magic(spec_row), *magic(fft_n // n)))
        frame_tiles += 2 * (triton.cdiv(signals * frames[i], frame_rows)
                            * triton.cdiv(fft_n, frame_cols))
        grad_tiles += triton.cdiv(signals * frames[i] * spec_row, BLOCK)
        max_spec_tiles = max(max_spec_tiles, triton.cdiv(signals * frames[i] * bins,
                                                         PARTIAL_TILE))
    windows = [settings.padded_window(i, "cpu", dtype) for i in range(len(sizes))]
    # Real elements: the spectra are read as (re, im) pairs.
    wide = past_index_limit(max(frame_start, 2 * spec_start) + BLOCK)
    plan = STFTPlan(
        signals=signals, length=length, resolutions=tuple(rows), groups=tuple(groups),
        frames_numel=frame_start, spec_numel=spec_start, frame_tiles=frame_tiles,
        frame_tile=(frame_rows, frame_cols),
        grad_tiles=grad_tiles,
        max_spec_tiles=max_spec_tiles,
        max_cover=max(-(-r.n_fft // r.hop) for r in settings.resolutions),
        wide=wide,
        meta=torch.tensor(rows, dtype=torch.int64 if wide else torch.int32).to(device),
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
def _resolution_of(meta_ptr, pid, TILE0: tl.constexpr, N_RES: tl.constexpr):
    """The resolution that program ``pid`` of a grid listing every resolution's tiles one
    after the other works on (``TILE0``: the column of their first programs)."""
    r = pid * 0
    for k in tl.static_range(1, N_RES):
        r += (pid >= tl.load(meta_ptr + k * META + TILE0)).to(tl.int32)
    return r


@triton.jit
def _signal_offsets(s, u, channels, channels_m, channels_s, width, width_m, width_s,
                    s0, s1, s2, s3, WIDE: tl.constexpr):
    """Offsets of samples ``u`` (``[ROWS, COLS]``) of signal rows ``s`` (``[ROWS, 1]``) in a
    tensor read as ``(s // channels)*s0 + (s % channels)*s1 + (u // width)*s2 + (u % width)*s3``."""
    sb = divide(s, channels, channels_m, channels_s, WIDE)
    th = divide(u, width, width_m, width_s, WIDE)
    return sb * s0 + (s - sb * channels) * s1 + th * s2 + (u - th * width) * s3


@triton.jit
def _frame_kernel(
    x_ptr, y_ptr, frames_ptr, meta_ptr, win_ptr, signals, length, channels, width,
    x_s0, x_s1, x_s2, x_s3, y_s0, y_s1, y_s2, y_s3, channels_m, channels_s, width_m, width_s,
    ACC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, N_RES: tl.constexpr,
    WIDE: tl.constexpr,
):
    """``frames[r][side, s, f, c] = w_r[c] * sig_side[s, reflect(f*hop - n//2 + c)]``.

    One program per ``[ROWS frames, COLS columns]`` tile of one side (x or y) of one
    resolution, the tiles of every resolution one after the other: the frame's geometry is
    computed once per row, the window once per column. Sample ``t`` of signal row ``s`` is
    read at ``(s // channels)*s0 + (s % channels)*s1 + (t // width)*s2 + (t % width)*s3``: any
    strides, no copy of the inputs. Divisions by multiply-shift (``divide``).
    """
    pid = tl.program_id(0)
    r = _resolution_of(meta_ptr, pid, FRAME_TILE0, N_RES)
    row_meta = meta_ptr + r * META  # in range by construction (r < R), as every meta row read
    n_fft = tl.load(row_meta + N_FFT)
    n_frames = tl.load(row_meta + FRAMES)
    fft_n = tl.load(row_meta + FFT_N)
    side_rows = signals * n_frames
    col_tiles = (fft_n + COLS - 1) // COLS
    side_tiles = (side_rows + ROWS - 1) // ROWS * col_tiles
    tile = pid - tl.load(row_meta + FRAME_TILE0)
    side = (tile >= side_tiles).to(tile.dtype)  # 0: x, 1: y
    tile -= side * side_tiles
    row_tile = tile // col_tiles  # once per program
    rows = row_tile * ROWS + tl.arange(0, ROWS)
    cols = (tile - row_tile * col_tiles) * COLS + tl.arange(0, COLS)
    if WIDE:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    s = divide(rows, n_frames, tl.load(row_meta + FRAMES_M),
               tl.load(row_meta + FRAMES_S), WIDE)
    first = (rows - s * n_frames) * tl.load(row_meta + HOP) - n_fft // 2
    u = first[:, None] + cols[None, :]
    u = tl.where(u < 0, -u, u)
    u = tl.where(u >= length, 2 * (length - 1) - u, u)
    mask = (rows < side_rows)[:, None] & (cols < fft_n)[None, :]
    in_frame = cols < n_fft  # columns past n_fft: the zero padding of a shared, larger FFT
    live = mask & in_frame[None, :]
    if side == 0:
        value = tl.load(x_ptr + _signal_offsets(s[:, None], u, channels, channels_m, channels_s,
                                                width, width_m, width_s, x_s0, x_s1, x_s2,
                                                x_s3, WIDE), mask=live, other=0.0).to(ACC)
    else:
        value = tl.load(y_ptr + _signal_offsets(s[:, None], u, channels, channels_m, channels_s,
                                                width, width_m, width_s, y_s0, y_s1, y_s2,
                                                y_s3, WIDE), mask=live, other=0.0).to(ACC)
    w = tl.load(win_ptr + tl.load(row_meta + WIN_OFF) + cols, mask=in_frame,
                other=0.0)
    start = (tl.load(row_meta + FRAME_OFF)
             + side * tl.load(row_meta + FRAME_SIDE))
    tl.store(frames_ptr + start + rows[:, None] * fft_n + cols[None, :], value * w[None, :],
             mask=mask)


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
    spec_ptr, partials_ptr, meta_ptr, params_ptr, signals, n_programs,
    ACC: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
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
        _, _, _, py, my = _magnitudes(spec_ptr, x_index + spec_side, mask, eps)
        _, _, _, _, mx = _magnitudes(spec_ptr, x_index, mask, eps)
        diff = mx - my
        sum_d2 += tl.where(mask, diff * diff, 0.0)
        sum_py += tl.where(mask, py, 0.0)
        sum_log += tl.where(mask, tl.abs(tl.log(mx / my)), 0.0)
        sum_d += tl.where(mask, tl.abs(diff), 0.0)
        start += n_programs * BLOCK
    out = partials_ptr + (r * n_programs + program) * 4
    # One slot per program: in range by construction (grid == (P, R)).
    tl.store(out, tl.sum(sum_d2, axis=0))
    tl.store(out + 1, tl.sum(sum_py, axis=0))
    tl.store(out + 2, tl.sum(sum_log, axis=0))
    tl.store(out + 3, tl.sum(sum_d, axis=0))


@triton.jit
def mrstft_from_partials(
    partials_ptr, meta_ptr, scalars_ptr, n_programs, signals, params_ptr,
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


@triton.jit
def _mrstft_epilogue_kernel(
    partials_ptr, meta_ptr, scalars_ptr, loss_ptr, n_programs, signals, params_ptr,
    USE_SC: tl.constexpr, USE_LOG: tl.constexpr, USE_LIN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, N_RES: tl.constexpr,
):
    """One program: the MRSTFT value (the module's loss) and the gradient scalars."""
    loss = mrstft_from_partials(partials_ptr, meta_ptr, scalars_ptr, n_programs, signals,
                                params_ptr, USE_SC, USE_LOG, USE_LIN, ACC, BLOCK, N_RES)
    tl.store(loss_ptr, loss)


@triton.jit
def _spectral_grad_kernel(
    spec_ptr, meta_ptr, scalars_ptr, params_ptr, signals,
    GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr,
    USE_SC: tl.constexpr, USE_LOG: tl.constexpr, USE_LIN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, N_RES: tl.constexpr, WIDE: tl.constexpr,
):
    """One program per tile of a resolution's ``[S, F, bins of its FFT]`` elements (the
    resolutions' tiles one after the other): ``G = h dL/dM X / M`` (masked by the clamp),
    written over ``X`` (and over ``Y`` for the target's gradient). Each element is read and
    written by one program, so the update in place is safe."""
    pid = tl.program_id(0)
    r = _resolution_of(meta_ptr, pid, GRAD_TILE0, N_RES)
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


@triton.jit
def _frames_adjoint_kernel(
    frames_ptr, meta_ptr, win_ptr, out_ptr, signals, length, first_side, t_tiles,
    ACC: tl.constexpr, BLOCK: tl.constexpr, N_RES: tl.constexpr, MAX_COVER: tl.constexpr,
    WIDE: tl.constexpr,
):
    """``out[row, t] = sum_r sum_{p -> t} sum_{f covers p} w_r[c] * dframe_r[f, c]``,
    ``c = p - f*hop``, over the padded positions ``p`` that reflect onto ``t``: ``t + pad``,
    ``pad - t`` (for ``1 <= t <= pad``) and ``pad + 2(T-1) - t`` (for ``T-1-pad <= t <= T-2``).
    One program per (row, tile of ``t``); only the programs whose tile reaches an edge make
    the passes over the reflected positions. A gather in a fixed order: every output written
    once, bit-identical run to run."""
    pid = tl.program_id(0)
    row = pid // t_tiles  # once per program
    first = (pid - row * t_tiles) * BLOCK
    if WIDE:
        row = row.to(tl.int64)
        first = first.to(tl.int64)
    side = first_side + row // signals
    s = row - (row // signals) * signals
    t = first + tl.arange(0, BLOCK)
    mask = t < length
    acc = tl.zeros([BLOCK], dtype=ACC)
    for r in tl.static_range(N_RES):
        row_meta = meta_ptr + r * META
        n_fft = tl.load(row_meta + N_FFT)
        hop = tl.load(row_meta + HOP)
        n_frames = tl.load(row_meta + FRAMES)
        fft_n = tl.load(row_meta + FFT_N)
        win_off = tl.load(row_meta + WIN_OFF)
        hop_m = tl.load(row_meta + HOP_M)
        hop_s = tl.load(row_meta + HOP_S)
        pad = n_fft // 2
        base = (tl.load(row_meta + FRAME_OFF)
                + side * tl.load(row_meta + FRAME_SIDE) + s * n_frames * fft_n)
        near_edge = (first <= pad) | (first + BLOCK - 1 >= length - 1 - pad)
        passes = tl.where(near_edge, 3, 1)
        k = 0
        while k < passes:  # 0: t + pad; 1, 2: the positions reflected onto t at either edge
            if k == 0:
                p = t + pad
                valid = mask
            elif k == 1:
                p = pad - t
                valid = mask & (t >= 1) & (t <= pad)
            else:
                p = pad + 2 * (length - 1) - t
                valid = mask & (t >= length - 1 - pad) & (t <= length - 2)
            last = divide(p, hop, hop_m, hop_s, WIDE)
            for j in tl.static_range(MAX_COVER):  # the frames that may cover p: c < n_fft
                f = last - j
                c = p - f * hop
                ok = valid & (f >= 0) & (f < n_frames) & (c < n_fft)
                g = tl.load(frames_ptr + base + f * fft_n + c, mask=ok, other=0.0)
                w = tl.load(win_ptr + win_off + c, mask=ok, other=0.0)
                acc += g.to(ACC) * w
            k += 1
    tl.store(out_ptr + row * length + t, acc, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers (custom ops) and the FFT steps between them
# --------------------------------------------------------------------------------------------

@kernel_op("distill_fused::stft_frames", mutates_args=())
def stft_frames_op(x: torch.Tensor, y: torch.Tensor, x_strides: List[int],
                   y_strides: List[int], channels: int, width: int, signals: int, length: int,
                   meta: torch.Tensor, windows: torch.Tensor, frames_numel: int,
                   spec_numel: int, tiles: int, tile: List[int], n_res: int, wide: bool
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The windowed frames of every resolution, x rows then y rows, in one flat buffer; and,
    not yet written, the flat complex buffer of their spectra (``spectra_of`` fills it, the
    gradient kernel writes over it): allocated here, as every buffer a kernel writes is, by a
    launcher."""
    frames = empty((frames_numel,), windows.dtype, windows.device)
    complex_dtype = torch.complex128 if windows.dtype == torch.float64 else torch.complex64
    spec = empty((spec_numel,), complex_dtype, windows.device)
    wrap_triton(_frame_kernel)[(tiles,)](
        x, y, frames, meta, windows, signals, length, channels, width, *x_strides, *y_strides,
        *magic(channels), *magic(width), ACC=tl_dtype(windows.dtype), ROWS=tile[0],
        COLS=tile[1], N_RES=n_res, WIDE=wide or is_wide(FRAME_TILE, x, y), num_warps=8)
    return frames, spec


def frame_signals(x: torch.Tensor, y: torch.Tensor, x_layout, y_layout, plan: STFTPlan
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(frames, spectrum buffer)`` (see ``stft_frames_op``). ``x_layout``/``y_layout``:
    ``(channels, width, (s0, s1, s2, s3))`` (see the kernel)."""
    channels, width, xs = x_layout
    _, _, ys = y_layout
    return stft_frames_op(x, y, list(xs), list(ys), channels, width, plan.signals, plan.length,
                          plan.meta, plan.windows, plan.frames_numel, plan.spec_numel,
                          plan.frame_tiles, list(plan.frame_tile), plan.n_res, plan.wide)


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
                             signals: int, n_res: int, n_programs: int,
                             wide: bool) -> torch.Tensor:
    """``[R, n_programs, 4]`` partial sums (inside a custom op: one launch)."""
    dtype = _real_dtype(spec)
    partials = empty((n_res, n_programs, 4), dtype, spec.device)
    wrap_triton(_spectral_partials_kernel)[(n_programs, n_res)](
        torch.view_as_real(spec), partials, meta, params, signals, n_programs,
        ACC=tl_dtype(dtype), BLOCK=PARTIAL_TILE, WIDE=wide, num_warps=2 * spectral_warps(dtype))
    return partials


@kernel_op("distill_fused::mrstft_reduce", mutates_args=())
def mrstft_reduce_op(spec: torch.Tensor, meta: torch.Tensor, params: torch.Tensor,
                     signals: int, n_res: int, n_programs: int, use_terms: List[bool],
                     wide: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(MRSTFT, gradient scalars [R, 4])`` from the spectra: partials, then the epilogue."""
    dtype = _real_dtype(spec)
    partials = launch_spectral_partials(spec, meta, params, signals, n_res, n_programs, wide)
    loss, scalars = empty((), dtype, spec.device), empty((n_res, 4), dtype, spec.device)
    wrap_triton(_mrstft_epilogue_kernel)[(1,)](
        partials, meta, scalars, loss, n_programs, signals, params,
        USE_SC=use_terms[0], USE_LOG=use_terms[1], USE_LIN=use_terms[2], ACC=tl_dtype(dtype),
        BLOCK=BLOCK, N_RES=n_res, **ONE_PROGRAM)
    return loss, scalars


@kernel_op("distill_fused::stft_spectral_grad", mutates_args=("spec",))
def stft_spectral_grad_op(spec: torch.Tensor, meta: torch.Tensor, scalars: torch.Tensor,
                          params: torch.Tensor, signals: int, n_res: int, tiles: int,
                          grad_x: bool, grad_y: bool, use_terms: List[bool],
                          wide: bool) -> None:
    wrap_triton(_spectral_grad_kernel)[(tiles,)](
        torch.view_as_real(spec), meta, scalars, params, signals, GRAD_X=grad_x, GRAD_Y=grad_y,
        USE_SC=use_terms[0], USE_LOG=use_terms[1], USE_LIN=use_terms[2],
        ACC=tl_dtype(_real_dtype(spec)), BLOCK=BLOCK, N_RES=n_res, WIDE=wide,
        num_warps=spectral_warps(_real_dtype(spec), int(grad_x) + int(grad_y)))


@kernel_op("distill_fused::stft_frames_adjoint", mutates_args=())
def stft_frames_adjoint_op(frames: torch.Tensor, meta: torch.Tensor, windows: torch.Tensor,
                           n_res: int, signals: int, length: int, first_side: int, sides: int,
                           max_cover: int, wide: bool) -> torch.Tensor:
    rows = sides * signals
    out = empty((rows, length), frames.dtype, frames.device)
    t_tiles = triton.cdiv(length, ADJOINT_BLOCK)
    wrap_triton(_frames_adjoint_kernel)[(rows * t_tiles,)](
        frames, meta, windows, out, signals, length, first_side, t_tiles,
        ACC=tl_dtype(frames.dtype), BLOCK=ADJOINT_BLOCK, N_RES=n_res, MAX_COVER=max_cover,
        WIDE=wide, num_warps=adjoint_warps(frames.dtype, wide))
    return out


def signal_gradient(spec, frames, scalars, plan: STFTPlan, grad_x: bool,
                    grad_y: bool) -> torch.Tensor:
    """``dMRSTFT/dsignal`` for the x rows, the y rows or both (``[rows, T]``), from the spectra
    and the epilogue's scalars. Overwrites ``spec`` and ``frames``."""
    stft_spectral_grad_op(spec, plan.meta, scalars, plan.params, plan.signals, plan.n_res,
                          plan.grad_tiles, grad_x, grad_y, list(plan.use_terms), plan.wide)
    sides = slice(0 if grad_x else 1, 2 if grad_y else 1)
    inverse_into_frames(spec, frames, plan, sides)
    return stft_frames_adjoint_op(frames, plan.meta, plan.windows, plan.n_res, plan.signals,
                                  plan.length, sides.start, sides.stop - sides.start,
                                  plan.max_cover, plan.wide)


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
                                         plan.spec_programs, list(plan.use_terms), plan.wide)
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
