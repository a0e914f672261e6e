"""The contract's tolerances: how close a backend's results must be to the float64 oracle.

Errors are relative, ``||a - b|| / ||b||`` (``||a - b||`` where ``b`` is 0) over the finite
elements of the oracle ``b``, and infinite unless ``a`` has the same NaNs and infinities in
the same places. Bounds:

- float64 inputs: 1e-10 on each loss, 1e-8 on each gradient;
- inputs below float64 (computed in float32), against the float64 oracle on the same inputs:
  on each loss max(1e-5, 2 x e), on each gradient max(1e-3, 2 x e), where e is the error of a
  correct float32 implementation (the oracle computed in the inputs' dtype) on that quantity:
  float32 rounding of small magnitudes in the log-magnitude term alone costs up to some 1e-2
  on realistic data; a backend may be better than that, never much worse.

``selfcheck`` (``python -m distill_fused``) and ``verification`` (``auto``'s check of the
triton backend) hold results to these bounds; the tests hold them to the same, with auraloss
itself as the oracle.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

LOSS_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
GRAD_TOLERANCE_FLOAT64 = 1e-8
GRAD_FLOOR_FLOAT32 = 1e-3


def compute_dtype_of(args: Sequence) -> torch.dtype:
    """float64 if any tensor argument is float64, else float32 (half precision is computed in
    float32)."""
    return torch.float64 if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64
                                for a in args) else torch.float32


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The relative error of ``a`` against the oracle ``b`` (the module docstring), as a
    0-dim float64 tensor on their device: computed there, nothing read back."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    finite = torch.isfinite(b)
    same_specials = ((torch.isnan(a) == torch.isnan(b)).all()
                     & torch.where(torch.isinf(b), a == b, True).all()
                     & torch.where(finite, torch.isfinite(a), True).all())
    diff = torch.where(finite, a - b, 0.0).norm()
    scale = torch.where(finite, b, 0.0).norm()
    error = torch.where(scale > 0, diff / scale, diff)
    return torch.where(same_specials, error, torch.inf)


def _bound(floor: float, own_error: Optional[torch.Tensor], like: torch.Tensor
           ) -> torch.Tensor:
    bound = torch.full((), floor, dtype=torch.float64, device=like.device)
    return bound if own_error is None else torch.maximum(bound, 2 * own_error)


def value_tolerance(dtype: torch.dtype, own_error: Optional[torch.Tensor],
                    like: torch.Tensor) -> torch.Tensor:
    """The bound on a loss's relative error for inputs computed in ``dtype``; ``own_error``:
    a correct float32 implementation's error on it (``None`` for float64)."""
    if dtype == torch.float64:
        return _bound(LOSS_TOLERANCE[torch.float64], None, like)
    return _bound(LOSS_TOLERANCE[torch.float32], own_error, like)


def gradient_tolerance(dtype: torch.dtype, own_error: Optional[torch.Tensor],
                       like: torch.Tensor) -> torch.Tensor:
    """The bound on a gradient's relative error (as ``value_tolerance``)."""
    if dtype == torch.float64:
        return _bound(GRAD_TOLERANCE_FLOAT64, None, like)
    return _bound(GRAD_FLOOR_FLOAT32, own_error, like)
