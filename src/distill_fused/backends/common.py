"""What the backends share: input dtypes, what ``combined_loss`` returns, the assembly of the
combined loss (spec steps 3, 6 and 7) and the scaling of gradients saved by the forward pass."""

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


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor):
    """``grad * grad_output`` for a gradient saved by the forward pass, with a zero
    ``grad_output`` giving exactly zero: the non-finite guard (spec step 7) routes a zero
    gradient into every term but the reconstruction, and ``0 * nan`` must not reach an input."""
    if grad is None:
        return None
    return torch.where(grad_output != 0, grad * grad_output, torch.zeros_like(grad))


def assemble_combined_loss(recon, target, mu, logvar, config, kl_weight, stft: StftTerm, *,
                           recon_terms, free_bits_kl, mrstft_loss) -> Combined:
    """Spec steps 1-7 from a backend's term functions, which take the inputs in their own
    dtypes and return float32 (float64 for float64 inputs). No value is read back to the host."""
    dtype = compute_dtype(recon, target, mu, logvar)
    batch = recon.shape[0]

    mag_loss, if_loss = recon_terms(recon, target)
    rc = config.reconstruction
    recon_loss = rc.weight * (rc.magnitude_weight * mag_loss + rc.if_weight * if_loss)

    x = recon[:, 0].reshape(batch, 1, -1)
    y = target[:, 0].reshape(batch, 1, -1)
    if isinstance(stft, MRSTFTSettings):
        stft_loss = mrstft_loss(x, y, stft)
    else:
        stft_loss = stft(x.to(dtype), y.to(dtype)).to(dtype)
    stft_loss = stft_loss.clamp_min(0.0)

    kl_loss = free_bits_kl(mu, logvar, config.kl.free_bits)

    total = config.stft.weight * stft_loss + recon_loss
    if isinstance(kl_weight, torch.Tensor):
        total = total + torch.where(kl_weight > 0, kl_weight * kl_loss, 0.0)
    elif kl_weight > 0:
        total = total + kl_weight * kl_loss
    finite = torch.isfinite(total)
    total = torch.where(finite, total, recon_loss)
    return dict(zip(LOSS_KEYS, (total, stft_loss, mag_loss, if_loss, kl_loss, recon_loss))), finite
