"""What the backends share: input dtypes, what ``combined_loss`` returns, and the assembly of
the combined loss from a backend's term functions."""

from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch

from ..mrstft import MRSTFTSettings

LOSS_KEYS = ("total_loss", "stft_loss", "mag_recon_loss", "if_recon_loss", "kl_loss",
             "recon_loss")

# What every backend's ``combined_loss`` returns: the six losses by name, and the guard's
# decision (0-dim, true/nonzero where the total was finite) for ``distill_fused.nonfinite``.
Combined = Tuple[Dict[str, torch.Tensor], torch.Tensor]

StftTerm = Union[MRSTFTSettings, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def assemble_combined_loss(recon, target, mu, logvar, config, kl_weight, stft: StftTerm, *,
                           recon_terms, free_bits_kl, mrstft_loss) -> Combined:
    """The combined loss from a backend's term functions, each computed in the dtype of the
    result (``compute_dtype`` of all four inputs, as the reference computes it), so that every
    output has that one dtype. No value is read back to the host."""
    dtype = compute_dtype(recon, target, mu, logvar)
    # One cast per input (none where it has the dtype already), before the terms split: each
    # input's gradient is then summed over the terms in ``dtype`` and rounded to the input's own
    # dtype once, as the reference rounds it (casting per term would add half-precision
    # gradients, rounded apart, and lose the digits where they cancel).
    recon, target, mu, logvar = (t.to(dtype) for t in (recon, target, mu, logvar))
    batch = recon.shape[0]

    mag_loss, if_loss = recon_terms(recon, target, dtype)
    rc = config.reconstruction
    recon_loss = rc.weight * (rc.magnitude_weight * mag_loss + rc.if_weight * if_loss)

    x = recon[:, 0].reshape(batch, 1, -1)
    y = target[:, 0].reshape(batch, 1, -1)
    if isinstance(stft, MRSTFTSettings):
        stft_loss = mrstft_loss(x.to(dtype), y.to(dtype), stft, clamped=True)
    else:
        stft_loss = stft(x.to(dtype), y.to(dtype)).to(dtype).clamp_min(0.0)

    kl_loss = free_bits_kl(mu, logvar, config.kl.free_bits, dtype)

    total = config.stft.weight * stft_loss + recon_loss
    if isinstance(kl_weight, torch.Tensor):
        total = total + torch.where(kl_weight > 0, kl_weight * kl_loss, 0.0)
    elif kl_weight > 0:
        total = total + kl_weight * kl_loss
    finite = torch.isfinite(total)
    total = torch.where(finite, total, recon_loss)
    return dict(zip(LOSS_KEYS, (total, stft_loss, mag_loss, if_loss, kl_loss, recon_loss))), finite
