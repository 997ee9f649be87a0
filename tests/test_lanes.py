"""The lane plan (rayscale/math/lanes.py), pure: every training row once per epoch, equal steps on every rank,
the same rows in each step for every worker count that divides the lanes, resume at any step, and the read
amplification bound."""

from __future__ import annotations

import numpy as np
import pytest

from rayscale.math.lanes import (
    check_lanes,
    lane_ranges,
    lane_reads,
    lane_sizes,
    owned_lanes,
    rank_step,
    resume_points,
    rows_read,
)

# Uneven chunks (row groups of different sizes, one empty: a row group whose rows were all held out).
UNEVEN = [700, 13, 0, 512, 1, 999, 64, 300, 257, 2048, 5, 1100]


def epoch_steps(rows: int, global_batch: int, lanes: int, rank: int, world_size: int, first_step: int = 0,
                start: list[int] | None = None) -> list[list[int]]:
    """What a rank trains in each step from `first_step` on, as sequence offsets in training order: its lanes are
    streamed front to back (from `start`, where a resumed rank's lanes stand) and cut by rank_step."""
    ranges = lane_ranges(rows, lanes)
    cursor = {lane: (start[lane] if start else 0) for lane in owned_lanes(rank, world_size, lanes)}
    steps = []
    for step in range(first_step, -(-rows // global_batch)):
        layout = rank_step(step, rows, global_batch, lanes, rank, world_size)
        taken = []
        for lane, take in layout.takes:
            taken.extend(range(ranges[lane][0] + cursor[lane], ranges[lane][0] + cursor[lane] + take))
            cursor[lane] += take
        steps.append([taken[i] for i in layout.order])
    assert all(cursor[lane] == ranges[lane][1] - ranges[lane][0] for lane in cursor)  # every lane read to its end
    return steps


def global_steps(rows: int, global_batch: int, lanes: int, world_size: int) -> list[list[int]]:
    """Each step's rows, all ranks together, rank by rank."""
    per_rank = [epoch_steps(rows, global_batch, lanes, rank, world_size) for rank in range(world_size)]
    assert len({len(steps) for steps in per_rank}) == 1  # every rank takes the same number of steps
    return [[row for steps in per_rank for row in steps[s]] for s in range(len(per_rank[0]))]


@pytest.mark.parametrize("rows, global_batch, lanes, world_size", [
    (1000, 64, 1, 1),  # one worker, one lane: the sequence in order
    (1000, 64, 2, 2),
    (1003, 64, 4, 4),  # rows not divisible by the lanes: lanes differ by one row
    (1003, 64, 8, 4),  # two lanes per worker
    (997, 64, 8, 8),
    (6000, 128, 64, 64),  # 64 workers
    (6000, 128, 64, 8),
    (10, 64, 64, 64),  # fewer rows than lanes: most lanes empty, most ranks pad
])
def test_every_row_is_trained_once_and_every_full_step_splits_evenly(rows, global_batch, lanes, world_size):
    steps = global_steps(rows, global_batch, lanes, world_size)
    trained = sorted(row for step in steps for row in step)
    assert trained == list(range(rows))
    assert len(steps) == -(-rows // global_batch)
    for step in range(len(steps)):
        counts = [rank_step(step, rows, global_batch, lanes, rank, world_size).rows_in_step for rank in range(world_size)]
        assert set(counts) == {min(global_batch, rows - step * global_batch)}
        mine = [sum(take for _, take in rank_step(step, rows, global_batch, lanes, rank, world_size).takes)
                for rank in range(world_size)]
        assert sum(mine) == counts[0] and max(mine) - min(mine) <= 1  # a full step: global_batch / W each
        if counts[0] == global_batch:
            assert set(mine) == {global_batch // world_size}


@pytest.mark.parametrize("lanes, worker_counts", [(8, (1, 2, 4, 8)), (64, (1, 2, 4, 8, 16, 32, 64)), (6, (1, 2, 3, 6))])
def test_the_steps_hold_the_same_rows_for_every_worker_count_that_divides_the_lanes(lanes, worker_counts):
    rows, global_batch = 5003, 192
    reference = [sorted(step) for step in global_steps(rows, global_batch, lanes, 1)]
    for world_size in worker_counts:
        assert [sorted(step) for step in global_steps(rows, global_batch, lanes, world_size)] == reference, world_size


def test_one_lane_is_the_sequence_in_order_and_lanes_interleave():
    """With one lane the steps are the sequence cut in order (today's single-stream order); with several, step s
    still holds global positions [s x B, (s + 1) x B), each position a row of lane p % lanes."""
    assert global_steps(100, 32, 1, 1) == [list(range(0, 32)), list(range(32, 64)), list(range(64, 96)),
                                           list(range(96, 100))]
    ranges = lane_ranges(10, 4)
    assert ranges == [(0, 3), (3, 6), (6, 8), (8, 10)] and lane_sizes(10, 4) == [3, 3, 2, 2]
    # positions 0..3 are the first rows of lanes 0..3, 4..7 their second rows, 8 and 9 the third of lanes 0, 1
    assert global_steps(10, 4, 4, 1) == [[0, 3, 6, 8], [1, 4, 7, 9], [2, 5]]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("steps_done", [0, 1, 7, 15, 16])
def test_a_rank_resumed_after_any_step_trains_exactly_what_the_uninterrupted_one_does(world_size, steps_done):
    rows, global_batch, lanes = 1001, 64, 4  # 16 steps, the last partial
    start = resume_points(steps_done, rows, global_batch, lanes)
    assert sum(start) == min(steps_done * global_batch, rows)
    for rank in range(world_size):
        whole = epoch_steps(rows, global_batch, lanes, rank, world_size)
        resumed = epoch_steps(rows, global_batch, lanes, rank, world_size, first_step=steps_done, start=start)
        assert resumed == whole[steps_done:]


def test_lane_reads_cover_each_lane_exactly_in_the_epochs_chunk_order():
    order = np.random.default_rng(3).permutation(len(UNEVEN))
    rows = sum(UNEVEN)
    sequence = [(int(c), i) for c in order for i in range(UNEVEN[c])]  # (chunk, training row within it)
    for start, stop in lane_ranges(rows, 8):
        got = [(read.chunk, read.skip + i) for read in lane_reads(UNEVEN, order, start, stop)
               for i in range(read.take)]
        assert got == sequence[start:stop]


@pytest.mark.parametrize("lanes", [1, 2, 4, 8, 64])
def test_read_amplification_is_bounded_by_one_cut_chunk_per_lane_boundary(lanes):
    rows, largest = sum(UNEVEN), max(UNEVEN)
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(len(UNEVEN))
        amplification = rows_read(UNEVEN, order, rows, lanes) / rows
        assert 1 <= amplification <= 1 + (lanes - 1) * largest / rows
    assert rows_read(UNEVEN, range(len(UNEVEN)), rows, 1) == rows  # one lane reads every chunk once


def test_a_worker_count_that_does_not_divide_the_lanes_is_refused_naming_the_key():
    assert owned_lanes(1, 4, 8) == [1, 5]
    with pytest.raises(ValueError, match="data.lanes 6 is not a multiple of 4 workers"):
        check_lanes(6, 4)


def test_rank_step_is_shared_read_only():
    """rank_step is cached (every epoch asks the same steps): a caller changing the order it got would change
    every later epoch's rows, so the order cannot be written to."""
    first = rank_step(3, 1450, 128, 4, 1, 2)
    assert rank_step(3, 1450, 128, 4, 1, 2) is first
    with pytest.raises(ValueError, match="read-only"):
        first.order[0] = 0
