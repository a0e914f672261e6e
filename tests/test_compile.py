"""torch.compile(fullgraph=True) traces a training step through compute_combined_loss with no
graph break (the custom ops are registered with torch.library), and gives the eager numbers."""

import logging

import pytest
import torch

from conftest import FAST_BACKENDS, leaf_copies, make_batch, rel_err, requires_cuda, tiny_config
from distill_fused import LossConfig, STFTLossConfig, compute_combined_loss, create_stft_loss


def _compiled_vs_eager(backend, device, compile_backend, seed):
    config = LossConfig()
    stft_fn = create_stft_loss(config, device)
    batch = make_batch("realistic", torch.float32, seed, device=device)

    def step(recon, target, mu, logvar):
        out = compute_combined_loss(recon, target, mu, logvar, config, kl_weight=0.1,
                                    _stft_loss_fn=stft_fn, backend=backend)
        return out["total_loss"], out["stft_loss"]

    _assert_compiled_equals_eager(step, batch, compile_backend)


def _assert_compiled_equals_eager(step, batch, compile_backend, *args, grad_target=False,
                                  dynamic=None):
    """``step(*leaves, *args) -> (loss, another output)``, compiled with ``fullgraph=True``
    (and ``dynamic``), gives the eager outputs and gradients (of the loss's sum)."""
    def run(fn):
        leaves = leaf_copies(batch, grad_target)
        loss, other = fn(*leaves, *args)
        loss.sum().backward()
        return [loss.detach(), other.detach()] + [leaf.grad for leaf in leaves
                                                  if leaf.grad is not None]

    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True, backend=compile_backend,
                                  dynamic=dynamic))
    eager = run(step)
    assert len(compiled) == len(eager)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fullgraph_aot_eager_trace_on_cpu_equals_eager(backend, seed):
    # aot_eager: Dynamo + AOTAutograd tracing (what fullgraph checks), no C++ codegen wait.
    _compiled_vs_eager(backend, "cpu", "aot_eager", seed)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_inductor_on_cuda_equals_eager(backend, seed):
    _compiled_vs_eager(backend, "cuda", "inductor", seed)


def _per_example_compiled_vs_eager(backend, device, compile_backend, seed):
    config = tiny_config()
    batch = make_batch("realistic", torch.float32, seed, batch=3, height=8, width=31,
                       device=device)
    lengths = torch.tensor([31, 20, 9], device=device)

    def step(recon, target, mu, logvar, lengths):
        out = compute_combined_loss(recon, target, mu, logvar, config, kl_weight=0.1,
                                    backend=backend, reduction="none", lengths=lengths,
                                    per_resolution_terms=True)
        return out["total_loss"], out["stft_sc_loss_1"]

    _assert_compiled_equals_eager(step, batch, compile_backend, lengths, grad_target=True)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_per_example_path_traces_fullgraph_and_equals_eager(backend, seed):
    """reduction="none" with lengths: the lengths' check becomes a device-side assertion in
    the graph (no graph break), the Triton sums trace as ops."""
    _per_example_compiled_vs_eager(backend, "cpu", "aot_eager", seed)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_example_path_under_inductor_on_cuda_equals_eager(backend, seed):
    _per_example_compiled_vs_eager(backend, "cuda", "inductor", seed)


class _CountingBackend:
    """A torch.compile backend that counts the graphs it is given, then runs ``inner``."""

    def __init__(self, inner):
        self.inner, self.compilations = inner, 0

    def __call__(self, graph, example_inputs):
        self.compilations += 1
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(self.inner)(graph, example_inputs)


class _TinyVAE(torch.nn.Module):
    """Encoder to (mu, logvar), decoder fed by z = mu + sigma * eps, to a [B, 2, H, W] output."""

    def __init__(self, height, width, latent_dim, generator):
        super().__init__()
        self.shape = (2, height, width)
        self.encoder = torch.nn.Linear(2 * height * width, 2 * latent_dim, dtype=torch.float64)
        self.decoder = torch.nn.Linear(latent_dim, 2 * height * width, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))

    def forward(self, x, eps):
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decoder(z).view(-1, *self.shape), mu, logvar


@pytest.mark.parametrize("stft", ["config", "module"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_kl_schedule_compiles_at_most_twice(backend, stft, seed):
    """8 training steps (model forward and loss compiled with fullgraph=True, backward and the
    optimizer outside) with kl_weight a Python float from a warm-up schedule: at most 2
    compilations, and the eager run's parameters at the end. The STFT loss from the config, or
    from ``create_stft_loss`` (as the application passes it). Compiled with ``aot_eager``:
    Dynamo's guards, which decide the recompilations, and AOTAutograd's trace of the backward
    (the ``eager`` backend would check the first alone)."""
    from distill_fused import get_kl_weight

    config = tiny_config()
    g = torch.Generator().manual_seed(seed)
    target = make_batch("realistic", torch.float64, seed, batch=2, height=4, width=20)[1]
    eps = [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(8)]
    initial = _TinyVAE(4, 20, 3, g).state_dict()
    stft_fn = create_stft_loss(config, "cpu") if stft == "module" else None

    def train(compiled):
        model = _TinyVAE(4, 20, 3, torch.Generator())
        model.load_state_dict(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)

        def step(x, noise, kl_weight):
            recon, mu, logvar = model(x, noise)
            return compute_combined_loss(recon, x, mu, logvar, config, kl_weight,
                                         _stft_loss_fn=stft_fn, backend=backend)["total_loss"]

        counter = _CountingBackend("aot_eager")
        run = torch.compile(step, fullgraph=True, backend=counter) if compiled else step
        for epoch in range(8):
            optimizer.zero_grad()
            run(target, eps[epoch], get_kl_weight(epoch, 8, 1.0, 0.01)).backward()
            optimizer.step()
        return counter.compilations, [p.detach() for p in model.parameters()]

    torch._dynamo.reset()
    compilations, compiled_params = train(compiled=True)
    _, eager_params = train(compiled=False)
    assert 1 <= compilations <= 2
    for a, b in zip(compiled_params, eager_params):
        assert rel_err(a, b) <= 1e-12


def test_a_config_first_read_inside_a_dynamic_compiled_step_traces(seed):
    """A config the loss has not met before, first read (and checked) inside a
    ``torch.compile(fullgraph=True, dynamic=True)`` trace, where its floats are symbolic: no
    graph break, the eager numbers. The weight is drawn from the seed, so that no earlier call
    has resolved this config. (Dynamo alone: what failed was its trace of the checks.)"""
    weight = 0.5 + torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
    config = LossConfig(stft=STFTLossConfig(weight=weight, fft_sizes=(16, 32),
                                            hop_sizes=(4, 8), win_lengths=(16, 32)))
    batch = make_batch("realistic", torch.float64, seed, batch=2, height=4, width=20)

    def step(recon, target, mu, logvar):
        out = compute_combined_loss(recon, target, mu, logvar, config, 0.1, backend="torch")
        return out["total_loss"], out["stft_loss"]

    _assert_compiled_equals_eager(step, batch, "eager", dynamic=True)


def test_first_call_inside_a_compiled_step_needs_no_import(tmp_path):
    """A fresh process whose first loss call is inside a compiled step: the backend it selects
    was imported with the package (Dynamo cannot trace an import)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, torch
        import distill_fused
        from distill_fused.dispatch import available_backends
        names = available_backends("cpu")
        assert ("triton" in names) == ("triton" in sys.modules), (names, "triton" in sys.modules)
        g = torch.Generator().manual_seed(0)
        recon, target = (torch.randn(2, 2, 4, 20, generator=g) for _ in range(2))
        mu, logvar = (torch.randn(2, 3, generator=g) for _ in range(2))
        config = distill_fused.LossConfig(stft=distill_fused.STFTLossConfig(
            fft_sizes=(16,), hop_sizes=(4,), win_lengths=(16,)))
        for backend in names[1:]:
            step = torch.compile(lambda *t: distill_fused.compute_combined_loss(
                *t, config, 0.1, backend=backend)["total_loss"], fullgraph=True,
                backend="aot_eager")
            print(backend, float(step(recon, target, mu, logvar)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == len(FAST_BACKENDS)


def test_auto_with_its_debug_log_on_traces_without_a_break(monkeypatch, caplog, seed):
    # auto says why it chose its backend (a logger call, which Dynamo cannot trace): never
    # while tracing, and once, in eager code, after. The first call that asks auto is inside
    # the compiled step here (create_stft_loss(config) with no device asks no backend).
    from distill_fused import dispatch
    config = LossConfig()
    stft_fn = create_stft_loss(config)
    batch = make_batch("realistic", torch.float32, seed, device="cpu")
    monkeypatch.setattr(dispatch, "_auto_reasons_logged", set())
    caplog.set_level(logging.DEBUG, logger="distill_fused")

    def step(recon, target, mu, logvar):
        return compute_combined_loss(recon, target, mu, logvar, config, kl_weight=0.1,
                                     _stft_loss_fn=stft_fn, backend="auto")["total_loss"]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*batch)
    assert not [r for r in caplog.records if "loss backend auto" in r.getMessage()]
    for _ in range(2):
        assert rel_err(step(*batch), compiled) <= 1e-6
    said = [r.getMessage() for r in caplog.records if "loss backend auto" in r.getMessage()]
    assert said == ["loss backend auto -> torch: cpu tensors: the triton backend runs CUDA "
                    "tensors (auto never picks Triton's interpreter; name backend='triton' "
                    "under TRITON_INTERPRET=1 for that)"]


@pytest.mark.triton_free
def test_the_reference_compiles_as_the_benchmark_compiles_it(seed):
    """The benchmark's ``reference+torch.compile`` provider: the seed's computation under
    ``torch.compile``, its auraloss module built inside the traced call (a fresh settings
    object), equal to eager."""
    from distill_fused.backends import reference

    config = tiny_config()
    batch = make_batch("realistic", torch.float32, seed, height=6, width=37)

    def step(settings):
        return lambda r, t, m, v: reference.combined_loss(r, t, m, v, config, 0.1,
                                                          settings)[0]["total_loss"]

    eager = step(create_stft_loss(config).settings)(*batch)
    compiled = torch.compile(step(create_stft_loss(config).settings), backend="aot_eager")
    assert rel_err(compiled(*batch), eager) <= 1e-6
