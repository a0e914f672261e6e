"""What a loss call asks beyond the default: ``reduction``, ``lengths``, per-resolution terms
(``backends/per_example.py`` computes it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class Options:
    """What a call asks beyond the default: ``reduction``, ``lengths`` (``[B]`` integers on the
    inputs' device, already checked), per-resolution terms in the result."""

    reduction: str = "mean"
    lengths: Optional[torch.Tensor] = None
    per_resolution_terms: bool = False
