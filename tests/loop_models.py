"""Models for the loop's tests (`model.name: loop_models:<factory>`): the built-in MLP with one behaviour
injected each, numerics otherwise untouched."""

from __future__ import annotations

from pathlib import Path

import torch

from rayscale.models import MLP


class Cramped(MLP):
    """Runs out of device memory above `limit` rows per training forward (CUDA's error, injected), so
    batch.micro_batch_size auto can be tested on a CPU."""

    def __init__(self, limit, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def forward(self, x):
        if self.training and len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} rows")
        return super().forward(x)


class CrampedOnOneRank(torch.nn.Module):
    """A batch-norm model (buffers DDP broadcasts before a forward) that runs out of device memory above `limit`
    rows on rank 1 only: the other rank's forward completes where this one's fails."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.layers = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                          torch.nn.Linear(32, 10))

    def forward(self, x):
        if self.training and len(x) > self.limit and torch.distributed.get_rank() == 1:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} rows")
        return self.layers(x)


def cramped_on_one_rank(limit):
    return CrampedOnOneRank(limit)


def cramped(limit, hidden_sizes=(256, 256)):  # the built-in digits MLP: the same initial weights
    return Cramped(limit, in_features=64, num_outputs=10, hidden_sizes=tuple(hidden_sizes))


class CrashOnce(MLP):
    """Dies once (a RuntimeError) at its `after`-th training forward, unless `marker` exists: a crashed run, for a
    re-run to resume."""

    def __init__(self, after, marker):
        super().__init__(in_features=64, num_outputs=10, hidden_sizes=(32,))
        self.after, self.marker, self.calls = after, marker, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.after and not Path(self.marker).exists():
                Path(self.marker).touch()
                raise RuntimeError("injected crash")
        return super().forward(x)


def crash_once(after, marker):
    return CrashOnce(after, marker)


class NanAt(MLP):
    """Training forwards number `at` (from 0) give NaN: non-finite steps where the test says."""

    def __init__(self, at):
        super().__init__(in_features=64, num_outputs=10, hidden_sizes=(32,))
        self.at, self.calls = set(at), 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls - 1 in self.at:
                out = out * float("nan")
        return out


def nan_at(at=()):
    return NanAt(at)


class Slow(MLP):
    """Sleeps `delay_s` per training forward: steps long enough for a test to remove, add or drain a node while
    the run is mid-epoch. Numerics: the built-in digits MLP's."""

    def __init__(self, delay_s, hidden_sizes):
        super().__init__(in_features=64, num_outputs=10, hidden_sizes=tuple(hidden_sizes))
        self.delay_s = delay_s

    def forward(self, x):
        if self.training:
            import time

            time.sleep(self.delay_s)
        return super().forward(x)


def slow(delay_s, hidden_sizes=(256, 256)):
    return Slow(delay_s, hidden_sizes)


def frozen(hidden_sizes=(256, 256)):
    """The digits MLP with every parameter frozen: nothing for an optimizer to train."""
    model = MLP(in_features=64, num_outputs=10, hidden_sizes=tuple(hidden_sizes))
    return model.requires_grad_(False)


class Paced(MLP):
    """Sleeps `delay_s` per training forward while `pace_file` exists: a run slowed for as long as a test needs
    (to stop it mid-run), then at full speed once the test removes the file (its resume, under the same config)."""

    def __init__(self, delay_s, pace_file, hidden_sizes):
        super().__init__(in_features=64, num_outputs=10, hidden_sizes=tuple(hidden_sizes))
        self.delay_s, self.pace_file = delay_s, Path(pace_file)

    def forward(self, x):
        if self.training and self.pace_file.exists():
            import time

            time.sleep(self.delay_s)
        return super().forward(x)


def paced(delay_s, pace_file, hidden_sizes=(256, 256)):
    return Paced(delay_s, pace_file, hidden_sizes)
