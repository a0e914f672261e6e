"""The shared-FFT layout (``DISTILL_FFT_GROUPING=shared``: one rfft of the largest size serves
every resolution whose n_fft divides it) equals the oracle like the default layout does."""

import pytest
import torch

from conftest import FAST_BACKENDS, assert_matches_oracle, make_batch
from distill_fused import LossConfig, STFTLossConfig

pytestmark = pytest.mark.skipif("triton" not in FAST_BACKENDS,
                                reason="the triton backend is not available here "
                                       "(CPU tensors need TRITON_INTERPRET=1)")


def test_fft_groups():
    from distill_fused.kernels.stft import fft_groups
    assert fft_groups([512, 1024, 2048], "per_resolution") == [[0], [1], [2]]
    assert fft_groups([512, 1024, 2048], "shared") == [[2, 1, 0]]
    assert fft_groups([100, 60, 300, 77], "shared") == [[2, 0, 1], [3]]  # 300 = 3*100 = 5*60
    with pytest.raises(ValueError, match="DISTILL_FFT_GROUPING"):
        fft_groups([512], "nope")


CONFIGS = {
    "default": STFTLossConfig(),
    "mixed-divisors": STFTLossConfig(fft_sizes=(100, 60, 300, 77), hop_sizes=(25, 7, 75, 20),
                                     win_lengths=(80, 60, 300, 77)),
    "short-windows": STFTLossConfig(fft_sizes=(64, 128, 256), hop_sizes=(16, 40, 64),
                                    win_lengths=(40, 101, 256)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("grad_target", [False, True], ids=["", "target-grad"])
def test_shared_fft_matches_oracle(monkeypatch, seed, dtype, name, grad_target):
    monkeypatch.setenv("DISTILL_FFT_GROUPING", "shared")
    batch = make_batch("realistic", torch.float64, seed, height=16, width=71)
    assert_matches_oracle(batch, "triton", dtype, grad_target=grad_target,
                          loss_config=LossConfig(stft=CONFIGS[name]), kl_weight=0.01)
