"""Verified dispatch: the ``triton`` backend checked against the ``torch`` backend, once per
plan, before its results are trusted.

A *plan* is what a call's kernels are compiled and launched for: the function (the combined
loss or the STFT loss, default or per-example path), the shape, strides, dtype, device and
``requires_grad`` of every tensor argument, grad mode and autocast, the STFT settings, which
of the loss configuration's weights are zero, the options (``reduction``, whether ``lengths``
are given, per-resolution terms), ``fft_grouping``, whether ``kl_weight`` is a tensor (and a
number's sign), and whether the STFT term is a callable of the user's; not the values of the
tensors, nor of ``kl_weight`` or the weights (a schedule changes them every epoch or step).

The first eager call of a plan (``verified``'s wrapper):

1. runs ``triton`` on the call's own inputs (detached: the caller's graph is untouched), its
   values and, for every output, the gradient of its sum with respect to every input that
   requires grad;
2. runs ``torch`` on the same inputs in float64 (the oracle: equal to auraloss within 1e-10)
   and, for inputs below float64, in the inputs' own dtype (how far that dtype's rounding
   alone takes a correct implementation); a callable STFT term of the user's is replaced, in
   all three runs, by one deterministic stand-in: the user's code is the same on both
   backends, and it may not run in float64, or twice alike;
3. compares them within the contract's bounds (``core/contract.py``), on the device, and reads
   the verdict back in one host sync;
4. keeps the decision for the plan: ``triton`` where it passed, ``torch`` from then on where
   it raised (compiling or launching) or differed, with one WARNING naming the plan, what
   differed and by how much, and the versions of everything involved;
5. computes the caller's result with the backend decided.

Later calls of the plan only look the decision up: no sync, no extra work. While
``torch.compile`` traces (or under a fake-tensor mode) or a CUDA graph is being captured,
nothing can be checked, and shapes and numbers may be symbolic: the decisions made eagerly
for the same function, dtypes, devices, ranks, settings and options (any shapes, any weights)
are followed when there is at least one and every one passed; otherwise the call runs on
``torch`` (exact, slower), and a WARNING says so once, with the remedy: one eager call before
compiling or capturing.

``strict`` (``backend="triton"`` with ``verify=True``): the same check, but a plan that fails
it raises ``RuntimeError`` (every call of it), and nothing is replaced.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import math
import platform
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .core import contract
from .core.config import LossConfig
from .core.options import Options
from .core.outputs import compute_dtype
from .core.settings import MRSTFTSettings
from .core.tracing import tracing

logger = logging.getLogger("distill_fused")

# What the wrappers call the four functions, for the messages, and how many of their leading
# arguments are the signals (whose dtype the loss is computed in).
FUNCTIONS = {
    "combined_loss": "compute_combined_loss",
    "mrstft_loss": "MultiResolutionSTFTLoss",
    "combined_loss_per_example": "compute_combined_loss (per-example path)",
    "mrstft_loss_per_example": "MultiResolutionSTFTLoss (per-example path)",
}
SIGNALS = {"combined_loss": 4, "combined_loss_per_example": 4, "mrstft_loss": 2,
           "mrstft_loss_per_example": 2}
# torch < 2.5 has it under torch.cuda only.
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
INPUT_NAMES = {"combined_loss": ("recon", "target", "mu", "logvar", None, "kl_weight"),
               "combined_loss_per_example": ("recon", "target", "mu", "logvar", None,
                                             "kl_weight"),
               "mrstft_loss": ("input", "target"),
               "mrstft_loss_per_example": ("input", "target")}


@dataclass(frozen=True)
class Decision:
    """What verification decided for one plan: ``backend`` (``"triton"`` or ``"torch"``),
    ``plan`` (a description), ``reason`` (why, in words) and ``errors`` (each compared
    quantity's relative error and its tolerance; empty where the triton run raised)."""

    backend: str
    plan: str
    reason: str
    errors: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.backend == "triton"


# plan key -> (its traced key, the decision); guarded by _LOCK (a step's threads may race to
# a plan's first call: one checks, the others wait for its decision).
_DECISIONS: Dict[tuple, Tuple[tuple, Decision]] = {}
_LOCK = threading.Lock()
_WARNED: set = set()


def decisions() -> List[Decision]:
    """Every plan decided in this process so far, in the order they were first called."""
    return [decision for _, decision in _DECISIONS.values()]


def forget() -> None:
    """Forget every decision (the next call of each plan is verified again)."""
    with _LOCK:
        _DECISIONS.clear()
        _WARNED.clear()


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------

def _tensor_key(t: torch.Tensor, traced: bool) -> tuple:
    """A tensor's part of a plan; ``traced``: only what tracing knows as a constant whatever
    the shapes (symbolic under dynamic shapes): dtype, device, rank, ``requires_grad``."""
    facts = (str(t.dtype), str(t.device), t.dim(), t.requires_grad)
    return ("tensor", *facts) if traced else ("tensor", *facts, tuple(t.shape),
                                              tuple(t.stride()))


def _key_of(value, traced: bool = False) -> object:
    """The part of a plan that one argument contributes (see the module docstring)."""
    if isinstance(value, torch.Tensor):
        return _tensor_key(value, traced)
    if isinstance(value, MRSTFTSettings):
        return ("stft", value.signature)
    if isinstance(value, Options):
        lengths = None if value.lengths is None else _tensor_key(value.lengths, traced)
        return ("options", value.reduction, lengths, value.per_resolution_terms)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):  # kl_weight: whether it is positive
        return ("number",) if traced else ("number", value > 0)
    if isinstance(value, (torch.SymInt, torch.SymFloat)):  # a traced kl_weight
        return ("number",)
    if isinstance(value, LossConfig):  # the kernels read the weights as data
        if traced:  # (tracing may make them symbolic)
            return ("config",)
        rec = value.reconstruction
        return ("config", *(w != 0 for w in (value.stft.weight, rec.weight,
                                             rec.magnitude_weight, rec.if_weight,
                                             value.kl.free_bits)))
    return ("callable",)


def plan_key(function: str, args: Sequence, kwargs: Dict, traced: bool = False) -> tuple:
    return (function, torch.is_grad_enabled(), torch.is_autocast_enabled(),
            tuple(_key_of(a, traced) for a in args),
            tuple(sorted((k, _key_of(v, traced)) for k, v in kwargs.items())))


def describe_plan(function: str, args: Sequence, kwargs: Dict) -> str:
    """The plan in words: the call, its tensors and what else selects its kernels."""
    parts = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            parts.append(f"[{', '.join(map(str, value.shape))}] {str(value.dtype)[6:]}"
                         + ("" if value.is_contiguous() else f" strides {value.stride()}"))
        elif isinstance(value, MRSTFTSettings):
            sizes = "/".join(str(r.n_fft) for r in value.resolutions)
            extra = [] if value.plain else ["auraloss options"]
            parts.append(f"STFT sizes {sizes}" + "".join(f" ({e})" for e in extra))
        elif isinstance(value, Options):
            parts.append(f"reduction={value.reduction}"
                         + (", lengths" if value.lengths is not None else "")
                         + (", per-resolution terms" if value.per_resolution_terms else ""))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append("kl_weight > 0" if value > 0 else "kl_weight <= 0 (no KL)")
        elif _key_of(value) == ("callable",):
            parts.append(f"STFT term {type(value).__name__} (a callable, as given)")
    device = next((str(a.device) for a in args if isinstance(a, torch.Tensor)), "?")
    grad = "with gradients" if torch.is_grad_enabled() else "no grad"
    return f"{FUNCTIONS.get(function, function)} on {device} ({grad}): " + ", ".join(parts)


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------

def _outputs(result) -> Dict[str, torch.Tensor]:
    """A backend function's result as named tensors: the combined losses (and the guard's
    ``finite``), or the STFT loss (and its per-resolution terms)."""
    if isinstance(result, torch.Tensor):
        return {"loss": result}
    first, second = result
    if isinstance(first, dict):
        return {**first, "finite": second}
    return {"loss": first, **second}


def stand_in_stft_term(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What a callable STFT term of the user's is replaced with while a plan is checked:
    deterministic, differentiable, and computed alike in any dtype."""
    return (x - y).square().mean()


def _run(fn: Callable, args: Sequence, kwargs: Dict, dtype: Optional[torch.dtype]):
    """``fn`` on the tensor arguments detached (cast to ``dtype`` where given), as fresh
    leaves that require grad where the caller's did: ``(values, gradients)``, the gradients
    ``{(output, input position): d sum(output) / d input}`` (zeros where none flows)."""
    grad_mode = torch.is_grad_enabled()
    leaves = {}
    call_args = list(args)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            leaf = a.detach() if dtype is None else a.detach().to(dtype)
            if grad_mode and a.requires_grad:
                leaf.requires_grad_(True)
                leaves[i] = leaf
            call_args[i] = leaf
        elif _key_of(a) == ("callable",):
            call_args[i] = stand_in_stft_term
    outputs = _outputs(fn(*call_args, **kwargs))
    values = {k: v.detach() for k, v in outputs.items()}
    grads = {}
    if leaves:
        for name, value in outputs.items():
            if not value.requires_grad:
                continue
            got = torch.autograd.grad(value.sum(), list(leaves.values()), retain_graph=True,
                                      allow_unused=True)
            for i, g in zip(leaves, got):
                grads[(name, i)] = torch.zeros_like(leaves[i]) if g is None else g
    return values, grads


def _quantity(function: str, name: str, position: Optional[int] = None) -> str:
    if position is None:
        return name
    inputs = INPUT_NAMES.get(function, ())
    input_name = inputs[position] if position < len(inputs) else f"argument {position}"
    return f"d {name}/d {input_name}"


def _compare(function: str, dtype: torch.dtype, device: torch.device, triton_run,
             oracle_runs) -> Tuple[bool, Dict[str, Tuple[float, float]]]:
    """Whether the triton run (``_run``'s result) agrees with the torch backend's in float64
    (``oracle_runs[0]``) within the contract's bounds for inputs computed in ``dtype``,
    widened by the torch backend's own error in that dtype (``oracle_runs[1]``, ``None`` for
    float64), and each quantity's ``(relative error, tolerance)``: every output and gradient
    the oracle has (one the triton run lacks is an infinite error). One host sync."""
    (values, grads), (oracle_values, oracle_grads), own = triton_run, *oracle_runs
    own_values, own_grads = own if own is not None else ({}, {})
    names, errors, tolerances = [], [], []

    def add(name, got, oracle, own_value, tolerance):
        names.append(name)
        error = (torch.full((), math.inf, dtype=torch.float64, device=oracle.device)
                 if got is None else contract.relative_error(got, oracle))
        own_error = None if own_value is None else contract.relative_error(own_value, oracle)
        errors.append(error.to(device))
        tolerances.append(tolerance(dtype, own_error, oracle).to(device))

    for name, oracle in oracle_values.items():
        add(_quantity(function, name), values.get(name), oracle, own_values.get(name),
            contract.value_tolerance)
    for (name, position), oracle in oracle_grads.items():
        add(_quantity(function, name, position), grads.get((name, position)), oracle,
            own_grads.get((name, position)), contract.gradient_tolerance)
    verdict = read_back(torch.stack([torch.stack(errors), torch.stack(tolerances)]))
    table = {n: (e, t) for n, e, t in zip(names, *verdict)}
    return all(e <= t for e, t in table.values()), table


def read_back(t: torch.Tensor) -> List[List[float]]:
    """``t``'s values on the host: verification's one sync (allowed while a caller's
    ``torch.cuda.set_sync_debug_mode`` refuses others: it is the documented one)."""
    if t.device.type != "cuda":
        return t.detach().cpu().tolist()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        return t.detach().cpu().tolist()
    finally:
        torch.cuda.set_sync_debug_mode(mode)


# --------------------------------------------------------------------------------------------
# The wrappers
# --------------------------------------------------------------------------------------------

def _capturing(args: Sequence) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args) and \
        torch.cuda.is_current_stream_capturing()


def _traced_choice(traced_key: tuple) -> str:
    """While tracing or capturing: ``triton`` if at least one plan of ``traced_key`` (the
    same function, dtypes, devices, settings and options, any shapes) was decided eagerly and
    every one passed, else ``torch`` (said once). Called as a constant by Dynamo (marked so by
    ``verified``): a decision made later does not change a compiled graph, and makes it
    recompile nothing."""
    found = [d for key, d in _DECISIONS.values() if key == traced_key]
    if found and all(d.passed for d in found):
        return "triton"
    if traced_key not in _WARNED:
        _WARNED.add(traced_key)
        function, device = traced_key[0], _device_of(traced_key)
        why = ("its triton kernels were not verified for such a call yet" if not found else
               "its triton kernels failed the check for such a call")
        logger.warning(
            "distill_fused: %s on %s is traced (torch.compile) or captured (CUDA graph), and "
            "%s: it runs on the torch backend there (exact, slower). Call the loss once "
            "eagerly with the same dtypes and options before compiling or capturing, and "
            "the verified triton backend is used.", FUNCTIONS.get(function, function), device,
            why)
    return "torch"


def _device_of(key: tuple) -> str:
    for part in key[3]:
        if isinstance(part, tuple) and part and part[0] == "tensor":
            return part[2]
    return "?"


def verified(function: str, triton_fn: Callable, torch_fn: Callable, *,
             strict: bool = False) -> Callable:
    """``triton_fn`` verified against ``torch_fn`` once per plan (the module docstring);
    ``strict``: a failed plan raises instead of running on ``torch_fn``."""
    # Marked here, not where it is defined: the mark imports Dynamo (2.5 s), which a package
    # import must not pay for.
    torch.compiler.assume_constant_result(_traced_choice)

    def call(*args, **kwargs):
        if tracing() or _capturing(args):
            choice = _traced_choice(plan_key(function, args, kwargs, traced=True))
            if choice == "torch" and strict:
                raise RuntimeError(f"distill_fused: backend='triton' with verify=True: "
                                   f"{FUNCTIONS.get(function, function)} is traced or "
                                   "captured before a check of such a call passed eagerly")
            return (triton_fn if choice == "triton" else torch_fn)(*args, **kwargs)
        key = plan_key(function, args, kwargs)
        entry = _DECISIONS.get(key)
        if entry is None:
            with _LOCK:
                entry = _DECISIONS.get(key)
                if entry is None:
                    decision = _decide(function, args, kwargs, triton_fn, torch_fn)
                    entry = _DECISIONS[key] = (plan_key(function, args, kwargs, traced=True),
                                               decision)
        decision = entry[1]
        if decision.passed:
            return triton_fn(*args, **kwargs)
        if strict:
            raise RuntimeError(_strict_message(decision))
        if key not in _WARNED:
            _WARNED.add(key)
            logger.warning("distill_fused: %s. Plan: %s. On %s. The auto backend uses the "
                           "torch backend for this plan from now on: its results are exact, "
                           "but slower.", decision.reason, decision.plan, versions(args))
        return torch_fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"verified_{function}"
    return call


def _decide(function, args, kwargs, triton_fn, torch_fn) -> Decision:
    """The check of a plan's first call (the module docstring). A failure of the triton run
    decides ``torch``; running out of memory in the check decides nothing against triton (it
    is trusted unchecked, said once); any other error of the torch runs or of the comparison
    is raised: it is the call's (bad ``lengths`` on the device), or ours."""
    plan = describe_plan(function, args, kwargs)
    dtype = compute_dtype(*args[:SIGNALS[function]])
    try:
        triton_run = _run(triton_fn, args, kwargs, None)
    except OUT_OF_MEMORY:
        return _unchecked(plan, args)
    except Exception as exc:  # noqa: BLE001 (any failure to compile or launch)
        return Decision("torch", plan, f"the triton backend raised {type(exc).__name__}: "
                        f"{_first_line(exc)}")
    try:
        oracle_runs = (_run(torch_fn, args, kwargs, torch.float64),
                       None if dtype == torch.float64 else _run(torch_fn, args, kwargs, None))
    except OUT_OF_MEMORY:
        return _unchecked(plan, args)
    passed, errors = _compare(function, dtype, args[0].device, triton_run, oracle_runs)
    if passed:
        return Decision("triton", plan, "verified against the torch backend", errors)
    return Decision("torch", plan, "the triton backend's results differ from the torch "
                    "backend's: " + _worst(errors), errors)


def _unchecked(plan: str, args: Sequence) -> Decision:
    logger.warning("distill_fused: %s: not enough device memory to check the triton backend "
                   "against the torch backend; it computes the plan unchecked. On %s.", plan,
                   versions(args))
    return Decision("triton", plan, "not verified: out of memory during the check")


def _worst(errors: Dict[str, Tuple[float, float]], shown: int = 4) -> str:
    """The quantities past their tolerance, the furthest first (``shown`` of them)."""
    failed = sorted(((e / t if t > 0 else math.inf, name, e, t)
                     for name, (e, t) in errors.items() if not e <= t), reverse=True)
    text = "; ".join(f"{name}: relative error {e:.3g} > tolerance {t:.3g}"
                     for _, name, e, t in failed[:shown])
    return text + (f"; and {len(failed) - shown} more" if len(failed) > shown else "")


def _strict_message(decision: Decision) -> str:
    return (f"distill_fused: backend='triton' with verify=True: {decision.reason}. Plan: "
            f"{decision.plan}. (backend='auto' would use the torch backend for it.)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


# --------------------------------------------------------------------------------------------
# Versions, for the warning
# --------------------------------------------------------------------------------------------

def versions(args: Sequence = ()) -> str:
    """The GPU, its driver, and the versions of torch, Triton and this package, in words."""
    parts = []
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts.append(f"GPU {props.name} (sm_{props.major}{props.minor})")
        parts.append(f"driver {nvidia_driver_version()}")
        parts.append(f"CUDA {torch.version.cuda}")
    else:
        parts.append(f"{device.type if device is not None else 'cpu'} ({platform.machine()})")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    parts += [f"torch {torch.__version__}", f"triton {triton_version}",
              f"distill_fused {_package_version()}"]
    return ", ".join(parts)


def _package_version() -> str:
    try:
        return importlib.metadata.version("distill-fused")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def nvidia_driver_version() -> str:
    """The NVIDIA driver's version (NVML's), or ``"unknown"``."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return "unknown"
        buffer = ctypes.create_string_buffer(96)
        ok = nvml.nvmlSystemGetDriverVersion(buffer, ctypes.c_uint(96)) == 0
        nvml.nvmlShutdown()
        return buffer.value.decode() if ok else "unknown"
    except (OSError, AttributeError):
        return "unknown"


__all__ = ["Decision", "decisions", "forget", "verified", "versions", "plan_key",
           "describe_plan"]
