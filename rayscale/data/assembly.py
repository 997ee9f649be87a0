"""Worker side: an ordered row stream cut into global steps, this rank's slice of each; and the split cache that
replays later epochs from memory. numpy only.

Every rank reads the same ordered stream and keeps only its slice of each global step, so every rank runs exactly
the same number of steps (the partial last step included: no row is ever dropped), a run is bitwise
reproducible (the order depends on the seed and epoch, never on block boundaries), and which rows a rank trains
on in a step does not depend on the micro-batch size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from rayscale.data.splits import concat_columns
from rayscale.math.batching import BatchPlan, rank_slice


class SplitCache:
    """A split's rows kept by a worker after one whole pass from Ray Data, replayed in later epochs in exactly
    the order Ray Data would stream them (chunk by chunk in `chunk_order`, rows in row-id order inside a
    chunk), so a run is bitwise the same with or without it; it saves a Ray Data execution per epoch.

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


def _take(columns: dict[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {key: value[index] for key, value in columns.items()}


def _split_rows(parts: list[dict[str, np.ndarray]], rows: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The first `rows` rows of `parts` as one set of columns, and the parts left. Copies only to join rows
    that straddle parts; within one part, views."""
    taken, left, need = [], [], rows
    for part in parts:
        size = len(part["row_id"])
        if need >= size:
            taken.append(part)
        elif need > 0:
            taken.append(_take(part, slice(0, need)))
            left.append(_take(part, slice(need, None)))
        else:
            left.append(part)
        need = max(0, need - size)
    joined = taken[0] if len(taken) == 1 else {key: concat_columns([t[key] for t in taken]) for key in taken[0]}
    return joined, left


class StepAssembler:
    """Cuts an ordered row stream into global steps and hands this rank its slice of each.

    Rows are gathered into windows of a fixed number of rows (a multiple of the global batch), each window
    is permuted with an RNG keyed by (seed, epoch, window): position-based, so the result never depends on
    how Ray happened to cut the stream into blocks. Optional length bucketing and class stratification
    rearrange rows inside a window, before steps are cut, so they too are independent of micro-batching.
    """

    def __init__(self, plan: BatchPlan, rank: int, *, seed: int, epoch: int, shuffle: str, window_rows: int,
                 bucket_by_length: bool = False, stratified: bool = False):
        self.plan, self.rank, self.seed, self.epoch = plan, rank, seed, epoch
        self.shuffle, self.bucket_by_length, self.stratified = shuffle, bucket_by_length, stratified
        steps_per_window = max(1, -(-window_rows // plan.global_batch_size))
        self.window_rows = steps_per_window * plan.global_batch_size

    def steps(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[StepRows]:
        pending: list[dict[str, np.ndarray]] = []
        pending_rows, window_index = 0, 0
        for batch in batches:
            if not len(batch["row_id"]):  # a chunk with no rows of this split (its x may have lost its dtype)
                continue
            pending.append(batch)
            pending_rows += len(batch["row_id"])
            while pending_rows >= self.window_rows:
                window, pending = _split_rows(pending, self.window_rows)
                pending_rows -= self.window_rows
                yield from self._window_steps(window, window_index)
                window_index += 1
        if pending_rows:
            yield from self._window_steps(_split_rows(pending, pending_rows)[0], window_index)

    def _arrange(self, window: dict[str, np.ndarray], window_index: int) -> np.ndarray | None:
        """The window's rows in training order, as indices; None: in the order they came."""
        size = len(window["row_id"])
        rng = np.random.default_rng([self.seed, self.epoch, window_index])
        order = rng.permutation(size) if self.shuffle == "local" else None
        batch = self.plan.global_batch_size
        bucketed = self.bucket_by_length and window["x"].dtype == object
        stratified = self.stratified and window["y"].ndim == 1 and window["y"].dtype.kind in "iu"
        if order is None and (bucketed or stratified):
            order = np.arange(size)
        if bucketed:
            lengths = np.fromiter((len(window["x"][i]) for i in order), dtype=np.int64, count=size)
            order = order[np.argsort(lengths, kind="stable")]
            groups = [order[i:i + batch] for i in range(0, size, batch)]
            full = [g for g in groups if len(g) == batch]
            tail = [g for g in groups if len(g) < batch]
            order = np.concatenate([full[i] for i in rng.permutation(len(full))] + tail) if full else order
        elif stratified:
            # Spread each class evenly through the window: sort by a row's position within its class.
            labels = window["y"][order]
            position = np.zeros(size)
            for label in np.unique(labels):
                members = np.flatnonzero(labels == label)
                position[members] = (np.arange(len(members)) + 0.5) / len(members)
            order = order[np.lexsort((labels, position))]
        return order

    def _window_steps(self, window: dict[str, np.ndarray], window_index: int) -> Iterator[StepRows]:
        # Only this rank's rows of each step are gathered (a view where the order is the stream's): the
        # window as a whole is never copied, though every rank reads all of it.
        order = self._arrange(window, window_index)
        size = len(window["row_id"])
        for start in range(0, size, self.plan.global_batch_size):
            rows_in_step = min(self.plan.global_batch_size, size - start)
            low, high = rank_slice(rows_in_step, self.plan, self.rank)
            padding = high == low
            if padding:  # nothing left for this rank: one zero-weight row (the step's first) keeps DDP in step
                low, high = 0, 1
            index = slice(start + low, start + high) if order is None else order[start + low:start + high]
            mine = _take(window, index)
            if padding:
                mine["weight"] = np.zeros(1, dtype=np.float32)
            yield StepRows(mine, rows_in_step, padding=padding)
