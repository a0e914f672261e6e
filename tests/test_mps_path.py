"""The MPS path, proven on the CPU: what the package does for tensors on an Apple GPU, forward
and backward, on the default path, the per-example path and with every auraloss option, for
float32, bfloat16 and float16 inputs.

The tensors are CPU tensors under MPS's device policy (``core.devices.emulated("cpu",
like="mps")``): the package takes every branch it takes on a Mac (``auto`` picks the torch
backend, sums that may cancel stay in the inputs' precision, ``lengths`` are checked on the
device). ``mps_ops.DispatchRecorder`` records every op a step dispatches; each step must:

- create no float64 or complex128 tensor (MPS has neither) and call no ``torch.angle``;
- read nothing back to the host (no sync), and copy nothing from it once warm;
- dispatch only ops the installed torch has an MPS kernel for (``mps_ops.MPSKernels``, from
  torchgen's ``native_functions.yaml``), none of them on ``mps_known_failures.KNOWN_FAILURES``
  for the dtypes it meets there (each requirement of the OS a known failure states is said in
  docs/backends.md).

What this cannot prove: that MPS's kernels compute what the CPU's do (numerics), which only a
Mac can show (docs/backends.md says how to check there)."""

from pathlib import Path

import pytest
import torch

from conftest import SYNC_OPS, guarded, make_batch, signal_pair, tiny_config
from distill_fused import MultiResolutionSTFTLoss, compute_combined_loss
from distill_fused.core.devices import emulated
from mps_known_failures import KNOWN_FAILURES
from mps_ops import DispatchRecorder, MPSKernels

# Nothing here runs Triton: under Triton 3.6 (make test's second suite) it is not run again.
pytestmark = pytest.mark.triton_free

MPS_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                                     ids=["f32", "bf16", "f16"])
NO_MPS_DTYPES = {torch.float64, torch.complex128}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mps_kernels():
    return MPSKernels()


def _leaves(tensors, grads):
    return [t.detach().clone().requires_grad_(g) for t, g in zip(tensors, grads)]


def _combined(dtype, seed, width=20, **kwargs):
    batch = [t.to(dtype) for t in make_batch("realistic", torch.float32, seed, height=4,
                                             width=width)]
    kl_weight = kwargs.pop("kl_weight", 0.1)

    def step():
        leaves = _leaves(batch, (True, False, True, True))
        out = compute_combined_loss(*leaves, tiny_config(), kl_weight=kl_weight, **kwargs)
        out["total_loss"].sum().backward()
    return step


def _module(dtype, seed, lengths=None, length=90, sizes=([16, 32], [4, 8], [16, 32]),
            **options):
    module = MultiResolutionSTFTLoss(*sizes, **options)
    x, y = (guarded(t.to(dtype)) for t in signal_pair(seed, 2, 2, length, torch.float32))

    def step():
        leaves = _leaves((x, y), (True, True))
        out = module(*leaves, lengths=lengths)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    return step


MEL = dict(scale="mel", n_bins=6, sample_rate=8000)
STEPS = {
    "combined": lambda dtype, seed: _combined(dtype, seed),
    "combined-kl-off": lambda dtype, seed: _combined(dtype, seed, kl_weight=0.0),
    "combined-tensor-kl": lambda dtype, seed: _combined(dtype, seed,
                                                        kl_weight=torch.tensor(0.1)),
    "combined-count": lambda dtype, seed: _combined(dtype, seed, nonfinite="count"),
    "combined-none-lengths": lambda dtype, seed: _combined(
        dtype, seed, reduction="none", lengths=torch.tensor([20, 17]),
        per_resolution_terms=True),
    "combined-mean-lengths": lambda dtype, seed: _combined(
        dtype, seed, reduction="mean", lengths=torch.tensor([20, 17])),
    "combined-sum": lambda dtype, seed: _combined(dtype, seed, reduction="sum"),
    # Signals past 65536 samples, where MPS's reflection-pad backward and its convolutions
    # fail (mps_known_failures.py): 4 x 17000 samples, and 70000.
    "combined-long": lambda dtype, seed: _combined(dtype, seed, width=17000),
    "module-a-weighting-long": lambda dtype, seed: _module(
        dtype, seed, length=70000, perceptual_weighting=True, sample_rate=8000),
    # Hops that divide no FFT size: the overlap-add folds (col2im).
    "module-odd-hops": lambda dtype, seed: _module(dtype, seed,
                                                   sizes=([16, 30], [7, 4], [16, 25])),
    "module": lambda dtype, seed: _module(dtype, seed),
    "module-lin": lambda dtype, seed: _module(dtype, seed, w_lin_mag=1.0),
    "module-phase": lambda dtype, seed: _module(dtype, seed, w_phs=0.5),
    "module-L2": lambda dtype, seed: _module(dtype, seed, mag_distance="L2"),
    "module-mel": lambda dtype, seed: _module(dtype, seed, **MEL),
    "module-mel-L2-lin-phase": lambda dtype, seed: _module(
        dtype, seed, mag_distance="L2", w_lin_mag=1.0, w_phs=0.3, **MEL),
    "module-scale-invariance": lambda dtype, seed: _module(dtype, seed, scale_invariance=True),
    "module-hamming-eps": lambda dtype, seed: _module(dtype, seed, window="hamming_window",
                                                      eps=1e-6),
    "module-a-weighting": lambda dtype, seed: _module(
        dtype, seed, perceptual_weighting=True, sample_rate=8000),
    "module-a-weighting-phase-lengths": lambda dtype, seed: _module(
        dtype, seed, perceptual_weighting=True, sample_rate=8000, w_phs=0.5,
        reduction="none", lengths=torch.tensor([90, 70])),
    "module-full": lambda dtype, seed: _module(dtype, seed, output="full", w_phs=0.1),
    "module-none-lengths": lambda dtype, seed: _module(dtype, seed, reduction="none",
                                                       lengths=torch.tensor([90, 61])),
}


def _record(step, warm=True):
    with emulated("cpu", like="mps"):
        if warm:
            step()  # the first step makes what is kept per device (windows, filterbanks)
        with DispatchRecorder() as recorder:
            step()
    return recorder.records


def _check(records, mps_kernels):
    assert records, "the recorder saw nothing"
    names = {r.name for r in records}
    assert "aten::_fft_r2c" in names and "aten::_fft_c2r" in names, \
        "the recording missed the loss path (forward and backward)"
    wide = sorted({r.name for r in records if NO_MPS_DTYPES & set(r.dtypes)})
    assert not wide, f"float64 or complex128 tensors, which MPS lacks, in {wide}"
    assert "aten::angle" not in names
    syncs = [r.name for r in records if r.op in SYNC_OPS]
    assert not syncs, f"host syncs: {syncs}"
    uncovered = sorted(n for n in names if mps_kernels.why_covered(n) is None)
    assert not uncovered, f"no MPS kernel in torch {torch.__version__} for {uncovered}"
    # A requirement of the platform (macOS 14, ...) is stated in the docs instead (below).
    failing = sorted({(f.op, f.link) for f in KNOWN_FAILURES
                      if f.affects() and not (f.numerics or f.requires)
                      for r in records if f.hits(r)})
    assert not failing, f"calls known to fail on MPS in torch {torch.__version__}: {failing}"


@MPS_DTYPES
@pytest.mark.parametrize("name", sorted(STEPS))
def test_a_warm_mps_step_dispatches_only_what_mps_runs(name, dtype, mps_kernels, seed):
    records = _record(STEPS[name](dtype, seed))
    _check(records, mps_kernels)
    copies = [r.name for r in records if r.name == "aten::lift_fresh"]
    assert not copies, "a warm step copies a tensor from the host"


@pytest.mark.parametrize("name", ["combined", "module-mel", "module-a-weighting"])
def test_a_cold_mps_step_makes_no_float64_either(name, mps_kernels, seed):
    """The first step, which makes what later steps reuse (windows, filterbanks, FIR taps on
    the device), too."""
    _check(_record(STEPS[name](torch.float32, seed), warm=False), mps_kernels)


def test_validation_under_no_grad_dispatches_only_what_mps_runs(mps_kernels, seed):
    batch = make_batch("realistic", torch.float32, seed, height=4, width=20)
    with emulated("cpu", like="mps"), torch.no_grad():
        compute_combined_loss(*batch, tiny_config(), kl_weight=0.1)
        with DispatchRecorder() as recorder:
            compute_combined_loss(*batch, tiny_config(), kl_weight=0.1)
    records = recorder.records
    assert "aten::_fft_r2c" in {r.name for r in records}
    assert not [r for r in records if NO_MPS_DTYPES & set(r.dtypes)]
    assert not [r for r in records if r.op in SYNC_OPS]
    assert all(mps_kernels.why_covered(r.name) for r in records)


def test_the_recorder_catches_what_mps_lacks(mps_kernels):
    """The checks can fail: a float64 sum, a torch.angle and a host read are each caught, and
    an op without an MPS kernel is told from one with."""
    x = torch.randn(4, 8, dtype=torch.complex64)
    with DispatchRecorder() as recorder:
        torch.fft.irfft(torch.fft.rfft(x.real.double()))
        x.angle()
        x.real.sum().item()
    names = {r.name for r in recorder.records}
    assert {r.name for r in recorder.records if NO_MPS_DTYPES & set(r.dtypes)}
    assert "aten::angle" in names and [r for r in recorder.records if r.op in SYNC_OPS]
    assert mps_kernels.why_covered("aten::_fft_r2c") == "MPS kernel"
    assert mps_kernels.why_covered("aten::add.Tensor") == "MPS kernel of add.out"
    # An op with CPU and CUDA kernels only, and one composite of other ops.
    assert mps_kernels.why_covered("aten::_ctc_loss") is None
    assert mps_kernels.why_covered("aten::stft").startswith("composite")


def test_each_os_requirement_of_the_ops_used_is_documented():
    """A known failure that is a requirement of the OS (macOS 14 for the FFT, ...) and that
    an op of the MPS path meets is stated in docs/backends.md."""
    docs = (ROOT / "docs" / "backends.md").read_text()
    records = []
    for name in ("combined", "module-mel", "module-a-weighting", "module-odd-hops"):
        records += _record(STEPS[name](torch.float32, 0))
    names = {r.name for r in records}
    for failure in KNOWN_FAILURES:
        if failure.requires and failure.op in names:
            assert failure.requires in docs, (failure.op, failure.requires)


def test_before_torch_2_13_lengths_are_checked_on_the_host_not_by_a_missing_mps_kernel(
        monkeypatch, seed):
    """MPS has no device assertion before torch 2.13 (``aten::_assert_async.msg`` raises
    there): ``lengths`` are then checked on the host (one sync), and a bad one is a
    ``ValueError`` naming the argument, as on the CPU."""
    import dataclasses

    from distill_fused.core import devices
    monkeypatch.setitem(devices.POLICIES, "mps", dataclasses.replace(
        devices.POLICIES["mps"], device_asserts=False))
    with emulated("cpu", like="mps"), DispatchRecorder() as recorder:
        STEPS["combined-none-lengths"](torch.float32, seed)()
    names = {r.name for r in recorder.records}
    assert "aten::_assert_async.msg" not in names
    assert [r for r in recorder.records if r.op in SYNC_OPS], "the host check reads lengths"
    batch = make_batch("realistic", torch.float32, seed, height=4, width=20)
    with emulated("cpu", like="mps"), pytest.raises(ValueError, match="lengths"):
        compute_combined_loss(*batch, tiny_config(), reduction="none",
                              lengths=torch.tensor([20, 2]))


def test_with_torch_2_13_lengths_are_asserted_on_the_device(seed):
    with emulated("cpu", like="mps"), DispatchRecorder() as recorder:
        STEPS["combined-none-lengths"](torch.float32, seed)()
    assert "aten::_assert_async.msg" in {r.name for r in recorder.records}


def test_the_known_failures_match_the_calls_they_are_reported_for():
    """The predicates fire: each crafted call is one a report is about (and the same op,
    made as the MPS path makes it, is not)."""
    import torch.nn.functional as F

    long = torch.randn(1, 70000 - 32, requires_grad=True)
    short = torch.randn(1, 1000, requires_grad=True)
    target = torch.zeros(10)
    with DispatchRecorder() as recorder:
        F.pad(long[:, None], (16, 16), mode="reflect").sum().backward()
        F.pad(short[:, None], (16, 16), mode="reflect").sum().backward()
        F.conv1d(torch.randn(1, 1, 70100), torch.randn(1, 1, 101))
        target[2:].scatter_add_(0, torch.tensor([0, 1]), torch.ones(2))
        torch.randn(8, 4).T @ torch.randn(8, 3)
        torch.randn(4, 8) @ torch.randn(8, 3)

    def hit(op):
        return [r for r in recorder.records if r.name.startswith(op)
                and any(f.hits(r) and f.affects() for f in KNOWN_FAILURES)]

    assert len(hit("aten::reflection_pad1d_backward")) == 1  # 70000 samples, not 1032
    assert hit("aten::convolution") and hit("aten::scatter_add_")
    assert len(hit("aten::mm")) == 1  # the transposed left operand only
