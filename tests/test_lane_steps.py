"""A rank's steps cut from its lanes (data/lane_steps.py), without Ray: a source of numpy columns cut into chunks,
each rank's pieces (lanes.epoch_reads) read from it and re-cut into blocks of any size, as Ray Data hands them
over, then piece_rows and LaneSteps. Every guarantee of the old whole-stream assembly, at every worker count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data import cut, sequence_rows, tabular_rows

from rayscale.config import DataConfig
from rayscale.data.assembly import StepRows
from rayscale.data.collate import micro_batches
from rayscale.data.lane_steps import LaneCache, LaneSteps, epoch_pieces, lane_order, piece_rows
from rayscale.data.splits import CurriculumOrder
from rayscale.math import lanes as lane_plan
from rayscale.math.batching import plan_batches

CPU = torch.device("cpu")


def chunks_of(rows: int, chunk: int) -> list[int]:
    return [min(chunk, rows - start) for start in range(0, rows, chunk)]


def pieces_stream(columns, chunk_sizes, pieces, block_rows):
    """What a rank's reads stream: each piece's rows (chunk c's rows after `skip`), re-cut into blocks."""
    starts = np.concatenate([[0], np.cumsum(chunk_sizes)]).astype(int)
    if not pieces:
        return []
    parts = [{k: v[starts[p.read.chunk] + p.read.skip:starts[p.read.chunk] + p.read.skip + p.read.take]
              for k, v in columns.items()} for p in pieces]
    joined = {k: np.concatenate([part[k] for part in parts]) if parts[0][k].dtype != object
              else np.array([x for part in parts for x in part[k]] + [None], dtype=object)[:-1] for k in parts[0]}
    return cut(joined, block_rows)


def rank_epoch(columns, *, rank, world, global_batch, micro=None, lanes=None, chunk=10, block_rows=None,
               window_rows=None, seed=0, epoch_index=0, shuffle="local", first_step=0, curriculum=None,
               **options) -> tuple[list[StepRows], list]:
    plan = plan_batches(global_batch, micro, world)
    lanes = lanes or world
    rows = len(columns["row_id"])
    data = DataConfig(shuffle=shuffle, shuffle_buffer_rows=window_rows or 2 * global_batch, **options)
    order = lane_order(data, seed, epoch_index, lanes, rows, global_batch, curriculum)
    chunk_sizes = chunks_of(rows, chunk)
    steps = LaneSteps(plan, rank, world, lanes, rows, order, first_step=first_step)
    pieces = epoch_pieces(chunk_sizes, lanes, steps.starts, order)
    blocks = pieces_stream(columns, chunk_sizes, pieces, block_rows)
    return list(steps.steps(piece_rows(blocks, pieces))), pieces


def epoch(columns, *, world, **options) -> list[list[StepRows]]:
    """Every rank's steps for one epoch: steps[rank][step]."""
    return [rank_epoch(columns, rank=rank, world=world, **options)[0] for rank in range(world)]


def real_ids(step: StepRows) -> np.ndarray:
    """Row ids this rank trains on in the step: rows with non-zero weight (all rows when there is no weight)."""
    if step.padding:
        return step.rows["row_id"][:0]
    ids = step.rows["row_id"]
    return ids if "weight" not in step.rows else ids[step.rows["weight"] != 0]


def step_sets(steps: list[list[StepRows]]) -> list[list[int]]:
    """Each global step's row ids, all ranks together, sorted: what a step trains whatever rank holds a row."""
    return [sorted(np.concatenate([real_ids(s) for s in per_rank]).tolist()) for per_rank in zip(*steps, strict=True)]


def global_order(steps: list[list[StepRows]], world: int) -> list[int]:
    """The epoch's rows in global position order: position p of a step is rank p % world's (p // world)-th row."""
    out = []
    for per_rank in zip(*steps, strict=True):
        parts = [real_ids(s).tolist() for s in per_rank]
        for i in range(max(map(len, parts))):
            out.extend(part[i] for part in parts if i < len(part))
    return out


def check_partition(steps: list[list[StepRows]], rows: int, global_batch: int) -> None:
    """Equal step counts, each step split exactly across ranks, every row once per epoch."""
    expected_steps = -(-rows // global_batch)
    assert {len(rank_steps) for rank_steps in steps} == {expected_steps}
    seen = []
    for index, per_rank in enumerate(zip(*steps, strict=True)):
        sizes = {s.rows_in_step for s in per_rank}
        assert len(sizes) == 1, f"step {index}: ranks disagree on rows_in_step {sizes}"
        rows_in_step = sizes.pop()
        last = index == expected_steps - 1
        assert rows_in_step == (rows - index * global_batch if last else global_batch)
        union = np.concatenate([real_ids(s) for s in per_rank])
        assert len(np.unique(union)) == len(union) == rows_in_step, f"step {index}"
        seen.append(union)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(rows)), "rows lost or repeated over the epoch"


PARTITION_CASES = [
    # world, lanes, global batch, rows
    pytest.param(1, 1, 8, 61, id="w1-partial-last"),
    pytest.param(1, 1, 8, 5, id="w1-less-than-one-batch"),
    pytest.param(2, 2, 8, 64, id="w2-divisible"),
    pytest.param(2, 2, 8, 61, id="w2-partial-last-both-ranks"),
    pytest.param(2, 2, 8, 60, id="w2-partial-last-rank1-empty"),
    pytest.param(2, 4, 8, 61, id="w2-two-lanes-each"),
    pytest.param(2, 2, 8, 5, id="w2-less-than-one-batch"),
    pytest.param(3, 3, 12, 70, id="w3-partial-last-three-ranks"),
    pytest.param(3, 6, 12, 65, id="w3-two-lanes-each-partial"),
    pytest.param(3, 3, 3, 4, id="w3-per-worker-1"),
    pytest.param(4, 8, 16, 1003, id="w4-eight-lanes"),
]


@pytest.mark.parametrize("world, lanes, global_batch, rows", PARTITION_CASES)
@pytest.mark.parametrize("shuffle", ["local", "none", "full"])
def test_every_row_once_and_steps_equal_across_ranks(world, lanes, global_batch, rows, shuffle):
    # chunks of 7 rows, blocks of 5 and a window of 20 rows cross every boundary
    steps = epoch(tabular_rows(rows), world=world, lanes=lanes, global_batch=global_batch, chunk=7, block_rows=5,
                  window_rows=20, shuffle=shuffle)
    check_partition(steps, rows, global_batch)
    for rank_steps in steps:
        assert all(len(s.rows["row_id"]) <= global_batch // world for s in rank_steps)
    if shuffle == "none":  # step k holds positions k*B..(k+1)*B-1: position p is row p // lanes of lane p % lanes
        starts = [start for start, _ in lane_plan.lane_ranges(rows, lanes)]
        expected = [sorted(starts[p % lanes] + p // lanes for p in range(k * global_batch,
                                                                         min((k + 1) * global_batch, rows)))
                    for k in range(len(steps[0]))]
        assert step_sets(steps) == expected


@pytest.mark.parametrize("shuffle", ["local", "none", "full"])
@pytest.mark.parametrize("lanes, worker_counts", [(4, (1, 2, 4)), (8, (1, 2, 4, 8)), (6, (1, 2, 3, 6))])
def test_the_steps_hold_the_same_rows_in_the_same_order_for_every_worker_count_dividing_the_lanes(
        shuffle, lanes, worker_counts):
    rows, global_batch = 1003, 24
    columns = tabular_rows(rows)
    runs = {world: epoch(columns, world=world, lanes=lanes, global_batch=global_batch, chunk=37, block_rows=50,
                         window_rows=96, shuffle=shuffle, seed=4, epoch_index=2) for world in worker_counts}
    orders = {world: global_order(steps, world) for world, steps in runs.items()}
    assert len({tuple(order) for order in orders.values()}) == 1
    assert sorted(orders[worker_counts[0]]) == list(range(rows))


@pytest.mark.parametrize("world, lanes, rows", [(2, 2, 203), (2, 4, 203), (3, 3, 200), (4, 4, 97)])
@pytest.mark.parametrize("shuffle", ["local", "none", "full"])
def test_a_rank_restarted_at_any_step_trains_exactly_what_it_would_have(world, lanes, rows, shuffle):
    """Exact mid-epoch resume: a rank started at step k re-reads at most one window of each of its lanes (it
    starts at the window holding its first untrained row) and gives exactly the steps k.. of the uninterrupted
    epoch, the zero-weight stand-in of a partial last step included."""
    columns, global_batch, window = tabular_rows(rows), 8 * world, 24
    lane_window = lane_order(DataConfig(shuffle=shuffle, shuffle_buffer_rows=window), 1, 0, lanes, rows,
                             global_batch, None).window
    share, buffer_share = global_batch // lanes, -(-window // lanes)  # a lane's rows per step, and per buffer
    assert lane_window == -(-rows // lanes) if shuffle == "full" else \
        lane_window % share == 0 and buffer_share <= lane_window < buffer_share + share
    for rank in range(world):
        whole, _ = rank_epoch(columns, rank=rank, world=world, lanes=lanes, global_batch=global_batch, chunk=9,
                              block_rows=7, window_rows=window, shuffle=shuffle, seed=1)
        for first in range(len(whole)):
            resumed, pieces = rank_epoch(columns, rank=rank, world=world, lanes=lanes, global_batch=global_batch,
                                         chunk=9, block_rows=11, window_rows=window, shuffle=shuffle, seed=1,
                                         first_step=first)
            assert len(resumed) == len(whole) - first
            for a, b in zip(resumed, whole[first:], strict=True):
                assert a.rows["row_id"].tolist() == b.rows["row_id"].tolist() and a.padding == b.padding
            consumed = lane_plan.resume_points(first, rows, global_batch, lanes)
            owned = lane_plan.owned_lanes(rank, world, lanes)
            left = sum(lane_plan.lane_sizes(rows, lanes)[lane] - consumed[lane] for lane in owned)
            assert sum(p.read.take for p in pieces) <= left + len(owned) * lane_window  # at most a window more


def test_a_lane_window_holds_the_lanes_rows_and_the_shuffle_stays_inside_it():
    # one chunk per lane (no piece order to permute): lane l's window k is its rows k*w .. (k+1)*w - 1
    rows, lanes, window = 96, 2, 24  # 12 rows per lane window
    steps = epoch(tabular_rows(rows), world=2, lanes=lanes, global_batch=8, chunk=48, window_rows=window)
    order = global_order(steps, 2)
    for lane in range(lanes):
        lane_rows = order[lane::lanes]  # position p is lane p % lanes's
        for k in range(4):
            assert sorted(lane_rows[12 * k:12 * k + 12]) == list(range(48 * lane + 12 * k, 48 * lane + 12 * k + 12))
    assert order != sorted(order)


@pytest.mark.parametrize("world, global_batch, rows, empty_ranks", [
    pytest.param(2, 8, 57, [1], id="w2-last-step-1-row"),
    pytest.param(3, 12, 63, [], id="w3-last-step-3-rows"),  # 1 + 1 + 1
    pytest.param(3, 12, 62, [2], id="w3-last-step-2-rows"),
])
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight-column", "weight-column"])
def test_rank_without_rows_gets_one_zero_row_of_weight_0(world, global_batch, rows, empty_ranks, weighted):
    # DDP all-reduces gradients inside backward(): a rank that skipped its forward/backward would leave the
    # others waiting in that all-reduce forever. So an empty rank still runs one row, weighted 0 and all zeros
    # (the same whichever rows the rank has read, so a resumed run pads exactly as the uninterrupted one).
    columns = tabular_rows(rows, weight=weighted)
    steps = epoch(columns, world=world, global_batch=global_batch, shuffle="none")
    for rank, rank_steps in enumerate(steps):
        last = rank_steps[-1]
        if rank in empty_ranks:
            assert last.padding and len(last.rows["row_id"]) == 1
            assert last.rows["weight"].tolist() == [0.0]
            assert last.rows["x"].shape == (1, 3) and not last.rows["x"].any()
        else:
            assert not last.padding and len(last.rows["row_id"]) >= 1
            if weighted:  # real rows keep their own weights
                assert np.array_equal(last.rows["weight"], columns["weight"][last.rows["row_id"]])


@pytest.mark.parametrize("shuffle", ["local", "none", "full"])
@pytest.mark.parametrize("sequences", [False, True], ids=["tabular", "sequences-bucketed"])
def test_steps_do_not_depend_on_block_boundaries(shuffle, sequences):
    rows = 203
    columns = sequence_rows(rows) if sequences else tabular_rows(rows)
    runs = {block: [[s.rows["row_id"].tolist() for s in rank] for rank in
                    epoch(columns, world=2, lanes=4, global_batch=16, block_rows=block, window_rows=48,
                          shuffle=shuffle, seed=3, bucket_by_length=sequences)]
            for block in (1, 7, 64, None)}
    assert runs[1] == runs[7] == runs[64] == runs[None]


def test_rank_rows_do_not_depend_on_micro_batch_size():
    columns = tabular_rows(150)
    runs = {micro: epoch(columns, world=2, global_batch=16, micro=micro, block_rows=11, window_rows=32, seed=5)
            for micro in (1, 2, 4, 8)}
    reference = [[s.rows["row_id"].tolist() for s in rank] for rank in runs[8]]
    for micro, steps in runs.items():
        assert [[s.rows["row_id"].tolist() for s in rank] for rank in steps] == reference
        for rank_steps in steps:
            for step in rank_steps:
                parts = micro_batches(step, micro, CPU)
                joined = torch.cat([part["x"][:, 0] for part in parts]).long().tolist()
                assert joined == step.rows["row_id"].tolist()


def test_order_is_a_function_of_seed_and_epoch():
    columns = tabular_rows(300)

    def order(seed, epoch_index, shuffle="local", block_rows=17):
        steps = epoch(columns, world=2, global_batch=16, window_rows=64, block_rows=block_rows, seed=seed,
                      epoch_index=epoch_index, shuffle=shuffle)
        return global_order(steps, 2)

    assert order(0, 0) == order(0, 0, block_rows=40)
    assert order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 0)
    assert sorted(order(0, 1)) == sorted(order(1, 0)) == list(range(300))
    assert order(0, 0, "full") != order(0, 1, "full") and sorted(order(0, 0, "full")) == list(range(300))
    # no shuffle: the lanes (rows 0-149 and 150-299) interleaved, whatever the seed and epoch
    assert order(0, 0, "none") == order(7, 3, "none") == [r for pair in zip(range(150), range(150, 300), strict=True)
                                                          for r in pair]


def test_a_full_shuffle_spreads_each_lane_over_the_whole_epoch():
    # the lane's whole rows are one window: its first rows in training order come from anywhere in the lane
    order = global_order(epoch(tabular_rows(400), world=2, global_batch=16, window_rows=16, shuffle="full"), 2)
    local = global_order(epoch(tabular_rows(400), world=2, global_batch=16, window_rows=16, chunk=200), 2)
    first_lane_0 = [row for row in order[:40:2]]
    assert max(first_lane_0) > 100  # lane 0 is rows 0-199
    assert max(local[:40:2]) < 30  # a window of 8 rows per lane keeps the first steps at the lane's front


def padding(steps: list[list[StepRows]], micro: int) -> int:
    total = 0
    for rank_steps in steps:
        for step in rank_steps:
            for part in micro_batches(step, micro, CPU):
                total += part["mask"].numel() - int(part["mask"].sum())
    return total


@pytest.mark.parametrize("world, lanes, rows", [
    pytest.param(1, 1, 500, id="w1"),
    pytest.param(2, 2, 500, id="w2"),
    pytest.param(2, 4, 500, id="w2-four-lanes"),
    pytest.param(3, 3, 497, id="w3-partial-last-step"),
])
def test_bucketing_cuts_padding_and_keeps_every_row_once(world, lanes, rows):
    """Each lane sorts its window by length into groups of its share of a step, and every lane shuffles its
    groups alike, so a step takes the same length quantile from each lane."""
    columns = sequence_rows(rows, max_length=64, seed=world)
    global_batch, micro = 8 * world, 4
    options = dict(world=world, lanes=lanes, global_batch=global_batch, micro=micro, window_rows=128)
    plain = epoch(columns, **options)
    bucketed = epoch(columns, **options, bucket_by_length=True)
    check_partition(bucketed, rows, global_batch)
    assert padding(bucketed, micro) < 0.25 * padding(plain, micro)


def class_counts(steps, labels, classes=4):
    return [np.bincount(labels[np.concatenate([real_ids(s) for s in per_rank])], minlength=classes)
            for per_rank in zip(*steps, strict=True)]


@pytest.mark.parametrize("world, lanes", [(1, 1), (2, 2), (2, 4)])
def test_stratified_balanced_classes_give_exact_shares(world, lanes):
    # every lane window holds the classes equally, each lane's share of a step is spread evenly over them
    rows = 192
    labels = np.arange(rows) % 4
    steps = epoch(tabular_rows(rows, labels), world=world, lanes=lanes, global_batch=16, window_rows=16 * lanes,
                  chunk=48, block_rows=9, stratified=True)  # chunks of whole windows: balanced windows
    check_partition(steps, rows, 16)
    for counts in class_counts(steps, labels):
        assert counts.tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("proportions, seed", [
    pytest.param([0.4, 0.3, 0.2, 0.1], 1, id="skewed"),
    pytest.param([0.7, 0.1, 0.1, 0.1], 2, id="one-dominant-class"),
])
def test_stratified_steps_stay_near_their_proportional_shares(proportions, seed):
    """Per lane the stratification bound holds for each lane's share (test_data's derivation); across lanes
    the deviations add, so a step of L lanes is within L x that bound of the step's proportional share."""
    rows, global_batch, lanes = 512, 16, 2
    labels = np.random.default_rng(seed).choice(4, size=rows, p=proportions)

    def worst(stratified: bool) -> float:
        steps = epoch(tabular_rows(rows, labels), world=2, lanes=lanes, global_batch=global_batch, chunk=512,
                      window_rows=128, seed=seed, stratified=stratified)
        share = global_batch * np.bincount(labels, minlength=4) / rows
        return max(float(np.max(np.abs(c - share))) for c in class_counts(steps, labels)[:-1])

    assert worst(True) <= lanes * (1 + max(proportions) * 2) + 1  # window proportions differ from the split's
    assert worst(True) < worst(False)


def test_a_curriculum_epoch_sorts_each_lane_and_steps_take_every_lanes_front():
    rows, lanes = 400, 4
    columns = tabular_rows(rows)
    columns["difficulty"] = np.random.default_rng(0).random(rows)
    edges = np.linspace(0, 1, 11)
    counts = np.histogram(columns["difficulty"], edges)[0]
    order = CurriculumOrder(epoch=0, train_rows=rows, span=rows, start=0.1, seed=0,
                            histogram=(tuple(edges), tuple(int(c) for c in counts)))
    steps = epoch(columns, world=2, lanes=lanes, global_batch=16, curriculum=order, chunk=30, block_rows=13)
    check_partition(steps, rows, 16)
    sequence = global_order(steps, 2)
    difficulty = columns["difficulty"][sequence]
    first, last = difficulty[:100].mean(), difficulty[-100:].mean()
    assert first < 0.35 < 0.65 < last  # easy rows first, in every lane


def test_the_lane_cache_replays_later_epochs_exactly_as_the_reads_give_them():
    rows, world, lanes = 230, 2, 4
    columns = tabular_rows(rows)
    chunk_sizes = chunks_of(rows, 17)
    plan = plan_batches(16, None, world)
    for rank in range(world):
        owned = lane_plan.owned_lanes(rank, world, lanes)
        sizes = lane_plan.lane_sizes(rows, lanes)
        cache = LaneCache({lane: sizes[lane] for lane in owned}, limit_bytes=1 << 20)
        for epoch_index in range(4):
            order = lane_order(DataConfig(shuffle_buffer_rows=40), 3, epoch_index, lanes, rows, 16, None)
            steps = LaneSteps(plan, rank, world, lanes, rows, order)
            pieces = epoch_pieces(chunk_sizes, lanes, steps.starts, order)
            read = list(piece_rows(pieces_stream(columns, chunk_sizes, pieces, 23), pieces))
            if epoch_index == 0:
                assert [p for p, _ in cache.record(iter(read))] == pieces
                assert cache.ready and sum(len(c["row_id"]) for c in cache.columns.values()) == \
                    sum(sizes[lane] for lane in owned)  # its own lanes only
                continue
            replayed = list(cache.replay(pieces))
            for (a, rows_a), (b, rows_b) in zip(replayed, read, strict=True):
                assert a == b and all(np.array_equal(rows_a[k], rows_b[k]) for k in rows_b)


def test_the_lane_cache_is_not_kept_over_its_limit_or_after_a_partial_pass():
    rows, lanes = 100, 2
    columns = tabular_rows(rows)
    chunk_sizes = chunks_of(rows, 10)
    order = lane_order(DataConfig(), 0, 0, lanes, rows, 8, None)
    starts = {0: 0}
    pieces = epoch_pieces(chunk_sizes, lanes, starts, order)
    small = LaneCache({0: 50}, limit_bytes=100)
    assert len(list(small.record(piece_rows(pieces_stream(columns, chunk_sizes, pieces, 7), pieces)))) == \
        len(pieces) and not small.ready
    resumed = epoch_pieces(chunk_sizes, lanes, {0: 20}, order)  # an epoch restarted inside the lane
    partial = LaneCache({0: 50}, limit_bytes=1 << 20)
    list(partial.record(piece_rows(pieces_stream(columns, chunk_sizes, resumed, 7), resumed)))
    assert not partial.ready


def test_a_source_that_gives_fewer_rows_than_its_metadata_is_named():
    columns = tabular_rows(40)
    pieces = lane_plan.epoch_reads([20, 20], 1, {0: 0}, lambda lane, n: range(n))
    short = [{k: v[:30] for k, v in columns.items()}]
    with pytest.raises(RuntimeError, match="fewer rows than the source's metadata said .10 rows.: did "
                                           "data.source change"):
        list(piece_rows(short, pieces))


@pytest.mark.parametrize("shuffle", ["local", "none"])
def test_a_rank_buffers_about_one_window_and_one_chunk_per_lane(shuffle):
    """Memory bounded: however the blocks come, a lane never holds more than one window of arranged rows plus one
    chunk piece and one step's share waiting; the lanes advance together (reads interleaved by lane position)."""
    rows, world, lanes, chunk, window = 5000, 2, 4, 97, 400
    columns = tabular_rows(rows)
    plan = plan_batches(64, None, world)
    order = lane_order(DataConfig(shuffle=shuffle, shuffle_buffer_rows=window), 0, 0, lanes, rows, 64, None)
    chunk_sizes = chunks_of(rows, chunk)
    for rank in range(world):
        steps = LaneSteps(plan, rank, world, lanes, rows, order)
        pieces = epoch_pieces(chunk_sizes, lanes, steps.starts, order)
        most = 0
        for _ in steps.steps(piece_rows(pieces_stream(columns, chunk_sizes, pieces, 64), pieces)):
            most = max(most, *(lane.pending_rows + lane.ready_rows for lane in steps.lane.values()))
        assert most <= order.window + chunk + 64 // lanes, (most, order.window)
