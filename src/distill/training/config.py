"""Loss configuration: nested dataclasses whose attribute names existing training code reads.

Every value is checked when the object is built; a value that cannot work raises
``ValueError`` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Tuple


def _check_weight(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}.{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}.{name} must be finite and >= 0, got {value!r}")


def _check_sizes(owner: str, name: str, values) -> Tuple[int, ...]:
    try:
        sizes = tuple(values)
    except TypeError:
        raise ValueError(f"{owner}.{name} must be a sequence of positive ints, got {values!r}")
    if not sizes:
        raise ValueError(f"{owner}.{name} must not be empty")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise ValueError(f"{owner}.{name} must hold positive ints, got {values!r}")
    return sizes


@dataclass
class STFTLossConfig:
    """Multi-resolution STFT loss on the flattened magnitude channel."""

    weight: float = 1.0
    fft_sizes: Tuple[int, ...] = (512, 1024, 2048)
    hop_sizes: Tuple[int, ...] = (128, 256, 512)
    win_lengths: Tuple[int, ...] = (512, 1024, 2048)

    def __post_init__(self) -> None:
        _check_weight("STFTLossConfig", "weight", self.weight)
        self.fft_sizes = _check_sizes("STFTLossConfig", "fft_sizes", self.fft_sizes)
        self.hop_sizes = _check_sizes("STFTLossConfig", "hop_sizes", self.hop_sizes)
        self.win_lengths = _check_sizes("STFTLossConfig", "win_lengths", self.win_lengths)
        if not len(self.fft_sizes) == len(self.hop_sizes) == len(self.win_lengths):
            raise ValueError(
                "STFTLossConfig.fft_sizes, hop_sizes and win_lengths must have the same length, "
                f"got {len(self.fft_sizes)}, {len(self.hop_sizes)} and {len(self.win_lengths)}"
            )
        for n_fft, win in zip(self.fft_sizes, self.win_lengths):
            if win > n_fft:
                raise ValueError(
                    f"STFTLossConfig.win_lengths: window {win} is longer than its fft_size {n_fft}"
                )


@dataclass
class ReconLossConfig:
    """L1 on the magnitude channel plus magnitude-weighted L1 on the IF channel."""

    weight: float = 0.1
    magnitude_weight: float = 1.0
    if_weight: float = 0.5

    def __post_init__(self) -> None:
        for name in ("weight", "magnitude_weight", "if_weight"):
            _check_weight("ReconLossConfig", name, getattr(self, name))


@dataclass
class KLLossConfig:
    """Free-bits KL with a linear warm-up of its weight."""

    weight_max: float = 0.01
    warmup_fraction: float = 0.3
    free_bits: float = 0.1

    def __post_init__(self) -> None:
        _check_weight("KLLossConfig", "weight_max", self.weight_max)
        _check_weight("KLLossConfig", "free_bits", self.free_bits)
        _check_weight("KLLossConfig", "warmup_fraction", self.warmup_fraction)
        if self.warmup_fraction > 1:
            raise ValueError(
                f"KLLossConfig.warmup_fraction must lie in [0, 1], got {self.warmup_fraction!r}"
            )


@dataclass
class LossConfig:
    stft: STFTLossConfig = field(default_factory=STFTLossConfig)
    reconstruction: ReconLossConfig = field(default_factory=ReconLossConfig)
    kl: KLLossConfig = field(default_factory=KLLossConfig)


@dataclass
class TrainingConfig:
    """Training settings; ``loss`` is the nested config, the flat KL fields stay for old code."""

    loss: LossConfig = field(default_factory=LossConfig)
    kl_warmup_fraction: float = 0.3
    kl_weight_max: float = 0.01
    free_bits: float = 0.1
    latent_dim: int = 128
    batch_size: int = 32

    def __post_init__(self) -> None:
        _check_weight("TrainingConfig", "kl_weight_max", self.kl_weight_max)
        _check_weight("TrainingConfig", "free_bits", self.free_bits)
        _check_weight("TrainingConfig", "kl_warmup_fraction", self.kl_warmup_fraction)
        if self.kl_warmup_fraction > 1:
            raise ValueError(
                "TrainingConfig.kl_warmup_fraction must lie in [0, 1], "
                f"got {self.kl_warmup_fraction!r}"
            )
        for name in ("latent_dim", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainingConfig.{name} must be a positive int, got {value!r}")
