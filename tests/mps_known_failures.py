"""Ops known to fail on MPS, from PyTorch's MPS sources and issue reports: what the MPS path
must not dispatch (``tests/test_mps_path.py``).

Each entry is one report: the op, the dtypes it fails for, how it fails, when (the torch
versions, ``fixed_in`` the first release with the fix, ``None`` while it is open; the macOS
versions, in words), the link, and ``matches``: the calls it fails for, judged from the
recorded call's arguments (``mps_ops.Dispatched``: shapes, strides, dtypes, the other
arguments); ``None``: every call of the op with those dtypes. An entry that affects the
installed torch and matches a call of the MPS path fails the test. ``requires``: a
requirement of the platform the report implies (docs/backends.md must state it where the
path meets the op). Reports of numerical differences that no call's arguments can tell
(``numerics=True``) are listed for the docs, and not checked.

Gathered on 2026-12-07 from the stored copies of pytorch/pytorch's issues and pull requests
and its MPS sources (``aten/src/ATen/native/mps/operations``), and from the installed torch
2.13.0 (its ``native_functions.yaml``, and the MPS expectations of its own test suite,
``torch/testing/_internal/common_mps.py``). Release dates (pytorch/pytorch#186934): 2.13's
branch cut the week of 2026-06-08, 2.14's the week of 2026-08-10; a fix merged between is
taken to be in 2.14 (``approx`` in ``when``). torch 2.12 and later need macOS 14
(conda-forge/pytorch-cpu-feedstock#497).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, FrozenSet, Optional

import torch

from mps_ops import Dispatched

TWO_16 = 1 << 16


@dataclass(frozen=True)
class KnownFailure:
    op: str
    dtypes: FrozenSet[str]  # dtype names (``float32``, ...); empty: every dtype
    fails: str
    when: str
    link: str
    fixed_in: Optional[str] = None
    since: Optional[str] = None
    matches: Optional[Callable[[Dispatched], bool]] = None
    requires: Optional[str] = None
    numerics: bool = False

    def affects(self, version: str = torch.__version__) -> bool:
        """Whether torch ``version`` has the failure."""
        v = _version(version)
        return ((self.since is None or v >= _version(self.since))
                and (self.fixed_in is None or v < _version(self.fixed_in)))

    def hits(self, call: Dispatched) -> bool:
        """Whether ``call`` is one the failure is reported for."""
        if call.name != self.op and call.name.split(".")[0] != self.op:
            return False
        dtypes = {str(d).replace("torch.", "") for d in call.dtypes}
        if self.dtypes and not dtypes & self.dtypes:
            return False
        return self.matches is None or bool(self.matches(call))


def _version(text: str):
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def _dtypes(*names: str) -> FrozenSet[str]:
    return frozenset(names)


def _last_dim(call: Dispatched, index: int = 0) -> int:
    return call.tensor(index).shape[-1]


KNOWN_FAILURES = [
    KnownFailure(
        "aten::reflection_pad1d_backward", _dtypes(),
        "wrong gradients, silently, from index T % 65536 on (the forward is right)",
        "a padded length T > 65536 that is no multiple of 65536; torch 2.13 and 2.14 (the "
        "fix, pytorch/pytorch#196985, came after 2.14); reached through torch.stft's autograd",
        "https://github.com/pytorch/pytorch/issues/196949",
        matches=lambda c: _last_dim(c) > TWO_16 and _last_dim(c) % TWO_16 != 0),
    KnownFailure(
        "aten::convolution", _dtypes(),
        "NotImplementedError: 'Output channels > 65536 not supported at the MPS device' (the "
        "check reads every output size, the length included)",
        "macOS 14 and 15.0 (fixed for macOS 15.1 by pytorch/pytorch#140726; 1-D convolutions "
        "freed on every macOS by pytorch/pytorch#193021, after 2.13)",
        "https://github.com/pytorch/pytorch/issues/142515",
        matches=lambda c: any(size > TWO_16 for size in c.output(0).shape)),
    KnownFailure(
        "aten::convolution", _dtypes("float32", "float16"),
        "wrong results, silently: a non-contiguous weight is read as a contiguous one",
        "macOS 15 and later; fixed by pytorch/pytorch#192303 (2026-08-06: 2.14, approx)",
        "https://github.com/pytorch/pytorch/issues/192212", fixed_in="2.14",
        matches=lambda c: not c.tensor(1).contiguous),
    KnownFailure(
        "aten::convolution", _dtypes(),
        "wrong results, silently, for a kernel of 256 or more along a dimension",
        "fixed by pytorch/pytorch#188359 (2026-06-29: 2.14, approx)",
        "https://github.com/pytorch/pytorch/pull/188359", fixed_in="2.14",
        matches=lambda c: max(c.tensor(1).shape[2:]) >= 256),
    KnownFailure(
        "aten::convolution_backward", _dtypes("float32"),
        "a wrong weight gradient, silently",
        "a batch of 65536 or more; open",
        "https://github.com/pytorch/pytorch/issues/96225",
        matches=lambda c: c.args[-1][1] and c.tensor(0).shape[0] >= TWO_16),
    KnownFailure(
        "aten::convolution_backward", _dtypes("float32"),
        "'view size is not compatible with input tensor's size and stride' for a non-contiguous "
        "grad_output (a regression of 2.5)",
        "torch 2.5; fixed by pytorch/pytorch#143196 (2.6, approx)",
        "https://github.com/pytorch/pytorch/issues/142344", since="2.5", fixed_in="2.6",
        matches=lambda c: not c.tensor(0).contiguous),
    KnownFailure(
        "aten::_fft_r2c", _dtypes(),
        "a crash (SIGABRT from MPSGraph, not catchable)",
        "more than 4 dims, the transform not over the last ones; fixed by "
        "pytorch/pytorch#186967 (2026-06-12: 2.14, approx)",
        "https://github.com/pytorch/pytorch/issues/186885", fixed_in="2.14",
        matches=lambda c: len(c.tensor(0).shape) > 4),
    KnownFailure(
        "aten::_fft_c2r", _dtypes(),
        "a crash (SIGABRT from MPSGraph, not catchable)",
        "more than 4 dims (pytorch/pytorch#188864, hfft of 5-D tensors, open in 2026-07)",
        "https://github.com/pytorch/pytorch/issues/188864",
        matches=lambda c: len(c.tensor(0).shape) > 4),
    KnownFailure(
        "aten::_fft_c2r", _dtypes("complex64"),
        "wrong results: torch 2.13's own MPS tests expect fft.hfft2 (a 2-D C2R) to fail",
        "macOS before 14.4 (MACOS_BEFORE_14_4_XFAILLIST in torch/testing/_internal/"
        "common_mps.py of torch 2.13); our C2R transforms are 1-D",
        "https://github.com/pytorch/pytorch/blob/main/torch/testing/_internal/common_mps.py",
        matches=lambda c: len(c.args[1]) >= 2),
    KnownFailure(
        "aten::_fft_r2c", _dtypes("float32", "complex64"),
        "RuntimeError: 'FFT operations are only supported on MacOS 14+'",
        "macOS before 14 (torch 2.12 and later need macOS 14 anyway)",
        "https://github.com/pytorch/pytorch/blob/main/aten/src/ATen/native/mps/operations/"
        "FastFourierTransform.mm", requires="macOS 14"),
    KnownFailure(
        "aten::_fft_r2c", _dtypes("float16", "bfloat16"),
        "not implemented (torch 2.13's MPS tests list stft in float16 and bfloat16 as "
        "unimplemented)",
        "open; this path upcasts half precision to float32 before any FFT",
        "https://github.com/pytorch/pytorch/blob/main/torch/testing/_internal/common_mps.py",
        matches=lambda c: c.tensor(0).dtype in (torch.float16, torch.bfloat16)),
    KnownFailure(
        "aten::mul.Tensor", _dtypes("complex64"),
        "INTERNAL ASSERT FAILED in BinaryKernel.mm (complex times real)",
        "torch 2.2; fixed after it (pytorch/pytorch#119120; 2.3, approx)",
        "https://github.com/pytorch/pytorch/issues/119088", fixed_in="2.3",
        matches=lambda c: len({t.dtype.is_complex for t in c.tensors()}) == 2),
    KnownFailure(
        "aten::angle", _dtypes("complex64"),
        "not implemented on MPS",
        "before pytorch/pytorch#143449 (2025-01-04: 2.7, approx); this path calls no angle",
        "https://github.com/pytorch/pytorch/pull/143449", fixed_in="2.7"),
    KnownFailure(
        "aten::scatter_add_", _dtypes(),
        "does nothing, silently, into a slice at a nonzero storage offset",
        "macOS 14 (torch 2.13's own decompositions avoid it there); open",
        "https://github.com/pytorch/pytorch/issues/163327",
        matches=lambda c: c.tensor(0).offset != 0),
    KnownFailure(
        "aten::index_add_", _dtypes(),
        "leaves a transposed destination unchanged, silently",
        "macOS 14; pytorch/pytorch#176171 (2026-03) says it fixes it (2.12, approx)",
        "https://github.com/pytorch/pytorch/issues/176159", fixed_in="2.12",
        matches=lambda c: not c.tensor(0).contiguous),
    KnownFailure(
        "aten::masked_fill_.Scalar", _dtypes(),
        "wrong values, silently, in place on a non-contiguous tensor",
        "fixed by pytorch/pytorch#131957 (2.5)",
        "https://github.com/pytorch/pytorch/pull/131957", fixed_in="2.5",
        matches=lambda c: not c.tensor(0).contiguous),
    KnownFailure(
        "aten::gather", _dtypes(),
        "wrong results from MPSGraph's reshape, for an input whose shape squeezes to 1-D",
        "macOS 15; worked around by pytorch/pytorch#135543 (2.6, approx)",
        "https://github.com/pytorch/pytorch/pull/135543", fixed_in="2.6",
        matches=lambda c: sum(size > 1 for size in c.tensor(0).shape) <= 1
        < len(c.tensor(0).shape)),
    KnownFailure(
        "aten::mm", _dtypes("float32"),
        "wrong by 10-30% of the result's scale, silently, depending on the allocator's state",
        "the left operand a transposed view; reproduced on torch 2.13.0; open (masked by "
        "pytorch/pytorch#187441)",
        "https://github.com/pytorch/pytorch/issues/193487",
        matches=lambda c: not c.tensor(0).contiguous),
    KnownFailure(
        "aten::mm.out", _dtypes(),
        "the result is never written, silently, into an out= slice",
        "macOS 14; fixed by pytorch/pytorch#193385 (in 2.14)",
        "https://github.com/pytorch/pytorch/pull/193385", fixed_in="2.14"),
    KnownFailure(
        "aten::cat", _dtypes(),
        "wrong results and out-of-bounds writes, silently, past 2^31 output elements",
        "reproduced on torch 2.13.0",
        "https://github.com/pytorch/pytorch/issues/189960",
        matches=lambda c: c.output(0).numel >= 1 << 31),
    KnownFailure(
        "aten::_assert_async.msg", _dtypes(),
        "NotImplementedError (or, with PYTORCH_ENABLE_MPS_FALLBACK=1, a CPU fallback that "
        "syncs)",
        "before pytorch/pytorch#186562 (2026-06-07: 2.13; its native_functions.yaml has the MPS "
        "kernel); core/devices.py checks lengths on the host there instead",
        "https://github.com/pytorch/pytorch/pull/186562", fixed_in="2.13"),
    KnownFailure(
        "aten::col2im", _dtypes(),
        "not supported on MPS (a CPU fallback, or NotImplementedError)",
        "before pytorch/pytorch#152282 (2.8, approx): overlap-add uses fold (col2im) where "
        "a hop does not divide its FFT size",
        "https://github.com/pytorch/pytorch/issues/151820", fixed_in="2.8",
        requires="torch 2.8"),
    KnownFailure(
        "aten::unfold_backward", _dtypes(),
        "a crash ('MPSNDArray ... buffer is not large enough'), a regression of 2.5",
        "torch 2.5 (closed; 2.6, approx)",
        "https://github.com/pytorch/pytorch/issues/138525", since="2.5", fixed_in="2.6"),
    KnownFailure(
        "aten::_to_copy", _dtypes("bfloat16"),
        "TypeError: 'MPS BFloat16 is only supported on MacOS 14 or newer'",
        "macOS before 14 (pytorch/pytorch#119641)",
        "https://github.com/pytorch/pytorch/pull/119641", requires="macOS 14"),
    KnownFailure(
        "aten::_to_copy", _dtypes("float64"),
        "TypeError (torch 2.13), zeros silently (2.14): MPS has no float64",
        "every macOS",
        "https://github.com/pytorch/pytorch/issues/197715"),
    # Numerical differences: no call's arguments tell them; docs/backends.md says what to
    # compare on a Mac.
    KnownFailure(
        "aten::_fft_r2c", _dtypes(), "numerical differences from the CPU's FFT",
        "open (a TODO in FastFourierTransform.mm)",
        "https://github.com/pytorch/pytorch/issues/120237", numerics=True),
    KnownFailure(
        "aten::convolution_backward", _dtypes("float32"),
        "a weight gradient less precise than the CPU's over long reductions", "open",
        "https://github.com/pytorch/pytorch/issues/119677", numerics=True),
]
