"""A cost model of one training step of the ``triton`` backend on an H100: a prediction, made
on a machine without a GPU, for the GPU run to set measurements beside.

For the user's and the long batch (float32, forward + backward of ``compute_combined_loss``
with ``create_stft_loss``'s module, as ``bench/`` times it), every launch of the step in launch
order, recorded as ``tests/gpu_compile.py`` records them (each Triton launch compiled for sm_90
and read with the tools in Triton's wheel, nothing run), and the aten operations between them
(cuFFT calls, the seed gradient of ``backward()``) seen by a dispatch mode. Per launch:

- bytes read and written, from the shapes and dtypes of its arguments: each byte that must
  cross device memory once (a lower bound: a value read twice through the cache counts once);
- grid, registers, resident blocks per SM and static SASS instructions (from the compile);
- three lower bounds on its time on an H100 (132 SMs):

  * ``bytes / BW``, BW = 3.0 TB/s: an assumed sustained bandwidth for an H100, about 90% of
    its 3.35 TB/s datasheet figure (not measured here: no GPU has run this project yet);
  * issue: the SM with the most programs (``ceil(G / 132)``) issues ``warps x SASS x trips``
    warp-instructions each, at 4 per clock (1.98 GHz), ``trips`` being the passes of the
    kernel's main loop (1 for straight-line code);
  * waves: that same SM moves its programs' bytes at a 132th of BW: a grid smaller than the
    GPU, or a single program, cannot use the whole memory system;

  and the launch's prediction is the largest of the three plus ``LAUNCH_US`` = 2.5 us.
  A cuFFT call is predicted by its bytes alone, plus ``LAUNCH_US``.

The step's prediction is the sum. Write the tables with::

    python bench/costmodel.py --write bench/results/costmodel-h100.md [--before FILE.json]

(``--json`` saves the per-launch figures, which a later run sets beside its own as *before*.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the compile-only driver of the compile test

import compiled_kernels  # noqa: E402
import gpu_compile  # noqa: E402
from aten_launches import launches_kernel  # noqa: E402

SMS = 132
BW = 3.0e12                # bytes/s: assumed, ~90% of an H100's 3.35 TB/s datasheet figure
CLOCK = 1.98e9             # SM clock, Hz
ISSUE_PER_CLOCK = 4        # warp-instructions per SM per clock (4 schedulers)
LAUNCH_US = 2.5            # per launch
GOAL_US, GOAL_LAUNCHES = 60.0, 16
CASES = {"user": gpu_compile.Case("user"), "long": gpu_compile.Case("long")}


@dataclass
class LaunchCost:
    launch: str
    grid: int = 1
    warps: int = 0
    registers: int = 0
    blocks_per_sm: int = 0
    occupancy: float = 0.0
    sass: int = 0
    div64: int = 0
    dynamic: int = 0       # instructions per thread (estimate)
    read: int = 0
    written: int = 0
    t_bytes: float = 0.0
    t_issue: float = 0.0
    t_waves: float = 0.0
    predicted: float = 0.0

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass(frozen=True)
class Sized:
    """What the model keeps of a kernel's tensor argument."""
    elements: int
    itemsize: int

    @staticmethod
    def of(t: torch.Tensor) -> Sized:
        return Sized(t.numel(), t.element_size())

    def numel(self) -> int:
        return self.elements

    def element_size(self) -> int:
        return self.itemsize


def nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, (torch.Tensor, Sized)) else 0


# --------------------------------------------------------------------------------------------
# Bytes and loop passes of each kernel, from its arguments (by name)
# --------------------------------------------------------------------------------------------

def _frame(a):
    signals = 2 * a["signals"] * a["length"] * a["x_ptr"].element_size()
    return signals, nbytes(a["frames_ptr"]), 1


def _spectral_partials(a):
    """Before issue 13 one tile per program; since, a loop over every P-th tile (P programs
    per resolution, tiles of about a third of the spectrum's elements each)."""
    if "max_tiles" in a:
        return nbytes(a["spec_ptr"]), nbytes(a["partials_ptr"]), 1
    n_res = a["partials_ptr"].numel() // (4 * a["n_programs"])
    tiles = nbytes(a["spec_ptr"]) / a["spec_ptr"].element_size() / 2 / 2 / n_res / a["BLOCK"]
    return nbytes(a["spec_ptr"]), nbytes(a["partials_ptr"]), math.ceil(tiles / a["n_programs"])


def _recon_sums(a):
    read = nbytes(a["recon_ptr"]) + nbytes(a["target_ptr"])
    programs = a.get("n_programs", 0)
    trips = math.ceil(a["n_elements"] / 1024 / programs) if programs else 1
    return read, nbytes(a["partials_ptr"]), trips


def _spectral_grad(a):
    spec = nbytes(a["spec_ptr"])
    sides = int(a["GRAD_X"]) + int(a["GRAD_Y"])
    return spec, spec * sides // 2, 1


def _frames_adjoint(a):
    out = nbytes(a["out_ptr"])
    side_fraction = out / a["out_ptr"].element_size() / (2 * a["signals"] * a["length"])
    if "rows" in a:  # before issue 13: one loop over resolutions, one over covering frames
        return (int(nbytes(a["frames_ptr"]) * side_fraction), out,
                [a["n_res"], a["max_cover"]])
    # Since: one pass per resolution over t + pad, three in the tiles reaching an edge.
    block = a["BLOCK"]
    edge_tiles = min(a["t_tiles"], 2 * math.ceil((2048 // 2 + 1) / block))
    return (int(nbytes(a["frames_ptr"]) * side_fraction), out,
            [1 + 2 * edge_tiles / a["t_tiles"]])


def _combined_epilogue(a):
    read = sum(nbytes(a[k]) for k in ("stft_partials_ptr", "recon_partials_ptr", "mu_ptr",
                                      "logvar_ptr"))
    written = sum(nbytes(a[k]) for k in ("grad_mu_ptr", "grad_logvar_ptr", "scalars_ptr"))
    return read, written, 1


def _combined_backward(a):
    read = nbytes(a["recon_ptr"]) + nbytes(a["target_ptr"]) + nbytes(a["unit_ptr"])
    read += nbytes(a["kl_grad_mu_ptr"]) + nbytes(a["kl_grad_lv_ptr"])
    written = sum(nbytes(a[k]) for k in ("grad_recon_ptr", "grad_target_ptr", "grad_mu_ptr",
                                         "grad_logvar_ptr"))
    return read, written, 1


TRAFFIC = {
    "_frame_kernel": _frame,
    "_spectral_partials_kernel": _spectral_partials,
    "_spectral_grad_kernel": _spectral_grad,
    "_frames_adjoint_kernel": _frames_adjoint,
    "_recon_partials_kernel": _recon_sums,
    "_combined_epilogue_kernel": _combined_epilogue,
    "_combined_backward_kernel": _combined_backward,
}


# --------------------------------------------------------------------------------------------
# Recording a step: Triton launches (compiled for sm_90) and aten operations, in order
# --------------------------------------------------------------------------------------------

class StepRecorder(gpu_compile.LaunchRecorder):
    """Every launch of a step, in order: Triton kernels compiled for sm_90 with their bound
    arguments, and the aten operations that launch a kernel, with their tensors."""

    def __init__(self):
        super().__init__()
        self.events: List[tuple] = []

    def record(self, kernel, args, grid, kwargs):
        self.driver.arch = 90
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = self._run(kernel, *args, grid=grid, warmup=True, **kwargs)
        if log.getvalue():
            self.ptxas_logs[compiled.hash] = log.getvalue()
        bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
        grid = tuple(grid(bound) if callable(grid) else grid)
        # Sizes only: a reference kept to an output would stop autograd from taking it as a
        # leaf's .grad (it would copy it: launches that a training step does not make).
        bound = {k: Sized.of(v) if isinstance(v, torch.Tensor) else v for k, v in bound.items()}
        self.events.append(("triton", kernel.fn.__name__, grid, compiled, bound))


class AtenLaunches(TorchDispatchMode):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if launches_kernel(func):
            tensors = [t for t in (*args, *(kwargs or {}).values()) if isinstance(t, torch.Tensor)]
            outs = out if isinstance(out, (list, tuple)) else [out]
            read = sum(nbytes(t) for t in tensors if not _is_out(t, outs))
            written = sum(nbytes(t) for t in outs if isinstance(t, torch.Tensor))
            self.events.append(("aten", name, read, written))
        return out


def _is_out(t, outs) -> bool:
    return any(t is o for o in outs)


def _leaves(case):
    """The case's batch and its STFT module."""
    from distill_fused import LossConfig, create_stft_loss
    return gpu_compile._batch(case), LossConfig(), create_stft_loss(LossConfig(), "cpu")


def _fresh(batch):
    """Leaves of a step (the target without gradient), as a training loop has them."""
    return [t.clone().requires_grad_(i != 1) for i, t in enumerate(batch)]


def _step(leaves, config, stft_loss):
    from distill_fused import compute_combined_loss
    out = compute_combined_loss(*leaves, config, kl_weight=0.01, _stft_loss_fn=stft_loss,
                                backend="triton")
    out["total_loss"].backward()


def record_steps(cases) -> Dict[str, List[tuple]]:
    """The launches of one step of each case (after a first step, which builds the per-shape
    plan, as every step after the first finds it)."""
    gpu_compile.route_cpu_tensors_to_triton()
    steps = {}
    with StepRecorder() as recorder:
        for name, case in cases.items():
            batch, config, stft_loss = _leaves(case)
            _step(_fresh(batch), config, stft_loss)
            leaves = _fresh(batch)
            recorder.events.clear()
            with AtenLaunches(recorder.events):
                _step(leaves, config, stft_loss)
            steps[name] = list(recorder.events)
        return steps, dict(recorder.ptxas_logs)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([A-Z@!][^;]*);")
BRANCH = re.compile(r"\b(BRA|CALL\.REL\.NOINC)\s+(0x[0-9a-f]+)")


def dynamic_instructions(sass: str, trips) -> int:
    """Instructions one thread issues, estimated from the SASS: an instruction inside ``d``
    nested loops (spans closed by a backward branch) counts ``trips[0] * ... * trips[d-1]``
    times (1 past the list); a subroutine (a 64-bit division) counts once per call. Loops
    that ptxas unrolled and split count each part for every trip: an overestimate there."""
    code = [(int(a, 16), text) for a, text in SASS_LINE.findall(sass)]
    calls = [(a, int(m.group(2), 16)) for a, text in code
             if (m := BRANCH.search(text)) and m.group(1).startswith("CALL")]
    starts = sorted({target for _, target in calls})
    body_end = starts[0] if starts else float("inf")
    loops = [(int(m.group(2), 16), a) for a, text in code
             if (m := BRANCH.search(text)) and m.group(1) == "BRA" and int(m.group(2), 16) < a
             and a < body_end]

    def weight(a):
        depth = sum(lo <= a <= hi for lo, hi in loops)
        return math.prod(list(trips)[:depth])
    subroutine = {start: sum(1 for a, _ in code if start <= a and
                             (a < next((s for s in starts if s > start), float("inf"))))
                  for start in starts}
    total = sum(weight(a) for a, _ in code if a < body_end)
    total += sum(weight(a) * subroutine[target] for a, target in calls)
    return total


def cost_of(event, ptxas_logs) -> LaunchCost:
    if event[0] == "aten":
        _, name, read, written = event
        cost = LaunchCost(f"aten {name}", read=read, written=written)
        cost.t_bytes = cost.bytes / BW * 1e6
        cost.predicted = cost.t_bytes + LAUNCH_US
        return cost
    _, name, grid, compiled, args = event
    info = compiled_kernels.inspect_kernel(compiled, 90, ptxas_logs.get(compiled.hash, ""))
    read, written, trips = TRAFFIC[name](args)
    trips = trips if isinstance(trips, (list, tuple)) else [trips]
    sass = compiled_kernels.tool("cuobjdump", compiled.asm["cubin"], "-sass")
    dynamic = round(dynamic_instructions(sass, trips))
    programs = math.prod(grid)
    cost = LaunchCost(name, grid=programs, warps=info["num_warps"],
                      registers=info["registers"], blocks_per_sm=info["resident_blocks"],
                      occupancy=info["occupancy"], sass=info["sass_instructions"],
                      div64=info["div64"], dynamic=dynamic, read=read, written=written)
    busiest = math.ceil(programs / SMS)  # programs on the busiest SM
    cost.t_bytes = cost.bytes / BW * 1e6
    cost.t_issue = busiest * cost.warps * dynamic / (ISSUE_PER_CLOCK * CLOCK) * 1e6
    cost.t_waves = busiest * (cost.bytes / programs) / (BW / SMS) * 1e6
    cost.predicted = max(cost.t_bytes, cost.t_issue, cost.t_waves) + LAUNCH_US
    return cost


def model(cases) -> Dict[str, List[LaunchCost]]:
    steps, logs = record_steps(cases)
    return {name: [cost_of(e, logs) for e in events] for name, events in steps.items()}


def bandwidth_share(c: LaunchCost) -> float:
    """The launch's predicted bandwidth (launch cost left out) over the copy bandwidth."""
    return c.t_bytes / max(c.t_bytes, c.t_issue, c.t_waves) if c.bytes else 0.0


def goals(name: str, costs: List[LaunchCost]) -> List[str]:
    """Issue 13's goals, as the model predicts them."""
    kernels = [c for c in costs if c.warps]
    total = sum(c.predicted for c in costs)
    grids = [c for c in kernels if c.grid >= SMS]
    streaming = [c for c in grids if c.bytes > 1e6]
    low_bw = [f"`{c.launch}` {bandwidth_share(c):.0%}" for c in streaming
              if bandwidth_share(c) < 0.8]
    low_occ = [f"`{c.launch}` {c.occupancy:.0%}" for c in grids if c.occupancy < 0.25]
    div64 = [f"`{c.launch}`" for c in kernels if c.div64]

    def verdict(ok):
        return "met" if ok else "**missed**"
    lines = [f"Goals, {name} (predicted):", ""]
    if name == "user":
        floor = sum(c.bytes for c in costs) / BW * 1e6
        lines.append(f"- a step in at most {GOAL_US:.0f} us: {total:.1f} us, "
                     f"{verdict(total <= GOAL_US)}; the bytes alone take {floor:.1f} us and "
                     f"the launches {LAUNCH_US * len(costs):.1f} us")
        lines.append(f"- at most {GOAL_LAUNCHES} launches: {len(costs)}, "
                     f"{verdict(len(costs) <= GOAL_LAUNCHES)}")
    lines.append("- each streaming kernel (a grid moving more than 1 MB) at 80% of copy "
                 f"bandwidth or more: {verdict(not low_bw)}"
                 + (f" ({', '.join(low_bw)})" if low_bw else ""))
    lines.append(f"- no 64-bit division: {verdict(not div64)}"
                 + (f" ({', '.join(div64)})" if div64 else ""))
    lines.append("- 25% occupancy or more for every kernel whose grid fills the GPU: "
                 f"{verdict(not low_occ)}" + (f" ({', '.join(low_occ)})" if low_occ else ""))
    return lines + [""]


def _bound(c: LaunchCost) -> str:
    if not c.warps:
        return "bytes"
    return max((c.t_bytes, "bytes"), (c.t_issue, "issue"), (c.t_waves, "waves"))[1]


def table(name: str, costs: List[LaunchCost], before: Optional[List[dict]]) -> List[str]:
    total = sum(c.predicted for c in costs)
    total_bytes = sum(c.bytes for c in costs)
    lines = [f"### {name}: {len(costs)} launches, predicted {total:.1f} us "
             f"({total_bytes / 1e6:.1f} MB moved)", ""]
    head = ("| # | launch | grid | warps | regs | blocks/SM | occ. | SASS | instr./thread | "
            "64-bit div | MB read | MB written | bytes us | issue us | waves us | bound | "
            "of copy BW | predicted us |")
    lines += [head, "|" + "---:|---|" + "---:|" * 16]
    for i, c in enumerate(costs, 1):
        kernel = bool(c.warps)
        cells = [i, f"`{c.launch}`", c.grid if kernel else "", c.warps or "",
                 c.registers or "", c.blocks_per_sm or "", f"{c.occupancy:.0%}" if kernel else "",
                 c.sass or "", c.dynamic or "", c.div64 if kernel else "", f"{c.read / 1e6:.2f}",
                 f"{c.written / 1e6:.2f}", f"{c.t_bytes:.2f}",
                 f"{c.t_issue:.2f}" if kernel else "", f"{c.t_waves:.2f}" if kernel else "",
                 _bound(c), f"{bandwidth_share(c):.0%}", f"{c.predicted:.2f}"]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    lines.append("")
    lines += goals(name.split()[0], costs)
    if before:
        lines += before_after(costs, before)
    return lines


def before_after(costs: List[LaunchCost], before: List[dict]) -> List[str]:
    """Per kernel (summed over its launches): registers, SASS and predicted time, then and now."""
    def per_kernel(rows):
        out: Dict[str, dict] = {}
        for r in rows:
            k = r["launch"] if r["warps"] else r["launch"].split()[0] + " " + r["launch"].split()[1]
            e = out.setdefault(k, {"n": 0, "registers": r["registers"], "sass": r["sass"],
                                   "div64": r["div64"], "predicted": 0.0})
            e["n"] += 1
            e["predicted"] += r["predicted"]
        return out
    then, now = per_kernel(before), per_kernel([asdict(c) for c in costs])
    lines = ["| launch | launches before / after | registers before / after | "
             "SASS before / after | 64-bit div before / after | predicted us before / after |",
             "|---|---:|---:|---:|---:|---:|"]
    for k in list(dict.fromkeys([*then, *now])):
        a, b = then.get(k), now.get(k)

        def pair(field, fmt="{}", a=a, b=b):
            return " / ".join(fmt.format(x[field]) if x else "-" for x in (a, b))
        lines.append(f"| `{k}` | {pair('n')} | {pair('registers')} | {pair('sass')} | "
                     f"{pair('div64')} | {pair('predicted', '{:.2f}')} |")
    lines.append(f"| **step** | {sum(r['n'] for r in then.values())} / "
                 f"{sum(r['n'] for r in now.values())} | | | | "
                 f"{sum(r['predicted'] for r in then.values()):.1f} / "
                 f"{sum(r['predicted'] for r in now.values()):.1f} |")
    return lines + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", help="the markdown tables")
    parser.add_argument("--json", help="the per-launch figures")
    parser.add_argument("--before", help="a --json of an earlier version, set beside")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("costmodel.py compiles for sm_90: unset TRITON_INTERPRET")
    before = json.loads(Path(args.before).read_text()) if args.before else {}
    results = model(CASES)
    lines = []
    for name, costs in results.items():
        lines += table(f"{name} case {gpu_compile.SHAPES[name][:3]}", costs, before.get(name))
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {k: [asdict(c) for c in v] for k, v in results.items()}, indent=1))
    if args.write:
        Path(args.write).write_text(header(bool(before)) + text)


def header(before: bool) -> str:
    import triton
    lines = [
        "# Cost model of a training step on an H100: a prediction, not a measurement",
        "",
        f"Written by `bench/costmodel.py` (`make costmodel`; its docstring has the model) with "
        f"triton {triton.__version__} and torch {torch.__version__}, on a machine without a "
        "GPU: no GPU has run these kernels yet, and the GPU session (issue 18) is to set "
        "measured times beside these. Each launch's prediction is the largest of bytes / "
        "3.0 TB/s (an assumed H100 bandwidth, not a measurement), the busiest SM's "
        "instruction issue and its share of the bandwidth, plus "
        "2.5 us. It counts every byte as crossing device memory: an H100's 50 MB L2 may serve "
        "some re-reads (a resolution's frames, written and then read by its FFT, are 12.5 MB "
        "at the user case), so the measurement may come in under it.",
        "",
    ]
    if before:
        lines += ["*Before / after*: the kernels before issue 13 (commit 2a2860e, their figures "
                  "in `costmodel-h100-before.json`) and now, summed over each kernel's "
                  "launches.", ""]
    return "\n".join(textwrap.fill(line, 96) for line in lines) + "\n"


if __name__ == "__main__":
    main()
