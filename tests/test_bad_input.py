"""Every bad input of the spec gets TypeError/ValueError naming the argument, before any work."""

import numpy as np
import pytest
import torch

from conftest import FAST_BACKENDS, requires_cuda
from distill_fused import compute_combined_loss

B, H, W, D = 2, 16, 67, 8


def good():
    return dict(recon=torch.randn(B, 2, H, W), target=torch.randn(B, 2, H, W),
                mu=torch.randn(B, D), logvar=torch.randn(B, D))


def with_(**changes):
    args = good()
    args.update(changes)
    return args


CASES = {
    "recon-3d": (with_(recon=torch.randn(B, 2, H * W)), ValueError, "recon.*4-D"),
    "target-5d": (with_(target=torch.randn(B, 2, H, W, 1)), ValueError, "target.*4-D"),
    "recon-3-channels": (with_(recon=torch.randn(B, 3, H, W)), ValueError, "recon.*2 channels"),
    "both-1-channel": (with_(recon=torch.randn(B, 1, H, W), target=torch.randn(B, 1, H, W)),
                       ValueError, "recon.*2 channels"),
    "shape-mismatch": (with_(target=torch.randn(B, 2, H, W + 1)), ValueError,
                       "recon and target.*same shape"),
    "mu-1d": (with_(mu=torch.randn(B * D)), ValueError, "mu.*2-D"),
    "logvar-3d": (with_(logvar=torch.randn(B, D, 1)), ValueError, "logvar.*2-D"),
    "mu-logvar-mismatch": (with_(logvar=torch.randn(B, D + 1)), ValueError, "mu and logvar"),
    "latent-dim-0": (with_(mu=torch.randn(B, 0), logvar=torch.randn(B, 0)), ValueError,
                     "mu must have at least one latent dim"),
    "latent-batch-mismatch": (with_(mu=torch.randn(B + 1, D), logvar=torch.randn(B + 1, D)),
                              ValueError, "mu must be .B, D. with B = 2"),
    "integer-recon": (with_(recon=torch.randint(0, 5, (B, 2, H, W))), TypeError,
                      "recon.*floating-point"),
    "complex-target": (with_(target=torch.randn(B, 2, H, W, dtype=torch.complex64)), TypeError,
                       "target.*floating-point"),
    "integer-logvar": (with_(logvar=torch.zeros(B, D, dtype=torch.int64)), TypeError,
                       "logvar.*floating-point"),
    "empty-batch": (with_(recon=torch.randn(0, 2, H, W), target=torch.randn(0, 2, H, W),
                          mu=torch.randn(0, D), logvar=torch.randn(0, D)), ValueError,
                    "batch size 0"),
    "too-short": (with_(recon=torch.randn(B, 2, 8, 128), target=torch.randn(B, 2, 8, 128)),
                  ValueError, "at least 1025"),
    "not-a-tensor": (with_(mu=[[0.0] * D] * B), TypeError, "mu must be a torch.Tensor"),
    "meta-device": (with_(mu=torch.randn(B, D, device="meta")), ValueError, "one device"),
}


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_rejected_before_any_work(backend, name, monkeypatch):
    args, error, pattern = CASES[name]
    snapshot = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}

    def no_work(*a, **k):
        raise AssertionError("backend reached with bad input")

    monkeypatch.setattr("distill_fused.api.losses.select_backend", no_work)
    with pytest.raises(error, match=pattern):
        compute_combined_loss(**args, kl_weight=0.1, backend=backend)
    for key, value in args.items():
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            assert torch.equal(value, snapshot[key])


def test_kl_weight_must_be_a_number():
    with pytest.raises(TypeError, match="kl_weight"):
        compute_combined_loss(**good(), kl_weight="0.1")


def test_nan_in_an_input_gives_a_nan_total_not_an_error():
    args = good()
    args["recon"][0, 0, 0, 0] = float("nan")
    out = compute_combined_loss(**args, kl_weight=0.1, backend="torch")
    assert torch.isnan(out["total_loss"])


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float64("nan")],
                         ids=["nan", "inf", "-inf", "numpy-nan"])
def test_non_finite_kl_weight_is_rejected_before_any_work(backend, value, monkeypatch):
    monkeypatch.setattr("distill_fused.api.losses.select_backend",
                        lambda *a, **k: pytest.fail("work was done"))
    with pytest.raises(ValueError, match="kl_weight must be finite"):
        compute_combined_loss(**good(), kl_weight=value, backend=backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_negative_kl_weight_turns_the_kl_term_off(backend, seed):
    """As in the seed: kl_weight <= 0 leaves the KL out of the total, even a non-finite KL."""
    g = torch.Generator().manual_seed(seed)
    args = {k: v.double() for k, v in good().items()}
    for t in args.values():
        t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    args["logvar"][0, 0] = 1e5  # the KL overflows
    for kl_weight in (-0.5, 0.0, torch.tensor(-0.5)):
        out = compute_combined_loss(**args, kl_weight=kl_weight, backend=backend)
        ref = compute_combined_loss(**args, kl_weight=kl_weight, backend="reference")
        assert torch.isinf(out["kl_loss"])
        assert torch.isfinite(out["total_loss"])
        assert float(out["total_loss"]) == pytest.approx(float(ref["total_loss"]), rel=1e-12)
        assert float(out["total_loss"]) != float(out["recon_loss"])  # no fallback happened


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_nan_kl_weight_tensor_is_taken_and_turns_the_kl_off(backend):
    """A tensor kl_weight is data (no host read to check it); NaN in it turns the KL off, as
    ``kl_weight > 0`` does in the reference."""
    out = compute_combined_loss(**good(), kl_weight=torch.tensor(float("nan")), backend=backend)
    assert torch.isfinite(out["total_loss"])


KL_WEIGHT_TENSORS = {
    "two-elements": lambda: torch.tensor([0.1, 0.2]),
    "empty": lambda: torch.tensor([]),
    "other-device": lambda: torch.tensor(0.1, device="meta"),
}


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("name", list(KL_WEIGHT_TENSORS))
def test_kl_weight_tensor_shape_and_device(backend, name, monkeypatch):
    monkeypatch.setattr("distill_fused.api.losses.select_backend",
                        lambda *a, **k: pytest.fail("work done"))
    with pytest.raises(ValueError, match=r"kl_weight must be a python float \(or a one-element "
                                         r"tensor on the inputs' device\)"):
        compute_combined_loss(**good(), kl_weight=KL_WEIGHT_TENSORS[name](), backend=backend)


@requires_cuda
def test_kl_weight_tensor_on_the_gpu_for_cpu_inputs_is_rejected():
    with pytest.raises(ValueError, match="kl_weight must be a python float"):
        compute_combined_loss(**good(), kl_weight=torch.tensor(0.1, device="cuda"))


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_kl_weight_tensor_that_requires_grad_gets_the_kl(backend):
    for value, expected in ((0.1, "kl_loss"), (-0.1, None)):
        kl_weight = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        args = {k: v.double().requires_grad_() for k, v in good().items()}
        out = compute_combined_loss(**args, kl_weight=kl_weight, backend=backend)
        out["total_loss"].backward()
        got = torch.zeros(()) if kl_weight.grad is None else kl_weight.grad.reshape(())
        want = out[expected].detach() if expected else torch.zeros(())
        assert torch.equal(got.double(), want.double())
