"""distill_fused: the training loss of 2-channel (magnitude + IF) spectrogram VAEs, exact and
fused: the same names, numbers and gradients as the auraloss-based loss module of the
application it serves (a package named ``distill``), installable beside it.

Adopt it by importing these functions in place of the application's own, or with one call,
``patch_distill()``, which puts them into ``distill.models.losses`` (``unpatch_distill()``
undoes it).

The layers, each importing only those below it: ``api`` (what users call) -> ``dispatch``
(which backend) -> ``backends`` -> ``kernels`` (Triton), with ``core`` (configuration, settings,
gradient rules) beneath them all. See ``docs/architecture.md``.
"""

from .api.losses import (
                         compute_combined_loss,
                         compute_kl_divergence,
                         create_stft_loss,
                         get_kl_weight,
                         vae_loss,
)
from .api.nonfinite import nonfinite_count, reset_nonfinite_count, set_nonfinite_mode
from .api.patch import patch_distill, unpatch_distill
from .api.stft_module import ChromaSTFTLoss, MelSTFTLoss, MultiResolutionSTFTLoss, STFTLoss
from .core.config import KLLossConfig, LossConfig, ReconLossConfig, STFTLossConfig

__version__ = "0.2.0"

__all__ = [
    "compute_combined_loss", "create_stft_loss", "vae_loss", "get_kl_weight",
    "compute_kl_divergence", "MultiResolutionSTFTLoss", "STFTLoss", "MelSTFTLoss",
    "ChromaSTFTLoss",
    "LossConfig", "STFTLossConfig", "ReconLossConfig", "KLLossConfig",
    "set_nonfinite_mode", "nonfinite_count", "reset_nonfinite_count",
    "patch_distill", "unpatch_distill",
]
