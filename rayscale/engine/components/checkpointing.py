"""Checkpoints from the loop's side: when one is due (run.checkpoint_every_samples, run.checkpoint_every_seconds),
what each rank writes into it, and what a restarted rank reads back (the file formats: engine/checkpoint.py)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rayscale.engine import checkpoint
from rayscale.engine.components import Component
from rayscale.engine.run import Run
from rayscale.files import METRICS_FILE


@dataclass
class Restored:
    """What a rank resumes from."""

    directory: Path
    saved: checkpoint.SavedState
    own_rng: dict | None  # this rank's RNG states (each rank continues its own dropout stream)


def read(directory: Path | None, rank: int) -> Restored | None:
    if directory is None:
        return None
    checkpoint.verify(directory)
    own = directory / checkpoint.RNG_FILE.format(rank)
    return Restored(directory, checkpoint.read_state(directory), checkpoint.load(own) if own.exists() else None)


class CheckpointSchedule(Component):
    """When a checkpoint is due, and how long the ranks were held up writing checkpoints: logged per line as
    `checkpoint_s` (the mean over ranks of the seconds spent inside checkpoints since the previous line). With
    run.checkpoint_upload async that is the local write only; the copy to run.storage_path runs beside training.

    Mid-epoch a checkpoint is due every run.checkpoint_every_samples; one due at an epoch's last step is made
    by the epoch end, after its validation and the components' end of epoch. An epoch end checkpoints once
    run.checkpoint_every_seconds have passed since the last checkpoint, on rank 0's clock: each rank's wish
    rides in the epoch-end line's collective, so every rank makes the same choice (a checkpoint is a collective).
    Epochs of milliseconds then pay for a checkpoint every few seconds, not at every end; a resume is as exact
    from any checkpoint, it only replays more steps. The loop checkpoints the last epoch, a rung pause and a
    drain notice whatever this says."""

    logs = ("checkpoint_s",)

    def __init__(self, every: int | None, samples_seen: int, every_seconds: float = 0.0, rank: int = 0,
                 clock=time.perf_counter):
        self.every = every
        self.next_at = samples_seen + every if every else None
        self.blocked_s = 0.0  # since the last log line, on this rank
        self.every_seconds, self.rank, self.clock = every_seconds, rank, clock
        self.last_saved = clock()  # the attempt's start counts as its last checkpoint
        self.epoch_end_due = every_seconds == 0  # as agreed at the latest log line
        self.owed = False  # one was due at a segment's last step: the segment end makes it

    def saved(self, blocked_s: float) -> None:
        """A checkpoint was made, holding this rank up `blocked_s`."""
        self.blocked_s += blocked_s
        self.last_saved, self.owed = self.clock(), False

    def interval_sums(self) -> list[float]:
        blocked, self.blocked_s = self.blocked_s, 0.0
        wish = self.rank == 0 and self.clock() - self.last_saved >= self.every_seconds
        return [blocked, float(wish)]

    def log_fields(self, run: Run, sums: list[float], steps: int) -> dict[str, float]:
        self.epoch_end_due = sums[1] > 0
        return {"checkpoint_s": sums[0] / run.world_size}

    def due(self, samples_seen: int) -> bool:
        if self.next_at is None or samples_seen < self.next_at:
            return False
        self.next_at = samples_seen + self.every
        return True


def write_part(run: Run, directory: Path, metrics_path: Path) -> None:
    """This rank's files of a checkpoint: rank 0 the state and the log so far, every rank its RNG states, and
    last its manifest (its presence says the part is whole)."""
    if run.rank == 0:
        checkpoint.save_atomic(checkpoint.capture(run.model, run.optimizer, run.precision.scaler, run.state),
                               directory / checkpoint.STATE_FILE)
        if metrics_path.exists():  # the log travels with the checkpoint (multi-node: to the driver)
            shutil.copyfile(metrics_path, directory / METRICS_FILE)
    checkpoint.save_atomic(checkpoint.rng_states(), directory / checkpoint.RNG_FILE.format(run.rank))
    checkpoint.write_manifest(directory, run.rank, run.world_size)
