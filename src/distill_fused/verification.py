"""Verified dispatch: the ``triton`` backend checked against the ``torch`` backend, once per
plan, before its results are trusted.

A *plan* is what a call's kernels are compiled and launched for: the function (the combined
loss or the STFT loss, default or per-example path), the shape, strides, dtype, device and
``requires_grad`` of every tensor argument, grad mode, the STFT settings and loss
configuration, the options (``reduction``, whether ``lengths`` are given, per-resolution
terms), ``fft_grouping``, and whether ``kl_weight`` is a tensor and is positive; not the values
of the tensors, nor of ``kl_weight`` (a warm-up gives a new one every epoch).

The first eager call of a plan (``verified``'s wrapper):

1. runs ``triton`` on the call's own inputs (detached: the caller's graph is untouched), its
   values and, for every output, the gradient of its sum with respect to every input that
   requires grad;
2. runs ``torch`` on the same inputs in float64 (the oracle: equal to auraloss within 1e-10)
   and, for inputs below float64, in the inputs' own dtype (how far that dtype's rounding
   alone takes a correct implementation);
3. compares them within the contract's bounds (``core/contract.py``), on the device, and reads
   the verdict back in one host sync;
4. keeps the decision for the plan: ``triton`` where it passed, ``torch`` from then on where
   it raised (compiling or launching) or differed, with one WARNING naming the plan, what
   differed and by how much, and the versions of everything involved;
5. computes the caller's result with the backend decided.

Later calls of the plan only look the decision up: no sync, no extra work. While
``torch.compile`` traces (or under a fake-tensor mode) or a CUDA graph is being captured,
nothing can be checked: a plan decided before is followed; an undecided one runs on ``torch``
(exact, slower), and a WARNING says so once, with the remedy: one eager call of the same plan
before compiling or capturing.

``strict`` (``backend="triton"`` with ``verify=True``): the same check, but a plan that fails
it raises ``RuntimeError`` (every call of it), and nothing is replaced.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import math
import platform
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .core import contract
from .core.options import Options
from .core.settings import MRSTFTSettings
from .core.tracing import tracing

logger = logging.getLogger("distill_fused")

# What the wrappers call the four functions, for the messages.
FUNCTIONS = {
    "combined_loss": "compute_combined_loss",
    "mrstft_loss": "MultiResolutionSTFTLoss",
    "combined_loss_per_example": "compute_combined_loss (per-example path)",
    "mrstft_loss_per_example": "MultiResolutionSTFTLoss (per-example path)",
}


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


_DECISIONS: Dict[tuple, Decision] = {}
_UNDECIDED_WARNED: set = set()


def decisions() -> List[Decision]:
    """Every plan decided in this process so far, in the order they were first called."""
    return list(_DECISIONS.values())


def forget() -> None:
    """Forget every decision (the next call of each plan is verified again)."""
    _DECISIONS.clear()
    _UNDECIDED_WARNED.clear()


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------

def _tensor_key(t: torch.Tensor) -> tuple:
    return ("tensor", tuple(t.shape), tuple(t.stride()), str(t.dtype), str(t.device),
            t.requires_grad)


def _settings_key(s: MRSTFTSettings) -> tuple:
    return ("stft", tuple((r.n_fft, r.hop, r.win_length) for r in s.resolutions), s.w_sc,
            s.w_log_mag, s.w_lin_mag, s.eps, s.resolution_weights, s.w_phs, s.mag_distance,
            s.scale, s.sample_rate, s.n_bins, s.perceptual_weighting, s.scale_invariance)


def _key_of(value) -> object:
    """The part of a plan that one argument contributes (see the module docstring)."""
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    if isinstance(value, MRSTFTSettings):
        return _settings_key(value)
    if isinstance(value, Options):
        lengths = None if value.lengths is None else _tensor_key(value.lengths)
        return ("options", value.reduction, lengths, value.per_resolution_terms)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):  # kl_weight: only whether it is positive
        return ("number", value > 0)
    if hasattr(value, "reconstruction") and hasattr(value, "kl"):  # a LossConfig
        rec = value.reconstruction
        return ("config", value.stft.weight, rec.weight, rec.magnitude_weight, rec.if_weight,
                value.kl.free_bits)
    return ("callable", type(value).__qualname__)


def plan_key(function: str, args: Sequence, kwargs: Dict) -> tuple:
    return (function, torch.is_grad_enabled(), tuple(_key_of(a) for a in args),
            tuple(sorted((k, _key_of(v)) for k, v in kwargs.items())))


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


_INPUT_NAMES = {"combined_loss": ("recon", "target", "mu", "logvar", None, "kl_weight"),
                "combined_loss_per_example": ("recon", "target", "mu", "logvar", None,
                                              "kl_weight"),
                "mrstft_loss": ("input", "target"),
                "mrstft_loss_per_example": ("input", "target")}


def _quantity(function: str, name: str, position: Optional[int] = None) -> str:
    if position is None:
        return name
    inputs = _INPUT_NAMES.get(function, ())
    input_name = inputs[position] if position < len(inputs) else f"argument {position}"
    return f"d {name}/d {input_name}"


def _compare(function: str, args: Sequence, kwargs: Dict, triton_run, oracle_runs
             ) -> Tuple[bool, Dict[str, Tuple[float, float]]]:
    """Whether the triton run (``_run``'s result) agrees with the torch backend's in float64
    (``oracle_runs[0]``) within the contract's bounds, widened by the torch backend's own error
    in the inputs' dtype (``oracle_runs[1]``, ``None`` for float64), and each quantity's
    ``(relative error, tolerance)``. One host sync."""
    dtype = contract.compute_dtype_of(args)
    (values, grads), (oracle_values, oracle_grads), own = triton_run, *oracle_runs
    own_values, own_grads = own if own is not None else (None, None)
    names, errors, tolerances = [], [], []

    def add(name, got, oracle, own_value, tolerance):
        names.append(name)
        errors.append(contract.relative_error(got, oracle))
        own_error = None if own_value is None else contract.relative_error(own_value, oracle)
        tolerances.append(tolerance(dtype, own_error, oracle))

    for name, value in values.items():
        add(_quantity(function, name), value, oracle_values[name],
            None if own_values is None else own_values[name], contract.value_tolerance)
    for (name, position), grad in grads.items():
        add(_quantity(function, name, position), grad, oracle_grads[(name, position)],
            None if own_grads is None else own_grads[(name, position)],
            contract.gradient_tolerance)
    verdict = read_back(torch.stack([torch.stack(errors), torch.stack(tolerances)]))
    table = {n: (e, t) for n, e, t in zip(names, *verdict)}
    return all(e <= t for e, t in table.values()), table


def read_back(t: torch.Tensor) -> List[List[float]]:
    """``t``'s values on the host: verification's one sync."""
    return t.detach().cpu().tolist()


# --------------------------------------------------------------------------------------------
# The wrappers
# --------------------------------------------------------------------------------------------

def _capturing(args: Sequence) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args) and \
        torch.cuda.is_current_stream_capturing()


@torch.compiler.assume_constant_result
def _traced_choice(key: tuple, description: str) -> str:
    """While tracing or capturing: the plan's decision, else ``torch`` (said once). Called
    as a constant by Dynamo: a decision made later does not change a compiled graph, and
    makes it recompile nothing."""
    decision = _DECISIONS.get(key)
    if decision is not None:
        return decision.backend
    if key not in _UNDECIDED_WARNED:
        _UNDECIDED_WARNED.add(key)
        logger.warning(
            "distill_fused: %s is traced (torch.compile) or captured (CUDA graph) before its "
            "triton kernels were verified; it runs on the torch backend there (exact, "
            "slower). Call the loss once eagerly with the same shapes before compiling or "
            "capturing, and the verified triton backend is used.", description)
    return "torch"


def verified(function: str, triton_fn: Callable, torch_fn: Callable, *,
             strict: bool = False) -> Callable:
    """``triton_fn`` verified against ``torch_fn`` once per plan (the module docstring);
    ``strict``: a failed plan raises instead of running on ``torch_fn``."""

    def call(*args, **kwargs):
        key = plan_key(function, args, kwargs)
        if tracing() or _capturing(args):
            choice = _traced_choice(key, describe_plan(function, args, kwargs))
            if choice == "torch" and strict:
                raise RuntimeError(_strict_message(
                    _DECISIONS.get(key) or Decision("torch", describe_plan(
                        function, args, kwargs), "not verified before tracing or capture")))
            return (triton_fn if choice == "triton" else torch_fn)(*args, **kwargs)
        decision = _DECISIONS.get(key)
        if decision is None:
            decision = _decide(function, key, args, kwargs, triton_fn, torch_fn, strict)
        if decision.passed:
            return triton_fn(*args, **kwargs)
        if strict:
            raise RuntimeError(_strict_message(decision))
        return torch_fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"verified_{function}"
    return call


def _decide(function, key, args, kwargs, triton_fn, torch_fn, strict) -> Decision:
    plan = describe_plan(function, args, kwargs)
    try:
        triton_run = _run(triton_fn, args, kwargs, None)
    except Exception as exc:  # noqa: BLE001 (any failure to compile or launch)
        decision = Decision("torch", plan, f"the triton backend raised {type(exc).__name__}: "
                            f"{_first_line(exc)}")
    else:
        try:
            oracle_runs = (_run(torch_fn, args, kwargs, torch.float64),
                           None if contract.compute_dtype_of(args) == torch.float64
                           else _run(torch_fn, args, kwargs, None))
            passed, errors = _compare(function, args, kwargs, triton_run, oracle_runs)
        except Exception as exc:  # noqa: BLE001 (the check itself could not be made)
            decision = Decision("torch", plan, "the triton backend could not be verified: the "
                                f"torch backend's check raised {type(exc).__name__}: "
                                f"{_first_line(exc)}")
        else:
            if passed:
                decision = Decision("triton", plan, "verified against the torch backend",
                                    errors)
            else:
                decision = Decision("torch", plan, "the triton backend's results differ from "
                                    "the torch backend's: " + _worst(errors), errors)
    _DECISIONS[key] = decision
    if not decision.passed and not strict:
        logger.warning("distill_fused: %s. Plan: %s. On %s. The auto backend uses the torch "
                       "backend for this plan from now on: its results are exact, but slower.",
                       decision.reason, plan, versions(args))
    return decision


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
