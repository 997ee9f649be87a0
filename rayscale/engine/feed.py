"""What the loop trains on: segments of steps. An epoch feed gives one segment per epoch, cut from this rank's
lanes (data/lane_steps.py); the online feed (components/online_feed.py) one per file."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rayscale.config import Config
from rayscale.data.assembly import SplitCache, StepRows
from rayscale.data.lane_steps import LaneCache, LaneOrder, LaneSteps, epoch_pieces, lane_order, piece_rows
from rayscale.data.local_feed import read_shard
from rayscale.data.splits import curriculum_order, read_in_worker, shard_reads
from rayscale.engine.components import read_part
from rayscale.engine.components.adaptive_batch import AdaptiveBatch, AdaptiveBatchPart
from rayscale.engine.components.validation import shown
from rayscale.engine.context import Context
from rayscale.engine.state import TrainState, WorkerPayload
from rayscale.errors import UserError
from rayscale.math import lanes as lane_plan

if TYPE_CHECKING:
    from rayscale.engine.loop import TrainLoop


@dataclass
class Segment:
    epoch: int  # what its log lines say (online: 0)
    steps: Iterator[StepRows]
    first: int  # the index of its first step: those before were committed before a restart
    end_samples: int  # samples seen at its end: a line or a validation due at its last step is the end's


class SplitStreams:
    """This rank's rows: its lanes of a training epoch and its shard of the validation split, replayed from the
    worker's memory once held (bitwise what a read gives), else read through the context, or in this process
    when the split is small (data.read_in_worker_mb: the same blocks), and kept on the way when they may be."""

    def __init__(self, context: Context, payload: WorkerPayload, cfg: Config, lanes: int):
        limit = cfg.data.cache_mb * 2**20
        self.context = context
        # Small splits are read here, not through the context's Ray Data (data.read_in_worker_mb).
        self.read_here = {split: spec for split, spec, rows in (("train", payload.train_split, payload.train_rows),
                                                                ("val", payload.val_split, payload.val_rows))
                          if read_in_worker(spec, rows, cfg.data.read_in_worker_mb)}
        owned = lane_plan.owned_lanes(context.rank, context.world_size, lanes) if not cfg.data.online else []
        sizes = lane_plan.lane_sizes(payload.train_rows, lanes)
        self.train_cache = LaneCache({lane: sizes[lane] for lane in owned}, limit) if payload.cache_train else None
        self.val_cache = SplitCache(payload.val_cache, limit) if payload.val_cache else None
        self.val_reads = shard_reads(payload.val_chunk_rows, context.world_size)[context.rank] \
            if payload.val_split is not None else []

    def train(self, pieces: list[lane_plan.Piece]) -> Iterable[tuple[lane_plan.Piece, dict]]:
        if self.train_cache is not None and self.train_cache.ready:
            return self.train_cache.replay(pieces)
        pairs = piece_rows(self.read("train", [piece.read for piece in pieces], prefetch=4), pieces)
        return self.train_cache.record(pairs) if self.train_cache is not None else pairs

    def val(self) -> Iterable[dict]:
        """This rank's shard of the validation split (its rows only: each row is validated by one rank)."""
        if self.val_cache is not None and self.val_cache.ready:
            return self.val_cache.replay(range(len(self.val_cache.starts)))  # chunk order, as read
        stream = self.read("val", self.val_reads, prefetch=2)
        return self.val_cache.record(stream) if self.val_cache is not None else stream

    def read(self, split: str, reads: list[lane_plan.ChunkRead], prefetch: int) -> Iterable[dict]:
        if split in self.read_here:
            return read_shard(self.read_here[split], reads)
        return self.context.read(split, reads, prefetch)


def started_early(blocks: Iterable) -> Iterator:
    """`blocks`, with the first one already being fetched by a thread: the fetch overlaps what the caller does
    next, and the caller's first `next` waits for it (and raises what it raised)."""
    source, box = iter(blocks), {}

    def fetch() -> None:
        try:
            box["first"] = next(source)
        except StopIteration:
            pass
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = error

    thread = threading.Thread(target=fetch, name="rayscale-first-block", daemon=True)
    thread.start()

    def rest() -> Iterator:
        thread.join()
        if "error" in box:
            raise box["error"]
        if "first" in box:
            yield box["first"]
            yield from source

    return rest()


def run_lanes(state: TrainState, payload: WorkerPayload, world_size: int) -> int:
    """The run's lanes: the checkpoint's, else this first run's (data.lanes, or its worker count); kept in the
    state so every later start reads the same layout. Every worker must own whole lanes."""
    lanes = state.lanes or payload.lanes
    if lanes % world_size:
        raise UserError(f"data.lanes: this run's training rows are laid out in {lanes} lanes"
                        f"{' (its checkpoint says so)' if state.lanes else ''}, which {world_size} workers cannot "
                        f"share evenly; use a worker count that divides {lanes}")
    state.lanes = lanes
    return lanes


class EpochFeed:
    """train.epochs passes over the training split, each in its own order (data.shuffle, the orderings, the
    curriculum), cut into steps from this rank's lanes."""

    def __init__(self, cfg: Config, payload: WorkerPayload, streams: SplitStreams, state: TrainState,
                 context: Context, lanes: int):
        self.cfg, self.payload, self.streams, self.lanes = cfg, payload, streams, lanes
        self.rank, self.world_size = context.rank, context.world_size
        self.owned = lane_plan.owned_lanes(self.rank, self.world_size, lanes)
        self.epochs = cfg.train.epochs
        # Ray Data's first blocks take seconds (read tasks start in new processes) and so does building DDP (its
        # constructor imports torch._dynamo, ~1.8 s): the first epoch starts streaming while the model is built,
        # from where the committed samples left it (every epoch trains each row once).
        self.first_epoch, self.first = state.epoch, None
        if state.epoch < self.epochs:
            positions = state.samples_seen - state.epoch * payload.train_rows
            batch = read_part(state, AdaptiveBatch.name, AdaptiveBatchPart).global_batch_size or \
                cfg.batch.global_batch_size  # the resumed epoch's (the loop's plan says so too, later)
            order = self.order(state.epoch, batch)
            self.first = (positions, order, started_early(self._rows(order, positions)))

    def order(self, epoch: int, global_batch: int) -> LaneOrder:
        curriculum = curriculum_order(self.payload.train_split, epoch, self.epochs, self.payload.train_rows)
        return lane_order(self.cfg.data, self.cfg.seed, epoch, self.lanes, self.payload.train_rows, global_batch,
                          curriculum)

    def _rows(self, order: LaneOrder, positions: int) -> Iterable[tuple[lane_plan.Piece, dict]]:
        starts = lane_plan.stream_starts(self.payload.train_rows, self.lanes, self.owned, order.window, positions)
        return self.streams.train(epoch_pieces(self.payload.train_chunk_rows, self.lanes, starts, order))

    def finished(self, state: TrainState) -> bool:
        return state.epoch >= self.epochs

    def describe(self, train_rows: int) -> str:
        return (f"{train_rows} training rows in {self.lanes} lanes ({len(self.owned)} read by each worker), "
                f"{self.epochs} epochs")

    def segments(self, loop: TrainLoop) -> Iterator[Segment]:
        run = loop.run
        for epoch in range(run.state.epoch, self.epochs):
            loop.start_epoch(epoch)
            first = run.state.step_in_epoch if epoch == run.state.epoch else 0
            run.state.epoch, run.state.step_in_epoch = epoch, 0
            order = self.order(epoch, run.plan.global_batch_size)
            steps = LaneSteps(run.plan, run.rank, run.world_size, self.lanes, run.train_rows, order, first_step=first)
            positions = min(first * run.plan.global_batch_size, run.train_rows)
            early = self.first if epoch == self.first_epoch else None
            rows = early[2] if early is not None and early[:2] == (positions, order) else self._rows(order, positions)
            yield Segment(epoch, iter(steps.steps(rows)), first, (epoch + 1) * run.train_rows)

    def end_segment(self, loop: TrainLoop, segment: Segment) -> bool:
        """The epoch end: validate, the epoch-end line, the components' end (the next batch), then a checkpoint
        where one is due (the last epoch, a rung pause, run.checkpoint_every_seconds), else a report of the
        validation where a consumer wants every one (Tune). True: the run pauses here at a rung."""
        run, epoch = loop.run, segment.epoch
        val = loop.validate()
        run.state.epoch, run.state.step_in_epoch = epoch + 1, 0
        loop.set_validation(val)
        line = loop.line(epoch, epoch_end=True, evaluation=bool(val), validation=val)
        run.progress(f"epoch {epoch + 1}/{self.epochs} done: samples {run.state.samples_seen:,} {shown(val)}")
        for component in loop.components:
            component.end_epoch(run, epoch)
        paused = loop.rung_pause.pause_if_reached(run.state.samples_seen)
        last = epoch + 1 == self.epochs
        metrics = {**line.to_json(), "epoch": epoch + 1, "training_done": last}
        if paused or last or loop.checkpoints.epoch_end_due or loop.checkpoints.owed:
            loop.metrics.reported()
            loop.save(metrics)
        elif loop.payload.report_evaluations:
            loop.metrics.reported()
            loop.context.report(metrics)
        return paused

    def finish(self, loop: TrainLoop) -> None:
        """The last epoch's end was its checkpoint: nothing left."""
