"""The two-channel spectrograms ``[B, 2, H, W]`` (magnitude, IF) as the kernels read and write
them: in place, any strides, no copy.

An element is a flat index ``i`` over ``[B, H, W]`` (``N = B*H*W`` of them a channel); in a
tensor of strides ``(s_b, s_c, s_h, s_w)`` its channel ``c`` lies at::

    b = i // (H*W),  h = (i - b*H*W) // W,  w = i - b*H*W - h*W
    offset = b*s_b + c*s_c + h*s_h + w*s_w

(divisions by multiply-shift, ``_common.divide``, with the magic numbers of ``geometry``).
Gradients are written contiguous ``[B, 2, H, W]``: channel 0 of ``i`` at ``i + b*H*W``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import divide, magic


def geometry(recon: torch.Tensor):
    """``(N, hw, magic(hw), width, magic(width))`` of ``[B, 2, H, W]``, as the kernels take
    them (``hw, hw_m, hw_s, width, width_m, width_s`` after N)."""
    b, _, h, w = recon.shape
    return b * h * w, h * w, *magic(h * w), w, *magic(w)


@triton.jit
def tile_start(tile, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """The first flat index of tile ``tile`` (of ``BLOCK``), in the index dtype."""
    if WIDE:
        return tile.to(tl.int64) * BLOCK
    else:
        return tile * BLOCK


@triton.jit
def _offsets(index, hw, hw_m, hw_s, width, width_m, width_s, s_b, s_h, s_w, WIDE: tl.constexpr):
    """Element offset of flat index ``index`` (over ``[B, H, W]``) in a strided tensor
    (``hw_m, hw_s``: ``magic(hw)``; ``width_m, width_s``: ``magic(width)``)."""
    b = divide(index, hw, hw_m, hw_s, WIDE)
    rest = index - b * hw
    h = divide(rest, width, width_m, width_s, WIDE)
    return b * s_b + h * s_h + (rest - h * width) * s_w


@triton.jit
def load_channels(
    recon_ptr,
    target_ptr,
    index,
    mask,
    # the geometry of [B, 2, H, W]: H*W and W with their magic numbers, then the strides
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
    ACC: tl.constexpr,
    WIDE: tl.constexpr,
):
    """``rm, ri, tm, ti`` at flat indices ``index`` over ``[B, H, W]``, as ``ACC``."""
    r_off = _offsets(index, hw, hw_m, hw_s, width, width_m, width_s, r_sb, r_sh, r_sw, WIDE)
    t_off = _offsets(index, hw, hw_m, hw_s, width, width_m, width_s, t_sb, t_sh, t_sw, WIDE)
    rm = tl.load(recon_ptr + r_off, mask=mask, other=0.0).to(ACC)
    ri = tl.load(recon_ptr + r_off + r_sc, mask=mask, other=0.0).to(ACC)
    tm = tl.load(target_ptr + t_off, mask=mask, other=0.0).to(ACC)
    ti = tl.load(target_ptr + t_off + t_sc, mask=mask, other=0.0).to(ACC)
    return rm, ri, tm, ti


@triton.jit
def store_recon_grads(
    grad_recon_ptr,
    grad_target_ptr,
    index,
    mask,
    hw,
    hw_m,
    hw_s,
    grad_rm,
    grad_ri,
    grad_tm,
    GRAD_RECON: tl.constexpr,
    GRAD_TARGET: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Stores ``(d/drm, d/dri)`` into ``grad_recon`` and ``(d/dtm, -d/dri)`` into
    ``grad_target`` (where wanted), both contiguous ``[B, 2, H, W]``, at flat indices
    ``index`` over ``[B, H, W]``, in the buffers' dtypes."""
    out = index + divide(index, hw, hw_m, hw_s, WIDE) * hw  # channel 0 of (b, rest): b*2hw + rest
    if GRAD_RECON:
        dtype = grad_recon_ptr.dtype.element_ty
        tl.store(grad_recon_ptr + out, grad_rm.to(dtype), mask=mask)
        tl.store(grad_recon_ptr + out + hw, grad_ri.to(dtype), mask=mask)
    if GRAD_TARGET:
        dtype = grad_target_ptr.dtype.element_ty
        tl.store(grad_target_ptr + out, grad_tm.to(dtype), mask=mask)
        tl.store(grad_target_ptr + out + hw, (-grad_ri).to(dtype), mask=mask)
