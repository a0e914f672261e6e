"""``MultiResolutionSTFTLoss``, ``STFTLoss``, ``MelSTFTLoss`` and ``ChromaSTFTLoss``: the
multi-resolution STFT loss as modules, auraloss's drop-ins with every one of auraloss 0.4.0's
arguments (the math: ``distill_fused.core.settings``)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch

from ..core.options import Options
from ..core.settings import MRSTFTSettings, make_settings
from ..core.tracing import tracing
from ..dispatch import select_backend
from . import environment
from .checks import check_lengths, check_reduction, check_signals

# The attributes the loss is planned from, in ``make_settings``'s order (positional first).
_POSITIONAL = ("fft_sizes", "hop_sizes", "win_lengths", "window", "w_sc", "w_log_mag",
               "w_lin_mag", "eps", "resolution_weights")
_KEYWORD = ("w_phs", "sample_rate", "scale", "n_bins", "perceptual_weighting",
            "scale_invariance", "mag_distance")
_TERMS = ("sc", "log_mag", "lin_mag", "phs")


class MultiResolutionSTFTLoss(torch.nn.Module):
    """Drop-in for ``auraloss.freq.MultiResolutionSTFTLoss``: the same arguments, in the same
    order, with auraloss's meanings and defaults. ``forward(input, target, lengths=None)``
    takes ``[B, C, T]``.

    auraloss's options: ``w_phs`` (phase term), ``scale="mel"`` or ``"chroma"`` (with
    ``sample_rate`` and ``n_bins``: one int, or here also one per resolution; chroma needs
    librosa), ``mag_distance="L2"``, ``eps``, ``scale_invariance``, ``output="full"``
    (``(loss, [sc_r], [log_mag_r], [lin_mag_r], [phs_r])``, 0.0 for a term whose weight is 0)
    ``perceptual_weighting`` (auraloss's A-weighting FIR, before the STFT) and ``device``
    (accepted: filterbanks are made on each input's device) are computed by the selected
    backend.

    ``reduction``: ``"mean"`` (auraloss's batch-level loss), ``"none"`` (``[B]``: example b's
    loss as a batch of one) or ``"sum"`` (their sum). This is not auraloss's ``reduction``,
    which reduces elementwise terms and fails with several resolutions (docs/loss.md).
    ``lengths``: a ``[B]`` integer tensor on the inputs' device, the valid samples of each
    example's signals (each cropped to them; with ``mean``, every sum runs over the valid
    samples of the batch). ``resolution_weights``: one weight per resolution,
    ``MRSTFT = (1/R) sum_r rw_r L_r`` (default all 1).

    Beyond auraloss's arguments: ``backend`` (default: ``DISTILL_LOSS_BACKEND``, else
    ``auto``), ``fft_grouping`` (the ``triton`` backend's: ``per_resolution`` or
    ``shared``; default: ``DISTILL_FFT_GROUPING``, else ``per_resolution``; the default call
    only) and ``verify`` (as ``compute_combined_loss``'s: whether the ``triton`` backend is
    checked against ``torch`` at each plan's first call; default: ``DISTILL_VERIFY``, else
    where ``auto`` picks it), read at each call."""

    def __init__(
        self,
        fft_sizes: Sequence[int] = (1024, 2048, 512),
        hop_sizes: Sequence[int] = (120, 240, 50),
        win_lengths: Sequence[int] = (600, 1200, 240),
        window: str = "hann_window",
        w_sc: float = 1.0,
        w_log_mag: float = 1.0,
        w_lin_mag: float = 0.0,
        w_phs: float = 0.0,
        sample_rate: Optional[float] = None,
        scale: Optional[str] = None,
        n_bins: Union[int, Sequence[int], None] = None,
        perceptual_weighting: bool = False,
        scale_invariance: bool = False,
        *,
        eps: float = 1e-8,
        output: str = "loss",
        reduction: str = "mean",
        mag_distance: str = "L1",
        device: Any = None,
        resolution_weights: Optional[Sequence[float]] = None,
        backend: Optional[str] = None,
        fft_grouping: Optional[str] = None,
        verify: Optional[bool] = None,
    ) -> None:
        super().__init__()
        self.fft_sizes, self.hop_sizes, self.win_lengths = fft_sizes, hop_sizes, win_lengths
        self.window, self.w_sc, self.w_log_mag, self.w_lin_mag = window, w_sc, w_log_mag, w_lin_mag
        self.eps, self.resolution_weights = eps, resolution_weights
        self.w_phs, self.sample_rate, self.scale, self.n_bins = w_phs, sample_rate, scale, n_bins
        self.perceptual_weighting, self.scale_invariance = perceptual_weighting, scale_invariance
        self.mag_distance = mag_distance
        s = self._make_settings()
        self.fft_sizes = [r.n_fft for r in s.resolutions]
        self.hop_sizes = [r.hop for r in s.resolutions]
        self.win_lengths = [r.win_length for r in s.resolutions]
        self.w_sc, self.w_log_mag, self.w_lin_mag = s.w_sc, s.w_log_mag, s.w_lin_mag
        self.eps, self.w_phs = s.eps, s.w_phs
        self.resolution_weights = s.resolution_weights
        if output not in ("loss", "full"):
            raise ValueError(f"output must be 'loss' or 'full' (auraloss's), got {output!r}")
        self.output = output
        self.reduction = check_reduction(reduction)
        self.device = device
        self.backend = backend
        if fft_grouping is not None:
            environment.fft_grouping(fft_grouping)  # checked now, as the other arguments
        self.fft_grouping = fft_grouping
        environment.verify_choice(verify)  # checked now, as the other arguments
        self.verify = verify
        self._settings, self._settings_key = s, self._current_key()

    def _make_settings(self) -> MRSTFTSettings:
        return make_settings(*(getattr(self, name) for name in _POSITIONAL),
                             **{name: getattr(self, name) for name in _KEYWORD})

    def _current_key(self) -> tuple:
        return tuple(tuple(v) if isinstance(v, (list, tuple)) else v
                     for v in (getattr(self, name) for name in _POSITIONAL + _KEYWORD))

    @property
    def settings(self) -> MRSTFTSettings:
        """The settings of the attributes as they are now: changing one (``m.w_sc = 0``,
        ``m.fft_sizes = [...]``, in place or not) re-plans the loss at the next call, checked
        as the constructor checks it."""
        key = self._current_key()
        if key != self._settings_key:
            settings = self._make_settings()
            if tracing():  # windows made while tracing stay in the traced step
                return settings
            self._settings, self._settings_key = settings, key
        return self._settings

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                lengths: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[Any, ...]]:
        """The loss of ``input`` against ``target`` (``[B, C, T]``): a tensor, or with
        ``output="full"`` auraloss's tuple ``(loss, [sc_r], [log_mag_r], [lin_mag_r],
        [phs_r])``."""
        settings = self.settings
        grouping = environment.fft_grouping(self.fft_grouping)
        verify = environment.verify_choice(self.verify)
        check_signals(input, target, settings)
        full = self.output == "full"
        if (self.reduction == "mean" and lengths is None and not full and settings.plain
                and not settings.weighted_resolutions):
            backend = select_backend(input.device, *environment.backend_choice(self.backend),
                                     verify)
            return backend.mrstft_loss(input, target, settings, fft_grouping=grouping)
        options = Options(check_reduction(self.reduction), check_lengths(
            lengths, batch=input.shape[0], width=input.shape[-1], shortest=settings.min_length,
            device=input.device, axis="samples"), per_resolution_terms=full)
        backend = select_backend(input.device, *environment.backend_choice(self.backend), verify)
        result = backend.mrstft_loss_per_example(input, target, settings, options)
        return self._as_auraloss_full(*result) if full else result

    def _as_auraloss_full(self, loss, terms):
        """auraloss's ``output="full"``: the loss, then each term's per-resolution values."""
        lists = tuple([terms.get(f"stft_{name}_loss_{r}", 0.0)
                       for r in range(len(self.fft_sizes))] for name in _TERMS)
        return (loss, *lists)

    def extra_repr(self) -> str:
        text = (f"fft_sizes={self.fft_sizes}, hop_sizes={self.hop_sizes}, "
                f"win_lengths={self.win_lengths}, window={self.window!r}, w_sc={self.w_sc}, "
                f"w_log_mag={self.w_log_mag}, w_lin_mag={self.w_lin_mag}, eps={self.eps}")
        defaults = {"w_phs": 0.0, "sample_rate": None, "scale": None, "n_bins": None,
                    "perceptual_weighting": False, "scale_invariance": False,
                    "mag_distance": "L1", "output": "loss", "reduction": "mean"}
        extra = [f"{k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v]
        return ", ".join([text, *extra])


class STFTLoss(MultiResolutionSTFTLoss):
    """Drop-in for ``auraloss.freq.STFTLoss``: one resolution, auraloss's arguments in
    auraloss's order (``output="full"``: ``(loss, sc, log_mag, lin_mag, phs)``). Everything
    else as ``MultiResolutionSTFTLoss``, whose one-resolution case this is."""

    def __init__(
        self,
        fft_size: int = 1024,
        hop_size: int = 256,
        win_length: int = 1024,
        window: str = "hann_window",
        w_sc: float = 1.0,
        w_log_mag: float = 1.0,
        w_lin_mag: float = 0.0,
        w_phs: float = 0.0,
        sample_rate: Optional[float] = None,
        scale: Optional[str] = None,
        n_bins: Optional[int] = None,
        perceptual_weighting: bool = False,
        scale_invariance: bool = False,
        eps: float = 1e-8,
        output: str = "loss",
        reduction: str = "mean",
        mag_distance: str = "L1",
        device: Any = None,
        **options: Any,
    ) -> None:
        super().__init__([fft_size], [hop_size], [win_length], window, w_sc, w_log_mag,
                         w_lin_mag, w_phs, sample_rate, scale, n_bins, perceptual_weighting,
                         scale_invariance, eps=eps, output=output, reduction=reduction,
                         mag_distance=mag_distance, device=device, **options)

    fft_size = property(lambda self: self.fft_sizes[0])
    hop_size = property(lambda self: self.hop_sizes[0])
    win_length = property(lambda self: self.win_lengths[0])

    def _as_auraloss_full(self, loss, terms):
        return (loss, *(values[0] for values in super()._as_auraloss_full(loss, terms)[1:]))


class MelSTFTLoss(STFTLoss):
    """Drop-in for ``auraloss.freq.MelSTFTLoss``: ``STFTLoss`` with ``scale="mel"`` and
    ``n_bins=n_mels``."""

    def __init__(self, sample_rate: float, fft_size: int = 1024, hop_size: int = 256,
                 win_length: int = 1024, window: str = "hann_window", w_sc: float = 1.0,
                 w_log_mag: float = 1.0, w_lin_mag: float = 0.0, w_phs: float = 0.0,
                 n_mels: int = 128, **kwargs: Any) -> None:
        super().__init__(fft_size, hop_size, win_length, window, w_sc, w_log_mag, w_lin_mag,
                         w_phs, sample_rate, "mel", n_mels, **kwargs)


class ChromaSTFTLoss(STFTLoss):
    """Drop-in for ``auraloss.freq.ChromaSTFTLoss`` (needs librosa for its filterbank; auraloss
    0.4.0's own fails at construction: docs/loss.md)."""

    def __init__(self, sample_rate: float, fft_size: int = 1024, hop_size: int = 256,
                 win_length: int = 1024, window: str = "hann_window", w_sc: float = 1.0,
                 w_log_mag: float = 1.0, w_lin_mag: float = 0.0, w_phs: float = 0.0,
                 n_chroma: int = 12, **kwargs: Any) -> None:
        super().__init__(fft_size, hop_size, win_length, window, w_sc, w_log_mag, w_lin_mag,
                         w_phs, sample_rate, "chroma", n_chroma, **kwargs)
