"""Batch plan arithmetic: derived accumulation, and errors that show the arithmetic."""

import pytest

from rayscale.errors import ConfigError
from rayscale.math.batching import micro_batch_bounds, plan_batches, rank_slice, steps_per_epoch


@pytest.mark.parametrize("global_bs, micro, workers, per_worker, expected_micro, accumulation", [
    pytest.param(256, None, 2, 128, 128, 1, id="micro-defaults-to-per-worker"),
    pytest.param(256, 32, 2, 128, 32, 4, id="4-accumulation-steps"),
    pytest.param(64, 8, 1, 64, 8, 8, id="one-worker"),
    pytest.param(64, 8, 0, 64, 8, 8, id="local-mode-counts-as-one"),
    pytest.param(96, 16, 3, 32, 16, 2, id="three-workers"),
])
def test_plan(global_bs, micro, workers, per_worker, expected_micro, accumulation):
    plan = plan_batches(global_bs, micro, workers)
    assert (plan.per_worker_batch_size, plan.micro_batch_size, plan.accumulation_steps) == (
        per_worker, expected_micro, accumulation)
    assert plan.micro_batch_size * plan.accumulation_steps * plan.num_workers == global_bs


@pytest.mark.parametrize("global_bs, micro, workers, message", [
    pytest.param(256, 48, 2, "batch.global_batch_size 256 is not micro_batch_size 48 x accumulation x 2 workers",
                 id="not-a-multiple-of-micro"),
    pytest.param(255, None, 2, "not divisible by 2 workers", id="not-divisible-by-workers"),
    pytest.param(64, 64, 2, "micro_batch_size 64 is larger than the per-worker batch 32", id="micro-too-large"),
])
def test_plan_errors_show_the_arithmetic(global_bs, micro, workers, message):
    with pytest.raises(ConfigError, match=message):
        plan_batches(global_bs, micro, workers)


@pytest.mark.parametrize("rows, rank, expected", [
    pytest.param(64, 0, (0, 32), id="full-step-rank0"),
    pytest.param(64, 1, (32, 64), id="full-step-rank1"),
    pytest.param(40, 1, (32, 40), id="partial-step-short-rank"),
    pytest.param(20, 1, (20, 20), id="partial-step-empty-rank"),
])
def test_rank_slice(rows, rank, expected):
    assert rank_slice(rows, plan_batches(64, 8, 2), rank) == expected


def test_rank_rows_do_not_depend_on_micro_batch_size():
    for micro in (1, 2, 4, 8, 16, 32):
        assert rank_slice(50, plan_batches(64, micro, 2), 1) == (32, 50)


@pytest.mark.parametrize("rows, micro, expected", [
    pytest.param(8, 4, [(0, 4), (4, 8)], id="even"),
    pytest.param(10, 4, [(0, 4), (4, 8), (8, 10)], id="short-last"),
    pytest.param(0, 4, [], id="nothing"),
])
def test_micro_batch_bounds(rows, micro, expected):
    assert micro_batch_bounds(rows, micro) == expected


@pytest.mark.parametrize("rows, global_bs, steps", [(1797, 128, 15), (1280, 128, 10), (1, 128, 1)])
def test_steps_per_epoch_counts_the_partial_step(rows, global_bs, steps):
    assert steps_per_epoch(rows, global_bs) == steps
