"""Property tests (hypothesis): every fast backend equals the oracle over random shapes, STFT
settings (sizes, hops, windows, term weights), signal lengths (the last frame on the far
boundary or not), loss weights, kl_weight, value ranges and latent elements on the free-bits
floor or with an infinite KL, in float64 (values and gradients) and float32.

Two profiles (registered in conftest.py): ``ci``, the default, draws a fixed, derandomized set
of examples (a dozen per test: the same cases every run); ``dev`` draws 200 fresh ones per test
(``pytest tests/test_properties.py --hypothesis-profile=dev``). A failure prints its drawn
arguments, ``seed`` included, to replay it."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import FAST_BACKENDS, assert_matches_oracle, make_batch
from distill_fused import (
    KLLossConfig,
    LossConfig,
    MultiResolutionSTFTLoss,
    ReconLossConfig,
    STFTLossConfig,
)

pytestmark = pytest.mark.kernels

WINDOWS = ["hann_window", "hamming_window", "blackman_window", "bartlett_window"]
# The most frames drawn to cover one sample (hop >= n_fft / MAX_COVER; the user's settings have
# 4, auraloss's defaults 4.3 to 10.2). Each covering frame is an unrolled iteration of the
# frames' adjoint kernel for every resolution of the call, which Triton's interpreter runs op by
# op: one draw of an FFT of 200 with a hop of 1 cost the f64 module test half its time. A hop of
# 1 is still drawn, with FFTs of up to 16.
MAX_COVER = 16
FREE_BITS = [0.0, 0.125, 0.5]  # floors that sqrt(2 fb) reaches exactly (mu = 0, 0.5, 1)


@st.composite
def resolutions(draw):
    n = draw(st.integers(1, 3))
    ffts = draw(st.lists(st.integers(8, 200), min_size=n, max_size=n))
    hops = [draw(st.integers(-(-f // MAX_COVER), f)) for f in ffts]
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
        kl=KLLossConfig(free_bits=draw(st.sampled_from(FREE_BITS))))


def _scaled(batch, magnitude_scale, logvar_shift):
    """The batch with its magnitude channels scaled (quiet to loud spectrograms) and its
    posterior's log-variances shifted (narrow to wide)."""
    recon, target, mu, logvar = (t.clone() for t in batch)
    recon[:, 0] *= magnitude_scale
    target[:, 0] *= magnitude_scale
    return recon, target, mu, logvar + logvar_shift


def _latent_case(batch, case, free_bits):
    """``floor``: the first latent element of every item exactly on the free-bits floor
    (``logvar = 0``, ``mu = sqrt(2 fb)``: ``k = mu^2 / 2 = fb``); ``overflow``: one infinite
    KL element (``exp(logvar)`` overflows)."""
    recon, target, mu, logvar = batch
    if case == "floor":
        mu, logvar = mu.clone(), logvar.clone()
        mu[:, 0], logvar[:, 0] = math.sqrt(2 * free_bits), 0.0
    elif case == "overflow":
        logvar = logvar.clone()
        logvar[0, -1] = 1e5
    return recon, target, mu, logvar


def _shape(config, h, w, last_frame_on_the_edge):
    """``w`` widened where ``H*W`` would be too short for the largest FFT's reflect padding and,
    with ``last_frame_on_the_edge``, until the first resolution's hop divides ``H*W`` (its last
    frame then ends on the far padded boundary)."""
    shortest = max(config.stft.fft_sizes) // 2 + 1
    w = w if h * w >= shortest else -(-shortest // h)
    hop = config.stft.hop_sizes[0]
    while last_frame_on_the_edge and (h * w) % hop:
        w += 1
    return w


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(config=loss_configs(), window=st.sampled_from(["config"] + WINDOWS),
       b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 40), d=st.integers(1, 6),
       edge=st.booleans(), latent=st.sampled_from(["random", "floor", "overflow"]),
       kind=st.sampled_from(["noise", "realistic"]),
       magnitude_scale=st.sampled_from([1e-3, 1.0, 1e3]),
       logvar_shift=st.sampled_from([-4.0, 0.0, 3.0]),
       kl_weight=st.sampled_from([-1.0, 0.0, 1e-3, 0.1, 10.0]), seed=st.integers(0, 2**40))
def test_random_configs_equal_the_oracle_f64(backend, config, window, b, h, w, d, edge, latent,
                                             kind, magnitude_scale, logvar_shift, kl_weight,
                                             seed):
    batch = make_batch(kind, torch.float64, seed, batch=b, height=h,
                       width=_shape(config, h, w, edge), latent_dim=d)
    batch = _latent_case(_scaled(batch, magnitude_scale, logvar_shift), latent,
                         config.kl.free_bits)
    stft = config.stft
    stft_fn = None if window == "config" else MultiResolutionSTFTLoss(
        fft_sizes=stft.fft_sizes, hop_sizes=stft.hop_sizes, win_lengths=stft.win_lengths,
        window=window)
    assert_matches_oracle(batch, backend, torch.float64, grad_target=True, loss_config=config,
                          kl_weight=kl_weight, _stft_loss_fn=stft_fn)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(stft=resolutions(), window=st.sampled_from(WINDOWS),
       terms=st.sampled_from([(1.0, 1.0, 0.0), (0.0, 1.0, 0.5), (0.5, 0.0, 2.0)]),
       h=st.integers(2, 8), w=st.integers(10, 40), edge=st.booleans(),
       kind=st.sampled_from(["noise", "realistic"]), seed=st.integers(0, 2**40))
def test_random_stft_modules_equal_the_oracle_f64(backend, stft, window, terms, h, w, edge,
                                                  kind, seed):
    ffts, hops, wins = stft
    module = MultiResolutionSTFTLoss(fft_sizes=ffts, hop_sizes=hops, win_lengths=wins,
                                     window=window, w_sc=terms[0], w_log_mag=terms[1],
                                     w_lin_mag=terms[2])
    config = LossConfig(stft=STFTLossConfig(fft_sizes=ffts, hop_sizes=hops, win_lengths=wins))
    batch = make_batch(kind, torch.float64, seed, batch=2, height=h,
                       width=_shape(config, h, w, edge), latent_dim=3)
    assert_matches_oracle(batch, backend, torch.float64, loss_config=config, kl_weight=0.1,
                          _stft_loss_fn=module)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(stft=resolutions(), h=st.integers(2, 8), w=st.integers(10, 40), edge=st.booleans(),
       kind=st.sampled_from(["noise", "realistic"]), seed=st.integers(0, 2**40))
def test_random_shapes_equal_the_oracle_f32(backend, stft, h, w, edge, kind, seed):
    ffts, hops, wins = stft
    config = LossConfig(stft=STFTLossConfig(fft_sizes=ffts, hop_sizes=hops, win_lengths=wins))
    batch = make_batch(kind, torch.float64, seed, batch=2, height=h,
                       width=_shape(config, h, w, edge), latent_dim=3)
    assert_matches_oracle(batch, backend, torch.float32, loss_config=config, kl_weight=0.1)
