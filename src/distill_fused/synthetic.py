"""Synthetic VAE batches for the tests, the demo and the benchmarks.

``realistic_batch`` imitates what a training step sees: a log-mel-like magnitude channel
(non-negative, harmonic stacks over a spectral tilt, note onsets and near-silent stretches),
an instantaneous-frequency channel in [-1, 1], a reconstruction that is the target plus a
model's error, and a posterior's ``mu``/``logvar``. ``noise_batch`` is plain Gaussian noise.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _generator(seed: Optional[int]) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "little"))
    return g


def realistic_batch(batch: int = 32, height: int = 128, width: int = 94, latent_dim: int = 128,
                    dtype=torch.float32, device="cpu", seed: Optional[int] = None) -> Batch:
    """``recon, target`` ``[batch, 2, height, width]`` and ``mu, logvar`` ``[batch, latent_dim]``.
    Generated in float64 on the CPU (reproducible for a seed), then cast and moved."""
    g = _generator(seed)
    f64 = torch.float64
    freq = torch.linspace(0, 1, height, dtype=f64)[None, :, None]
    time = torch.linspace(0, 1, width, dtype=f64)[None, None, :]

    # Harmonic stacks: a fundamental per item, Gaussian bumps at its multiples (mel-ish warp).
    f0 = 0.02 + 0.08 * torch.rand(batch, 1, 1, generator=g, dtype=f64)
    harmonics = torch.arange(1, 13, dtype=f64)[None, :, None, None]
    centres = torch.sqrt((f0[:, None] * harmonics).clamp(max=1.0))
    bumps = torch.exp(-((freq[:, None] - centres) / 0.01) ** 2) / harmonics
    spectrum = bumps.sum(1) * torch.exp(-3.0 * freq)  # [batch, height, 1]

    # Notes: random onsets with exponential decays, and some near-silent frames.
    onsets = torch.rand(batch, 4, 1, generator=g, dtype=f64)
    since = (time - onsets).clamp(min=0)
    envelope = ((time >= onsets) * torch.exp(-4.0 * since)).sum(1, keepdim=True)
    level = 10 ** (3 * torch.rand(batch, 1, 1, generator=g, dtype=f64))
    noise_floor = 1e-3 * torch.rand(batch, height, width, generator=g, dtype=f64)
    power = level * spectrum * envelope + noise_floor
    target_mag = torch.log1p(power)

    phase_rate = torch.randn(batch, height, 1, generator=g, dtype=f64)
    target_if = torch.tanh(phase_rate + 0.3 * torch.randn(batch, height, width, generator=g,
                                                          dtype=f64))
    target = torch.stack([target_mag, target_if], dim=1)

    error = torch.randn(batch, 2, height, width, generator=g, dtype=f64)
    recon = target + 0.1 * error * (1 + target.abs())
    mu = 0.8 * torch.randn(batch, latent_dim, generator=g, dtype=f64)
    logvar = -1.0 + 0.7 * torch.randn(batch, latent_dim, generator=g, dtype=f64)
    return tuple(t.to(device=device, dtype=dtype) for t in (recon, target, mu, logvar))


def noise_batch(batch: int = 4, height: int = 16, width: int = 64, latent_dim: int = 8,
                dtype=torch.float32, device="cpu", seed: Optional[int] = None) -> Batch:
    """Standard Gaussian ``recon, target, mu, logvar`` (the magnitude channel may be negative)."""
    g = _generator(seed)
    shapes = [(batch, 2, height, width)] * 2 + [(batch, latent_dim)] * 2
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
                 for s in shapes)
