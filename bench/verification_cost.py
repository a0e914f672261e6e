"""What ``auto``'s verification costs at a plan's first call (docs/benchmarks.md).

Verification runs the triton backend once more and the torch backend twice (float64, and the
inputs' dtype), each forward with one backward per output (``distill_fused/verification.py``).
Measured here, on this machine:

1. ``interpreted``: CPU tensors under CUDA's device policy, so that ``auto`` picks the verified
   triton backend, run by Triton's interpreter, on a small batch: the first call of a plan
   (checked) against later calls (looked up), and against a first call with ``verify=False``.
2. ``torch-parts``: at the user's case, on the CPU, what the check adds beside a triton run
   (the part no GPU makes faster or slower but in proportion): the torch backend's forward and
   its six backwards in float64 and in float32, against one training step of the torch
   backend.

Usage: ``TRITON_INTERPRET=1 python bench/verification_cost.py [--write]`` (``--write``:
``bench/results/verification-cost-cpu.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from distill_fused import LossConfig, STFTLossConfig, compute_combined_loss, verification
from distill_fused.core.devices import emulated
from distill_fused.synthetic import realistic_batch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from harness import device_name  # noqa: E402


def _leaves(batch, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(i != 1) for i, t in enumerate(batch)]


def _step(batch, config, **kwargs):
    start = time.perf_counter()
    out = compute_combined_loss(*_leaves(batch), config, kl_weight=0.01, **kwargs)
    out["total_loss"].backward()
    return (time.perf_counter() - start) * 1e3


def interpreted(rounds: int) -> dict:
    """First calls with and without the check, and later calls, under the interpreter."""
    config = LossConfig(stft=STFTLossConfig(fft_sizes=(16, 32), hop_sizes=(4, 8),
                                            win_lengths=(16, 32)))
    shape = (2, 16, 67, 8)
    batch = realistic_batch(*shape, seed=0)
    times = {"first_checked": [], "first_unchecked": [], "later": []}
    with emulated("cpu", like="cuda"):
        _step(batch, config)  # the interpreter's own first-use costs, outside the figures
        for _ in range(rounds):
            verification.forget()
            times["first_unchecked"].append(_step(batch, config, verify=False))
            verification.forget()
            times["first_checked"].append(_step(batch, config))
            times["later"].append(_step(batch, config))
    verification.forget()
    medians = {k: round(statistics.median(v), 1) for k, v in times.items()}
    return {"batch": list(shape), "resolutions": [16, 32], "rounds": rounds,
            "median_ms": medians,
            "check_ms": round(medians["first_checked"] - medians["later"], 1),
            "check_over_a_call": round(medians["first_checked"] / medians["later"], 2)}


def torch_parts(rounds: int) -> dict:
    """The torch backend's share of a check at the user's case, on the CPU."""
    from distill_fused.backends import torch_backend
    from distill_fused.verification import _run

    config = LossConfig()
    batch = realistic_batch(32, 128, 94, 128, seed=0)
    from distill_fused.api.losses import _config_settings
    settings = _config_settings(config)
    args = (*_leaves(batch), config, 0.01, settings)
    kwargs = {"fft_grouping": "per_resolution"}
    figures = {}
    for name, dtype in (("float64", torch.float64), ("float32", None)):
        times = []
        for _ in range(rounds + 1):
            start = time.perf_counter()
            _run(torch_backend.combined_loss, args, kwargs, dtype)
            times.append((time.perf_counter() - start) * 1e3)
        figures[f"torch_{name}_with_6_backwards_ms"] = round(statistics.median(times[1:]), 1)
    steps = [_step(batch, config, backend="torch") for _ in range(rounds + 1)][1:]
    figures["torch_training_step_ms"] = round(statistics.median(steps), 1)
    figures["both_over_a_step"] = round(
        (figures["torch_float64_with_6_backwards_ms"]
         + figures["torch_float32_with_6_backwards_ms"]) / figures["torch_training_step_ms"], 2)
    return {"batch": [32, 2, 128, 94], "latent": 128, "rounds": rounds, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("run under TRITON_INTERPRET=1 (the triton backend on CPU tensors)")
    result = {"device": device_name(torch.device("cpu")), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(),
              "interpreted": interpreted(args.rounds), "torch_parts": torch_parts(args.rounds)}
    text = json.dumps(result, indent=2) + "\n"
    print(text)
    if args.write:
        (HERE / "results" / "verification-cost-cpu.json").write_text(text)


if __name__ == "__main__":
    main()
