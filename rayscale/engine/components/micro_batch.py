"""batch.micro_batch_size auto: start with each worker's whole share of the step and halve the micro-batch on
every rank whenever one runs out of device memory, redoing the step with the same rows (Composer's approach).
The global batch, and so the training, stay as configured; the micro-batch found is checkpointed, so a restart
resumes at it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rayscale.data.assembly import StepRows
from rayscale.data.collate import micro_batches
from rayscale.engine.components import Component
from rayscale.engine.step import MicroBatchTooLarge, StepResult
from rayscale.math.batching import smaller_micro_batch


@dataclass
class MicroBatchPart:
    micro_batch_size: int | None = None  # found by halving (None: the plan's)


class AutoMicroBatch(Component):
    name = "micro_batch"
    logs = ("micro_batch_size",)

    def __init__(self, auto: bool, saved: MicroBatchPart):
        self.auto, self.saved = auto, saved

    def part(self, run):
        return self.saved if self.saved.micro_batch_size is not None else None

    def start_epoch(self, run, epoch):
        run.micro_batch_size = self.saved.micro_batch_size or run.plan.micro_batch_size

    def log_fields(self, run, sums, steps):
        return {"micro_batch_size": run.micro_batch_size} if self.auto else {}

    def take_step(self, run, rows: StepRows, batch: list[dict[str, torch.Tensor]],
                  attempt: Callable[[list[dict[str, torch.Tensor]]], StepResult]) -> StepResult:
        """`attempt(batch)`; under auto, redone at half the micro-batch until it fits, batch-norm statistics
        put back before each retry."""
        if not self.auto:
            return attempt(batch)
        buffers = [b.detach().clone() for b in run.model.buffers()]
        # DDP decides at each forward whether to broadcast the buffers first (a collective), from what its last
        # completed forward set. A rank whose forward ran out of memory never completed it, while another's did:
        # redone as they stand, one rank would broadcast and the other not, and both would wait forever.
        broadcasts = getattr(run.model, "require_forward_param_sync", None)
        while True:
            try:
                return attempt(batch)
            except MicroBatchTooLarge:
                batch = None
                for buffer, saved in zip(run.model.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
                if broadcasts is not None:
                    run.model.require_forward_param_sync = broadcasts
                if run.device.type == "cuda":
                    torch.cuda.empty_cache()
                run.micro_batch_size = self.saved.micro_batch_size = smaller_micro_batch(run.micro_batch_size)
                run.say(f"out of device memory at step {run.state.step}: every worker redoes it at micro-batch "
                        f"{run.micro_batch_size} (batch.micro_batch_size auto)")
                batch = micro_batches(rows, run.micro_batch_size, run.device)
