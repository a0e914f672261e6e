"""``python -m distill_fused`` (or ``distill-fused``): is the loss right here, and how fast?

Runs ``compute_combined_loss`` forward and backward on a realistic synthetic batch with each
backend available on this machine, in float32 and float64, and prints for each one its largest
error against the float64 oracle (values and gradients), the tolerance, PASS or FAIL, and its
median time with the speed-up over ``reference``. ``selfcheck.py`` does the measuring.

Exit status: 0 when every check passes, 1 when one fails, 2 for an option that cannot work
here (a device or backend this machine lacks, a batch too short for the STFT loss): one line
on stderr, before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from typing import IO, Any, Dict, List, Optional, Sequence

import torch

from . import __version__, verification
from .api import environment
from .api.losses import compute_combined_loss
from .core.config import LossConfig
from .dispatch import NAMES, auto_choice, available_backends, select_backend
from .selfcheck import (
    GRAD_FLOOR_FLOAT32,
    GRAD_TOLERANCE_FLOAT64,
    LOSS_TOLERANCE,
    Checker,
    Problem,
    Row,
    add_speedups,
)
from .synthetic import realistic_batch

PROG = "distill-fused"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Triton's interpreter (numpy) is far too slow for the user's shape: it checks the kernels on
# this small batch instead, once.
INTERPRETED_PROBLEM = dict(batch=2, height=16, width=67, latent=8)

logger = logging.getLogger("distill_fused.cli")


def _sci(value: float) -> str:
    """1e-08 as 1e-8."""
    return f"{value:.0e}".replace("e-0", "e-")


EPILOG = f"""\
what the columns mean:
  loss error   largest relative error of the six losses against the oracle,
               |v - v_oracle| / |v_oracle|
  grad error   relative error ||g - g_oracle|| / ||g_oracle|| of the gradient of total_loss
               (for recon, mu and logvar) that comes nearest its tolerance; its input is named
  tolerance    what the error may reach: float64 {_sci(LOSS_TOLERANCE[torch.float64])} \
(losses) / {_sci(GRAD_TOLERANCE_FLOAT64)} (gradients); float32
               {_sci(LOSS_TOLERANCE[torch.float32])} (losses) / \
max({_sci(GRAD_FLOOR_FLOAT32)}, 2 x the float32 reference's own error) (gradients)
  check        PASS when every loss and every gradient is within its tolerance ("oracle":
               the reference in float64, which the others are compared with)
  median       median time of one forward+backward step, in milliseconds, after a warm-up
               step (CUDA events on a GPU, the wall clock elsewhere): a quick figure, as noisy
               as the machine is busy (the JSON has each row's fastest and slowest step);
               the benchmark (make bench) is the measurement
  speed-up     the reference's median time in the same dtype divided by this backend's
               (n/a for Triton's interpreter, which is not run for speed)

The oracle is the reference backend (auraloss 0.4.0 + plain torch, the computation this
package replaces) in float64, on the same inputs (the batch rounded to the row's dtype).
Under TRITON_INTERPRET=1 on a CPU the triton backend runs in Triton's interpreter (numpy: for
checking the kernels, not for speed); it is checked there on a small batch
{list(INTERPRETED_PROBLEM.values())} ([B, H, W, D]), beside the reference.

exit status: 0 all checks pass, 1 a check failed, 2 an option that cannot work here.
examples:
  {PROG}                                    every backend here, float32 and float64
  {PROG} --backend torch --dtype float32 --reps 20
  {PROG} --device cuda --json results.json  (on a GPU machine)
"""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
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
                        "than half the largest FFT size: at least 1025 with the default "
                        "config.")
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


class OptionError(Exception):
    """An option that cannot work here: one line on stderr, exit status 2, before any work."""


def _device(text: Optional[str]) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise OptionError(f"--device {text}: not a device (cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise OptionError(f"--device {text}: this torch ({torch.__version__}) is built "
                              "without CUDA; install a CUDA build of torch, or use --device cpu")
        if not torch.cuda.is_available():
            raise OptionError(f"--device {text}: no CUDA GPU is visible to torch here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {text}: there are {torch.cuda.device_count()} "
                              "CUDA devices here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {text}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"--device {text}: the loss runs on cpu, cuda or mps")
    return device


def _dtypes(names: Optional[List[str]], device: torch.device) -> List[torch.dtype]:
    if device.type == "mps":
        if names and "float64" in names:
            raise OptionError("--dtype float64: MPS has no float64")
        return [torch.float32]
    return [DTYPES[n] for n in dict.fromkeys(names or DTYPES)]


def _backends(names: Optional[List[str]], device: torch.device) -> List[str]:
    """The backends to check, in table order, the reference first."""
    chosen = []
    for name in names or available_backends(device):
        try:
            chosen.append(select_backend(device, name, source="--backend").name)
        except ValueError as exc:
            raise OptionError(f"--backend {name}: {exc}") from None
    return ["reference"] + [b for b in dict.fromkeys(chosen) if b != "reference"]


def _problem(args: argparse.Namespace) -> Problem:
    """The batch of the options, if the STFT loss can take it (its reflect padding needs more
    than half the largest FFT size of samples per flattened spectrogram)."""
    shortest = max(LossConfig().stft.fft_sizes) // 2 + 1
    if args.height * args.width < shortest:
        raise OptionError(f"--height {args.height} --width {args.width}: the STFT loss needs "
                          f"H*W >= {shortest} (half its largest FFT size, plus one), got "
                          f"{args.height * args.width}")
    return Problem(args.batch, args.height, args.width, args.latent)


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
    # cuda:N: Triton launches, and CUDA events record, on the current device.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
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


def auto_report(problem: Problem, device: torch.device) -> Dict[str, Any]:
    """What ``auto`` decides on this machine, and why: its pick for ``device`` tensors, and
    where it picks the verified triton backend, the verdict of the check of its first call
    on the problem's batch (float32, with gradients), as a training step's first call has it.
    """
    verify = environment.verify_choice(None)
    chosen, why = auto_choice(device, verify)
    report: Dict[str, Any] = {"backend": chosen.name, "why": why, "verified": None}
    if chosen.verified:
        before = len(verification.decisions())
        batch = realistic_batch(problem.batch, problem.height, problem.width, problem.latent,
                                device=device, seed=problem.seed)
        for i, t in enumerate(batch):
            t.requires_grad_(i != 1)
        out = compute_combined_loss(*batch, kl_weight=problem.kl_weight, backend="auto",
                                    verify=verify)
        out["total_loss"].backward()
        for decision in verification.decisions()[before:]:
            errors = decision.errors
            name = max(errors, key=lambda k: errors[k][0] / errors[k][1]) if errors else None
            report["verified"] = {
                "backend": decision.backend, "reason": decision.reason, "plan": decision.plan,
                "closest": None if name is None else {
                    "quantity": name, "error": errors[name][0], "tolerance": errors[name][1]}}
    return report


def auto_lines(report: Dict[str, Any], device: torch.device) -> List[str]:
    lines = [f"auto (compute_combined_loss's default) picks {report['backend']} for "
             f"{device.type} tensors here: {report['why']}"]
    verified = report["verified"]
    if verified:
        closest = verified["closest"]
        detail = (f"; the closest to its tolerance: {closest['quantity']}, "
                  f"{closest['error']:.1e} of {closest['tolerance']:.1e}" if closest else "")
        verdict = ("passed: auto computes it with triton" if verified["backend"] == "triton"
                   else "failed: auto computes it with the torch backend (exact, slower)")
        lines.append(f"auto's check of this batch's plan {verdict} ({verified['reason']}"
                     f"{detail})")
    return lines


def _settings(device: torch.device, backends: Sequence[str]) -> List[str]:
    """What the reader needs to weigh the table: the backends left out and why, the threads
    timing ran on, and the environment variables that change the loss."""
    lines = [f"timing on {torch.get_num_threads()} CPU threads"
             + (f" and {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")]
    if "triton" not in backends and _versions()["triton"] and device.type == "cpu":
        lines.append("triton is not checked: it runs CUDA tensors (on a CPU only in Triton's "
                     "interpreter: set TRITON_INTERPRET=1 and name --backend triton)")
    variables = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("DISTILL_")]
    if variables:
        lines.append("environment: " + ", ".join(variables))
    return lines


def render_table(rows: Sequence[Row], device: torch.device, settings: Sequence[str]) -> str:
    versions = _versions()
    lines = [f"{PROG} {__version__}: compute_combined_loss, forward + backward, on {device} "
             f"(torch {versions['torch']}, triton {versions['triton'] or 'not installed'})",
             *settings]
    header = (f"{'backend':<10} {'dtype':<8} {'loss error':>10} {'grad error (input)':>18} "
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
            check = "oracle" if r.is_oracle else "PASS" if r.passed else "FAIL"
            grad = f"{grad_error:.1e} ({grad_name})"
            lines.append(
                f"{r.backend:<10} {r.dtype:<8} {loss_error:>10.1e} {grad:>18} "
                f"{_sci(r.loss_tolerance):>10} / {grad_tolerance:<9.1e} {check:>6} "
                f"{r.median_ms:>8.2f} ms {speedup:>9}")
    checks = [r for r in rows if not r.is_oracle]
    failed = [f"{r.backend} {r.dtype}" for r in checks if not r.passed]
    lines += ["", f"{len(checks) - len(failed)} of {len(checks)} checks PASS"
              + (f"; FAIL: {', '.join(failed)}" if failed else
                 ": every backend equals the float64 oracle within its tolerance")
              + _oracle_rows(len(rows) - len(checks)),
              f"(what each column means: {PROG} --help; times are a quick median, the "
              "benchmark is make bench)"]
    return "\n".join(lines)


def _oracle_rows(count: int) -> str:
    """What the rows not counted as checks are."""
    if not count:
        return "."
    return (f" (the {'row' if count == 1 else f'{count} rows'} marked oracle "
            f"{'is' if count == 1 else 'are'} the oracle itself, not checked).")


def _finite_or_text(value: Any) -> Any:
    """JSON has no NaN or infinity: such an error is written as the string "nan" or "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_or_text(v) for k, v in value.items()}
    return value


def to_json(rows: Sequence[Row], device: torch.device, settings: Sequence[str],
            auto: Optional[Dict[str, Any]] = None) -> dict:
    return {
        **_versions(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "settings": list(settings), "auto": _finite_or_text(auto) if auto else None,
        "passed": all(r.passed for r in rows),
        "results": [_finite_or_text({
            "backend": r.backend, "dtype": r.dtype, "oracle": r.is_oracle,
            "interpreted": r.interpreted, "problem": vars(r.problem),
            "loss_errors": r.loss_errors, "loss_tolerance": r.loss_tolerance,
            "grad_errors": r.grad_errors, "grad_tolerances": r.grad_tolerances,
            "passed": r.passed, "median_ms": r.median_ms, "fastest_ms": r.range_ms[0],
            "slowest_ms": r.range_ms[1], "reps": r.reps, "speedup_vs_reference": r.speedup,
        }) for r in rows],
    }


def _json_output(path: Optional[str]) -> Optional[IO[str]]:
    if path is None or path == "-":
        return sys.stdout if path == "-" else None
    try:
        return open(os.fspath(path), "w")  # opened now: an unwritable path fails before the run
    except OSError as exc:
        raise OptionError(f"--json {path}: {exc.strerror}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    package_logger = logging.getLogger("distill_fused")
    level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if args.verbose else
                            logging.WARNING if args.quiet else logging.INFO)
    try:
        try:
            device = _device(args.device)
            dtypes = _dtypes(args.dtype, device)
            backends = _backends(args.backend, device)
            problem = _problem(args)
            json_output = _json_output(args.json)
        except OptionError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        settings = _settings(device, backends)
        rows = run_checks(problem, device, backends, dtypes, args.reps)
        auto = auto_report(problem, device)
        settings = auto_lines(auto, device) + settings
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)

    if json_output is not None:
        json_output.write(json.dumps(to_json(rows, device, settings, auto), indent=2) + "\n")
        if json_output is not sys.stdout:
            json_output.close()
    if args.json != "-":
        print(render_table(rows, device, settings))
        if args.json:
            print(f"results written to {args.json}")
    return 0 if all(r.passed for r in rows) else 1
