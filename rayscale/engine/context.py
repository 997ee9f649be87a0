"""The seam between the training loop and whatever runs it: which rank this is, its rows, the checkpoint to
resume from, and where checkpoints and reports go.

Two implementations: Ray Train's (launch/ray_context.py), and `InProcessContext` below, which runs the loop in
this process without Ray: the engine's own tests use it, one process per rank (torch.distributed set up by the
caller for several), with rows read in this process by `data.local_feed.LocalReads`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NoReturn, Protocol

import numpy as np
import torch

from rayscale.engine import checkpoint
from rayscale.engine.components.preemption import PreemptionNotice
from rayscale.files import CHECKPOINTS_DIR
from rayscale.math.lanes import ChunkRead

Blocks = Iterable[dict[str, np.ndarray]]
WritePart = Callable[[Path], None]  # writes this rank's files of a checkpoint into the directory given


class Context(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def read(self, split: str, reads: list[ChunkRead], prefetch: int) -> Blocks:
        """The rows of chunk pieces of a split ("train" or "val"), numpy blocks in the order of `reads`: this
        rank's lanes of a training epoch, or its shard of the validation split."""

    def restored(self) -> contextlib.AbstractContextManager[Path | None]:
        """The directory of the checkpoint to resume from, while the block lasts (None: a fresh run)."""

    def save(self, metrics: dict, write: WritePart) -> None:
        """A checkpoint: `write` puts this rank's files into a directory, then it is committed with `metrics`
        (under Ray Train a barrier: every rank calls it)."""

    def report(self, metrics: dict) -> None:
        """Metrics without a checkpoint (under Ray Train a barrier, and what Tune sees)."""

    def report_finished(self, metrics: dict) -> None:
        """Resumed a run that had already finished: nothing was trained, the last checkpoint stands."""

    def parameter_client(self, model: torch.nn.Module):
        """train.strategy parameter_server: the client of this run's servers."""

    watches_drains: bool  # whether a node of this group can be drained with notice (a cluster's)

    def drain_notice(self) -> PreemptionNotice | None:
        """A drain announced on a node of this group, or None; a collective (every rank asks at the same step,
        and all get rank 0's answer). Only asked where `watches_drains`."""

    def hold_for_restart(self, notice: PreemptionNotice) -> NoReturn:
        """After the drain's checkpoint: wait for the group to be restarted without the node (bounded: it raises
        if the restart does not come)."""


class HeldForRestart(Exception):
    """InProcessContext's hold: the loop stopped after a drain's checkpoint, as a Ray worker would wait."""


class InProcessContext:
    """The loop in this process, without Ray. Checkpoints are directories under `run_dir/checkpoints`, each
    rank staging its part and then copying it in (manifest last), as Ray merges the ranks' parts; the run
    resumes from the furthest complete one. Reports are kept in `reports`, with the checkpoint they carried."""

    def __init__(self, run_dir: str | Path, reader: Callable[[str, list[ChunkRead]], Blocks], *, rank: int = 0,
                 world_size: int = 1, device: torch.device | None = None,
                 drains: Callable[[], PreemptionNotice | None] | None = None):
        """`drains`: a drain notice source (the tests' stand-in for Ray's watcher; None: no node is drained)."""
        self.run_dir = Path(run_dir)
        self.drains, self.watches_drains = drains, drains is not None
        self.reader, self.rank, self.world_size = reader, rank, world_size
        self.device = device or torch.device("cpu")
        self.reports: list[tuple[dict, Path | None]] = []
        self.checkpoints = self.run_dir / CHECKPOINTS_DIR
        # Every rank counts from the same place: the checkpoints there before the run (none is written yet).
        numbered = [p.name.removeprefix("checkpoint-") for p in self.checkpoints.glob("checkpoint-*")]
        self.saves = 1 + max((int(n) for n in numbered if n.isdigit()), default=-1)

    def read(self, split: str, reads: list[ChunkRead], prefetch: int) -> Blocks:
        return self.reader(split, reads)

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield checkpoint.latest_local(self.checkpoints) if self.checkpoints.exists() else None

    def save(self, metrics: dict, write: WritePart) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        target = self.checkpoints / f"checkpoint-{self.saves:06d}"
        self.saves += 1
        staging = Path(tempfile.mkdtemp(prefix=f".staging-rank{self.rank}-", dir=self.checkpoints))
        try:
            write(staging)
            target.mkdir(exist_ok=True)
            files = sorted(staging.iterdir(), key=lambda path: path.name.startswith("manifest_"))
            for path in files:  # the manifest last: its presence says the part is whole
                shutil.copyfile(path, target / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.reports.append((dict(metrics), target))

    def report(self, metrics: dict) -> None:
        self.reports.append((dict(metrics), None))

    def report_finished(self, metrics: dict) -> None:
        self.reports.append((dict(metrics), None))

    def parameter_client(self, model: torch.nn.Module):
        raise NotImplementedError("train.strategy parameter_server needs Ray: its servers are Ray actors")

    def drain_notice(self) -> PreemptionNotice | None:
        return self.drains() if self.drains else None

    def hold_for_restart(self, notice: PreemptionNotice) -> NoReturn:
        raise HeldForRestart(notice.describe())
