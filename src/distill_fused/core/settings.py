"""The settings of a multi-resolution STFT loss: what every backend computes it from.

For signals ``x`` (input) and ``y`` (target) of shape ``[B, C, T]``, folded to ``[B*C, T]``, and
each resolution ``(n_fft, hop, win)`` (auraloss 0.4.0's definition)::

    X = stft(x)                        # center=True, reflect padding, onesided
    |X| = sqrt(max(Re(X)^2 + Im(X)^2, eps))
    sc      = || |Y| - |X| ||_F / || |Y| ||_F
    log_mag = mean | ln|X| - ln|Y| |
    lin_mag = mean | |X| - |Y| |
    L_r = w_sc * sc + w_log_mag * log_mag + w_lin_mag * lin_mag

    MRSTFT(x, y) = (1/R) sum_r rw_r L_r

with per-resolution weights ``rw_r``, all 1 by default (then it is auraloss's ``mean_r L_r``).

auraloss's other options change the magnitudes the terms are formed from, or add a term:

    scale="mel":  |X| -> W_r |X| per frame (``W_r``: resolution r's mel filterbank,
                  ``[n_bins_r, n//2+1]``, ``core/filterbanks.py``); the terms then run over
                  the mel bins
    scale="chroma":  likewise with librosa's chroma filterbank
    mag_distance="L2":  log_mag = mean (ln|X| - ln|Y|)^2, lin_mag = mean (|X| - |Y|)^2
    w_phs:  + w_phs * mean (arg X - arg Y)^2 over the bins (raw STFT, not mel)
    scale_invariance:  |Y| -> alpha |Y|, alpha = sum |X||Y| / sum |Y|^2 over each signal's
                  frames and bins (auraloss 0.4.0 means this, but broadcasts alpha over the
                  bins axis: see docs/loss.md)
    perceptual_weighting:  x -> a * x, y -> a * y before the STFT: auraloss's 101-tap
                  A-weighting FIR ``a`` (``scipy.signal.firls`` fitted to the A-weighting
                  curve at ``sample_rate``; taps ``prefilter_taps``), applied as auraloss
                  applies it, ``conv1d`` with zero padding of 50 samples on each side
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

from .config import as_sizes, as_weights
from .filterbanks import chroma_filterbank, mel_filterbank
from .tracing import tracing


@dataclass(frozen=True)
class Resolution:
    n_fft: int
    hop: int
    win_length: int


@dataclass(frozen=True, eq=False)
class MRSTFTSettings:
    """Everything the loss depends on. ``windows[r]`` has ``win_length`` samples (not padded)."""

    resolutions: Tuple[Resolution, ...]
    windows: Tuple[torch.Tensor, ...]
    w_sc: float = 1.0
    w_log_mag: float = 1.0
    w_lin_mag: float = 0.0
    eps: float = 1e-8
    # Per-resolution weights ``rw_r``; ``None``: all 1 (auraloss's mean over resolutions).
    resolution_weights: Optional[Tuple[float, ...]] = None
    w_phs: float = 0.0
    mag_distance: str = "L1"
    scale: Optional[str] = None
    sample_rate: Optional[float] = None
    # Bins of each resolution's filterbank (``scale`` set), else ``None`` each.
    n_bins: Tuple[Optional[int], ...] = ()
    perceptual_weighting: bool = False
    scale_invariance: bool = False
    # Each resolution's filterbank, float32 as librosa's (``scale`` set), else ``None``.
    filterbanks: Tuple[Optional[torch.Tensor], ...] = ()
    # auraloss's A-weighting FIR taps, float32 as auraloss's (``perceptual_weighting``).
    prefilter_taps: Optional[torch.Tensor] = None
    # Per-device derived tensors (padded windows, ...) so that a step makes no host copies.
    cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # What the loss is planned from, as one string (a constant to torch.compile, which may
        # make the floats above symbolic): what tells two settings' kernels apart.
        parts = (tuple((r.n_fft, r.hop, r.win_length) for r in self.resolutions), self.w_sc,
                 self.w_log_mag, self.w_lin_mag, self.eps, self.resolution_weights, self.w_phs,
                 self.mag_distance, self.scale, self.sample_rate, self.n_bins,
                 self.perceptual_weighting, self.scale_invariance)
        object.__setattr__(self, "signature", repr(parts))

    @property
    def weighted_resolutions(self) -> bool:
        """Whether a resolution weight differs from 1 (only the per-example path computes
        those: ``backends/per_example.py``)."""
        return self.resolution_weights is not None and any(
            w != 1.0 for w in self.resolution_weights)

    @property
    def plain(self) -> bool:
        """Whether only the terms of the default path are asked for (L1 distances on the
        STFT's own bins, no phase term, no scaling): the fused paths compute those."""
        return (not self.w_phs and self.mag_distance == "L1" and self.scale is None
                and not self.scale_invariance and not self.perceptual_weighting)

    @property
    def min_length(self) -> int:
        """Shortest signal the reflect padding of every resolution accepts."""
        return max(r.n_fft // 2 for r in self.resolutions) + 1

    def padded_window(self, index: int, device, dtype) -> torch.Tensor:
        """Window ``index`` zero-padded and centred to ``n_fft`` samples, as ``torch.stft`` does."""
        res, window = self.resolutions[index], self.windows[index]
        left = (res.n_fft - res.win_length) // 2
        window = window.to(device=device, dtype=dtype)
        return torch.nn.functional.pad(window, (left, res.n_fft - res.win_length - left))

    def filterbank(self, index: int, device, dtype) -> Optional[torch.Tensor]:
        """Resolution ``index``'s filterbank on ``device`` in ``dtype`` (``None``: none),
        made once per device and dtype (a step then copies nothing from the host); a traced
        step makes its own and keeps none."""
        bank = self.filterbanks[index] if self.filterbanks else None
        return None if bank is None else self._on_device(("filterbank", index), bank, device,
                                                         dtype)

    def prefilter(self, device, dtype) -> Optional[torch.Tensor]:
        """The A-weighting FIR as ``conv1d`` weights ``[1, 1, taps]`` on ``device`` in
        ``dtype`` (``None`` without ``perceptual_weighting``), kept as ``filterbank`` is."""
        taps = self.prefilter_taps
        return None if taps is None else self._on_device(("prefilter",), taps.view(1, 1, -1),
                                                         device, dtype)

    def _on_device(self, key: tuple, value: torch.Tensor, device, dtype) -> torch.Tensor:
        key = (*key, torch.device(device), dtype)
        kept = self.cache.get(key)
        if kept is None:
            kept = value.to(device=device, dtype=dtype)
            if not tracing():
                self.cache[key] = kept
        return kept


def make_settings(
    fft_sizes: Sequence[int],
    hop_sizes: Sequence[int],
    win_lengths: Sequence[int],
    window: str = "hann_window",
    w_sc: float = 1.0,
    w_log_mag: float = 1.0,
    w_lin_mag: float = 0.0,
    eps: float = 1e-8,
    resolution_weights: Optional[Sequence[float]] = None,
    *,
    w_phs: float = 0.0,
    sample_rate: Optional[float] = None,
    scale: Optional[str] = None,
    n_bins=None,
    perceptual_weighting: bool = False,
    scale_invariance: bool = False,
    mag_distance: str = "L1",
) -> MRSTFTSettings:
    """Validated settings; windows are built like auraloss builds them (torch's default dtype).
    Sizes may be any sequence of ints (numpy integers included); weights any real numbers;
    ``resolution_weights`` one finite weight >= 0 per resolution (or ``None``: all 1);
    ``n_bins`` one int for every resolution (auraloss's) or one per resolution."""
    owner = "MultiResolutionSTFTLoss"
    fft_sizes, hop_sizes, win_lengths = (as_sizes(owner, name, values) for name, values in (
        ("fft_sizes", fft_sizes), ("hop_sizes", hop_sizes), ("win_lengths", win_lengths)))
    if not len(fft_sizes) == len(hop_sizes) == len(win_lengths):
        raise ValueError(
            f"{owner}: fft_sizes, hop_sizes and win_lengths must have the same length, got "
            f"{len(fft_sizes)}, {len(hop_sizes)} and {len(win_lengths)}"
        )
    for n_fft, win in zip(fft_sizes, win_lengths):
        if win > n_fft:
            raise ValueError(f"{owner}.win_lengths: window {win} is longer than its fft_size "
                             f"{n_fft}")
    window_fn = getattr(torch, window, None) if isinstance(window, str) else None
    if window_fn is None or not window.endswith("_window"):
        raise ValueError(f"window must name a torch window function such as 'hann_window', "
                         f"got {window!r}")
    for name, value in (("w_sc", w_sc), ("w_log_mag", w_log_mag), ("w_lin_mag", w_lin_mag),
                        ("w_phs", w_phs), ("eps", eps)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or value != value:
            raise ValueError(f"{owner}.{name} must be a real number, got {value!r}")
    if eps <= 0:
        raise ValueError(f"{owner}.eps must be > 0, got {eps!r}")
    if resolution_weights is not None:
        resolution_weights = as_weights(owner, "resolution_weights", resolution_weights,
                                        len(fft_sizes))
    if mag_distance not in ("L1", "L2"):
        raise ValueError(f"{owner}.mag_distance must be 'L1' or 'L2', got {mag_distance!r}")
    for name, value in (("perceptual_weighting", perceptual_weighting),
                        ("scale_invariance", scale_invariance)):
        if not isinstance(value, (bool, int)) or value not in (0, 1):
            raise ValueError(f"{owner}.{name} must be True or False, got {value!r}")
    bins = _scale_bins(owner, scale, sample_rate, n_bins, fft_sizes, perceptual_weighting)
    return MRSTFTSettings(
        resolutions=tuple(Resolution(*r) for r in zip(fft_sizes, hop_sizes, win_lengths)),
        windows=tuple(window_fn(w) for w in win_lengths),
        w_sc=float(w_sc), w_log_mag=float(w_log_mag), w_lin_mag=float(w_lin_mag), eps=float(eps),
        resolution_weights=resolution_weights, w_phs=float(w_phs), mag_distance=mag_distance,
        scale=scale, sample_rate=sample_rate, n_bins=bins,
        perceptual_weighting=bool(perceptual_weighting),
        scale_invariance=bool(scale_invariance),
        filterbanks=tuple(_filterbank(scale, sample_rate, n_fft, n)
                          for n_fft, n in zip(fft_sizes, bins)),
        prefilter_taps=a_weighting_taps(sample_rate) if perceptual_weighting else None,
    )


def a_weighting_taps(sample_rate: float) -> torch.Tensor:
    """auraloss's A-weighting FIR at ``sample_rate``: its 101 taps, float32 (auraloss's own
    ``FIRFilter(filter_type="aw")`` makes them)."""
    from auraloss.perceptual import FIRFilter

    return FIRFilter(filter_type="aw", fs=sample_rate).fir.weight.detach().reshape(-1).clone()


def _filterbank(scale, sample_rate, n_fft: int, n_bins) -> Optional[torch.Tensor]:
    if scale == "mel":
        return mel_filterbank(sample_rate, n_fft, n_bins)
    if scale == "chroma":
        return chroma_filterbank(sample_rate, n_fft, n_bins)
    return None


def _scale_bins(owner: str, scale, sample_rate, n_bins, fft_sizes, perceptual_weighting
                ) -> Tuple[Optional[int], ...]:
    """Each resolution's filterbank size (``None`` each without ``scale``), checked as
    auraloss checks them (there with bare asserts)."""
    if scale not in (None, "mel", "chroma"):
        raise ValueError(f"Invalid scale: {scale!r}. Must be 'mel' or 'chroma' (or None).")
    needs_rate = scale is not None or perceptual_weighting
    if needs_rate and (not isinstance(sample_rate, numbers.Real) or isinstance(sample_rate, bool)
                       or not sample_rate > 0):
        why = f"scale={scale!r}" if scale is not None else "perceptual_weighting=True"
        raise ValueError(f"{owner}.sample_rate must be a positive number with {why}, got "
                         f"{sample_rate!r}")
    if scale is None:
        return (None,) * len(fft_sizes)
    if isinstance(n_bins, numbers.Integral) and not isinstance(n_bins, bool):
        n_bins = (n_bins,) * len(fft_sizes)
    if n_bins is None:
        raise ValueError(f"{owner}.n_bins must be given with scale={scale!r} (one int, or one "
                         "per resolution)")
    bins = as_sizes(owner, "n_bins", n_bins)
    if len(bins) != len(fft_sizes):
        raise ValueError(f"{owner}.n_bins: one int, or one per resolution ({len(fft_sizes)}), "
                         f"got {len(bins)}")
    for n, n_fft in zip(bins, fft_sizes):
        if n > n_fft:
            raise ValueError(f"{owner}.n_bins: {n} bins for fft_size {n_fft} (at most fft_size, "
                             "as auraloss asserts)")
    return bins


def settings_from_auraloss(module) -> Optional[MRSTFTSettings]:
    """The settings of an auraloss ``MultiResolutionSTFTLoss`` when this project computes
    exactly what it computes, else ``None`` (phase term, mel/chroma scale, perceptual weighting,
    scale invariance, another reduction or distance, per-resolution weights, ``output="full"``)."""
    losses = getattr(module, "stft_losses", None)
    if losses is None or len(losses) == 0:
        return None
    first = losses[0]
    shared = ("w_sc", "w_log_mag", "w_lin_mag", "eps")
    for loss in losses:
        if (loss.w_phs or loss.scale is not None or loss.perceptual_weighting
                or loss.scale_invariance or loss.reduction != "mean"
                or loss.mag_distance != "L1" or loss.output != "loss"):
            return None
        if any(getattr(loss, name) != getattr(first, name) for name in shared):
            return None
        window = loss.window
        if (not isinstance(window, torch.Tensor) or window.shape != (loss.win_length,)
                or loss.win_length > loss.fft_size):
            return None
    return MRSTFTSettings(
        resolutions=tuple(Resolution(loss.fft_size, loss.hop_size, loss.win_length)
                          for loss in losses),
        windows=tuple(loss.window for loss in losses),
        w_sc=float(first.w_sc), w_log_mag=float(first.w_log_mag),
        w_lin_mag=float(first.w_lin_mag), eps=float(first.eps),
    )
