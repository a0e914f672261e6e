"""Micro-benchmark per Triton kernel (GPU only): the bytes each one must move over its median
time, against the device's copy bandwidth measured in the same run. Goal (H100, ``long``
case): 80% or more of copy bandwidth."""

import pytest
import torch

import harness

DEVICE = harness.device()
pytestmark = pytest.mark.skipif(DEVICE.type != "cuda",
                                reason="kernel bandwidth needs a CUDA GPU (none present)")


def _copy_gbps():
    src = torch.randn(64 * 2**20, device=DEVICE)  # 256 MiB
    dst = torch.empty_like(src)
    ms = harness.time_cuda(lambda: dst.copy_(src), warmup=5, reps=30)
    return 2 * src.numel() * src.element_size() / ms / 1e6


@pytest.fixture(scope="module")
def copy_gbps():
    return _copy_gbps()


def _kernels(case):
    """(name, callable, bytes it must move) for every kernel of the triton backend."""
    from distill_fused.kernels.kl import free_bits_kl_backward_op, free_bits_kl_op
    from distill_fused.kernels.recon import recon_terms_backward_op, recon_terms_op
    from distill_fused.synthetic import realistic_batch

    recon, target, mu, logvar = realistic_batch(case.batch, case.height, case.width,
                                                case.latent_dim, device=DEVICE, seed=7)
    n = case.batch * case.height * case.width
    f32 = 4
    mag, if_loss, stats = recon_terms_op(recon, target)
    kl, g_mu, g_lv = free_bits_kl_op(mu, logvar, 0.1, True)
    one = torch.ones((), device=DEVICE)
    bd = mu.numel()
    stft = _stft_kernels(recon, target)
    return stft + [
        ("recon_forward", lambda: recon_terms_op(recon, target), 4 * n * f32),
        ("recon_backward", lambda: recon_terms_backward_op(recon, target, stats, one, one, False),
         6 * n * f32),
        ("kl_forward", lambda: free_bits_kl_op(mu, logvar, 0.1, True), 4 * bd * f32),
        ("kl_backward", lambda: free_bits_kl_backward_op(g_mu, g_lv, one, torch.float32,
                                                         torch.float32), 4 * bd * f32),
    ]


def _stft_kernels(recon, target):
    """The STFT path's kernels at the default settings, on the magnitude channels."""
    from distill_fused import LossConfig, create_stft_loss
    from distill_fused.kernels.mrstft import spectra_of, spectral_loss
    from distill_fused.kernels.stft_frames import frame_signals, stft_frames_adjoint_op
    from distill_fused.kernels.stft_plan import make_plan
    from distill_fused.kernels.stft_spectral import stft_spectral_grad_op

    settings = create_stft_loss(LossConfig(), DEVICE).settings
    b, _, h, w = recon.shape
    plan = make_plan(settings, b, h * w, DEVICE, torch.float32, "per_resolution")
    x, y = recon[:, 0], target[:, 0]
    layout = [(1, w, (t.stride(0), 0, t.stride(1), t.stride(2))) for t in (x, y)]
    frames, spec = frame_signals(x, y, *layout, plan)
    spec = spectra_of(frames, spec, plan)
    _, scalars = spectral_loss(spec, plan)
    scratch = spec.clone()
    f32, c64 = 4, 8
    signal = b * h * w * f32
    half_frames = plan.frames_numel // 2
    return [
        ("stft_frame", lambda: frame_signals(x, y, *layout, plan),
         plan.frames_numel * f32 + 2 * signal),
        ("stft_partials+epilogue", lambda: spectral_loss(spec, plan), plan.spec_numel * c64),
        # Reads X and Y, writes G over X (in place, on a scratch copy of the spectra).
        ("stft_spectral_grad", lambda: stft_spectral_grad_op(
            scratch, plan.meta, scalars, plan.params, b, plan.n_res, plan.grad_tiles,
            plan.grad_tile, True, False, list(plan.use_terms), plan.wide),
         plan.spec_numel * c64 + plan.spec_numel // 2 * c64),
        ("stft_frames_adjoint", lambda: stft_frames_adjoint_op(
            frames, plan.meta, plan.windows, plan.n_res, b, h * w, 0, 1, plan.max_cover,
            plan.adjoint_block, plan.wide),
         half_frames * f32 + signal),
    ]


@pytest.mark.parametrize("case_name", ["user", "long"])
def test_kernel_bandwidth(kernel_results, copy_gbps, case_name):
    for name, fn, nbytes in _kernels(harness.CASES[case_name]):
        ms = harness.time_cuda(fn, warmup=10, reps=100)
        gbps = nbytes / ms / 1e6
        kernel_results.append({"case": case_name, "kernel": name, "bytes": nbytes,
                               "median_ms": round(ms, 5), "gbps": round(gbps, 1),
                               "copy_gbps": round(copy_gbps, 1),
                               "fraction_of_copy": round(gbps / copy_gbps, 3)})
