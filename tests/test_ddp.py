"""DistributedDataParallel: 2 processes (gloo, CPU) train a small VAE for 3 steps with the loss
on every backend; the ranks end with identical parameters, equal to one process that averages
the two ranks' gradients (each rank's loss is its own batch's: the spectral-convergence ratio
is batch-level, so this is not the loss of the concatenated batch)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import FAST_BACKENDS, rel_err, tiny_config
from distill_fused import compute_combined_loss

CONFIG = tiny_config()
B, H, W, D = 2, 4, 20, 3
STEPS, WORLD = 3, 2


class SmallVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(2 * H * W, 2 * D, dtype=torch.float64)
        self.decoder = torch.nn.Linear(D, 2 * H * W, dtype=torch.float64)

    def forward(self, x, eps):
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decoder(z).view(-1, 2, H, W), mu, logvar


def _model(seed):
    torch.manual_seed(seed)
    return SmallVAE()


def _data(seed, rank, step):
    """Rank ``rank``'s batch and noise at ``step``: spectrogram-like targets (a non-negative
    magnitude channel, an IF channel in [-1, 1])."""
    g = torch.Generator().manual_seed(seed * 1000 + rank * 100 + step)
    target = torch.rand(B, 2, H, W, generator=g, dtype=torch.float64)
    target[:, 1] = 2 * target[:, 1] - 1
    return target, torch.randn(B, D, generator=g, dtype=torch.float64)


def _loss(model, target, eps, backend):
    recon, mu, logvar = model(target, eps)
    return compute_combined_loss(recon, target, mu, logvar, CONFIG, 0.01,
                                 backend=backend)["total_loss"]


def _worker(rank, backend, seed, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model(seed))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(STEPS):
            optimizer.zero_grad()
            _loss(model, *_data(seed, rank, step), backend).backward()
            optimizer.step()
        torch.save([p.detach() for p in model.module.parameters()],
                   os.path.join(folder, f"rank{rank}.pt"))
        # Teardown in order: the reducer (and any gloo work it holds) before its process
        # group, and neither rank tearing down while the other is still in a collective.
        # (Once in CI a rank died at exit, SIGABRT "terminate called without an active
        # exception": gloo work alive at teardown, as pytorch/pytorch#179291 describes.)
        del model, optimizer
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _single_process(backend, seed):
    model = _model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        grads = []
        for rank in range(WORLD):
            model.zero_grad()
            _loss(model, *_data(seed, rank, step), backend).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, *gs in zip(model.parameters(), *grads):
            p.grad = sum(gs) / WORLD
        optimizer.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_ddp_ranks_agree_with_averaged_gradients(backend, seed, tmp_path):
    mp.spawn(_worker, args=(backend, seed, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    expected = _single_process(backend, seed)
    initial = list(_model(seed).parameters())
    for p0, p1, want, start in zip(*ranks, expected, initial):
        assert torch.equal(p0, p1)
        assert rel_err(p0, want) <= 1e-12
        assert not torch.equal(p0, start.detach())  # the steps did move the parameters
