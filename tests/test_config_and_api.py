"""Configuration defaults and checks, re-exports, and the small helpers of the API."""

import math

import pytest
import torch

import distill.models as models
import distill.training as training
from distill.models import compute_kl_divergence, get_kl_weight, vae_loss
from distill.training.config import (KLLossConfig, LossConfig, ReconLossConfig, STFTLossConfig,
                                     TrainingConfig)


def test_defaults():
    c = LossConfig()
    assert (c.stft.weight, c.stft.fft_sizes, c.stft.hop_sizes, c.stft.win_lengths) == (
        1.0, (512, 1024, 2048), (128, 256, 512), (512, 1024, 2048))
    assert (c.reconstruction.weight, c.reconstruction.magnitude_weight,
            c.reconstruction.if_weight) == (0.1, 1.0, 0.5)
    assert (c.kl.weight_max, c.kl.warmup_fraction, c.kl.free_bits) == (0.01, 0.3, 0.1)
    t = TrainingConfig()
    assert isinstance(t.loss, LossConfig)
    assert (t.kl_warmup_fraction, t.kl_weight_max, t.free_bits, t.latent_dim, t.batch_size) == (
        0.3, 0.01, 0.1, 128, 32)


def test_re_exports():
    for name in ("LossConfig", "STFTLossConfig", "ReconLossConfig", "KLLossConfig",
                 "TrainingConfig"):
        assert getattr(training, name) is getattr(training.config, name)
    for name in ("compute_combined_loss", "create_stft_loss", "vae_loss", "get_kl_weight",
                 "compute_kl_divergence"):
        assert getattr(models, name) is getattr(models.losses, name)


@pytest.mark.parametrize("make, field", [
    (lambda: STFTLossConfig(fft_sizes=(512, 1024), hop_sizes=(128,), win_lengths=(512,)),
     "fft_sizes"),
    (lambda: STFTLossConfig(fft_sizes=(0,), hop_sizes=(1,), win_lengths=(1,)), "fft_sizes"),
    (lambda: STFTLossConfig(fft_sizes=(64,), hop_sizes=(-1,), win_lengths=(64,)), "hop_sizes"),
    (lambda: STFTLossConfig(fft_sizes=(64,), hop_sizes=(16,), win_lengths=(65,)), "win_lengths"),
    (lambda: STFTLossConfig(weight=-1.0), "weight"),
    (lambda: STFTLossConfig(weight=float("inf")), "weight"),
    (lambda: ReconLossConfig(if_weight=float("nan")), "if_weight"),
    (lambda: ReconLossConfig(magnitude_weight=-0.1), "magnitude_weight"),
    (lambda: KLLossConfig(warmup_fraction=1.5), "warmup_fraction"),
    (lambda: KLLossConfig(warmup_fraction=-0.1), "warmup_fraction"),
    (lambda: KLLossConfig(free_bits=-1.0), "free_bits"),
    (lambda: TrainingConfig(kl_warmup_fraction=2.0), "kl_warmup_fraction"),
])
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_get_kl_weight():
    assert get_kl_weight(0, 100, 0.3, 0.01) == 0.0
    assert get_kl_weight(15, 100, 0.3, 0.01) == pytest.approx(0.005)
    assert get_kl_weight(60, 100, 0.3, 0.01) == 0.01
    assert get_kl_weight(0, 2, 0.3, 0.5) == 0.5  # int(0.6) == 0 warm-up epochs
    assert get_kl_weight(3, 10) == pytest.approx(1.0)


def test_vae_loss_and_kl_divergence():
    g = torch.Generator().manual_seed(3)
    recon, target = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    mu, logvar = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    k = -0.5 * (1 + logvar - mu ** 2 - logvar.exp())
    kl_fb = k.clamp(min=0.1).sum(1).mean()
    mse = ((recon - target) ** 2).mean()
    total, got_mse, got_kl = vae_loss(recon, target, mu, logvar, kl_weight=0.3)
    torch.testing.assert_close(got_mse, mse)
    torch.testing.assert_close(got_kl, kl_fb)
    torch.testing.assert_close(total, mse + 0.3 * kl_fb)
    total0, _, _ = vae_loss(recon, target, mu, logvar, kl_weight=0.0)
    torch.testing.assert_close(total0, mse)
    raw = compute_kl_divergence(mu, logvar)
    assert isinstance(raw, float) and math.isclose(raw, float(k.sum(1).mean()), rel_tol=1e-6)
