"""What the loop and its components share while a rank trains: read by every component hook (Composer's
`State`). The loop owns it; components read it, and change only what the hook they are in says they may."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayscale.config import Config
from rayscale.data.sources import DataSpec
from rayscale.engine.guard import NonFiniteGuard
from rayscale.engine.precision import Precision
from rayscale.engine.state import TrainState
from rayscale.engine.tasks import Objective
from rayscale.math.batching import BatchPlan


@dataclass
class Run:
    cfg: Config
    spec: DataSpec
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module  # wrapped in DDP when the strategy all-reduces
    optimizer: torch.optim.Optimizer
    precision: Precision
    guard: NonFiniteGuard
    state: TrainState
    plan: BatchPlan  # this epoch's (batch.adaptive changes it at epoch ends)
    peak_lr: float  # at this epoch's global batch (math/schedules.peak_lr)
    micro_batch_size: int  # what a step's rows are cut into (batch.micro_batch_size auto changes it)
    train_rows: int  # rows per epoch
    val_rows: int
    objective: Objective  # the task's loss, or train.loss
    metrics: dict  # train.metrics by name: functions and torchmetrics objects (engine/user_metrics.py)
    progress_lines: bool = True  # False: the driver draws a progress bar from metrics.jsonl instead

    def where(self, epoch: int) -> str:
        return "online" if self.cfg.data.online else f"epoch {epoch + 1}/{self.cfg.train.epochs}"

    def say(self, text: str) -> None:
        """A line for the user, from rank 0 only."""
        if self.rank == 0:
            print(f"[rayscale] {text}", flush=True)

    def progress(self, text: str) -> None:
        """A periodic progress line (a log interval, a validation, an epoch end): left out while the driver
        draws a bar (driver/progress.py)."""
        if self.progress_lines:
            self.say(text)
