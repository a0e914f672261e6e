"""Where a comparison's edge decides the result: the free-bits floor, the reflect padding's
outermost samples, ``kl_weight == 0`` beside a non-finite KL. Each case sits exactly on its
boundary, so that ``>=`` written as ``>`` (or ``<=`` as ``<``) changes values or gradients the
oracle checks (``make mutants`` applies such edits and expects these tests to fail). Also: each
output checked on its own, not only through the total, and a ``recon_loss`` whose terms
cancel."""

import auraloss
import pytest
import torch

from conftest import (
    FAST_BACKENDS,
    LOSS_KEYS,
    assert_matches_oracle,
    float64_and_float32,
    make_batch,
    rel_err,
    run_loss,
    signal_pair,
    stft_value_and_grads,
)
from distill_fused import KLLossConfig, LossConfig, MultiResolutionSTFTLoss, STFTLossConfig

# Where the STFT term is not the point: two small resolutions (the interpreter is slow).
SMALL_STFT = STFTLossConfig(fft_sizes=(128, 64), hop_sizes=(32, 16), win_lengths=(128, 50))

# --------------------------------------------------------------------------------------------
# The free-bits floor: k = -0.5 (1 + logvar - mu^2 - exp(logvar)) = mu^2 / 2 at logvar = 0, so
# mu = 0.5 puts k exactly on free_bits = 0.125 (exact in float32 too). torch.clamp passes the
# gradient there: dkl/dmu = mu / B = 0.25 at B = 2.
# --------------------------------------------------------------------------------------------

FLOOR = KLLossConfig(free_bits=0.125)


def _on_the_floor(batch):
    recon, target, mu, logvar = (t.clone() for t in batch)
    mu[:, ::2] = 0.5      # on the floor
    logvar[:, ::2] = 0.0
    mu[:, 1::4] = 0.1     # below it (k = 0.005): no gradient
    logvar[:, 1::4] = 0.0
    return recon, target, mu, logvar


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@float64_and_float32
@pytest.mark.parametrize("key", ["total_loss", "kl_loss"])
def test_free_bits_floor_passes_the_gradient(backend, dtype, key, seed):
    batch = _on_the_floor(make_batch("realistic", torch.float64, seed, latent_dim=8))
    config = LossConfig(kl=FLOOR, stft=SMALL_STFT)
    _, grads = assert_matches_oracle(batch, backend, dtype, key=key, loss_config=config,
                                     kl_weight=1.0)
    on_floor = grads[2][:, ::2]
    expected = batch[2][:, ::2] / batch[2].shape[0]
    assert torch.equal(on_floor.double(), expected), "the floor's elements get mu / B"
    assert torch.equal(grads[2][:, 1::4], torch.zeros_like(grads[2][:, 1::4]))


# --------------------------------------------------------------------------------------------
# The reflect padding (center=True) of the STFT, through its adjoint: the outermost padded
# samples (positions 0 and T + 2 pad - 1) reflect samples pad and T - 1 - pad, and weigh
# w[0] and w[n - 1]. Windows that vanish at their ends (hann, or zero padding when
# win_length < n_fft on both sides) hide them; these do not. The far one is reached only when
# the last frame ends there: hop divides T (n even).
# --------------------------------------------------------------------------------------------

EDGE_WINDOWS = {
    "hamming-64": dict(fft_sizes=[64], hop_sizes=[16], win_lengths=[64],
                       window="hamming_window"),
    "hamming-63-in-64": dict(fft_sizes=[64], hop_sizes=[16], win_lengths=[63],
                             window="hamming_window"),
    "blackman-64": dict(fft_sizes=[64], hop_sizes=[16], win_lengths=[64],
                        window="blackman_window"),
    "hamming-odd-63": dict(fft_sizes=[63], hop_sizes=[16], win_lengths=[63],
                           window="hamming_window"),
    "two-resolutions": dict(fft_sizes=[64, 32], hop_sizes=[16, 8], win_lengths=[64, 32],
                            window="hamming_window", w_lin_mag=0.5),
}
# 1008 = 63 * 16: the last frame ends on the far boundary; 1000 and 1009 leave a remainder.
EDGE_LENGTHS = [1000, 1008, 1009]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("length", EDGE_LENGTHS)
@pytest.mark.parametrize("name", list(EDGE_WINDOWS))
def test_module_at_the_reflect_boundaries(backend, name, length, seed):
    settings = EDGE_WINDOWS[name]
    x, y = signal_pair(seed, 2, 1, length)
    ref = stft_value_and_grads(auraloss.freq.MultiResolutionSTFTLoss(**settings), x, y)
    got = stft_value_and_grads(MultiResolutionSTFTLoss(**settings, backend=backend), x, y)
    assert rel_err(got[0], ref[0]) <= 1e-10
    for g, g_ref, side in zip(got[1:], ref[1:], ("input", "target")):
        assert rel_err(g, g_ref) <= 1e-8, side
        # The samples the boundary mutations touch, on their own (the norm above spreads them
        # over the whole signal).
        pad = settings["fft_sizes"][0] // 2
        for t in (0, 1, pad - 1, pad, pad + 1, length - 2 - pad, length - 1 - pad,
                  length - pad, length - 2, length - 1):
            torch.testing.assert_close(g[..., t], g_ref[..., t], rtol=1e-8, atol=1e-14,
                                       msg=lambda m, side=side, t=t: f"{side} sample {t}: {m}")


def _rectangular_auraloss(settings):
    """An auraloss module whose windows are all ones (auraloss takes any window tensor)."""
    module = auraloss.freq.MultiResolutionSTFTLoss(
        **{k: v for k, v in settings.items() if k != "window"})
    for loss in module.stft_losses:
        loss.window = torch.ones(loss.win_length)
    return module


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@float64_and_float32
@pytest.mark.parametrize("shape", [(8, 125), (16, 63), (1, 1009)], ids=EDGE_LENGTHS)
@pytest.mark.parametrize("name", ["hamming-64", "hamming-odd-63", "rectangular-64"])
def test_combined_loss_matches_oracle_at_the_reflect_boundaries(backend, dtype, shape, name, seed):
    """The same boundaries through ``compute_combined_loss``: the spectrogram ``[H, W]``
    flattened to H*W = 1000, 1008 and 1009 samples, windows with non-zero ends (ours, and an
    auraloss module with a rectangular window)."""
    if name == "rectangular-64":
        settings = EDGE_WINDOWS["hamming-64"]
        stft_fn = _rectangular_auraloss(settings)
    else:
        settings = EDGE_WINDOWS[name]
        stft_fn = MultiResolutionSTFTLoss(**settings)
    config = LossConfig(stft=STFTLossConfig(weight=3.0, fft_sizes=tuple(settings["fft_sizes"]),
                                            hop_sizes=tuple(settings["hop_sizes"]),
                                            win_lengths=tuple(settings["win_lengths"])))
    h, w = shape
    batch = make_batch("noise", torch.float64, seed, height=h, width=w, latent_dim=3)
    assert_matches_oracle(batch, backend, dtype, grad_target=True, key="stft_loss",
                          loss_config=config, kl_weight=0.1, _stft_loss_fn=stft_fn)


# --------------------------------------------------------------------------------------------
# kl_weight <= 0 leaves the KL out of the total, also where the KL is infinite: 0 * inf must
# not get in (it would make the total NaN, and the guard would return recon_loss alone).
# --------------------------------------------------------------------------------------------

KL_OFF = [0.0, -0.0, -0.5, "tensor-0", "tensor-neg"]


def _kl_weight(value, dtype):
    if value == "tensor-0":
        return torch.tensor(0.0, dtype=dtype)
    if value == "tensor-neg":
        return torch.tensor(-0.5, dtype=dtype)
    return value


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@float64_and_float32
@pytest.mark.parametrize("kl_weight", KL_OFF, ids=[str(v) for v in KL_OFF])
def test_kl_weight_off_beside_an_infinite_kl(backend, dtype, kl_weight, seed):
    recon, target, mu, logvar = make_batch("realistic", torch.float64, seed)
    logvar[0, 0] = 1e5  # exp overflows: kl_loss = inf
    kw = _kl_weight(kl_weight, dtype)
    config = LossConfig(stft=SMALL_STFT)
    out, grads = assert_matches_oracle((recon, target, mu, logvar), backend, dtype,
                                       grad_target=True, loss_config=config, kl_weight=kw)
    assert torch.isinf(out["kl_loss"])
    expected = config.stft.weight * out["stft_loss"] + out["recon_loss"]
    assert torch.isfinite(out["total_loss"]) and out["total_loss"] != out["recon_loss"]
    torch.testing.assert_close(out["total_loss"], expected, rtol=1e-6, atol=0)
    assert torch.equal(grads[2], torch.zeros_like(grads[2]))
    assert torch.equal(grads[3], torch.zeros_like(grads[3]))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_any_positive_kl_weight_with_an_infinite_kl_falls_back(backend, seed):
    """The other side of the gate: kl_weight > 0 (however small) lets the infinite KL in, and
    the guard returns recon_loss."""
    recon, target, mu, logvar = make_batch("realistic", torch.float64, seed)
    logvar[0, 0] = 1e5
    config = LossConfig(stft=SMALL_STFT)
    for kw in (1e-300, torch.tensor(1e-300, dtype=torch.float64)):
        out, _ = run_loss((recon, target, mu, logvar), backend, loss_config=config,
                          kl_weight=kw)
        ref, _ = run_loss((recon, target, mu, logvar), "reference", loss_config=config,
                          kl_weight=kw)
        assert torch.equal(out["total_loss"], out["recon_loss"])
        assert rel_err(out["total_loss"], ref["total_loss"]) <= 1e-10


# --------------------------------------------------------------------------------------------
# Each term against the oracle on its own: its value and the gradients of it alone, with
# weights that make every term matter (kl_weight = 1, latent elements on, below and above the
# free-bits floor).
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FAST_BACKENDS)
@float64_and_float32
@pytest.mark.parametrize("key", LOSS_KEYS)
def test_each_term_alone_matches_the_oracle(backend, dtype, key, seed):
    batch = _on_the_floor(make_batch("realistic", torch.float64, seed, width=69))
    config = LossConfig(kl=FLOOR, stft=SMALL_STFT)
    config.stft.weight, config.reconstruction.if_weight = 2.0, 1.5
    out, grads = assert_matches_oracle(batch, backend, dtype, grad_target=True, key=key,
                                       loss_config=config, kl_weight=1.0)
    reached = {"stft_loss": (0, 1), "mag_recon_loss": (0, 1), "if_recon_loss": (0, 1),
               "kl_loss": (2, 3), "recon_loss": (0, 1), "total_loss": (0, 1, 2, 3)}[key]
    for i, g in enumerate(grads):
        assert (g.abs().sum() > 0) == (i in reached), f"d{key}/d input {i}"


# --------------------------------------------------------------------------------------------
# Cancellation: the IF term is negative where the target's magnitudes are (sum |ri - ti| tm
# < 0 < sum tm), and magnitude_weight set so that recon_loss = w (w_mag mag + w_if if) is 1e-5
# of its terms. A float32 computation that rounds the terms before adding them loses 5 of its
# 7 digits there (the float32 oracle does); the fast backends form it in float64.
# --------------------------------------------------------------------------------------------

def _cancelling_batch(seed, dtype):
    recon, target, mu, logvar = (t.clone() for t in make_batch("noise", torch.float64, seed))
    tm = target[:, 0]
    tm += 0.05 - tm.mean()                       # mean(tm) = 0.05 > 0
    gap = torch.where(tm < 0, 2.0, 0.1) * recon[:, 1].abs()
    recon[:, 1] = target[:, 1] + gap              # |ri - ti| large where tm < 0: if < 0
    batch = [t.to(dtype).double() for t in (recon, target, mu, logvar)]
    ref, _ = run_loss(batch, "reference", torch.float64, loss_config=LossConfig(), kl_weight=0)
    mag, if_loss = ref["mag_recon_loss"].item(), ref["if_recon_loss"].item()
    assert if_loss < 0 < mag
    config = LossConfig()
    rc = config.reconstruction
    rc.magnitude_weight = -rc.if_weight * if_loss / mag * (1 + 1e-5)
    return batch, config


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("path", ["fused", "modular"])
def test_recon_loss_that_cancels_keeps_float32_accuracy(backend, path, seed):
    batch, config = _cancelling_batch(seed, torch.float32)
    # A kl_weight tensor that requires grad takes the modular path on the triton backend.
    kl_weight = 0.1 if path == "fused" else torch.tensor(0.1, requires_grad=True)
    ref64, _ = run_loss(batch, "reference", torch.float64, loss_config=config,
                        kl_weight=0.1)
    ref32, _ = run_loss(batch, "reference", torch.float32, loss_config=config,
                        kl_weight=0.1)
    recon_parts = config.reconstruction.if_weight * abs(ref64["if_recon_loss"])
    assert abs(ref64["recon_loss"]) < 2e-5 * recon_parts  # it does cancel
    assert rel_err(ref32["recon_loss"], ref64["recon_loss"]) > 1e-5  # the case is hard
    assert_matches_oracle(batch, backend, torch.float32, loss_config=config,
                          kl_weight=kl_weight)
