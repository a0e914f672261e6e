"""Training configuration."""
from .config import KLLossConfig, LossConfig, ReconLossConfig, STFTLossConfig, TrainingConfig

__all__ = ["LossConfig", "STFTLossConfig", "ReconLossConfig", "KLLossConfig", "TrainingConfig"]
