"""Check and time ``compute_combined_loss`` on this machine: each backend's values and gradients
against the float64 oracle, within the project's tolerances, and its forward+backward time.

The oracle is the ``reference`` backend (auraloss 0.4.0 and plain torch) run in float64. Errors
are relative: ``|v - v_oracle| / |v_oracle|`` for each of the six losses and
``||g - g_oracle|| / ||g_oracle||`` for the gradient of ``total_loss`` with respect to each of
``recon``, ``mu`` and ``logvar``. Tolerances:

- float64: 1e-10 on each loss, 1e-8 on each gradient;
- float32: 1e-5 on each loss; on each gradient max(1e-3, 2 x the float32 reference's own error
  on that gradient), since float32 rounding of small magnitudes inside the log-magnitude term
  costs the oracle itself up to some 1e-2.

``python -m distill_fused`` (``cli.py``) runs these checks and prints them.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .api.losses import compute_combined_loss, create_stft_loss
from .core import contract
from .core.config import LossConfig
from .synthetic import Batch, realistic_batch

logger = logging.getLogger("distill_fused.cli")

# The contract's bounds (core/contract.py), as names the checks read at each call.
LOSS_TOLERANCE = dict(contract.LOSS_TOLERANCE)
GRAD_TOLERANCE_FLOAT64 = contract.GRAD_TOLERANCE_FLOAT64
GRAD_FLOOR_FLOAT32 = contract.GRAD_FLOOR_FLOAT32
GRADIENT_OF = {"recon": 0, "mu": 2, "logvar": 3}  # the inputs that take a gradient, by position


@dataclass(frozen=True)
class Problem:
    """A realistic synthetic batch (``synthetic.realistic_batch``) and the call's arguments."""

    batch: int = 32
    height: int = 128
    width: int = 94
    latent: int = 128
    kl_weight: float = 0.01
    seed: int = 1234

    def describe(self) -> str:
        return (f"recon/target [{self.batch}, 2, {self.height}, {self.width}], "
                f"mu/logvar [{self.batch}, {self.latent}]")


@dataclass
class Outcome:
    """The six losses and the gradients of ``total_loss``, as float64 CPU tensors."""

    losses: Dict[str, torch.Tensor]
    grads: Dict[str, torch.Tensor]


@dataclass
class Row:
    """One backend in one dtype: errors against the oracle, tolerances, verdict and time."""

    backend: str
    dtype: str
    problem: Problem
    loss_errors: Dict[str, float]
    grad_errors: Dict[str, float]
    loss_tolerance: float
    grad_tolerances: Dict[str, float]
    median_ms: float
    range_ms: Tuple[float, float]  # the fastest and slowest timed step
    reps: int
    interpreted: bool = False
    speedup: Optional[float] = None  # the reference's median time in this dtype / this one's
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.passed = (all(e <= self.loss_tolerance for e in self.loss_errors.values())
                       and all(e <= self.grad_tolerances[k] for k, e in self.grad_errors.items()))

    @property
    def is_oracle(self) -> bool:
        """The reference in float64: what the other rows are compared with."""
        return self.backend == "reference" and self.dtype == "float64"

    def worst_loss(self) -> Tuple[str, float]:
        return max(self.loss_errors.items(), key=lambda item: _nan_last(item[1]))

    def worst_grad(self) -> Tuple[str, float, float]:
        """The gradient nearest its tolerance (or NaN): name, error, tolerance."""
        name = max(self.grad_errors,
                   key=lambda k: _nan_last(self.grad_errors[k] / self.grad_tolerances[k]))
        return name, self.grad_errors[name], self.grad_tolerances[name]


def _nan_last(value: float) -> float:
    """For ``max``: a NaN error is the worst."""
    return math.inf if math.isnan(value) else value


class Checker:
    """Runs ``compute_combined_loss`` as a training step does (an STFT loss made once by
    ``create_stft_loss``, ``target`` without gradient) for one problem on one device.

    Each dtype is judged against the oracle on the same inputs: the batch rounded to that
    dtype, then computed in float64 (on ``oracle_device``: the CPU for MPS, which has no
    float64)."""

    def __init__(self, problem: Problem, device: torch.device,
                 oracle_device: Optional[torch.device] = None) -> None:
        self.problem, self.device = problem, device
        self.oracle_device = oracle_device or device
        self.config = LossConfig()
        self.batch: Batch = realistic_batch(problem.batch, problem.height, problem.width,
                                            problem.latent, dtype=torch.float64,
                                            device="cpu", seed=problem.seed)
        self._oracles: Dict[torch.dtype, Outcome] = {}
        self._float32_reference: Optional[Outcome] = None

    def oracle(self, dtype: torch.dtype) -> Outcome:
        """The float64 reference on the batch rounded to ``dtype``."""
        if dtype not in self._oracles:
            self._oracles[dtype] = self._outcome("reference", torch.float64, self.oracle_device,
                                                 rounded_to=dtype)
        return self._oracles[dtype]

    def _leaves(self, dtype: torch.dtype, device: torch.device,
                rounded_to: Optional[torch.dtype] = None) -> List[torch.Tensor]:
        """Fresh leaves (never the batch itself, whose gradients would pile up call after call)
        holding the batch rounded to ``rounded_to`` (default: ``dtype``) and cast to ``dtype``.
        Rounded on the CPU: MPS has no float64."""
        rounded = [t.to(rounded_to or dtype) for t in self.batch]
        return [t.to(dtype).to(device).clone().requires_grad_(i in GRADIENT_OF.values())
                for i, t in enumerate(rounded)]

    def _step(self, backend: str, leaves: List[torch.Tensor],
              stft_fn: torch.nn.Module) -> Dict[str, torch.Tensor]:
        out = compute_combined_loss(*leaves, self.config, kl_weight=self.problem.kl_weight,
                                    _stft_loss_fn=stft_fn, backend=backend)
        out["total_loss"].backward()
        return out

    def _outcome(self, backend: str, dtype: torch.dtype, device: torch.device,
                 rounded_to: Optional[torch.dtype] = None) -> Outcome:
        leaves = self._leaves(dtype, device, rounded_to)
        out = self._step(backend, leaves, create_stft_loss(self.config, device))
        return Outcome({k: v.detach().cpu().double() for k, v in out.items()},
                       {k: leaves[i].grad.cpu().double() for k, i in GRADIENT_OF.items()})

    def _errors(self, outcome: Outcome,
                dtype: torch.dtype) -> Tuple[Dict[str, float], Dict[str, float]]:
        oracle = self.oracle(dtype)
        loss_errors = {k: _relative(v, oracle.losses[k]) for k, v in outcome.losses.items()}
        grad_errors = {k: _relative(g, oracle.grads[k]) for k, g in outcome.grads.items()}
        return loss_errors, grad_errors

    def grad_tolerances(self, dtype: torch.dtype) -> Dict[str, float]:
        if dtype == torch.float64:
            return {k: GRAD_TOLERANCE_FLOAT64 for k in GRADIENT_OF}
        if self._float32_reference is None:
            self._float32_reference = self._outcome("reference", torch.float32, self.device)
        own = self._errors(self._float32_reference, torch.float32)[1]
        return {k: max(GRAD_FLOOR_FLOAT32, 2 * own[k]) for k in GRADIENT_OF}

    def check(self, backend: str, dtype: torch.dtype, reps: int,
              interpreted: bool = False) -> Row:
        """Compare ``backend`` in ``dtype`` with the oracle, then time ``reps`` steps."""
        name = str(dtype).replace("torch.", "")
        logger.info("%s, %s: comparing with the float64 oracle", backend, name)
        outcome = self._outcome(backend, dtype, self.device)
        if backend == "reference" and dtype == torch.float32:
            self._float32_reference = outcome
        loss_errors, grad_errors = self._errors(outcome, dtype)
        tolerances = self.grad_tolerances(dtype)
        logger.info("%s, %s: timing %d step%s after one warm-up", backend, name, reps,
                    "s" if reps > 1 else "")
        times = self.step_times_ms(backend, dtype, reps)
        return Row(backend, name, self.problem, loss_errors, grad_errors, LOSS_TOLERANCE[dtype],
                   tolerances, statistics.median(times), (min(times), max(times)), reps,
                   interpreted)

    def step_times_ms(self, backend: str, dtype: torch.dtype, reps: int) -> List[float]:
        """Times of ``reps`` forward+backward steps after a warm-up step, in milliseconds: CUDA
        events on a GPU, the wall clock elsewhere."""
        leaves = self._leaves(dtype, self.device)
        stft_fn = create_stft_loss(self.config, self.device)

        def step() -> None:
            for leaf in leaves:
                leaf.grad = None
            self._step(backend, leaves, stft_fn)

        step()
        times = []
        for rep in range(reps):
            times.append(_timed(step, self.device))
            if times[-1] > 2000:  # a slow step (Triton's interpreter): say how far it is
                logger.info("%s: step %d of %d took %.1f s", backend, rep + 1, reps,
                            times[-1] / 1e3)
        return times


def _timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    synchronize = torch.mps.synchronize if device.type == "mps" else (lambda: None)
    synchronize()
    began = time.perf_counter()
    step()
    synchronize()
    return (time.perf_counter() - began) * 1e3


def _relative(value: torch.Tensor, oracle: torch.Tensor) -> float:
    """``||value - oracle|| / ||oracle||`` (for a scalar, ``|value - oracle| / |oracle|``)."""
    scale = float(oracle.norm())
    error = float((value - oracle).norm())
    return error / scale if scale > 0 else error


def add_speedups(rows: List[Row]) -> None:
    """Each row's speed-up over the ``reference`` row of its dtype and problem (none for
    Triton's interpreter, which is not run for speed)."""
    baseline = {(r.dtype, r.problem): r.median_ms for r in rows if r.backend == "reference"}
    for row in rows:
        reference_ms = None if row.interpreted else baseline.get((row.dtype, row.problem))
        row.speedup = reference_ms / row.median_ms if reference_ms else None
