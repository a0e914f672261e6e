"""Training loop and configuration (stand-in: the application's config and epoch functions)."""

from distill.training.config import (
    ComplexSpectrogramConfig,
    KLLossConfig,
    LossConfig,
    OverfittingPreset,
    ReconLossConfig,
    RegularizationConfig,
    STFTLossConfig,
    TrainingConfig,
    get_adaptive_config,
    get_effective_preview_interval,
)
from distill.training.loop import train_epoch, validate_epoch

__all__ = [
    "ComplexSpectrogramConfig",
    "KLLossConfig",
    "LossConfig",
    "OverfittingPreset",
    "ReconLossConfig",
    "RegularizationConfig",
    "STFTLossConfig",
    "TrainingConfig",
    "get_adaptive_config",
    "get_effective_preview_interval",
    "train_epoch",
    "validate_epoch",
]
