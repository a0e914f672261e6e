"""The ``triton`` backend: Triton kernels (``distill.kernels``) for CUDA tensors, and for CPU
tensors under ``TRITON_INTERPRET=1``. Importing this module imports Triton; the backend
selection treats an ``ImportError`` here as "not available".

Now: the reconstruction terms and the free-bits KL are fused kernels; the STFT term is the
torch backend's (``torch.stft`` with closed-form gradients).
"""

from __future__ import annotations

import triton  # noqa: F401  (fail here, at selection, when Triton is missing)

from distill.kernels.kl import free_bits_kl
from distill.kernels.recon import recon_terms
from distill.kernels.stft import mrstft_loss

from .common import assemble_combined_loss

name = "triton"


def combined_loss(recon, target, mu, logvar, config, kl_weight, stft):
    return assemble_combined_loss(recon, target, mu, logvar, config, kl_weight, stft,
                                  recon_terms=recon_terms, free_bits_kl=free_bits_kl,
                                  mrstft_loss=mrstft_loss)
