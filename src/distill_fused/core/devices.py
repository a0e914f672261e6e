"""What each kind of device has, as far as this package's code needs to know: the one place
where code asks "is this MPS?" or "is this a GPU Triton compiles for?".

=========  ========  ===================  =====================  ===========================
device     ``host``  ``float64``          ``device_asserts``     ``compiled_triton``
=========  ========  ===================  =====================  ===========================
``cpu``    yes       yes                  (not needed)           no
``cuda``   no        yes                  yes                    yes: ``auto`` picks the
                                                                 (verified) ``triton``
                                                                 backend there
``mps``    no        no (nor complex128)  from torch 2.13        no
other      no        yes                  no                     no
=========  ========  ===================  =====================  ===========================

The backends read ``policy(device)`` instead of ``device.type``, so that a test can apply one
device's policy to another's tensors (``emulated``): CPU tensors under MPS's policy take
every branch the code takes on a Mac, and under CUDA's, ``auto`` picks the ``triton`` backend
(run by Triton's interpreter). Nothing else changes: the tensors stay where they are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator

import torch


@dataclass(frozen=True)
class DevicePolicy:
    """``host``: its tensors live in host memory, so reading a value back costs no sync.
    ``float64``: the device has float64 and complex128 tensors (MPS has neither).
    ``device_asserts``: torch asserts on the device there (``torch._assert_async``, no sync);
    MPS has it from torch 2.13 (pytorch/pytorch#186562), before which the op raises
    ``NotImplementedError`` there. ``compiled_triton``: Triton compiles kernels for it, so
    ``auto`` picks ``triton``."""

    host: bool = False
    float64: bool = True
    device_asserts: bool = False
    compiled_triton: bool = False


def _torch_at_least(major: int, minor: int) -> bool:
    return tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (major, minor)


POLICIES: Dict[str, DevicePolicy] = {
    "cpu": DevicePolicy(host=True),
    "cuda": DevicePolicy(device_asserts=True, compiled_triton=True),
    "mps": DevicePolicy(float64=False, device_asserts=_torch_at_least(2, 13)),
}
DEFAULT = DevicePolicy()

# device type -> the device type whose policy its tensors follow (``emulated``).
_EMULATED: Dict[str, str] = {}


def policy(device) -> DevicePolicy:
    """The policy of tensors on ``device`` (a ``torch.device`` or its name)."""
    kind = torch.device(device).type
    return POLICIES.get(_EMULATED.get(kind, kind), DEFAULT)


def accumulation_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """float64 where the device has it, else ``dtype``: the dtype of sums that may cancel."""
    return torch.float64 if policy(device).float64 else dtype


@contextlib.contextmanager
def emulated(device_type: str, like: str) -> Iterator[None]:
    """Tensors on ``device_type`` follow the policy of ``like`` while this is active (for tests:
    ``emulated("cpu", like="mps")`` runs the MPS branches on CPU tensors)."""
    before = _EMULATED.get(device_type)
    _EMULATED[device_type] = like
    try:
        yield
    finally:
        if before is None:
            _EMULATED.pop(device_type, None)
        else:
            _EMULATED[device_type] = before
