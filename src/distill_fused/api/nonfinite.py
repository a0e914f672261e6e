"""What the non-finite guard did, on demand, without a host sync by default.

Where ``total_loss`` is not finite, ``compute_combined_loss`` returns ``recon_loss`` in its
place (with ``recon_loss``'s gradients alone), decided on the device. The seed code logged a
warning when that happened; reading the decision on the host costs a device sync per step,
so here it is a choice, made with ``set_nonfinite_mode(mode)``, the environment variable
``DISTILL_NONFINITE``, or ``compute_combined_loss(..., nonfinite=mode)`` for one call:

``"silent"`` (the default)
    Nothing more: no extra work, no sync.
``"count"``
    Each call adds 1 where the guard fired to a counter kept on the inputs' device (one small
    extra kernel per call on a GPU, no sync). ``nonfinite_count(device)`` returns that counter
    as a 0-dim int64 tensor; reading it (``int(...)``) is the one sync, when you choose. It
    counts calls (validation calls too), not optimizer steps. Under CUDA graph capture, make
    the counter first (``nonfinite_count(device)`` once, before capturing).
``"warn"``
    Counts, and logs the seed's warning (logger ``distill_fused``) when the guard fired. This
    reads a flag back to the host after every call: a device sync per step, as the seed had.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Union

import torch

from .environment import NONFINITE_VAR, nonfinite_mode_variable

MODES = ("silent", "count", "warn")

logger = logging.getLogger("distill_fused")

_mode: Optional[str] = None  # None: from the environment, else "silent"
_counters: Dict[torch.device, torch.Tensor] = {}


def _check_mode(mode, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{source} must be one of {', '.join(repr(m) for m in MODES)}, "
                         f"got {mode!r}")
    return mode


def set_nonfinite_mode(mode: Optional[str]) -> None:
    """``"silent"``, ``"count"`` or ``"warn"`` for every later call; ``None``: back to the
    environment variable ``DISTILL_NONFINITE`` (default ``"silent"``)."""
    global _mode
    _mode = None if mode is None else _check_mode(mode, "the non-finite mode")


def nonfinite_mode(override: Optional[str] = None) -> str:
    """The mode a call runs in: its own ``nonfinite=`` argument, else the one set, else the
    environment's, else ``"silent"``."""
    if override is not None:
        return _check_mode(override, "nonfinite")
    if _mode is not None:
        return _mode
    env = nonfinite_mode_variable()
    return _check_mode(env, NONFINITE_VAR) if env else "silent"


def nonfinite_count(device: Union[str, torch.device]) -> torch.Tensor:
    """How many calls with inputs on ``device`` fell back to ``recon_loss`` (counted in the
    ``"count"`` and ``"warn"`` modes): a 0-dim int64 tensor on that device, a copy taken
    without a sync (reading its value is one)."""
    return _counter(torch.device(device)).clone()


def reset_nonfinite_count(device: Union[str, torch.device, None] = None) -> None:
    """Start counting again from 0, on ``device`` (``None``: on every device)."""
    devices = list(_counters) if device is None else [_device_key(torch.device(device))]
    for key in devices:
        if key in _counters:
            _counters[key].zero_()


def _device_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _counter(device: torch.device) -> torch.Tensor:
    key = _device_key(device)
    counter = _counters.get(key)
    if counter is None:
        counter = _counters[key] = torch.zeros((), dtype=torch.int64, device=key)
    return counter


def record(finite: torch.Tensor, mode: str) -> None:
    """Account for one call whose guard decision is ``finite`` (0-dim: true/nonzero where the
    total was finite), in ``mode``."""
    if mode == "silent":
        return
    fired = finite.detach() == 0
    _counter(finite.device).add_(fired)
    if mode == "warn" and bool(fired):  # the documented host read of this mode
        logger.warning("compute_combined_loss: total_loss is NaN/Inf, "
                       "falling back to recon_loss only")
