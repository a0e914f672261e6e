"""Compile every Triton kernel specialization that a training step launches for NVIDIA GPUs,
on a machine without one, and check how the package registers and traces its ops there.

Run as a script in *GPU mode* (``TRITON_INTERPRET`` unset, so the kernels are compiled
``JITFunction`` s and the launchers are ``torch.library.triton_op`` s, as on a GPU)::

    python tests/gpu_compile.py --json report.json [--tables bench/results]

What it does:

1. A compile-only Triton driver stands in for the GPU: ``JITFunction.run`` is wrapped so that
   a launch goes through Triton's own binder (the same specialization a GPU launch computes:
   int widths, 16-byte divisibility, arguments equal to 1) and compiles, with ``warmup=True``,
   for each target (sm_90: H100/H200, sm_80: A100), but runs nothing. Triton's caches (in
   memory and on disk) compile each specialization once.
2. The cases of ``CASES`` (the user's and the long shape and one of odd sizes, every input
   dtype, both FFT groupings, target with and without grad, ``kl_weight`` 0 and > 0, the
   modular path, the ``create_stft_loss`` module, non-default STFT settings, int64 index math)
   run forward and backward through the public API on CPU tensors, routed to the ``triton``
   backend. No host decision depends on a kernel's output (the loss path never syncs), so
   recording launches without executing them sees every launch.
3. Each compiled kernel is read (``compiled_kernels.py``): registers, stack frame and spills
   from ptxas's own log (Triton prints it when it assembles a kernel), registers again from the
   binary (``cuobjdump -res-usage``), shared memory and warps from Triton's metadata, SASS
   instructions (from the binary's section sizes), 64-bit integer divisions (PTX ``div``/``rem``
   ``.s64``/``.u64``, which ptxas turns into calls to a division routine).
4. Registration and tracing in GPU mode: every op is a ``triton_op``; each op's outputs
   under fake tensors (what torch.compile sees) equal its eager outputs in shape, dtype and
   strides; ``torch.compile(fullgraph=True, backend="aot_eager")`` of a step gives the eager
   step's shapes, dtypes and strides.

``tests/test_gpu_compile.py`` runs this once per session and asserts on the report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from compiled_kernels import (
    ARCHS,
    describe_specialization,
    kernels_defined,
    specializations,
    table,
    table_path,
)

# Triton 3.9 warns that its fp-fusion default will change; the GPU run sees the same default.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

# --------------------------------------------------------------------------------------------
# The compile-only driver and the launch recorder
# --------------------------------------------------------------------------------------------

class CompileOnlyDriver:
    """What ``JITFunction.run`` asks of a driver, for a GPU that is not there. The device id is
    the architecture, so that each target keeps its own kernel cache."""

    def __init__(self):
        self.arch = 90

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@dataclass
class Launch:
    case: str
    kernel: str
    grid: tuple
    compiled: Dict[int, object]  # arch -> CompiledKernel, or the exception it raised
    # arch -> seconds spent compiling it now (absent where Triton's cache had it already)
    compile_seconds: Dict[int, float] = field(default_factory=dict)


class LaunchRecorder:
    """Replaces ``JITFunction.run``: every launch is compiled for each architecture and recorded,
    nothing runs."""

    def __init__(self, archs=tuple(ARCHS)):
        self.archs = tuple(archs)
        self.driver = CompileOnlyDriver()
        self.launches: List[Launch] = []
        self.ptxas_logs: Dict[str, str] = {}  # compiled hash -> what ptxas said
        self.case = "?"
        self._run = JITFunction.run

    def __enter__(self):
        self._previous_driver = driver._active
        driver.set_active(self.driver)
        # ptxas's own account of registers and spills comes from its log, which Triton prints
        # when it assembles a kernel: so every specialization is compiled afresh in this
        # process (an empty on-disk cache), once (the in-memory cache keeps it).
        self._cache_dir = tempfile.TemporaryDirectory(prefix="distill-fused-aot-")
        self._knobs = (knobs.cache.dir, knobs.nvidia.dump_ptxas_log)
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = self._cache_dir.name, True
        recorder = self

        def run(kernel, *args, grid, warmup, **kwargs):
            recorder.record(kernel, args, grid, kwargs)
            return None

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run
        driver._active = self._previous_driver
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = self._knobs
        self._cache_dir.cleanup()

    def record(self, kernel, args, grid, kwargs):
        compiled, seconds = {}, {}
        for arch in self.archs:
            self.driver.arch = arch
            log = io.StringIO()
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(log):
                    compiled[arch] = self._run(kernel, *args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:  # reported per specialization, not raised here
                compiled[arch] = exc
            else:
                if log.getvalue():  # compiled now, not found in the in-memory cache
                    self.ptxas_logs[compiled[arch].hash] = log.getvalue()
                    seconds[arch] = time.perf_counter() - start
        grid = tuple(grid(dict(zip(kernel.arg_names, args))) if callable(grid) else grid)
        self.launches.append(Launch(self.case, kernel.fn.__name__, grid, compiled, seconds))


# --------------------------------------------------------------------------------------------
# The cases: every path of a training step
# --------------------------------------------------------------------------------------------

# B, H, W, D: the user's batch, the long one, and one of odd sizes with B = 1.
SHAPES = {"user": (32, 128, 94, 128), "long": (16, 128, 938, 128), "odd": (1, 7, 301, 5)}
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16,
          "f16": torch.float16}


@dataclass(frozen=True)
class Case:
    shape: str
    dtype: str = "f32"
    # fused: compute_combined_loss with create_stft_loss's module; custom-stft: with a
    # MultiResolutionSTFTLoss of 4 resolutions, short windows and a linear term; callable-stft:
    # the modular path; tensor-kl-weight: kl_weight a tensor (read by the fused kernels);
    # stft-module: create_stft_loss's module called alone; per-example: reduction="none" with
    # lengths and per-resolution terms (the per-example path's kernels); stft-mel,
    # stft-mel-l2: a module with auraloss's mel scale, L1 or L2 distances, a linear term and a
    # phase term (kernels/stft_options.py).
    path: str = "fused"
    grouping: str = "per_resolution"
    target_grad: bool = False
    kl_weight: float = 0.01
    wide_index: bool = False   # int64 index math, as for a latent past 2^31 elements
    batch: Optional[int] = None  # another batch size than the shape's (an epoch's last)

    @property
    def name(self) -> str:
        parts = [self.shape, self.dtype, self.path]
        if self.grouping != "per_resolution":
            parts.append(f"{self.grouping}-fft")
        if self.target_grad:
            parts.append("target-grad")
        if self.kl_weight == 0:
            parts.append("kl0")
        if self.wide_index:
            parts.append("int64-index")
        if self.batch is not None:
            parts.append(f"batch{self.batch}")
        return "/".join(parts)


def _cases() -> List[Case]:
    cases = []
    for shape in ("user", "long"):
        cases += [Case(shape, dtype) for dtype in DTYPES]
        cases += [Case(shape, grouping="shared"), Case(shape, target_grad=True),
                  Case(shape, kl_weight=0.0), Case(shape, path="callable-stft"),
                  Case(shape, path="tensor-kl-weight"), Case(shape, path="stft-module"),
                  Case(shape, "bf16", path="stft-module", target_grad=True)]
    cases += [Case("user", "f64", target_grad=True),
              Case("user", path="tensor-kl-weight", target_grad=True),
              Case("user", path="custom-stft"), Case("user", path="custom-stft", grouping="shared"),
              Case("odd"), Case("odd", "bf16", target_grad=True),
              Case("user", wide_index=True), Case("user", path="callable-stft", wide_index=True),
              Case("user", path="per-example"), Case("long", path="per-example"),
              Case("user", "f64", path="per-example", target_grad=True),
              Case("odd", "bf16", path="per-example", target_grad=True),
              Case("user", path="per-example", wide_index=True),
              Case("user", path="stft-mel"), Case("long", path="stft-mel"),
              Case("user", path="stft-mel-l2"),
              Case("user", "f64", path="stft-mel-l2", target_grad=True),
              Case("odd", "bf16", path="stft-mel-l2", target_grad=True),
              Case("user", path="stft-mel", wide_index=True)]
    return cases


CASES = _cases()


def _batch(case: Case):
    from distill_fused.synthetic import realistic_batch
    b, h, w, d = SHAPES[case.shape]
    batch = realistic_batch(case.batch or b, h, w, d, dtype=torch.float32, seed=0)
    return [t.to(DTYPES[case.dtype]) for t in batch]


def _plain_stft_loss(x, y):
    """A user's own callable STFT loss (takes the modular path)."""
    return (x - y).abs().mean()


def _custom_stft_loss():
    from distill_fused import MultiResolutionSTFTLoss
    return MultiResolutionSTFTLoss(fft_sizes=(128, 256, 512, 1024), hop_sizes=(32, 64, 128, 256),
                                   win_lengths=(100, 256, 400, 1024), w_lin_mag=0.5)


def _mel_stft_loss(distance: str):
    from distill_fused import MultiResolutionSTFTLoss
    return MultiResolutionSTFTLoss(
        fft_sizes=(128, 256, 512, 1024), hop_sizes=(32, 64, 128, 256),
        win_lengths=(100, 256, 400, 1024), sample_rate=16000, scale="mel",
        n_bins=(16, 32, 64, 128), mag_distance=distance, w_lin_mag=0.5, w_phs=0.1)


def step(case: Case, loss_fn=None):
    """Forward and backward of ``case``: returns ``(outputs, input gradients)``."""
    from distill_fused import LossConfig, compute_combined_loss, create_stft_loss

    config = LossConfig()
    recon, target, mu, logvar = _batch(case)
    recon.requires_grad_()
    target.requires_grad_(case.target_grad)
    mu.requires_grad_()
    logvar.requires_grad_()
    leaves = [recon, target, mu, logvar]
    with _index_width(case.wide_index):
        if case.path in ("stft-module", "stft-mel", "stft-mel-l2"):
            if case.path == "stft-module":
                module = create_stft_loss(config, "cpu")
                module.fft_grouping = case.grouping
            else:
                module = _mel_stft_loss("L2" if case.path.endswith("l2") else "L1")
            b = recon.shape[0]
            loss = module(recon[:, 0].reshape(b, 1, -1), target[:, 0].reshape(b, 1, -1))
            outputs = {"stft": loss}
        else:
            stft_fn = {"callable-stft": _plain_stft_loss,
                       "custom-stft": _custom_stft_loss}.get(case.path, None)
            stft_fn = stft_fn() if stft_fn is _custom_stft_loss else stft_fn
            stft_fn = stft_fn or create_stft_loss(config, "cpu")
            kl_weight = (torch.tensor(case.kl_weight) if case.path == "tensor-kl-weight"
                         else case.kl_weight)
            run = loss_fn or compute_combined_loss
            options = {}
            if case.path == "per-example":
                width = recon.shape[3]
                options = dict(reduction="none", per_resolution_terms=True,
                               lengths=torch.arange(recon.shape[0]) % 3 * -(width // 5) + width)
            outputs = run(recon, target, mu, logvar, config, kl_weight=kl_weight,
                          _stft_loss_fn=stft_fn, backend="triton", fft_grouping=case.grouping,
                          **options)
            loss = outputs["total_loss"].sum()
        loss.backward()
    return outputs, [leaf.grad for leaf in leaves]


@contextlib.contextmanager
def _index_width(wide: bool):
    """With ``wide``, the launchers choose 64-bit index math whatever the sizes."""
    import distill_fused.kernels._common as common
    import distill_fused.kernels.combined as combined
    import distill_fused.kernels.kl as kl
    saved = combined.index_dtype, kl.index_dtype, common.INDEX_LIMIT
    if wide:
        combined.index_dtype = kl.index_dtype = lambda *args: triton.language.int64
        common.INDEX_LIMIT = 0
    try:
        yield
    finally:
        combined.index_dtype, kl.index_dtype, common.INDEX_LIMIT = saved


def route_cpu_tensors_to_triton():
    """This process stands in for a GPU: CPU tensors take the ``triton`` backend (whose
    launches compile instead of running), as CUDA tensors would by default."""
    import distill_fused.dispatch as dispatch
    from distill_fused.api.environment import BACKEND_VAR
    dispatch._triton_usable = lambda device: dispatch._load_triton() is not None
    os.environ[BACKEND_VAR] = "triton"


# --------------------------------------------------------------------------------------------
# Registration and tracing in GPU mode
# --------------------------------------------------------------------------------------------

def _meta(t) -> Optional[list]:
    if not isinstance(t, torch.Tensor):
        return None
    return [list(t.shape), str(t.dtype), list(t.stride())]


class OpOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each ``distill_fused::`` op call: its name and its outputs' shapes/dtypes/strides."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "distill_fused":
            flat = out if isinstance(out, (list, tuple)) else [out]
            self.calls.append([func.__name__, [_meta(t) for t in flat]])
        return out


def triton_kernels_of(op: str) -> Optional[List[str]]:
    """The Triton kernels torch found inside the ``triton_op`` ``op`` (empty for another kind
    of op); ``None`` where this torch keeps no such table."""
    try:
        from torch._library.triton import get_triton_kernels_for_op
    except ImportError:
        return None
    return sorted(kernel.fn.__name__ for kernel in get_triton_kernels_for_op(op))


def registration_report(recorder: LaunchRecorder) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    import distill_fused.kernels._common as common
    report = {"traceable": common.TRACEABLE_KERNELS, "checks": {},
              "ops": {f"distill_fused::{name}": triton_kernels_of(f"distill_fused::{name}")
                      for name in sorted(torch.ops.distill_fused)}}

    def eager_vs(label, case: Case, run):
        recorder.case = f"{label}:{case.name}"
        try:
            with OpOutputs() as eager:
                eager_out, eager_grads = step(case)
            observed, out, grads = run(case)
            report["checks"][f"{label}:{case.name}"] = {
                "eager_ops": eager.calls, "ops": observed,
                "eager_outputs": _tree_meta(eager_out, eager_grads),
                "outputs": _tree_meta(out, grads), "error": None}
        except Exception:
            report["checks"][f"{label}:{case.name}"] = {"error": traceback.format_exc()[-3000:]}

    def under_fake_tensors(case):
        with FakeTensorMode(allow_non_fake_inputs=True):
            with OpOutputs() as fake:
                out, grads = step(case)
        return fake.calls, out, grads

    def compiled_aot_eager(case):
        from distill_fused import compute_combined_loss
        torch._dynamo.reset()
        compiled = torch.compile(compute_combined_loss, fullgraph=True, backend="aot_eager")
        out, grads = step(case, loss_fn=compiled)
        return None, out, grads

    for case in (Case("user"), Case("user", "bf16", target_grad=True),
                 Case("user", path="tensor-kl-weight"), Case("user", path="stft-module")):
        eager_vs("fake", case, under_fake_tensors)
    for case in (Case("user"), Case("user", path="tensor-kl-weight")):
        eager_vs("aot_eager", case, compiled_aot_eager)
    return report


def _tree_meta(outputs, grads):
    return {"outputs": {k: _meta(v) for k, v in outputs.items()},
            "grads": [_meta(g) for g in grads]}


# --------------------------------------------------------------------------------------------
# The report and its tables
# --------------------------------------------------------------------------------------------

# The first step of a training run as the application makes it (its loss module, its default
# config, float32), and its epoch's last batch at other sizes: the smaller batches must find
# every kernel they launch compiled already.
FIRST_STEP = Case("user")
LAST_BATCHES = (31, 17, 8, 1)
BATCH_PATHS = ("fused", "per-example", "stft-mel")


def first_step_report(recorder: LaunchRecorder) -> dict:
    """What the first step of the user's case compiles (each specialization, and its compile
    time on this machine for each architecture; Triton compiles on the host, so a GPU host
    spends about as long, less what its faster cores save), and which specializations a
    smaller batch of each path would compile anew."""
    def launches_of(case: Case):
        recorder.case = f"first-step:{case.name}"
        before = len(recorder.launches)
        step(case)
        return recorder.launches[before:]

    def key(launch, arch):
        compiled = launch.compiled[arch]
        return (launch.kernel, getattr(compiled, "hash", repr(compiled)))

    first = launches_of(FIRST_STEP)
    report = {"case": FIRST_STEP.name, "launches": len(first), "compiled": {}}
    for arch in recorder.archs:
        name = ARCHS[arch]["name"]
        compiled = [(launch.kernel, launch.compile_seconds[arch]) for launch in first
                    if arch in launch.compile_seconds]
        report["compiled"][name] = {"specializations": len(compiled),
                                    "seconds": round(sum(t for _, t in compiled), 2),
                                    "each": [[k, round(t, 2)] for k, t in compiled]}
    arch = recorder.archs[0]
    report["smaller_batches"] = {}
    for path in BATCH_PATHS:
        seen = {key(launch, arch) for launch in launches_of(Case("user", path=path))}
        for batch in LAST_BATCHES:
            launches = launches_of(Case("user", path=path, batch=batch))
            fresh = [launch for launch in launches if key(launch, arch) not in seen]
            seen |= {key(launch, arch) for launch in fresh}
            report["smaller_batches"][f"{path}/batch{batch}"] = {
                "new": sorted({f"{launch.kernel} {_described(launch.compiled[arch])}"
                               for launch in fresh}),
                "seconds": round(sum(launch.compile_seconds.get(arch, 0.0)
                                     for launch in fresh), 2)}
    return report


def first_step_markdown(report: dict) -> str:
    """``aot-first-step.md``: the first step's compiles and the smaller batches' news."""
    first = report["first_step"]
    lines = ["# The first training step on a GPU: what Triton compiles", "",
             f"Written by `make aot` (`tests/gpu_compile.py`) with triton {report['triton']} and "
             f"torch {report['torch']}, on {_machine()}, without a GPU. Triton compiles a "
             "kernel's specialization at its first launch, on the host's CPU (and keeps it in "
             "its cache, on disk: a later run compiles nothing); these are this machine's "
             "compile times, a prediction of a GPU host's (whose faster cores take less).", "",
             f"The user's case (`{first['case']}`: `compute_combined_loss` with "
             "`create_stft_loss`'s module, the default config, float32, `[32, 2, 128, 94]`): "
             f"{first['launches']} Triton kernels per step (its other launches are cuFFT's "
             "and the seed gradient's: nothing to compile).", "",
             "| target | specializations compiled | seconds | each (kernel: seconds) |",
             "|---|---:|---:|---|"]
    for arch, compiled in first["compiled"].items():
        each = ", ".join(f"`{k}` {t:.2f}" for k, t in compiled["each"])
        lines.append(f"| {arch} | {compiled['specializations']} | {compiled['seconds']:.2f} | "
                     f"{each} |")
    lines += ["", "Smaller batches (the last of an epoch) after a step of 32, one after the "
              "other, per path: the specializations each compiles anew (sm_90).", "",
              "| path / batch | new specializations | seconds |", "|---|---|---:|"]
    for name, news in first["smaller_batches"].items():
        lines.append(f"| {name} | {'; '.join(f'`{n}`' for n in news['new']) or 'none'} | "
                     f"{news['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import platform
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.machine()


def _described(compiled) -> str:
    if isinstance(compiled, Exception):
        return f"(failed: {type(compiled).__name__})"
    return describe_specialization(compiled.src)


def build_report(only: Optional[str] = None, archs=tuple(ARCHS)) -> dict:
    """The report over ``CASES`` (those whose name matches the regular expression ``only``,
    and then no registration checks), compiled for ``archs``."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("gpu_compile.py runs in GPU mode: unset TRITON_INTERPRET")
    route_cpu_tensors_to_triton()
    torch.manual_seed(0)
    with LaunchRecorder(archs) as recorder:
        first_step = None if only else first_step_report(recorder)
        cases = {}
        for case in CASES:
            if only and not re.search(only, case.name):
                continue
            recorder.case = case.name
            before = len(recorder.launches)
            step(case)
            cases[case.name] = [launch.kernel for launch in recorder.launches[before:]]
        registration = None if only else registration_report(recorder)
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "archs": {ARCHS[a]["name"]: ARCHS[a] for a in archs},
        "cases": cases,
        "kernels_defined": kernels_defined(),
        "specializations": specializations(recorder.launches, recorder.ptxas_logs),
        "registration": registration,
        "first_step": first_step,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--tables", help="write aot-sm90.md and aot-sm80.md into this folder")
    parser.add_argument("--cases", help="only the cases whose name matches this regex")
    parser.add_argument("--archs", default=",".join(str(a) for a in ARCHS),
                        help="compute capabilities to compile for, e.g. 90,80 (the default)")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    if args.tables and set(archs) != set(ARCHS):
        parser.error("--tables needs every architecture")
    report = build_report(args.cases, archs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.tables:
        for arch in ARCHS.values():
            with open(table_path(args.tables, arch["name"]), "w") as f:
                f.write(table(report, arch["name"]))
        with open(os.path.join(args.tables, "aot-first-step.md"), "w") as f:
            f.write(first_step_markdown(report))
    failed = [r for r in report["specializations"] if r["error"]]
    print(f"{len(report['specializations'])} specializations, {len(failed)} failed to compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
