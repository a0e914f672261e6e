"""The ``reference`` backend: auraloss 0.4.0 plus plain torch, exactly the seed computation.

It is the correctness oracle of the tests and the baseline of every benchmark. It reads the
finiteness of the total back to the host (one sync per step), as the seed code did.
"""

from __future__ import annotations

import auraloss
import torch

from ..core.outputs import LOSS_KEYS, Combined, compute_dtype
from ..core.settings import MRSTFTSettings


def auraloss_module(settings: MRSTFTSettings) -> auraloss.freq.MultiResolutionSTFTLoss:
    """The auraloss module computing ``settings`` (built once per settings object)."""
    module = settings.cache.get("auraloss")
    if module is None:
        module = auraloss.freq.MultiResolutionSTFTLoss(
            fft_sizes=[r.n_fft for r in settings.resolutions],
            hop_sizes=[r.hop for r in settings.resolutions],
            win_lengths=[r.win_length for r in settings.resolutions],
            w_sc=settings.w_sc, w_log_mag=settings.w_log_mag, w_lin_mag=settings.w_lin_mag,
            eps=settings.eps,
        )
        for loss, window in zip(module.stft_losses, settings.windows):
            loss.window = window
        settings.cache["auraloss"] = module
    return module


def mrstft_loss(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings, *,
                fft_grouping: str = "per_resolution", clamped: bool = False) -> torch.Tensor:
    """auraloss's MRSTFT (``torch.stft`` per resolution: ``fft_grouping`` does not apply), or
    ``max(MRSTFT, 0)`` with ``clamped``."""
    dtype = compute_dtype(x, y)
    loss = auraloss_module(settings)(x.to(dtype), y.to(dtype))
    return torch.clamp(loss, min=0.0) if clamped else loss


def combined_loss(recon, target, mu, logvar, config, kl_weight, stft, *,
                  fft_grouping: str = "per_resolution") -> Combined:
    """The seed's computation, line for line (``fft_grouping`` does not apply)."""
    dtype = compute_dtype(recon, target, mu, logvar)
    recon, target, mu, logvar = (t.to(dtype) for t in (recon, target, mu, logvar))
    batch = recon.shape[0]
    rm, ri = recon[:, 0], recon[:, 1]
    tm, ti = target[:, 0], target[:, 1]

    mag_recon_loss = torch.nn.functional.l1_loss(rm, tm)
    if_weight = tm / (tm.mean() + 1e-8)
    if_recon_loss = (torch.abs(ri - ti) * if_weight).mean()
    rc = config.reconstruction
    recon_loss = rc.weight * (rc.magnitude_weight * mag_recon_loss
                              + rc.if_weight * if_recon_loss)

    stft_fn = auraloss_module(stft) if isinstance(stft, MRSTFTSettings) else stft
    stft_loss = stft_fn(rm.reshape(batch, 1, -1), tm.reshape(batch, 1, -1)).to(dtype)
    stft_loss = torch.clamp(stft_loss, min=0.0)

    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    kl = torch.clamp(kl, min=config.kl.free_bits)
    kl_loss = kl.sum(dim=1).mean()

    total_loss = config.stft.weight * stft_loss + recon_loss
    if kl_weight > 0:
        total_loss = total_loss + kl_weight * kl_loss
    finite = torch.isfinite(total_loss)
    if not finite:
        total_loss = recon_loss
    return dict(zip(LOSS_KEYS, (total_loss, stft_loss, mag_recon_loss, if_recon_loss, kl_loss,
                                recon_loss))), finite
