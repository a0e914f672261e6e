"""Backend selection.

``auto`` (the default) picks ``triton`` for CUDA tensors when Triton imports, else ``torch``.
The environment variable ``DISTILL_LOSS_BACKEND`` (``auto``, ``reference``, ``torch``,
``triton``) overrides that choice; a name passed explicitly overrides both. An unknown or
unavailable name is a ``ValueError`` listing the backends available for the tensors at hand.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import List, Optional

import torch

ENV_VAR = "DISTILL_LOSS_BACKEND"
NAMES = ("auto", "reference", "torch", "triton")

_MODULES = {"reference": ".reference", "torch": ".torch_backend", "triton": ".triton_backend"}


def _triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors under its interpreter."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return False
    try:
        importlib.import_module(_MODULES["triton"], __name__)
    except ImportError:
        return False
    return True


def available_backends(device: torch.device) -> List[str]:
    names = ["reference", "torch"]
    if _triton_usable(torch.device(device)):
        names.append("triton")
    return names


def select_backend(device, name: Optional[str] = None) -> ModuleType:
    """The backend module for tensors on ``device``."""
    device = torch.device(device)
    requested = name or os.environ.get(ENV_VAR) or "auto"
    if requested not in NAMES:
        raise ValueError(f"unknown loss backend {requested!r} (from "
                         f"{'the backend argument' if name else ENV_VAR}); available for "
                         f"{device.type} tensors: {', '.join(['auto'] + available_backends(device))}")
    if requested == "auto":
        requested = "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    elif requested not in available_backends(device):
        raise ValueError(f"loss backend {requested!r} is not available for {device.type} tensors "
                         f"here; available: {', '.join(['auto'] + available_backends(device))}")
    return importlib.import_module(_MODULES[requested], __name__)
