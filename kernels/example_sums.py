"""The ``triton`` backend's sums for the per-example path (``per_example.TorchSums``'s
interface, ``backends/per_example.py``): the kernels of ``per_example.py`` for the default
terms, those of ``stft_options.py`` for auraloss's other options."""

from __future__ import annotations

from typing import Optional

import torch

from ..core.gradients import first_order_only
from ..core.settings import MRSTFTSettings
from . import stft_options
from ._common import device_constants
from .per_example import (
    example_recon_grad_op,
    example_recon_sums_op,
    example_spectral_grad_op,
    example_spectral_sums_op,
)


class _ReconSums(torch.autograd.Function):
    @staticmethod
    def forward(recon, target, lengths):
        return example_recon_sums_op(recon, target, lengths).sum(1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        recon, target, lengths = inputs
        ctx.save_for_backward(recon, target, lengths)

    @staticmethod
    def backward(ctx, grad_sums):
        recon, target, lengths = ctx.saved_tensors
        grad_target = ctx.needs_input_grad[1]
        with torch.no_grad():
            grad_recon, grad_tgt = example_recon_grad_op(
                recon, target, lengths, grad_sums.to(torch.float64).contiguous(), grad_target)
        grads = first_order_only("triton", (grad_recon if ctx.needs_input_grad[0] else None,
                                            grad_tgt if grad_target else None), (recon, target))
        return (*grads, None)


class TritonSums:
    """The ``triton`` backend's sums (``per_example.TorchSums``'s interface)."""

    name = "triton"

    @staticmethod
    def spectral(spec: torch.Tensor, frames: torch.Tensor, settings: MRSTFTSettings,
                 index: int, cropped: bool = True) -> torch.Tensor:
        """(The kernels mask the frames whether or not ``cropped``.)"""
        if not settings.plain:
            return stft_options.spectral_sums(spec, frames, settings, index)
        params = device_constants((settings.eps,), spec.device)
        return example_spectral_sums_op(torch.view_as_real(spec), frames, params).sum(1)

    @staticmethod
    def spectral_grad(spec: torch.Tensor, frames: torch.Tensor, settings: MRSTFTSettings,
                      index: int, grad_sums: torch.Tensor, cropped: bool = True
                      ) -> torch.Tensor:
        if not settings.plain:
            return stft_options.spectral_grad(spec, frames, settings, index, grad_sums)
        params = device_constants((settings.eps,), spec.device)
        grad = example_spectral_grad_op(torch.view_as_real(spec), frames, params, grad_sums)
        return torch.view_as_complex(grad)

    @staticmethod
    def recon(recon: torch.Tensor, target: torch.Tensor,
              lengths: Optional[torch.Tensor]) -> torch.Tensor:
        return _ReconSums.apply(recon, target, lengths)
