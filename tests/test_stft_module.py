"""``create_stft_loss`` / ``MultiResolutionSTFTLoss`` against auraloss, and the ways
``compute_combined_loss`` takes an ``_stft_loss_fn``."""

import auraloss
import pytest
import torch

from conftest import (
    FAST_BACKENDS,
    assert_matches_oracle,
    assert_same_results,
    float64_and_float32,
    make_batch,
    rel_err,
    run_loss,
    signal_pair,
    stft_value_and_grads,
)
from distill_fused import (
    LossConfig,
    MultiResolutionSTFTLoss,
    compute_combined_loss,
    create_stft_loss,
)

MODULE_SETTINGS = [
    dict(fft_sizes=[512, 1024, 2048], hop_sizes=[128, 256, 512], win_lengths=[512, 1024, 2048]),
    dict(),  # auraloss's own defaults
    dict(fft_sizes=[90, 64], hop_sizes=[33, 16], win_lengths=[61, 64], w_sc=0.5, w_log_mag=2.0,
         w_lin_mag=0.7),
    dict(fft_sizes=[128], hop_sizes=[32], win_lengths=[100], window="hamming_window",
         w_sc=0.0, eps=1e-6),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@float64_and_float32
@pytest.mark.parametrize("settings", MODULE_SETTINGS, ids=["spec", "auraloss-defaults",
                                                           "weights-short-windows", "hamming"])
def test_module_matches_auraloss(backend, dtype, settings, seed):
    x64, y64 = signal_pair(seed, 2, 2, 2100)
    ref_module = auraloss.freq.MultiResolutionSTFTLoss(**settings)
    ours = MultiResolutionSTFTLoss(**settings, backend=backend)
    ref = stft_value_and_grads(ref_module, x64, y64, torch.float64)
    got = stft_value_and_grads(ours, x64, y64, dtype)
    assert got[0].dtype == dtype
    if dtype == torch.float64:
        assert rel_err(got[0], ref[0]) <= 1e-10
        assert rel_err(got[1], ref[1]) <= 1e-8 and rel_err(got[2], ref[2]) <= 1e-8
    else:
        ref32 = stft_value_and_grads(ref_module, x64, y64, torch.float32)
        assert rel_err(got[0], ref[0]) <= 1e-5
        for i in (1, 2):
            assert rel_err(got[i], ref[i]) <= max(1e-3, 2 * rel_err(ref32[i], ref[i]))


def test_create_stft_loss_reads_the_config():
    config = LossConfig()
    config.stft.fft_sizes, config.stft.hop_sizes, config.stft.win_lengths = (64,), (16,), (48,)
    module = create_stft_loss(config, "cpu")
    assert isinstance(module, MultiResolutionSTFTLoss)
    assert (module.fft_sizes, module.hop_sizes, module.win_lengths) == ([64], [16], [48])


def test_module_rejects_short_signals():
    module = MultiResolutionSTFTLoss(fft_sizes=[512], hop_sizes=[128], win_lengths=[512])
    x = torch.randn(1, 1, 256)
    with pytest.raises(ValueError, match="257"):
        module(x, x)
    module(torch.randn(1, 1, 257), torch.randn(1, 1, 257))


@pytest.mark.parametrize("bad", [dict(fft_sizes=[64], hop_sizes=[16, 8], win_lengths=[64]),
                                 dict(fft_sizes=[64], hop_sizes=[0], win_lengths=[64]),
                                 dict(fft_sizes=[64], hop_sizes=[16], win_lengths=[65]),
                                 dict(window="no_such_window")])
def test_module_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        MultiResolutionSTFTLoss(**bad)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("kind", ["ours", "auraloss"])
def test_stft_loss_fn_module_matches_oracle_on_the_fast_path(backend, kind, seed):
    settings = dict(fft_sizes=[256, 128], hop_sizes=[64, 50], win_lengths=[200, 128],
                    w_lin_mag=0.3)
    fn = (MultiResolutionSTFTLoss(**settings) if kind == "ours"
          else auraloss.freq.MultiResolutionSTFTLoss(**settings))
    ref_fn = auraloss.freq.MultiResolutionSTFTLoss(**settings)
    batch = make_batch("realistic", torch.float64, seed)
    assert_same_results(run_loss(batch, backend, _stft_loss_fn=fn, kl_weight=0.1),
                        run_loss(batch, "reference", _stft_loss_fn=ref_fn, kl_weight=0.1),
                        1e-10, 1e-8)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_unsupported_auraloss_instance_is_called_as_given(backend, seed, monkeypatch):
    fn = auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=[256], hop_sizes=[64],
                                               win_lengths=[256], w_phs=0.5)
    calls = []
    original = type(fn).forward

    def counting_forward(self, x, y):
        calls.append(x.shape)
        return original(self, x, y)

    monkeypatch.setattr(type(fn), "forward", counting_forward)
    batch = make_batch("noise", torch.float64, seed)
    ref = run_loss(batch, "reference", _stft_loss_fn=fn)
    n_ref = len(calls)
    got = run_loss(batch, backend, _stft_loss_fn=fn)
    assert n_ref == 1 and len(calls) == 2
    assert_same_results(got, ref, 1e-12, 1e-12)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_any_callable_stft_loss_fn_matches_oracle(backend, seed):
    def l2(x, y):
        return ((x - y) ** 2).mean()

    batch = make_batch("noise", torch.float64, seed)
    assert_matches_oracle(batch, backend, torch.float64, _stft_loss_fn=l2)


def test_non_callable_stft_loss_fn_is_a_type_error(seed):
    batch = make_batch("noise", torch.float32, seed)
    with pytest.raises(TypeError, match="_stft_loss_fn"):
        compute_combined_loss(*batch, _stft_loss_fn=42)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1031), (1, 2, 777), (3, 2, 1501)],
                         ids=["B1-C1-odd", "B1-C2-odd", "B3-C2-odd"])
def test_module_matches_auraloss_on_odd_lengths_and_channels(backend, shape, seed):
    settings = dict(fft_sizes=[256, 128, 64], hop_sizes=[64, 50, 16], win_lengths=[256, 100, 64])
    x, y = signal_pair(seed, *shape)
    ref = stft_value_and_grads(auraloss.freq.MultiResolutionSTFTLoss(**settings), x, y)
    got = stft_value_and_grads(MultiResolutionSTFTLoss(**settings, backend=backend), x, y)
    assert rel_err(got[0], ref[0]) <= 1e-10
    assert rel_err(got[1], ref[1]) <= 1e-8
    assert rel_err(got[2], ref[2]) <= 1e-8


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_attributes_changed_after_construction_are_honoured(backend, seed):
    """Like auraloss's own attributes: each change re-plans the loss (checked as the constructor
    checks it), and the result equals a module built with the new values."""
    x, y = signal_pair(seed, 2, 2, 300)
    kwargs = dict(fft_sizes=[32, 64], hop_sizes=[8, 16], win_lengths=[32, 50], backend=backend)
    module = MultiResolutionSTFTLoss(**kwargs)
    changes = [("w_sc", 0.0), ("w_lin_mag", 0.5), ("fft_sizes", [32, 128]),
               ("win_lengths", [20, 128]), ("window", "hamming_window"), ("eps", 0.5)]
    for name, value in changes:
        before = module(x, y)
        setattr(module, name, value)
        kwargs[name] = value
        after = module(x, y)
        assert torch.equal(after, MultiResolutionSTFTLoss(**kwargs)(x, y)), name
        assert not torch.equal(before, after), name
    module.hop_sizes[0] = 4  # in place
    kwargs["hop_sizes"] = [4, 16]
    assert torch.equal(module(x, y), MultiResolutionSTFTLoss(**kwargs)(x, y))
    assert "hop_sizes=[4, 16]" in repr(module)
    module.eps = -1.0
    with pytest.raises(ValueError, match="MultiResolutionSTFTLoss.eps"):
        module(x, y)


def test_changed_module_changes_the_combined_loss(seed):
    batch = make_batch("realistic", torch.float64, seed)
    module = create_stft_loss(LossConfig())
    first = compute_combined_loss(*batch, LossConfig(), _stft_loss_fn=module)["stft_loss"]
    module.w_lin_mag = 1.0
    second = compute_combined_loss(*batch, LossConfig(), _stft_loss_fn=module)["stft_loss"]
    expected = auraloss.freq.MultiResolutionSTFTLoss(
        fft_sizes=[512, 1024, 2048], hop_sizes=[128, 256, 512], win_lengths=[512, 1024, 2048],
        w_lin_mag=1.0)(batch[0][:, :1].reshape(2, 1, -1), batch[1][:, :1].reshape(2, 1, -1))
    assert rel_err(second, expected) <= 1e-10 and not torch.equal(first, second)
