"""The frames of the multi-resolution STFT, and their adjoint: signal -> frames -> signal.

For ``S`` signal rows of ``T`` samples and each resolution ``r = (n, hop, window w)`` with
``F`` frames (``center=True``, reflect padding by ``pad = n//2``, as ``torch.stft``)::

    frame[s, f, c] = w[c] * sig[s, reflect(f*hop - pad + c)]

    reflect(u) = -u for u < 0,  2(T-1) - u for u >= T,  else u

Its adjoint, for the frames' gradients ``dframe`` (from the inverse FFT)::

    dsig[s, t] = sum over the (up to 3) padded positions p that reflect onto t -- t + pad,
                 pad - t (1 <= t <= pad), pad + 2(T-1) - t (T-1-pad <= t <= T-2) -- and the
                 frames f covering p, of w[p - f*hop] * dframe[s, f, p - f*hop]

a gather (every output written once, in a fixed order: no atomics). ``_frame_kernel`` writes
the frames of every resolution, input and target, straight into the rows ``rfft`` reads;
``_frames_adjoint_kernel`` sums them back. Where each resolution's rows lie: ``stft_plan.py``.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ._common import divide, empty, is_wide, kernel_op, magic, tl_dtype, wrap_triton
from .stft_plan import (
    FFT_N,
    FRAME_OFF,
    FRAME_SIDE,
    FRAME_TILE0,
    FRAMES,
    FRAMES_M,
    FRAMES_S,
    HOP,
    HOP_M,
    HOP_S,
    META,
    N_FFT,
    WIN_OFF,
    STFTPlan,
    adjoint_warps,
    resolution_of,
)


@triton.jit
def _signal_offsets(s, u, channels, channels_m, channels_s, width, width_m, width_s,
                    s0, s1, s2, s3, WIDE: tl.constexpr):
    """Offsets of samples ``u`` (``[ROWS, COLS]``) of signal rows ``s`` (``[ROWS, 1]``) in a
    tensor read as ``(s // channels)*s0 + (s % channels)*s1 + (u // width)*s2 + (u % width)*s3``."""
    sb = divide(s, channels, channels_m, channels_s, WIDE)
    th = divide(u, width, width_m, width_s, WIDE)
    return sb * s0 + (s - sb * channels) * s1 + th * s2 + (u - th * width) * s3


@triton.jit(do_not_specialize=["signals"])
def _frame_kernel(
    # the signals, read in place: input, target, and their strides (see below)
    x_ptr,
    y_ptr,
    x_s0,
    x_s1,
    x_s2,
    x_s3,
    y_s0,
    y_s1,
    y_s2,
    y_s3,
    # their geometry: S signal rows of T samples, folded from (channels, width)
    signals,
    length,
    channels,
    channels_m,
    channels_s,
    width,
    width_m,
    width_s,
    # the plan: meta table and concatenated windows; the output frame buffer
    meta_ptr,
    win_ptr,
    frames_ptr,
    # compile-time
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    N_RES: tl.constexpr,
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
    r = resolution_of(meta_ptr, pid, FRAME_TILE0, N_RES)
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


@triton.jit(do_not_specialize=["signals"])
def _frames_adjoint_kernel(
    # the frames' gradients (the irfft's output) and the plan
    frames_ptr,
    meta_ptr,
    win_ptr,
    # the output: [sides * S, T] signal gradients, from side ``first_side`` (0: x, 1: y) on
    out_ptr,
    signals,
    length,
    first_side,
    t_tiles,
    # compile-time
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    N_RES: tl.constexpr,
    MAX_COVER: tl.constexpr,
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
# Launchers
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
        x, y, *x_strides, *y_strides,
        signals, length, channels, *magic(channels), width, *magic(width),
        meta, windows, frames,
        ACC=tl_dtype(windows.dtype), ROWS=tile[0], COLS=tile[1], N_RES=n_res,
        WIDE=wide or is_wide(tile[0] * tile[1], x, y), num_warps=8)
    return frames, spec


def frame_signals(x: torch.Tensor, y: torch.Tensor, x_layout, y_layout, plan: STFTPlan
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(frames, spectrum buffer)`` (see ``stft_frames_op``). ``x_layout``/``y_layout``:
    ``(channels, width, (s0, s1, s2, s3))`` (see ``_frame_kernel``)."""
    channels, width, xs = x_layout
    _, _, ys = y_layout
    return stft_frames_op(x, y, list(xs), list(ys), channels, width, plan.signals, plan.length,
                          plan.meta, plan.windows, plan.frames_numel, plan.spec_numel,
                          plan.frame_tiles, list(plan.frame_tile), plan.n_res, plan.wide)


@kernel_op("distill_fused::stft_frames_adjoint", mutates_args=())
def stft_frames_adjoint_op(frames: torch.Tensor, meta: torch.Tensor, windows: torch.Tensor,
                           n_res: int, signals: int, length: int, first_side: int, sides: int,
                           max_cover: int, block: int, wide: bool) -> torch.Tensor:
    """``[sides * S, T]``: the signal gradients of the frames' gradients (``frames``)."""
    rows = sides * signals
    out = empty((rows, length), frames.dtype, frames.device)
    t_tiles = triton.cdiv(length, block)
    wrap_triton(_frames_adjoint_kernel)[(rows * t_tiles,)](
        frames, meta, windows, out, signals, length, first_side, t_tiles,
        ACC=tl_dtype(frames.dtype), BLOCK=block, N_RES=n_res, MAX_COVER=max_cover,
        WIDE=wide, num_warps=adjoint_warps(frames.dtype, wide))
    return out
