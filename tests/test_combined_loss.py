"""Every fast backend against the auraloss oracle: values and gradients, float64 and float32,
noise and realistic magnitudes, fresh random inputs, odd and small sizes."""

import pytest
import torch

from conftest import (
    FAST_BACKENDS,
    assert_matches_oracle,
    assert_same_results,
    float64_and_float32,
    leaf_copies,
    make_batch,
    rel_err,
    requires_cuda,
    run_loss,
)
from distill_fused import LossConfig, STFTLossConfig


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@float64_and_float32
@pytest.mark.parametrize("kind", ["noise", "realistic"])
def test_default_config_matches_oracle(backend, dtype, kind, seed):
    batch = make_batch(kind, torch.float64, seed)
    assert_matches_oracle(batch, backend, dtype, loss_config=LossConfig(), kl_weight=0.01)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 16, 67), (3, 13, 81), (2, 31, 35)],
                         ids=["B1", "oddHW", "oddH-oddW"])
def test_odd_shapes_and_a_single_item_match_oracle(backend, shape, seed):
    b, h, w = shape
    batch = make_batch("realistic", torch.float64, seed, batch=b, height=h, width=w,
                       latent_dim=5)
    assert_matches_oracle(batch, backend, torch.float64, kl_weight=0.5)


STFT_CONFIGS = {
    "short-window": STFTLossConfig(fft_sizes=(64, 128), hop_sizes=(16, 32),
                                   win_lengths=(40, 101)),
    "hop-not-dividing": STFTLossConfig(fft_sizes=(100, 60), hop_sizes=(24, 7),
                                       win_lengths=(100, 60)),
    "non-power-of-two": STFTLossConfig(fft_sizes=(77, 300), hop_sizes=(20, 75),
                                       win_lengths=(77, 240)),
    "auraloss-defaults": STFTLossConfig(fft_sizes=(1024, 2048, 512), hop_sizes=(120, 240, 50),
                                        win_lengths=(600, 1200, 240)),
    "single-resolution": STFTLossConfig(fft_sizes=(256,), hop_sizes=(64,), win_lengths=(256,)),
}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@float64_and_float32
@pytest.mark.parametrize("name", list(STFT_CONFIGS))
def test_non_default_stft_settings_match_oracle(backend, dtype, name, seed):
    config = LossConfig(stft=STFT_CONFIGS[name])
    batch = make_batch("realistic", torch.float64, seed, height=16, width=71)
    assert_matches_oracle(batch, backend, dtype, loss_config=config, kl_weight=0.01)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@float64_and_float32
def test_gradient_for_target(backend, dtype, seed):
    batch = make_batch("realistic", torch.float64, seed)
    assert_matches_oracle(batch, backend, dtype, grad_target=True, kl_weight=0.01)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("kl_weight", [0.0, -1.0, 2.0])
def test_kl_weight_gates_the_kl_term(backend, kl_weight, seed):
    batch = make_batch("noise", torch.float64, seed)
    out, grads = assert_matches_oracle(batch, backend, torch.float64, kl_weight=kl_weight)
    if kl_weight <= 0:
        assert torch.equal(grads[2], torch.zeros_like(grads[2]))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_zero_free_bits_floor_and_non_default_weights_match_oracle(backend, seed):
    """Elements exactly at the free-bits floor (mu=0, logvar=0 gives k=0) get the clamp's
    gradient; non-default weights everywhere."""
    recon, target, mu, logvar = make_batch("realistic", torch.float64, seed)
    mu[:, :3] = 0.0
    logvar[:, :3] = 0.0
    config = LossConfig()
    config.kl.free_bits = 0.0
    config.reconstruction.weight, config.reconstruction.if_weight = 0.7, 1.3
    config.stft.weight = 2.5
    assert_matches_oracle((recon, target, mu, logvar), backend, torch.float64,
                          loss_config=config, kl_weight=0.3)


# Unit roundoff of the half-precision dtypes: rounding to nearest moves a value by at most u
# times itself.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def assert_half_gradients_are_float32_rounded_once(grads, ref32_grads, dtype):
    """Each gradient is the float32 computation's, rounded to ``dtype``: within one unit in the
    last place of it (2u: a float32 value differing from the oracle's in its last digits may
    round the other way; the Triton interpreter, unlike a GPU, truncates float32 to bf16), plus
    1e-5 of the gradient's largest element (float32's own differences, where terms cancel) and,
    in float16, its smallest subnormal step. Rounding each term's gradient apart and adding
    them in half precision fails this where the terms cancel."""
    u = UNIT_ROUNDOFF[dtype]
    tiny = 2.0**-24 if dtype == torch.float16 else 0.0
    names = ("recon", "target", "mu", "logvar")
    for name, g, ref in zip(names, grads, ref32_grads):
        assert g.dtype == dtype
        bound = 2 * u * ref.abs() + 1e-5 * ref.abs().max() + tiny
        excess = (g.float() - ref).abs() - bound
        assert (excess <= 0).all(), (f"d/d{name}: {int((excess > 0).sum())} element(s) off by "
                                     f"more than one {dtype} ulp, worst {excess.max():.3g}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("kind", ["noise", "realistic"])
def test_half_precision_inputs_computed_in_float32(backend, dtype, kind, seed):
    """Half-precision inputs are computed in float32 on the same (exactly upcast) values: every
    loss within float32's bound of the float64 oracle on those values (1e-5: the float32
    oracle itself misses it where the IF term cancels, by 4.5e-5 on one noise batch), and
    every gradient the float32 computation's, rounded to the input's dtype."""
    batch = make_batch(kind, torch.float64, seed)
    half = [t.to(dtype) for t in batch]
    out, grads = run_loss(half, backend, grad_target=True, kl_weight=0.5)
    ref64, _ = run_loss([t.double() for t in half], "reference", grad_target=True,
                        kl_weight=0.5)
    _, ref_grads = run_loss([t.float() for t in half], "reference", grad_target=True,
                            kl_weight=0.5)
    for key in out:
        assert out[key].dtype == torch.float32
        err = rel_err(out[key], ref64[key])
        assert err <= 1e-5, f"{key}: relative error {err:.3g} against the float64 oracle"
    assert_half_gradients_are_float32_rounded_once(grads, ref_grads, dtype)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_and_channels_last_inputs_give_the_contiguous_results(backend, seed):
    recon, target, mu, logvar = make_batch("realistic", torch.float32, seed, width=70)
    ref, ref_grads = run_loss((recon, target, mu, logvar), backend)

    cl = [t.contiguous(memory_format=torch.channels_last) for t in (recon, target)]
    wide = [strided_copy(t) for t in (recon, target)]
    for r, t in (cl, wide):
        assert not r.is_contiguous()
        r = r.detach().requires_grad_()
        out = compute(backend, r, t, mu, logvar)
        out["total_loss"].backward()
        for key in ref:
            torch.testing.assert_close(out[key].detach(), ref[key], rtol=1e-6, atol=0)
        torch.testing.assert_close(r.grad, ref_grads[0], rtol=1e-5, atol=1e-9)


def strided_copy(t):
    """The same values as ``t`` in a view with a stride of 2 along the last axis."""
    big = torch.full(t.shape[:-1] + (2 * t.shape[-1],), float("nan"), dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


def compute(backend, *tensors, **kwargs):
    from distill_fused import compute_combined_loss
    return compute_combined_loss(*tensors, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_outputs_are_the_six_keys_as_float32_scalars_on_the_inputs_device(backend, seed):
    batch = make_batch("noise", torch.float32, seed)
    out = compute(backend, *batch)
    assert list(out) == ["total_loss", "stft_loss", "mag_recon_loss", "if_recon_loss",
                         "kl_loss", "recon_loss"]
    assert all(v.shape == () and v.dtype == torch.float32 and v.device.type == "cpu"
               for v in out.values())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_inputs_are_left_unchanged(backend, seed):
    batch = make_batch("noise", torch.float32, seed)
    before = [t.clone() for t in batch]
    run_loss(batch, backend)
    assert all(torch.equal(a, b) for a, b in zip(batch, before))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "triton"])
@pytest.mark.parametrize("kind", ["noise", "realistic"])
def test_user_sized_float32_batch_matches_oracle(backend, kind, seed):
    """The spec's user case: float32 sums over ~1e6 spectrogram bins must stay within 1e-5."""
    batch = make_batch(kind, torch.float64, seed, batch=32, height=128, width=94,
                       latent_dim=128)
    assert_matches_oracle(batch, backend, torch.float32, kl_weight=0.01)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@float64_and_float32
@pytest.mark.parametrize("kind", ["noise", "realistic"])
def test_cuda_matches_oracle(backend, dtype, kind, seed):
    batch = make_batch(kind, torch.float64, seed, device="cuda")
    assert_matches_oracle(batch, backend, dtype, kl_weight=0.01)
    assert_matches_oracle(batch, backend, dtype, grad_target=True, kl_weight=0.01)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_user_case_float32_and_bf16_match_oracle(backend, seed):
    batch = make_batch("realistic", torch.float64, seed, batch=32, height=128, width=94,
                       latent_dim=128, device="cuda")
    assert_matches_oracle(batch, backend, torch.float32, kl_weight=0.01)
    half = [t.to(torch.bfloat16) for t in batch]
    out, grads = run_loss(half, backend, grad_target=True, kl_weight=0.5)
    ref_out, ref_grads = run_loss([t.float() for t in half], "reference", grad_target=True,
                                  kl_weight=0.5)
    for key in out:
        torch.testing.assert_close(out[key], ref_out[key], rtol=1e-5, atol=0)
    assert_half_gradients_are_float32_rounded_once(grads, ref_grads, torch.bfloat16)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@float64_and_float32
def test_perfect_reconstruction_has_finite_oracle_gradients(backend, dtype, seed):
    """recon == target: every L1 term sits at its tie and ||D|| = 0; gradients stay finite and
    equal the oracle's (torch.norm's backward gives 0 at 0)."""
    recon, target, mu, logvar = make_batch("realistic", torch.float64, seed)
    out, grads = assert_matches_oracle((target.clone(), target, mu, logvar), backend, dtype,
                                       grad_target=True, kl_weight=0.1)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("kl_weight", [0.0, 0.25])
def test_tensor_kl_weight_equals_float(backend, kl_weight, seed):
    """A 0-dim tensor kl_weight (no host read of it) gives what the python float gives."""
    batch = make_batch("realistic", torch.float64, seed)
    assert_same_results(
        run_loss(batch, backend, kl_weight=torch.tensor(kl_weight, dtype=torch.float64)),
        run_loss(batch, "reference", kl_weight=kl_weight), 1e-10, 1e-8)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradient_of_a_mix_of_every_output_matches_oracle(backend, seed):
    """Backward from a mix of the six outputs (not just total_loss) equals the oracle's."""
    batch = make_batch("realistic", torch.float64, seed)
    weights = {"total_loss": 0.5, "stft_loss": 1.5, "mag_recon_loss": -2.0,
               "if_recon_loss": 3.0, "kl_loss": 0.25, "recon_loss": -1.0}

    def grads(backend_name):
        leaves = leaf_copies(batch)
        out = compute(backend_name, *leaves, kl_weight=0.1)
        sum(w * out[k] for k, w in weights.items()).backward()
        return [leaf.grad for leaf in leaves]

    for g, g_ref in zip(grads(backend), grads("reference")):
        assert rel_err(g, g_ref) <= 1e-8


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradient_of_one_output_alone_matches_oracle(backend, seed):
    batch = make_batch("noise", torch.float64, seed)
    for key in ("stft_loss", "kl_loss", "if_recon_loss"):
        _, grads = run_loss(batch, backend, grad_target=True, key=key, kl_weight=0.1)
        _, ref_grads = run_loss(batch, "reference", grad_target=True, key=key, kl_weight=0.1)
        for g, g_ref in zip(grads, ref_grads):
            assert rel_err(g, g_ref) <= 1e-8, key
