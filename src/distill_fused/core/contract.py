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

``verification`` (``auto``'s check of the triton backend) holds results to these bounds;
``selfcheck`` (``python -m distill_fused``) and the tests hold float32 losses to a flat 1e-5
(with the phase term, to max(1e-5, 2 e): docs/testing.md) and gradients to the same rule, with
auraloss itself as the oracle.
"""

from __future__ import annotations

from typing import Optional

import torch

LOSS_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
GRAD_TOLERANCE_FLOAT64 = 1e-8
GRAD_FLOOR_FLOAT32 = 1e-3


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
    if own_error is None:
        return bound
    # An implementation that overflows where the oracle does not widens nothing.
    return torch.where(torch.isfinite(own_error), torch.maximum(bound, 2 * own_error), bound)


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
