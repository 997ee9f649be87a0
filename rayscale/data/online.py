"""Online mode (data.online): one pass over a growing directory of Parquet files, no epochs: the files.

Files are trained in name order (write them with names that sort in arrival order: a zero-padded counter or a
UTC timestamp, written under another name and renamed, so no half-written file is ever listed). Rank 0 lists the
directory and broadcasts what to do next, so every rank reads the same file and takes its share of the same
steps. Each file is cut into global steps on its own (data.StepAssembler, no shuffle): its partial last step is
trained at once rather than held for the next file, so steps are a function of the file list alone, whatever
the timing of arrivals, and a resumed run continues exactly (the loop's side: engine/components/online_feed.py).

The workers read the files themselves (pyarrow, one row group at a time) rather than through Ray Data: a Ray
Dataset is built by the driver over a file list fixed in advance, which a growing directory does not have.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayscale.config import DataConfig
from rayscale.data import sources
from rayscale.errors import UserError


def list_files(directory: str) -> list[str]:
    """Every *.parquet below `directory`, relative to it, in name order."""
    root = os.path.expanduser(directory)
    found = []
    for parent, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(parent, n), root) for n in names if n.endswith(".parquet")]
    return sorted(found)


@dataclass
class Next:
    """Rank 0's decision after a poll, the same on every rank: train `file`, wait, or stop."""

    file: str | None = None
    stop: bool = False
    error: str | None = None


def decide(directory: str, trained: list[str], idle_for: float, idle_timeout: float) -> Next:
    """Rank 0: the next file to train (after the `trained` ones, in order), or stop after `idle_timeout`
    seconds with nothing new, or wait."""
    consumed = set(trained)
    pending = [name for name in list_files(directory) if name not in consumed]
    last = trained[-1] if trained else None
    early = [name for name in pending if last is not None and name < last]
    if early:
        return Next(error=f"data.source: {early[0]} arrived after {last} was trained, but sorts before it; "
                          f"online mode trains files in name order (name new files so that they sort last)")
    if pending:
        return Next(file=pending[0])
    return Next(stop=idle_for >= idle_timeout)


def wait_for_file(directory: str, trained: list[str], data: DataConfig, broadcast) -> str | None:
    """Poll until there is a file to train (its relative name) or the idle timeout passes (None). `broadcast`
    takes rank 0's Next and returns it on every rank (identity with one worker)."""
    idle_since = time.monotonic()
    while True:
        decision = broadcast(lambda: decide(directory, trained, time.monotonic() - idle_since,
                                            data.online_idle_timeout_s))
        if decision.error:
            raise UserError(decision.error)
        if decision.file is not None or decision.stop:
            return decision.file
        time.sleep(data.online_poll_s)


def nothing_to_train(directory: str, name: str, data: DataConfig) -> str | None:
    """Why a file holds nothing to train, or None: no rows (a producer's window in which nothing happened), or
    rows whose data.weight is 0 throughout (a window of masked rows). Such a file is skipped, not refused, so
    that it does not stop a run that waits for the next one; a source that starts so is refused up front. An
    unreadable file is not judged here: file_chunks names it."""
    try:
        parquet = pq.ParquetFile(os.path.join(os.path.expanduser(directory), name))
        if parquet.metadata.num_rows == 0:
            return "has no rows"
        if data.weight is not None and data.weight in parquet.schema_arrow.names:
            largest = pc.max(parquet.read(columns=[data.weight]).column(0)).as_py()
            if largest == 0:
                return f"has no row of positive weight (every {data.weight!r} is 0)"
    except (pa.ArrowException, OSError):
        pass
    return None


def file_chunks(directory: str, name: str, data: DataConfig, seed: int, spec: sources.DataSpec,
                first_row: int) -> tuple[sources.Chunk, ...]:
    """The row groups of one new file, numbered from `first_row`, after checking it fits the run's model."""
    path = os.path.join(os.path.expanduser(directory), name)
    info = sources.inspect_source(path, data, seed)
    fits = info.spec.task == spec.task and info.spec.input_shape == spec.input_shape and (
        info.spec.task == "regression" and info.spec.num_outputs == spec.num_outputs
        or info.spec.task != "regression" and info.spec.num_outputs <= spec.num_outputs)
    if not fits:
        raise UserError(f"data.source: {path} does not match the files the run started with ({info.spec.task} "
                        f"{info.spec.input_shape}, {info.spec.num_outputs} outputs vs {spec.task} "
                        f"{spec.input_shape}, {spec.num_outputs})")
    return tuple(sources.Chunk(c.start + first_row, c.stop + first_row, c.path, c.row_group) for c in info.chunks)


def read_file(chunks: tuple[sources.Chunk, ...], data: DataConfig, seed: int) -> Iterator[dict]:
    for chunk in chunks:
        yield sources.read_chunk("parquet", chunk, data, seed)
