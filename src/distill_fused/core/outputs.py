"""What every backend's ``combined_loss`` returns, and in which dtype."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

# The names of the losses, in the order the kernels write them.
LOSS_KEYS = ("total_loss", "stft_loss", "mag_recon_loss", "if_recon_loss", "kl_loss",
             "recon_loss")

# The six losses by name, and the guard's decision (0-dim, true/nonzero where the total was
# finite) for ``distill_fused.api.nonfinite``.
Combined = Tuple[Dict[str, torch.Tensor], torch.Tensor]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a loss is computed and returned in, and the kernels accumulate in: float64 if
    any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
