"""The shared-FFT layout (``fft_grouping="shared"``: one rfft of the largest size serves every
resolution whose n_fft divides it) equals the oracle like the default layout does; the option
is an argument, with ``DISTILL_FFT_GROUPING`` as its default."""

import pytest
import torch

from conftest import (
    assert_matches_oracle,
    float64_and_float32,
    make_batch,
    requires_triton,
    with_and_without_target_grad,
)
from distill_fused import LossConfig, MultiResolutionSTFTLoss, STFTLossConfig, compute_combined_loss

pytestmark = requires_triton


def test_fft_groups_share_an_fft_where_sizes_divide():
    from distill_fused.kernels.stft_plan import fft_groups
    assert fft_groups([512, 1024, 2048], "per_resolution") == [[0], [1], [2]]
    assert fft_groups([512, 1024, 2048], "shared") == [[2, 1, 0]]
    assert fft_groups([100, 60, 300, 77], "shared") == [[2, 0, 1], [3]]  # 300 = 3*100 = 5*60
    with pytest.raises(ValueError, match="fft_grouping"):
        fft_groups([512], "nope")


def _plan_groupings(settings):
    """The FFT groupings of the triton plans cached on ``settings`` (one per shape)."""
    return {plan.fft_grouping for key, plan in settings.cache.items()
            if key[0] == "triton-plan"}


def test_the_argument_chooses_the_grouping_and_the_variable_is_its_default(monkeypatch, seed):
    batch = make_batch("realistic", torch.float64, seed)
    stft_fn = MultiResolutionSTFTLoss(fft_sizes=(64, 128), hop_sizes=(16, 32),
                                      win_lengths=(64, 128))
    monkeypatch.setenv("DISTILL_FFT_GROUPING", "shared")
    compute_combined_loss(*batch, _stft_loss_fn=stft_fn, backend="triton",
                          fft_grouping="per_resolution")
    assert _plan_groupings(stft_fn.settings) == {"per_resolution"}
    compute_combined_loss(*batch, _stft_loss_fn=stft_fn, backend="triton")
    assert _plan_groupings(stft_fn.settings) == {"per_resolution", "shared"}


@pytest.mark.parametrize("where", ["argument", "variable", "module"])
def test_an_unknown_grouping_is_an_error_naming_its_source(monkeypatch, seed, where):
    batch = make_batch("realistic", torch.float64, seed)
    name = {"argument": "fft_grouping", "variable": "DISTILL_FFT_GROUPING",
            "module": "fft_grouping"}[where]
    with pytest.raises(ValueError, match=name):
        if where == "argument":
            compute_combined_loss(*batch, backend="triton", fft_grouping="nope")
        elif where == "variable":
            monkeypatch.setenv("DISTILL_FFT_GROUPING", "nope")
            compute_combined_loss(*batch, backend="triton")
        else:
            MultiResolutionSTFTLoss(fft_grouping="nope")


CONFIGS = {
    "default": STFTLossConfig(),
    "mixed-divisors": STFTLossConfig(fft_sizes=(100, 60, 300, 77), hop_sizes=(25, 7, 75, 20),
                                     win_lengths=(80, 60, 300, 77)),
    "short-windows": STFTLossConfig(fft_sizes=(64, 128, 256), hop_sizes=(16, 40, 64),
                                    win_lengths=(40, 101, 256)),
}


@float64_and_float32
@pytest.mark.parametrize("name", list(CONFIGS))
@with_and_without_target_grad
def test_shared_fft_matches_oracle(seed, dtype, name, grad_target):
    batch = make_batch("realistic", torch.float64, seed, height=16, width=71)
    assert_matches_oracle(batch, "triton", dtype, grad_target=grad_target,
                          loss_config=LossConfig(stft=CONFIGS[name]), kl_weight=0.01,
                          fft_grouping="shared")
