"""Which rows of a source a split holds, counted from metadata, and reading pieces of its chunks: plain data and
numpy only, so the Ray Data tasks that read pieces (`read_split_pieces`) never import torch, and the in-process
reads (local_feed.py) give exactly what they give.

Validation rows are a fixed pseudo-random subset by row id (`is_validation`), the same every epoch and run,
counted without reading data (`count_rows`). A curriculum epoch's order is a sort key per row
(`add_curriculum_keys`, from math/curriculum.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rayscale.config import DataConfig
from rayscale.data import sources
from rayscale.data.sources import concat_columns
from rayscale.math import curriculum, lanes

VAL_BUCKETS = 1_000_000
CURRICULUM_KEY = "curriculum_key"  # the sort key column, dropped after the sort


def _mix(row_ids: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a stable pseudo-random value per row id, independent of order and chunking."""
    z = row_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def is_validation(row_ids: np.ndarray, val_fraction: float) -> np.ndarray:
    """Rows held out for validation: a fixed pseudo-random subset, the same in every epoch and run."""
    return (_mix(row_ids) % np.uint64(VAL_BUCKETS)) < np.uint64(round(val_fraction * VAL_BUCKETS))


def count_rows(info: sources.SourceInfo, split: str, val_fraction: float) -> int:
    """Rows in `split` ("train", "val" or "all"), counted from row ids only, without reading data."""
    return _rows_between(0, info.num_rows, split, val_fraction)


def chunk_rows(info: sources.SourceInfo, split: str, val_fraction: float) -> list[int]:
    """Rows of `split` in each chunk, counted from row ids only: what a shard plan is cut from."""
    return [_rows_between(chunk.start, chunk.stop, split, val_fraction) for chunk in info.chunks]


def split_chunk_rows(spec: SplitSpec) -> list[int]:
    """Rows of the split in each chunk of its source (chunk_rows of a SplitSpec)."""
    return chunk_rows(spec.info, spec.split, spec.val_fraction)


def _rows_between(start: int, stop: int, split: str, val_fraction: float) -> int:
    if split == "all" or val_fraction == 0:
        return stop - start if split != "val" else 0
    held_out = 0
    for low in range(start, stop, 1 << 22):  # bounded memory for billions of rows
        held_out += int(is_validation(np.arange(low, min(low + (1 << 22), stop)), val_fraction).sum())
    return held_out if split == "val" else stop - start - held_out


@dataclass(frozen=True)
class SplitSpec:
    """Which rows of which source a dataset holds: plain data, shipped to Ray Data tasks."""

    info: sources.SourceInfo
    split: str  # "train" | "val" | "all"
    val_fraction: float
    data: DataConfig
    seed: int


def read_split_pieces(batch: dict[str, np.ndarray], spec: SplitSpec) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: pieces of chunks in (lanes.ChunkRead as columns chunk, skip, take), those
    rows of this split out: a chunk's rows of the split in row-id order, `take` of them after `skip`."""
    outputs = []
    for index, skip, take in zip(batch["chunk"], batch["skip"], batch["take"], strict=True):
        rows = _read_split_chunk(int(index), spec)
        outputs.append({key: value[int(skip):int(skip) + int(take)] for key, value in rows.items()})
    return {key: concat_columns([out[key] for out in outputs]) for key in outputs[0]}


def shard_reads(rows: Sequence[int], shards: int) -> list[list[lanes.ChunkRead]]:
    """A split of `rows[c]` rows in chunk c cut into `shards` contiguous parts of (almost) equal rows, each as
    the chunk pieces to read: shard r is what rank r of `shards` reads, so every row is read by one rank (and a
    chunk cut between two shards by both)."""
    order = range(len(rows))
    return [lanes.lane_reads(rows, order, start, stop) for start, stop in lanes.lane_ranges(sum(rows), shards)]


def _read_split_chunk(index: int, spec: SplitSpec) -> dict[str, np.ndarray]:
    rows = sources.read_chunk(spec.info.kind, spec.info.chunks[index], spec.data, spec.seed)
    if spec.split == "all" or spec.val_fraction == 0:
        return rows
    keep = is_validation(rows["row_id"], spec.val_fraction)
    if spec.split == "train":
        keep = ~keep
    return {key: value[keep] for key, value in rows.items()}


@dataclass(frozen=True)
class CurriculumOrder:
    """What a Ray Data task needs to compute one epoch's curriculum sort keys (curriculum.py): plain data."""

    epoch: int
    train_rows: int  # rows per epoch
    span: int  # samples over which the competence grows to 1
    start: float  # data.curriculum_start
    seed: int
    histogram: tuple[tuple[float, ...], tuple[int, ...]]  # the difficulty column's (edges, counts)


def curriculum_order(spec: SplitSpec, epoch: int, epochs: int, train_rows: int) -> CurriculumOrder | None:
    """The curriculum order of a training epoch, or None when the curriculum is off or its span is over."""
    data = spec.data
    if data.curriculum_column is None or spec.info.difficulty_histogram is None:
        return None
    if epoch not in curriculum.curriculum_epochs(data.curriculum_fraction, epochs, train_rows):
        return None
    return CurriculumOrder(epoch, train_rows, curriculum.span_samples(data.curriculum_fraction, epochs, train_rows),
                           data.curriculum_start, spec.seed, spec.info.difficulty_histogram)


def uniform_per_row(row_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A seeded value in [0, 1) per (seed, epoch, row id), whatever the block boundaries or order."""
    salt = np.uint64((seed * 1_000_003 + epoch * 7919 + 12345) % 2**63)
    with np.errstate(over="ignore"):
        mixed = _mix(_mix(row_ids) ^ salt)
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def add_curriculum_keys(batch: dict[str, np.ndarray], order: CurriculumOrder) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: each row's curriculum sort key (ascending = trained first)."""
    edges, counts = (np.asarray(part, dtype=np.float64) for part in order.histogram)
    quantile = curriculum.quantiles(batch["difficulty"], edges, counts)
    keys = curriculum.sort_keys(quantile, uniform_per_row(batch["row_id"], order.seed, order.epoch),
                                epoch=order.epoch, train_rows=order.train_rows, span=order.span,
                                start=order.start)
    return {**batch, CURRICULUM_KEY: keys}


def cache_plan(spec: SplitSpec, rows: int, limit_mb: float) -> list[tuple[int, int]] | None:
    """The chunk bounds a worker needs to replay a validation shard from memory, or None when it should stream
    every validation: caching is off, the rows would not fit the limit, or the rows vary in length."""
    if spec.data.sequence is not None or not fits(spec, rows, limit_mb):
        return None
    return [(chunk.start, chunk.stop) for chunk in spec.info.chunks]


def read_in_worker(spec: SplitSpec | None, rows: int, limit_mb: float) -> bool:
    """Whether a worker reads its part of a split itself (data.read_in_worker_mb): the whole split is estimated
    at most `limit_mb`, so reading it in the worker's own thread costs less than starting Ray Data's read tasks
    (new processes: seconds, on every node, before the first block)."""
    return spec is not None and fits(spec, rows, limit_mb)


def fits(spec: SplitSpec, rows: int, limit_mb: float) -> bool:
    """Whether `rows` of the split are estimated at most `limit_mb` (0: nothing fits)."""
    return limit_mb > 0 and rows * sources.row_bytes(spec.info.spec) <= limit_mb * 2**20
