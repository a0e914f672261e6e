"""Every argument of auraloss 0.4.0's ``MultiResolutionSTFTLoss`` (and ``STFTLoss``,
``MelSTFTLoss``, ``ChromaSTFTLoss``) on our modules, against auraloss itself: a grid of option
sets, values and gradients in float64 and float32, noise and audio-like signals, odd sizes; the
mel filterbank against librosa's, bit for bit; A-weighting's FIR taps, auraloss's bit for bit;
and our defined behaviour where auraloss 0.4.0 fails."""

import sys
import types
import warnings

import auraloss
import numpy as np
import pytest
import torch

from conftest import FAST_BACKENDS, rel_err, requires_cuda, requires_triton, stft_value_and_grads
from distill_fused import ChromaSTFTLoss, MelSTFTLoss, MultiResolutionSTFTLoss, STFTLoss
from distill_fused.backends.reference import PerSignalScaleSTFTLoss
from distill_fused.core.filterbanks import mel_filterbank

pytestmark = pytest.mark.kernels

try:
    import librosa
except ImportError:
    # Where librosa is missing (the GPU image; the test extra installs it everywhere else),
    # auraloss's mel filterbank, librosa.filters.mel, comes from this package's copy, which
    # test_mel_filterbank_is_librosas_bit_for_bit checks against librosa wherever it is.
    librosa = None
    _shim = types.ModuleType("librosa")
    _shim.filters = types.ModuleType("librosa.filters")
    _shim.filters.mel = lambda *, sr, n_fft, n_mels: mel_filterbank(sr, n_fft, n_mels).numpy()

    def _no_chroma(**kwargs):
        raise ImportError("librosa is not installed: its chroma filterbank is not available")

    _shim.filters.chroma = _no_chroma
    sys.modules.update({"librosa": _shim, "librosa.filters": _shim.filters})
needs_librosa = pytest.mark.skipif(
    librosa is None, reason="librosa is not installed (the test extra installs it): the "
    "comparison with librosa and the chroma scale, which needs it, skipped")

# Odd sizes: FFTs of 16, 30 and 64 samples, a hop that divides none of them, windows shorter
# than their FFT, a length that is no multiple of any hop.
SIZES = dict(fft_sizes=[16, 30, 64], hop_sizes=[4, 7, 16], win_lengths=[16, 25, 50])
LENGTH = 157
MEL = dict(sample_rate=8000, scale="mel", n_bins=6)

# auraloss's own tests call the module with its defaults, mel (with n_bins and sample_rate),
# perceptual weighting, L2, the phase term, scale invariance and output="full": each here,
# alone and combined.
OPTION_SETS = {
    "defaults": {},
    "lin-mag": dict(w_lin_mag=0.7),
    "no-sc": dict(w_sc=0.0, w_lin_mag=1.0),
    "L2": dict(mag_distance="L2"),
    "L2-lin": dict(mag_distance="L2", w_lin_mag=0.5, w_log_mag=2.0),
    "phase": dict(w_phs=0.3),
    "eps": dict(eps=1e-5, w_lin_mag=1.0),
    "window": dict(window="hamming_window"),
    "mel": MEL,
    "mel-L2-lin-phase": dict(MEL, mag_distance="L2", w_lin_mag=1.0, w_phs=0.5),
    "mel-eps": dict(MEL, eps=1e-4),
    "scale-invariance": dict(scale_invariance=True),
    "scale-invariance-mel-L2": dict(MEL, scale_invariance=True, mag_distance="L2"),
    "a-weighting": dict(sample_rate=44100, perceptual_weighting=True),
    "a-weighting-mel-L2-phase": dict(MEL, perceptual_weighting=True, mag_distance="L2",
                                     w_phs=0.1),
}
# auraloss 0.4.0's scale invariance is right for one signal only (docs/loss.md).
ONE_SIGNAL = {"scale-invariance", "scale-invariance-mel-L2"}


def audio_like(seed, batch, channels, length=LENGTH, dtype=torch.float64):
    """Two signals of harmonic tones under a decaying envelope, light noise and a stretch of
    exact silence (magnitudes at the eps floor)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64) / 8000

    def one():
        f0 = 100 + 900 * torch.rand(batch, channels, 1, generator=g, dtype=torch.float64)
        tone = sum(torch.sin(2 * np.pi * k * f0 * t + k) / k for k in range(1, 5))
        signal = tone * torch.exp(-5 * t) + 0.01 * torch.randn(
            batch, channels, length, generator=g, dtype=torch.float64)
        signal[..., length // 3:length // 3 + 20] = 0.0
        return signal.to(dtype)

    return one(), one()


def noise(seed, batch, channels, length=LENGTH, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, length, generator=g, dtype=torch.float64).to(dtype)
            for _ in range(2)]


SIGNALS = {"noise": noise, "audio": audio_like}


def auraloss_of(kwargs, dtype=torch.float64):
    """auraloss's module for ``kwargs``, its filterbanks and FIR taps in ``dtype`` (auraloss
    keeps them in float32: float64 signals then fail on the dtype)."""
    module = auraloss.freq.MultiResolutionSTFTLoss(**SIZES, **kwargs)
    for loss in module.stft_losses:
        if getattr(loss, "fb", None) is not None:
            loss.fb = loss.fb.to(dtype)
        if loss.perceptual_weighting:
            loss.prefilter.fir.to(dtype)
    return module


def oracle_value_and_grads(module, x, y, dtype=torch.float64):
    x, y = (t.detach().to(dtype).requires_grad_() for t in (x, y))
    loss = module(x, y)
    gx, gy = torch.autograd.grad(loss, (x, y))
    return loss.detach(), gx, gy


def assert_close(got, ref, loss_tol, grad_tol, what=""):
    assert rel_err(got[0], ref[0]) <= loss_tol, (what, got[0], ref[0])
    for g, r, name in zip(got[1:], ref[1:], ("input", "target")):
        assert rel_err(g, r) <= grad_tol, (what, name, rel_err(g, r))


# --------------------------------------------------------------------------------------------
# The filterbank
# --------------------------------------------------------------------------------------------

@needs_librosa
@pytest.mark.triton_free
@pytest.mark.parametrize("sample_rate", [8000, 16000, 22050, 44100, 48000.0])
def test_mel_filterbank_is_librosas_bit_for_bit(sample_rate):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa's "empty filters" warning for the small FFTs
        for n_fft in (16, 30, 32, 100, 512, 2048):
            for n_mels in (1, 5, 40, 128, 320):
                if n_mels > n_fft:
                    continue
                ours = mel_filterbank(sample_rate, n_fft, n_mels)
                theirs = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)
                assert ours.dtype == torch.float32
                assert np.array_equal(ours.numpy(), theirs), (sample_rate, n_fft, n_mels)


# --------------------------------------------------------------------------------------------
# The grid: every option set against auraloss
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("signals", sorted(SIGNALS))
@pytest.mark.parametrize("options", sorted(OPTION_SETS))
def test_float64_equals_auraloss(options, signals, backend, seed):
    kwargs = OPTION_SETS[options]
    channels, batch = (1, 1) if options in ONE_SIGNAL else (2, 2)
    x, y = SIGNALS[signals](seed, batch, channels)
    ref = oracle_value_and_grads(auraloss_of(kwargs), x, y)
    got = stft_value_and_grads(MultiResolutionSTFTLoss(**SIZES, **kwargs, backend=backend), x, y)
    assert torch.isfinite(ref[0])
    assert_close(got, ref, 1e-10, 1e-8, options)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("signals", sorted(SIGNALS))
@pytest.mark.parametrize("options", ["L2", "phase", "mel", "mel-L2-lin-phase",
                                     "scale-invariance", "a-weighting-mel-L2-phase"])
def test_float32_by_the_spec_rule(options, signals, backend, seed):
    """float32 against the float64 oracle: 1e-5 on the loss; on each gradient no worse than
    max(1e-3, 2 x the float32 oracle's own error). With the phase term, the loss too takes
    max(1e-5, 2 x the float32 oracle's own error): ``arg`` jumps by 2 pi across the negative
    real axis, and the DC and Nyquist bins sit on it (their imaginary part is a zero whose
    sign the FFT's rounding decides), so float32 and float64 spectra can differ there by
    (2 pi)^2 per bin, in auraloss's own float32 loss as much as in ours (docs/testing.md)."""
    kwargs = OPTION_SETS[options]
    channels, batch = (1, 1) if options in ONE_SIGNAL else (2, 2)
    x, y = SIGNALS[signals](seed, batch, channels)
    ref = oracle_value_and_grads(auraloss_of(kwargs), x, y)
    ref32 = oracle_value_and_grads(auraloss_of(kwargs, torch.float32), x, y, torch.float32)
    got = stft_value_and_grads(MultiResolutionSTFTLoss(**SIZES, **kwargs, backend=backend), x, y,
                               torch.float32)
    assert got[0].dtype == torch.float32
    loss_tol = max(1e-5, 2 * rel_err(ref32[0], ref[0])) if kwargs.get("w_phs") else 1e-5
    assert rel_err(got[0], ref[0]) <= loss_tol
    for g, g32, r in zip(got[1:], ref32[1:], ref[1:]):
        assert rel_err(g, r) <= max(1e-3, 2 * rel_err(g32, r))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_filterbank_per_resolution(backend, seed):
    """``n_bins`` per resolution (DAC's multi-scale mel): each resolution its own auraloss
    ``STFTLoss``, averaged."""
    x, y = audio_like(seed, 2, 1)
    bins = [4, 10, 24]
    options = dict(sample_rate=8000, scale="mel", mag_distance="L2", w_lin_mag=1.0)
    losses = [auraloss.freq.STFTLoss(n, hop, win, n_bins=b, **options)
              for n, hop, win, b in zip(*SIZES.values(), bins)]
    for loss in losses:
        loss.fb = loss.fb.to(torch.float64)
    ref = oracle_value_and_grads(lambda a, b: sum(f(a, b) for f in losses) / 3, x, y)
    got = stft_value_and_grads(MultiResolutionSTFTLoss(**SIZES, **dict(options, n_bins=bins),
                                                       backend=backend), x, y)
    assert_close(got, ref, 1e-10, 1e-8)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_output_full_is_aurlosss_tuple(backend, seed):
    kwargs = dict(MEL, w_phs=0.2, w_lin_mag=0.0)
    x, y = audio_like(seed, 2, 2)
    theirs = auraloss_of(dict(kwargs, output="full"))(x, y)
    ours = MultiResolutionSTFTLoss(**SIZES, **kwargs, output="full", backend=backend)(x, y)
    assert len(ours) == len(theirs) == 5
    assert rel_err(ours[0], theirs[0]) <= 1e-10
    for our_terms, their_terms in zip(ours[1:], theirs[1:]):
        assert len(our_terms) == len(their_terms) == 3
        for a, b in zip(our_terms, their_terms):
            if isinstance(b, float):  # a term whose weight is 0: auraloss's 0.0
                assert a == b == 0.0
            else:
                assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("kind", ["stft", "mel", "mel-full"])
def test_single_resolution_classes_equal_aurlosss(kind, backend, seed):
    x, y = audio_like(seed, 2, 1, length=301)
    if kind == "stft":
        args, kwargs = (64, 16, 50), dict(w_lin_mag=1.0, w_phs=0.1, mag_distance="L2")
        ours, theirs = STFTLoss(*args, **kwargs, backend=backend), auraloss.freq.STFTLoss(
            *args, **kwargs)
    else:
        kwargs = dict(fft_size=64, hop_size=16, win_length=64, n_mels=12)
        if kind == "mel-full":
            kwargs["output"] = "full"
        ours = MelSTFTLoss(8000, **kwargs, backend=backend)
        theirs = auraloss.freq.MelSTFTLoss(8000, **kwargs)
        theirs.fb = theirs.fb.to(torch.float64)
    assert (ours.fft_size, ours.hop_size, ours.win_length) == (
        theirs.fft_size, theirs.hop_size, theirs.win_length)
    if kind == "mel-full":
        got, ref = ours(x, y), theirs(x, y)
        assert len(got) == len(ref) == 5
        for a, b in zip(got, ref):
            assert a == b == 0.0 if isinstance(b, float) else rel_err(a, b) <= 1e-10
        return
    assert_close(stft_value_and_grads(ours, x, y), oracle_value_and_grads(theirs, x, y),
                 1e-10, 1e-8)


# --------------------------------------------------------------------------------------------
# A-weighting: auraloss's FIR, then our STFT terms
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_weighting_filters_with_aurlosss_taps_and_calls_no_auraloss(backend, seed,
                                                                        monkeypatch):
    """The FIR is auraloss's (its taps, bit for bit), and the rest is ours: auraloss's
    ``STFTLoss.forward`` is never called (it computes ``torch.angle``, which MPS lacks)."""
    from distill_fused.core.settings import a_weighting_taps
    theirs = auraloss.perceptual.FIRFilter(filter_type="aw", fs=22050).fir.weight
    assert torch.equal(a_weighting_taps(22050), theirs.detach().reshape(-1))

    def refused(*args, **kwargs):
        raise AssertionError("auraloss's STFTLoss was called")

    x, y = audio_like(seed, 2, 1)
    module = MultiResolutionSTFTLoss(**SIZES, **OPTION_SETS["a-weighting"], backend=backend)
    monkeypatch.setattr(auraloss.freq.STFTLoss, "forward", refused)
    assert module(x, y).isfinite()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_a_weighting_in_blocks_equals_aurlosss(backend, seed, monkeypatch):
    """Signals longer than ``FIR_BLOCK`` are filtered in blocks (MPS refuses longer
    convolutions on macOS 14 and 15.0): the same loss and gradients, here with blocks of 40
    samples, shorter than the filter."""
    from distill_fused.backends import per_example
    monkeypatch.setattr(per_example, "FIR_BLOCK", 40)
    kwargs = OPTION_SETS["a-weighting-mel-L2-phase"]
    x, y = audio_like(seed, 2, 2)
    ref = oracle_value_and_grads(auraloss_of(kwargs), x, y)
    got = stft_value_and_grads(MultiResolutionSTFTLoss(**SIZES, **kwargs, backend=backend), x, y)
    assert_close(got, ref, 1e-10, 1e-8)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_a_weighting_in_the_combined_loss_of_a_padded_batch(reduction, backend, seed):
    """The combined loss with an A-weighting module and ``lengths``: the FIR filters each
    example's crop ``[H, :L_b]`` read row-major (its taps reach across rows, as in the
    flattened signal auraloss filters), against the reference (auraloss on each crop for
    ``none``, the batch-level sums over the crops for ``mean``)."""
    from conftest import make_batch
    from distill_fused import compute_combined_loss
    module = MultiResolutionSTFTLoss([16, 32], [4, 7], [16, 25], sample_rate=8000,
                                     perceptual_weighting=True, w_phs=0.2)
    batch = make_batch("realistic", torch.float64, seed, batch=3, height=6, width=37)
    lengths = torch.tensor([37, 20, 9])
    weights = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def run(name):
        leaves = [t.clone().requires_grad_() for t in batch]
        out = compute_combined_loss(*leaves, _stft_loss_fn=module, kl_weight=0.1,
                                    reduction=reduction, lengths=lengths, backend=name)
        total = (out["total_loss"] * weights).sum() if reduction == "none" \
            else out["total_loss"]
        total.backward()
        return out, [leaf.grad for leaf in leaves]

    (out, grads), (ref, ref_grads) = run(backend), run("reference")
    for key in ref:
        assert rel_err(out[key], ref[key]) <= 1e-10, key
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-8
    assert not grads[0][1, :, :, 20:].any() and not grads[0][2, :, :, 9:].any()


# --------------------------------------------------------------------------------------------
# Where auraloss 0.4.0 fails: our defined behaviour
# --------------------------------------------------------------------------------------------

def chroma_as_auraloss_means_it(n_chroma, **kwargs):
    """auraloss's module with ``scale="chroma"`` as its code means it: auraloss 0.4.0
    registers librosa's numpy filterbank as a buffer, which torch refuses (a ``TypeError`` at
    construction); here it is converted to a tensor, as its mel filterbank is."""
    module = auraloss_of(kwargs)
    for loss in module.stft_losses:
        loss.scale, loss.n_bins = "chroma", n_chroma
        loss.fb = torch.tensor(librosa.filters.chroma(sr=kwargs.get("sample_rate", 8000),
                                                      n_fft=loss.fft_size, n_chroma=n_chroma),
                               dtype=torch.float64)
    return module


@needs_librosa
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("signals", sorted(SIGNALS))
def test_chroma_is_aurlosss_meaning(signals, backend, seed):
    with pytest.raises(TypeError, match="fb"):
        auraloss.freq.MultiResolutionSTFTLoss(**SIZES, sample_rate=8000, scale="chroma",
                                              n_bins=12)
    x, y = SIGNALS[signals](seed, 2, 1)
    ref = oracle_value_and_grads(chroma_as_auraloss_means_it(12, w_lin_mag=1.0), x, y)
    got = stft_value_and_grads(MultiResolutionSTFTLoss(
        **SIZES, sample_rate=8000, scale="chroma", n_bins=12, w_lin_mag=1.0, backend=backend),
        x, y)
    assert_close(got, ref, 1e-10, 1e-8)
    assert ChromaSTFTLoss(8000, 64, 16, 64, backend=backend)(x, y).isfinite()

@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_scale_invariance_takes_one_alpha_per_signal(backend, seed):
    """auraloss 0.4.0 multiplies bin j by signal j's alpha (``alpha.unsqueeze(-1)``): with
    several signals it fails, or, when there are as many signals as bins, scales the wrong
    axis. Ours: one alpha per signal, auraloss's with one signal (the grid above)."""
    kwargs = dict(MEL, scale_invariance=True)
    x, y = audio_like(seed, 2, 2)
    with pytest.raises(RuntimeError):
        auraloss_of(kwargs)(x, y)
    per_signal = auraloss_of(kwargs)
    per_signal.stft_losses = torch.nn.ModuleList(
        PerSignalScaleSTFTLoss(n, hop, win, **kwargs) for n, hop, win in zip(*SIZES.values()))
    for loss in per_signal.stft_losses:
        loss.fb = loss.fb.to(torch.float64)
    ref = oracle_value_and_grads(per_signal, x, y)
    got = stft_value_and_grads(MultiResolutionSTFTLoss(**SIZES, **kwargs, backend=backend), x, y)
    assert_close(got, ref, 1e-10, 1e-8)
    # The per-signal oracle is auraloss's own where auraloss is right: one signal.
    one = [t[:1, :1] for t in (x, y)]
    assert_close(oracle_value_and_grads(per_signal, *one),
                 oracle_value_and_grads(auraloss_of(kwargs), *one), 0.0, 0.0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_reduction_none_with_several_resolutions(backend, seed):
    """auraloss 0.4.0's ``reduction="none"`` returns elementwise terms, whose shapes differ
    between resolutions: its module fails. Ours is per example (each example's loss as a
    batch of one)."""
    kwargs = dict(MEL, mag_distance="L2", w_phs=0.2)
    x, y = audio_like(seed, 3, 1)
    with pytest.raises(RuntimeError):
        auraloss.freq.MultiResolutionSTFTLoss(**SIZES, **kwargs, reduction="none")(
            x.float(), y.float())
    got = MultiResolutionSTFTLoss(**SIZES, **kwargs, reduction="none", backend=backend)(x, y)
    assert got.shape == (3,)
    for b in range(3):
        alone = auraloss_of(kwargs)(x[b:b + 1], y[b:b + 1])
        assert rel_err(got[b], alone) <= 1e-10


def test_float64_signals_with_mel_work(seed):
    """auraloss keeps its filterbank in float32 and fails on float64 signals; ours computes
    them in float64 (with librosa's float32 weights, exactly converted)."""
    x, y = audio_like(seed, 1, 1)
    with pytest.raises(RuntimeError):
        auraloss.freq.MultiResolutionSTFTLoss(**SIZES, **MEL)(x, y)
    assert MultiResolutionSTFTLoss(**SIZES, **MEL)(x, y).dtype == torch.float64


# --------------------------------------------------------------------------------------------
# Per example, padded batches, and the rest of our own options with auraloss's
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("options", ["mel-L2-lin-phase", "a-weighting-mel-L2-phase"])
def test_options_per_example_with_lengths(options, reduction, backend, seed):
    """``lengths`` and every reduction with mel, L2, lin and phase (and A-weighting): ``none``
    against auraloss on each cropped example alone, ``mean`` against the batch-level sums over
    the crops (the reference backend, from auraloss's own STFT and filterbank)."""
    kwargs = OPTION_SETS[options]
    x, y = audio_like(seed, 3, 2)
    lengths = torch.tensor([LENGTH, 41, 100])
    module = MultiResolutionSTFTLoss(**SIZES, **kwargs, reduction=reduction, backend=backend)
    weights = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    xg, yg = (t.clone().requires_grad_() for t in (x, y))
    out = module(xg, yg, lengths)
    (out * weights).sum().backward() if reduction == "none" else out.backward()
    if reduction == "mean":
        reference = MultiResolutionSTFTLoss(**SIZES, **kwargs, backend="reference")
        xr, yr = (t.clone().requires_grad_() for t in (x, y))
        expected = reference(xr, yr, lengths)
        expected.backward()
        assert rel_err(out, expected) <= 1e-10
        assert rel_err(xg.grad, xr.grad) <= 1e-8 and rel_err(yg.grad, yr.grad) <= 1e-8
        return
    total = 0.0
    for b, n in enumerate(lengths.tolist()):
        crop = [t[b:b + 1, :, :n].detach().requires_grad_() for t in (x, y)]
        alone = auraloss_of(kwargs)(*crop)
        if reduction == "none":
            assert rel_err(out[b], alone) <= 1e-10
        total = total + (weights[b] if reduction == "none" else 1.0) * alone
        gx, gy = torch.autograd.grad(alone, crop)
        scale = weights[b] if reduction == "none" else 1.0
        assert rel_err(xg.grad[b, :, :n], scale * gx[0]) <= 1e-8
        assert rel_err(yg.grad[b, :, :n], scale * gy[0]) <= 1e-8
        assert not xg.grad[b, :, n:].any()
    if reduction == "sum":
        assert rel_err(out, total) <= 1e-10


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_options_with_resolution_weights(backend, seed):
    kwargs = dict(OPTION_SETS["mel-L2-lin-phase"], resolution_weights=[0.5, 2.0, 1.0])
    x, y = audio_like(seed, 2, 1)
    ref_module = auraloss_of(OPTION_SETS["mel-L2-lin-phase"])
    ref = oracle_value_and_grads(lambda a, b: sum(
        w * f(a, b) for w, f in zip((0.5, 2.0, 1.0), ref_module.stft_losses)) / 3, x, y)
    got = stft_value_and_grads(MultiResolutionSTFTLoss(**SIZES, **kwargs, backend=backend), x, y)
    assert_close(got, ref, 1e-10, 1e-8)


def test_changing_an_option_replans(seed):
    x, y = audio_like(seed, 1, 1)
    module = MultiResolutionSTFTLoss(**SIZES)
    before = module(x, y)
    module.scale, module.sample_rate, module.n_bins = "mel", 8000, 6
    module.mag_distance = "L2"
    after = module(x, y)
    expected = MultiResolutionSTFTLoss(**SIZES, **MEL, mag_distance="L2")(x, y)
    assert torch.equal(after, expected) and not torch.equal(before, after)


def test_the_filterbank_is_made_once_per_device_and_dtype(seed):
    x, y = audio_like(seed, 1, 1)
    module = MultiResolutionSTFTLoss(**SIZES, **MEL, backend="torch")
    module(x, y)
    banks = {k: v for k, v in module.settings.cache.items() if k[0] == "filterbank"}
    assert len(banks) == 3 and all(k[3] == torch.float64 for k in banks)
    module(x, y)
    again = {k: v for k, v in module.settings.cache.items() if k[0] == "filterbank"}
    assert all(again[k] is banks[k] for k in banks)


# --------------------------------------------------------------------------------------------
# Every valid argument is accepted; an invalid one is an error naming it, before any work
# --------------------------------------------------------------------------------------------

@pytest.mark.triton_free
def test_every_auraloss_argument_is_accepted_positionally_and_by_name():
    import inspect
    theirs = inspect.signature(auraloss.freq.MultiResolutionSTFTLoss.__init__).parameters
    ours = inspect.signature(MultiResolutionSTFTLoss.__init__).parameters
    positional = [n for n, p in theirs.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert list(ours)[:len(positional)] == positional
    for name in positional[1:]:
        assert ours[name].default == theirs[name].default or (
            list(ours[name].default) == theirs[name].default), name
    stft_theirs = inspect.signature(auraloss.freq.STFTLoss.__init__).parameters
    for name, parameter in stft_theirs.items():
        if name in ("self", "fft_size", "hop_size", "win_length"):
            continue
        assert ours[name].default == parameter.default, name
    assert list(inspect.signature(STFTLoss.__init__).parameters)[:len(stft_theirs)] == list(
        stft_theirs)
    # By position, as auraloss's own tests and the users' code write it.
    module = MultiResolutionSTFTLoss([64, 32], [16, 8], [64, 32], "hann_window", 1.0, 1.0, 0.0,
                                     0.5, 8000, "mel", 6, False, False)
    assert (module.w_phs, module.scale, module.n_bins) == (0.5, "mel", 6)
    if librosa is not None:
        ChromaSTFTLoss(8000, 64, 16, 64)
    else:  # the chroma filterbank is librosa's: a clear error without it
        with pytest.raises(ImportError, match="librosa"):
            ChromaSTFTLoss(8000, 64, 16, 64)
    STFTLoss(device="cpu", reduction="sum", output="full", eps=1e-6)


@pytest.mark.triton_free
@pytest.mark.parametrize("kwargs, names", [
    (dict(scale="bark", sample_rate=8000, n_bins=4), "scale"),
    (dict(scale="mel", n_bins=4), "sample_rate"),
    (dict(scale="mel", sample_rate=8000), "n_bins"),
    (dict(scale="mel", sample_rate=8000, n_bins=17), "n_bins"),
    (dict(scale="mel", sample_rate=8000, n_bins=[4, 4]), "n_bins"),
    (dict(scale="mel", sample_rate=-1, n_bins=4), "sample_rate"),
    (dict(perceptual_weighting=True), "sample_rate"),
    (dict(mag_distance="L3"), "mag_distance"),
    (dict(output="terms"), "output"),
    (dict(w_phs=float("nan")), "w_phs"),
    (dict(scale_invariance="yes"), "scale_invariance"),
])
def test_invalid_options_name_the_argument(kwargs, names):
    with pytest.raises(ValueError, match=names):
        MultiResolutionSTFTLoss(**SIZES, **kwargs)


def test_unknown_argument_is_a_type_error():
    with pytest.raises(TypeError, match="fft_size"):
        MultiResolutionSTFTLoss(fft_size=512)


# --------------------------------------------------------------------------------------------
# The combined loss with such a module as its STFT term
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("options", ["mel-L2-lin-phase", "phase", "a-weighting"])
def test_combined_loss_with_an_options_module(options, backend, seed):
    """``compute_combined_loss(_stft_loss_fn=our module)`` with auraloss's options: the
    per-example path against the seed's computation with auraloss's module of the same
    options."""
    from conftest import assert_same_results, make_batch, run_loss
    kwargs = OPTION_SETS.get(options) or dict(sample_rate=8000, perceptual_weighting=True)
    kwargs = dict(kwargs, sample_rate=8000) if "sample_rate" in kwargs else kwargs
    sizes = dict(fft_sizes=[16, 32], hop_sizes=[4, 7], win_lengths=[16, 25])
    ours = MultiResolutionSTFTLoss(**sizes, **kwargs)
    theirs = auraloss.freq.MultiResolutionSTFTLoss(**sizes, **kwargs)
    for loss in theirs.stft_losses:
        if getattr(loss, "fb", None) is not None:
            loss.fb = loss.fb.to(torch.float64)
        if loss.perceptual_weighting:
            loss.prefilter.fir.to(torch.float64)
    batch = make_batch("realistic", torch.float64, seed, height=6, width=37)
    assert_same_results(run_loss(batch, backend, _stft_loss_fn=ours, kl_weight=0.1),
                        run_loss(batch, "reference", _stft_loss_fn=theirs, kl_weight=0.1),
                        1e-10, 1e-8)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_per_resolution_terms_carry_the_phase_term(backend, seed):
    from conftest import make_batch
    from distill_fused import compute_combined_loss
    sizes = dict(fft_sizes=[16, 32], hop_sizes=[4, 7], win_lengths=[16, 25])
    module = MultiResolutionSTFTLoss(**sizes, w_phs=0.5, w_lin_mag=1.0)
    batch = make_batch("noise", torch.float64, seed, height=6, width=37)
    out = compute_combined_loss(*batch, _stft_loss_fn=module, per_resolution_terms=True,
                                backend=backend)
    theirs = auraloss.freq.MultiResolutionSTFTLoss(**sizes, w_phs=0.5, w_lin_mag=1.0,
                                                   output="full")
    b = batch[0].shape[0]
    _, sc, log_mag, lin_mag, phs = theirs(batch[0][:, :1].reshape(b, 1, -1),
                                          batch[1][:, :1].reshape(b, 1, -1))
    for r in range(2):
        for name, values in (("sc", sc), ("log_mag", log_mag), ("lin_mag", lin_mag),
                             ("phs", phs)):
            assert rel_err(out[f"stft_{name}_loss_{r}"], values[r]) <= 1e-10, (name, r)


# --------------------------------------------------------------------------------------------
# The options path as a loss path: no host sync, launches, torch.compile, the GPU
# --------------------------------------------------------------------------------------------

MEL_L2 = dict(OPTION_SETS["mel-L2-lin-phase"])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_options_step_makes_no_host_sync(backend, seed):
    from conftest import SYNC_OPS, OpRecorder
    x, y = audio_like(seed, 2, 2)
    module = MultiResolutionSTFTLoss(**SIZES, **MEL_L2, backend=backend)
    module(x, y)  # the filterbanks and windows made once
    xg = x.clone().requires_grad_()
    with OpRecorder() as recorder:
        module(xg, y).backward()
    names = {op._schema.name for op in recorder.ops}
    path = {"aten::_fft_r2c", "aten::_fft_c2r", "aten::mm", "aten::atan2"}
    if backend == "triton":
        path |= {"distill_fused::stft_magnitudes", "distill_fused::example_feature_sums",
                 "distill_fused::example_feature_grad", "distill_fused::example_magnitude_grad"}
    assert not path - names, f"the recorder did not see the loss path: {path - names}"
    assert not [op for op in recorder.ops if op in SYNC_OPS]


@requires_triton
def test_options_launches_do_not_grow_with_the_batch(triton_launches, seed):
    counts = []
    for batch_size in (1, 4):
        x, y = audio_like(seed, batch_size, 2)
        triton_launches.clear()
        MultiResolutionSTFTLoss(**SIZES, **MEL_L2, reduction="none", backend="triton")(
            x.requires_grad_(), y).sum().backward()
        counts.append(sorted(triton_launches))
    assert counts[0] == counts[1]
    for kernel in ("_magnitudes_kernel", "_example_feature_sums_kernel",
                   "_example_feature_grad_kernel", "_example_magnitude_grad_kernel"):
        assert counts[0].count(kernel) == (6 if kernel == "_magnitudes_kernel" else 3), kernel


def _compiled_vs_eager(backend, device, compile_backend, seed):
    x, y = (t.float().to(device) for t in audio_like(seed, 3, 1))
    lengths = torch.tensor([LENGTH, 90, 40], device=device)
    module = MultiResolutionSTFTLoss(**SIZES, **MEL_L2, reduction="none", backend=backend)

    def step(x, y, lengths):
        return module(x, y, lengths)

    def run(fn):
        xg = x.clone().requires_grad_()
        loss = fn(xg, y, lengths)
        loss.sum().backward()
        return loss.detach(), xg.grad

    eager = run(step)
    compiled = run(torch.compile(step, backend=compile_backend, fullgraph=True))
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_options_path_traces_fullgraph_and_equals_eager(backend, seed):
    _compiled_vs_eager(backend, "cpu", "aot_eager", seed)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_options_on_cuda_equal_the_oracle_and_compile(backend, seed):
    """On a GPU: the grid's hardest option set against auraloss (float64), the fullgraph
    inductor compile, and no sync while syncs are errors."""
    x, y = (t.cuda() for t in audio_like(seed, 2, 2))
    ref = oracle_value_and_grads(auraloss_of(MEL_L2).cuda(), x, y)
    module = MultiResolutionSTFTLoss(**SIZES, **MEL_L2, backend=backend)
    assert_close(stft_value_and_grads(module, x, y), ref, 1e-10, 1e-8)
    _compiled_vs_eager(backend, "cuda", "inductor", seed)
    module(x.float(), y.float())
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(x.float().requires_grad_(), y.float()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
