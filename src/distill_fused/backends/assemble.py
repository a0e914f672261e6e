"""The combined loss assembled from a backend's three term functions (the ``torch`` backend,
and the ``triton`` backend's modular path)."""

from __future__ import annotations

from typing import Callable, Union

import torch

from ..core.outputs import LOSS_KEYS, Combined, compute_dtype
from ..core.settings import MRSTFTSettings

# The STFT term: the settings a fast backend computes, or a callable called as given.
StftTerm = Union[MRSTFTSettings, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def assemble_combined_loss(recon, target, mu, logvar, config, kl_weight, stft: StftTerm, *,
                           recon_terms, free_bits_kl, mrstft_loss, fft_grouping: str
                           ) -> Combined:
    """The combined loss from a backend's term functions, each computed in the dtype of the
    result (``compute_dtype`` of all four inputs, as the reference computes it), so that every
    output has that one dtype. No value is read back to the host.

    ``recon_terms`` returns its two sums unrounded (float64 where the device has it): the
    weighted sums ``recon_loss`` and ``total_loss`` are formed at that precision and each
    output is rounded once. (The IF term is negative where the target's magnitudes are, and
    ``recon_loss`` or the total can then cancel to a small fraction of their terms: formed from
    float32-rounded terms they would lose the digits the float64 oracle keeps.)"""
    dtype = compute_dtype(recon, target, mu, logvar)
    # One cast per input (none where it has the dtype already), before the terms split: each
    # input's gradient is then summed over the terms in ``dtype`` and rounded to the input's own
    # dtype once, as the reference rounds it (casting per term would add half-precision
    # gradients, rounded apart, and lose the digits where they cancel).
    recon, target, mu, logvar = (t.to(dtype) for t in (recon, target, mu, logvar))
    batch = recon.shape[0]

    mag_sum, if_sum = recon_terms(recon, target)
    wide = mag_sum.dtype
    rc = config.reconstruction
    recon_wide = rc.weight * (rc.magnitude_weight * mag_sum + rc.if_weight * if_sum)

    x = recon[:, 0].reshape(batch, 1, -1)
    y = target[:, 0].reshape(batch, 1, -1)
    if isinstance(stft, MRSTFTSettings):
        stft_loss = mrstft_loss(x, y, stft, fft_grouping=fft_grouping, clamped=True)
    else:
        stft_loss = stft(x, y).to(dtype).clamp_min(0.0)

    kl_loss = free_bits_kl(mu, logvar, config.kl.free_bits, dtype)

    total = config.stft.weight * stft_loss.to(wide) + recon_wide
    if isinstance(kl_weight, torch.Tensor):
        total = total + torch.where(kl_weight > 0, kl_weight * kl_loss.to(wide), 0.0)
    elif kl_weight > 0:
        total = total + kl_weight * kl_loss.to(wide)
    total, recon_loss = total.to(dtype), recon_wide.to(dtype)
    finite = torch.isfinite(total)
    total = torch.where(finite, total, recon_loss)
    losses = (total, stft_loss, mag_sum.to(dtype), if_sum.to(dtype), kl_loss, recon_loss)
    return dict(zip(LOSS_KEYS, losses)), finite
