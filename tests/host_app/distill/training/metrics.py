"""Training metrics collection and history with callback-based events.

Defines typed event dataclasses emitted by the training loop and consumed
by the dashboard (Phase 6).  The callback pattern decouples training from
display: the loop emits ``StepMetrics`` / ``EpochMetrics`` / ``PreviewEvent``
and any subscriber can react.

:class:`MetricsHistory` accumulates metrics across a training run with
serialisation for checkpoint inclusion, loss curve extraction for
plotting, and overfitting detection.

Design notes:
- **Pure Python** -- no torch dependency (dataclasses + typing only).
- ``from __future__ import annotations`` for modern type syntax.
- All fields typed and documented for IDE autocompletion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

# ---------------------------------------------------------------------------
# Event Dataclasses
# ---------------------------------------------------------------------------


@dataclass
class StepMetrics:
    """Emitted every training step (mini-batch).

    Attributes
    ----------
    epoch:
        Current epoch (0-indexed).
    step:
        Current step within the epoch.
    total_steps:
        Total steps in the epoch.
    train_loss:
        Combined loss for this step.
    recon_loss:
        Reconstruction loss component.
    kl_loss:
        KL divergence loss component (weighted).
    kl_weight:
        Current KL weight from warmup schedule.
    learning_rate:
        Current optimizer learning rate.
    step_time_s:
        Wall-clock time for this step in seconds.
    """

    epoch: int
    step: int
    total_steps: int
    train_loss: float
    recon_loss: float
    kl_loss: float
    kl_weight: float
    learning_rate: float
    step_time_s: float
    stft_loss: float = 0.0           # Multi-resolution STFT loss (unweighted)
    mag_recon_loss: float = 0.0      # Magnitude channel L1 loss (unweighted)
    if_recon_loss: float = 0.0       # IF channel mag-weighted L1 loss (unweighted)
