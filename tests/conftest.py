"""Shared helpers: fresh random seeds, the oracle, and the spec's tolerances."""

import os

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from distill_fused import LossConfig, STFTLossConfig, compute_combined_loss
from distill_fused.dispatch import available_backends
from distill_fused.synthetic import noise_batch, realistic_batch

# Hypothesis profiles (test_properties.py): ``ci``, the default, a fixed derandomized dozen of
# examples per test (the same every run); ``dev``, 200 fresh ones (--hypothesis-profile=dev).
_PROFILE = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
hypothesis_settings.register_profile("ci", max_examples=12, derandomize=True, **_PROFILE)
hypothesis_settings.register_profile("dev", max_examples=200, **_PROFILE)
hypothesis_settings.load_profile("ci")

LOSS_KEYS = ("total_loss", "stft_loss", "mag_recon_loss", "if_recon_loss", "kl_loss",
             "recon_loss")

# Fast backends checked against the oracle: on CPU, triton runs under TRITON_INTERPRET=1.
FAST_BACKENDS = [b for b in ("torch", "triton") if b in available_backends("cpu")]


def _faster_interpreter_here_and_in_every_process_the_tests_start():
    """``tests/site/sitecustomize.py`` (its docstring): applied to this process, and put on
    the ``PYTHONPATH`` of the processes the tests start (the CLI, the docs' examples, the
    host application), which Python then runs it in."""
    import importlib.util

    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")
    spec = importlib.util.spec_from_file_location("distill_tests_site",
                                                  os.path.join(site, "sitecustomize.py"))
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site,
                                                             os.environ.get("PYTHONPATH")]))


_faster_interpreter_here_and_in_every_process_the_tests_start()

# Parameters naming the backend a test runs (a test's own, or its fixture's).
BACKEND_PARAMETERS = ("backend", "host_runs")


def pytest_addoption(parser):
    parser.addoption("--only-backend", default=None,
                     help="of the tests run once per backend, run only this backend's (the "
                          "others run whole): `make test` runs the suite under Triton 3.6 so, "
                          "with triton, as the other backends do not touch Triton")


def pytest_collection_modifyitems(config, items):
    only = config.getoption("--only-backend")
    if not only:
        return
    keep, drop = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        backends = [params[name] for name in BACKEND_PARAMETERS if name in params]
        triton_free = item.get_closest_marker("triton_free") is not None
        (drop if triton_free or any(b != only for b in backends) else keep).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


# Shared marks. A test that needs an NVIDIA GPU is marked ``cuda`` (pyproject.toml) and skipped,
# saying so, where none is present: ``requires_cuda`` as a decorator, ``cuda_marks()`` for
# ``pytestmark`` or ``pytest.param(marks=...)``. One that needs the triton backend on CPU tensors
# is skipped, saying why, without TRITON_INTERPRET=1: ``requires_triton``.
def cuda_marks(what="CUDA variant"):
    """The ``cuda`` mark, and a skip where no CUDA GPU is present whose reason says ``what`` is
    skipped."""
    return [pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(),
                               reason=f"no CUDA GPU present: {what} skipped")]


def requires_cuda(test):
    """``test`` with ``cuda_marks()``: marked ``cuda``, skipped where no CUDA GPU is present."""
    for mark in cuda_marks():
        test = mark(test)
    return test


requires_triton = pytest.mark.skipif("triton" not in FAST_BACKENDS,
                                     reason="the triton backend is not available here "
                                            "(CPU tensors need TRITON_INTERPRET=1)")

# The dtypes the oracle's tolerances are set for, and the target's gradient off and on, with the
# ids the tests' names show.
float64_and_float32 = pytest.mark.parametrize("dtype", [torch.float64, torch.float32],
                                              ids=["f64", "f32"])
with_and_without_target_grad = pytest.mark.parametrize("grad_target", [False, True],
                                                       ids=["", "target-grad"])


# Guard bands. Every buffer a Triton kernel writes is allocated inside a larger one: NaN where
# the kernel should write (an element it skips shows up as NaN in the result), and SENTINEL in a
# band before and after it, checked untouched when the test ends (a store past either end
# fails the test, deterministically, where on a GPU it would pass silently). Test inputs get NaN
# bands instead (``guarded``): a load past an input's end turns the result into NaN. A band is
# as long as its buffer plus GUARD elements, so that an off-by-one index that is then scaled
# or offset (a channel stride, the target's half of a buffer) still lands in it.
GUARD = 64
SENTINEL = -31337.0


def _banded(shape, dtype, device, inside, band_value):
    """``(whole buffer, band length, the view inside)``: the view is contiguous, its storage
    offset a multiple of 64 elements (aligned as an allocation is)."""
    numel = 1
    for size in shape:
        numel *= size
    band = -(-(numel + GUARD) // GUARD) * GUARD
    whole = torch.full((numel + 2 * band,), band_value, dtype=dtype, device=device)
    inner = whole[band:band + numel].view(shape)
    inner.fill_(inside)
    return whole, band, inner


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (contiguous, no autograd history) inside NaN bands."""
    _, _, inner = _banded(tuple(t.shape), t.dtype, t.device, 0, float("nan"))
    return inner.copy_(t.detach())


class GuardedOutputs:
    """The kernels' ``empty``, replaced: each buffer inside SENTINEL bands, remembered."""

    def __init__(self):
        self.buffers = []

    def __call__(self, shape, dtype, device):
        whole, band, inner = _banded(tuple(shape), dtype, device, float("nan"), SENTINEL)
        if not isinstance(whole, FakeTensor) and whole.device.type != "meta":
            self.buffers.append((whole, band, tuple(shape)))
        return inner

    def check(self):
        for whole, band, shape in self.buffers:
            for side, part in (("before", whole[:band]), ("after", whole[-band:])):
                touched = (part != SENTINEL).nonzero().flatten()
                assert touched.numel() == 0, (
                    f"a kernel wrote {touched.numel()} element(s) {side} its output buffer of "
                    f"shape {shape} ({whole.dtype}); band offsets {touched[:8].tolist()}")


def kernel_modules_with(name):
    """The modules of ``distill_fused.kernels`` that bind ``name`` (``empty``, which allocates
    every buffer a kernel writes, or ``wrap_triton``, which launches every kernel), besides
    ``_common`` where both are defined: a fixture replaces each module's binding."""
    import importlib
    import pkgutil

    import distill_fused.kernels as package
    modules = [importlib.import_module(f"{package.__name__}.{info.name}")
               for info in pkgutil.iter_modules(package.__path__) if info.name != "_common"]
    return [m for m in modules if hasattr(m, name)]


@pytest.fixture(autouse=True)
def guarded_kernel_outputs(monkeypatch):
    """In every test, the kernels' outputs start as NaN inside guard bands that must stay
    untouched (see GUARD above)."""
    if "triton" not in FAST_BACKENDS:
        yield None
        return

    outputs = GuardedOutputs()
    for module in kernel_modules_with("empty"):
        monkeypatch.setattr(module, "empty", outputs)
    yield outputs
    outputs.check()


class Launches(list):
    def __init__(self):
        super().__init__()
        self.constexprs = []


@pytest.fixture
def triton_launches(monkeypatch):
    """Every Triton kernel launch of distill_fused.kernels, by name; ``launched.constexprs``:
    the keyword (constexpr and launch) arguments of each. Empty where Triton is not usable."""
    launched = Launches()
    if "triton" not in FAST_BACKENDS:
        return launched
    def counting(kernel):
        def at(grid):
            def launch(*args, **kwargs):
                launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
                launched.constexprs.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch
        return type("Counting", (), {"__getitem__": lambda self, grid: at(grid)})()

    for module in kernel_modules_with("wrap_triton"):
        monkeypatch.setattr(module, "wrap_triton", counting)
    return launched


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed so that a failure can be replayed: the environment
    variable ``DISTILL_TEST_SEED`` sets it instead."""
    forced = os.environ.get("DISTILL_TEST_SEED")
    value = int(forced) if forced else int.from_bytes(os.urandom(6), "little")
    print(f"seed for {request.node.name}: {value} (replay: DISTILL_TEST_SEED={value} "
          f"pytest '{request.node.nodeid}')")
    return value


def make_batch(kind, dtype, seed, batch=2, height=16, width=67, latent_dim=8, device="cpu"):
    """A synthetic batch (``distill_fused.synthetic``), each tensor inside NaN bands."""
    make = realistic_batch if kind == "realistic" else noise_batch
    return tuple(guarded(t) for t in make(batch, height, width, latent_dim, dtype=dtype,
                                          device=device, seed=seed))


# Two resolutions small enough for signals of a few dozen samples (a [B, 2, 4, 20] spectrogram
# flattens to 80): where the STFT term is not the point, or the interpreter would be slow.
TINY_RESOLUTIONS = dict(fft_sizes=(16, 32), hop_sizes=(4, 8), win_lengths=(16, 32))


def tiny_config():
    """The default LossConfig but for its STFT resolutions: TINY_RESOLUTIONS."""
    return LossConfig(stft=STFTLossConfig(**TINY_RESOLUTIONS))


def leaf_copies(batch, grad_target=True):
    """Copies of ``batch`` (recon, target, mu, logvar) as autograd leaves, each requiring grad
    (the target only with ``grad_target``)."""
    return [t.detach().clone().requires_grad_(i != 1 or grad_target)
            for i, t in enumerate(batch)]


def signal_pair(seed, batch, channels, length, dtype=torch.float64):
    """Two random signals ``[batch, channels, length]`` (an STFT module's input and target),
    drawn in float64, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, length, generator=g, dtype=torch.float64).to(dtype)
            for _ in range(2)]


def stft_value_and_grads(module, x, y, dtype=torch.float64):
    """An STFT loss ``module`` on ``x`` and ``y`` (as ``dtype`` leaves): the loss and both
    gradients."""
    x, y = (t.detach().to(dtype).requires_grad_() for t in (x, y))
    loss = module(x, y)
    loss.backward()
    return loss.detach(), x.grad, y.grad


class OpRecorder(TorchDispatchMode):
    """Every aten (and custom) op dispatched while it is active, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    @property
    def names(self):
        """The ops' names without their overloads (``_fft_c2r``, ``ge``, ...)."""
        return [op.__name__.split(".")[0] for op in self.ops]


# The ops that read a tensor's value back to the host: a host-device sync.
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
            torch.ops.aten.is_nonzero.default}


def run_loss(batch, backend, dtype=None, grad_target=False, key="total_loss", **kwargs):
    """Loss dict and the gradients of ``out[key]`` (recon, target, mu, logvar; zeros where none
    flowed)."""
    leaves = [guarded(t.to(dtype or t.dtype)) for t in batch]
    for i, leaf in enumerate(leaves):
        leaf.requires_grad_(i != 1 or grad_target)
    out = compute_combined_loss(*leaves, backend=backend, **kwargs)
    out[key].backward()
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    return {k: v.detach() for k, v in out.items()}, grads


def rel_err(a, b):
    """``||a - b|| / ||b||`` (``||a - b||`` where ``b`` is 0) over the finite elements of ``b``;
    ``inf`` unless ``a`` has the same NaN and infinities in the same places."""
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(b)
    if not (torch.equal(torch.isnan(a), torch.isnan(b)) and torch.isfinite(a[finite]).all()
            and torch.equal(a[torch.isinf(b)], b[torch.isinf(b)])):
        return float("inf")
    a, b = a[finite], b[finite]
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def assert_same_results(got, ref, loss_tol, grad_tol):
    """``got``/``ref``: ``(losses, grads)`` from ``run_loss``."""
    (out, grads), (ref_out, ref_grads) = got, ref
    for key in out:
        assert rel_err(out[key], ref_out[key]) <= loss_tol, key
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) <= grad_tol


def assert_matches_oracle(batch64, backend, dtype, grad_target=False, key="total_loss",
                          **kwargs):
    """Every loss, and the gradients of ``out[key]``, against the oracle with the spec's
    tolerances: float64 within 1e-10 (losses) and 1e-8 (gradients); float32 inputs against the
    float64 oracle (run on those same inputs, exactly upcast) within 1e-5 (losses) and
    max(1e-3, 2 x the float32 oracle's own error) on each gradient."""
    batch64 = [t.to(dtype).double() for t in batch64]
    ref_out, ref_grads = run_loss(batch64, "reference", torch.float64, grad_target, key,
                                  **kwargs)
    out, grads = run_loss(batch64, backend, dtype, grad_target, key, **kwargs)
    loss_tol, grad_tols = 1e-10, [1e-8] * 4
    if dtype != torch.float64:
        loss_tol = 1e-5
        _, ref32_grads = run_loss(batch64, "reference", dtype, grad_target, key, **kwargs)
        grad_tols = [max(1e-3, 2 * rel_err(g32, g)) for g32, g in zip(ref32_grads, ref_grads)]
    for loss in LOSS_KEYS:
        assert out[loss].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert out[loss].shape == ()
        err = rel_err(out[loss], ref_out[loss])
        assert err <= loss_tol, f"{loss}: relative error {err:.3g} > {loss_tol:g}"
    names = ("recon", "target", "mu", "logvar")
    for name, g, g_ref, tol in zip(names, grads, ref_grads, grad_tols):
        assert g.dtype == dtype
        err = rel_err(g, g_ref)
        assert err <= tol, f"d{key}/d{name}: relative error {err:.3g} > {tol:.3g}"
    return out, grads
