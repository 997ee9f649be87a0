"""The driver's view of a run while it trains: `MetricsFollower` reads the metrics.jsonl rank 0 writes as it grows
and hands each line to its readers, the progress bar and the trackers (driver/tracking.py).

run.progress: on an interactive terminal the driver draws a progress bar (tqdm: samples, rate, ETA, the
latest loss and validation) from the metrics.jsonl rank 0 writes, and the workers leave out their periodic
lines; anywhere else (`ray job logs`, a file, a pipe) the workers print a plain line every
train.log_every_samples, as they always have.

The bar follows the run directory on the driver's filesystem, where rank 0 writes the log on one node (a
laptop, one machine); on a multi-node cluster rank 0 may write on another node, and the bar then stays at 0
until the run ends (run.progress lines gives the workers' own lines there); the trackers get the lines then,
from the copy the final checkpoint brings back.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from rayscale.engine.components.validation import shown

POLL_S = 0.5
TAIL_BYTES = 256  # of what was read, compared on each look to tell a rewritten log from a grown one


def wants_bar(mode: str, stream: IO) -> bool:
    """run.progress: bar, lines, or auto (a bar when `stream` is an interactive terminal)."""
    if mode != "auto":
        return mode == "bar"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class MetricsFollower:
    """A thread that reads the lines added to a run's metrics.jsonl every POLL_S while the run trains, and once
    more at exit, and hands each complete line to every reader in order (a context manager). A rewritten log (a
    resumed run keeps the lines up to its checkpoint) is read again from its start: readers see those lines
    twice and must tell them apart themselves (the bar moves back; the trackers skip what they logged)."""

    def __init__(self, metrics_path: Path, readers: Sequence[Callable[[dict], None]]):
        self.path, self.readers = Path(metrics_path), list(readers)
        self.read_to, self.identity = 0, None
        self.last_read = b""  # the bytes before read_to: a rewrite that kept the inode number must still hold them
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="rayscale-metrics", daemon=True)

    def __enter__(self) -> MetricsFollower:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()  # the last lines, written after the thread's last look

    def _still_holds_what_was_read(self, log: IO[bytes]) -> bool:
        log.seek(self.read_to - len(self.last_read))
        return log.read(len(self.last_read)) == self.last_read

    def _follow(self) -> None:
        while not self.stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        """Read the lines added since the last look."""
        try:
            log = open(self.path, "rb")
        except FileNotFoundError:
            return
        with log:
            # Identity and size from the file this handle reads, not from a stat of the path before opening it:
            # a resume, or the driver's copy of the final log, replaces the file, and a stale offset read into a
            # new file lands mid-line.
            status = os.fstat(log.fileno())
            if ((status.st_ino, status.st_dev) != self.identity or status.st_size < self.read_to
                    or not self._still_holds_what_was_read(log)):  # a freed inode number taken by a later rewrite
                self.identity, self.read_to, self.last_read = (status.st_ino, status.st_dev), 0, b""
            if status.st_size == self.read_to:
                return
            log.seek(self.read_to)
            added = log.read(status.st_size - self.read_to)
        complete = added[:added.rfind(b"\n") + 1]  # a line being written is read next time
        self.read_to += len(complete)
        self.last_read = (self.last_read + complete)[-TAIL_BYTES:]
        for raw in complete.splitlines():
            if raw.strip():
                line = json.loads(raw)
                for reader in self.readers:
                    reader(line)


class ProgressBar:
    """A tqdm bar over a run's metrics lines (a MetricsFollower's reader; a context manager that closes it)."""

    def __init__(self, total_samples: int | None, epochs: int, file: IO | None = None):
        from tqdm import tqdm

        self.epochs, self.file = epochs, file
        self.bar = tqdm(total=total_samples, unit=" samples", unit_scale=True, dynamic_ncols=True, file=file,
                        desc="[rayscale] training", smoothing=0.1)
        self.ended: set[int] = set()  # epochs whose end was written above the bar

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.close()

    def show(self, line: dict) -> None:
        self.bar.update(line["samples_seen"] - self.bar.n)  # absolute: a resumed run's lines move it back
        postfix = {"loss": f"{line['train_loss']:.4f}"} if line.get("train_loss") is not None else {}
        validation = {key: value for key, value in line.items() if key.startswith("val_")}
        postfix.update({key: f"{value:.4f}" for key, value in validation.items()})
        self.bar.set_postfix(postfix, refresh=False)
        if line.get("epoch_end") and line["epoch"] not in self.ended:
            self.ended.add(line["epoch"])
            self.bar.write(f"[rayscale] epoch {line['epoch'] + 1}/{self.epochs} done: samples "
                           f"{line['samples_seen']:,} {shown(validation)}".rstrip(), file=self.file)
        self.bar.refresh()
