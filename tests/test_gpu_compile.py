"""Every Triton kernel specialization a training step launches compiles for NVIDIA GPUs
(sm_90: H100/H200, sm_80: A100) without spills, within its register budget and the SM's shared
memory; the ops register and trace in GPU mode as on a GPU. Checked on this CPU machine by
``tests/gpu_compile.py`` (run once per session, in GPU mode, in a subprocess: see its
docstring), and the committed tables ``bench/results/aot-sm*.md`` are what it writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed")

import compiled_kernels  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative import)
import gpu_compile  # noqa: E402
from conftest import FAST_BACKENDS, make_batch  # noqa: E402

pytestmark = pytest.mark.kernels

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "bench" / "results"

# Register budgets. A kernel launched with a grid keeps at least MIN_RESIDENT_WARPS warps
# resident per SM (16 of 64, 25% occupancy: at most 128 registers a thread, whatever its warps):
# 4 programs of 4 warps, 2 of 8 or 1 of 16. Each program streams a tile of 1024 elements (512
# for the adjoint), all loads of a tile issued together; 16 resident warps keep about
# 132 x 4 x 1024 x 8 bytes ~ 4 MB in flight on an H100 (the lightest kernel reads two 4-byte
# values per element), above the ~2 MB its HBM3 needs to stay busy (3.35 TB/s x ~600 ns), and
# let an SM overlap one program's loads with the others' work. A kernel launched as one program
# runs on one SM whatever its register count: ptxas caps it at 255 per thread, so its budget is
# no spills (test_no_register_spills).
MIN_RESIDENT_WARPS = 16
ONE_PROGRAM, GRID = "one program", "grid"
KERNEL_BUDGETS = {
    "_frame_kernel": GRID,                 # framing gather: 1 sample + 1 window value read
    "_spectral_partials_kernel": GRID,     # 2 complex bins read per element
    "_spectral_grad_kernel": GRID,         # 2 complex bins read, 1-2 written
    "_frames_adjoint_kernel": GRID,        # R x max_cover frame samples gathered (x 3 at edges)
    "_recon_partials_kernel": GRID,        # 4 channels read
    "_recon_backward_kernel": GRID,        # 4 channels read, 2-4 written
    "_combined_backward_kernel": GRID,     # 4 channels + the STFT gradient read, 2-4 written
    "_kl_backward_kernel": GRID,           # 2 gradients read and written
    "_example_spectral_sums_kernel": GRID,  # 2 complex bins read per element
    "_example_spectral_grad_kernel": GRID,  # 2 complex bins read, 2 written
    "_example_recon_sums_kernel": GRID,     # 4 channels read
    "_example_recon_grad_kernel": GRID,     # 4 channels read, 2-4 written
    "_magnitudes_kernel": GRID,             # 1 complex bin read, 1 magnitude written
    "_example_feature_sums_kernel": GRID,   # 2 magnitudes read per element
    "_example_feature_grad_kernel": GRID,   # 2 magnitudes read, 2 written
    "_example_magnitude_grad_kernel": GRID,  # 2 complex bins + 2 gradients read, 2 written
    "_combined_epilogue_kernel": ONE_PROGRAM,
    "_mrstft_epilogue_kernel": ONE_PROGRAM,
    "_recon_finalize_kernel": ONE_PROGRAM,
    "_kl_forward_kernel": ONE_PROGRAM,
}


def _tables_version() -> bool:
    """Whether this environment's Triton and torch wrote the committed tables."""
    versions = f"with triton {triton.__version__} and torch {torch.__version__},"
    return versions in Path(compiled_kernels.table_path(str(TABLES), "sm_90")).read_text()


@pytest.fixture(scope="session")
def report(tmp_path_factory):
    """The report of ``tests/gpu_compile.py``, run in GPU mode (TRITON_INTERPRET unset): for
    sm_90 and sm_80 with the Triton that wrote the committed tables (the GPU image's), for
    sm_90 alone with another (half the compile time)."""
    out = tmp_path_factory.mktemp("gpu-compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    archs = ",".join(str(a) for a in (compiled_kernels.ARCHS if _tables_version() else (90,)))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_compile.py")),
                           "--json", str(out), "--archs", archs], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    if not out.exists():
        pytest.fail(f"gpu_compile.py failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    print(done.stdout)
    return json.loads(out.read_text())


def _compiled(report):
    return [row for row in report["specializations"] if not row["error"]]


def _name(row):
    return f"{row['arch']} {row['kernel']} [{row['specialization']}]"


def test_every_case_launches_kernels(report):
    assert set(report["cases"]) == {case.name for case in gpu_compile.CASES}
    empty = [name for name, launched in report["cases"].items() if not launched]
    assert not empty, f"cases that launched no Triton kernel: {empty}"


def test_every_specialization_compiles(report):
    failed = [f"{_name(row)}:\n{row['error']}" for row in report["specializations"]
              if row["error"]]
    assert not failed, "\n\n".join(failed)
    assert len(_compiled(report)) >= 2 * len(KERNEL_BUDGETS)


def test_every_kernel_is_compiled_for_every_arch(report):
    """A kernel added to distill_fused.kernels is covered without listing it here: it must be
    launched by some case (add one to gpu_compile.CASES if not) and have a budget."""
    defined = set(report["kernels_defined"])
    assert defined == set(KERNEL_BUDGETS), (
        f"kernels without a budget: {defined - set(KERNEL_BUDGETS)}; "
        f"budgets of kernels that no longer exist: {set(KERNEL_BUDGETS) - defined}")
    for arch in report["archs"]:
        compiled = {row["kernel"] for row in _compiled(report) if row["arch"] == arch}
        assert defined <= compiled, f"never launched, so not compiled for {arch}: " \
                                    f"{defined - compiled}"


def test_no_register_spills(report):
    spilled = [f"{_name(row)}: {row['spill_store_bytes']} B stored, "
               f"{row['spill_load_bytes']} B loaded" for row in _compiled(report)
               if row["spill_store_bytes"] or row["spill_load_bytes"]]
    assert not spilled, "\n".join(spilled)


def test_ptxas_account_is_the_binarys(report):
    """The registers ptxas reported are those of the cubin (so its spill account is too)."""
    for row in _compiled(report):
        assert row["ptxas_registers"] == row["registers"], _name(row)


def test_sass_count_is_cuobjdumps(report):
    """The SASS instructions read from the binary's section sizes are those ``cuobjdump -sass``
    lists (checked on one specialization per architecture: the listing takes 0.7 s each)."""
    for arch in report["archs"]:
        listed = [row for row in _compiled(report) if row["arch"] == arch and "sass_listed" in row]
        assert len(listed) == 1, arch
        assert listed[0]["sass_instructions"] == listed[0]["sass_listed"] > 0, _name(listed[0])


def test_registers_within_budget(report):
    over = []
    for row in _compiled(report):
        budget = KERNEL_BUDGETS[row["kernel"]]
        if budget == ONE_PROGRAM:
            assert row["max_grid"] == [1, 1, 1], f"{_name(row)} is budgeted as one program " \
                                                 f"but launched with grid {row['max_grid']}"
        elif row["resident_blocks"] * row["num_warps"] < MIN_RESIDENT_WARPS:
            over.append(f"{_name(row)}: {row['registers']} registers at {row['num_warps']} "
                        f"warps leave {row['resident_blocks']} programs resident per SM")
    assert not over, "\n".join(over)


def test_no_64_bit_division_below_the_index_limit(report):
    """64-bit integer division (a subroutine call) is left only in the specializations of 64-bit
    index math (``WIDE=1``, ``INDEX=int64``: a tensor past 2^30 elements): elsewhere indices
    are 32-bit and divisions a multiply and a shift."""
    wide = ("WIDE=1", "INDEX=int64")
    dividing = [f"{_name(row)}: {row['div64']}" for row in _compiled(report)
                if row["div64"] and not any(flag in row["specialization"] for flag in wide)]
    assert not dividing, "\n".join(dividing)
    assert any(row["div64"] for row in _compiled(report)), "the wide cases compiled no division"


def test_shared_memory_fits_the_sm(report):
    for row in _compiled(report):
        limit = report["archs"][row["arch"]]["smem_per_block"]
        assert row["shared_bytes"] <= limit, f"{_name(row)}: {row['shared_bytes']} B"
        assert row["resident_blocks"] >= 1, _name(row)


def test_grids_within_cuda_limits(report):
    for row in _compiled(report):
        for size, limit in zip(row["max_grid"], compiled_kernels.GRID_LIMITS):
            assert 1 <= size <= limit, f"{_name(row)}: grid {row['max_grid']}"


@pytest.mark.parametrize("arch", [a["name"] for a in compiled_kernels.ARCHS.values()])
def test_committed_table_is_current(report, arch):
    """``bench/results/aot-sm*.md`` is what this check writes (``make aot`` rewrites them), for
    the Triton and torch versions the table names; under others the numbers may differ, and
    the table is not compared."""
    path = Path(compiled_kernels.table_path(str(TABLES), arch))
    assert path.exists(), f"{path} is missing: run `make aot`"
    if arch not in report["archs"]:
        pytest.skip(f"not compiled for {arch} here: this Triton did not write the tables")
    committed = path.read_text()
    versions = f"triton {report['triton']} and torch {report['torch']}"
    if f"with {versions}," not in committed:
        pytest.skip(f"{path.name} was written with other versions than this environment's "
                    f"({versions})")
    assert committed == compiled_kernels.table(report, arch), (
        f"{path.name} is stale: run `make aot`")


# --- The first step ------------------------------------------------------------------------

def test_a_smaller_last_batch_compiles_nothing_new(report):
    """After a step of 32, batches of 31, 17, 8 and 1 (an epoch's last) launch only kernels
    compiled already: the counts that grow with the batch are not specialized. The one
    exception: the mel path's magnitudes kernel, whose element count bounds its loads and keeps
    its divisibility specialization (docs/benchmarks.md)."""
    news = report["first_step"]["smaller_batches"]
    assert set(news) == {f"{path}/batch{b}" for path in gpu_compile.BATCH_PATHS
                         for b in gpu_compile.LAST_BATCHES}
    for name, found in news.items():
        kernels = {n.split()[0] for n in found["new"]}
        allowed = {"_magnitudes_kernel"} if name.startswith("stft-mel/") else set()
        assert kernels <= allowed, (name, found["new"])


def test_the_first_step_compiles_each_of_its_kernels_once(report):
    first = report["first_step"]
    for arch, compiled in first["compiled"].items():
        assert compiled["specializations"] == first["launches"] == 7, arch
        assert len({k for k, _ in compiled["each"]}) == 7 and compiled["seconds"] > 0


def test_committed_first_step_lists_what_a_first_step_compiles(report):
    path = TABLES / "aot-first-step.md"
    assert path.exists(), f"{path} is missing: run `make aot`"
    committed = path.read_text()
    if f"with triton {report['triton']} and torch {report['torch']}," not in committed:
        pytest.skip(f"{path.name} was written with other versions than this environment's")
    fresh = gpu_compile.first_step_markdown(report)
    # Compile times vary run to run; the kernels and the smaller batches' news may not.
    def strip(text):
        return re.sub(r"\d+\.\d\d", "t", re.sub(r"on .*?, without a GPU", "", text))
    assert strip(committed) == strip(fresh), f"{path.name} is stale: run `make aot`"


# --- Registration and tracing in GPU mode -----------------------------------------------------

def test_gpu_mode_registers_triton_ops(report):
    registration = report["registration"]
    if not hasattr(torch.library, "triton_op"):
        pytest.skip("torch < 2.6 has no triton_op: the ops are custom ops on GPUs too")
    assert registration["traceable"]
    assert registration["ops"], "no distill_fused:: op registered"
    if None in registration["ops"].values():
        pytest.skip(f"torch {report['torch']} keeps no table of the kernels in each triton_op")
    for name, kernels in registration["ops"].items():
        assert kernels, f"{name} is not a triton_op with Triton kernels in GPU mode"


def _checks(report, label):
    checks = {k: v for k, v in report["registration"]["checks"].items()
              if k.startswith(label + ":")}
    assert checks, f"no {label} check ran"
    return checks


def test_gpu_mode_fake_tensors_give_eager_metadata(report):
    """Each op's outputs traced with fake tensors (what torch.compile sees) have the shapes,
    dtypes and strides of its eager outputs, op by op, and so do the step's outputs and
    gradients."""
    for name, check in _checks(report, "fake").items():
        assert check["error"] is None, f"{name}:\n{check['error']}"
        assert check["eager_ops"], f"{name}: no distill_fused op was called"
        assert check["ops"] == check["eager_ops"], name
        assert check["outputs"] == check["eager_outputs"], name


def test_gpu_mode_compiled_step_gives_eager_metadata(report):
    """torch.compile(fullgraph=True, backend="aot_eager") traces a step through the triton_ops
    (no graph break) and its outputs and gradients have the eager step's metadata."""
    for name, check in _checks(report, "aot_eager").items():
        assert check["error"] is None, f"{name}:\n{check['error']}"
        assert check["outputs"] == check["eager_outputs"], name


requires_interpreted_triton = pytest.mark.skipif(
    "triton" not in FAST_BACKENDS,
    reason="the triton backend is not available here (CPU tensors need TRITON_INTERPRET=1)")


@requires_interpreted_triton
@pytest.mark.parametrize("grad_target", [False, True], ids=["", "target-grad"])
def test_interpreter_fakes_give_eager_metadata(seed, grad_target):
    """Under the interpreter the ops are custom ops whose fake is the launcher itself: the same
    metadata as eager, op by op. Traced first, with settings no step has used yet: tracing
    leaves no fake tensor in a cache (the eager step after it gives the eager numbers)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from distill_fused import LossConfig, STFTLossConfig, compute_combined_loss, create_stft_loss

    batch = make_batch("realistic", torch.float32, seed)
    # Sizes no other test uses: the config's settings and plans are made by the fake run.
    config = LossConfig(stft=STFTLossConfig(fft_sizes=(96, 160), hop_sizes=(24, 40),
                                            win_lengths=(96, 150)))

    def run(stft_fn=None):
        leaves = [t.clone().requires_grad_(i != 1 or grad_target) for i, t in enumerate(batch)]
        with gpu_compile.OpOutputs() as ops:
            out = compute_combined_loss(*leaves, config, kl_weight=0.01, backend="triton",
                                        _stft_loss_fn=stft_fn)
            out["total_loss"].backward()
        grads = [leaf.grad for leaf in leaves]
        return ops.calls, gpu_compile._tree_meta(out, grads), out, grads

    module = create_stft_loss(config, "cpu")  # its settings made eagerly, its plans not yet
    with FakeTensorMode(allow_non_fake_inputs=True):
        fakes = [run(), run(module)]
    eagers = [run(), run(module)]
    fresh = run(create_stft_loss(config, "cpu"))
    assert fresh[0], "no distill_fused op was called"
    for fake, eager in zip(fakes, eagers):
        assert fake[:2] == eager[:2] == fresh[:2]
        for key in eager[2]:
            assert torch.equal(eager[2][key], fresh[2][key]), key
        for a, b in zip(eager[3], fresh[3]):
            assert (a is None and b is None) or torch.equal(a, b)


@requires_interpreted_triton
def test_interpreter_kl_with_int64_index_math(seed, monkeypatch):
    """The int64 index path (a latent past 2^31 elements) gives the int32 path's results."""
    import distill_fused.kernels.kl as kl

    g = torch.Generator().manual_seed(seed)
    mu, logvar = torch.randn(3, 2000, generator=g), torch.randn(3, 2000, generator=g)

    def run():
        leaves = [mu.clone().requires_grad_(), logvar.clone().requires_grad_()]
        value = kl.free_bits_kl(*leaves, 0.1)
        value.backward()
        return value.detach(), leaves[0].grad, leaves[1].grad

    narrow = run()
    monkeypatch.setattr(kl, "index_dtype", lambda *args: triton.language.int64)
    wide = run()
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


def test_index_dtype():
    from distill_fused.kernels._common import index_dtype
    tl = triton.language
    assert index_dtype(1024, torch.empty(32, 128)) == tl.int32
    assert index_dtype(1024, torch.empty(2**16, 2**15, device="meta")) == tl.int64
    # A small view whose offsets reach past 2^31 (a column of a wide tensor).
    wide = torch.empty(2**16, 2**15 + 1, device="meta")[:, :1]
    assert wide.numel() < 2**31 and index_dtype(1024, wide) == tl.int64
    # The last tile start must fit too.
    assert index_dtype(1024, torch.empty(2**31 - 1000, device="meta")) == tl.int64
