"""Where an optimizer step's time goes, for the throughput model of `rayscale suggest` (math/goodput.py).

A step of k micro-batches costs (k - 1) micro-batches accumulated without synchronising, one last micro-batch
whose backward also waits for the gradient all-reduce, and the update: zeroing the gradients and, where sample
weights or tokens set it, the loss normaliser's all-reduce before the micro-batches; unscale, clip and the
optimizer step after them. Measuring
the three separately is what lets a run at one batch size predict the step time at another: a larger global
batch at the same micro-batch adds micro-batches, not all-reduces or updates.

On CPU the marks are `perf_counter` readings. On CUDA they are events recorded on the stream and read only
when the interval is taken (at a log line, which synchronises anyway): the hot loop never waits for the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

MARKS = ("start", "micro_batches", "last_micro_batch", "backward_done", "end")
TIMING_KEYS = ("micro_batch_s", "sync_micro_batch_s", "update_s")  # what a log line shows of them


@dataclass
class StepTimes:
    """Sums over an interval's steps, in seconds."""

    accumulate_s: float = 0.0  # the no-sync micro-batches (all but each step's last)
    no_sync_micro_batches: int = 0
    last_micro_batch_s: float = 0.0  # each step's last micro-batch, all-reduce wait included
    update_s: float = 0.0
    steps: int = 0

    def means(self) -> dict[str, float | None]:
        """Per micro-batch and per step, as logged (None where nothing was measured)."""
        per_step = (lambda total: total / self.steps) if self.steps else (lambda total: None)
        return dict(zip(TIMING_KEYS, (self.accumulate_s / self.no_sync_micro_batches if self.no_sync_micro_batches
                                      else None, per_step(self.last_micro_batch_s), per_step(self.update_s)),
                        strict=True))


class StepClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.times = StepTimes()
        self._pending: list[tuple[list, int]] = []  # CUDA: each step's events, read at take()
        self._marks: list = []
        self._micro_batches = 0

    def mark(self, name: str, micro_batches: int = 0) -> None:
        """Record `name` (one of MARKS, in order); `micro_batches` with "start": how many the step has."""
        if name == "start":
            self._marks, self._micro_batches = [], micro_batches
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())
        if name == "end":
            if self.cuda:
                self._pending.append((self._marks, self._micro_batches))
            else:
                self._add(self._marks, self._micro_batches, lambda a, b: b - a)

    def _add(self, marks: list, micro_batches: int, seconds) -> None:
        start, first, last, backward_done, end = marks
        self.times.accumulate_s += seconds(first, last)
        self.times.no_sync_micro_batches += micro_batches - 1
        self.times.last_micro_batch_s += seconds(last, backward_done)
        self.times.update_s += seconds(start, first) + seconds(backward_done, end)
        self.times.steps += 1

    def take(self) -> StepTimes:
        """The interval's sums so far, and a fresh start."""
        if self._pending:
            self._pending[-1][0][-1].synchronize()
            for marks, micro_batches in self._pending:
                self._add(marks, micro_batches, lambda a, b: a.elapsed_time(b) / 1000.0)
            self._pending = []
        times, self.times = self.times, StepTimes()
        return times
