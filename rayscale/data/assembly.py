"""Worker side, numpy only: a rank's part of a global step (`StepRows`), an ordered row stream cut into steps
(`StepAssembler`: an online file, a validation shard), and the cache that replays a validation shard from memory.

Every rank cuts the same steps and keeps only its slice of each, so every rank runs exactly the same number of
steps (the partial last step included: no row is ever dropped, a rank with none trains a zero-weight row), and
which rows a rank trains on in a step does not depend on the micro-batch size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from rayscale.data.splits import concat_columns
from rayscale.math.batching import BatchPlan, rank_slice


class SplitCache:
    """A validation shard's rows kept by a worker after one whole pass from Ray Data, replayed in later
    validations in exactly the order Ray Data streams them (chunk by chunk, rows in row-id order inside a
    chunk), so a run is bitwise the same with or without it; it saves a Ray Data execution per validation.

    `record` passes a stream through and keeps it; the cache is ready only if the stream was read to its end
    and stayed under `limit_bytes` (checked on the real arrays, not the driver's estimate).
    """

    def __init__(self, bounds: list[tuple[int, int]], limit_bytes: float):
        self.starts = np.array([a for a, _ in bounds], dtype=np.int64)
        self.stops = np.array([b for _, b in bounds], dtype=np.int64)
        self.limit_bytes = limit_bytes
        self.columns: dict[str, np.ndarray] | None = None

    @property
    def ready(self) -> bool:
        return self.columns is not None

    def record(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        kept: list[dict[str, np.ndarray]] | None = [] if not self.ready else None
        size = 0
        for batch in batches:
            if kept is not None and len(batch["row_id"]):  # an empty block adds nothing (see StepAssembler)
                size += sum(value.nbytes for value in batch.values())
                if size > self.limit_bytes or any(value.dtype == object for value in batch.values()):
                    kept = None
                else:
                    kept.append(batch)
            yield batch
        if kept:  # the whole pass arrived
            columns = {key: np.concatenate([b[key] for b in kept]) for key in kept[0]}
            by_id = np.argsort(columns["row_id"], kind="stable")
            self.columns = {key: value[by_id] for key, value in columns.items()}
            for value in self.columns.values():  # replayed as views: collate copies what a step trains on
                value.flags.writeable = False

    def replay(self, order: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        assert self.columns is not None
        row_ids = self.columns["row_id"]
        low, high = np.searchsorted(row_ids, self.starts), np.searchsorted(row_ids, self.stops)
        for index in order:
            if high[index] > low[index]:
                yield {key: value[low[index]:high[index]] for key, value in self.columns.items()}


@dataclass
class StepRows:
    """This rank's rows for one global step (numpy columns) and the step's size across all ranks."""

    rows: dict[str, np.ndarray]
    rows_in_step: int
    padding: bool = False  # this rank had no rows in the step: `rows` is one zero-weight stand-in


def stand_in(rows: dict[str, np.ndarray], rows_in_step: int) -> StepRows:
    """A rank's part of a step it has no rows in: one all-zero row shaped like `rows`, of weight 0. DDP needs every
    rank's forward and backward; zeros (not a real row) make it the same whatever rows the rank read, so a resumed
    run pads exactly as an uninterrupted one."""
    zero = {}
    for key, column in rows.items():
        if column.dtype == object:  # a sequence: one zero token
            zero[key] = np.empty(1, dtype=object)
            zero[key][0] = np.zeros(1, dtype=np.asarray(column[0]).dtype)
        else:
            zero[key] = np.zeros_like(column[:1])
    return StepRows({**zero, "weight": np.zeros(1, dtype=np.float32)}, rows_in_step, padding=True)


def take(columns: dict[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {key: value[index] for key, value in columns.items()}


def split_rows(parts: list[dict[str, np.ndarray]], rows: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The first `rows` rows of `parts` as one set of columns, and the parts left. Copies only to join rows
    that straddle parts; within one part, views."""
    taken, left, need = [], [], rows
    for part in parts:
        size = len(part["row_id"])
        if need >= size:
            taken.append(part)
        elif need > 0:
            taken.append(take(part, slice(0, need)))
            left.append(take(part, slice(need, None)))
        else:
            left.append(part)
        need = max(0, need - size)
    joined = taken[0] if len(taken) == 1 else {key: concat_columns([t[key] for t in taken]) for key in taken[0]}
    return joined, left


class StepAssembler:
    """Cuts an ordered row stream into global steps, in the order it comes, and hands this rank its slice of
    each: what an online file (one pass, in file order) and a validation shard are cut with. Training epochs
    are cut from lanes instead (data/lane_steps.py)."""

    def __init__(self, plan: BatchPlan, rank: int):
        self.plan, self.rank = plan, rank

    def steps(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[StepRows]:
        pending: list[dict[str, np.ndarray]] = []
        pending_rows, batch = 0, self.plan.global_batch_size
        for block in batches:
            if not len(block["row_id"]):  # a chunk with no rows of this split (its x may have lost its dtype)
                continue
            pending.append(block)
            pending_rows += len(block["row_id"])
            while pending_rows >= batch:
                step, pending = split_rows(pending, batch)
                pending_rows -= batch
                yield self._mine(step)
        if pending_rows:
            yield self._mine(split_rows(pending, pending_rows)[0])

    def _mine(self, step: dict[str, np.ndarray]) -> StepRows:
        rows_in_step = len(step["row_id"])
        low, high = rank_slice(rows_in_step, self.plan, self.rank)
        if high == low:  # nothing left for this rank
            return stand_in(step, rows_in_step)
        return StepRows(take(step, slice(low, high)), rows_in_step)
