"""A rank's global steps, cut from its own lanes (math/lanes.py): numpy only, so the in-process feed and a Ray
worker cut exactly the same steps.

Each epoch a lane's rows come in the epoch's order: its chunk pieces permuted (data.shuffle local), then
arranged window by window, a window being `window` consecutive rows of the lane; each window is permuted with
an RNG keyed by (seed, epoch, lane, window), so the order never depends on how Ray cut the stream into blocks.
Class stratification and length bucketing rearrange rows inside a window. data.shuffle full and a curriculum
epoch take the whole lane as one window (a full permutation of the lane; the lane sorted by curriculum key).

Global step s then holds the epoch positions [s x B, (s + 1) x B); position p is row p // lanes of lane
p % lanes, so a step takes about B / lanes rows from the front of every lane and a rank the rows of its own
lanes, interleaved by position (lanes.rank_step).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from rayscale.config import DataConfig
from rayscale.data.assembly import StepRows, split_rows, stand_in, take
from rayscale.data.splits import CURRICULUM_KEY, CurriculumOrder, add_curriculum_keys, concat_columns
from rayscale.math import lanes as lane_plan
from rayscale.math.batching import BatchPlan

Columns = dict[str, np.ndarray]


@dataclass(frozen=True)
class LaneOrder:
    """How an epoch orders the rows of each lane: plain data, the same on every rank."""

    seed: int
    epoch: int
    shuffle: str  # none | local | full
    window: int  # rows per window of a lane (a whole lane for full and the curriculum)
    bucket_by_length: bool = False
    stratified: bool = False
    curriculum: CurriculumOrder | None = None  # this epoch's curriculum sort, if any
    group: int = 1  # bucket_by_length: rows of a lane per length group, its share of a step (windows hold whole
    # groups, so a lane's share of every step is one group)

    def piece_order(self, lane: int, pieces: int) -> np.ndarray:
        """The order an epoch takes a lane's canonical pieces in: fresh each epoch under local shuffle."""
        if self.shuffle == "local" and self.curriculum is None:
            return np.random.default_rng([self.seed, self.epoch, lane, 17]).permutation(pieces)
        return np.arange(pieces)

    def arrange(self, window: Columns, lane: int, index: int) -> np.ndarray | None:
        """The window's rows in training order, as indices; None: in the order they came."""
        size = len(window["row_id"])
        if self.curriculum is not None:  # ascending key, ties by row id: one total order on every rank
            keys = add_curriculum_keys(window, self.curriculum)[CURRICULUM_KEY]
            return np.lexsort((window["row_id"], keys))
        rng = np.random.default_rng([self.seed, self.epoch, lane, index])
        order = rng.permutation(size) if self.shuffle in ("local", "full") else None
        bucketed = self.bucket_by_length and window["x"].dtype == object
        stratified = self.stratified and window["y"].ndim == 1 and window["y"].dtype.kind in "iu"
        if order is None and (bucketed or stratified):
            order = np.arange(size)
        if bucketed:
            # Sorted by length and cut into groups of about a lane's share of a step; the groups are shuffled
            # with an RNG every lane shares, so a step takes the same length quantile from each lane's window.
            lengths = np.fromiter((len(window["x"][i]) for i in order), dtype=np.int64, count=size)
            order = order[np.argsort(lengths, kind="stable")]
            groups = [order[i:i + self.group] for i in range(0, size, self.group)]
            full = [g for g in groups if len(g) == self.group]
            tail = [g for g in groups if len(g) < self.group]
            shared = np.random.default_rng([self.seed, self.epoch, index, 23])
            order = np.concatenate([full[i] for i in shared.permutation(len(full))] + tail) if full else order
        elif stratified:
            # Spread each class evenly through the window: sort by a row's position within its class.
            labels = window["y"][order]
            position = np.zeros(size)
            for label in np.unique(labels):
                members = np.flatnonzero(labels == label)
                position[members] = (np.arange(len(members)) + 0.5) / len(members)
            order = order[np.lexsort((labels, position))]
        return order


def lane_order(data: DataConfig, seed: int, epoch: int, lanes: int, rows: int, global_batch: int,
               curriculum: CurriculumOrder | None) -> LaneOrder:
    """The epoch's LaneOrder from the data config (data.shuffle, shuffle_buffer_rows, the orderings): a lane's
    window is its share of the shuffle buffer, in whole shares of a step (so a step's rows from one lane come
    from one window, and one length group), or the whole lane."""
    share = max(1, global_batch // lanes)
    if data.shuffle == "full" or curriculum is not None:
        window = max(1, -(-rows // lanes))
    else:
        window = -(-max(1, -(-data.shuffle_buffer_rows // lanes)) // share) * share
    return LaneOrder(seed, epoch, data.shuffle, window, data.bucket_by_length, data.stratified, curriculum, share)


def epoch_pieces(chunk_rows, lanes: int, starts: dict[int, int], order: LaneOrder) -> list[lane_plan.Piece]:
    """What a rank reads of an epoch: its lanes from `starts` (lanes.stream_starts), in the epoch's order."""
    return lane_plan.epoch_reads(chunk_rows, lanes, starts, order.piece_order)


def piece_rows(blocks: Iterable[Columns], pieces: list[lane_plan.Piece]) -> Iterator[tuple[lane_plan.Piece, Columns]]:
    """The rows of each piece, from a stream of blocks holding the pieces' rows in order (however Ray cut it)."""
    parts: list[Columns] = []
    have, index = 0, 0
    for block in blocks:
        if not len(block["row_id"]):  # a piece with no rows of the split, or an empty block
            continue
        parts.append(block)
        have += len(block["row_id"])
        while index < len(pieces) and have >= pieces[index].read.take:
            rows, parts = split_rows(parts, pieces[index].read.take)
            have -= pieces[index].read.take
            yield pieces[index], rows
            index += 1
    if index < len(pieces) or have:
        missing = sum(piece.read.take for piece in pieces[index:]) - have
        raise RuntimeError(f"the training stream gave {'fewer' if missing > 0 else 'more'} rows than the source's "
                           f"metadata said ({abs(missing)} rows): did data.source change while the run was going?")


class LaneCache:
    """A rank's lanes kept in memory after one whole pass, each in canonical (row-id) order, so later epochs
    replay their pieces without a Ray Data execution: bitwise the rows a stream would give. Lanes are fixed
    for a worker count, so a rank holds about 1/N of the split. Kept only if the pass read every row of the
    lanes and stayed under `limit_bytes` with fixed-width rows."""

    def __init__(self, sizes: dict[int, int], limit_bytes: float):
        self.sizes, self.limit_bytes = sizes, limit_bytes
        self.columns: dict[int, Columns] | None = None

    @property
    def ready(self) -> bool:
        return self.columns is not None

    def record(self, pairs: Iterable[tuple[lane_plan.Piece, Columns]]
               ) -> Iterator[tuple[lane_plan.Piece, Columns]]:
        kept: list[tuple[lane_plan.Piece, Columns]] | None = [] if not self.ready else None
        size = 0
        for piece, rows in pairs:
            if kept is not None:
                size += sum(value.nbytes for value in rows.values())
                fits = size <= self.limit_bytes and all(value.dtype != object for value in rows.values())
                if fits:
                    kept.append((piece, rows))
                else:
                    kept = None
            yield piece, rows
        if kept is None:
            return
        by_lane: dict[int, list[tuple[int, Columns]]] = {lane: [] for lane in self.sizes}
        for piece, rows in kept:
            by_lane[piece.lane].append((piece.offset, rows))
        if any(sum(len(rows["row_id"]) for _, rows in parts) != self.sizes[lane] for lane, parts in by_lane.items()):
            return  # not a whole pass (a resumed epoch starts inside its lanes)
        self.columns = {}
        for lane, parts in by_lane.items():
            parts.sort(key=lambda part: part[0])
            self.columns[lane] = {key: np.concatenate([rows[key] for _, rows in parts]) for key in parts[0][1]} \
                if parts else {}
            for value in self.columns[lane].values():  # replayed as views: collate copies what a step trains on
                value.flags.writeable = False

    def replay(self, pieces: list[lane_plan.Piece]) -> Iterator[tuple[lane_plan.Piece, Columns]]:
        assert self.columns is not None
        for piece in pieces:
            lane = self.columns[piece.lane]
            yield piece, {key: value[piece.offset:piece.offset + piece.read.take] for key, value in lane.items()}


class _Lane:
    """One owned lane within an epoch: rows waiting to complete a window, and arranged rows waiting for steps."""

    def __init__(self, lane: int, start: int, consumed: int, size: int, window: int):
        self.lane, self.window = lane, window
        self.index = start // window  # the window the stream starts in
        self.drop = consumed - start  # rows of that window trained before a restart
        self.left = size - start  # rows still to come from the stream
        self.pending: list[Columns] = []
        self.pending_rows = 0
        self.ready: list[Columns] = []
        self.ready_rows = 0

    def add(self, rows: Columns, order: LaneOrder) -> None:
        self.pending.append(rows)
        self.pending_rows += len(rows["row_id"])
        self.left -= len(rows["row_id"])
        while self.pending_rows >= self.window or (self.left == 0 and self.pending_rows):
            size = min(self.window, self.pending_rows)
            window, self.pending = split_rows(self.pending, size)
            self.pending_rows -= size
            arranged = order.arrange(window, self.lane, self.index)
            if arranged is not None:
                window = take(window, arranged)
            if self.drop:
                window, self.drop = take(window, slice(self.drop, None)), 0
            self.index += 1
            self.ready.append(window)
            self.ready_rows += len(window["row_id"])

    def pop(self, rows: int) -> Columns | None:
        if rows == 0:
            return None
        taken, self.ready = split_rows(self.ready, rows)
        self.ready_rows -= rows
        return taken


class LaneSteps:
    """Cuts this rank's lane streams into its part of each global step, from step `first_step` of the epoch
    (a restart: the lanes' streams start at their window holding the first untrained row, lanes.resume_points)."""

    def __init__(self, plan: BatchPlan, rank: int, world_size: int, lanes: int, rows: int, order: LaneOrder,
                 first_step: int = 0):
        self.plan, self.rank, self.world_size, self.lanes, self.rows = plan, rank, world_size, lanes, rows
        self.order, self.first_step = order, first_step
        self.owned = lane_plan.owned_lanes(rank, world_size, lanes)
        positions = min(first_step * plan.global_batch_size, rows)
        consumed = lane_plan.resume_points(first_step, rows, plan.global_batch_size, lanes)
        sizes = lane_plan.lane_sizes(rows, lanes)
        self.starts = lane_plan.stream_starts(rows, lanes, self.owned, order.window, positions)
        self.lane = {lane: _Lane(lane, self.starts[lane], consumed[lane], sizes[lane], order.window)
                     for lane in self.owned}
        self.shape: Columns | None = None  # a row of this rank's, to shape a stand-in row by

    def steps(self, pairs: Iterable[tuple[lane_plan.Piece, Columns]]) -> Iterator[StepRows]:
        step, steps = self.first_step, -(-self.rows // self.plan.global_batch_size)
        for piece, rows in pairs:
            if self.shape is None:
                self.shape = take(rows, slice(0, 1))
            self.lane[piece.lane].add(rows, self.order)
            while step < steps and (cut := self._step(step)) is not None:
                yield cut
                step += 1
        while step < steps:
            cut = self._step(step)
            if cut is None:
                raise RuntimeError(f"rank {self.rank}: its lanes ended before step {step} of {steps}")
            yield cut
            step += 1

    def _step(self, step: int) -> StepRows | None:
        """This rank's rows of `step`, or None while a lane's rows for it have not all arrived."""
        part = lane_plan.rank_step(step, self.rows, self.plan.global_batch_size, self.lanes, self.rank,
                                   self.world_size)
        if any(self.lane[lane].ready_rows < count for lane, count in part.takes):
            return None
        taken = [rows for lane, count in part.takes if (rows := self.lane[lane].pop(count)) is not None]
        if not taken:  # nothing of this rank's in a partial last step
            if self.shape is None:
                raise RuntimeError(f"rank {self.rank}: no rows to pad step {step} with")
            return stand_in(self.shape, part.rows_in_step)
        joined = taken[0] if len(taken) == 1 else {key: concat_columns([t[key] for t in taken]) for key in taken[0]}
        in_order = joined if len(taken) == 1 else take(joined, part.order)
        return StepRows(in_order, part.rows_in_step)

