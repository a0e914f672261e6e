"""Under ``torch.no_grad()`` and ``torch.inference_mode()`` no backend does gradient work (the
application validates under ``no_grad``): no inverse FFT, no gradient kernel, no autograd
graph, and the same values as with gradients on."""

import pytest
import torch

from conftest import FAST_BACKENDS, LOSS_KEYS, OpRecorder, leaf_copies, make_batch
from distill_fused import LossConfig, compute_combined_loss, create_stft_loss

GRADIENT_KERNELS = {"_spectral_grad_kernel", "_frames_adjoint_kernel", "_kl_backward_kernel",
                    "_recon_backward_kernel", "_combined_backward_kernel"}


def _leaves(seed):
    return leaf_copies(make_batch("realistic", torch.float32, seed))


def _calls(backend):
    """The loss paths a validation step takes: the fused call, the modular one (tensor
    kl_weight), a callable STFT loss, and the STFT module alone."""
    config = LossConfig()
    stft = create_stft_loss(config)
    b = backend
    return {
        "fused": lambda r, t, m, v: compute_combined_loss(r, t, m, v, config, 0.1, stft,
                                                          backend=b),
        "modular": lambda r, t, m, v: compute_combined_loss(r, t, m, v, config,
                                                            torch.tensor(0.1), backend=b),
        "callable": lambda r, t, m, v: compute_combined_loss(
            r, t, m, v, config, 0.1, lambda x, y: stft(x, y) * 1.0, backend=b),
        "module": lambda r, t, m, v: {"stft_loss": create_stft_loss(config).to("cpu")(
            r[:, :1].reshape(r.shape[0], 1, -1), t[:, :1].reshape(r.shape[0], 1, -1))},
    }


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("path", ["fused", "modular", "callable", "module"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_no_grad_and_inference_mode_do_no_gradient_work(backend, path, context, seed,
                                                        triton_launches, monkeypatch):
    monkeypatch.setenv("DISTILL_LOSS_BACKEND", backend)
    call = _calls(backend)[path]
    leaves = _leaves(seed)
    with_grad = call(*leaves)

    del triton_launches[:], triton_launches.constexprs[:]
    with context(), OpRecorder() as rec:
        out = call(*leaves)
    assert rec.names, "the recorder saw nothing"
    assert "_fft_c2r" not in rec.names, "an inverse FFT ran: gradient work"
    if backend == "torch" and path != "module":
        assert "ge" not in rec.names, "the KL's active mask was made: gradient work"
    assert not GRADIENT_KERNELS & set(triton_launches), triton_launches
    assert not _gradient_flags(triton_launches), "a kernel was asked for a KL gradient"
    if backend == "triton":
        assert triton_launches, "no Triton kernel ran"
    for key, value in out.items():
        assert value.grad_fn is None and not value.requires_grad, key
        assert torch.equal(value, with_grad[key].detach()), key


def _gradient_flags(launches):
    """The launches whose constexprs ask for the KL gradient in the forward pass."""
    return [name for name, kwargs in zip(launches, launches.constexprs)
            if kwargs.get("WRITE_KL_GRAD") or kwargs.get("WRITE_GRAD")]


@pytest.mark.parametrize("path", ["fused", "modular"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_the_recorders_see_gradient_work_with_gradients_on(backend, path, seed, triton_launches):
    """With gradients on, the same recorders see the gradient work."""
    leaves = _leaves(seed)
    with OpRecorder() as rec:
        _calls(backend)[path](*leaves)
    assert "_fft_c2r" in rec.names
    if backend == "torch":
        assert "ge" in rec.names
    else:
        assert GRADIENT_KERNELS & set(triton_launches)
        assert _gradient_flags(triton_launches)


def test_no_grad_returns_every_loss_key(seed):
    with torch.no_grad():
        out = compute_combined_loss(*_leaves(seed), LossConfig(), 0.1)
    assert tuple(out) == LOSS_KEYS
