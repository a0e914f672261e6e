"""Cases, providers and measurements of the benchmark protocol (docs/benchmarks.md).

A provider turns a batch into a ``step()`` that runs one forward+backward of
``compute_combined_loss``. Timing: CUDA events after warm-up on a GPU, ``perf_counter`` through
pytest-benchmark on the CPU; medians in both. Peak extra memory: the CUDA allocator's peak on a
GPU; on a CPU, the peak of the running sum of the profiler's allocation events. Launches:
kernels per step counted by the profiler on a GPU (none on a CPU); for the ``torch``
provider also the kernels it asks for per step (``count_dispatched_launches``: what an MPS
device launches).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from distill_fused import LossConfig, compute_combined_loss, create_stft_loss
from distill_fused.backends import reference
from distill_fused.synthetic import realistic_batch

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    height: int
    width: int
    latent_dim: int
    # The per-example path: reduction="none" and a padded batch (lengths drawn in [W/2, W]).
    per_example: bool = False
    # A multi-scale mel STFT loss alone (MultiResolutionSTFTLoss, DAC_MEL) on [batch, height,
    # width] audio: height channels of width samples.
    mel_module: bool = False


CASES = {
    "smoke": Case("smoke", 2, 128, 94, 128),
    "user": Case("user", 32, 128, 94, 128),
    "long": Case("long", 16, 128, 938, 128),
    "user-padded-none": Case("user-padded-none", 32, 128, 94, 128, per_example=True),
    # 8 clips of 2 s of 44.1 kHz mono audio.
    "dac-mel": Case("dac-mel", 8, 1, 88200, 0, mel_module=True),
}

# DAC's multi-scale mel loss in auraloss's terms: 7 resolutions, windows of 32 to 2048 samples
# (FFT = window, hop = window / 4), a mel filterbank per resolution of 5 to 320 bins, auraloss's
# default spectral-convergence and log-magnitude terms.
DAC_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
DAC_MEL = dict(fft_sizes=DAC_WINDOWS, hop_sizes=tuple(w // 4 for w in DAC_WINDOWS),
               win_lengths=DAC_WINDOWS, sample_rate=44100, scale="mel",
               n_bins=(5, 10, 20, 40, 80, 160, 320))


def audio_batch(case: Case, dev: torch.device, seed: int = 0):
    """Two random clips per example (input, target): a few random partials under a decay, and
    noise; float32 on ``dev``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(case.width, dtype=torch.float64) / DAC_MEL["sample_rate"]
    shape = (case.batch, case.height, 1)

    def clip():
        tone = sum(torch.sin(2 * torch.pi * (80 + 4000 * torch.rand(shape, generator=g,
                                                                       dtype=torch.float64)) * t
                             + torch.rand(shape, generator=g, dtype=torch.float64) * 6.3)
                   for _ in range(4))
        noise = 0.05 * torch.randn(case.batch, case.height, case.width, generator=g,
                                   dtype=torch.float64)
        return (tone * torch.exp(-2 * t) / 4 + noise).float().to(dev)

    return clip(), clip()


def auraloss_mel_loss(dev: torch.device) -> Callable:
    """The reference of the mel case: auraloss's own ``STFTLoss`` with ``scale="mel"`` per
    resolution (its ``MultiResolutionSTFTLoss`` takes one ``n_bins`` for all), averaged. Its
    filterbank is set after construction to librosa's, built by ``core/filterbanks.py`` (the
    same floats, bit for bit: tests/test_stft_options.py), so that the GPU image, which has
    no librosa, runs the same reference."""
    import auraloss

    from distill_fused.core.filterbanks import mel_filterbank
    losses = []
    for n, hop, win, bins in zip(DAC_MEL["fft_sizes"], DAC_MEL["hop_sizes"],
                                 DAC_MEL["win_lengths"], DAC_MEL["n_bins"]):
        loss = auraloss.freq.STFTLoss(n, hop, win, sample_rate=DAC_MEL["sample_rate"])
        loss.scale, loss.n_bins = "mel", bins
        loss.fb = mel_filterbank(DAC_MEL["sample_rate"], n, bins)[None].to(dev)
        losses.append(loss)
    return lambda x, y: sum(loss(x, y) for loss in losses) / len(losses)


def make_mel_step(provider: str, case: Case, dev: torch.device,
                  seed: int = 0) -> Callable[[], None]:
    """One forward+backward of the multi-scale mel loss on fresh random clips."""
    from distill_fused import MultiResolutionSTFTLoss

    x, y = audio_batch(case, dev, seed)
    x.requires_grad_()
    if provider.startswith("reference"):
        fn = auraloss_mel_loss(dev)
        if provider.startswith("reference+torch.compile"):
            mode = "reduce-overhead" if provider.endswith("(reduce-overhead)") else None
            fn = torch.compile(fn, mode=mode)
    else:
        fn = MultiResolutionSTFTLoss(**DAC_MEL, backend=provider)

    def step() -> None:
        x.grad = None
        fn(x, y).backward()

    return step


def lengths_of(case: Case, dev: torch.device, seed: int = 0) -> torch.Tensor:
    """The valid frames of each example of a per-example case: random in ``[W/2, W]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(case.width // 2, case.width + 1, (case.batch,), generator=g).to(dev)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def device_slug(dev: torch.device) -> str:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def providers(dev: torch.device, case: Optional[Case] = None) -> List[str]:
    """The providers of ``case`` on ``dev``: the per-example path's reference is a loop over
    the examples with host reads, which torch.compile does not speed up (not timed)."""
    if case is not None and case.per_example:
        return ["reference", "torch"] + (["triton"] if dev.type == "cuda" else [])
    names = ["reference", "reference+torch.compile", "torch"]
    if case is not None and case.mel_module:  # one FFT per resolution: no FFT grouping
        return names[:2] + (["reference+torch.compile(reduce-overhead)"] if dev.type == "cuda"
                            else []) + ["torch"] + (["triton"] if dev.type == "cuda" else [])
    if dev.type == "cuda":
        names[2:2] = ["reference+torch.compile(reduce-overhead)"]
        names += ["triton", "triton(shared-fft)"]
    return names


def make_step(provider: str, case: Case, dev: torch.device, seed: int = 0) -> Callable[[], None]:
    """One forward+backward of the combined loss on a fresh realistic batch (the mel case: of
    its STFT loss, ``make_mel_step``)."""
    if case.mel_module:
        return make_mel_step(provider, case, dev, seed)
    recon, target, mu, logvar = realistic_batch(case.batch, case.height, case.width,
                                                case.latent_dim, device=dev, seed=seed)
    leaves = [t.requires_grad_() for t in (recon, mu, logvar)]
    config = LossConfig()
    stft_fn = create_stft_loss(config, dev)
    options = (dict(reduction="none", lengths=lengths_of(case, dev, seed))
               if case.per_example else {})

    if provider.startswith("reference+torch.compile"):
        mode = "reduce-overhead" if provider.endswith("(reduce-overhead)") else None
        fn = torch.compile(lambda r, t, m, v: reference.combined_loss(
            r, t, m, v, config, 0.01, stft_fn.settings)[0]["total_loss"], mode=mode)
    else:
        # "triton(shared-fft)": one rfft of the largest size for every resolution dividing it.
        backend, _, variant = provider.partition("(")
        grouping = "shared" if variant == "shared-fft)" else "per_resolution"

        def fn(r, t, m, v):
            total = compute_combined_loss(r, t, m, v, config, kl_weight=0.01,
                                          _stft_loss_fn=stft_fn, backend=backend,
                                          fft_grouping=grouping, **options)["total_loss"]
            return total.sum() if case.per_example else total

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn(recon, target, mu, logvar).backward()

    return step


def time_cuda(step: Callable[[], None], warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of ``step`` between CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def peak_memory_mb(step: Callable[[], None], dev: torch.device) -> Optional[float]:
    """Peak memory one step allocates beyond what was allocated before it: the CUDA
    allocator's peak on a GPU; on a CPU, the running sum of the profiler's allocation events."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def count_launches(step: Callable[[], None], dev: torch.device) -> Optional[int]:
    """Kernels one step launches on the GPU, from the profiler."""
    if dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def count_dispatched_launches(step: Callable[[], None], dev: torch.device) -> int:
    """Kernels one step of the ``torch`` backend asks the device for: the aten ops it
    dispatches that launch one (``tests/aten_launches.py``: views and allocations left out).
    On MPS each is a launch (no CUDA graphs, no fusion); on a CPU the step takes MPS's
    branches (``core/devices.py``), so the count is the one a Mac sees."""
    import sys

    from torch.utils._python_dispatch import TorchDispatchMode

    from distill_fused.core.devices import emulated

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from aten_launches import launches_kernel

    class Counting(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counting.count += launches_kernel(func)
            return func(*args, **(kwargs or {}))

    like_mps = emulated("cpu", like="mps") if dev.type == "cpu" else contextlib.nullcontext()
    with like_mps:
        step()  # what the first step makes once (windows, plans) is not counted
        with Counting():
            step()
    return Counting.count


def write_results(rows: List[Dict], dev: torch.device, kernel_rows: List[Dict] = ()) -> Path:
    """``bench/results/<device-slug>.json`` with speed-ups over ``reference`` of the same run
    (and the per-kernel bandwidth rows, when there are any)."""
    ref = {r["case"]: r["median_ms"] for r in rows if r["provider"] == "reference"}
    for row in rows:
        base = ref.get(row["case"])
        row["speedup_vs_reference"] = (round(base / row["median_ms"], 3)
                                       if base and row["median_ms"] else None)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    doc = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.date.today().isoformat(),
        "results": rows,
    }
    if kernel_rows:
        doc["kernels"] = list(kernel_rows)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = results_path(dev)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def results_path(dev: torch.device) -> Path:
    """Where a run on ``dev`` writes its results (one file per device: the latest run)."""
    return RESULTS_DIR / f"{device_slug(dev)}.json"
