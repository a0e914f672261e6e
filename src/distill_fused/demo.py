"""``python -m distill_fused.demo``: the combined loss on a realistic synthetic batch with every
backend available here, each one's agreement with the float64 auraloss oracle, and its speed.

Options: ``--batch 32 --height 128 --width 94 --latent 128 --reps 10 --device cpu|cuda``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .api.losses import compute_combined_loss, create_stft_loss
from .core.config import LossConfig
from .dispatch import available_backends
from .synthetic import realistic_batch


def _loss_and_grads(batch, backend, dtype, config, stft_fn, kl_weight):
    leaves = [t.detach().to(dtype).requires_grad_(i != 1) for i, t in enumerate(batch)]
    out = compute_combined_loss(*leaves, config, kl_weight=kl_weight, _stft_loss_fn=stft_fn,
                                backend=backend)
    out["total_loss"].backward()
    return out, [leaves[i].grad for i in (0, 2, 3)]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _median_ms(step, device, reps):
    step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _report(batch, backends, device, reps, config, stft_fn, kl_weight) -> None:
    """One table: each backend's agreement with the float64 oracle and its speed."""
    oracle, oracle_grads = _loss_and_grads(batch, "reference", torch.float64, config, stft_fn,
                                           kl_weight)
    print("oracle (reference, float64): " + ", ".join(
        f"{k}={float(v.detach()):.6f}" for k, v in oracle.items()))
    header = (f"{'backend':<10} {'dtype':<8} {'max loss rel err':>17} {'max grad rel err':>17} "
              f"{'fwd+bwd ms':>11} {'vs reference':>13}")
    print(header)
    print("-" * len(header))
    baseline = {}
    for dtype in (torch.float32, torch.float64):
        for backend in backends:
            out, grads = _loss_and_grads(batch, backend, dtype, config, stft_fn, kl_weight)
            loss_err = max(_rel(out[k], oracle[k]) for k in oracle)
            grad_err = max(_rel(g, g_ref) for g, g_ref in zip(grads, oracle_grads))
            leaves = [t.detach().to(dtype).requires_grad_(i != 1) for i, t in enumerate(batch)]

            def step(leaves=leaves, backend=backend):
                for leaf in leaves:
                    leaf.grad = None
                compute_combined_loss(*leaves, config, kl_weight=kl_weight,
                                      _stft_loss_fn=stft_fn,
                                      backend=backend)["total_loss"].backward()

            ms = _median_ms(step, device, reps)
            baseline.setdefault(dtype, ms if backend == "reference" else None)
            speedup = baseline[dtype] / ms if baseline[dtype] else float("nan")
            print(f"{backend:<10} {str(dtype).replace('torch.', ''):<8} {loss_err:>17.2e} "
                  f"{grad_err:>17.2e} {ms:>11.2f} {speedup:>12.2f}x")
    print()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=94)
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    config = LossConfig()
    kl_weight = 0.01
    stft_fn = create_stft_loss(config, device)
    backends = available_backends(device)
    interpreted = device.type == "cpu" and "triton" in backends
    batch = realistic_batch(args.batch, args.height, args.width, args.latent,
                            dtype=torch.float64, device=device, seed=1234)
    print(f"distill_fused demo on {device} (torch {torch.__version__}): realistic batch "
          f"recon/target [{args.batch}, 2, {args.height}, {args.width}], "
          f"mu/logvar [{args.batch}, {args.latent}]")
    _report(batch, [b for b in backends if not (interpreted and b == "triton")], device,
            args.reps, config, stft_fn, kl_weight)
    if interpreted:
        small = realistic_batch(2, 16, 67, 8, dtype=torch.float64, device=device, seed=1234)
        print("triton on CPU runs under TRITON_INTERPRET=1 (numpy, for checking, not speed): "
              "a small batch recon/target [2, 2, 16, 67], mu/logvar [2, 8]")
        _report(small, ["reference", "triton"], device, 1, config, stft_fn, kl_weight)
    print("Tolerances (spec): float64 <= 1e-10 on losses, <= 1e-8 on gradients; float32 <= 1e-5 "
          "on losses, gradients no worse than max(1e-3, 2 x the float32 oracle's own error).")


if __name__ == "__main__":
    main()
