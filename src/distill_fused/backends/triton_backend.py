"""The ``triton`` backend: Triton kernels (``distill_fused.kernels``) for CUDA tensors, and for
CPU tensors under ``TRITON_INTERPRET=1``. Importing this module imports Triton; the backend
selection treats an ``ImportError`` here as "not available".

``compute_combined_loss`` runs as one fused path (``kernels/combined.py``); a callable
``_stft_loss_fn`` or a ``kl_weight`` tensor that requires grad takes the modular path instead
(the fused reconstruction and KL ops, the callable called as given, the terms assembled in
torch by ``assemble.py``). ``reduction``, ``lengths`` and per-resolution terms or weights take
the per-example path (``per_example.py``) with the per-example sums of
``kernels/example_sums.py``.
"""

from __future__ import annotations

from functools import partial

import torch
import triton  # noqa: F401  (fail here, at selection, when Triton is missing)

from ..core.outputs import Combined
from ..core.settings import MRSTFTSettings
from ..kernels import combined
from ..kernels.example_sums import TritonSums
from ..kernels.kl import free_bits_kl
from ..kernels.mrstft import mrstft_loss
from ..kernels.recon import recon_terms
from . import per_example
from .assemble import assemble_combined_loss


def combined_loss(recon, target, mu, logvar, config, kl_weight, stft, *,
                  fft_grouping: str = "per_resolution") -> Combined:
    kl_weight_needs_grad = isinstance(kl_weight, torch.Tensor) and kl_weight.requires_grad
    if isinstance(stft, MRSTFTSettings) and not kl_weight_needs_grad:
        return combined.combined_loss(recon, target, mu, logvar, stft, config, kl_weight,
                                      fft_grouping)
    return assemble_combined_loss(recon, target, mu, logvar, config, kl_weight, stft,
                                  recon_terms=recon_terms, free_bits_kl=free_bits_kl,
                                  mrstft_loss=mrstft_loss, fft_grouping=fft_grouping)


combined_loss_per_example = partial(per_example.combined_loss, sums=TritonSums)
mrstft_loss_per_example = partial(per_example.mrstft_loss, sums=TritonSums)


__all__ = ["combined_loss", "mrstft_loss", "combined_loss_per_example",
           "mrstft_loss_per_example"]
