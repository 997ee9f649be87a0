"""train.metrics (or rayscale.train's `metrics=`): the user's validation metrics, each written to metrics.jsonl as
`val_<name>` beside val_loss and usable as tune.metric.

A metric is either
  - a function (output, batch) -> per-sample (B,) or per-token (B, L) values: rayscale takes their weighted
    mean over the real rows (and the real, unmasked tokens), summing over the ranks exactly, in the same
    all-reduce as val_loss; or
  - a torchmetrics `Metric` object: each evaluation uses a fresh copy, updated with (predictions, targets) of
    the real rows only (for per-token outputs, the real, unmasked tokens), and its `compute()` syncs its states
    over the ranks itself (torchmetrics' all-gather; exact for the count-based metrics). Sample weights other
    than 0 are not passed on: a torchmetrics metric counts each real row once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch

from rayscale.engine import tasks
from rayscale.errors import UserCodeError


def is_torchmetric(metric: Any) -> bool:
    try:
        from torchmetrics import Metric
    except ImportError:  # without torchmetrics installed no object can be one
        return False
    return isinstance(metric, Metric)


class UserMetrics:
    """One validation's metrics: `update` per micro-batch, `totals` (on the device) for the shared all-reduce,
    then `results`."""

    def __init__(self, metrics: Mapping[str, Callable | Any], device: torch.device):
        self.functions = {name: fn for name, fn in metrics.items() if not is_torchmetric(fn)}
        self.objects = {name: copy.deepcopy(metric).to(device) for name, metric in metrics.items()
                        if is_torchmetric(metric)}
        for metric in self.objects.values():
            metric.reset()
        self.totals = torch.zeros(2 * len(self.functions), dtype=torch.float64, device=device)

    def update(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        for index, (name, fn) in enumerate(self.functions.items()):
            values = fn(output, batch)
            if not isinstance(values, torch.Tensor) or values.dim() not in (1, 2) \
                    or values.shape[0] != output.shape[0]:
                shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                raise UserCodeError(f"train.metrics.{name}: returned {shape}; expected one value per sample "
                                    f"({output.shape[0]},) or per token (batch, length)")
            weights = _counted(values, batch)
            self.totals[2 * index] += (values.double() * weights).sum()
            self.totals[2 * index + 1] += weights.sum()
        if self.objects:
            predictions, targets = _real(output, batch)
            for metric in self.objects.values():
                metric.update(predictions, targets)

    def results(self, reduced: list[float]) -> dict[str, float]:
        """Every metric as `val_<name>`: the functions' from their reduced sums, the objects' from compute()
        (which every rank calls: it all-gathers)."""
        found = {f"val_{name}": reduced[2 * i] / max(reduced[2 * i + 1], tasks.COUNT_FLOOR)
                 for i, name in enumerate(self.functions)}
        for name, metric in self.objects.items():
            value = metric.compute()
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise UserCodeError(f"train.metrics.{name}: compute() gave {type(value).__name__} "
                                    f"{tuple(getattr(value, 'shape', ()))}; expected one number")
            found[f"val_{name}"] = float(value.item())
        return found


def _counted(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each value's weight: its row's sample weight (0 on padding rows), and per token whether it counts."""
    weights = tasks.sample_weights(batch).double()
    if values.dim() == 1:
        return weights
    real = tasks.labelled_tokens(batch) if batch["y"].shape == values.shape else batch["mask"]
    return weights[:, None] * real.double()


def _real(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets) of the rows (or tokens) that count: padding rows and masked tokens left out."""
    keep = tasks.sample_weights(batch) > 0
    if batch["y"].dim() == 2 and "mask" in batch and output.dim() == 3:  # per token
        keep = keep[:, None] & tasks.labelled_tokens(batch)
    return output[keep], batch["y"][keep]
