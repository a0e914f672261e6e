"""The training loss of a 2-channel (magnitude + IF) spectrogram VAE: the public API.

``compute_combined_loss(recon, target, mu, logvar, loss_config, kl_weight)``::

    mag_recon_loss = mean|rm - tm|
    if_recon_loss  = mean(|ri - ti| * tm / (mean(tm) + 1e-8))
    recon_loss     = w_rec * (w_mag * mag_recon_loss + w_if * if_recon_loss)
    stft_loss      = max(MRSTFT(rm flattened, tm flattened), 0)
    kl_loss        = mean_b sum_d max(-0.5 (1 + logvar - mu^2 - exp(logvar)), free_bits)
    total_loss     = w_stft * stft_loss + recon_loss + kl_weight * kl_loss   (kl if kl_weight > 0)
    total_loss     = recon_loss where total_loss is not finite (gradients: recon_loss's alone)

with ``rm, ri = recon[:, 0], recon[:, 1]`` and ``tm, ti = target[:, 0], target[:, 1]``.
The work is done by the backend that ``distill_fused.dispatch.select_backend`` picks.
``loss_config`` may be a ``distill_fused.LossConfig`` or the host application's own config
object with the same fields.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from ..core.config import LossConfig, LossConfigLike, as_loss_config
from ..core.options import Options
from ..core.settings import MRSTFTSettings, settings_from_auraloss
from ..core.tracing import tracing
from ..dispatch import select_backend
from . import environment
from .checks import check_combined_inputs, check_lengths, check_reduction, shortest_length
from .nonfinite import nonfinite_mode, record
from .stft_module import MultiResolutionSTFTLoss

__all__ = ["compute_combined_loss", "create_stft_loss", "vae_loss", "get_kl_weight",
           "compute_kl_divergence", "MultiResolutionSTFTLoss"]


def create_stft_loss(loss_config: LossConfigLike,
                     device: Union[str, torch.device, None] = None) -> MultiResolutionSTFTLoss:
    """The multi-resolution STFT loss of ``loss_config.stft``, ready for tensors on ``device``
    (``loss_config``: a ``LossConfig`` or an object with its fields)."""
    cfg = as_loss_config(loss_config).stft
    module = MultiResolutionSTFTLoss(fft_sizes=cfg.fft_sizes, hop_sizes=cfg.hop_sizes,
                                     win_lengths=cfg.win_lengths,
                                     resolution_weights=cfg.resolution_weights)
    if device is not None:
        # Imports the device's backend now, outside any compiled step.
        select_backend(device, *environment.backend_choice(None))
        module = module.to(device)
    return module


def _config_settings(loss_config: LossConfig) -> MRSTFTSettings:
    """Settings of the config's default STFT loss, built once per distinct configuration."""
    cfg = loss_config.stft
    key = (tuple(cfg.fft_sizes), tuple(cfg.hop_sizes), tuple(cfg.win_lengths),
           cfg.resolution_weights, torch.get_default_dtype())
    settings = _CONFIG_SETTINGS.get(key)
    if settings is None:
        settings = create_stft_loss(loss_config).settings
        if not tracing():  # windows made while tracing are not real
            _CONFIG_SETTINGS[key] = settings
    return settings


_CONFIG_SETTINGS: Dict[tuple, MRSTFTSettings] = {}
_AURALOSS_SETTINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stft_term(loss_config: LossConfig, stft_loss_fn):
    """The settings the fast path computes, or the callable to call as given."""
    if stft_loss_fn is None:
        return _config_settings(loss_config)
    if isinstance(stft_loss_fn, MultiResolutionSTFTLoss):
        return stft_loss_fn.settings
    settings = settings_from_auraloss(stft_loss_fn)
    if settings is not None:
        # Keep one settings object per auraloss instance (its per-device caches with it).
        cached = _AURALOSS_SETTINGS.get(stft_loss_fn)
        if cached is not None and _same_settings(cached, settings):
            return cached
        _AURALOSS_SETTINGS[stft_loss_fn] = settings
        return settings
    if not callable(stft_loss_fn):
        raise TypeError("_stft_loss_fn must be a MultiResolutionSTFTLoss or a callable "
                        f"(input, target) -> loss, got {type(stft_loss_fn).__name__}")
    return stft_loss_fn


def _same_settings(a: MRSTFTSettings, b: MRSTFTSettings) -> bool:
    def weights(s: MRSTFTSettings):
        return s.w_sc, s.w_log_mag, s.w_lin_mag, s.eps

    return (a.resolutions == b.resolutions and weights(a) == weights(b)
            and a.resolution_weights == b.resolution_weights
            and all(u is v for u, v in zip(a.windows, b.windows)))


def compute_combined_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    loss_config: Optional[LossConfigLike] = None,
    kl_weight: Union[float, torch.Tensor] = 0.0,
    _stft_loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    *,
    backend: Optional[str] = None,
    nonfinite: Optional[str] = None,
    fft_grouping: Optional[str] = None,
    reduction: str = "mean",
    lengths: Optional[torch.Tensor] = None,
    per_resolution_terms: bool = False,
    verify: Optional[bool] = None,
) -> Dict[str, torch.Tensor]:
    """The combined VAE loss (see the module docstring) as a dict of 0-dim tensors with keys
    ``total_loss, stft_loss, mag_recon_loss, if_recon_loss, kl_loss, recon_loss``, all in one
    dtype (float64 if any input is, else float32).

    ``reduction``: ``mean`` (the default: the batch-level loss above, auraloss's definition),
    ``none`` (each entry ``[B]``: example b's loss as a batch of one, its own spectral
    convergence and IF normalisation; so the mean of ``none`` is not ``mean``) or ``sum`` (the
    sum of ``none``). ``lengths``: a ``[B]`` integer tensor on the inputs' device, the valid
    columns of each example along W (padding past them contributes nothing, and gets a zero
    gradient): example b is cropped to ``[..., :lengths[b]]`` (its STFT runs over the cropped,
    flattened signal); with ``mean``, every sum runs over the valid elements of the batch.
    ``per_resolution_terms``: add each resolution's ``stft_sc_loss_{r}`` and
    ``stft_log_mag_loss_{r}`` (and ``stft_lin_mag_loss_{r}`` if ``w_lin_mag``,
    ``stft_phs_loss_{r}`` if ``w_phs``), unweighted, reduced as the rest. These,
    ``loss_config.stft.resolution_weights`` and a ``MultiResolutionSTFTLoss`` with auraloss's
    other options (mel, L2, phase, ...) take the per-example path (``docs/usage.md``);
    ``fft_grouping`` does not apply there.

    ``kl_weight``: a Python float (NaN or inf is a ``ValueError``; <= 0 leaves the KL out), or
    a one-element tensor, whose value is not checked (that would be a host sync).
    ``_stft_loss_fn``: this project's ``MultiResolutionSTFTLoss`` (``create_stft_loss``), an
    auraloss ``MultiResolutionSTFTLoss`` (run on the fast path when its settings allow, else
    called as given), any callable ``(input, target) -> loss``, or ``None`` for the config's.
    ``backend``: ``auto``, ``reference``, ``torch`` or ``triton``; default: the environment
    variable ``DISTILL_LOSS_BACKEND``, else ``auto``.
    ``nonfinite``: ``silent``, ``count`` or ``warn``, what to do beyond the fallback when the
    total is not finite (``distill_fused.api.nonfinite``); default: ``set_nonfinite_mode``'s, else
    the environment variable ``DISTILL_NONFINITE``, else ``silent``.
    ``fft_grouping``: how the ``triton`` backend groups the STFT term's FFTs, ``per_resolution``
    (one FFT per resolution: less memory) or ``shared`` (one FFT per group of resolutions whose
    sizes divide each other: fewer launches, computed in float64); default: the environment
    variable ``DISTILL_FFT_GROUPING``, else ``per_resolution``. The other backends run one FFT
    per resolution.
    ``verify``: whether the ``triton`` backend's results are checked against the ``torch``
    backend's at the first eager call of each plan (shapes, dtypes, device, options; one host
    sync then, none after). Default (``None``; the environment variable ``DISTILL_VERIFY``,
    ``1`` or ``0``, where set): ``auto`` verifies, and runs a plan that fails on ``torch``
    from then on, with a warning; an explicit ``triton`` does not. ``True``: an explicit
    ``triton`` verifies too, and raises ``RuntimeError`` where a plan fails. ``False``:
    ``auto`` trusts ``triton`` unchecked. (docs/backends.md)

    NaN and inf give the reference's non-finite values and gradients, element by element. The
    ``torch`` and ``triton`` backends give first-order gradients only: differentiating their
    gradients again raises ``RuntimeError`` (``reference`` computes it).
    """
    mode = nonfinite_mode(nonfinite)
    grouping = environment.fft_grouping(fft_grouping)
    verify = environment.verify_choice(verify)
    loss_config = as_loss_config(loss_config)
    stft = _stft_term(loss_config, _stft_loss_fn)
    kl_weight = check_combined_inputs(recon, target, mu, logvar, kl_weight, stft)
    default = (reduction == "mean" and lengths is None and per_resolution_terms is False
               and not (isinstance(stft, MRSTFTSettings)
                        and (stft.weighted_resolutions or not stft.plain)))
    if default:
        chosen = select_backend(recon.device, *environment.backend_choice(backend), verify)
        losses, finite = chosen.combined_loss(recon, target, mu, logvar, loss_config,
                                              kl_weight, stft, fft_grouping=grouping)
    else:
        options = _per_example_options(recon, stft, _stft_loss_fn, reduction, lengths,
                                       per_resolution_terms)
        chosen = select_backend(recon.device, *environment.backend_choice(backend), verify)
        losses, finite = chosen.combined_loss_per_example(recon, target, mu, logvar,
                                                          loss_config, kl_weight, stft, options)
    record(finite, mode)
    return losses


def _per_example_options(recon, stft, stft_loss_fn, reduction, lengths,
                         per_resolution_terms) -> Options:
    """The checked options of a call that is not the default one (before any work)."""
    reduction = check_reduction(reduction)
    if not isinstance(per_resolution_terms, bool):
        raise TypeError(f"per_resolution_terms must be a bool, got "
                        f"{type(per_resolution_terms).__name__}")
    lengths = check_lengths(lengths, batch=recon.shape[0], width=recon.shape[3],
                            shortest=shortest_length(stft, recon.shape[2]),
                            device=recon.device, axis="columns along W")
    if not isinstance(stft, MRSTFTSettings):
        raise ValueError("reduction, lengths and per_resolution_terms need the STFT loss "
                         "computed by distill_fused (the config's, create_stft_loss's or an "
                         "auraloss MultiResolutionSTFTLoss it computes), not a callable "
                         f"_stft_loss_fn ({type(stft_loss_fn).__name__})")
    return Options(reduction, lengths, per_resolution_terms)


def _free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Each example's free-bits KL, ``[B]``."""
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    return torch.clamp(kl, min=free_bits).sum(dim=1)


def vae_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float = 1.0, free_bits: float = 0.1, *, reduction: str = "mean",
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mse + kl_weight * kl, mse, kl)`` with the free-bits KL (just ``mse`` if
    ``kl_weight <= 0``). ``reduction``: ``mean`` (mse over every element, kl averaged over the
    batch), ``none`` (``[B]`` each: example b's mse over its elements and its KL) or ``sum``
    (the sum of ``none``)."""
    reduction = check_reduction(reduction)
    if reduction == "mean":
        mse = torch.nn.functional.mse_loss(recon, target)
        kl_loss = _free_bits_kl(mu, logvar, free_bits).mean()
    else:
        if recon.dim() < 1 or recon.shape != target.shape or mu.shape[:1] != recon.shape[:1]:
            raise ValueError(f"reduction={reduction!r} needs recon and target of one shape "
                             f"[B, ...] and mu [B, D], got {tuple(recon.shape)}, "
                             f"{tuple(target.shape)} and {tuple(mu.shape)}")
        mse = (recon - target).square().flatten(1).mean(1)
        kl_loss = _free_bits_kl(mu, logvar, free_bits)
    total = mse + kl_weight * kl_loss if kl_weight > 0 else mse
    if reduction == "sum":
        return total.sum(), mse.sum(), kl_loss.sum()
    return total, mse, kl_loss


def get_kl_weight(epoch: int, total_epochs: int, warmup_fraction: float = 0.3,
                  kl_weight_max: float = 1.0) -> float:
    """Linear KL warm-up: ``min(kl_weight_max, kl_weight_max * epoch / warmup_epochs)``."""
    warmup_epochs = int(total_epochs * warmup_fraction)
    if warmup_epochs == 0:
        return kl_weight_max
    return min(kl_weight_max, kl_weight_max * epoch / warmup_epochs)


def compute_kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> float:
    """The raw KL (no free bits), ``mean_b sum_d -0.5 (1 + logvar - mu^2 - exp(logvar))``, as a
    python float (a host read: for logging, not for the training step)."""
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    return float(kl.sum(dim=1).mean())
