"""The triton backend's step: at most 16 launches per forward+backward (Triton kernels plus aten
operations that launch a kernel; views and allocations left out), and bit-identical results
run to run."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aten_launches import launches_kernel
from conftest import FAST_BACKENDS, make_batch, run_loss
from distill_fused import LossConfig, compute_combined_loss, create_stft_loss

pytestmark = pytest.mark.skipif("triton" not in FAST_BACKENDS,
                                reason="the triton backend is not available here "
                                       "(CPU tensors need TRITON_INTERPRET=1)")


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.aten.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _step(batch, config, stft_fn, grad_target=False, fft_grouping=None):
    leaves = [t.clone().requires_grad_(i != 1 or grad_target) for i, t in enumerate(batch)]
    counter = LaunchCounter()
    with counter:
        out = compute_combined_loss(*leaves, config, kl_weight=0.01, _stft_loss_fn=stft_fn,
                                    backend="triton", fft_grouping=fft_grouping)
        out["total_loss"].backward()
    return counter.aten, out, leaves


@pytest.mark.parametrize("grouping", ["per_resolution", "shared"])
def test_at_most_16_launches_per_step(triton_launches, seed, grouping):
    from distill_fused.kernels.stft_plan import fft_groups
    config = LossConfig()
    n_ffts = len(fft_groups(config.stft.fft_sizes, grouping))  # 3, or 1 when shared
    stft_fn = create_stft_loss(config, "cpu")
    batch = make_batch("realistic", torch.float32, seed)
    _step(batch, config, stft_fn, fft_grouping=grouping)  # warm the per-shape plan
    triton_launches.clear()
    aten, _, _ = _step(batch, config, stft_fn, fft_grouping=grouping)
    total = len(aten) + len(triton_launches)
    print(f"aten: {aten}\ntriton: {triton_launches}\ntotal: {total}")
    assert triton_launches, "the counter saw no Triton launch"
    assert aten.count("_fft_r2c") == n_ffts and aten.count("_fft_c2r") == n_ffts
    assert total == 8 + 2 * n_ffts <= 16


def test_the_counter_counts(triton_launches, seed):
    """The same count on the torch backend is far above 16: the test can fail."""
    config = LossConfig()
    batch = make_batch("realistic", torch.float32, seed)
    leaves = [t.clone().requires_grad_(i != 1) for i, t in enumerate(batch)]
    counter = LaunchCounter()
    with counter:
        compute_combined_loss(*leaves, config, kl_weight=0.01,
                              backend="torch")["total_loss"].backward()
    assert len(counter.aten) > 16


@pytest.mark.parametrize("grad_target", [False, True])
def test_bit_identical_run_to_run(seed, grad_target):
    config = LossConfig()
    stft_fn = create_stft_loss(config, "cpu")
    batch = make_batch("realistic", torch.float32, seed)
    first = run_loss(batch, "triton", grad_target=grad_target, loss_config=config,
                     kl_weight=0.01, _stft_loss_fn=stft_fn)
    second = run_loss(batch, "triton", grad_target=grad_target, loss_config=config,
                      kl_weight=0.01, _stft_loss_fn=stft_fn)
    for key in first[0]:
        assert torch.equal(first[0][key], second[0][key])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)
