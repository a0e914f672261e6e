"""Core training loop for VAE audio models.

Orchestrates forward passes, loss computation, gradient updates,
checkpoint saving, preview generation, and metrics emission.  The
``train`` function is the main entry point; it creates the model,
optimiser, scheduler, data loaders, and runs epochs until completion
or cancellation.

Key features:
- NaN detection skips bad gradient updates (MPS stability, pitfall #4).
- Overfitting gap and KL divergence monitored with log warnings.
- Cancel event triggers immediate checkpoint save.
- All file operations wrapped in try/except (project error isolation).
- Lazy imports for heavy dependencies (project pattern).

Design notes:
- ``train_epoch`` and ``validate_epoch`` are standalone for testability.
- ``train`` is the top-level orchestrator called by ``TrainingRunner``.
- Device memory reporting supports cuda, mps, and cpu.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import threading

    import torch
    from torch.utils.data import DataLoader

    from distill.training.config import LossConfig, TrainingConfig
    from distill.training.metrics import MetricsCallback

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Train Epoch
# ---------------------------------------------------------------------------


def train_epoch(
    model: "torch.nn.Module",
    train_loader: "DataLoader",
    optimizer: "torch.optim.Optimizer",
    kl_weight: float,
    device: "torch.device",
    gradient_clip_norm: float,
    loss_config: "LossConfig | None" = None,
    stft_loss_fn: "torch.nn.Module | None" = None,
    epoch: int = 0,
    callback: "MetricsCallback | None" = None,
    cancel_event: "threading.Event | None" = None,
) -> dict:
    """Run one training epoch.

    Parameters
    ----------
    model:
        The VAE model (must be in train mode).
    train_loader:
        DataLoader yielding cached spectrogram batches
        ``[B, 2, n_mels, time]``.
    optimizer:
        Optimiser (AdamW).
    kl_weight:
        Current KL annealing weight.
    device:
        Target device for computation.
    gradient_clip_norm:
        Maximum gradient L2 norm for clipping.
    loss_config:
        Combined loss configuration. If provided, uses
        ``compute_combined_loss``; otherwise falls back to ``vae_loss``.
    stft_loss_fn:
        Pre-created MultiResolutionSTFTLoss module (required when
        *loss_config* is provided).
    epoch:
        Current epoch number (for metrics).
    callback:
        Optional metrics event subscriber.
    cancel_event:
        If set, returns early with partial results.

    Returns
    -------
    dict
        ``{train_loss, recon_loss, kl_loss, stft_loss, mag_recon_loss,
        if_recon_loss}`` averaged over all steps.
    """
    import torch  # noqa: WPS433

    from distill.models.losses import compute_combined_loss, vae_loss
    from distill.training.metrics import StepMetrics

    use_combined = loss_config is not None

    model.train()
    total_loss_sum = 0.0
    recon_loss_sum = 0.0
    kl_loss_sum = 0.0
    stft_loss_sum = 0.0
    mag_recon_loss_sum = 0.0
    if_recon_loss_sum = 0.0
    valid_steps = 0
    total_steps = len(train_loader)
    lr = optimizer.param_groups[0]["lr"]

    for step, batch in enumerate(train_loader):
        # Check cancellation
        if cancel_event is not None and cancel_event.is_set():
            logger.info("Cancel detected during training epoch %d, step %d", epoch, step)
            break

        step_start = time.time()

        # Batch is a pre-computed 2-channel spectrogram [B, 2, n_mels, time]
        mel = batch.to(device)

        # Forward pass
        recon, mu, logvar = model(mel)

        # Compute loss
        if use_combined:
            loss_dict = compute_combined_loss(
                recon, mel, mu, logvar, loss_config,
                kl_weight=kl_weight, _stft_loss_fn=stft_loss_fn,
            )
            total = loss_dict["total_loss"]
            recon_loss_val = loss_dict["recon_loss"]
            kl_loss_val = loss_dict["kl_loss"]
            stft_loss_val = loss_dict["stft_loss"]
            mag_recon_val = loss_dict["mag_recon_loss"]
            if_recon_val = loss_dict["if_recon_loss"]
        else:
            total, recon_loss_val, kl_loss_val = vae_loss(
                recon, mel, mu, logvar, kl_weight=kl_weight,
                free_bits=loss_config.kl.free_bits if loss_config else 0.1,
            )
            stft_loss_val = torch.zeros(1, device=device)
            mag_recon_val = torch.zeros(1, device=device)
            if_recon_val = torch.zeros(1, device=device)

        # NaN detection: skip bad gradient updates (MPS stability)
        if total.isnan():
            logger.warning(
                "NaN loss at epoch %d step %d -- skipping gradient update",
                epoch, step,
            )
            step_time = time.time() - step_start
            if callback is not None:
                callback(StepMetrics(
                    epoch=epoch, step=step, total_steps=total_steps,
                    train_loss=float("nan"), recon_loss=float("nan"),
                    kl_loss=float("nan"), kl_weight=kl_weight,
                    learning_rate=lr, step_time_s=step_time,
                ))
            continue

        # Backward pass
        optimizer.zero_grad()
        total.backward()

        # Gradient clipping
        if gradient_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=gradient_clip_norm)

        optimizer.step()

        # Accumulate
        total_loss_sum += total.item()
        recon_loss_sum += recon_loss_val.item()
        kl_loss_sum += kl_loss_val.item()
        stft_loss_sum += stft_loss_val.item()
        mag_recon_loss_sum += mag_recon_val.item()
        if_recon_loss_sum += if_recon_val.item()
        valid_steps += 1

        step_time = time.time() - step_start

        # Log progress every 10 steps (or every step in first epoch)
        if step % 10 == 0 or epoch == 0:
            print(
                f"[TRAIN] Epoch {epoch} step {step + 1}/{total_steps}  "
                f"loss={total.item():.4f}  stft={stft_loss_val.item():.4f}  "
                f"recon={recon_loss_val.item():.4f}  kl={kl_loss_val.item():.4f}  "
                f"kl_w={kl_weight:.3f}  step_time={step_time:.2f}s",
                flush=True,
            )

        # Emit step metrics
        if callback is not None:
            callback(StepMetrics(
                epoch=epoch, step=step, total_steps=total_steps,
                train_loss=total.item(), recon_loss=recon_loss_val.item(),
                kl_loss=kl_loss_val.item(), kl_weight=kl_weight,
                learning_rate=lr, step_time_s=step_time,
                stft_loss=stft_loss_val.item(),
                mag_recon_loss=mag_recon_val.item(),
                if_recon_loss=if_recon_val.item(),
            ))

    # Average over valid steps
    if valid_steps > 0:
        avg_loss = total_loss_sum / valid_steps
        avg_recon = recon_loss_sum / valid_steps
        avg_kl = kl_loss_sum / valid_steps
        avg_stft = stft_loss_sum / valid_steps
        avg_mag_recon = mag_recon_loss_sum / valid_steps
        avg_if_recon = if_recon_loss_sum / valid_steps
    else:
        avg_loss = float("nan")
        avg_recon = float("nan")
        avg_kl = float("nan")
        avg_stft = float("nan")
        avg_mag_recon = float("nan")
        avg_if_recon = float("nan")

    return {
        "train_loss": avg_loss,
        "recon_loss": avg_recon,
        "kl_loss": avg_kl,
        "stft_loss": avg_stft,
        "mag_recon_loss": avg_mag_recon,
        "if_recon_loss": avg_if_recon,
    }


# ---------------------------------------------------------------------------
# Validate Epoch
# ---------------------------------------------------------------------------


def validate_epoch(
    model: "torch.nn.Module",
    val_loader: "DataLoader",
    kl_weight: float,
    device: "torch.device",
    loss_config: "LossConfig | None" = None,
    stft_loss_fn: "torch.nn.Module | None" = None,
) -> dict:
    """Run one validation epoch.

    Parameters
    ----------
    model:
        The VAE model (switched to eval mode internally).
    val_loader:
        DataLoader yielding cached spectrogram batches
        ``[B, 2, n_mels, time]``.
    kl_weight:
        Current KL annealing weight.
    device:
        Target device for computation.
    loss_config:
        Combined loss configuration. If provided, uses
        ``compute_combined_loss``; otherwise falls back to ``vae_loss``.
    stft_loss_fn:
        Pre-created MultiResolutionSTFTLoss module (required when
        *loss_config* is provided).

    Returns
    -------
    dict
        ``{val_loss, val_recon_loss, val_kl_loss, kl_divergence,
        val_stft_loss, val_mag_recon_loss, val_if_recon_loss}``.
    """
    import torch  # noqa: WPS433

    from distill.models.losses import compute_combined_loss, compute_kl_divergence, vae_loss

    use_combined = loss_config is not None

    model.eval()
    total_loss_sum = 0.0
    recon_loss_sum = 0.0
    kl_loss_sum = 0.0
    kl_div_sum = 0.0
    stft_loss_sum = 0.0
    mag_recon_loss_sum = 0.0
    if_recon_loss_sum = 0.0
    num_batches = 0

    with torch.no_grad():
        for batch in val_loader:
            # Batch is a pre-computed 2-channel spectrogram [B, 2, n_mels, time]
            mel = batch.to(device)

            recon, mu, logvar = model(mel)

            if use_combined:
                loss_dict = compute_combined_loss(
                    recon, mel, mu, logvar, loss_config,
                    kl_weight=kl_weight, _stft_loss_fn=stft_loss_fn,
                )
                total = loss_dict["total_loss"]
                recon_loss_val = loss_dict["recon_loss"]
                kl_loss_val = loss_dict["kl_loss"]
                stft_loss_val = loss_dict["stft_loss"]
                mag_recon_val = loss_dict["mag_recon_loss"]
                if_recon_val = loss_dict["if_recon_loss"]
            else:
                total, recon_loss_val, kl_loss_val = vae_loss(
                    recon, mel, mu, logvar, kl_weight=kl_weight,
                    free_bits=loss_config.kl.free_bits if loss_config else 0.1,
                )
                stft_loss_val = torch.zeros(1, device=device)
                mag_recon_val = torch.zeros(1, device=device)
                if_recon_val = torch.zeros(1, device=device)

            # Raw KL divergence for posterior collapse monitoring
            raw_kl = compute_kl_divergence(mu, logvar)

            total_loss_sum += total.item()
            recon_loss_sum += recon_loss_val.item()
            kl_loss_sum += kl_loss_val.item()
            kl_div_sum += raw_kl
            stft_loss_sum += stft_loss_val.item()
            mag_recon_loss_sum += mag_recon_val.item()
            if_recon_loss_sum += if_recon_val.item()
            num_batches += 1

    model.train()

    if num_batches > 0:
        return {
            "val_loss": total_loss_sum / num_batches,
            "val_recon_loss": recon_loss_sum / num_batches,
            "val_kl_loss": kl_loss_sum / num_batches,
            "kl_divergence": kl_div_sum / num_batches,
            "val_stft_loss": stft_loss_sum / num_batches,
            "val_mag_recon_loss": mag_recon_loss_sum / num_batches,
            "val_if_recon_loss": if_recon_loss_sum / num_batches,
        }

    return {
        "val_loss": float("nan"),
        "val_recon_loss": float("nan"),
        "val_kl_loss": float("nan"),
        "kl_divergence": 0.0,
        "val_stft_loss": float("nan"),
        "val_mag_recon_loss": float("nan"),
        "val_if_recon_loss": float("nan"),
    }
