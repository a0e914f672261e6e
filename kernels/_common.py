"""What every kernel module shares: op registration, output allocation (which the tests
poison and guard), 32-bit index math, float64 scalars as float32 pairs, torch's sign, and
the scaling of a term's gradient by its incoming gradient.

Counts that grow with the batch (signals, examples, programs of a grid, a row offset) are
``do_not_specialize`` in every kernel: Triton specializes an integer argument on being 1 and on
divisibility by 16, so the last, smaller batch of an epoch would otherwise compile each kernel
anew (``tests/gpu_compile.py`` reports what a step compiles). Element counts that bound a
tile's loads keep their specialization (divisibility lets loads be vectorized).

Loops whose bound is a runtime argument are written ``while i < n: ... i += step``, not
``for i in range(0, n, step)``: Triton 3.6's interpreter turns such a bound into a Python int
with ``int()`` of a size-1 array, which NumPy >= 2.4 refuses. Compiled, such a loop is an
``scf.while`` instead of an ``scf.for`` (which Triton may software-pipeline); what it compiles
to is in ``bench/results/aot-sm90.md``."""

from __future__ import annotations

import os
from typing import Dict, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch._guards import detect_fake_mode

from ..core.tracing import tracing

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# torch >= 2.6 has triton_op/wrap_triton: torch.compile then sees through the kernel launches.
# Under TRITON_INTERPRET=1 the kernels are interpreted functions, which wrap_triton cannot
# trace (and older torch lacks it): there the ops are opaque custom ops.
TRACEABLE_KERNELS = hasattr(torch.library, "triton_op") and not INTERPRETED


def kernel_op(name: str, *, mutates_args=()):
    """Register a launcher (a function that allocates its outputs and launches kernels through
    ``wrap_triton``) as the ``torch.library`` op ``name``, one way for both modes:

    - compiled Triton (a GPU): ``torch.library.triton_op``, whose fake implementation is the
      launcher itself traced with fake tensors (``wrap_triton`` records the launches);
    - the interpreter: ``torch.library.custom_op`` whose fake implementation is again the
      launcher, its launches skipped while fake tensors are traced (``wrap_triton`` below).

    So an op's output shapes, dtypes and strides have one source, the launcher, in both."""
    def register(launcher):
        if TRACEABLE_KERNELS:
            return torch.library.triton_op(name, launcher, mutates_args=mutates_args)
        op = torch.library.custom_op(name, launcher, mutates_args=mutates_args)
        op.register_fake(launcher)
        return op
    return register


if TRACEABLE_KERNELS:
    wrap_triton = torch.library.wrap_triton
else:
    def wrap_triton(kernel):
        """``wrap_triton(kernel)[grid](*args)`` launches ``kernel``, except while fake tensors
        are being traced or on meta tensors: then the launcher is running as its op's fake
        implementation, where only the outputs' metadata counts. (A fake tensor reaching an
        eager launch is not skipped: Triton then fails on it, loudly.)"""
        return _LaunchUnlessFake(kernel)

    class _LaunchUnlessFake:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if detect_fake_mode() is not None or any(
                        isinstance(a, torch.Tensor) and a.is_meta
                        for a in (*args, *kwargs.values())):
                    return None
                return self.kernel[grid](*args, **kwargs)
            return launch


# Launch options of a kernel run as a single program (an epilogue): its occupancy cannot
# matter, so ptxas may use every register (left to its own heuristic, Triton 3.6's ptxas holds
# some epilogues to 64 registers and spills), and 8 warps share its reads.
ONE_PROGRAM = {"num_warps": 8, "maxnreg": 255}


def empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here. The tests replace it: each buffer then
    starts as NaN (an element a kernel skips shows up) inside guard bands that must stay
    untouched (a store past either end fails the test)."""
    return torch.empty(shape, dtype=dtype, device=device)


def index_dtype(block: int, *tensors: torch.Tensor):
    """``tl.int32`` for the index math over ``tensors`` (any strides) in tiles of ``block``
    when every element offset, and every tile start, fits in 32 bits, else ``tl.int64``.
    (A 64-bit integer division is a call to a division routine on NVIDIA GPUs; 32-bit is
    inline.)"""
    reach = max(sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
                for t in tensors)
    reach = max([reach] + [t.numel() for t in tensors])
    return tl.int32 if reach + block <= 2**31 - 1 else tl.int64


# Indices below this bound take 32-bit index math with divisions by multiply-shift (``magic``,
# exact below 2**30); past it, a kernel's ``WIDE`` flag selects 64-bit indices and divisions.
# Half of int32's range: a loop that steps a tile start past the end (by a grid's worth of
# tiles) still stays below 2**31.
INDEX_LIMIT = 2**30 - 1


def past_index_limit(extent: int) -> bool:
    """Whether indices up to ``extent`` need the 64-bit path (read at call time: the tests
    lower the limit to take that path)."""
    return extent > INDEX_LIMIT


def is_wide(block: int, *tensors: torch.Tensor) -> bool:
    """The ``WIDE`` flag of the kernels that divide by ``divide``: whether an element offset
    of ``tensors`` (any strides) or a tile start, in tiles of ``block``, passes
    ``INDEX_LIMIT``."""
    reach = max(max(sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1,
                    t.numel()) for t in tensors)
    return past_index_limit(reach + block)


def magic(divisor: int) -> Tuple[int, int]:
    """``(m, s)`` such that ``n // divisor == (n * m) >> s`` for every ``0 <= n < 2**30``
    (Granlund and Montgomery, "Division by invariant integers using multiplication", 1994,
    theorem 4.2 with N = 30): ``s = 30 + ceil(log2 divisor)``, ``m = ceil(2**s / divisor)``,
    so ``m < 2**31`` (an int32 meta table holds it) and the product fits in 61 bits."""
    if divisor < 1:
        raise ValueError(f"a divisor must be positive, got {divisor}")
    shift = 30 + (divisor - 1).bit_length()
    return -(-(1 << shift) // divisor), shift


@triton.jit
def divide(n, divisor, m, s, WIDE: tl.constexpr):
    """``n // divisor`` for ``n >= 0``: with 32-bit index math (``WIDE`` false: ``n < 2**30``)
    one 64-bit multiply and a shift by ``magic(divisor) = (m, s)``, computed on the host; a
    division is a subroutine call of some 70 instructions on NVIDIA GPUs for 64-bit integers
    and a sequence of some 20 for 32-bit ones. With ``WIDE`` (64-bit indices) a division."""
    if WIDE:
        return n // divisor
    else:
        return ((n.to(tl.int64) * m) >> s).to(tl.int32)


def tl_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32}[dtype]


_DEVICE_CONSTANTS: Dict[tuple, torch.Tensor] = {}


def device_constants(values: Tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a float64 tensor on ``device``, for kernels that need float64 scalars in
    full (Triton passes a Python float as float32) or values that change every step without a
    recompilation. Kept per value (a run has few), so a step with known values launches
    nothing for them."""
    if tracing():  # a graph constant; a tensor made while tracing must not outlive the graph
        return torch.tensor(values, dtype=torch.float64, device=device)
    key = (values, device)
    value = _DEVICE_CONSTANTS.get(key)
    if value is not None:
        return value
    # Filled on the device, not copied from the host: a blocking host-to-device copy would
    # synchronize the stream (a new kl_weight every step would then cost a sync every step),
    # and cannot be captured in a CUDA graph.
    value = torch.empty(len(values), dtype=torch.float64, device=device)
    for i, v in enumerate(values):
        value[i].fill_(v)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return value  # filled only once the graph replays: not for the cache
    if len(_DEVICE_CONSTANTS) >= 64:
        _DEVICE_CONSTANTS.clear()
    _DEVICE_CONSTANTS[key] = value
    return value


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
def gated_grad(reached, scale, grad):
    """``scale * grad`` where the term is ``reached`` by an incoming gradient, else exactly 0:
    a term that no gradient reaches (the non-finite guard cuts one off by sending it 0) sends
    nothing to the inputs, even where its own gradient is NaN or inf (``0 * nan`` must not
    reach an input). ``core.gradients.gated_grad`` is the same rule in torch."""
    return tl.where(reached, scale * grad, 0.0)


@triton.jit
def signum(x):
    """``torch.sign``: -1, 0 or 1, with 0 for ties and for NaN, as torch has it on every device
    (so the gradient of ``|x|`` at a NaN ``x`` is 0, as ``torch.abs``'s backward gives)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
