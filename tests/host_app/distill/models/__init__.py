"""Neural network model definitions (stand-in: the loss re-exports of the application's
``distill.models``, and a small VAE in place of its ``ConvVAE``)."""

from distill.models.losses import (
    compute_combined_loss,
    compute_kl_divergence,
    create_stft_loss,
    get_kl_weight,
    vae_loss,
)
from distill.models.vae import TinyVAE

__all__ = [
    "TinyVAE",
    "vae_loss",
    "compute_combined_loss",
    "create_stft_loss",
    "get_kl_weight",
    "compute_kl_divergence",
]
