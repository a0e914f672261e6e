"""The ``triton`` backend: Triton kernels (``distill_fused.kernels``) for CUDA tensors, and for
CPU tensors under ``TRITON_INTERPRET=1``. Importing this module imports Triton; the backend
selection treats an ``ImportError`` here as "not available".

``compute_combined_loss`` runs as one fused path (``distill_fused.kernels.combined``); a callable
``_stft_loss_fn`` or a ``kl_weight`` tensor that requires grad takes the modular path instead
(the fused reconstruction and KL ops, the callable called as given, the terms assembled in
torch).
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (fail here, at selection, when Triton is missing)

from ..kernels import combined
from ..kernels.kl import free_bits_kl
from ..kernels.recon import recon_terms
from ..kernels.stft import mrstft_loss
from ..mrstft import MRSTFTSettings
from .common import Combined, assemble_combined_loss

name = "triton"


def combined_loss(recon, target, mu, logvar, config, kl_weight, stft) -> Combined:
    kl_weight_needs_grad = isinstance(kl_weight, torch.Tensor) and kl_weight.requires_grad
    if isinstance(stft, MRSTFTSettings) and not kl_weight_needs_grad:
        return combined.combined_loss(recon, target, mu, logvar, stft, config, kl_weight)
    return assemble_combined_loss(recon, target, mu, logvar, config, kl_weight, stft,
                                  recon_terms=recon_terms, free_bits_kl=free_bits_kl,
                                  mrstft_loss=mrstft_loss)
