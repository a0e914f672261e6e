"""auraloss's options on the ``triton`` backend's per-example path (``backends/per_example.py``):
the mel scale and ``mag_distance="L2"``, as sums per example.

Per resolution, for the spectra ``X``, ``Y`` ``[2B, C, F, bins]`` (x's examples, then y's) and
example b's first ``F_b`` frames (``core/settings.py`` has the loss)::

    Mx = sqrt(max(|X|^2, eps))           (magnitudes kernel)
    Sx = Mx W^T                          (the mel filterbank W [K, bins], by cuBLAS;
                                          without scale Sx = Mx, K = bins)
    D = Sx - Sy
    s_b = (sum D^2, sum Sy^2, sum rho(ln Sx/Sy), sum rho(D))        (feature sums kernel)

with ``rho(u) = |u|`` (L1) or ``u^2`` (L2). Gradients, for the sums' incoming gradients
``g_b = (g0, g1, g2, g3)``, ``rho'(u) = sign(u)`` or ``2u``::

    dL/dSx =  2 g0 D          + g2 rho'(ln Sx/Sy) / Sx + g3 rho'(D)  (feature grad kernel)
    dL/dSy = -2 g0 D + 2 g1 Sy - g2 rho'(ln Sx/Sy) / Sy - g3 rho'(D)
    dL/dMx = dL/dSx W                                                (cuBLAS)
    dL/dX  = dL/dMx X / Mx [|X|^2 >= eps]                            (magnitude grad kernel)

every one 0 on frames past ``F_b``. The sums run in two stages as ``per_example.py``'s (``B P``
programs, a fixed-order ``sum`` over ``P`` in torch: no atomics); the maps have one program per
tile (of an example, where frames are masked). Computed in torch on this backend too: the phase
term (its ``atan2`` is libdevice's in Triton, which the interpreter CI runs on cannot run) and
``scale_invariance`` (its alpha couples every element of a signal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.settings import MRSTFTSettings
from ._common import device_constants, empty, is_wide, kernel_op, signum, tl_dtype, wrap_triton
from .per_example import BLOCK, _programs, example_tile, store_sums
from .stft_spectral import _magnitudes


@triton.jit
def _distance(u, L2: tl.constexpr):
    if L2:
        return u * u
    else:
        return tl.abs(u)


@triton.jit
def _distance_slope(u, L2: tl.constexpr):
    if L2:
        return 2.0 * u
    else:
        return signum(u)


@triton.jit
def _magnitudes_kernel(
    # the spectra as real pairs, n complex elements; eps
    spec_ptr,
    params_ptr,
    n,
    # the output: the magnitudes, in the spectra's layout
    mag_ptr,
    # compile-time
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """``M = sqrt(max(|X|^2, eps))`` for every element (every frame: the filterbank runs over
    all of them, the sums mask them). Program t: tile t."""
    start = tl.program_id(0) * BLOCK
    if WIDE:
        start = start.to(tl.int64)
    e = start + tl.arange(0, BLOCK)
    in_range = e < n
    eps = tl.load(params_ptr).to(ACC)
    _, _, _, _, mag = _magnitudes(spec_ptr, e, in_range, eps)
    tl.store(mag_ptr + e, mag.to(mag_ptr.dtype.element_ty), mask=in_range)


@triton.jit(do_not_specialize=["n_examples"])
def _example_feature_sums_kernel(
    # the magnitudes the terms are formed from [2B, C, F, K]; valid frames [B]
    feat_ptr,
    frames_ptr,
    per_example,
    width,
    n_frames,
    n_examples,
    # the output: [B, P, 4] partial sums
    partials_ptr,
    n_programs,
    # compile-time
    L2: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """``partials[b, p] = (sum D^2, sum Sy^2, sum rho(ln Sx/Sy), sum rho(D))`` over tiles
    ``p, p + P, ...`` of example b's ``C F K`` elements, frames ``f < F_b`` only
    (``D = Sx - Sy``; ``rho``: ``|.|``, or ``(.)^2`` with ``L2``). Program ``b P + p``."""
    b = tl.program_id(0) // n_programs  # once per program
    program = tl.program_id(0) - b * n_programs
    if WIDE:
        b = b.to(tl.int64)
    valid_frames = tl.load(frames_ptr + b)
    x_base = b * per_example
    y_base = (n_examples + b) * per_example
    sum_d2 = tl.zeros([BLOCK], dtype=ACC)
    sum_sy2 = tl.zeros([BLOCK], dtype=ACC)
    sum_log = tl.zeros([BLOCK], dtype=ACC)
    sum_d = tl.zeros([BLOCK], dtype=ACC)
    start = program * BLOCK
    if WIDE:
        start = start.to(tl.int64)
    while start < per_example:  # a while loop, not range(): see _common.py
        e = start + tl.arange(0, BLOCK)
        valid = (e < per_example) & ((e // width) % n_frames < valid_frames)
        sx = tl.load(feat_ptr + x_base + e, mask=valid, other=1.0).to(ACC)
        sy = tl.load(feat_ptr + y_base + e, mask=valid, other=1.0).to(ACC)
        diff = sx - sy
        sum_d2 += tl.where(valid, diff * diff, 0.0)
        sum_sy2 += tl.where(valid, sy * sy, 0.0)
        sum_log += tl.where(valid, _distance(tl.log(sx / sy), L2), 0.0)
        sum_d += tl.where(valid, _distance(diff, L2), 0.0)
        start += n_programs * BLOCK
    store_sums(partials_ptr + (b * n_programs + program) * 4, sum_d2, sum_sy2, sum_log, sum_d)


@triton.jit(do_not_specialize=["n_examples"])
def _example_feature_grad_kernel(
    # the magnitudes [2B, C, F, K], valid frames [B], the sums' gradients [B, 4]
    feat_ptr,
    frames_ptr,
    grad_sums_ptr,
    per_example,
    width,
    n_frames,
    n_examples,
    n_tiles,
    # the output: [2B, C, F, K], the magnitudes' gradient
    grad_ptr,
    # compile-time
    L2: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """``dL/dSx = 2 g0 D + g2 rho'(ln Sx/Sy) / Sx + g3 rho'(D)``, ``dL/dSy = -2 g0 D +
    2 g1 Sy - g2 rho'(ln Sx/Sy) / Sy - g3 rho'(D)`` over tile t of example b's elements
    (``rho'``: ``sign``, or ``2u`` with ``L2``); 0 on frames past ``F_b``. Program
    ``b T + t``."""
    b, in_range, valid, x_index, y_index = example_tile(
        frames_ptr, per_example, width, n_frames, n_examples, n_tiles, BLOCK, WIDE)
    sx = tl.load(feat_ptr + x_index, mask=valid, other=1.0).to(ACC)
    sy = tl.load(feat_ptr + y_index, mask=valid, other=1.0).to(ACC)
    g_d2 = tl.load(grad_sums_ptr + b * 4).to(ACC)
    g_sy2 = tl.load(grad_sums_ptr + b * 4 + 1).to(ACC)
    g_log = tl.load(grad_sums_ptr + b * 4 + 2).to(ACC)
    g_d = tl.load(grad_sums_ptr + b * 4 + 3).to(ACC)
    diff = sx - sy
    slope_log = _distance_slope(tl.log(sx / sy), L2)
    slope_d = _distance_slope(diff, L2)
    d_sx = 2.0 * g_d2 * diff + g_log * slope_log / sx + g_d * slope_d
    d_sy = -2.0 * g_d2 * diff + 2.0 * g_sy2 * sy - g_log * slope_log / sy - g_d * slope_d
    out_dtype = grad_ptr.dtype.element_ty
    tl.store(grad_ptr + x_index, tl.where(valid, d_sx, 0.0).to(out_dtype), mask=in_range)
    tl.store(grad_ptr + y_index, tl.where(valid, d_sy, 0.0).to(out_dtype), mask=in_range)


@triton.jit(do_not_specialize=["n_examples"])
def _example_magnitude_grad_kernel(
    # the spectra (real pairs), valid frames [B], eps, the magnitudes' gradient
    # [2B, C, F, bins]
    spec_ptr,
    frames_ptr,
    params_ptr,
    grad_mag_ptr,
    per_example,
    bins,
    n_frames,
    n_examples,
    n_tiles,
    # the output: the spectra's gradient, real pairs in the spectra's layout
    grad_ptr,
    # compile-time
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """``dL/dX = dL/dMx X / Mx [|X|^2 >= eps]`` (likewise Y) over tile t of example b's
    elements; 0 on frames past ``F_b``. Program ``b T + t``."""
    _, in_range, valid, x_index, y_index = example_tile(
        frames_ptr, per_example, bins, n_frames, n_examples, n_tiles, BLOCK, WIDE)
    eps = tl.load(params_ptr).to(ACC)
    xre, xim, px, _, mx = _magnitudes(spec_ptr, x_index, valid, eps)
    yre, yim, py, _, my = _magnitudes(spec_ptr, y_index, valid, eps)
    d_mx = tl.load(grad_mag_ptr + x_index, mask=valid, other=0.0).to(ACC)
    d_my = tl.load(grad_mag_ptr + y_index, mask=valid, other=0.0).to(ACC)
    coef_x = tl.where(valid & (px >= eps), d_mx / mx, 0.0)
    coef_y = tl.where(valid & (py >= eps), d_my / my, 0.0)
    tl.store(grad_ptr + 2 * x_index, coef_x * xre, mask=in_range)
    tl.store(grad_ptr + 2 * x_index + 1, coef_x * xim, mask=in_range)
    tl.store(grad_ptr + 2 * y_index, coef_y * yre, mask=in_range)
    tl.store(grad_ptr + 2 * y_index + 1, coef_y * yim, mask=in_range)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _geometry(t: torch.Tensor):
    """``(examples, elements per example, last axis, frames)`` of ``[2B, C, F, K(, 2)]``."""
    rows, channels, frames, width = t.shape[:4]
    return rows // 2, channels * frames * width, width, frames


@kernel_op("distill_fused::stft_magnitudes", mutates_args=())
def magnitudes_op(spec_real: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The magnitudes of ``[..., 2]`` real pairs, ``[...]`` (one launch)."""
    mags = empty(spec_real.shape[:-1], spec_real.dtype, spec_real.device)
    n = mags.numel()
    wrap_triton(_magnitudes_kernel)[(triton.cdiv(n, BLOCK),)](
        spec_real, params, n, mags, ACC=tl_dtype(spec_real.dtype), BLOCK=BLOCK,
        WIDE=is_wide(2 * BLOCK, spec_real), num_warps=8)
    return mags


@kernel_op("distill_fused::example_feature_sums", mutates_args=())
def example_feature_sums_op(feats: torch.Tensor, frames: torch.Tensor,
                            l2: bool) -> torch.Tensor:
    """``[B, P, 4]`` partial sums of the magnitudes' terms (one launch)."""
    examples, per_example, width, n_frames = _geometry(feats)
    n_programs = _programs(per_example, examples)
    partials = empty((examples, n_programs, 4), feats.dtype, feats.device)
    wrap_triton(_example_feature_sums_kernel)[(examples * n_programs,)](
        feats, frames, per_example, width, n_frames, examples, partials, n_programs, L2=l2,
        ACC=tl_dtype(feats.dtype), BLOCK=BLOCK, WIDE=is_wide(BLOCK, feats), num_warps=8)
    return partials


@kernel_op("distill_fused::example_feature_grad", mutates_args=())
def example_feature_grad_op(feats: torch.Tensor, frames: torch.Tensor,
                            grad_sums: torch.Tensor, l2: bool) -> torch.Tensor:
    """The magnitudes' gradient ``[2B, C, F, K]`` (one launch)."""
    examples, per_example, width, n_frames = _geometry(feats)
    grad = empty(feats.shape, feats.dtype, feats.device)
    n_tiles = triton.cdiv(per_example, BLOCK)
    wrap_triton(_example_feature_grad_kernel)[(examples * n_tiles,)](
        feats, frames, grad_sums, per_example, width, n_frames, examples, n_tiles, grad, L2=l2,
        ACC=tl_dtype(feats.dtype), BLOCK=BLOCK, WIDE=is_wide(BLOCK, feats), num_warps=8)
    return grad


@kernel_op("distill_fused::example_magnitude_grad", mutates_args=())
def example_magnitude_grad_op(spec_real: torch.Tensor, frames: torch.Tensor,
                              params: torch.Tensor, grad_mags: torch.Tensor) -> torch.Tensor:
    """The spectra's gradient, real pairs ``[2B, C, F, bins, 2]`` (one launch)."""
    examples, per_example, bins, n_frames = _geometry(spec_real)
    grad = empty(spec_real.shape, spec_real.dtype, spec_real.device)
    n_tiles = triton.cdiv(per_example, BLOCK)
    wrap_triton(_example_magnitude_grad_kernel)[(examples * n_tiles,)](
        spec_real, frames, params, grad_mags, per_example, bins, n_frames, examples, n_tiles,
        grad, ACC=tl_dtype(spec_real.dtype), BLOCK=BLOCK,
        WIDE=is_wide(2 * BLOCK, spec_real),
        num_warps=16 if spec_real.dtype == torch.float64 else 8)
    return grad


# --------------------------------------------------------------------------------------------
# The sums of ``per_example.TorchSums``'s interface, for settings that are not ``plain``
# --------------------------------------------------------------------------------------------

def _features(spec: torch.Tensor, settings: MRSTFTSettings, index: int):
    """``(spec as real pairs, eps, filterbank, Sx and Sy [2B, C, F, K])``."""
    spec_real = torch.view_as_real(spec)
    params = device_constants((settings.eps,), spec.device)
    bank = settings.filterbank(index, spec.device, spec.real.dtype)
    mags = magnitudes_op(spec_real, params)
    return spec_real, params, bank, mags if bank is None else mags @ bank.T


def spectral_sums(spec: torch.Tensor, frames: torch.Tensor, settings: MRSTFTSettings,
                  index: int) -> torch.Tensor:
    """``[B, 4]``: the sums ``s_b``."""
    _, _, _, feats = _features(spec, settings, index)
    return example_feature_sums_op(feats.contiguous(), frames,
                                   settings.mag_distance == "L2").sum(1)


def spectral_grad(spec: torch.Tensor, frames: torch.Tensor, settings: MRSTFTSettings,
                  index: int, grad_sums: torch.Tensor) -> torch.Tensor:
    """``dL/dX`` (complex, ``spec``'s shape) for the sums' gradients ``[B, 4]``."""
    spec_real, params, bank, feats = _features(spec, settings, index)
    grad_feats = example_feature_grad_op(feats.contiguous(), frames, grad_sums,
                                         settings.mag_distance == "L2")
    grad_mags = grad_feats if bank is None else grad_feats @ bank
    grad = example_magnitude_grad_op(spec_real, frames, params, grad_mags.contiguous())
    return torch.view_as_complex(grad)
