"""Property tests (hypothesis): every fast backend equals the oracle over random shapes, STFT
settings (sizes, hops, windows, term weights), loss weights, kl_weight and value ranges, in
float64 (values and gradients) and float32. Bounded (a few examples a backend, small shapes) so
that CI stays fast; a failure prints its drawn arguments, ``seed`` included, to replay it."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FAST_BACKENDS, assert_matches_oracle, make_batch
from distill_fused import (KLLossConfig, LossConfig, MultiResolutionSTFTLoss, ReconLossConfig,
                           STFTLossConfig)

WINDOWS = ["hann_window", "hamming_window", "blackman_window", "bartlett_window"]
BOUNDED = settings(max_examples=12, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def resolutions(draw):
    n = draw(st.integers(1, 3))
    ffts = draw(st.lists(st.integers(8, 200), min_size=n, max_size=n))
    hops = [draw(st.integers(1, f)) for f in ffts]
    wins = [draw(st.integers(2, f)) for f in ffts]
    return tuple(ffts), tuple(hops), tuple(wins)


@st.composite
def loss_configs(draw):
    ffts, hops, wins = draw(resolutions())
    weight = st.sampled_from([0.0, 0.1, 1.0, 2.5])
    return LossConfig(
        stft=STFTLossConfig(weight=draw(weight), fft_sizes=ffts, hop_sizes=hops,
                            win_lengths=wins),
        reconstruction=ReconLossConfig(weight=draw(weight), magnitude_weight=draw(weight),
                                       if_weight=draw(weight)),
        kl=KLLossConfig(free_bits=draw(st.sampled_from([0.0, 0.1, 0.5]))))


def _scaled(batch, magnitude_scale, logvar_shift):
    """The batch with its magnitude channels scaled (quiet to loud spectrograms) and its
    posterior's log-variances shifted (narrow to wide)."""
    recon, target, mu, logvar = (t.clone() for t in batch)
    recon[:, 0] *= magnitude_scale
    target[:, 0] *= magnitude_scale
    return recon, target, mu, logvar + logvar_shift


def _shape(config, h, w):
    """``w`` widened where ``H*W`` would be too short for the largest FFT's reflect padding."""
    shortest = max(config.stft.fft_sizes) // 2 + 1
    return w if h * w >= shortest else -(-shortest // h)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@BOUNDED
@given(config=loss_configs(), b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 40),
       d=st.integers(1, 6), kind=st.sampled_from(["noise", "realistic"]),
       magnitude_scale=st.sampled_from([1e-3, 1.0, 1e3]),
       logvar_shift=st.sampled_from([-4.0, 0.0, 3.0]),
       kl_weight=st.sampled_from([-1.0, 0.0, 1e-3, 0.1, 10.0]), seed=st.integers(0, 2**40))
def test_random_configs_equal_the_oracle_f64(backend, config, b, h, w, d, kind,
                                             magnitude_scale, logvar_shift, kl_weight, seed):
    batch = make_batch(kind, torch.float64, seed, batch=b, height=h, width=_shape(config, h, w),
                       latent_dim=d)
    assert_matches_oracle(_scaled(batch, magnitude_scale, logvar_shift), backend, torch.float64,
                          grad_target=True, loss_config=config, kl_weight=kl_weight)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@BOUNDED
@given(stft=resolutions(), window=st.sampled_from(WINDOWS),
       terms=st.sampled_from([(1.0, 1.0, 0.0), (0.0, 1.0, 0.5), (0.5, 0.0, 2.0)]),
       h=st.integers(2, 8), w=st.integers(10, 40), kind=st.sampled_from(["noise", "realistic"]),
       seed=st.integers(0, 2**40))
def test_random_stft_modules_equal_the_oracle_f64(backend, stft, window, terms, h, w, kind,
                                                  seed):
    ffts, hops, wins = stft
    module = MultiResolutionSTFTLoss(fft_sizes=ffts, hop_sizes=hops, win_lengths=wins,
                                     window=window, w_sc=terms[0], w_log_mag=terms[1],
                                     w_lin_mag=terms[2])
    config = LossConfig(stft=STFTLossConfig(fft_sizes=ffts, hop_sizes=hops, win_lengths=wins))
    batch = make_batch(kind, torch.float64, seed, batch=2, height=h,
                       width=_shape(config, h, w), latent_dim=3)
    assert_matches_oracle(batch, backend, torch.float64, loss_config=config, kl_weight=0.1,
                          _stft_loss_fn=module)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@BOUNDED
@given(stft=resolutions(), h=st.integers(2, 8), w=st.integers(10, 40),
       kind=st.sampled_from(["noise", "realistic"]), seed=st.integers(0, 2**40))
def test_random_shapes_equal_the_oracle_f32(backend, stft, h, w, kind, seed):
    ffts, hops, wins = stft
    config = LossConfig(stft=STFTLossConfig(fft_sizes=ffts, hop_sizes=hops, win_lengths=wins))
    batch = make_batch(kind, torch.float64, seed, batch=2, height=h,
                       width=_shape(config, h, w), latent_dim=3)
    assert_matches_oracle(batch, backend, torch.float32, loss_config=config, kl_weight=0.1)
