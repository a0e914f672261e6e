"""The triton backend's step: at most 16 launches per forward+backward (Triton kernels plus aten
operations that launch a kernel; views and allocations left out), and bit-identical results
run to run."""

import pytest
import torch

from aten_launches import launches_kernel
from conftest import OpRecorder, leaf_copies, make_batch, requires_triton, run_loss
from distill_fused import LossConfig, compute_combined_loss, create_stft_loss

pytestmark = requires_triton


def _aten_launches(recorder):
    """The aten operations ``recorder`` saw that launch a kernel, by name."""
    return [name for op, name in zip(recorder.ops, recorder.names) if launches_kernel(op)]


def _step(batch, config, stft_fn, grad_target=False, fft_grouping=None):
    leaves = leaf_copies(batch, grad_target)
    with OpRecorder() as recorder:
        out = compute_combined_loss(*leaves, config, kl_weight=0.01, _stft_loss_fn=stft_fn,
                                    backend="triton", fft_grouping=fft_grouping)
        out["total_loss"].backward()
    return _aten_launches(recorder), out, leaves


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


def test_the_counter_sees_more_than_16_launches_on_the_torch_backend(triton_launches, seed):
    """The same count on the torch backend is far above 16: the test can fail."""
    config = LossConfig()
    batch = make_batch("realistic", torch.float32, seed)
    leaves = leaf_copies(batch, grad_target=False)
    with OpRecorder() as recorder:
        compute_combined_loss(*leaves, config, kl_weight=0.01,
                              backend="torch")["total_loss"].backward()
    assert len(_aten_launches(recorder)) > 16


@pytest.mark.parametrize("grad_target", [False, True])
def test_results_are_bit_identical_run_to_run(seed, grad_target):
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
