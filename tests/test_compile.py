"""torch.compile(fullgraph=True) traces a training step through compute_combined_loss with no
graph break (the custom ops are registered with torch.library), and gives the eager numbers."""

import pytest
import torch

from conftest import FAST_BACKENDS, make_batch, rel_err, requires_cuda
from distill_fused import LossConfig, compute_combined_loss, create_stft_loss


def _compiled_vs_eager(backend, device, compile_backend, seed):
    config = LossConfig()
    stft_fn = create_stft_loss(config, device)
    batch = make_batch("realistic", torch.float32, seed, device=device)

    def step(recon, target, mu, logvar):
        out = compute_combined_loss(recon, target, mu, logvar, config, kl_weight=0.1,
                                    _stft_loss_fn=stft_fn, backend=backend)
        return out["total_loss"], out["stft_loss"]

    def run(fn):
        leaves = [t.clone().requires_grad_(i != 1) for i, t in enumerate(batch)]
        total, stft = fn(*leaves)
        total.backward()
        return total.detach(), stft.detach(), leaves[0].grad, leaves[2].grad

    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True, backend=compile_backend))
    eager = run(step)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fullgraph_trace_cpu(backend, seed):
    # aot_eager: Dynamo + AOTAutograd tracing (what fullgraph checks), no C++ codegen wait.
    _compiled_vs_eager(backend, "cpu", "aot_eager", seed)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_inductor_cuda(backend, seed):
    _compiled_vs_eager(backend, "cuda", "inductor", seed)
