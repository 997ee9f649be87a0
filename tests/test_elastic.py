"""Elastic and preemption-aware runs.

- Unit: why Train's controller starts a new worker group (an elastic resize, a preemption, a fault), as
  worker_groups.jsonl records it and summary.json counts it.
- On a simulated two-node cluster (`ray.cluster_utils.Cluster`, everything on 127.0.0.1): see the tests below.
"""

from __future__ import annotations

import pytest

from rayscale.launch.callbacks import restart_cause


def _states():
    from ray.exceptions import ActorDiedError, RayActorError
    from ray.train.v2._internal.execution.controller.state import (
        ReschedulingState, ResizingState, RestartingState, RunningState)
    from ray.train.v2._internal.execution.scaling_policy.scaling_policy import ResizeDecision
    from ray.train.v2.api.exceptions import PreemptionError, WorkerGroupError
    from ray.train.v2.api.preemption import PreemptionInfo

    # What a worker's death is when its node was drained for a preemption before it went.
    preempted = RayActorError(error_msg="node preempted", preempted=True)
    info = PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"node": [1]})
    return [
        (ResizingState(ResizeDecision(num_workers=2, resources_per_worker={"CPU": 1})), "resize"),
        (RestartingState(PreemptionError(info)), "preemption"),
        (RestartingState(WorkerGroupError("lost", {1: preempted, 0: RuntimeError("collective aborted")})),
         "preemption"),
        (RestartingState(WorkerGroupError("lost", {1: ActorDiedError()})), "fault"),
        (RestartingState(WorkerGroupError("bug", {0: RuntimeError("boom")})), "fault"),
        (ReschedulingState(WorkerGroupError("bug", {0: RuntimeError("boom")})), None),  # keeps the cause it had
        (RunningState(), None),
    ]


@pytest.mark.parametrize("index", range(7))
def test_a_new_worker_groups_cause_is_read_off_the_controllers_state(index):
    state, cause = _states()[index]
    assert restart_cause(state) == cause
