"""Backend selection: which backend's functions compute a call.

Every backend offers the same four functions, ``combined_loss`` and ``mrstft_loss`` and their
per-example variants (``reduction``, ``lengths``, per-resolution terms and weights: see
``backends/per_example.py``); a ``Backend`` below names them, one per backend:

- ``reference``: auraloss and plain torch (the oracle; ``backends/reference.py``);
- ``torch``: pure PyTorch with closed-form gradients, every device (``backends/torch_backend.py``);
- ``triton``: Triton kernels (``backends/triton_backend.py`` -> ``kernels/``), for CUDA tensors
  and for CPU tensors under ``TRITON_INTERPRET=1``. It imports Triton, so it is loaded on first
  use (and at import where it can serve, below); an ``ImportError`` makes it unavailable.

``auto`` picks ``triton`` for tensors on a device Triton compiles for (CUDA,
``core/devices.py``) when Triton imports, verified once per plan against ``torch``
(``verification.py``: a plan whose kernels raise or differ runs on ``torch`` from then on, with
a warning), else ``torch``, and says why in a debug message of the ``distill_fused`` logger (once
per reason, outside any traced code: ``logging.getLogger("distill_fused").setLevel(logging.DEBUG)``
shows it). ``verify``: ``False`` makes ``auto`` trust ``triton`` unchecked; ``True`` makes an
explicit ``triton`` check each plan too, and raise where it fails. An unknown or unavailable
name is a ``ValueError`` listing the backends available for the tensors at hand. The API layer
(``api/``) passes the name, and where it came from; nothing below imports this module.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Set, Tuple

import torch

from .backends import per_example, reference, torch_backend
from .core.devices import policy
from .core.tracing import tracing
from .verification import verified

NAMES = ("auto", "reference", "torch", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    combined_loss: Callable  # (recon, target, mu, logvar, config, kl_weight, stft, *, fft_grouping)
    mrstft_loss: Callable    # (x, y, settings, *, fft_grouping, clamped=False)
    combined_loss_per_example: Callable  # (recon, target, mu, logvar, config, kl_weight,
    #                                       stft, options)
    mrstft_loss_per_example: Callable    # (x, y, settings, options)
    verified: bool = False  # each plan checked against torch at its first call


REFERENCE = Backend("reference", reference.combined_loss, reference.mrstft_loss,
                    reference.combined_loss_per_example, reference.mrstft_loss_per_example)
TORCH = Backend("torch", torch_backend.combined_loss, torch_backend.mrstft_loss,
                partial(per_example.combined_loss, sums=per_example.TorchSums),
                partial(per_example.mrstft_loss, sums=per_example.TorchSums))

_triton: Optional[Backend] = None
_verified_triton: dict = {}  # strict -> the triton backend verified against torch
_triton_import_error: Optional[str] = None
_auto_reasons_logged: Set[str] = set()
logger = logging.getLogger("distill_fused")


def _load_triton() -> Optional[Backend]:
    """The ``triton`` backend, imported once; ``None`` where Triton does not import."""
    global _triton, _triton_import_error
    if _triton is None and _triton_import_error is None:
        try:
            from .backends import triton_backend
        except ImportError as exc:
            _triton_import_error = str(exc)
        else:
            _triton = Backend("triton", triton_backend.combined_loss,
                              triton_backend.mrstft_loss,
                              triton_backend.combined_loss_per_example,
                              triton_backend.mrstft_loss_per_example)
    return _triton


def _verified(strict: bool) -> Backend:
    """The ``triton`` backend, each function verified against ``torch``'s once per plan
    (``strict``: a failed plan raises instead of running on ``torch``)."""
    backend = _verified_triton.get(strict)
    if backend is None:
        triton = _load_triton()
        functions = {name: verified(name, getattr(triton, name), getattr(TORCH, name),
                                    strict=strict)
                     for name in ("combined_loss", "mrstft_loss", "combined_loss_per_example",
                                  "mrstft_loss_per_example")}
        backend = _verified_triton[strict] = Backend("triton", **functions, verified=True)
    return backend


def _triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors under its interpreter."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return False
    return _load_triton() is not None


def available_backends(device) -> List[str]:
    """The backends that can compute tensors on ``device`` here."""
    names = ["reference", "torch"]
    if _triton_usable(torch.device(device)):
        names.append("triton")
    return names


def select_backend(device, name: str = "auto", source: str = "the backend argument",
                   verify: Optional[bool] = None) -> Backend:
    """The backend named ``name`` (``source``: where the name came from, for the error) for
    tensors on ``device``; ``verify``: whether ``triton`` is verified against ``torch``
    (``None``: where ``auto`` picked it)."""
    device = torch.device(device)
    if name == "reference":
        return REFERENCE
    if name == "torch":
        return TORCH
    if name not in NAMES:
        raise ValueError(f"unknown loss backend {name!r} (from {source}); available for "
                         f"{device.type} tensors: "
                         f"{', '.join(['auto'] + available_backends(device))}")
    if name == "auto":
        return _auto(device, verify)
    if not _triton_usable(device):
        raise ValueError(f"loss backend {name!r} is not available for {device.type} tensors "
                         f"here ({_triton_unavailable(device)}); available: "
                         f"{', '.join(['auto'] + available_backends(device))}")
    return _verified(strict=True) if verify else _load_triton()


def auto_choice(device, verify: Optional[bool] = None) -> Tuple[Backend, str]:
    """``auto``'s choice for tensors on ``device``, and why, in words."""
    device = torch.device(device)
    compiled = policy(device).compiled_triton
    if compiled and _triton_usable(device) and verify is False:
        chosen, why = _load_triton(), (f"{device.type} tensors, and Triton imports (verify=False: "
                                       "trusted without a check)")
    elif compiled and _triton_usable(device):
        chosen, why = _verified(strict=False), (
            f"{device.type} tensors, and Triton imports: each plan's first call is verified "
            "against the torch backend")
    elif compiled:
        chosen, why = TORCH, (f"{device.type} tensors, but Triton does not import "
                              f"({_triton_import_error})")
    else:
        chosen, why = TORCH, (f"{device.type} tensors: the triton backend runs CUDA tensors "
                              "(auto never picks Triton's interpreter; name backend='triton' "
                              "under TRITON_INTERPRET=1 for that)")
    return chosen, why


def _triton_unavailable(device: torch.device) -> str:
    """Why the triton backend cannot compute tensors on ``device`` here, and what would make it
    (Triton installed, and CUDA tensors or the interpreter)."""
    _load_triton()
    if _triton_import_error is not None:
        missing = "No module named 'triton'" in _triton_import_error
        return (f"Triton {'is not installed' if missing else 'does not import'}: "
                f"{_triton_import_error}. Install it with pip install 'distill-fused[triton]' "
                "(from a checkout: pip install '.[triton]'), or use a CUDA build of torch, "
                "which brings it")
    return ("Triton runs CUDA tensors, or CPU tensors under its interpreter (set "
            "TRITON_INTERPRET=1 before Python starts: slow, for checking the kernels)")


def _auto(device: torch.device, verify: Optional[bool] = None) -> Backend:
    """``auto_choice``, logged (at DEBUG) the first time each reason holds."""
    chosen, why = auto_choice(device, verify)
    if not tracing() and why not in _auto_reasons_logged:
        _auto_reasons_logged.add(why)
        logger.debug("loss backend auto -> %s: %s", chosen.name, why)
    return chosen


# Where the triton backend can serve (a CUDA build of torch, or the interpreter) it is imported
# with the package: a step compiled by torch.compile must find it loaded, since Dynamo cannot
# trace an import. (``torch.version.cuda`` is a build fact: no CUDA call is made here.)
if torch.version.cuda is not None or os.environ.get("TRITON_INTERPRET") == "1":
    _load_triton()
