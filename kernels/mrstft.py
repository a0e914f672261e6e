"""The multi-resolution STFT loss on the ``triton`` backend: Triton kernels around
``torch.fft`` (cuFFT), in order, and its ``autograd.Function``.

For signals ``x`` (input) and ``y`` (target), ``S`` rows of ``T`` samples (auraloss's
definition; the math of each stage, with its derivative, heads the module that computes it)::

    frames = frame(x), frame(y)           every resolution     stft_frames._frame_kernel
    X, Y   = rfft(frames)                 one per FFT group    torch.fft (cuFFT)
    MRSTFT, (a_r, b_r, c_log, c_lin)      sums, then epilogue  stft_spectral (two launches)
    G      = dMRSTFT/dX, dMRSTFT/dY       over X, Y in place   stft_spectral._spectral_grad_kernel
    dframe = irfft(G, norm="forward")     over the frames      torch.fft (cuFFT)
    dx, dy = frame^T(dframe)              the adjoint          stft_frames._frames_adjoint_kernel

The gradient is computed in the forward pass: the spectra are freed at its end and only a
``[S, T]`` gradient is kept for backward, which scales it by the incoming gradient
(``core.gradients.gated_grad``). Where every buffer lies, and how the FFTs are grouped
(``per_resolution``, the default, or ``shared``): ``stft_plan.py``. Index math is 32-bit,
its divisions a multiply and a shift by host-computed magic numbers (``_common.divide``),
unless a buffer passes ``_common.INDEX_LIMIT`` elements (``WIDE``: 64-bit indices and
divisions).
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..core.gradients import first_order_only, gated_grad
from ..core.outputs import compute_dtype
from .stft_frames import frame_signals, stft_frames_adjoint_op
from .stft_plan import STFTPlan, make_plan, stft_dtype
from .stft_spectral import mrstft_reduce_op, stft_spectral_grad_op

# --------------------------------------------------------------------------------------------
# The FFT steps between the kernels, and the stages in order
# --------------------------------------------------------------------------------------------

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


def spectral_loss(spec: torch.Tensor, plan: STFTPlan) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(MRSTFT, gradient scalars [R, 4])`` of the spectra (``mrstft_reduce_op``)."""
    return mrstft_reduce_op(spec, plan.meta, plan.params, plan.signals, plan.n_res,
                            plan.spec_programs, plan.partial_tile, list(plan.use_terms),
                            plan.wide)


def signal_gradient(spec, frames, scalars, plan: STFTPlan, grad_x: bool,
                    grad_y: bool) -> torch.Tensor:
    """``dMRSTFT/dsignal`` for the x rows, the y rows or both (``[rows, T]``), from the spectra
    and the epilogue's scalars. Overwrites ``spec`` and ``frames``."""
    stft_spectral_grad_op(spec, plan.meta, scalars, plan.params, plan.signals, plan.n_res,
                          plan.grad_tiles, plan.grad_tile, grad_x, grad_y,
                          list(plan.use_terms), plan.wide)
    sides = slice(0 if grad_x else 1, 2 if grad_y else 1)
    inverse_into_frames(spec, frames, plan, sides)
    return stft_frames_adjoint_op(frames, plan.meta, plan.windows, plan.n_res, plan.signals,
                                  plan.length, sides.start, sides.stop - sides.start,
                                  plan.max_cover, plan.adjoint_block, plan.wide)


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
    def forward(x, y, settings, fft_grouping, grad_x, grad_y, clamped):
        dtype = compute_dtype(x, y)
        signals, length = x.shape[0] * x.shape[1], x.shape[2]
        plan = make_plan(settings, signals, length, x.device, stft_dtype(dtype, fft_grouping),
                         fft_grouping)
        frames, spec = frame_signals(x, y, _signal_rows_layout(x), _signal_rows_layout(y),
                                     plan)
        spec = spectra_of(frames, spec, plan)
        loss, scalars = spectral_loss(spec, plan)
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
        grad = gated_grad(grad, grad_output, loss)
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            gx, gy = grad.chunk(2)
        else:
            gx, gy = (grad, None) if ctx.needs_input_grad[0] else (None, grad)
        grads = (None if gx is None else gx.view(shape).to(x_dtype),
                 None if gy is None else gy.view(shape).to(y_dtype))
        return (*first_order_only("triton", grads, (x, y)), None, None, None, None, None)


def mrstft_loss(x: torch.Tensor, y: torch.Tensor, settings, *,
                fft_grouping: str = "per_resolution", clamped: bool = False) -> torch.Tensor:
    """MRSTFT of ``[B, C, T]`` tensors of any strides and float dtypes (see the docstring), or
    ``max(MRSTFT, 0)`` with ``clamped``, its FFTs grouped by ``fft_grouping``
    (``stft_plan.fft_groups``); no gradient is computed under ``torch.no_grad()``."""
    grad_x, grad_y = (torch.is_grad_enabled() and t.requires_grad for t in (x, y))
    loss, _, _ = _MRSTFTLoss.apply(x, y, settings, fft_grouping, grad_x, grad_y, clamped)
    return loss
