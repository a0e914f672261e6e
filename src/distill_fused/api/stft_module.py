"""``MultiResolutionSTFTLoss``: the multi-resolution STFT loss as a module, auraloss's drop-in
(its math: ``distill_fused.core.settings``)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..core.options import Options
from ..core.settings import MRSTFTSettings, make_settings
from ..core.tracing import tracing
from ..dispatch import select_backend
from . import environment
from .checks import check_lengths, check_reduction, check_signals

# auraloss options this module does not compute, with the values that mean "off".
_UNSUPPORTED = {"w_phs": 0.0, "scale": None, "perceptual_weighting": False,
                "scale_invariance": False, "mag_distance": "L1", "output": "loss"}
# auraloss options that only matter together with an unsupported one (accepted, unused).
_INERT = {"sample_rate", "n_bins", "device"}


def _reject_unsupported(options: dict) -> None:
    for name, value in options.items():
        if name in _INERT:
            continue
        if name not in _UNSUPPORTED:
            raise TypeError(f"MultiResolutionSTFTLoss got an unexpected argument {name!r}")
        if value != _UNSUPPORTED[name]:
            raise ValueError(
                f"{name}={value!r} is not supported by distill_fused's MultiResolutionSTFTLoss "
                f"(only {name}={_UNSUPPORTED[name]!r}); pass an auraloss "
                "MultiResolutionSTFTLoss as _stft_loss_fn to have it called as given")


_SETTINGS = ("fft_sizes", "hop_sizes", "win_lengths", "window", "w_sc", "w_log_mag", "w_lin_mag",
             "eps", "resolution_weights")


class MultiResolutionSTFTLoss(torch.nn.Module):
    """Drop-in for ``auraloss.freq.MultiResolutionSTFTLoss`` (its supported options), computed by
    the selected backend. ``forward(input, target, lengths=None)`` takes ``[B, C, T]`` and
    returns a scalar (``reduction="mean"``, auraloss's batch-level loss), ``[B]``
    (``reduction="none"``: example b's loss as a batch of one) or their sum (``"sum"``).
    ``lengths``: a ``[B]`` integer tensor on the inputs' device, the valid samples of each
    example's signals (each cropped to them; with ``mean``, every sum runs over the valid
    samples of the batch). ``resolution_weights``: one weight per resolution,
    ``MRSTFT = (1/R) sum_r rw_r L_r`` (default all 1). (auraloss's own ``reduction`` reduces
    its elementwise terms; this one reduces per example.)

    Beyond auraloss's arguments: ``backend`` (default: ``DISTILL_LOSS_BACKEND``, else ``auto``)
    and ``fft_grouping`` (the ``triton`` backend's: ``per_resolution`` or ``shared``; default:
    ``DISTILL_FFT_GROUPING``, else ``per_resolution``; the default call only), read at each
    call."""

    def __init__(
        self,
        fft_sizes: Sequence[int] = (1024, 2048, 512),
        hop_sizes: Sequence[int] = (120, 240, 50),
        win_lengths: Sequence[int] = (600, 1200, 240),
        window: str = "hann_window",
        w_sc: float = 1.0,
        w_log_mag: float = 1.0,
        w_lin_mag: float = 0.0,
        eps: float = 1e-8,
        reduction: str = "mean",
        resolution_weights: Optional[Sequence[float]] = None,
        backend: Optional[str] = None,
        fft_grouping: Optional[str] = None,
        **auraloss_options: Any,
    ) -> None:
        super().__init__()
        _reject_unsupported(auraloss_options)
        s = make_settings(fft_sizes, hop_sizes, win_lengths, window, w_sc, w_log_mag,
                          w_lin_mag, eps, resolution_weights)
        self.fft_sizes = [r.n_fft for r in s.resolutions]
        self.hop_sizes = [r.hop for r in s.resolutions]
        self.win_lengths = [r.win_length for r in s.resolutions]
        self.window, self.w_sc, self.w_log_mag, self.w_lin_mag, self.eps = (
            window, s.w_sc, s.w_log_mag, s.w_lin_mag, s.eps)
        self.resolution_weights = s.resolution_weights
        self.reduction = check_reduction(reduction)
        self.backend = backend
        if fft_grouping is not None:
            environment.fft_grouping(fft_grouping)  # checked now, as the other arguments
        self.fft_grouping = fft_grouping
        self._settings, self._settings_key = s, self._current_key()

    def _current_key(self) -> tuple:
        return tuple(tuple(v) if isinstance(v, (list, tuple)) else v
                     for v in (getattr(self, name) for name in _SETTINGS))

    @property
    def settings(self) -> MRSTFTSettings:
        """The settings of the attributes as they are now: changing one (``m.w_sc = 0``,
        ``m.fft_sizes = [...]``, in place or not) re-plans the loss at the next call, checked
        as the constructor checks it."""
        key = self._current_key()
        if key != self._settings_key:
            settings = make_settings(*(getattr(self, name) for name in _SETTINGS))
            if tracing():  # windows made while tracing stay in the traced step
                return settings
            self._settings, self._settings_key = settings, key
        return self._settings

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        settings = self.settings
        grouping = environment.fft_grouping(self.fft_grouping)
        check_signals(input, target, settings)
        if self.reduction == "mean" and lengths is None and not settings.weighted_resolutions:
            backend = select_backend(input.device, *environment.backend_choice(self.backend))
            return backend.mrstft_loss(input, target, settings, fft_grouping=grouping)
        options = Options(check_reduction(self.reduction), check_lengths(
            lengths, batch=input.shape[0], width=input.shape[-1], shortest=settings.min_length,
            device=input.device, axis="samples"))
        backend = select_backend(input.device, *environment.backend_choice(self.backend))
        return backend.mrstft_loss_per_example(input, target, settings, options)

    def extra_repr(self) -> str:
        return (f"fft_sizes={self.fft_sizes}, hop_sizes={self.hop_sizes}, "
                f"win_lengths={self.win_lengths}, window={self.window!r}, w_sc={self.w_sc}, "
                f"w_log_mag={self.w_log_mag}, w_lin_mag={self.w_lin_mag}, eps={self.eps}")
