"""The Ray Train worker function's own set-up (rayscale/launch/worker.py), without Ray."""

from __future__ import annotations

import pytest
import torch

from rayscale.launch.worker import threads_as_ray_assigned


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("omp, start, expected", [
    pytest.param("1", 2, 1, id="a-pool-sized-before-ray-set-the-variable-shrinks"),
    pytest.param("3", 1, 3, id="the-users-or-rays-count-wins"),
    pytest.param(None, 2, 2, id="unset-left-alone"),
    pytest.param("0", 2, 2, id="zero-left-alone"),
    pytest.param("two", 2, 2, id="not-a-count-left-alone"),
])
def test_torchs_threads_follow_omp_num_threads_whenever_torch_was_imported(threads, monkeypatch, omp, start,
                                                                           expected):
    torch.set_num_threads(start)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    threads_as_ray_assigned()
    assert torch.get_num_threads() == expected
