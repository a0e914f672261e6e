"""Runs the stand-in application's own epoch functions, as its ``train`` does, and saves what
they saw: ``python run_steps.py OUT.pt RUN [RUN ...]`` with ``RUN = ROUTE:DTYPE``.

``ROUTE`` is ``host`` (the application as it is on ``sys.path``), ``patch`` (after
``distill_fused.patch_distill(nonfinite="warn")``, which keeps the application's warning) or
``unpatch`` (after ``distill_fused.unpatch_distill()``);
runs go in the order given, in this one process. Each run trains one epoch of four batches
(the third has a NaN in its target's IF channel, so the loss is NaN there and the loop skips
the step: three optimizer steps), then validates one batch under ``torch.no_grad()``.

Saved per run: the step metrics the loop emitted, its epoch averages, the validation results,
the parameter update, the warnings logged, and where the loss functions and packages came
from.
"""

from __future__ import annotations

import logging
import sys

import torch

BATCH, HEIGHT, WIDTH, LATENT = 3, 16, 67, 8
# Adam's first steps move each parameter by about lr * sign(gradient), so float32 rounding in
# near-zero gradients grows into a different trajectory within three steps at the presets'
# rates (the float32 parameter update was 21 % off the float64 one at 5e-4, 58 % at 1e-3). At
# 1e-5 it is 1.3 % off, which keeps the float32 comparison of the test meaningful.
LEARNING_RATE = 1e-5
LOSS_FUNCTIONS = ("compute_combined_loss", "create_stft_loss", "vae_loss", "get_kl_weight",
                  "compute_kl_divergence")


def spectrograms(dtype, seed, count):
    """``count`` batches ``[B, 2, H, W]``: a non-negative log-magnitude-like channel and an IF
    channel in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        mag = torch.log1p(4 * torch.rand(BATCH, HEIGHT, WIDTH, generator=g, dtype=torch.float64)
                          ** 2)
        inst_freq = 2 * torch.rand(BATCH, HEIGHT, WIDTH, generator=g, dtype=torch.float64) - 1
        out.append(torch.stack([mag, inst_freq], dim=1).to(dtype))
    return out


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def provenance():
    import distill
    import distill.models
    import distill.models.losses as host_losses
    import distill.training.config
    import distill.validation

    return {
        "distill": distill.__file__,
        "distill.validation": distill.validation.__file__,
        "has_get_adaptive_config": hasattr(distill.training.config, "get_adaptive_config"),
        "losses": {name: getattr(host_losses, name).__module__ for name in LOSS_FUNCTIONS},
        "models": {name: getattr(distill.models, name).__module__ for name in LOSS_FUNCTIONS},
        "distill_fused": getattr(sys.modules.get("distill_fused"), "__file__", None),
    }


def run(dtype):
    from distill.models import TinyVAE
    from distill.models.losses import create_stft_loss, get_kl_weight
    from distill.training import get_adaptive_config, train_epoch, validate_epoch

    device = torch.device("cpu")
    config = get_adaptive_config(file_count=120)
    config.learning_rate = LEARNING_RATE
    torch.manual_seed(0)
    model = TinyVAE(HEIGHT, WIDTH, LATENT).to(dtype)
    start = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.regularization.weight_decay)
    stft_loss_fn = create_stft_loss(config.loss, device)
    kl_weight = get_kl_weight(5, config.max_epochs, config.loss.kl.warmup_fraction,
                              kl_weight_max=config.loss.kl.weight_max)
    train_batches = spectrograms(dtype, seed=1, count=4)
    train_batches[2][1, 1, 3, 5] = float("nan")
    val_batches = spectrograms(dtype, seed=2, count=1)

    steps = []
    warnings = Warnings()
    logging.getLogger().addHandler(warnings)
    try:
        train = train_epoch(model, train_batches, optimizer, kl_weight, device,
                            config.regularization.gradient_clip_norm, loss_config=config.loss,
                            stft_loss_fn=stft_loss_fn, epoch=1, callback=steps.append)
        val = validate_epoch(model, val_batches, kl_weight, device, loss_config=config.loss,
                             stft_loss_fn=stft_loss_fn)
    finally:
        logging.getLogger().removeHandler(warnings)
    end = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    return {
        "steps": [vars(s) for s in steps],
        "train": train,
        "val": val,
        "update": end - start,
        "warnings": warnings.messages,
        "provenance": provenance(),
    }


def main(out_path, runs):
    results = []
    for spec in runs:
        route, dtype_name = spec.split(":")
        if route == "patch":
            import distill_fused

            distill_fused.patch_distill(nonfinite="warn")
        elif route == "unpatch":
            import distill_fused

            distill_fused.unpatch_distill()
        elif route != "host":
            raise SystemExit(f"unknown route {route!r}")
        result = run(getattr(torch, dtype_name))
        result["run"] = spec
        results.append(result)
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
