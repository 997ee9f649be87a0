"""Collate, the validation split and its shards, the cache of a validation shard, and the stream cutter for online
files and validation, without Ray: numpy column dicts shaped like Ray Data's numpy batches. Training steps cut
from lanes are tests/test_lane_steps.py's."""

import types

import numpy as np
import pytest
import torch

from rayscale.config import DataConfig, SyntheticConfig
from rayscale.data import sources
from rayscale.data.assembly import SplitCache, StepAssembler, StepRows
from rayscale.data.collate import collate, micro_batches
from rayscale.data.datasets import read_tasks_at_once
from rayscale.data.splits import (
    SplitSpec,
    cache_plan,
    chunk_rows,
    count_rows,
    is_validation,
    read_in_worker,
    read_split_pieces,
)
from rayscale.math.batching import plan_batches

CPU = torch.device("cpu")
FEATURES = 3


# ------------------------------------------------------------------------------------------------ helpers

def tabular_rows(rows: int, labels: np.ndarray | None = None, weight: bool = False) -> dict[str, np.ndarray]:
    """Tabular columns whose first feature is the row id, so a row can be recognised after collate."""
    row_id = np.arange(rows, dtype=np.int64)
    x = np.zeros((rows, FEATURES), dtype=np.float32)
    x[:, 0] = row_id
    columns = {"row_id": row_id, "x": x, "y": (row_id % 5) if labels is None else labels.astype(np.int64)}
    if weight:
        columns["weight"] = np.linspace(0.5, 2.0, rows, dtype=np.float32)
    return columns


def sequence_rows(rows: int, max_length: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Variable-length token sequences (object arrays of int64 arrays), labels one per token."""
    lengths = np.random.default_rng(seed).integers(1, max_length + 1, size=rows)
    x, y = np.empty(rows, dtype=object), np.empty(rows, dtype=object)
    for i, length in enumerate(lengths):
        x[i] = np.arange(1, length + 1, dtype=np.int64) + i  # never 0, so padding is visible
        y[i] = np.full(length, i % 7, dtype=np.int64)
    return {"row_id": np.arange(rows, dtype=np.int64), "x": x, "y": y}


def cut(columns: dict[str, np.ndarray], block_rows: int | None) -> list[dict[str, np.ndarray]]:
    """The same stream cut into blocks of `block_rows` (None: one block), as Ray might deliver it."""
    rows = len(columns["row_id"])
    size = block_rows or max(rows, 1)
    return [{key: value[start:start + size] for key, value in columns.items()} for start in range(0, rows, size)]


# -------------------------------------------------------------------------------------------- 8. collate

@pytest.mark.parametrize("y, y_dtype, y_shape", [
    pytest.param(np.arange(5, dtype=np.int64), torch.int64, (5,), id="classes"),
    pytest.param(np.ones((5, 2), dtype=np.float32), torch.float32, (5, 2), id="regression-targets"),
])
def test_collate_tabular(y, y_dtype, y_shape):
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    batch = collate({"row_id": np.arange(5), "x": x, "y": y}, CPU)
    assert set(batch) == {"x", "y"}  # no mask for tabular rows, no weight unless the rows carry one
    assert batch["x"].dtype == torch.float32 and batch["x"].shape == (5, 3)
    assert torch.equal(batch["x"], torch.from_numpy(x))
    assert batch["y"].dtype == y_dtype and batch["y"].shape == y_shape
    weighted = collate({"row_id": np.arange(5), "x": x, "y": y, "weight": np.array([1, 0, 2, 1, 1.5])}, CPU)
    assert weighted["weight"].dtype == torch.float32
    assert weighted["weight"].tolist() == [1.0, 0.0, 2.0, 1.0, 1.5]


def test_collate_images_keep_their_shape():
    x = np.zeros((4, 1, 8, 8), dtype=np.float32)
    batch = collate({"row_id": np.arange(4), "x": x, "y": np.zeros(4, dtype=np.int64)}, CPU)
    assert batch["x"].shape == (4, 1, 8, 8)


def test_collate_pads_sequences_to_the_longest_with_a_mask():
    rows = sequence_rows(3)
    rows["x"][:] = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    rows["y"][:] = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])]
    rows["weight"] = np.array([1.0, 0.0, 0.5], dtype=np.float32)
    batch = collate(rows, CPU)
    assert batch["x"].dtype == batch["y"].dtype == torch.int64 and batch["mask"].dtype == torch.bool
    assert batch["x"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]  # padded to 3, the longest here
    assert batch["y"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert batch["mask"].tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert batch["weight"].tolist() == [1.0, 0.0, 0.5]


def test_collate_masks_equal_length_sequences_that_arrive_as_a_2d_array():
    """Arrow hands a block whose sequences all have one length over as a 2-D int array, not objects: the
    engine's token counts still need the mask (a KeyError before this was handled)."""
    tokens = np.arange(12, dtype=np.int64).reshape(3, 4)
    batch = collate({"row_id": np.arange(3), "x": tokens, "y": tokens + 1}, CPU)
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (3, 4) and bool(batch["mask"].all())
    assert torch.equal(batch["y"], torch.from_numpy(tokens + 1))
    from rayscale.engine import tasks

    assert float(tasks.count("token_classification", batch)) == 12


def test_collate_pads_per_micro_batch_not_per_dataset():
    columns = sequence_rows(40, max_length=64, seed=4)
    lengths = np.array([len(seq) for seq in columns["x"]])
    step = StepRows(columns, rows_in_step=40)
    parts = micro_batches(step, 8, CPU)
    for index, part in enumerate(parts):
        here = lengths[8 * index:8 * index + 8]
        assert part["x"].shape == (len(here), here.max())
        assert part["mask"].sum(dim=1).tolist() == here.tolist()  # True exactly on the real tokens


@pytest.mark.parametrize("rows, micro, sizes", [
    pytest.param(8, 4, [4, 4], id="even"),
    pytest.param(10, 4, [4, 4, 2], id="short-last"),
    pytest.param(3, 8, [3], id="fewer-rows-than-micro"),  # a short rank in a partial last step
    pytest.param(1, 1, [1], id="single-row"),  # e.g. the zero-weight row
])
def test_micro_batches_split_in_order(rows, micro, sizes):
    step = StepRows(tabular_rows(rows), rows_in_step=rows)
    parts = micro_batches(step, micro, CPU)
    assert [len(part["x"]) for part in parts] == sizes
    assert torch.cat([part["x"][:, 0] for part in parts]).tolist() == list(range(rows))


# ------------------------------------------------------------------------------------ 9. validation split

def test_is_validation_is_stable_and_order_independent():
    ids = np.arange(10_000, dtype=np.int64)
    held = is_validation(ids, 0.2)
    assert np.array_equal(held, is_validation(ids.copy(), 0.2))  # same ids, same answer
    shuffled = np.random.default_rng(0).permutation(ids)
    assert np.array_equal(is_validation(shuffled, 0.2), held[shuffled])  # per id, not per position
    assert np.array_equal(is_validation(ids[5000:], 0.2), held[5000:])  # nor per chunk
    assert held.dtype == bool and 0 < held.sum() < len(ids)


@pytest.mark.parametrize("val_fraction", [0.1, 0.25])
def test_held_out_fraction_and_complement(val_fraction):
    ids = np.arange(200_000, dtype=np.int64)
    held = is_validation(ids, val_fraction)
    assert abs(held.mean() - val_fraction) < 0.005
    assert np.array_equal(is_validation(ids, 0.0), np.zeros(len(ids), dtype=bool))
    # a larger fraction keeps every row a smaller one held out (the split grows, it does not reshuffle)
    assert not (held & ~is_validation(ids, val_fraction + 0.1)).any()


@pytest.mark.parametrize("num_rows, val_fraction", [
    pytest.param(1000, 0.2, id="one-chunk"),
    pytest.param(20_000, 0.1, id="three-generation-blocks"),  # chunks of 8192 rows
])
def test_count_rows_matches_the_rows_read(num_rows, val_fraction):
    data = DataConfig(source="synthetic", val_fraction=val_fraction,
                      synthetic=SyntheticConfig(rows=num_rows, num_features=2))
    info = sources.inspect_source("synthetic", data, seed=0)
    held = int(is_validation(np.arange(num_rows), val_fraction).sum())
    assert count_rows(info, "val", val_fraction) == held
    assert count_rows(info, "train", val_fraction) == num_rows - held
    assert count_rows(info, "all", val_fraction) == num_rows
    assert (count_rows(info, "train", 0.0), count_rows(info, "val", 0.0)) == (num_rows, 0)
    read = {}
    for split in ("train", "val"):
        spec = SplitSpec(info, split, val_fraction, data, seed=0)
        whole = [chunk.stop - chunk.start for chunk in info.chunks]  # a take past the split's rows keeps them all
        read[split] = np.concatenate([read_split_pieces({"chunk": [i], "skip": [0], "take": [whole[i]]}, spec)["row_id"]
                                      for i in range(len(info.chunks))])
        assert len(read[split]) == count_rows(info, split, val_fraction)
    assert np.array_equal(np.sort(np.concatenate([read["train"], read["val"]])), np.arange(num_rows))


def test_count_rows_across_its_counting_chunks():
    # count_rows walks row ids in chunks of 2**22; a source just past one chunk exercises the boundary
    num_rows = (1 << 22) + 1234
    info = sources.SourceInfo("parquet", None, (sources.Chunk(0, num_rows),), num_rows)
    held = int(is_validation(np.arange(num_rows), 0.1).sum())
    assert count_rows(info, "val", 0.1) == held
    assert count_rows(info, "train", 0.1) == num_rows - held


def test_validation_cache_replays_a_shard_exactly_as_its_reads_give_it():
    bounds = [(0, 40), (40, 100), (100, 130)]
    rng = np.random.default_rng(3)
    held_out = {5, 17, 41, 99, 100}  # a split keeps some rows of each chunk, in row-id order
    chunks = []
    for a, b in bounds:
        ids = np.array([i for i in range(a, b) if i not in held_out], dtype=np.int64)
        chunks.append({"row_id": ids, "x": rng.normal(size=(len(ids), 3)).astype(np.float32), "y": ids % 7})
    joined = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    cache = SplitCache(bounds, limit_bytes=1 << 20)
    first = list(cache.record(cut(joined, 17)))
    assert cache.ready and len(first) == -(-125 // 17)
    replayed = list(cache.replay(range(3)))
    for key in ("row_id", "x", "y"):
        assert np.array_equal(np.concatenate([b[key] for b in replayed]), joined[key])


def test_cache_is_not_used_over_its_limit_or_after_a_partial_pass():
    blocks = [{"row_id": np.arange(i * 10, i * 10 + 10), "x": np.zeros((10, 4), np.float32)} for i in range(3)]
    small = SplitCache([(0, 30)], limit_bytes=100)
    assert len(list(small.record(blocks))) == 3 and not small.ready  # every block still passes through
    partial = SplitCache([(0, 30)], limit_bytes=1 << 20)
    stream = partial.record(blocks)
    next(stream)
    stream.close()  # the epoch ended early (an abort): not a whole pass
    assert not partial.ready


def test_cache_plan_only_for_fixed_width_rows_under_the_limit():
    info = sources.inspect_source("digits", DataConfig(), 0)
    spec = SplitSpec(info, "train", 0.2, DataConfig(), 0)
    assert cache_plan(spec, 1450, 1024) == [(c.start, c.stop) for c in info.chunks]
    assert cache_plan(spec, 1450, 0) is None
    assert cache_plan(spec, 1450, 0.01) is None  # 1,450 rows of 64 floats are more than 10 KiB
    assert cache_plan(SplitSpec(info, "val", 0.2, DataConfig(shuffle="full"), 0), 347, 1024) is not None


def test_a_split_is_read_in_the_worker_only_when_its_estimated_size_is_at_most_the_limit():
    info = sources.inspect_source("digits", DataConfig(), 0)
    spec = SplitSpec(info, "train", 0.2, DataConfig(), 0)
    assert sources.row_bytes(info.spec) == 24 + 4 * 64
    assert read_in_worker(spec, 1450, 64)
    assert not read_in_worker(spec, 1450, 0)  # 0: always Ray Data
    assert not read_in_worker(spec, 1450, 0.01)  # 1,450 rows of 64 floats are more than 10 KiB
    assert not read_in_worker(None, 0, 64)  # no such split
    tokens = sources.DataSpec("token_classification", (128,), 50, vocab_size=50)
    assert sources.row_bytes(tokens) == 24 + 16 * 128  # tokens and per-token labels up to the longest sequence


def test_the_digits_are_scikit_learns_read_without_importing_it():
    from sklearn.datasets import load_digits

    sources._digits.cache_clear()
    x, y = sources._digits()
    digits = load_digits()
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x, (digits.data / 16.0).astype(np.float32)) and np.array_equal(y, digits.target)


def test_an_empty_block_of_another_dtype_changes_nothing():
    """Ray Data turns a zero-row 2-D column into pickled objects; such a block must not make x an object array."""
    plan = plan_batches(4, 2, 1)
    rows = {"row_id": np.arange(8), "x": np.ones((8, 3), np.float32), "y": np.arange(8)}
    empty = {"row_id": np.arange(0), "x": np.empty(0, dtype=object), "y": np.arange(0)}
    assembler = StepAssembler(plan, 0)
    steps = list(assembler.steps([empty, rows, empty]))
    assert [s.rows["x"].dtype for s in steps] == [np.float32, np.float32]
    cache = SplitCache([(0, 8)], limit_bytes=1 << 20)
    list(cache.record([empty, rows]))
    assert cache.ready and cache.columns["x"].dtype == np.float32


def test_steps_are_views_of_their_block_and_only_a_straddling_window_is_joined():
    """A rank's rows of a step are a view of the block they came in (an online file is read by every rank, so
    copying whole steps would cost each rank the whole stream); a step across two blocks is one copy."""
    columns = tabular_rows(40)
    blocks = cut(columns, 24)  # steps of 4 rows: rows 20-23 end a block, rows 24-27 start one
    plan = plan_batches(4, 2, 2)
    steps = list(StepAssembler(plan, 1).steps(blocks))
    assert [s.rows["row_id"].tolist() for s in steps] == [[r + 2, r + 3] for r in range(0, 40, 4)]
    shared = [any(np.shares_memory(s.rows["x"], b["x"]) for b in blocks) for s in steps]
    assert shared == [True] * 10
    small_blocks = cut(columns, 6)  # steps 4-7, 16-19, 28-31 span two blocks
    straddling = list(StepAssembler(plan, 0).steps(small_blocks))
    assert [s.rows["row_id"].tolist() for s in straddling] == [[r, r + 1] for r in range(0, 40, 4)]
    joined = [not any(np.shares_memory(s.rows["x"], b["x"]) for b in small_blocks) for s in straddling]
    assert joined == [r % 12 == 4 for r in range(0, 40, 4)]


def test_collate_shares_writable_rows_and_copies_read_only_ones():
    """A model that writes to its input must not change the worker's cache (or Arrow's read-only memory): the
    cache's columns are read-only, and collate copies such rows; a writable contiguous batch is shared."""
    columns = tabular_rows(8)
    cache = SplitCache([(0, 8)], limit_bytes=1 << 20)
    list(cache.record([columns]))
    replayed = next(cache.replay([0]))
    batch = collate(replayed, CPU)
    assert not np.shares_memory(batch["x"].numpy(), cache.columns["x"])
    batch["x"].mul_(0)  # what an in-place first layer would do
    assert next(cache.replay([0]))["x"][:, 0].tolist() == list(range(8))
    writable = tabular_rows(8)
    assert np.shares_memory(collate(writable, CPU)["x"].numpy(), writable["x"])


def test_the_ray_data_read_path_does_not_import_torch():
    """Every Ray Data read task process imports rayscale.data (read_split_pieces, SplitSpec): torch's ~2.7 s import
    in each of them delayed a digits run's first batch by ~30 s on 2 cores."""
    import subprocess
    import sys

    code = ("import pickle, sys; from rayscale import config; from rayscale.data import sources, splits; "
            "info = sources.inspect_source('digits', config.DataConfig(), 0); "
            "spec = pickle.loads(pickle.dumps(splits.SplitSpec(info, 'train', 0.2, config.DataConfig(), 0))); "
            "rows = splits.read_split_pieces({'chunk': [0], 'skip': [0], 'take': [5]}, spec); "
            "assert len(rows['row_id']) > 0; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_read_tasks_are_bounded_by_the_cpus_the_cluster_has_or_can_autoscale_to(monkeypatch):
    """No more read tasks at once than CPUs, nor than chunks; on an autoscaling cluster (its configured maximum
    known) the maximum, since the dataset is built before the training nodes exist."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})  # the head node alone
    state = ray._private.state.state
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: None)  # no autoscaler
    assert (read_tasks_at_once(100), read_tasks_at_once(3)) == (8, 3)
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"CPU": 72, "GPU": 8})
    assert (read_tasks_at_once(100), read_tasks_at_once(3)) == (72, 3)
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"GPU": 8, "CPU": 0})
    assert read_tasks_at_once(100) == 8
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    assert read_tasks_at_once(100) == 1


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_each_rank_reads_and_validates_its_own_shard_and_every_validation_row_once(world_size):
    """The validation split cut into one shard per rank from the row counts alone: the shards' rows are the
    split's, each once and in row-id order within a shard, their sizes differ by at most one row, a rank reads
    only the chunks its shard overlaps, and the engine asks the context for its own shard."""
    from rayscale import config
    from rayscale.data.local_feed import LocalReads
    from rayscale.data.splits import shard_reads, split_chunk_rows
    from rayscale.engine.feed import SplitStreams

    data = DataConfig(source="synthetic", val_fraction=0.3, synthetic=SyntheticConfig(rows=90_000, num_features=2))
    info = sources.inspect_source("synthetic", data, seed=0)
    assert len(info.chunks) > world_size  # several chunks: shards are cut between and inside them
    val = SplitSpec(info, "val", 0.3, data, seed=0)
    whole = [info.chunks[i].stop - info.chunks[i].start for i in range(len(info.chunks))]
    assert chunk_rows(info, "val", 0.3) == [len(read_split_pieces({"chunk": [i], "skip": [0], "take": [whole[i]]},
                                                                  val)["row_id"]) for i in range(len(info.chunks))]
    reads = LocalReads(SplitSpec(info, "train", 0.3, data, seed=0), val)
    shard_plan = shard_reads(split_chunk_rows(val), world_size)
    shards = [np.concatenate([block["row_id"] for block in reads("val", shard_plan[rank])])
              for rank in range(world_size)]
    assert np.array_equal(np.concatenate(shards), np.flatnonzero(is_validation(np.arange(90_000), 0.3)))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    chunks_read = [{read.chunk for read in shard} for shard in shard_plan]
    assert sum(map(len, chunks_read)) <= len(info.chunks) + world_size - 1  # a cut chunk is read by two ranks

    asked = []
    context = types.SimpleNamespace(rank=world_size - 1, world_size=world_size,
                                    read=lambda split, reads, prefetch: asked.append((split, reads)) or iter(()))
    payload = types.SimpleNamespace(cache_train=False, val_cache=None, train_split=None, val_split=val,
                                    train_rows=100, val_rows=sum(split_chunk_rows(val)),
                                    val_chunk_rows=tuple(split_chunk_rows(val)))
    through_ray = config.load(overrides=["data.read_in_worker_mb=0"])
    list(SplitStreams(context, payload, through_ray, lanes=world_size).val())
    assert asked == [("val", shard_plan[world_size - 1])]
    # A split this small (the default data.read_in_worker_mb) is read by the rank itself: the same blocks.
    here = list(SplitStreams(context, payload, config.load(), lanes=world_size).val())
    assert len(asked) == 1
    expected = list(LocalReads(None, val)("val", shard_plan[world_size - 1]))
    assert len(here) == len(expected) and all(np.array_equal(a[key], b[key]) for a, b in zip(here, expected, strict=True)
                                              for key in b)
