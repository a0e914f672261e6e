"""``auto``'s triton backend is verified against the torch backend at the first eager call of
each plan, and a plan whose kernels raise or compute a wrong number runs on torch from then on,
with one warning (``distill_fused/verification.py``, docs/backends.md).

On the CPU, ``auto`` never picks triton; here CPU tensors follow CUDA's device policy
(``core.devices.emulated``), so that ``auto`` picks the triton backend, run by Triton's
interpreter, and every test goes through the public API. Faults are injected into the kernels
themselves: a launch that raises, an output off by 1e-3, a NaN in an output."""

import logging

import pytest
import torch

from conftest import (
    SYNC_OPS,
    OpRecorder,
    leaf_copies,
    make_batch,
    rel_err,
    requires_cuda,
    requires_triton,
    signal_pair,
    tiny_config,
)
from distill_fused import MultiResolutionSTFTLoss, compute_combined_loss, verification
from distill_fused.core import contract
from distill_fused.core.devices import emulated

pytestmark = requires_triton

# Where each fault is injected: a kernel of the default combined path's forward (its values),
# of its backward (its gradients), of the per-example path, and of the STFT module's path.
FORWARD = ("combined", "_combined_epilogue_kernel")
BACKWARD = ("combined", "_combined_backward_kernel")
PER_EXAMPLE = ("per_example", "_example_spectral_sums_kernel")
MODULE = ("stft_spectral", "_mrstft_epilogue_kernel")


class Faulty:
    """A kernel whose launch raises (``raise``), or whose every written element is then off by
    1e-3 (``offset``: 1e-3 of its magnitude, or 1e-3 where that is below 1), or whose first
    written element is then NaN (``nan``). What a launch
    wrote is told by comparing its tensor arguments before and after it."""

    def __init__(self, kernel, fault):
        self.kernel, self.fault, self.launches = kernel, fault, 0
        self.fn = getattr(kernel, "fn", kernel)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            if self.fault == "raise":
                raise RuntimeError("injected: the kernel failed to launch")
            tensors = [a for a in (*args, *kwargs.values())
                       if isinstance(a, torch.Tensor) and a.dtype.is_floating_point]
            before = [t.clone() for t in tensors]
            result = self.kernel[grid](*args, **kwargs)
            for t, old in zip(tensors, before):
                written = ~((t == old) | (t.isnan() & old.isnan()))
                if not written.any():
                    continue
                if self.fault == "offset":
                    t[written] += 1e-3 * (1 + t[written].abs())
                else:
                    t.view(-1)[written.view(-1).nonzero()[0]] = float("nan")
            return result
        return launch


@pytest.fixture
def inject(monkeypatch):
    """``inject((module, kernel), fault)``: that kernel of ``distill_fused.kernels`` faulty."""
    import importlib

    def apply(where, fault):
        module = importlib.import_module(f"distill_fused.kernels.{where[0]}")
        faulty = Faulty(getattr(module, where[1]), fault)
        monkeypatch.setattr(module, where[1], faulty)
        return faulty
    return apply


@pytest.fixture
def like_cuda():
    """CPU tensors under CUDA's device policy (``auto`` picks triton), with no decision kept
    from another test, before or after."""
    verification.forget()
    with emulated("cpu", like="cuda"):
        yield
    verification.forget()


@pytest.fixture
def read_backs(monkeypatch):
    """How many times verification read a verdict back to the host (its one sync)."""
    calls = []
    real = verification.read_back

    def counting(t):
        calls.append(t.shape)
        return real(t)
    monkeypatch.setattr(verification, "read_back", counting)
    return calls


def _step(batch, backend="auto", kl_weight=0.1, **kwargs):
    leaves = leaf_copies(batch, grad_target=False)
    out = compute_combined_loss(*leaves, tiny_config(), kl_weight=kl_weight, backend=backend,
                                **kwargs)
    total = out["total_loss"] if out["total_loss"].dim() == 0 else out["total_loss"].sum()
    total.backward()
    return {k: v.detach() for k, v in out.items()}, [leaf.grad for leaf in leaves
                                                     if leaf.grad is not None]


def _batch(seed, **kwargs):
    return make_batch("realistic", torch.float32, seed, height=4, width=20, **kwargs)


def _assert_equal(got, expected):
    (values, grads), (expected_values, expected_grads) = got, expected
    assert values.keys() == expected_values.keys()
    for key in values:
        assert torch.equal(values[key], expected_values[key]), key
    for g, e in zip(grads, expected_grads):
        assert torch.equal(g, e)


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING
            and r.name == "distill_fused"]


def test_a_new_plan_is_verified_once_then_triton_runs_unchecked(like_cuda, read_backs,
                                                                triton_launches, seed):
    batch = _batch(seed)
    first = _step(batch)
    assert len(read_backs) == 1, "the first call of a plan reads its verdict back once"
    [decision] = verification.decisions()
    assert decision.passed and decision.backend == "triton", decision.reason
    assert decision.errors and all(e <= t for e, t in decision.errors.values())
    assert "d total_loss/d recon" in decision.errors and "kl_loss" in decision.errors
    # The caller's result is the triton backend's own.
    _assert_equal(first, _step(batch, backend="triton"))

    triton_launches.clear()
    with OpRecorder() as recorder:
        second = _step(_batch(seed + 1), kl_weight=0.37)  # new values, same plan
    assert len(read_backs) == 1, "a verified plan is not checked again"
    assert not [op for op in recorder.ops if op in SYNC_OPS]
    assert "_combined_epilogue_kernel" in triton_launches
    assert len(verification.decisions()) == 1
    _assert_equal(second, _step(_batch(seed + 1), backend="triton", kl_weight=0.37))


@pytest.mark.parametrize("fault", ["raise", "offset", "nan"])
@pytest.mark.parametrize("where", [FORWARD, BACKWARD], ids=["forward", "backward"])
def test_a_faulty_kernel_is_replaced_by_the_torch_backend_with_one_warning(
        like_cuda, inject, read_backs, caplog, fault, where, seed):
    batch = _batch(seed)
    faulty = inject(where, fault)
    with caplog.at_level(logging.WARNING, logger="distill_fused"):
        first = _step(batch)
        _assert_equal(first, _step(batch, backend="torch"))
        [warning] = _warnings(caplog)
        text = warning.getMessage()
        assert "compute_combined_loss on cpu (with gradients): [2, 2, 4, 20] float32" in text
        assert ("raised RuntimeError: injected" in text if fault == "raise"
                else "differ from the torch backend's" in text and "relative error" in text)
        assert f"torch {torch.__version__}" in text and "triton " in text
        assert "distill_fused " in text and "exact, but slower" in text
        [decision] = verification.decisions()
        assert decision.backend == "torch"

        launched = faulty.launches
        with OpRecorder() as recorder:
            second = _step(_batch(seed + 1), kl_weight=0.2)
        assert faulty.launches == launched, "a replaced plan launches no triton kernel"
        assert len(_warnings(caplog)) == 1, "one warning per plan"
    assert len(read_backs) == (0 if fault == "raise" else 1)
    assert not [op for op in recorder.ops if op in SYNC_OPS]
    _assert_equal(second, _step(_batch(seed + 1), kl_weight=0.2, backend="torch"))


def _accurate_in_float32(seed):
    """The first batch from ``seed`` on, in order, on which float32 itself is accurate: the
    oracle's float32 gradients within half the contract's floor of its float64 ones, so that
    the bound on every gradient is the floor (1e-3), which an offset of 1e-3 passes. Elsewhere
    the bound widens with float32's own error: on a rare batch (seed 106722512967245) an STFT
    bin near auraloss's magnitude clamp puts the float32 oracle's d stft_loss/d recon 58% off
    its float64 one, and no float32 implementation can be held closer than that."""
    for candidate in range(seed, seed + 100):
        batch = _batch(candidate)
        grads = {}
        for dtype in (torch.float64, torch.float32):
            leaves = [t.to(dtype) for t in leaf_copies(batch, grad_target=False)]
            leaves = [t.detach().requires_grad_(i != 1) for i, t in enumerate(leaves)]
            out = compute_combined_loss(*leaves, tiny_config(), kl_weight=0.1,
                                        backend="reference")
            grads[dtype] = torch.autograd.grad(out["total_loss"], [leaves[0], *leaves[2:]])
        if all(rel_err(g32, g64) < contract.GRAD_FLOOR_FLOAT32 / 2
               for g32, g64 in zip(grads[torch.float32], grads[torch.float64])):
            return batch
    raise AssertionError(f"no batch from seed {seed} on is accurate in float32")


def test_an_off_by_1e3_gradient_is_reported_with_its_error(like_cuda, inject, seed):
    batch = _accurate_in_float32(seed)
    inject(BACKWARD, "offset")
    _step(batch)
    [decision] = verification.decisions()
    failed = {name for name, (e, t) in decision.errors.items() if e > t}
    assert {"d total_loss/d recon", "d total_loss/d mu", "d total_loss/d logvar"} <= failed
    # The forward's values are right, and said to be.
    assert decision.errors["total_loss"][0] <= 1e-5


@pytest.mark.parametrize("fault", ["raise", "offset"])
def test_the_per_example_path_and_the_stft_module_are_verified_too(like_cuda, inject, caplog,
                                                                   fault, seed):
    lengths = torch.tensor([20, 17])
    faulty = inject(PER_EXAMPLE, fault)
    with caplog.at_level(logging.WARNING, logger="distill_fused"):
        got = _step(_batch(seed), reduction="none", lengths=lengths)
    _assert_equal(got, _step(_batch(seed), backend="torch", reduction="none", lengths=lengths))
    assert faulty.launches > 0
    [warning] = _warnings(caplog)
    assert "per-example path" in warning.getMessage()
    assert "reduction=none, lengths" in warning.getMessage()

    inject(MODULE, fault)
    x, y = signal_pair(seed, 2, 1, 90, torch.float32)
    x.requires_grad_()
    module = MultiResolutionSTFTLoss(fft_sizes=[16, 32], hop_sizes=[4, 8], win_lengths=[16, 32])
    loss = module(x, y)
    loss.backward()
    expected = MultiResolutionSTFTLoss(fft_sizes=[16, 32], hop_sizes=[4, 8],
                                       win_lengths=[16, 32], backend="torch")(x.detach(), y)
    assert torch.equal(loss.detach(), expected)
    assert [d.backend for d in verification.decisions()] == ["torch", "torch"]
    assert "MultiResolutionSTFTLoss on cpu" in verification.decisions()[1].plan


def test_a_plan_is_its_shapes_dtype_grad_mode_and_options_not_its_values(like_cuda, read_backs,
                                                                         seed):
    _step(_batch(seed), kl_weight=0.1)
    _step(_batch(seed + 1), kl_weight=0.9)            # same plan: values only
    assert len(read_backs) == 1
    _step(_batch(seed, batch=3))                      # the last, smaller batch of an epoch
    _step(_batch(seed), kl_weight=0.0)                # the KL left out
    with torch.no_grad():                             # validation
        compute_combined_loss(*_batch(seed), tiny_config(), kl_weight=0.1)
    assert len(read_backs) == 4
    assert len(verification.decisions()) == 4
    assert all(d.passed for d in verification.decisions())
    assert "no grad" in verification.decisions()[-1].plan


def test_an_explicit_triton_backend_stays_strict(like_cuda, inject, read_backs, caplog, seed):
    batch = _batch(seed)
    inject(FORWARD, "offset")
    with caplog.at_level(logging.WARNING, logger="distill_fused"):
        wrong = _step(batch, backend="triton")   # not verified: its (wrong) numbers, no warning
    assert not read_backs and not _warnings(caplog)
    right = _step(batch, backend="torch")
    assert rel_err(wrong[0]["total_loss"], right[0]["total_loss"]) > 1e-4

    for _ in range(2):  # verify=True: a failed plan raises, every time, replaced by nothing
        with pytest.raises(RuntimeError, match="backend='triton' with verify=True: the triton "
                                               "backend's results differ"):
            _step(batch, backend="triton", verify=True)
    assert len(read_backs) == 1

    inject(FORWARD, "raise")
    with pytest.raises(RuntimeError, match="injected"):
        _step(batch, backend="triton")


def test_verify_false_trusts_triton_unchecked(like_cuda, inject, read_backs, monkeypatch,
                                              seed):
    inject(FORWARD, "offset")
    batch = _batch(seed)
    unchecked = _step(batch, verify=False)
    assert not read_backs
    assert rel_err(unchecked[0]["total_loss"], _step(batch, backend="torch")[0]["total_loss"]) \
        > 1e-4
    monkeypatch.setenv("DISTILL_VERIFY", "0")
    _step(batch)
    assert not read_backs
    monkeypatch.setenv("DISTILL_VERIFY", "1")
    _step(batch)
    assert len(read_backs) == 1
    monkeypatch.setenv("DISTILL_VERIFY", "yes")
    with pytest.raises(ValueError, match="DISTILL_VERIFY must be 1 or 0"):
        _step(batch)
    with pytest.raises(TypeError, match="verify must be True, False or None"):
        _step(batch, verify="yes")


def test_auto_on_plain_cpu_tensors_picks_torch_and_verifies_nothing(read_backs, seed):
    verification.forget()
    _step(_batch(seed))
    assert not read_backs and not verification.decisions()


def _compiled_step(graphs, kl_weight=0.1):
    """The loss compiled (aot_eager, fullgraph: a host sync would be a graph break, an error),
    each graph Dynamo traces added to ``graphs`` as the set of what its nodes (and those of
    its subgraphs: an autograd Function's forward and backward) call."""
    config = tiny_config()
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def recording(gm, example_inputs):
        graphs.append({str(node.target) for module in gm.modules()
                       if isinstance(module, torch.fx.GraphModule)
                       for node in module.graph.nodes})
        return aot_eager(gm, example_inputs)

    def step(recon, target, mu, logvar):
        out = compute_combined_loss(recon, target, mu, logvar, config, kl_weight=kl_weight)
        return out["total_loss"]
    return torch.compile(step, fullgraph=True, backend=recording)


def _run_compiled(compiled, batch):
    leaves = leaf_copies(batch, grad_target=False)
    loss = compiled(*leaves)
    loss.backward()
    return loss.detach(), [leaves[i].grad for i in (0, 2, 3)]


def _triton_ops(graph):
    """The kernels' ops (``torch.ops.distill_fused.*``) a graph calls."""
    return [name for name in graph if name.startswith("distill_fused.")]


def test_an_unverified_plan_traced_by_torch_compile_runs_on_torch(like_cuda, read_backs,
                                                                  caplog, seed):
    torch._dynamo.reset()
    batch, graphs = _batch(seed), []
    with caplog.at_level(logging.WARNING, logger="distill_fused"):
        loss, grads = _run_compiled(_compiled_step(graphs), batch)
        torch._dynamo.reset()
        _run_compiled(_compiled_step(graphs), batch)
    assert not read_backs, "nothing is verified while tracing"
    assert len(graphs) == 2 and not _triton_ops(graphs[0]), "no triton op traced"
    [warning] = _warnings(caplog)
    assert "its triton kernels were not verified for such a call yet" in warning.getMessage()
    assert "Call the loss once eagerly" in warning.getMessage()
    eager = _step(batch, backend="torch")
    assert rel_err(loss, eager[0]["total_loss"]) <= 1e-6
    for g, e in zip(grads, eager[1]):
        assert rel_err(g, e) <= 1e-5
    assert not verification.decisions(), "a traced call decides nothing"
    torch._dynamo.reset()


def test_a_plan_verified_eagerly_is_traced_on_triton_and_later_plans_recompile_nothing(
        like_cuda, read_backs, caplog, seed):
    torch._dynamo.reset()
    batch, graphs = _batch(seed), []
    _step(batch)  # the eager call that verifies the plan
    assert len(read_backs) == 1
    compiled = _compiled_step(graphs)
    with caplog.at_level(logging.WARNING, logger="distill_fused"):
        loss, _ = _run_compiled(compiled, batch)
    assert not _warnings(caplog)
    assert len(graphs) == 1 and _triton_ops(graphs[0])
    assert len(read_backs) == 1
    assert rel_err(loss, _step(batch, backend="triton")[0]["total_loss"]) <= 1e-6

    _step(_batch(seed, batch=3))  # a new plan decided after compiling
    _run_compiled(compiled, _batch(seed + 1))
    assert len(graphs) == 1, "the compiled step recompiled"
    torch._dynamo.reset()


def _compiled_with_kl_weight_argument(graphs, dynamic):
    config = tiny_config()
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def recording(gm, example_inputs):
        graphs.append({str(node.target) for module in gm.modules()
                       if isinstance(module, torch.fx.GraphModule)
                       for node in module.graph.nodes})
        return aot_eager(gm, example_inputs)

    def step(recon, target, mu, logvar, kl_weight):
        return compute_combined_loss(recon, target, mu, logvar, config,
                                     kl_weight=kl_weight)["total_loss"]
    return torch.compile(step, fullgraph=True, backend=recording, dynamic=dynamic)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_a_traced_step_with_symbolic_shapes_and_kl_weight_follows_the_eager_decisions(
        like_cuda, read_backs, caplog, dynamic, seed):
    """A compiled step whose kl_weight is an argument (a symbolic float) and whose shapes
    may be symbolic: the eager decisions for such calls (any shapes) are followed, for a
    batch size no eager call had too."""
    torch._dynamo.reset()
    _step(_batch(seed))
    graphs = []
    compiled = _compiled_with_kl_weight_argument(graphs, dynamic)
    with caplog.at_level(logging.WARNING, logger="distill_fused"):
        for batch_size, kl_weight in ((2, 0.3), (3, 0.7)):
            leaves = leaf_copies(_batch(seed, batch=batch_size), grad_target=False)
            loss = compiled(*leaves, kl_weight)
            loss.backward()
            expected = _step(_batch(seed, batch=batch_size), kl_weight=kl_weight,
                             backend="torch")
            assert rel_err(loss.detach(), expected[0]["total_loss"]) <= 1e-5
    assert not _warnings(caplog)
    assert graphs and all(_triton_ops(g) for g in graphs)
    assert len(read_backs) == 1, "nothing is checked while tracing"
    torch._dynamo.reset()


def test_a_traced_step_runs_on_torch_where_such_a_call_failed_its_check(like_cuda, inject,
                                                                         seed):
    torch._dynamo.reset()
    inject(FORWARD, "offset")
    _step(_batch(seed))
    graphs = []
    loss, _ = _run_compiled(_compiled_step(graphs), _batch(seed))
    assert graphs and not _triton_ops(graphs[0])
    torch._dynamo.reset()


def test_a_float64_kl_weight_tensor_keeps_float32_bounds(like_cuda, seed):
    _step(_batch(seed), kl_weight=torch.tensor(0.3, dtype=torch.float64))
    [decision] = verification.decisions()
    assert decision.passed, decision.reason
    assert decision.errors["d total_loss/d recon"][1] >= 1e-3


def test_a_callable_stft_term_is_not_called_by_the_check(like_cuda, seed):
    """The user's own STFT term (float32 only, counting its calls) is replaced by a stand-in
    while the plan's kernels (reconstruction, KL) are checked: called once a call, never in
    float64."""
    calls = []

    def float32_only(x, y):
        calls.append(x.dtype)
        if x.dtype != torch.float32:
            raise TypeError("float32 only")
        return (x - y).abs().mean()

    for _ in range(2):
        _step(_batch(seed), _stft_loss_fn=float32_only)
    assert calls == [torch.float32, torch.float32]
    [decision] = verification.decisions()
    assert decision.passed, decision.reason
    assert "STFT term function (a callable, as given)" in decision.plan


def test_an_output_that_loses_its_gradient_fails_the_check(caplog):
    """Every output and gradient the torch backend has is compared: one the triton backend
    lacks (a detached output) is an infinite error."""
    verification.forget()
    x = torch.randn(2, 1, 64, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 1, 64, dtype=torch.float64)

    def torch_fn(a, b):
        return (a - b).square().mean()

    checked = verification.verified("mrstft_loss", lambda a, b: torch_fn(a, b).detach(),
                                    torch_fn)
    with caplog.at_level(logging.WARNING, logger="distill_fused"):
        out = checked(x, y)
    assert out.requires_grad
    [decision] = verification.decisions()
    assert decision.backend == "torch"
    assert decision.errors["d loss/d input"][0] == float("inf")
    verification.forget()


@requires_cuda
def test_on_cuda_a_cpu_kl_weight_tensor_that_requires_grad_is_checked(seed):
    verification.forget()
    batch = make_batch("realistic", torch.float32, seed, device="cuda")
    leaves = leaf_copies(batch, grad_target=False)
    kl_weight = torch.tensor(0.2, requires_grad=True)
    out = compute_combined_loss(*leaves, tiny_config(), kl_weight=kl_weight)
    out["total_loss"].backward()
    [decision] = verification.decisions()
    assert decision.passed, decision.reason
    verification.forget()


@requires_cuda
def test_on_cuda_auto_verifies_then_captures_a_cuda_graph_without_a_sync(seed):
    """On a GPU: the first eager call verifies (the warm-up of the usual capture recipe),
    the captured step replays equal to eager, and the warm plan is triton's."""
    verification.forget()
    batch = make_batch("realistic", torch.float32, seed, batch=8, height=32, width=67,
                       device="cuda")
    leaves = leaf_copies(batch, grad_target=False)
    config = tiny_config()

    def step():
        for leaf in leaves:
            leaf.grad = None
        out = compute_combined_loss(*leaves, config, kl_weight=0.01)
        out["total_loss"].backward()
        return out["total_loss"].detach(), leaves[0].grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager = [t.clone() for t in step()]
    torch.cuda.current_stream().wait_stream(side)
    [decision] = verification.decisions()
    assert decision.passed, decision.reason
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            captured = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert rel_err(a, b) <= 1e-6
