"""Rows from a source to each worker's micro-batches: Ray Data on the driver side, step assembly on the worker.

Why every worker streams the whole (lazily read) dataset instead of a `streaming_split` shard: Ray assigns
blocks to split shards dynamically, so which rows a rank sees changes from run to run, shards are uneven
(ranks take different step counts and hang, Ray #66085) and `equal=True` silently drops rows (#63285).
Here every rank reads the same ordered stream and keeps only its slice of each global step, so:
  - every rank runs exactly the same number of steps, partial last step included — no row is ever dropped;
  - a run is bitwise reproducible: the order depends on the seed and epoch, never on block boundaries;
  - which rows a rank trains on in a step does not depend on the micro-batch size.
The price is that each worker reads (not trains on) every row; reading is cheap next to training for the
data sizes one node holds, and `data.shuffle: full` still shuffles across the whole dataset in Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rayscale import curriculum, sources
from rayscale.batching import BatchPlan, micro_batch_bounds, rank_slice
from rayscale.config import DataConfig

if TYPE_CHECKING:
    import torch

VAL_BUCKETS = 1_000_000
READ_CPUS = 0.25
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
    if split == "all" or val_fraction == 0:
        return info.num_rows if split != "val" else 0
    held_out = 0
    for start in range(0, info.num_rows, 1 << 22):  # bounded memory for billions of rows
        held_out += int(is_validation(np.arange(start, min(start + (1 << 22), info.num_rows)), val_fraction).sum())
    return held_out if split == "val" else info.num_rows - held_out


@dataclass(frozen=True)
class SplitSpec:
    """Which rows of which source a dataset holds: plain data, shipped to Ray Data tasks."""

    info: sources.SourceInfo
    split: str  # "train" | "val" | "all"
    val_fraction: float
    data: DataConfig
    seed: int


def read_split_chunks(batch: dict[str, np.ndarray], spec: SplitSpec) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: chunk descriptors in, those chunks' rows (of this split) out."""
    outputs = [_read_split_chunk(int(index), spec) for index in batch["chunk"]]
    return {key: _concat([out[key] for out in outputs]) for key in outputs[0]}


def _read_split_chunk(index: int, spec: SplitSpec) -> dict[str, np.ndarray]:
    rows = sources.read_chunk(spec.info.kind, spec.info.chunks[index], spec.data, spec.seed)
    if spec.split == "all" or spec.val_fraction == 0:
        return rows
    keep = is_validation(rows["row_id"], spec.val_fraction)
    if spec.split == "train":
        keep = ~keep
    return {key: value[keep] for key, value in rows.items()}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if parts[0].dtype == object:
        out = np.empty(sum(len(p) for p in parts), dtype=object)
        out[:] = [item for part in parts for item in part]
        return out
    return np.concatenate(parts)


def chunk_order(num_chunks: int, shuffle: str, seed: int, epoch: int | None) -> np.ndarray:
    """The order in which an epoch streams a split's chunks: block (file / row-group) order, fresh each epoch
    under local shuffle, else row-id order."""
    order = np.arange(num_chunks)
    if shuffle == "local" and epoch is not None:
        order = np.random.default_rng([seed, epoch, 17]).permutation(order)
    return order


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


def read_tasks_at_once(chunks: int) -> int:
    """The most read tasks a split runs at once: as many as the cluster has CPUs (or, autoscaling, can have).

    A fraction of a CPU per read task: Ray Data's budget excludes every running trainer's CPUs, so with
    concurrent Tune trials less than one whole CPU may be left, and a 1-CPU task would never start. But no
    more tasks at once than CPUs: each new task process pays ~4 s of CPU to start (Ray Data's imports, the
    source's), and 4 per core made a digits run's first pass 25 s instead of 8-10 (measured). On an autoscaling
    cluster the dataset is built before the training nodes exist, so the bound is the configured maximum (what
    Ray Data's own shuffle sizes itself by), not the head node alone; Ray Data's budget still limits the tasks
    to the CPUs there are at each moment."""
    import ray

    cpus = (ray._private.state.state.get_max_resources_from_cluster_config() or {}).get("CPU") \
        or ray.cluster_resources().get("CPU", 1)
    return max(1, min(chunks, int(cpus)))


def build_dataset(spec: SplitSpec, epoch: int | None = None, order: CurriculumOrder | None = None):
    """A lazy Ray Dataset of the split; for training, ordered (or shuffled) for `epoch`.

    With a curriculum `order` the epoch's rows are sorted by their curriculum key in Ray Data (a distributed
    sort, spilled by Ray's object store, never gathered on the driver), ties broken by row id: one total order,
    so every rank and every run (and a resumed one) streams the same rows in the same order.
    """
    import ray.data

    shuffle = spec.data.shuffle if spec.split == "train" and order is None else "none"
    items = [{"chunk": int(i)} for i in chunk_order(len(spec.info.chunks), shuffle, spec.seed, epoch)]
    tasks_at_once = ray.data.TaskPoolStrategy(size=read_tasks_at_once(len(items)))
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_split_chunks, fn_kwargs={"spec": spec}, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS,
        compute=tasks_at_once)
    if shuffle == "full" and epoch is not None:
        dataset = dataset.random_shuffle(seed=spec.seed * 1000 + epoch, num_cpus=READ_CPUS)
    if order is not None:
        dataset = dataset.map_batches(add_curriculum_keys, fn_kwargs={"order": order}, batch_format="numpy",
                                      num_cpus=READ_CPUS)
        dataset = dataset.sort([CURRICULUM_KEY, "row_id"]).drop_columns([CURRICULUM_KEY])
    return dataset


def cache_plan(spec: SplitSpec, rows: int, limit_mb: float) -> list[tuple[int, int]] | None:
    """The chunk bounds a worker needs to replay the split from memory, or None when it should stream every
    epoch: caching is off, the rows would not fit the limit, the rows vary in length, or a full shuffle
    (done by Ray Data, differently each epoch) decides the order."""
    shape = spec.info.spec.input_shape
    if limit_mb <= 0 or spec.data.sequence is not None or (spec.split == "train" and spec.data.shuffle == "full"):
        return None
    row_bytes = 4 * int(np.prod(shape[1:] if shape and shape[0] is None else shape)) + 8 + 8 + 4  # x, y, id, weight
    if rows * row_bytes > limit_mb * 2**20:
        return None
    return [(chunk.start, chunk.stop) for chunk in spec.info.chunks]


# ------------------------------------------------------------------------------------------- worker side

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
    joined = taken[0] if len(taken) == 1 else {key: _concat([t[key] for t in taken]) for key in taken[0]}
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


# ------------------------------------------------------------------------------------------------ collate

def _owned(array: np.ndarray) -> np.ndarray:
    """`array` where the tensor may share it (contiguous and writable), else a contiguous copy. Read-only
    arrays are Arrow's memory or the worker's cache, which a model writing to its input must not change."""
    return array if array.flags.c_contiguous and array.flags.writeable else np.array(array, order="C")


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """On CPU a tensor sharing `array` where it may (`_owned`). On a GPU one copy into page-locked host memory,
    then an asynchronous copy: from ordinary (pageable) memory CUDA first waits for every kernel already queued
    on the stream, so the host would stall at each batch until the previous step had finished instead of
    preparing the next batch while the GPU works. PyTorch's caching host allocator keeps the page-locked block
    until the copy has run, and reuses it."""
    import torch

    if device.type != "cuda":
        return torch.from_numpy(_owned(array))
    dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
    staged = torch.empty(array.shape, dtype=dtype, pin_memory=True)
    staged.numpy()[...] = array
    return staged.to(device, non_blocking=True)


def collate(rows: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy rows -> tensors on `device`; sequences are padded to the longest in this batch, with a mask."""
    x, y = rows["x"], rows["y"]
    if x.dtype == object:  # variable-length token sequences
        lengths = np.fromiter((len(seq) for seq in x), dtype=np.int64, count=len(x))
        width = int(lengths.max()) if len(lengths) else 1
        tokens = np.zeros((len(x), width), dtype=np.int64)
        labels = np.zeros((len(x), width), dtype=np.int64)
        for i, (seq, lab) in enumerate(zip(x, y, strict=True)):
            tokens[i, :len(seq)] = seq
            labels[i, :len(lab)] = lab
        arrays = {"x": tokens, "y": labels, "mask": np.arange(width)[None, :] < lengths[:, None]}
    else:
        arrays = {"x": x, "y": y}
        if y.ndim == 2 and np.issubdtype(y.dtype, np.integer):
            # Token sequences that all have the same length arrive from Arrow as a 2-D array, not as objects:
            # every position is a real token.
            arrays["mask"] = np.ones(y.shape, dtype=bool)
    if "weight" in rows:
        arrays["weight"] = rows["weight"].astype(np.float32, copy=False)
    # Imported in to_device, not at the top: every Ray Data read task imports this module (read_split_chunks),
    # and torch's import (~2.7 s of CPU) in each of those processes delayed a digits run's first batch by ~30 s.
    return {key: to_device(value, device) for key, value in arrays.items()}


def micro_batches(step: StepRows, micro_batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    rows = len(step.rows["row_id"])
    return [collate(_take(step.rows, slice(a, b)), device) for a, b in micro_batch_bounds(rows, micro_batch_size)]
