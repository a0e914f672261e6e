"""The multi-resolution STFT loss as a module, and the settings every backend computes it from.

For signals ``x`` (input) and ``y`` (target) of shape ``[B, C, T]``, folded to ``[B*C, T]``, and
each resolution ``(n_fft, hop, win)`` (auraloss 0.4.0's definition)::

    X = stft(x)                        # center=True, reflect padding, onesided
    |X| = sqrt(max(Re(X)^2 + Im(X)^2, eps))
    sc      = || |Y| - |X| ||_F / || |Y| ||_F
    log_mag = mean | ln|X| - ln|Y| |
    lin_mag = mean | |X| - |Y| |
    L_r = w_sc * sc + w_log_mag * log_mag + w_lin_mag * lin_mag

    MRSTFT(x, y) = mean_r L_r
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

from .config import as_sizes
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
    # Per-device derived tensors (padded windows, ...) so that a step makes no host copies.
    cache: dict = field(default_factory=dict, repr=False)

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


def make_settings(
    fft_sizes: Sequence[int],
    hop_sizes: Sequence[int],
    win_lengths: Sequence[int],
    window: str = "hann_window",
    w_sc: float = 1.0,
    w_log_mag: float = 1.0,
    w_lin_mag: float = 0.0,
    eps: float = 1e-8,
) -> MRSTFTSettings:
    """Validated settings; windows are built like auraloss builds them (torch's default dtype).
    Sizes may be any sequence of ints (numpy integers included); weights any real numbers."""
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
                        ("eps", eps)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or value != value:
            raise ValueError(f"{owner}.{name} must be a real number, got {value!r}")
    if eps <= 0:
        raise ValueError(f"{owner}.eps must be > 0, got {eps!r}")
    return MRSTFTSettings(
        resolutions=tuple(Resolution(*r) for r in zip(fft_sizes, hop_sizes, win_lengths)),
        windows=tuple(window_fn(w) for w in win_lengths),
        w_sc=float(w_sc), w_log_mag=float(w_log_mag), w_lin_mag=float(w_lin_mag), eps=float(eps),
    )


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


# auraloss options this module does not compute, with the values that mean "off".
_UNSUPPORTED = {"w_phs": 0.0, "scale": None, "perceptual_weighting": False,
                "scale_invariance": False, "reduction": "mean", "mag_distance": "L1",
                "output": "loss"}
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
             "eps")


class MultiResolutionSTFTLoss(torch.nn.Module):
    """Drop-in for ``auraloss.freq.MultiResolutionSTFTLoss`` (its supported options), computed by
    the selected backend. ``forward(input, target)`` takes ``[B, C, T]`` and returns a scalar."""

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
        backend: Optional[str] = None,
        **auraloss_options,
    ):
        super().__init__()
        _reject_unsupported(auraloss_options)
        s = make_settings(fft_sizes, hop_sizes, win_lengths, window, w_sc, w_log_mag,
                          w_lin_mag, eps)
        self.fft_sizes = [r.n_fft for r in s.resolutions]
        self.hop_sizes = [r.hop for r in s.resolutions]
        self.win_lengths = [r.win_length for r in s.resolutions]
        self.window, self.w_sc, self.w_log_mag, self.w_lin_mag, self.eps = (
            window, s.w_sc, s.w_log_mag, s.w_lin_mag, s.eps)
        self.backend = backend
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

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from .backends import select_backend

        check_signals(input, target, self.settings)
        backend = select_backend(input.device, self.backend)
        return backend.mrstft_loss(input, target, self.settings)

    def extra_repr(self) -> str:
        return (f"fft_sizes={self.fft_sizes}, hop_sizes={self.hop_sizes}, "
                f"win_lengths={self.win_lengths}, window={self.window!r}, w_sc={self.w_sc}, "
                f"w_log_mag={self.w_log_mag}, w_lin_mag={self.w_lin_mag}, eps={self.eps}")
