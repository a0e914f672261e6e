"""Every mix of input dtypes: each backend returns the reference's dtype for every output
(float64 if any input is float64, else float32), and each input's gradient in its own dtype."""

import itertools

import pytest
import torch

from conftest import FAST_BACKENDS, LOSS_KEYS
from distill_fused import LossConfig, STFTLossConfig, compute_combined_loss

SMALL = LossConfig(stft=STFTLossConfig(fft_sizes=(16,), hop_sizes=(4,), win_lengths=(16,)))
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIXES = list(itertools.product(DTYPES, repeat=4))  # recon, target, mu, logvar


def _run(backend, dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 2, 3, 12)] * 2 + [(2, 3)] * 2
    leaves = [torch.rand(s, generator=g, dtype=torch.float64).to(d).requires_grad_()
              for s, d in zip(shapes, dtypes)]
    out = compute_combined_loss(*leaves, SMALL, 0.1, backend=backend)
    out["total_loss"].backward()
    return out, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_output_dtypes_equal_the_reference_for_every_mix(backend, seed):
    interpreted = backend == "triton"  # CPU tensors: the Triton interpreter
    checked = 0
    for dtypes in MIXES:
        if interpreted and torch.bfloat16 in dtypes:
            continue  # the Triton interpreter has no bf16 (numpy lacks it): checked on a GPU
        ref, _ = _run("reference", dtypes, seed)
        out, grads = _run(backend, dtypes, seed)
        for key in LOSS_KEYS:
            assert out[key].dtype == ref[key].dtype, (dtypes, key, out[key].dtype)
        for grad, dtype in zip(grads, dtypes):
            assert grad.dtype == dtype, (dtypes, grad.dtype)
        checked += 1
    assert checked == (81 if interpreted else 256)
