"""Loss functions of the spectrogram VAE."""
from .losses import (MultiResolutionSTFTLoss, compute_combined_loss, compute_kl_divergence,
                     create_stft_loss, get_kl_weight, vae_loss)

__all__ = ["compute_combined_loss", "create_stft_loss", "vae_loss", "get_kl_weight",
           "compute_kl_divergence", "MultiResolutionSTFTLoss"]
