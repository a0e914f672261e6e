"""Configuration defaults and checks, re-exports, and the small helpers of the API."""

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import distill_fused
from conftest import make_batch
from distill_fused import (
    MultiResolutionSTFTLoss,
    compute_combined_loss,
    compute_kl_divergence,
    create_stft_loss,
    get_kl_weight,
    vae_loss,
)
from distill_fused.core.config import KLLossConfig, LossConfig, ReconLossConfig, STFTLossConfig


def test_config_defaults_are_the_seeds():
    c = LossConfig()
    assert (c.stft.weight, c.stft.fft_sizes, c.stft.hop_sizes, c.stft.win_lengths) == (
        1.0, (512, 1024, 2048), (128, 256, 512), (512, 1024, 2048))
    assert (c.reconstruction.weight, c.reconstruction.magnitude_weight,
            c.reconstruction.if_weight) == (0.1, 1.0, 0.5)
    assert (c.kl.weight_max, c.kl.warmup_fraction, c.kl.free_bits) == (0.01, 0.3, 0.1)


def test_api_is_at_the_top_level_without_a_training_config():
    """The API lives at the top level, under a name that cannot collide with the application's
    ``distill`` package, and no training config of ours competes with the application's."""
    for name in ("LossConfig", "STFTLossConfig", "ReconLossConfig", "KLLossConfig"):
        assert getattr(distill_fused, name) is getattr(distill_fused.core.config, name)
    for name in ("compute_combined_loss", "create_stft_loss", "vae_loss", "get_kl_weight",
                 "compute_kl_divergence"):
        assert getattr(distill_fused, name) is getattr(distill_fused.api.losses, name)
    assert set(distill_fused.__all__) <= set(dir(distill_fused))
    assert not hasattr(distill_fused, "TrainingConfig")
    assert not hasattr(distill_fused.core.config, "TrainingConfig")


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
])
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_get_kl_weight_warms_up_linearly_to_its_maximum():
    assert get_kl_weight(0, 100, 0.3, 0.01) == 0.0
    assert get_kl_weight(15, 100, 0.3, 0.01) == pytest.approx(0.005)
    assert get_kl_weight(60, 100, 0.3, 0.01) == 0.01
    assert get_kl_weight(0, 2, 0.3, 0.5) == 0.5  # int(0.6) == 0 warm-up epochs
    assert get_kl_weight(3, 10) == pytest.approx(1.0)


def test_vae_loss_and_kl_divergence_equal_their_formulas():
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


def _host_config_module():
    """The application's own ``distill/training/config.py`` (pure Python), loaded by path."""
    path = Path(__file__).parent / "host_app" / "distill" / "training" / "config.py"
    spec = importlib.util.spec_from_file_location("host_training_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_numpy_scalars_and_lists_become_python_values():
    c = LossConfig(stft=STFTLossConfig(weight=np.float32(0.5), fft_sizes=[np.int64(256), 512],
                                       hop_sizes=np.array([64, 128]),
                                       win_lengths=(np.int32(256), np.uint16(400))),
                   reconstruction=ReconLossConfig(weight=np.float64(0.2), if_weight=np.int64(1)),
                   kl=KLLossConfig(free_bits=np.float16(0.25)))
    assert c.stft.weight == 0.5 and type(c.stft.weight) is float
    assert c.stft.fft_sizes == (256, 512) and c.stft.hop_sizes == (64, 128)
    assert c.stft.win_lengths == (256, 400)
    for sizes in (c.stft.fft_sizes, c.stft.hop_sizes, c.stft.win_lengths):
        assert all(type(s) is int for s in sizes)
    assert type(c.reconstruction.weight) is float and type(c.reconstruction.if_weight) is float
    assert c.kl.free_bits == 0.25 and type(c.kl.free_bits) is float
    with pytest.raises(ValueError, match="fft_sizes"):
        STFTLossConfig(fft_sizes=[np.float64(512)])
    with pytest.raises(ValueError, match="weight"):
        ReconLossConfig(weight=np.float32("nan"))


def test_host_config_objects_give_the_numbers_of_ours(seed):
    """The application's own LossConfig, with numpy values as its code can make them, gives the
    numbers of ours built from the same values (and numpy kl_weight the numbers of a float)."""
    host = _host_config_module()
    host_config = host.LossConfig(
        stft=host.STFTLossConfig(weight=np.float32(0.75), fft_sizes=[np.int64(128), 256],
                                 hop_sizes=(np.int64(32), 64), win_lengths=[128, np.int32(200)]),
        reconstruction=host.ReconLossConfig(weight=np.float64(0.2)),
        kl=host.KLLossConfig(free_bits=np.float64(0.05)))
    ours = LossConfig(stft=STFTLossConfig(weight=0.75, fft_sizes=(128, 256), hop_sizes=(32, 64),
                                          win_lengths=(128, 200)),
                      reconstruction=ReconLossConfig(weight=0.2), kl=KLLossConfig(free_bits=0.05))
    batch = make_batch("realistic", torch.float64, seed)
    got = compute_combined_loss(*batch, host_config, kl_weight=np.float64(0.3))
    want = compute_combined_loss(*batch, ours, kl_weight=0.3)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    stft = create_stft_loss(host_config, "cpu")
    assert stft.fft_sizes == [128, 256] and stft.win_lengths == [128, 200]
    got = compute_combined_loss(*batch, host_config, np.float32(0.3), _stft_loss_fn=stft)
    want = compute_combined_loss(*batch, ours, float(np.float32(0.3)))
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # The application's TrainingConfig is its own: ours has none, its loss field is taken.
    assert isinstance(host.get_adaptive_config(120).loss, host.LossConfig)
    compute_combined_loss(*batch, host.get_adaptive_config(120).loss, 0.1)


def test_bad_host_config_is_rejected_naming_the_field(seed):
    host = _host_config_module()
    batch = make_batch("realistic", torch.float64, seed)
    with pytest.raises(ValueError, match="STFTLossConfig.weight"):
        compute_combined_loss(*batch, host.LossConfig(stft=host.STFTLossConfig(weight=-1.0)))
    with pytest.raises(ValueError, match="KLLossConfig.free_bits"):
        compute_combined_loss(*batch, host.LossConfig(kl=host.KLLossConfig(free_bits="0.1")))
    with pytest.raises(TypeError, match="loss_config"):
        compute_combined_loss(*batch, SimpleNamespace(stft=None))
    with pytest.raises(ValueError, match="fft_sizes"):
        create_stft_loss(host.LossConfig(stft=host.STFTLossConfig(fft_sizes=[[512]])))


def test_config_changed_after_it_was_built_is_checked(seed):
    config = LossConfig()
    batch = make_batch("realistic", torch.float64, seed)
    config.reconstruction.if_weight = -0.5
    with pytest.raises(ValueError, match="ReconLossConfig.if_weight"):
        compute_combined_loss(*batch, config)
    config.reconstruction.if_weight = np.float64(0.25)
    got = compute_combined_loss(*batch, config)
    want = compute_combined_loss(*batch, LossConfig(reconstruction=ReconLossConfig(
        if_weight=0.25)))
    assert torch.equal(got["recon_loss"], want["recon_loss"])


def test_stft_module_takes_numpy_sizes():
    module = MultiResolutionSTFTLoss(fft_sizes=np.array([256, 512]), hop_sizes=[np.int64(64),
                                     128], win_lengths=(256, np.int16(400)), w_sc=np.float32(1))
    assert module.fft_sizes == [256, 512] and module.hop_sizes == [64, 128]
    assert all(type(v) is int for v in module.fft_sizes + module.hop_sizes + module.win_lengths)
    with pytest.raises(ValueError, match="hop_sizes"):
        MultiResolutionSTFTLoss(fft_sizes=[256], hop_sizes=[0], win_lengths=[256])


def test_refusals_do_not_depend_on_what_was_seen_before(seed):
    """A value refused once is refused every time, also after an equal value of another type
    (512 == 512.0 == np.float64(512)) was taken; fields the loss does not read are not checked."""
    host = _host_config_module()
    batch = make_batch("realistic", torch.float64, seed)

    def config(sizes, **kl):
        return host.LossConfig(stft=host.STFTLossConfig(fft_sizes=sizes, hop_sizes=(64, 128),
                                                        win_lengths=(128, 256)),
                               kl=host.KLLossConfig(**kl))

    compute_combined_loss(*batch, config((128, 256)))
    for sizes in ((128.0, 256), (np.float64(128), 256), (True, 256)):
        with pytest.raises(ValueError, match="fft_sizes"):
            compute_combined_loss(*batch, config(sizes))
    compute_combined_loss(*batch, config((np.int64(128), 256), warmup_fraction=2.0,
                                         weight_max=-1.0))
    with pytest.raises(ValueError, match="free_bits"):
        compute_combined_loss(*batch, config((128, 256), free_bits=True))


def test_nested_dicts_are_converted_and_checked():
    config = LossConfig(stft={"weight": 2.0, "fft_sizes": [64, 128], "hop_sizes": [16, 32],
                              "win_lengths": [64, 100]}, kl={"free_bits": 0.2})
    assert isinstance(config.stft, STFTLossConfig) and config.stft.fft_sizes == (64, 128)
    assert isinstance(config.kl, KLLossConfig) and config.kl.free_bits == 0.2
    assert config.reconstruction == ReconLossConfig()
    with pytest.raises(ValueError, match=r"LossConfig.stft: STFTLossConfig has no field 'wieght'"):
        LossConfig(stft={"wieght": 1.0})
    with pytest.raises(ValueError, match=r"LossConfig.reconstruction: .*ReconLossConfig.weight"):
        LossConfig(reconstruction={"weight": -1})
    with pytest.raises(TypeError, match=r"LossConfig.kl must be a KLLossConfig or a dict"):
        LossConfig(kl=5)


@pytest.mark.parametrize("cls", [LossConfig, STFTLossConfig, ReconLossConfig, KLLossConfig])
def test_from_dict_and_to_dict_round_trip(cls):
    import json
    default = cls()
    assert cls.from_dict(default.to_dict()) == default
    assert cls.from_dict(json.loads(json.dumps(default.to_dict()))) == default
    with pytest.raises(ValueError, match="has no field 'nope'"):
        cls.from_dict({"nope": 1})
    with pytest.raises(TypeError, match="from_dict takes a mapping"):
        cls.from_dict([1, 2])


def test_changed_config_round_trips_through_dicts():
    config = LossConfig.from_dict({"stft": {"fft_sizes": [256], "hop_sizes": [64],
                                            "win_lengths": [200]},
                                   "reconstruction": {"if_weight": 0.25}})
    assert config.to_dict()["stft"] == {"weight": 1.0, "fft_sizes": [256], "hop_sizes": [64],
                                        "win_lengths": [200], "resolution_weights": None}
    assert LossConfig.from_dict(config.to_dict()) == config


def test_nested_config_mutated_into_something_else_is_named(seed):
    config = LossConfig()
    batch = make_batch("realistic", torch.float64, seed)
    config.stft.weight = -1.0
    with pytest.raises(ValueError, match="STFTLossConfig.weight"):
        compute_combined_loss(*batch, config)
    config.stft.weight = 1.0
    config.stft.hop_sizes = (128, 256)
    with pytest.raises(ValueError, match="same length"):
        compute_combined_loss(*batch, config)
