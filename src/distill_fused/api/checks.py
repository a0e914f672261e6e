"""Checks of the arguments of ``compute_combined_loss`` and ``MultiResolutionSTFTLoss``, all made
before any work is done."""

from __future__ import annotations

import math
import numbers

import torch

from ..core.devices import policy
from ..core.options import REDUCTIONS
from ..core.settings import MRSTFTSettings
from ..core.tracing import tracing


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype (float16, bfloat16, float32 "
                        f"or float64), got {t.dtype}")


def check_combined_inputs(recon, target, mu, logvar, kl_weight, settings):
    """Raise ``TypeError``/``ValueError`` naming the argument and what was expected; return
    ``kl_weight`` as a Python float (numpy scalars included), or the one-element tensor given.
    A tensor ``kl_weight``'s value is not checked: that would read it back to the host."""
    for name, t in (("recon", recon), ("target", target), ("mu", mu), ("logvar", logvar)):
        _check_tensor(name, t)
    for name, t in (("recon", recon), ("target", target)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, 2, H, W], got shape {tuple(t.shape)}")
        if t.shape[1] != 2:
            raise ValueError(f"{name} must have 2 channels (magnitude, IF) in dim 1, "
                             f"got shape {tuple(t.shape)}")
    if recon.shape != target.shape:
        raise ValueError(f"recon and target must have the same shape, got {tuple(recon.shape)} "
                         f"and {tuple(target.shape)}")
    if recon.shape[0] == 0:
        raise ValueError(f"recon must hold at least one item, got batch size 0 "
                         f"(shape {tuple(recon.shape)})")
    for name, t in (("mu", mu), ("logvar", logvar)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, D], got shape {tuple(t.shape)}")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape [B, D], got {tuple(mu.shape)} "
                         f"and {tuple(logvar.shape)}")
    if mu.shape[0] != recon.shape[0]:
        raise ValueError(f"mu must be [B, D] with B = {recon.shape[0]} (the batch of recon), "
                         f"got shape {tuple(mu.shape)}")
    if mu.shape[1] == 0:
        raise ValueError(f"mu must have at least one latent dim, got shape {tuple(mu.shape)}")
    devices = {t.device for t in (recon, target, mu, logvar)}
    if len(devices) > 1:
        raise ValueError("recon, target, mu and logvar must be on one device, got "
                         f"{recon.device}, {target.device}, {mu.device} and {logvar.device}")
    if isinstance(kl_weight, torch.Tensor):
        if kl_weight.numel() != 1 or kl_weight.device not in (recon.device, torch.device("cpu")):
            raise ValueError(f"kl_weight must be a python float (or a one-element tensor on the "
                             f"inputs' device), got shape {tuple(kl_weight.shape)} on "
                             f"{kl_weight.device}")
    elif isinstance(kl_weight, bool) or not isinstance(kl_weight, numbers.Real):
        raise TypeError(f"kl_weight must be a python float, got {type(kl_weight).__name__}")
    else:
        kl_weight = float(kl_weight)
        if not -math.inf < kl_weight < math.inf:  # NaN fails too (comparisons, not
            # math.isfinite: torch.compile keeps a float from a schedule symbolic through them)
            raise ValueError(f"kl_weight must be finite, got {kl_weight!r} (a broken KL "
                             "schedule?); a value <= 0 turns the KL term off")
    if isinstance(settings, MRSTFTSettings):
        length = recon.shape[2] * recon.shape[3]
        if length < settings.min_length:
            raise ValueError(
                f"recon's flattened spectrogram (H*W = {length} samples) is too short for the "
                f"STFT loss with fft size {max(r.n_fft for r in settings.resolutions)}: "
                f"H*W must be at least {settings.min_length}"
            )
    return kl_weight


def check_signals(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings) -> None:
    """The checks auraloss's call signature implies, raised before any work."""
    for name, t in (("input", x), ("target", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [B, C, T], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"input and target must have the same shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"input and target must be on the same device, got {x.device} "
                         f"and {y.device}")
    if x.shape[0] * x.shape[1] == 0:
        raise ValueError(f"input must hold at least one signal, got shape {tuple(x.shape)}")
    if x.shape[-1] < settings.min_length:
        raise ValueError(
            f"signals of length {x.shape[-1]} are too short for fft size "
            f"{max(r.n_fft for r in settings.resolutions)}: the shortest length allowed is "
            f"{settings.min_length} (reflect padding needs T > n_fft // 2)"
        )



def check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got "
                         f"{reduction!r}")
    return reduction


def check_lengths(lengths, *, batch: int, width: int, shortest: int, device: torch.device,
                  axis: str):
    """``lengths`` (``None``, or a ``[B]`` integer tensor on ``device`` of values in
    ``[shortest, width]``) as an int64 tensor. Its values are checked on the host where they
    are there already (a CPU tensor, outside a traced step); elsewhere by an assertion on the
    device (``torch._assert_async``: no host sync, the error surfaces as a device-side
    assertion), or, where torch has none for the device (MPS before torch 2.13), on the host
    (one sync)."""
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a [B] integer tensor on the inputs' device, got "
                        f"{type(lengths).__name__} (use torch.as_tensor(lengths, "
                        f"device=...))")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must have an integer dtype (int64, int32, ...), got "
                        f"{lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [B] = ({batch},), got "
                         f"{tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"lengths must be on the inputs' device ({device}), got "
                         f"{lengths.device}")
    lengths = lengths.to(torch.int64)
    in_range = (lengths >= shortest) & (lengths <= width)
    message = (f"lengths (valid {axis} of each example) must lie in [{shortest}, {width}]: "
               f"at most the padded size, and long enough for the STFT's reflect padding")
    device_policy = policy(device)
    if not tracing() and (device_policy.host or not device_policy.device_asserts):
        if not bool(in_range.all()):
            bad = lengths[~in_range].tolist()
            raise ValueError(f"{message}; got {bad}")
    else:
        torch._assert_async(in_range.all(), message)
    return lengths


def shortest_length(settings, rows: int) -> int:
    """The fewest valid columns of ``rows`` rows whose flattened signal the STFT accepts."""
    if not isinstance(settings, MRSTFTSettings):
        return 1
    return max(1, -(-settings.min_length // rows))
