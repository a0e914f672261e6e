"""No host-device sync in the fast backends' loss path (forward and backward), and no
``torch.angle`` in the torch backend (MPS lacks it)."""

import inspect
import re

import pytest
import torch

from conftest import FAST_BACKENDS, SYNC_OPS, OpRecorder, leaf_copies, make_batch, requires_cuda
from distill_fused import compute_combined_loss

# Ops each backend's step must show the recorder, forward and backward: a recording without
# them (an empty one, or one that missed the loss path) proves nothing. On a GPU the kernel
# ops may reach the recorder as Triton launches rather than as these custom ops: there the FFTs
# stand for the path.
LOSS_PATH = {
    "torch": {"aten::_fft_r2c", "aten::_fft_c2r", "aten::exp"},
    "triton": {"aten::_fft_r2c", "aten::_fft_c2r", "distill_fused::stft_frames",
               "distill_fused::combined_reduce", "distill_fused::stft_spectral_grad",
               "distill_fused::stft_frames_adjoint", "distill_fused::combined_backward"},
}


def assert_no_sync_on_the_loss_path(ops, backend, device="cpu"):
    names = {op._schema.name for op in ops}
    expected = LOSS_PATH[backend] if device == "cpu" else {"aten::_fft_r2c", "aten::_fft_c2r"}
    missing = expected - names
    assert not missing, f"the recorder did not see the loss path: {sorted(missing)} missing"
    assert not [op for op in ops if op in SYNC_OPS]


def _step(backend, batch, **kwargs):
    leaves = leaf_copies(batch)
    with OpRecorder() as rec:
        out = compute_combined_loss(*leaves, backend=backend, **kwargs)
        out["total_loss"].backward()
    return rec.ops


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("kl_weight", [0.0, 0.1])
def test_loss_step_makes_no_host_sync(backend, kl_weight, seed):
    ops = _step(backend, make_batch("realistic", torch.float32, seed), kl_weight=kl_weight)
    assert_no_sync_on_the_loss_path(ops, backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_tensor_kl_weight_makes_no_host_sync(backend, seed):
    ops = _step(backend, make_batch("realistic", torch.float32, seed),
                kl_weight=torch.tensor(0.1))
    assert_no_sync_on_the_loss_path(ops, backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_the_non_finite_fallback_makes_no_host_sync(backend, seed):
    recon, target, mu, logvar = make_batch("realistic", torch.float32, seed)
    logvar[0, 0] = 1e5  # non-finite total: the fallback path
    ops = _step(backend, (recon, target, mu, logvar), kl_weight=1.0)
    assert_no_sync_on_the_loss_path(ops, backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_new_kl_weight_is_made_on_the_device_not_copied_from_the_host(backend, seed):
    """A kl_weight not seen before (a warm-up schedule gives one every epoch, or step) gets no
    tensor made from host data: on a GPU its blocking host-to-device copy would synchronize
    the stream. (A CPU-visible proxy: ``torch.tensor(data)`` dispatches ``aten.lift_fresh``.)"""
    kl_weight = 0.1 + torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
    batch = make_batch("realistic", torch.float32, seed)
    # A first step makes what is made once per shape and config (plans, windows, weights).
    compute_combined_loss(*leaf_copies(batch), kl_weight=0.05, backend=backend)
    leaves = leaf_copies(batch, grad_target=False)
    with OpRecorder() as recorder:
        out = compute_combined_loss(*leaves, kl_weight=kl_weight, backend=backend)
        out["total_loss"].backward()
    assert recorder.ops, "the recorder saw nothing"
    assert torch.ops.aten.lift_fresh.default not in recorder.ops


def test_the_recorder_sees_the_reference_backends_sync():
    """The check above can fail: the reference backend does sync (seed behaviour)."""
    ops = _step("reference", make_batch("realistic", torch.float32, 0), kl_weight=0.1)
    assert [op for op in ops if op in SYNC_OPS]


def test_torch_backend_never_calls_angle(seed):
    ops = _step("torch", make_batch("realistic", torch.float32, seed), kl_weight=0.1)
    assert ops and torch.ops.aten.angle.default not in ops
    import distill_fused.backends.torch_backend as module
    assert not re.search(r"\bangle\(", inspect.getsource(module))


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_step_makes_no_host_sync(backend, seed):
    batch = make_batch("realistic", torch.float32, seed, device="cuda")
    ops = _step(backend, batch, kl_weight=0.1)
    assert_no_sync_on_the_loss_path(ops, backend, "cuda")
    # And the CUDA runtime agrees: a step raises if it synchronises while syncs are errors.
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(backend, batch, kl_weight=0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
