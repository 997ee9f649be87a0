"""metrics.jsonl: the interval sums kept on the device between log lines, and the typed line rank 0 writes.

A line is due every train.log_every_samples; the sums of its interval (each component adds its own) and the
timings and memory (their max: the slowest worker sets the pace) are reduced over the ranks in one collective.
Whether a line is also reported to the context (a barrier under Ray Train) is decided on rank 0's clock,
train.report_every_seconds, and agreed in that same collective.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rayscale.engine import checkpoint, distributed
from rayscale.engine.clock import StepClock
from rayscale.files import METRICS_FILE

if TYPE_CHECKING:
    from rayscale.engine.components import Component
    from rayscale.engine.run import Run


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_mb(device: torch.device) -> float:
    """Memory held now: tensors on a GPU, the process's resident set on CPU (0 where /proc is missing). The peak
    only ever grows; this is what shows a leak, epoch after epoch."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


@dataclass
class Interval:
    """Sums since the last log line, kept on the device so the hot loop never waits for the host."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    grad_norm_sum: torch.Tensor
    steps: int = 0
    samples: int = 0
    data_wait: float = 0.0
    clock: StepClock | None = None
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def fresh(cls, device: torch.device) -> Interval:
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls(zero(), zero(), zero(), clock=StepClock(device))

    def add_step(self, result, rows: int) -> None:
        """A train_step result's loss, count and norm, in place into the float64 sums (no conversion op). A
        skipped (non-finite) step adds none of them, or one NaN loss would make the whole interval's train_loss
        NaN (decided on the device when it was skipped there)."""
        if isinstance(result.skipped, torch.Tensor):
            self.loss_sum += torch.where(result.skipped, 0.0, result.loss_sum)
            self.count += torch.where(result.skipped, 0.0, result.local_count)
            self.grad_norm_sum += torch.where(result.skipped, 0.0, result.grad_norm)
        elif not result.skipped:
            self.loss_sum += result.loss_sum
            self.count += result.local_count
            self.grad_norm_sum += result.grad_norm
        self.steps += 1
        self.samples += rows


@dataclass
class LogLine:
    """One line of metrics.jsonl (see docs/reference/outputs.md for every key)."""

    step: int
    epoch: int
    samples_seen: int
    world_size: int  # the worker group's (an elastic run's changes when it resizes)
    train_loss: float | None
    lr: float
    grad_norm: float
    samples_per_sec: float | None
    data_wait_fraction: float | None
    timings: dict[str, float | None]  # micro_batch_s, sync_micro_batch_s, update_s (clock.py)
    peak_memory_mb: float
    memory_mb: float
    nonfinite_skipped: int
    time: float  # seconds since the worker finished setting up
    started_at: float  # when it did (wall clock): the end of start-up
    entered_at: float  # when it entered the training function
    fields: dict[str, Any] = field(default_factory=dict)  # the components' own (noise scale, batch, ...)
    evaluation: bool = False  # this line validated
    epoch_end: bool = False
    validation: dict[str, float] = field(default_factory=dict)  # val_loss, val_accuracy when it validated

    def shown(self) -> str:
        """Its loss, lr and rate for a progress line ("-" for a loss of rows that all weighed 0)."""
        loss = "-" if self.train_loss is None else f"{self.train_loss:.4f}"
        rate = "-" if self.samples_per_sec is None else f"{self.samples_per_sec:,.0f}"
        return f"loss {loss} lr {self.lr:.4g} {rate} samples/s"

    @classmethod
    def core_keys(cls) -> tuple[str, ...]:
        """Its own keys in every line (not the timings', the components' or the validation's)."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.name not in ("timings", "fields", "evaluation", "epoch_end", "validation"))

    def to_json(self) -> dict[str, Any]:
        core = {name: getattr(self, name) for name in self.core_keys()}
        flags = {**({"epoch_end": True} if self.epoch_end else {}),
                 **({"evaluation": self.evaluation} if self.evaluation or self.epoch_end else {})}
        return {**core, **self.timings, **self.fields, **flags, **self.validation}


class MetricsLog:
    """Rank 0's metrics.jsonl, the interval since its last line, and when the next line and report are due."""

    def __init__(self, run_dir: Path, rank: int, device: torch.device, log_every: int, report_every_s: float):
        self.path = run_dir / METRICS_FILE
        self.rank, self.device = rank, device
        self.log_every, self.report_every_s = log_every, report_every_s
        self.interval = Interval.fresh(device)
        self.next_at = log_every
        self.last_report = time.perf_counter()
        self.entered_at = self.started_at = time.time()

    def resume_from(self, saved_dir: Path | None, samples_seen: int) -> None:
        """On resume, the log is the one saved in the checkpoint we restart from (rank 0 may now run on
        another node): lines logged after it go, since those steps run again. A fresh run starts a new log."""
        self.next_at = samples_seen + self.log_every
        if self.rank != 0:
            return
        if saved_dir is None:
            self.path.unlink(missing_ok=True)
            return
        source = saved_dir / METRICS_FILE if (saved_dir / METRICS_FILE).exists() else self.path
        if source.exists():
            keep = [line for line in source.read_text().splitlines()
                    if line.strip() and json.loads(line).get("samples_seen", 0) <= samples_seen]
            checkpoint.write_bytes_atomic(self.path, "".join(line + "\n" for line in keep).encode())

    def due(self, samples_seen: int) -> bool:
        """A line is due after this step (the next one is then counted from here)."""
        if samples_seen < self.next_at:
            return False
        self.next_at = samples_seen + self.log_every
        return True

    def reported(self) -> None:
        self.last_report = time.perf_counter()

    def line(self, run: Run, components: list[Component], epoch: int, *, evaluation: bool = False,
             epoch_end: bool = False, validation: dict | None = None, fields: dict | None = None
             ) -> tuple[LogLine, bool]:
        """The interval's line, written by rank 0, and whether to report it (every rank gets the same answer);
        the next interval starts."""
        run.guard.settle()  # the interval's steps skipped on the device: counted, or the run aborts here
        interval = self.interval
        elapsed = time.perf_counter() - interval.started
        want_report = float(self.rank == 0 and time.perf_counter() - self.last_report >= self.report_every_s)
        own = [component.interval_sums() for component in components]
        timings = interval.clock.take().means()
        # The slowest rank sets the step time; -1 stands for "not measured" (no no-sync micro-batch).
        (loss_sum, count, wants, *reduced), (peak, now, *timed) = distributed.sum_and_max(
            [interval.loss_sum.item(), interval.count.item(), want_report, *(v for sums in own for v in sums)],
            [peak_memory_mb(self.device), memory_mb(self.device),
             *(-1.0 if t is None else t for t in timings.values())], self.device)
        component_fields: dict[str, Any] = {}
        for component, sums in zip(components, own, strict=True):
            component_fields.update(component.log_fields(run, reduced[:len(sums)], interval.steps))
            reduced = reduced[len(sums):]
        line = LogLine(
            step=run.state.step, epoch=epoch, samples_seen=run.state.samples_seen, world_size=run.world_size,
            train_loss=loss_sum / count if count else None, lr=run.optimizer.param_groups[0]["lr"],
            grad_norm=interval.grad_norm_sum.item() / max(interval.steps, 1),
            samples_per_sec=interval.samples / elapsed if elapsed > 0 else None,
            data_wait_fraction=interval.data_wait / elapsed if elapsed > 0 else None,
            timings={key: (value if value >= 0 else None) for key, value in zip(timings, timed, strict=True)},
            peak_memory_mb=peak, memory_mb=now, nonfinite_skipped=run.guard.skipped_total,
            time=time.time() - self.started_at, started_at=self.started_at, entered_at=self.entered_at,
            fields={**component_fields, **(fields or {})}, evaluation=evaluation, epoch_end=epoch_end,
            validation=dict(validation or {}))
        if self.rank == 0:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(line.to_json()) + "\n")
        self.interval = Interval.fresh(self.device)
        return line, wants > 0
