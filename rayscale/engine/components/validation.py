"""Validation: at every epoch end, every train.eval_every_samples and at Tune's rung milestones. Each rank
evaluates every row of its own shard of the validation split; the sums are all-reduced once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from rayscale.data.assembly import StepAssembler
from rayscale.data.collate import micro_batches
from rayscale.data.sources import DataSpec
from rayscale.engine import distributed, tasks
from rayscale.engine.precision import Precision
from rayscale.engine.user_metrics import UserMetrics
from rayscale.errors import UserError
from rayscale.math.batching import BatchPlan


def next_evaluation(samples_seen: int, every: int, at: tuple[int, ...] = ()) -> int | None:
    """The first sample count past `samples_seen` at which to validate mid-epoch: the next multiple of
    `every` (0: none) or the next of the fixed points `at` (Tune's rung milestones), whichever comes first."""
    candidates = [point for point in at if point > samples_seen]
    if every:
        candidates.append((samples_seen // every + 1) * every)
    return min(candidates, default=None)


class ValidationSchedule:
    """When the next mid-epoch validation is due (None: only at epoch ends, or never without validation rows)."""

    def __init__(self, every: int, at: tuple[int, ...], samples_seen: int, has_rows: bool):
        self.every, self.at = every, at
        self.next_at = next_evaluation(samples_seen, every, at) if has_rows else None

    def due(self, samples_seen: int) -> bool:
        if self.next_at is None or samples_seen < self.next_at:
            return False
        self.next_at = next_evaluation(samples_seen, self.every, self.at)
        return True


def evaluate(model: torch.nn.Module, blocks, plan: BatchPlan, spec: DataSpec, precision: Precision,
             device: torch.device, objective: tasks.Objective | None = None,
             metrics: Mapping[str, Any] | None = None, weighed_by: str = "the data") -> dict[str, float]:
    """Validation loss (and accuracy, and the user's metrics as val_<name>) over all validation rows: `blocks`
    are this rank's shard (numpy blocks in order), taken a worker's batch of `plan` at a time in its
    micro-batches; the sums of every rank together. `objective`: the loss (the task's by default).
    Rows that all weigh 0 are refused (UserError naming `weighed_by`, what weighs them): their val_loss would
    read 0, the best a search can rank, whatever the model."""
    objective = objective or tasks.Objective(spec.task)
    model.eval()
    # loss, its count (the user loss's own weights where it returns them), correct, the task's count. Accuracy
    # counts each row by its sample weight, as `correct` does, never by the user loss's weights.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    own = UserMetrics(metrics or {}, device)
    alone = dataclasses.replace(plan, global_batch_size=plan.per_worker_batch_size, num_workers=1)
    assembler = StepAssembler(alone, 0)
    with torch.no_grad():
        for step in assembler.steps(blocks):
            for batch in micro_batches(step, plan.micro_batch_size, device):
                with precision.autocast():
                    output = tasks.forward(model, batch)
                loss, own_count = objective.loss(output, batch)
                task_count = objective.count(batch)
                sums[0] += loss.double()
                sums[1] += (own_count if own_count is not None else task_count).double()
                hits = tasks.correct(spec.task, output, batch)
                if hits is not None:
                    sums[2] += hits.double()
                sums[3] += task_count.double()
                own.update(output, batch)
    model.train()
    loss, loss_count, correct, count, *reduced = distributed.all_reduce(torch.cat([sums, own.totals]),
                                                                        device).tolist()
    if loss_count == 0:
        raise UserError(f"{weighed_by}: every row evaluated weighed 0 on every worker, so val_loss would be 0 "
                        f"whatever the model; expected some rows with a positive weight")
    metrics = {"val_loss": loss / loss_count}
    if spec.task != "regression":
        metrics["val_accuracy"] = correct / max(count, tasks.COUNT_FLOOR)
    return {**metrics, **own.results(reduced)}


def at_micro_batch(plan: BatchPlan, micro_batch_size: int) -> BatchPlan:
    return dataclasses.replace(plan, micro_batch_size=micro_batch_size)


def shown(metrics: dict[str, float]) -> str:
    return " ".join(f"{key} {value:.4f}" for key, value in metrics.items())
