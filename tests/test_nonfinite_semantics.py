"""NaN and inf in any input: every output, and every gradient of every output, is non-finite
exactly where the reference's is (element by element), and a term's gradient never carries a
NaN from a term it is not part of.

One non-finite value (NaN, +inf or -inf) is put at a random element of one input (each channel
of ``recon`` and ``target``, ``mu``, ``logvar``); then, for each of the six outputs alone, the
gradients of all four inputs are compared with the reference's, pattern for pattern."""

import pytest
import torch

from conftest import (
    FAST_BACKENDS,
    LOSS_KEYS,
    TINY_RESOLUTIONS,
    float64_and_float32,
    leaf_copies,
    tiny_config,
)
from distill_fused import (
    LossConfig,
    MultiResolutionSTFTLoss,
    ReconLossConfig,
    STFTLossConfig,
    compute_combined_loss,
)

SMALL = tiny_config()
# Weights of 0: the reference still multiplies those terms' gradients in (0 * nan is nan).
ZERO_WEIGHTS = LossConfig(stft=STFTLossConfig(weight=0.0, **TINY_RESOLUTIONS),
                          reconstruction=ReconLossConfig(magnitude_weight=0.0, if_weight=0.0))
# Without the spectral-convergence term a NaN spreads only through the frames that hold it.
LOCAL = dict(fft_sizes=(16, 32), hop_sizes=(4, 8), win_lengths=(12, 32), w_sc=0.0,
             w_lin_mag=1.0)
PLACES = [("recon", 0), ("recon", 1), ("target", 0), ("target", 1), ("mu", None),
          ("logvar", None)]
VALUES = [float("nan"), float("inf"), -float("inf")]
# Under TRITON_INTERPRET=1 the kernels are numpy, which warns about the NaN and inf arithmetic
# that is the point of these tests.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _batch(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    recon, target = (torch.randn(2, 2, 4, 20, generator=g, dtype=torch.float64)
                     for _ in range(2))
    recon[:, 0].abs_()
    target[:, 0].abs_()
    mu, logvar = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    return [t.to(dtype) for t in (recon, target, mu, logvar)], g


def _patterns(batch, backend, config, stft_fn):
    """Per output: (is the value finite, the finite-mask of each input's gradient)."""
    leaves = leaf_copies(batch)
    out = compute_combined_loss(*leaves, config, 0.1, stft_fn, backend=backend)
    patterns = {}
    for key in LOSS_KEYS:
        grads = torch.autograd.grad(out[key], leaves, allow_unused=True, retain_graph=True)
        patterns[key] = (bool(torch.isfinite(out[key])),
                         [torch.ones_like(t, dtype=torch.bool) if g is None else torch.isfinite(g)
                          for t, g in zip(leaves, grads)])
    return patterns


@pytest.mark.parametrize("stft", ["config", "no-sc-term", "zero-weights"])
@float64_and_float32
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_nonfinite_patterns_equal_the_reference(backend, dtype, stft, seed):
    stft_fn = MultiResolutionSTFTLoss(**LOCAL) if stft == "no-sc-term" else None
    config = ZERO_WEIGHTS if stft == "zero-weights" else SMALL
    names = ("recon", "target", "mu", "logvar")
    batch, g = _batch(seed, dtype)
    mismatches = []
    for place, channel in PLACES:
        for value in VALUES:
            poisoned = [t.clone() for t in batch]
            t = poisoned[names.index(place)]
            view = t[:, channel] if channel is not None else t
            where = torch.unravel_index(torch.randint(view.numel(), (), generator=g), view.shape)
            view[where] = value
            assert int((~torch.isfinite(t)).sum()) == 1
            ref = _patterns(poisoned, "reference", config, stft_fn)
            got = _patterns(poisoned, backend, config, stft_fn)
            case = f"{value} in {place}" + (f"[:, {channel}]" if channel is not None else "")
            for key in LOSS_KEYS:
                if got[key][0] != ref[key][0]:
                    mismatches.append(f"{case}: {key} finite={got[key][0]}, reference "
                                      f"{ref[key][0]}")
                for name, mask, ref_mask in zip(names, got[key][1], ref[key][1]):
                    if not torch.equal(mask, ref_mask):
                        mismatches.append(
                            f"{case}: d{key}/d{name} has {int((~mask).sum())} non-finite "
                            f"elements, the reference {int((~ref_mask).sum())} (or elsewhere)")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_fallback_gradient_is_the_reconstruction_terms_alone(backend, seed):
    """With the total not finite (here the KL overflows), the total falls back to recon_loss,
    and its gradient is recon_loss's: nothing from the STFT or KL terms, not even 0 * inf."""
    batch, _ = _batch(seed, torch.float64)
    batch[3][0, 0] = 1e5
    leaves = leaf_copies(batch)
    out = compute_combined_loss(*leaves, SMALL, 0.1, backend=backend)
    assert torch.isinf(out["kl_loss"]) and torch.equal(out["total_loss"], out["recon_loss"])
    total = torch.autograd.grad(out["total_loss"], leaves, allow_unused=True, retain_graph=True)
    recon = torch.autograd.grad(out["recon_loss"], leaves, allow_unused=True)
    for a, b, leaf in zip(total, recon, leaves):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        assert torch.equal(a, b)
