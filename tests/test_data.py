"""Step assembly, collate and the validation split, without Ray: streams of numpy column dicts shaped like
Ray Data's numpy batches go straight into StepAssembler.steps()."""

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
    chunk_order,
    count_rows,
    is_validation,
    read_split_chunks,
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


def epoch(columns, *, world, global_batch, micro=None, block_rows=None, window_rows=None, seed=0,
          epoch_index=0, shuffle="local", **options) -> list[list[StepRows]]:
    """Every rank's steps for one epoch over `columns`: steps[rank][step]."""
    plan = plan_batches(global_batch, micro, world)
    window_rows = window_rows or 2 * global_batch
    return [list(StepAssembler(plan, rank, seed=seed, epoch=epoch_index, shuffle=shuffle,
                               window_rows=window_rows, **options).steps(cut(columns, block_rows)))
            for rank in range(world)]


def real_ids(step: StepRows) -> np.ndarray:
    """Row ids this rank trains on in the step: rows with non-zero weight (all rows when there is no weight)."""
    ids = step.rows["row_id"]
    return ids if "weight" not in step.rows else ids[step.rows["weight"] != 0]


def ids_per_step(steps: list[list[StepRows]]) -> list[list[list[int]]]:
    """[rank][step] -> that rank's row ids in order (the padding row included), for exact comparisons."""
    return [[s.rows["row_id"].tolist() for s in rank_steps] for rank_steps in steps]


def check_partition(steps: list[list[StepRows]], rows: int, global_batch: int) -> None:
    """Property 1: equal step counts, each step split exactly across ranks, every row once per epoch."""
    expected_steps = -(-rows // global_batch)  # the partial last step counts
    step_counts = {len(rank_steps) for rank_steps in steps}
    assert step_counts == {expected_steps}, step_counts
    seen = []
    for index, per_rank in enumerate(zip(*steps, strict=True)):
        sizes = {s.rows_in_step for s in per_rank}
        assert len(sizes) == 1, f"step {index}: ranks disagree on rows_in_step {sizes}"
        rows_in_step = sizes.pop()
        last = index == expected_steps - 1
        assert rows_in_step == (rows - index * global_batch if last else global_batch)  # only the last is short
        parts = [real_ids(s) for s in per_rank]
        union = np.concatenate(parts)
        assert len(np.unique(union)) == len(union), f"step {index}: ranks share rows"
        assert len(union) == rows_in_step, f"step {index}: {len(union)} real rows for {rows_in_step}"
        seen.append(union)
    seen = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
    assert np.array_equal(np.sort(seen), np.arange(rows)), "rows lost or repeated over the epoch"
    assert sum(s.rows_in_step for s in steps[0]) == rows


# ------------------------------------------------------------------------------------- 1. exact partition

PARTITION_CASES = [
    # world, global batch, rows
    pytest.param(1, 8, 64, id="w1-divisible"),  # 8 full steps
    pytest.param(1, 8, 61, id="w1-partial-last"),  # last step 5 rows
    pytest.param(1, 8, 5, id="w1-less-than-one-batch"),  # a single partial step
    pytest.param(2, 8, 64, id="w2-divisible"),
    pytest.param(2, 8, 61, id="w2-partial-last-both-ranks"),  # last step 5 rows: 4 + 1
    pytest.param(2, 8, 60, id="w2-partial-last-rank1-empty"),  # last step 4 rows: 4 + 0
    pytest.param(2, 8, 5, id="w2-less-than-one-batch"),  # 4 + 1
    pytest.param(2, 8, 1, id="w2-rows-below-world"),  # 1 + 0
    pytest.param(3, 12, 72, id="w3-divisible"),
    pytest.param(3, 12, 70, id="w3-partial-last-three-ranks"),  # last step 10 rows: 4 + 4 + 2
    pytest.param(3, 12, 65, id="w3-partial-last-rank2-empty"),  # last step 5 rows: 4 + 1 + 0
    pytest.param(3, 12, 7, id="w3-less-than-one-batch"),  # 4 + 3 + 0
    pytest.param(3, 3, 2, id="w3-rows-below-world-one-per-rank"),  # per-worker 1: 1 + 1 + 0
    pytest.param(3, 12, 2, id="w3-rows-below-world"),  # 2 + 0 + 0
]


@pytest.mark.parametrize("world, global_batch, rows", PARTITION_CASES)
@pytest.mark.parametrize("shuffle", ["local", "none"])
def test_every_row_once_and_steps_equal_across_ranks(world, global_batch, rows, shuffle):
    # blocks of 7 rows and a window of 20 rows (rounded up to whole global batches) cross every boundary
    steps = epoch(tabular_rows(rows), world=world, global_batch=global_batch, block_rows=7, window_rows=20,
                  shuffle=shuffle)
    check_partition(steps, rows, global_batch)
    for rank_steps in steps:
        assert all(len(s.rows["row_id"]) <= global_batch // world for s in rank_steps)
    if shuffle == "none":  # no shuffle: step k holds exactly the stream's rows k*B .. (k+1)*B - 1
        for index, per_rank in enumerate(zip(*steps, strict=True)):
            union = np.concatenate([real_ids(s) for s in per_rank])
            assert union.tolist() == list(range(index * global_batch, min((index + 1) * global_batch, rows)))


def test_local_shuffle_stays_inside_its_window():
    # window 24 rows = 3 steps of 8: the first three steps hold exactly rows 0..23, in some order
    steps = epoch(tabular_rows(100), world=2, global_batch=8, window_rows=24)
    for window in range(5):
        in_window = [real_ids(s) for rank_steps in steps for s in rank_steps[3 * window:3 * window + 3]]
        assert sorted(np.concatenate(in_window).tolist()) == list(range(24 * window, min(24 * window + 24, 100)))


# ------------------------------------------------------------------------------ 2. the zero-weight row

@pytest.mark.parametrize("world, global_batch, rows, empty_ranks", [
    pytest.param(2, 8, 60, [1], id="w2-last-step-4-rows"),  # rank 0 takes all 4
    pytest.param(3, 12, 65, [2], id="w3-last-step-5-rows"),  # 4 + 1 + nothing
    pytest.param(3, 12, 2, [1, 2], id="w3-two-rows-in-all"),  # 2 + nothing + nothing
    pytest.param(3, 3, 2, [2], id="w3-per-worker-1"),  # 1 + 1 + nothing
])
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight-column", "weight-column"])
def test_rank_without_rows_gets_one_zero_weight_row(world, global_batch, rows, empty_ranks, weighted):
    # DDP all-reduces gradients inside backward(): a rank that skipped its forward/backward would leave the
    # others waiting in that all-reduce forever. So an empty rank still runs one real row, weighted 0, which
    # joins the all-reduce and contributes nothing to the loss or the gradient.
    columns = tabular_rows(rows, weight=weighted)
    steps = epoch(columns, world=world, global_batch=global_batch, shuffle="none")
    for rank, rank_steps in enumerate(steps):
        last = rank_steps[-1].rows
        if rank in empty_ranks:
            assert len(last["row_id"]) == 1
            assert last["weight"].tolist() == [0.0]
            assert last["x"].shape == (1, FEATURES)  # a real row of the step, so forward() sees valid input
            assert last["x"][0, 0] == last["row_id"][0]
        else:
            assert len(last["row_id"]) >= 1
            if weighted:  # real rows keep their own weights
                assert np.array_equal(last["weight"], columns["weight"][last["row_id"]])
            else:
                assert "weight" not in last


# -------------------------------------------------------------------------- 3. block boundaries don't matter

@pytest.mark.parametrize("shuffle", ["local", "none"])
@pytest.mark.parametrize("sequences", [False, True], ids=["tabular", "sequences-bucketed"])
def test_steps_do_not_depend_on_block_boundaries(shuffle, sequences):
    rows = 203  # 4 windows of 48 and a partial one
    columns = sequence_rows(rows) if sequences else tabular_rows(rows)
    runs = {block: ids_per_step(epoch(columns, world=2, global_batch=16, block_rows=block, window_rows=48,
                                      shuffle=shuffle, seed=3, bucket_by_length=sequences))
            for block in (1, 7, 64, None)}  # None: the whole stream in one block
    assert runs[1] == runs[7] == runs[64] == runs[None]


# ------------------------------------------------------------------------ 4. micro-batch size doesn't matter

def test_rank_rows_do_not_depend_on_micro_batch_size():
    columns = tabular_rows(150)
    runs = {micro: epoch(columns, world=2, global_batch=16, micro=micro, block_rows=11, window_rows=32, seed=5)
            for micro in (1, 2, 4, 8)}
    reference = ids_per_step(runs[8])
    for micro, steps in runs.items():
        assert ids_per_step(steps) == reference, f"micro-batch {micro} changed which rows a rank sees"
        for rank_steps in steps:  # and its micro-batches, joined in order, are exactly those rows
            for step in rank_steps:
                parts = micro_batches(step, micro, CPU)
                assert max(len(part["x"]) for part in parts) <= micro
                joined = torch.cat([part["x"][:, 0] for part in parts]).long().tolist()
                assert joined == step.rows["row_id"].tolist()


# ----------------------------------------------------------------------- 5. determinism, epoch and seed

def test_order_is_a_function_of_seed_and_epoch():
    columns = tabular_rows(300)

    def order(seed, epoch_index, shuffle="local", block_rows=17):
        steps = epoch(columns, world=2, global_batch=16, window_rows=64, block_rows=block_rows, seed=seed,
                      epoch_index=epoch_index, shuffle=shuffle)
        return [i for per_rank in zip(*steps, strict=True) for s in per_rank for i in real_ids(s).tolist()]

    assert order(0, 0) == order(0, 0, block_rows=40)  # same seed and epoch: identical, whatever the blocks
    assert order(0, 1) != order(0, 0)  # a new epoch reshuffles
    assert order(1, 0) != order(0, 0)  # so does another seed
    assert sorted(order(0, 1)) == sorted(order(1, 0)) == list(range(300))  # still a permutation
    assert order(0, 0, "none") == order(7, 3, "none") == list(range(300))  # no shuffle: stream order


# --------------------------------------------------------------------------------- 6. length bucketing

def padding(steps: list[list[StepRows]], micro: int) -> int:
    """Padded token slots over every micro-batch of every rank: rows x longest - real tokens."""
    total = 0
    for rank_steps in steps:
        for step in rank_steps:
            for part in micro_batches(step, micro, CPU):
                total += part["mask"].numel() - int(part["mask"].sum())
    return total


@pytest.mark.parametrize("world, rows", [
    pytest.param(1, 500, id="w1"),
    pytest.param(2, 500, id="w2"),
    pytest.param(3, 497, id="w3-partial-last-step"),
])
def test_bucketing_cuts_padding_and_keeps_every_row_once(world, rows):
    columns = sequence_rows(rows, max_length=64, seed=world)
    global_batch, micro = 8 * world, 4
    plain = epoch(columns, world=world, global_batch=global_batch, micro=micro, window_rows=128)
    bucketed = epoch(columns, world=world, global_batch=global_batch, micro=micro, window_rows=128,
                     bucket_by_length=True)
    check_partition(bucketed, rows, global_batch)
    # lengths are uniform on 1..64: random micro-batches of 4 pad about 40% of their slots, sorted windows of
    # 128 rows leave a few tokens per row
    assert padding(bucketed, micro) < 0.25 * padding(plain, micro)


# ----------------------------------------------------------------------------------------- 7. stratified

def class_counts(steps, labels, classes=4):
    """[step] -> class counts of the step's real rows over all ranks."""
    return [np.bincount(labels[np.concatenate([real_ids(s) for s in per_rank])], minlength=classes)
            for per_rank in zip(*steps, strict=True)]


def test_stratified_balanced_classes_give_exact_shares():
    # every window of 48 rows holds 12 of each class, so each full step of 16 must hold exactly 4 of each
    rows = 200
    labels = np.arange(rows) % 4
    steps = epoch(tabular_rows(rows, labels), world=2, global_batch=16, window_rows=48, block_rows=9,
                  stratified=True)
    check_partition(steps, rows, 16)
    for counts in class_counts(steps, labels)[:12]:  # the 12 full steps
        assert counts.tolist() == [4, 4, 4, 4]


def stratification_bound(window_counts: np.ndarray) -> np.ndarray:
    """Largest |class count - proportional share| a full step can show, per class.

    Stratification sorts a window by each row's position (k + 0.5) / n_c within its class c. A prefix of the
    sorted window ending at position t holds between t*n_c - 0.5 and t*n_c + 0.5 rows of class c, so with
    K classes and share p_c = n_c / N it is at most (1 + p_c (K - 2)) / 2 off its proportional share. A
    step is the difference of two prefixes: at most 1 + p_c (K - 2) off. (Exactly +-1 is not reachable in
    general: with counts 2, 4, 30, 4 in 40 rows a step of 8 can get 8 of the third class, share 6.)
    """
    present = window_counts > 0
    return 1 + window_counts / window_counts.sum() * (present.sum() - 2)


@pytest.mark.parametrize("proportions, seed", [
    pytest.param([0.25, 0.25, 0.25, 0.25], 0, id="balanced-on-average"),  # counts vary per window
    pytest.param([0.4, 0.3, 0.2, 0.1], 1, id="skewed"),
    pytest.param([0.7, 0.1, 0.1, 0.1], 2, id="one-dominant-class"),
])
def test_stratified_steps_hold_proportional_shares(proportions, seed):
    rows, global_batch, window = 500, 16, 64  # windows of 4 global batches
    labels = np.random.default_rng(seed).choice(4, size=rows, p=proportions)
    columns = tabular_rows(rows, labels)

    def worst_excess(stratified: bool) -> float:
        """Largest deviation beyond the bound over every full step; <= 0 means the bound holds."""
        steps = epoch(columns, world=2, global_batch=global_batch, window_rows=window, block_rows=13,
                      seed=seed, stratified=stratified)
        check_partition(steps, rows, global_batch)
        worst = -np.inf
        for index, counts in enumerate(class_counts(steps, labels)):
            start = index // (window // global_batch) * window  # the window this step was cut from
            window_counts = np.bincount(labels[start:start + window], minlength=4)
            if counts.sum() < global_batch:  # the partial last step holds what is left
                continue
            share = global_batch * window_counts / window_counts.sum()
            worst = max(worst, float(np.max(np.abs(counts - share) - stratification_bound(window_counts))))
        return worst

    assert worst_excess(stratified=True) <= 1e-9
    assert worst_excess(stratified=False) > 0  # plain shuffling breaks the bound, so the check has teeth


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
        read[split] = np.concatenate([read_split_chunks({"chunk": np.array([i])}, spec)["row_id"]
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


def _ray_like_stream(columns_by_chunk, order, block_rows):
    """What Ray Data hands a worker: the chunks in `order`, re-cut into blocks of arbitrary size."""
    joined = {k: np.concatenate([columns_by_chunk[i][k] for i in order]) for k in columns_by_chunk[0]}
    total = len(joined["row_id"])
    return [{k: v[a:a + block_rows] for k, v in joined.items()} for a in range(0, total, block_rows)]


@pytest.mark.parametrize("shuffle", ["local", "none"])
def test_cache_replays_each_epoch_exactly_as_ray_data_streams_it(shuffle):
    bounds = [(0, 40), (40, 100), (100, 130)]
    rng = np.random.default_rng(3)
    held_out = {5, 17, 41, 99, 100}  # a split keeps some rows of each chunk, in row-id order
    chunks = []
    for a, b in bounds:
        ids = np.array([i for i in range(a, b) if i not in held_out], dtype=np.int64)
        chunks.append({"row_id": ids, "x": rng.normal(size=(len(ids), 3)).astype(np.float32), "y": ids % 7})
    cache = SplitCache(bounds, limit_bytes=1 << 20)
    first = list(cache.record(_ray_like_stream(chunks, chunk_order(3, shuffle, 11, 0), block_rows=17)))
    assert cache.ready and len(first) == -(-125 // 17)
    for epoch in (1, 2, 5):
        order = chunk_order(3, shuffle, 11, epoch)
        streamed = _ray_like_stream(chunks, order, block_rows=23)
        replayed = list(cache.replay(order))
        for key in ("row_id", "x", "y"):
            assert np.array_equal(np.concatenate([b[key] for b in replayed]), np.concatenate([b[key] for b in streamed]))
    assert shuffle == "none" or any(not np.array_equal(chunk_order(3, shuffle, 11, e), np.arange(3)) for e in range(5))


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
    assert cache_plan(SplitSpec(info, "train", 0.2, DataConfig(shuffle="full"), 0), 1450, 1024) is None
    assert cache_plan(SplitSpec(info, "val", 0.2, DataConfig(shuffle="full"), 0), 347, 1024) is not None


def test_an_empty_block_of_another_dtype_changes_nothing():
    """Ray Data turns a zero-row 2-D column into pickled objects; such a block must not make x an object array."""
    plan = plan_batches(4, 2, 1)
    rows = {"row_id": np.arange(8), "x": np.ones((8, 3), np.float32), "y": np.arange(8)}
    empty = {"row_id": np.arange(0), "x": np.empty(0, dtype=object), "y": np.arange(0)}
    assembler = StepAssembler(plan, 0, seed=0, epoch=0, shuffle="none", window_rows=4)
    steps = list(assembler.steps([empty, rows, empty]))
    assert [s.rows["x"].dtype for s in steps] == [np.float32, np.float32]
    cache = SplitCache([(0, 8)], limit_bytes=1 << 20)
    list(cache.record([empty, rows]))
    assert cache.ready and cache.columns["x"].dtype == np.float32


def test_steps_are_views_of_their_block_and_only_a_straddling_window_is_joined():
    """Without shuffling, a rank's rows of a step are a view of the block they came in (every rank reads every
    row, so copying whole windows cost each rank the whole stream); a window across two blocks is one copy."""
    columns = tabular_rows(40)
    blocks = cut(columns, 24)  # windows of 8 rows: the third (rows 16-23) ends a block, rows 24-31 start one
    plan = plan_batches(4, 2, 2)
    steps = list(StepAssembler(plan, 1, seed=0, epoch=0, shuffle="none", window_rows=8).steps(blocks))
    assert [s.rows["row_id"].tolist() for s in steps] == [[r + 2, r + 3] for r in range(0, 40, 4)]
    shared = [any(np.shares_memory(s.rows["x"], b["x"]) for b in blocks) for s in steps]
    assert shared == [True] * 10
    small_blocks = cut(columns, 6)  # every window spans two or three blocks
    straddling = list(StepAssembler(plan, 0, seed=0, epoch=0, shuffle="none", window_rows=8).steps(small_blocks))
    assert [s.rows["row_id"].tolist() for s in straddling] == [[r, r + 1] for r in range(0, 40, 4)]
    assert not any(np.shares_memory(s.rows["x"], b["x"]) for s in straddling for b in small_blocks)


def test_collate_shares_writable_rows_and_copies_read_only_ones():
    """A model that writes to its input must not change the worker's cache (or Arrow's read-only memory): the
    cache's columns are read-only, and collate copies such rows; a writable contiguous batch is shared."""
    columns = tabular_rows(8)
    cache = SplitCache([(0, 8)], limit_bytes=1 << 20)
    list(cache.record([columns]))
    replayed = next(cache.replay(np.array([0])))
    batch = collate(replayed, CPU)
    assert not np.shares_memory(batch["x"].numpy(), cache.columns["x"])
    batch["x"].mul_(0)  # what an in-place first layer would do
    assert next(cache.replay(np.array([0])))["x"][:, 0].tolist() == list(range(8))
    writable = tabular_rows(8)
    assert np.shares_memory(collate(writable, CPU)["x"].numpy(), writable["x"])


def test_the_ray_data_read_path_does_not_import_torch():
    """Every Ray Data read task process imports rayscale.data (read_split_chunks, SplitSpec): torch's ~2.7 s import
    in each of them delayed a digits run's first batch by ~30 s on 2 cores."""
    import subprocess
    import sys

    code = ("import pickle, sys; from rayscale import config; from rayscale.data import sources, splits; "
            "info = sources.inspect_source('digits', config.DataConfig(), 0); "
            "spec = pickle.loads(pickle.dumps(splits.SplitSpec(info, 'train', 0.2, config.DataConfig(), 0))); "
            "rows = splits.read_split_chunks({'chunk': [0]}, spec); "
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
    from rayscale.data.local_feed import LocalFeed
    from rayscale.data.splits import chunk_rows, shard_reads
    from rayscale.engine.feed import SplitStreams

    data = DataConfig(source="synthetic", val_fraction=0.3, synthetic=SyntheticConfig(rows=90_000, num_features=2))
    info = sources.inspect_source("synthetic", data, seed=0)
    assert len(info.chunks) > world_size  # several chunks: shards are cut between and inside them
    val = SplitSpec(info, "val", 0.3, data, seed=0)
    assert chunk_rows(info, "val", 0.3) == [len(read_split_chunks({"chunk": np.array([i])}, val)["row_id"])
                                            for i in range(len(info.chunks))]
    feed = LocalFeed(SplitSpec(info, "train", 0.3, data, seed=0), val, 1, count_rows(info, "train", 0.3),
                     world_size=world_size)
    shards = [np.concatenate([block["row_id"] for block in feed(f"val_{rank}")]) for rank in range(world_size)]
    assert np.array_equal(np.concatenate(shards), np.flatnonzero(is_validation(np.arange(90_000), 0.3)))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    chunks_read = [{read.chunk for read in reads} for reads in shard_reads(val, world_size)]
    assert sum(map(len, chunks_read)) <= len(info.chunks) + world_size - 1  # a cut chunk is read by two ranks

    asked = []
    context = types.SimpleNamespace(rank=world_size - 1, world_size=world_size,
                                    stream=lambda name, prefetch: asked.append(name) or iter(()))
    payload = types.SimpleNamespace(curriculum_epochs=(), train_cache=None, val_cache=None)
    list(SplitStreams(context, payload, config.load()).val())
    assert asked == [f"val_{world_size - 1}"]
