"""batch.adaptive: the global batch changes at epoch ends (the decisions are in math/adaptive_batch.py).

Each epoch's plan is fixed: a decision never falls inside an epoch, so the steps an epoch cuts (and a mid-epoch
resume's count of them) never depend on it. The batch the next epoch trains with is checkpointed, so a restarted
run continues with the same sequence of batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayscale.config import Config
from rayscale.engine import distributed
from rayscale.engine.components import Component
from rayscale.math.adaptive_batch import goodput_batch, plan_for, step_batch, upper_limit
from rayscale.math.batching import BatchPlan
from rayscale.math.schedules import peak_lr


@dataclass
class AdaptiveBatchPart:
    global_batch_size: int | None = None  # what the epoch after the checkpoint trains with (None: the initial)


class AdaptiveBatch(Component):
    name = "adaptive_batch"
    logs = ("global_batch_size",)

    def __init__(self, cfg: Config, train_rows: int, world_size: int, saved: AdaptiveBatchPart):
        self.cfg, self.world_size, self.saved = cfg, world_size, saved
        self.mode, self.initial = cfg.batch.adaptive, cfg.batch.global_batch_size
        self.limit = upper_limit(cfg.batch.max_global_batch_size, self.initial, train_rows, world_size,
                                 cfg.batch.micro_batch_size) if self.mode != "none" else self.initial
        self.lines: list[dict] = []  # this epoch's log lines: goodput decides from them

    def plan(self) -> BatchPlan:
        """The plan of the epoch the run starts (or resumes) in."""
        return plan_for(self.saved.global_batch_size or self.initial, self.cfg.batch.micro_batch_size,
                        self.world_size)

    def part(self, run):
        return self.saved if self.saved.global_batch_size is not None else None

    def start_epoch(self, run, epoch):
        self.lines = []
        wanted = self.saved.global_batch_size or run.plan.global_batch_size
        if wanted != run.plan.global_batch_size:
            run.plan = plan_for(wanted, self.cfg.batch.micro_batch_size, self.world_size)
            run.peak_lr = peak_lr(self.cfg.optim, wanted, self.initial)

    def log_fields(self, run, sums, steps):
        return {"global_batch_size": run.plan.global_batch_size} if self.mode != "none" else {}

    def after_line(self, run, line):
        if self.mode == "goodput":  # kept only where they are used: an online run logs without end
            self.lines.append(line.to_json())

    def end_epoch(self, run, epoch):
        if self.mode == "none" or epoch + 1 >= self.cfg.train.epochs:
            return
        self.saved.global_batch_size = chosen = self.next_batch(run)
        if chosen != run.plan.global_batch_size:
            run.say(f"epoch {epoch + 2}/{self.cfg.train.epochs}: global batch {run.plan.global_batch_size} -> "
                    f"{chosen} (batch.adaptive {self.mode}), peak lr "
                    f"{peak_lr(self.cfg.optim, chosen, self.initial):.4g}")

    def next_batch(self, run) -> int:
        """The next epoch's global batch. Goodput's inputs (times) differ between ranks, so rank 0 decides and
        every rank takes its answer: they must cut the same steps."""
        batch = self.cfg.batch
        if self.mode == "step":
            return step_batch(run.state.samples_seen, self.initial, batch.growth_factor, batch.growth_every_samples,
                              self.limit, self.world_size)
        return distributed.from_rank_0(
            lambda: goodput_batch(self.lines, run.plan, self.initial, self.limit) or run.plan.global_batch_size,
            run.rank)
