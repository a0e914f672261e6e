"""Whether tensors made now are real: not while torch.compile traces, nor under a fake-tensor
mode (torch.compile's, or a test's). Caches of device tensors (windows, plans, kl_weight
scalars) are filled only when they are."""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode


def tracing() -> bool:
    # is_compiling() first: Dynamo answers it as a constant and never traces detect_fake_mode.
    return torch.compiler.is_compiling() or detect_fake_mode() is not None
