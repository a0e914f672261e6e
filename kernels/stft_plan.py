"""The plan of the multi-resolution STFT kernels: where every resolution's frames and spectra
lie in two flat buffers, how the FFTs are grouped, the grids and their tiles.

Per-resolution geometry lives in a small device table (``meta``, one row per resolution, the
columns named below), built once per shape and cached on the settings. An FFT group is one
resolution (``per_resolution``, the default) or, under ``shared``, every resolution whose n
divides the group's FFT size m: its frames are zero-padded to m and its bin j read at bin
``(m/n) j`` (``fft_groups``). The kernels (``stft_frames.py``, ``stft_spectral.py``) read
the table; ``mrstft.py`` runs them in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ..core.tracing import tracing
from . import _common
from ._common import magic, past_index_limit

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
# Tile sizes, read when a plan is made (the plan carries them to the launchers; the tests shrink
# them so that small inputs take every multi-tile path).
# The spectral gradient kernel's tiles (elements of a resolution's spectra).
GRAD_TILE = 1024
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


GROUPINGS = ("per_resolution", "shared")


@dataclass(frozen=True, eq=False)
class STFTPlan:
    """Geometry of ``S`` signals of ``T`` samples under some settings, on one device/dtype."""

    signals: int
    length: int
    resolutions: Tuple[Tuple[int, ...], ...]  # meta rows
    fft_grouping: str      # how the FFTs are grouped (``fft_groups``)
    groups: Tuple[Tuple[int, int, int, int], ...]  # (fft_n, frame_start, spec_start, rows/side)
    frames_numel: int      # real elements of the frame buffer (all resolutions, x and y)
    spec_numel: int        # complex elements of the spectrum buffer
    frame_tiles: int       # programs of the framing grid (every resolution's tiles)
    frame_tile: Tuple[int, int]  # (frames, columns) of a framing tile
    grad_tile: int         # elements a program of the spectral gradient grid
    grad_tiles: int        # programs of the spectral gradient grid
    partial_tile: int      # elements a loop pass of the spectral sums
    spec_programs: int     # programs per resolution of the spectral sums
    adjoint_block: int     # samples a program of the adjoint
    max_cover: int         # most frames covering one padded sample, over resolutions
    wide: bool             # 64-bit index math (a buffer past ``INDEX_LIMIT`` elements)
    meta: torch.Tensor     # [R, META] on the device: int32, int64 when ``wide``
    windows: torch.Tensor  # the windows, zero-padded to n_fft and concatenated
    params: torch.Tensor   # (w_sc, w_log, w_lin, eps) in the compute dtype, on the device
    use_terms: Tuple[bool, bool, bool]  # which weights are non-zero (terms auraloss computes)

    @property
    def n_res(self) -> int:
        return len(self.resolutions)


def fft_groups(fft_sizes, fft_grouping: str) -> List[List[int]]:
    """Resolutions that share one ``rfft`` call. ``per_resolution``: one call each.
    ``shared``: a frame zero-padded from n to m = k*n samples has, in its length-m DFT, bin
    ``k*j`` equal to bin j of its length-n DFT; so one FFT of the largest size serves every
    resolution whose n divides it (fewer launches, more FLOPs and bytes)."""
    if fft_grouping not in GROUPINGS:
        raise ValueError(f"fft_grouping must be one of {GROUPINGS}, got {fft_grouping!r}")
    if fft_grouping == "per_resolution":
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


def stft_dtype(dtype: torch.dtype, fft_grouping: str) -> torch.dtype:
    """The dtype the STFT runs in (frames, spectra, their gradients) for a loss computed in
    ``dtype``: ``dtype`` itself, but float64 under the shared grouping.

    A larger, zero-padded FFT rounds differently from the resolution's own FFT (which
    ``torch.stft``, and so the oracle, runs), and the log-magnitude gradient divides by small
    magnitudes, which amplifies rounding some 1e4-1e5 times. In float32 a shared FFT's gradient
    error is therefore an independent draw of the float32 oracle's own, at times 3-4 times it
    (beyond the contract's bound on about 1 input in 150); in float64 it stays below 1e-11.
    """
    return torch.float64 if fft_grouping == "shared" else dtype


def make_plan(settings, signals: int, length: int, device, dtype, fft_grouping: str) -> STFTPlan:
    """The plan for these shapes in ``dtype`` (see ``stft_dtype``) under ``fft_grouping``
    (``fft_groups``), built once and cached on ``settings``. Tile sizes are this module's
    when the plan is made."""
    key = ("triton-plan", signals, length, torch.device(device), dtype, fft_grouping,
           _common.INDEX_LIMIT)
    plan = settings.cache.get(key)
    if plan is not None:
        return plan
    sizes = [r.n_fft for r in settings.resolutions]
    frames = [1 + (length + 2 * (r.n_fft // 2) - r.n_fft) // r.hop for r in settings.resolutions]
    layout: List[Tuple[int, ...]] = [()] * len(sizes)  # per resolution: where its rows lie
    groups = []
    frame_start = spec_start = 0
    for members in fft_groups(sizes, fft_grouping):
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
    # The grids list every resolution's tiles in resolution order (``resolution_of``).
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
        grad_tiles += triton.cdiv(signals * frames[i] * spec_row, GRAD_TILE)
        max_spec_tiles = max(max_spec_tiles, triton.cdiv(signals * frames[i] * bins,
                                                         PARTIAL_TILE))
    windows = [settings.padded_window(i, "cpu", dtype) for i in range(len(sizes))]
    # Real elements: the spectra are read as (re, im) pairs.
    wide = past_index_limit(max(frame_start, 2 * spec_start) + GRAD_TILE)
    plan = STFTPlan(
        signals=signals, length=length, resolutions=tuple(rows), fft_grouping=fft_grouping,
        groups=tuple(groups), frames_numel=frame_start, spec_numel=spec_start,
        frame_tiles=frame_tiles, frame_tile=(frame_rows, frame_cols),
        grad_tile=GRAD_TILE, grad_tiles=grad_tiles, partial_tile=PARTIAL_TILE,
        spec_programs=min(max_spec_tiles, triton.cdiv(PARTIAL_PROGRAMS, len(rows))),
        adjoint_block=ADJOINT_BLOCK,
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


@triton.jit
def resolution_of(meta_ptr, pid, TILE0: tl.constexpr, N_RES: tl.constexpr):
    """The resolution that program ``pid`` of a grid listing every resolution's tiles one
    after the other works on (``TILE0``: the column of their first programs)."""
    r = pid * 0
    for k in tl.static_range(1, N_RES):
        r += (pid >= tl.load(meta_ptr + k * META + TILE0)).to(tl.int32)
    return r
