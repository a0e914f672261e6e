"""``python -m distill_fused`` (or ``distill-fused``): is the loss right here, and how fast?

Runs ``compute_combined_loss`` forward and backward on a realistic synthetic batch with each
backend available on this machine, in float32 and float64, and prints for each one its largest
error against the float64 oracle (values and gradients), the tolerance, PASS or FAIL, and its
median time with the speed-up over ``reference``. ``selfcheck.py`` does the measuring.

Exit status: 0 when every check passes, 1 when one fails, 2 for an option that cannot be
served here (a device or backend this machine lacks; one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from . import __version__
from .dispatch import NAMES, available_backends, select_backend
from .selfcheck import Checker, Problem, Row, add_speedups

PROG = "distill-fused"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Triton's interpreter (numpy) takes over a minute a step at the user's shape: it checks the
# kernels on this small batch instead, once.
INTERPRETED_PROBLEM = dict(batch=2, height=16, width=67, latent=8)

logger = logging.getLogger("distill_fused.cli")

EPILOG = f"""\
what the columns mean:
  loss error   largest relative error of the six losses against the oracle,
               |v - v_oracle| / |v_oracle|
  grad error   relative error ||g - g_oracle|| / ||g_oracle|| of the gradient of total_loss
               (for recon, mu and logvar) that comes nearest its tolerance; its input is named
  tolerance    what the error may reach: float64 1e-10 (losses) / 1e-8 (gradients); float32
               1e-5 (losses) / max(1e-3, 2 x the float32 reference's own error) (gradients)
  check        PASS when every loss and every gradient is within its tolerance ("oracle":
               the reference in float64, which the others are compared with)
  median       median time of one forward+backward step, in milliseconds, after a warm-up
               step (CUDA events on a GPU, the wall clock elsewhere)
  speed-up     the reference's median time in the same dtype divided by this backend's
               (n/a for Triton's interpreter, which is not run for speed)

The oracle is the reference backend (auraloss 0.4.0 + plain torch, the computation this
package replaces) in float64. Under TRITON_INTERPRET=1 on a CPU the triton backend runs in
Triton's interpreter (numpy: for checking the kernels, not for speed); it is checked there on
a small batch {list(INTERPRETED_PROBLEM.values())} ([B, H, W, D]), beside the reference.

exit status: 0 all checks pass, 1 a check failed, 2 an option this machine cannot serve.
examples:
  {PROG}                                    every backend here, float32 and float64
  {PROG} --backend torch --dtype float32 --reps 20
  {PROG} --device cuda --json results.json  (on a GPU machine)
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Check distill_fused's combined loss against the float64 auraloss oracle\n"
                    "(values and gradients) and time it, for every backend available here, on\n"
                    "a realistic synthetic batch (log-mel-like magnitudes, IF in [-1, 1]).")
    parser.add_argument("--backend", action="append", choices=NAMES, metavar="NAME",
                        help="a backend to check: " + ", ".join(NAMES) + " (auto: the one "
                        "compute_combined_loss picks for this device). Repeat for several. "
                        "Default: every backend available here. The reference is always run: "
                        "it is the baseline of the speed-up.")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), metavar="DTYPE",
                        help="input dtype: float32 or float64; repeat for both. Default: both "
                        "(float32 only on MPS, which has no float64).")
    parser.add_argument("--device", default=None,
                        help="where the tensors live: cpu, cuda, cuda:N or mps. Default: cuda "
                        "when a GPU is visible, else cpu.")
    parser.add_argument("--batch", type=_positive, default=32, metavar="B",
                        help="batch size B (default 32)")
    parser.add_argument("--height", type=_positive, default=128, metavar="H",
                        help="spectrogram height H, in mel bins (default 128)")
    parser.add_argument("--width", type=_positive, default=94, metavar="W",
                        help="spectrogram width W, in frames (default 94). H*W must be more "
                        "than half the largest FFT size (1024 by default).")
    parser.add_argument("--latent", type=_positive, default=128, metavar="D",
                        help="latent size D of mu and logvar (default 128)")
    parser.add_argument("--reps", type=_positive, default=10,
                        help="timed steps per backend and dtype; the median is reported "
                        "(default 10)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results as JSON to PATH ('-': to stdout, instead "
                        "of the table)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress messages on stderr")
    parser.add_argument("--verbose", action="store_true",
                        help="also the package's debug messages (e.g. why auto chose its "
                        "backend)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


class Unavailable(Exception):
    """An option this machine cannot serve: one line on stderr, exit status 2."""


def _device(text: Optional[str]) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise Unavailable(f"--device {text}: not a device (cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise Unavailable(f"--device {text}: this torch ({torch.__version__}) is built "
                              "without CUDA; install a CUDA build of torch, or use --device cpu")
        if not torch.cuda.is_available():
            raise Unavailable(f"--device {text}: no CUDA GPU is visible to torch here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise Unavailable(f"--device {text}: there are {torch.cuda.device_count()} "
                              "CUDA devices here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise Unavailable(f"--device {text}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise Unavailable(f"--device {text}: the loss runs on cpu, cuda or mps")
    return device


def _dtypes(names: Optional[List[str]], device: torch.device) -> List[torch.dtype]:
    if device.type == "mps":
        if names and "float64" in names:
            raise Unavailable("--dtype float64: MPS has no float64")
        return [torch.float32]
    return [DTYPES[n] for n in dict.fromkeys(names or DTYPES)]


def _backends(names: Optional[List[str]], device: torch.device) -> List[str]:
    """The backends to check, in table order, the reference first."""
    here = available_backends(device)
    chosen = []
    for name in names or here:
        try:
            resolved = select_backend(device, name, source="--backend").name
        except ValueError as exc:
            raise Unavailable(f"--backend {name}: {exc}") from None
        chosen.append(resolved)
    return ["reference"] + [b for b in dict.fromkeys(chosen) if b != "reference"]


def _interpreted(backend: str, device: torch.device) -> bool:
    return backend == "triton" and device.type == "cpu"


def run_checks(problem: Problem, device: torch.device, backends: Sequence[str],
               dtypes: Sequence[torch.dtype], reps: int) -> List[Row]:
    """Every backend in every dtype (interpreted Triton on its small batch), with speed-ups."""
    oracle_device = torch.device("cpu") if device.type == "mps" else device
    groups = {problem: [b for b in backends if not _interpreted(b, device)]}
    if any(_interpreted(b, device) for b in backends):
        small = Problem(**INTERPRETED_PROBLEM, kl_weight=problem.kl_weight, seed=problem.seed)
        groups.setdefault(small, ["reference"]).append("triton")
    rows = []
    for group_problem, group_backends in groups.items():
        logger.info("computing the float64 oracle on %s", group_problem.describe())
        checker = Checker(group_problem, device, oracle_device)
        for dtype in dtypes:
            for backend in group_backends:
                interpreted = _interpreted(backend, device)
                rows.append(checker.check(backend, dtype, 1 if interpreted else reps,
                                          interpreted))
    add_speedups(rows)
    return rows


def _versions() -> Dict[str, Optional[str]]:
    try:
        import triton
        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    return {"distill_fused": __version__, "torch": torch.__version__, "triton": triton_version}


def render_table(rows: Sequence[Row], device: torch.device) -> str:
    versions = _versions()
    lines = [f"{PROG} {__version__}: compute_combined_loss, forward + backward, on {device} "
             f"(torch {versions['torch']}, triton {versions['triton'] or 'not installed'})"]
    header = (f"{'backend':<10} {'dtype':<8} {'loss error':>10} {'grad error':>17} "
              f"{'tolerance (loss/grad)':>22} {'check':>6} {'median':>11} {'speed-up':>9}")
    for problem in dict.fromkeys(r.problem for r in rows):
        group = [r for r in rows if r.problem == problem]
        note = (" (triton: Triton's interpreter, once: checking, not speed)"
                if any(r.interpreted for r in group) else "")
        lines += ["", f"realistic synthetic batch: {problem.describe()}, kl_weight "
                  f"{problem.kl_weight}, seed {problem.seed}{note}", header, "-" * len(header)]
        for r in group:
            _, loss_error = r.worst_loss()
            grad_name, grad_error, grad_tolerance = r.worst_grad()
            speedup = f"{r.speedup:.2f}x" if r.speedup else "n/a"
            is_oracle = r.backend == "reference" and r.dtype == "float64"
            check = "oracle" if is_oracle else "PASS" if r.passed else "FAIL"
            grad = f"{grad_error:.1e} ({grad_name})"
            lines.append(
                f"{r.backend:<10} {r.dtype:<8} {loss_error:>10.1e} {grad:>17} "
                f"{r.loss_tolerance:>10.0e} / {grad_tolerance:<9.1e} {check:>6} "
                f"{r.median_ms:>8.2f} ms {speedup:>9}")
    failed = [f"{r.backend} {r.dtype}" for r in rows if not r.passed]
    lines += ["", f"{len(rows) - len(failed)} of {len(rows)} checks PASS"
              + (f"; FAIL: {', '.join(failed)}" if failed else
                 ": every backend equals the float64 oracle within its tolerance."),
              f"(columns: {PROG} --help)"]
    return "\n".join(lines)


def to_json(rows: Sequence[Row], device: torch.device) -> dict:
    return {
        **_versions(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "passed": all(r.passed for r in rows),
        "results": [{
            "backend": r.backend, "dtype": r.dtype, "interpreted": r.interpreted,
            "problem": vars(r.problem), "loss_errors": r.loss_errors,
            "loss_tolerance": r.loss_tolerance, "grad_errors": r.grad_errors,
            "grad_tolerances": r.grad_tolerances, "passed": r.passed,
            "median_ms": r.median_ms, "reps": r.reps, "speedup_vs_reference": r.speedup,
        } for r in rows],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    package_logger = logging.getLogger("distill_fused")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if args.verbose else
                            logging.WARNING if args.quiet else logging.INFO)
    try:
        device = _device(args.device)
        dtypes = _dtypes(args.dtype, device)
        backends = _backends(args.backend, device)
        problem = Problem(args.batch, args.height, args.width, args.latent)
        rows = run_checks(problem, device, backends, dtypes, args.reps)
    except Unavailable as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # the loss's own checks, e.g. a batch too short
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        package_logger.removeHandler(handler)

    if args.json:
        text = json.dumps(to_json(rows, device), indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(os.fspath(args.json), "w") as f:
                f.write(text + "\n")
    if args.json != "-":
        print(render_table(rows, device))
        if args.json:
            print(f"results written to {args.json}")
    return 0 if all(r.passed for r in rows) else 1
