"""What the loop trains on: segments of steps. An epoch feed gives one segment per epoch; the online feed
(components/online_feed.py) one per file. Each segment's steps come from its split's row stream, cut into
global steps by data.assembly.StepAssembler."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rayscale.config import Config
from rayscale.data.assembly import SplitCache, StepAssembler, StepRows
from rayscale.data.splits import chunk_order
from rayscale.engine.components.validation import shown
from rayscale.engine.context import Context
from rayscale.engine.state import TrainState, WorkerPayload

if TYPE_CHECKING:
    from rayscale.engine.loop import TrainLoop


@dataclass
class Segment:
    epoch: int  # what its log lines say (online: 0)
    steps: Iterator[StepRows]
    skip: int  # steps committed before a restart: read past, never trained twice
    end_samples: int  # samples seen at its end: a line or a validation due at its last step is the end's


class SplitStreams:
    """An epoch's numpy blocks of a split: replayed from the worker's cache once it holds the split, else
    streamed by the context (and kept on the way when it may be cached). A curriculum epoch's order is Ray Data's
    sort, which the cache cannot replay: it always streams (the cache may still record it)."""

    def __init__(self, context: Context, payload: WorkerPayload, cfg: Config):
        limit = cfg.data.cache_mb * 2**20
        self.context, self.cfg, self.curriculum_epochs = context, cfg, set(payload.curriculum_epochs)
        self.train_cache = SplitCache(payload.train_cache, limit) if payload.train_cache else None
        self.val_cache = SplitCache(payload.val_cache, limit) if payload.val_cache else None

    def train(self, epoch: int) -> Iterable[dict]:
        return self._rows(f"train_{epoch}", self.train_cache, epoch, self.cfg.data.shuffle, prefetch=4)

    def val(self) -> Iterable[dict]:
        """This rank's shard of the validation split (its rows only: each row is validated by one rank)."""
        return self._rows(f"val_{self.context.rank}", self.val_cache, None, "none", prefetch=2)

    def _rows(self, name: str, cache: SplitCache | None, order_epoch: int | None, shuffle: str, prefetch: int):
        if cache is not None and cache.ready and order_epoch not in self.curriculum_epochs:
            return cache.replay(chunk_order(len(cache.starts), shuffle, self.cfg.seed, order_epoch))
        stream = self.context.stream(name, prefetch)
        return cache.record(stream) if cache is not None else stream


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


class EpochFeed:
    """train.epochs passes over the training split, each in its own order (data.shuffle, the curriculum)."""

    def __init__(self, cfg: Config, payload: WorkerPayload, streams: SplitStreams, state: TrainState):
        self.cfg, self.payload, self.streams = cfg, payload, streams
        self.epochs = cfg.train.epochs
        # Ray Data's first blocks take seconds (read tasks start in new processes) and so does building DDP (its
        # constructor imports torch._dynamo, ~1.8 s): the first epoch starts streaming while the model is built.
        self.first_epoch = state.epoch
        self.first = started_early(streams.train(state.epoch)) if state.epoch < self.epochs else None

    def finished(self, state: TrainState) -> bool:
        return state.epoch >= self.epochs

    def describe(self, train_rows: int) -> str:
        return f"{train_rows} training rows, {self.epochs} epochs"

    def segments(self, loop: TrainLoop) -> Iterator[Segment]:
        run, data = loop.run, self.cfg.data
        for epoch in range(run.state.epoch, self.epochs):
            loop.start_epoch(epoch)
            skip = run.state.step_in_epoch if epoch == run.state.epoch else 0
            run.state.epoch, run.state.step_in_epoch = epoch, 0
            # A curriculum epoch arrives sorted (data/datasets.py): the assembler keeps that order.
            assembler = StepAssembler(run.plan, run.rank, seed=self.cfg.seed, epoch=epoch,
                                      shuffle="none" if epoch in self.payload.curriculum_epochs else data.shuffle,
                                      window_rows=data.shuffle_buffer_rows, bucket_by_length=data.bucket_by_length,
                                      stratified=data.stratified)
            blocks = self.first if epoch == self.first_epoch else self.streams.train(epoch)
            yield Segment(epoch, iter(assembler.steps(blocks)), skip, (epoch + 1) * run.train_rows)

    def end_segment(self, loop: TrainLoop, segment: Segment) -> bool:
        """The epoch end: validate, the epoch-end line, the components' end (the next batch), a checkpoint.
        True: the run pauses here at a rung."""
        run, epoch = loop.run, segment.epoch
        val = loop.validate()
        run.state.epoch, run.state.step_in_epoch = epoch + 1, 0
        loop.set_validation(val)
        line = loop.line(epoch, epoch_end=True, evaluation=bool(val), validation=val)
        run.say(f"epoch {epoch + 1}/{self.epochs} done: samples {run.state.samples_seen:,} {shown(val)}")
        for component in loop.components:
            component.end_epoch(run, epoch)
        loop.metrics.reported()
        paused = loop.rung_pause.pause_if_reached(run.state.samples_seen)
        loop.save({**line.to_json(), "epoch": epoch + 1, "training_done": epoch + 1 == self.epochs})
        return paused

    def finish(self, loop: TrainLoop) -> None:
        """Every epoch's end was its checkpoint: nothing left."""
