"""A small deterministic VAE (stand-in for the application's ``ConvVAE``): the latent is the
posterior mean, so that two runs see the same numbers."""

from __future__ import annotations

import torch


class TinyVAE(torch.nn.Module):
    def __init__(self, height: int, width: int, latent_dim: int):
        super().__init__()
        self.shape = (2, height, width)
        numel = 2 * height * width
        self.encoder = torch.nn.Linear(numel, 2 * latent_dim)
        self.decoder = torch.nn.Linear(latent_dim, numel)

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=1)
        recon = x + 0.1 * self.decoder(mu).view(x.shape[0], *self.shape)
        return recon, mu, logvar
