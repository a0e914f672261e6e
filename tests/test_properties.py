"""Property test: random shapes and STFT settings, every fast backend equals the oracle in
float64 (values and gradients)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FAST_BACKENDS, assert_matches_oracle, make_batch
from distill_fused import LossConfig, STFTLossConfig


@st.composite
def stft_configs(draw):
    n = draw(st.integers(1, 3))
    ffts = draw(st.lists(st.integers(8, 200), min_size=n, max_size=n))
    hops = [draw(st.integers(1, f)) for f in ffts]
    wins = [draw(st.integers(2, f)) for f in ffts]
    return STFTLossConfig(fft_sizes=tuple(ffts), hop_sizes=tuple(hops), win_lengths=tuple(wins))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stft=stft_configs(), b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 40),
       d=st.integers(1, 6), kind=st.sampled_from(["noise", "realistic"]),
       seed=st.integers(0, 2**40))
def test_random_shapes_and_settings(backend, stft, b, h, w, d, kind, seed):
    if h * w <= max(stft.fft_sizes) // 2:
        w = max(stft.fft_sizes) // 2 // h + 1
    batch = make_batch(kind, torch.float64, seed, batch=b, height=h, width=w, latent_dim=d)
    assert_matches_oracle(batch, backend, torch.float64, loss_config=LossConfig(stft=stft),
                          kl_weight=0.1)
