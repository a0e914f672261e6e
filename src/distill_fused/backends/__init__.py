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
from typing import Dict, List, Optional

import torch

from . import reference, torch_backend

ENV_VAR = "DISTILL_LOSS_BACKEND"
NAMES = ("auto", "reference", "torch", "triton")

_MODULES = {"reference": ".reference", "torch": ".torch_backend", "triton": ".triton_backend"}


# Backend modules by name. The light ones are imported here, ``triton`` (optional) below.
_LOADED: Dict[str, ModuleType] = {"reference": reference, "torch": torch_backend}
_IMPORT_FAILED: Dict[str, str] = {}


def _load(name: str) -> Optional[ModuleType]:
    """Backend module ``name``, imported once; ``None`` if it does not import."""
    if name not in _LOADED and name not in _IMPORT_FAILED:
        try:
            _LOADED[name] = importlib.import_module(_MODULES[name], __name__)
        except ImportError as exc:
            _IMPORT_FAILED[name] = str(exc)
    return _LOADED.get(name)


def _triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors under its interpreter."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return False
    return _load("triton") is not None


def available_backends(device: torch.device) -> List[str]:
    names = ["reference", "torch"]
    if _triton_usable(torch.device(device)):
        names.append("triton")
    return names


def select_backend(device, name: Optional[str] = None) -> ModuleType:
    """The backend module for tensors on ``device``."""
    device = torch.device(device)
    requested = name or os.environ.get(ENV_VAR) or "auto"
    if requested in ("reference", "torch"):
        return _LOADED[requested]
    if requested not in NAMES:
        raise ValueError(f"unknown loss backend {requested!r} (from "
                         f"{'the backend argument' if name else ENV_VAR}); available for "
                         f"{device.type} tensors: "
                         f"{', '.join(['auto'] + available_backends(device))}")
    if requested == "auto":
        requested = "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
    elif requested not in available_backends(device):
        why = _IMPORT_FAILED.get(
            requested, "Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1")
        raise ValueError(f"loss backend {requested!r} is not available for {device.type} tensors "
                         f"here ({why}); available: "
                         f"{', '.join(['auto'] + available_backends(device))}")
    return _load(requested)


# Where the triton backend can serve (a CUDA build of torch, or the interpreter) it is imported
# with the package: a step compiled by torch.compile must find it loaded, since Dynamo cannot
# trace an import. (``torch.version.cuda`` is a build fact: no CUDA call is made here.)
if torch.version.cuda is not None or os.environ.get("TRITON_INTERPRET") == "1":
    _load("triton")
