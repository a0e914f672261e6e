"""distill_fused: the training loss of 2-channel (magnitude + IF) spectrogram VAEs, exact and
fused: the same names, numbers and gradients as the auraloss-based loss module of the
application it serves (a package named ``distill``), installable beside it.

Adopt it by importing these functions in place of the application's own, or with one call,
``patch_distill()``, which puts them into ``distill.models.losses`` (``unpatch_distill()``
undoes it).
"""

from .config import KLLossConfig, LossConfig, ReconLossConfig, STFTLossConfig
from .losses import (compute_combined_loss, compute_kl_divergence, create_stft_loss,
                     get_kl_weight, vae_loss)
from .mrstft import MultiResolutionSTFTLoss
from .nonfinite import (nonfinite_count, reset_nonfinite_count, set_nonfinite_mode)
from .patch import patch_distill, unpatch_distill

__version__ = "0.2.0"

__all__ = [
    "compute_combined_loss", "create_stft_loss", "vae_loss", "get_kl_weight",
    "compute_kl_divergence", "MultiResolutionSTFTLoss",
    "LossConfig", "STFTLossConfig", "ReconLossConfig", "KLLossConfig",
    "set_nonfinite_mode", "nonfinite_count", "reset_nonfinite_count",
    "patch_distill", "unpatch_distill",
]
