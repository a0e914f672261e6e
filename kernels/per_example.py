"""Per-example sums of the ``triton`` backend's per-example path (``backends/per_example.py``:
``reduction="none"``/``"sum"``, ``lengths``, per-resolution terms and weights): the
per-tile partials of ``stft_spectral.py`` and ``recon.py``, kept apart per example.

Spectral sums, per example b over its first ``F_b`` frames (of every channel and bin), with
``Px = max(|X|^2, eps)``, ``Mx = sqrt(Px)`` (likewise for Y) and ``D = Mx - My``::

    s_b = (sum D^2, sum My^2, sum |ln Mx/My|, sum |D|)

and their derivatives, for incoming gradients ``g_b = (g0, g1, g2, g3)`` of the four sums::

    dL/dMx =  2 g0 D          + g2 sign(ln Mx/My) / Mx + g3 sign(D)
    dL/dMy = -2 g0 D + 2 g1 My - g2 sign(ln Mx/My) / My - g3 sign(D)
    dL/dX  = dL/dMx X / Mx   where |X|^2 >= eps, else 0 (the clamp holds; likewise Y)

and 0 on every frame past ``F_b`` (not part of the example's signal).

Reconstruction sums, per example b over its valid elements (``w < L_b``)::

    q_b = (sum |rm - tm|, sum |ri - ti| tm, sum tm)       (each element's term in fp64)

    d/drm = h0 sign(rm - tm)              d/dtm = -h0 sign(rm - tm) + h1 |ri - ti| + h2
    d/dri = h1 sign(ri - ti) tm           d/dti = -h1 sign(ri - ti) tm

for incoming gradients ``h_b = (h0, h1, h2)`` (fp64: the IF gradient ``h1 |ri - ti| + h2`` is
a difference of near-equal values where the IF term's two sums are close), 0 on padding.

The sums run in two stages: ``B P`` programs, program ``b P + p`` summing tiles ``p, p + P,
...`` of example b's elements into ``partials[b, p]``, then a fixed-order ``sum`` over ``p``
in torch: deterministic, no atomics. The gradients: ``B T`` programs, one per tile of an
example, each element written once. (One grid axis: CUDA bounds the others at 65535.)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import empty, is_wide, kernel_op, signum, tl_dtype, wrap_triton
from .stft_spectral import _magnitudes, spectral_terms

BLOCK = 1024
# Programs per example of the sums: with the batch, enough to fill an H100's 132 SMs four
# times over (as ``stft_plan.PARTIAL_PROGRAMS``).
SUM_PROGRAMS = 528


@triton.jit
def example_tile(frames_ptr, per_example, width, n_frames, n_examples, n_tiles,
                 BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Program ``b T + t`` of a per-example map over ``[2B, C, F, width]`` (x's examples, then
    y's): ``(b, in_range, valid, x_index, y_index)`` of tile t of example b's ``C F width``
    elements, ``valid`` where the element's frame is one of example b's first ``F_b``."""
    b = tl.program_id(0) // n_tiles  # once per program
    start = (tl.program_id(0) - b * n_tiles) * BLOCK
    if WIDE:
        b = b.to(tl.int64)
        start = start.to(tl.int64)
    e = start + tl.arange(0, BLOCK)
    in_range = e < per_example
    valid = in_range & ((e // width) % n_frames < tl.load(frames_ptr + b))
    return b, in_range, valid, b * per_example + e, (n_examples + b) * per_example + e


@triton.jit
def store_sums(out, first, second, third, fourth):
    """The four per-program partial sums at ``out``: one slot per program, in range by
    construction (``B P`` programs)."""
    tl.store(out, tl.sum(first, axis=0))
    tl.store(out + 1, tl.sum(second, axis=0))
    tl.store(out + 2, tl.sum(third, axis=0))
    tl.store(out + 3, tl.sum(fourth, axis=0))


@triton.jit(do_not_specialize=["n_examples"])
def _example_spectral_sums_kernel(
    # the spectra [2B, C, F, bins] as real pairs (x's examples, then y's); valid frames [B]
    spec_ptr,
    frames_ptr,
    params_ptr,
    per_example,
    bins,
    n_frames,
    n_examples,
    # the output: [B, P, 4] partial sums
    partials_ptr,
    n_programs,
    # compile-time
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """``partials[b, p] = s_b = (sum D^2, sum My^2, sum |ln Mx/My|, sum |D|)`` over tiles
    ``p, p + P, ...`` of example b's ``C F bins`` elements, those of frames ``f < F_b`` only
    (``Mx = sqrt(max(|X|^2, eps))``, ``D = Mx - My``). Program ``b P + p``."""
    b = tl.program_id(0) // n_programs  # once per program
    program = tl.program_id(0) - b * n_programs
    if WIDE:
        b = b.to(tl.int64)
    valid_frames = tl.load(frames_ptr + b)
    eps = tl.load(params_ptr).to(ACC)
    x_base = b * per_example
    y_base = (n_examples + b) * per_example
    sum_d2 = tl.zeros([BLOCK], dtype=ACC)
    sum_py = tl.zeros([BLOCK], dtype=ACC)
    sum_log = tl.zeros([BLOCK], dtype=ACC)
    sum_d = tl.zeros([BLOCK], dtype=ACC)
    start = program * BLOCK
    if WIDE:
        start = start.to(tl.int64)
    while start < per_example:  # a while loop, not range(): see _common.py
        e = start + tl.arange(0, BLOCK)
        frame = (e // bins) % n_frames
        mask = (e < per_example) & (frame < valid_frames)
        d2, py, log_ratio, d = spectral_terms(spec_ptr, x_base + e, y_base + e, mask, eps)
        sum_d2 += d2
        sum_py += py
        sum_log += log_ratio
        sum_d += d
        start += n_programs * BLOCK
    store_sums(partials_ptr + (b * n_programs + program) * 4, sum_d2, sum_py, sum_log, sum_d)


@triton.jit(do_not_specialize=["n_examples"])
def _example_spectral_grad_kernel(
    # the spectra (real pairs), valid frames [B], eps, the incoming gradients [B, 4]
    spec_ptr,
    frames_ptr,
    params_ptr,
    grad_sums_ptr,
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
    """``dL/dX = dL/dMx X / Mx`` (and likewise Y) over tile t of example b's elements, for the
    sums' gradients ``g_b``: ``dL/dMx = 2 g0 D + g2 sign(ln Mx/My) / Mx + g3 sign(D)``,
    ``dL/dMy = -2 g0 D + 2 g1 My - g2 sign(ln Mx/My) / My - g3 sign(D)``; 0 where
    ``|X|^2 < eps`` and on frames past ``F_b``. Program ``b T + t``."""
    b, in_range, valid, x_index, y_index = example_tile(
        frames_ptr, per_example, bins, n_frames, n_examples, n_tiles, BLOCK, WIDE)
    eps = tl.load(params_ptr).to(ACC)
    xre, xim, px, _, mx = _magnitudes(spec_ptr, x_index, valid, eps)
    yre, yim, py, _, my = _magnitudes(spec_ptr, y_index, valid, eps)
    g_d2 = tl.load(grad_sums_ptr + b * 4).to(ACC)
    g_py = tl.load(grad_sums_ptr + b * 4 + 1).to(ACC)
    g_log = tl.load(grad_sums_ptr + b * 4 + 2).to(ACC)
    g_d = tl.load(grad_sums_ptr + b * 4 + 3).to(ACC)
    diff = mx - my
    sign_log = signum(tl.log(mx / my))
    sign_d = signum(diff)
    d_mx = 2.0 * g_d2 * diff + g_log * sign_log / mx + g_d * sign_d
    d_my = -2.0 * g_d2 * diff + 2.0 * g_py * my - g_log * sign_log / my - g_d * sign_d
    coef_x = tl.where(valid & (px >= eps), d_mx / mx, 0.0)
    coef_y = tl.where(valid & (py >= eps), d_my / my, 0.0)
    tl.store(grad_ptr + 2 * x_index, coef_x * xre, mask=in_range)
    tl.store(grad_ptr + 2 * x_index + 1, coef_x * xim, mask=in_range)
    tl.store(grad_ptr + 2 * y_index, coef_y * yre, mask=in_range)
    tl.store(grad_ptr + 2 * y_index + 1, coef_y * yim, mask=in_range)


@triton.jit
def _example_recon_sums_kernel(
    # the inputs [B, 2, H, W], read in place, and each example's valid columns [B]
    recon_ptr,
    target_ptr,
    lengths_ptr,
    hw,
    width,
    r_sb,
    r_sc,
    r_sh,
    r_sw,
    t_sb,
    t_sc,
    t_sh,
    t_sw,
    # the output: [B, P, 3] partial sums (fp64)
    partials_ptr,
    n_programs,
    # compile-time
    HAS_LENGTHS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """``partials[b, p] = q_b = (sum |rm - tm|, sum |ri - ti| tm, sum tm)`` over tiles
    ``p, p + P, ...`` of example b's ``H W`` elements, columns ``w < L_b`` only; each term
    computed exactly in fp64 and summed there (the IF sums run over a signed ``tm`` and may
    cancel). Program ``b P + p``."""
    b = tl.program_id(0) // n_programs  # once per program
    program = tl.program_id(0) - b * n_programs
    if WIDE:
        b = b.to(tl.int64)
    if HAS_LENGTHS:
        valid_width = tl.load(lengths_ptr + b)
    else:
        valid_width = width
    s_mag = tl.zeros([BLOCK], dtype=tl.float64)
    s_if = tl.zeros([BLOCK], dtype=tl.float64)
    s_tm = tl.zeros([BLOCK], dtype=tl.float64)
    start = program * BLOCK
    if WIDE:
        start = start.to(tl.int64)
    while start < hw:  # a while loop, not range(): see _common.py
        e = start + tl.arange(0, BLOCK)
        h = e // width
        w = e - h * width
        mask = (e < hw) & (w < valid_width)
        r_off = b * r_sb + h * r_sh + w * r_sw
        t_off = b * t_sb + h * t_sh + w * t_sw
        rm = tl.load(recon_ptr + r_off, mask=mask, other=0.0).to(ACC).to(tl.float64)
        ri = tl.load(recon_ptr + r_off + r_sc, mask=mask, other=0.0).to(ACC).to(tl.float64)
        tm = tl.load(target_ptr + t_off, mask=mask, other=0.0).to(ACC).to(tl.float64)
        ti = tl.load(target_ptr + t_off + t_sc, mask=mask, other=0.0).to(ACC).to(tl.float64)
        s_mag += tl.abs(rm - tm)
        s_if += tl.abs(ri - ti) * tm
        s_tm += tm
        start += n_programs * BLOCK
    out = partials_ptr + (b * n_programs + program) * 3
    # One slot per program: in range by construction (B P programs).
    tl.store(out, tl.sum(s_mag, axis=0))
    tl.store(out + 1, tl.sum(s_if, axis=0))
    tl.store(out + 2, tl.sum(s_tm, axis=0))


@triton.jit
def _example_recon_grad_kernel(
    # the inputs (as the sums kernel), the incoming gradients [B, 3] (fp64)
    recon_ptr,
    target_ptr,
    lengths_ptr,
    grad_sums_ptr,
    hw,
    width,
    r_sb,
    r_sc,
    r_sh,
    r_sw,
    t_sb,
    t_sc,
    t_sh,
    t_sw,
    n_tiles,
    # the outputs: contiguous [B, 2, H, W] gradients
    grad_recon_ptr,
    grad_target_ptr,
    # compile-time
    HAS_LENGTHS: tl.constexpr,
    GRAD_TARGET: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """``d/drm = h0 sign(rm - tm)``, ``d/dri = h1 sign(ri - ti) tm``, ``d/dtm = -h0 sign(rm -
    tm) + h1 |ri - ti| + h2``, ``d/dti = -d/dri`` over tile t of example b's elements, for the
    sums' gradients ``h_b``, computed in fp64 and rounded once; exactly 0 on padding
    (``w >= L_b``). Program ``b T + t``."""
    b = tl.program_id(0) // n_tiles  # once per program
    start = (tl.program_id(0) - b * n_tiles) * BLOCK
    if WIDE:
        b = b.to(tl.int64)
        start = start.to(tl.int64)
    if HAS_LENGTHS:
        valid_width = tl.load(lengths_ptr + b)
    else:
        valid_width = width
    e = start + tl.arange(0, BLOCK)
    h = e // width
    w = e - h * width
    in_range = e < hw
    valid = in_range & (w < valid_width)
    r_off = b * r_sb + h * r_sh + w * r_sw
    t_off = b * t_sb + h * t_sh + w * t_sw
    rm = tl.load(recon_ptr + r_off, mask=valid, other=0.0).to(ACC).to(tl.float64)
    ri = tl.load(recon_ptr + r_off + r_sc, mask=valid, other=0.0).to(ACC).to(tl.float64)
    tm = tl.load(target_ptr + t_off, mask=valid, other=0.0).to(ACC).to(tl.float64)
    ti = tl.load(target_ptr + t_off + t_sc, mask=valid, other=0.0).to(ACC).to(tl.float64)
    g_mag = tl.load(grad_sums_ptr + b * 3)
    g_if = tl.load(grad_sums_ptr + b * 3 + 1)
    g_tm = tl.load(grad_sums_ptr + b * 3 + 2)
    grad_rm = tl.where(valid, g_mag * signum(rm - tm), 0.0)
    grad_ri = tl.where(valid, g_if * signum(ri - ti) * tm, 0.0)
    out_dtype = grad_recon_ptr.dtype.element_ty
    out = b * 2 * hw + e  # contiguous [B, 2, H, W]
    tl.store(grad_recon_ptr + out, grad_rm.to(out_dtype), mask=in_range)
    tl.store(grad_recon_ptr + out + hw, grad_ri.to(out_dtype), mask=in_range)
    if GRAD_TARGET:
        grad_tm = tl.where(valid, -grad_rm + g_if * tl.abs(ri - ti) + g_tm, 0.0)
        tl.store(grad_target_ptr + out, grad_tm.to(out_dtype), mask=in_range)
        tl.store(grad_target_ptr + out + hw, (-grad_ri).to(out_dtype), mask=in_range)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _programs(per_example: int, examples: int) -> int:
    """Programs per example of a sum: one per tile, at most ``SUM_PROGRAMS`` over the batch."""
    return max(1, min(triton.cdiv(per_example, BLOCK), triton.cdiv(SUM_PROGRAMS, examples)))


def _spectral_geometry(spec_real: torch.Tensor):
    """``(examples, elements per example, bins, frames)`` of ``[2B, C, F, bins, 2]``."""
    rows, channels, frames, bins, _ = spec_real.shape
    return rows // 2, channels * frames * bins, bins, frames


@kernel_op("distill_fused::example_spectral_sums", mutates_args=())
def example_spectral_sums_op(spec_real: torch.Tensor, frames: torch.Tensor,
                             params: torch.Tensor) -> torch.Tensor:
    """``[B, P, 4]`` partial spectral sums (one launch)."""
    examples, per_example, bins, n_frames = _spectral_geometry(spec_real)
    n_programs = _programs(per_example, examples)
    partials = empty((examples, n_programs, 4), spec_real.dtype, spec_real.device)
    wrap_triton(_example_spectral_sums_kernel)[(examples * n_programs,)](
        spec_real, frames, params, per_example, bins, n_frames, examples, partials, n_programs,
        ACC=tl_dtype(spec_real.dtype), BLOCK=BLOCK, WIDE=is_wide(2 * BLOCK, spec_real),
        num_warps=8)
    return partials


@kernel_op("distill_fused::example_spectral_grad", mutates_args=())
def example_spectral_grad_op(spec_real: torch.Tensor, frames: torch.Tensor,
                             params: torch.Tensor, grad_sums: torch.Tensor) -> torch.Tensor:
    """The spectra's gradient, real pairs ``[2B, C, F, bins, 2]`` (one launch)."""
    examples, per_example, bins, n_frames = _spectral_geometry(spec_real)
    grad = empty(spec_real.shape, spec_real.dtype, spec_real.device)
    # 16 warps in float64 (2 elements a thread): at 8 it takes 150 registers, one program a SM.
    n_tiles = triton.cdiv(per_example, BLOCK)
    wrap_triton(_example_spectral_grad_kernel)[(examples * n_tiles,)](
        spec_real, frames, params, grad_sums, per_example, bins, n_frames, examples, n_tiles,
        grad,
        ACC=tl_dtype(spec_real.dtype), BLOCK=BLOCK, WIDE=is_wide(2 * BLOCK, spec_real),
        num_warps=16 if spec_real.dtype == torch.float64 else 8)
    return grad


def _lengths_arg(lengths: Optional[torch.Tensor], recon: torch.Tensor) -> torch.Tensor:
    return recon if lengths is None else lengths


@kernel_op("distill_fused::example_recon_sums", mutates_args=())
def example_recon_sums_op(recon: torch.Tensor, target: torch.Tensor,
                          lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, P, 3]`` partial reconstruction sums, fp64 (one launch)."""
    batch, _, height, width = recon.shape
    n_programs = _programs(height * width, batch)
    partials = empty((batch, n_programs, 3), torch.float64, recon.device)
    wrap_triton(_example_recon_sums_kernel)[(batch * n_programs,)](
        recon, target, _lengths_arg(lengths, recon), height * width, width, *recon.stride(),
        *target.stride(), partials, n_programs, HAS_LENGTHS=lengths is not None,
        ACC=tl_dtype(recon.dtype), BLOCK=BLOCK, WIDE=is_wide(BLOCK, recon, target),
        num_warps=8)
    return partials


@kernel_op("distill_fused::example_recon_grad", mutates_args=())
def example_recon_grad_op(recon: torch.Tensor, target: torch.Tensor,
                          lengths: Optional[torch.Tensor], grad_sums: torch.Tensor,
                          grad_target: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients for ``recon`` and (``grad_target``) ``target``, contiguous, in their dtype."""
    batch, _, height, width = recon.shape
    grad_recon = empty(recon.shape, recon.dtype, recon.device)
    grad_tgt = empty(target.shape if grad_target else (0,), target.dtype, target.device)
    n_tiles = triton.cdiv(height * width, BLOCK)
    wrap_triton(_example_recon_grad_kernel)[(batch * n_tiles,)](
        recon, target, _lengths_arg(lengths, recon), grad_sums, height * width, width,
        *recon.stride(), *target.stride(), n_tiles, grad_recon, grad_tgt,
        HAS_LENGTHS=lengths is not None, GRAD_TARGET=grad_target, ACC=tl_dtype(recon.dtype),
        BLOCK=BLOCK, WIDE=is_wide(BLOCK, recon, target, grad_recon), num_warps=8)
    return grad_recon, grad_tgt
