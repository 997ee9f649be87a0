"""The benchmark scripts' own arithmetic (the scripts themselves are not part of the test run)."""

from benchmarks.chaos import account

# The uninterrupted run: two ranks, each a sequence of micro-batches (row indices).
REFERENCE = {101: [(0.0, (0, 1)), (0.1, (4, 5)), (0.2, (8, 9))],
             102: [(0.0, (2, 3)), (0.1, (6, 7)), (0.2, (10, 11))]}


def test_restarts_that_replay_uncommitted_steps_lose_and_duplicate_nothing():
    attempts = {1: [(0, (0, 1)), (0, (4, 5))], 2: [(0, (2, 3)), (0, (6, 7))],  # killed after step 2
                3: [(0, (4, 5)), (0, (8, 9))], 4: [(0, (6, 7)), (0, (10, 11))]}  # resumed at step 2
    assert account(REFERENCE, attempts) == {"rows_lost": 0, "rows_duplicated": 0}


def test_a_resume_past_the_checkpoint_loses_rows():
    attempts = {1: [(0, (0, 1))], 2: [(0, (2, 3))], 3: [(0, (8, 9))], 4: [(0, (10, 11))]}  # skipped step 2
    assert account(REFERENCE, attempts) == {"rows_lost": 4, "rows_duplicated": 0}


def test_a_resumed_stream_that_drifts_is_counted_both_ways():
    attempts = {1: [(0, (0, 1)), (0, (4, 5)), (0, (4, 5))], 2: [(0, (2, 3)), (0, (6, 7)), (0, (10, 11))]}
    assert account(REFERENCE, attempts) == {"rows_lost": 2, "rows_duplicated": 2}
