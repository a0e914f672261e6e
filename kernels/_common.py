"""What every kernel module shares: the ``torch.library`` shims, output allocation (which the
tests poison), accumulator dtypes and the NaN-preserving sign."""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

# torch >= 2.6 has triton_op/wrap_triton: torch.compile then sees through the kernel launch.
# Under TRITON_INTERPRET=1 (CPU tensors) wrap_triton cannot trace the interpreted kernels, and
# older torch lacks it: there the ops are opaque custom ops with explicit fake (meta)
# implementations, which torch.compile also traces without a graph break.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRACEABLE_KERNELS = hasattr(torch.library, "triton_op") and not INTERPRETED

if TRACEABLE_KERNELS:
    triton_op = torch.library.triton_op
    wrap_triton = torch.library.wrap_triton
else:
    triton_op = torch.library.custom_op

    def wrap_triton(kernel):
        return kernel


def register_fake(op, fake):
    """Give an opaque op its fake implementation (a ``triton_op`` derives its own)."""
    if not TRACEABLE_KERNELS:
        op.register_fake(fake)


def empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (tests replace it with a NaN-filled one
    to prove that the kernels write every element they return)."""
    return torch.empty(shape, dtype=dtype, device=device)


def accumulator_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation; fp64 when an input is fp64 (the float64 oracle tolerance is 1e-10)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tl_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32}[dtype]


def f64_parts(value: float):
    """``(hi, lo)`` float32 parts of ``value`` (``hi + lo`` keeps ~48 bits).

    Triton passes Python floats to kernels as fp32; a weight such as 0.1 would then carry a
    1e-8 relative error into float64 results (the spec allows 1e-10). Kernels take both parts
    and join them in their accumulator dtype (``joined``)."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


@triton.jit
def joined(hi, lo, ACC: tl.constexpr):
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def reciprocal(count, ACC: tl.constexpr):
    """``1 / count`` of an integer argument, computed in the accumulator dtype."""
    return 1.0 / tl.cast(count, ACC)


@triton.jit
def signum(x):
    """``torch.sign``: -1, 0 or 1, and NaN for NaN (so a NaN input gives a NaN gradient, as the
    gradient of ``torch.abs`` does). Ties (x == 0) give 0."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x))
