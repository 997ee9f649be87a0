"""Callbacks that run in Ray Train's controller, and the clean-up of placement groups a run left behind."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rayscale.errors import NonFiniteError, UserError, user_error_inside
from rayscale.files import GROUPS_FILE

SHUTDOWN_TIMEOUT_ENV = "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"  # Train's torch backend reads it (default 30)
SHUTDOWN_TIMEOUT_S = 5


def controller_callback(groups_file: Path, elastic: bool = False):
    """A callback for the Train controller, which runs on the driver's node.

    - One line in `groups_file` per worker group started: a checkpoint's progress counts the restores before
      it, but not a restart that failed again before the next checkpoint; this counts every one. The line
      names the group's placement group and the controller (its actor ID), for `remove_placement_groups_left`
      to find.
    - Before a failed group is replaced, Train waits up to 30 s for its process group to shut down gracefully,
      which a frozen worker never does: 5 s is plenty for a healthy group. The controller reads the variable
      from its own environment (Train does not pass it on from the driver), so it is set here, in the
      controller's process.
    - A run that diverged (train.max_nonfinite_steps: NonFiniteError on its workers), or whose workers found
      bad input (a UserError: a NaN in a later row group, a user loss that broke its contract) is not retried:
      resumed from its last checkpoint, the same weights, rows and code fail the same way, and each of
      run.max_failures retries cost a restart and another screen of tracebacks before the same end. Raising in
      Train's hook before its failure decision makes the decision Train's own for a failed controller callback:
      end the run, with the error (`user_error_inside` finds it for the driver's one line).
    """
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    class RunControl(WorkerGroupCallback, ControllerCallback):
        def __init__(self):
            self.cause = "start"  # why the next group starts: start, resize, preemption or fault
            self.final: Exception | None = None  # what ends the run instead of a retry

        def after_controller_state_update(self, previous_state, current_state) -> None:
            cause = restart_cause(current_state)
            if cause is None:
                return
            self.cause = cause
            if elastic and cause in ("fault", "preemption"):
                refresh_cluster_view()

        def after_worker_group_poll_status(self, worker_group_status) -> None:
            for error in worker_group_status.errors.values():
                self.final = user_error_inside(error, (NonFiniteError, UserError)) or self.final

        def before_controller_execute_failure_decision(self, failure_decision) -> None:
            if self.final is not None:
                raise (NonFiniteError if isinstance(self.final, NonFiniteError) else UserError)(str(self.final))

        def before_worker_group_start(self, worker_group_context) -> None:
            os.environ.setdefault(SHUTDOWN_TIMEOUT_ENV, str(SHUTDOWN_TIMEOUT_S))

        def after_worker_group_start(self, worker_group) -> None:
            import ray

            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            record_group(groups_file, placement_group=group.id.hex(), world_size=len(worker_group.get_workers()),
                         cause=self.cause, controller=ray.get_runtime_context().get_actor_id())

    return RunControl()


def refresh_cluster_view() -> None:
    """Before Train sizes the next group after a lost worker: Ray Data's autoscaling coordinator, which Train's
    elastic policy asks how many workers fit, refreshes its view of the nodes only every 20 s, so right after a
    node went it still counts that node's CPUs; Train then waits on a placement group that cannot be placed
    (seen here to outlast Train's own 60 s start timeout). Ask it to recompute now, and let the policy's 1 s
    cache of the answer expire. Elastic runs only: a fixed-size run never asks the coordinator."""
    import ray
    from ray._raylet import Config
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    # A node lost without notice is declared dead after this many missed health checks; until then it counts.
    time.sleep(min(_MOST_WAIT_S, Config.health_check_period_ms() * Config.health_check_failure_threshold() / 1000))
    try:
        coordinator = get_or_create_autoscaling_coordinator()
        ray.get(coordinator.get_reserved_resources.remote("rayscale-refresh", recompute=True), timeout=10)
    except Exception:  # noqa: BLE001 - only a fresher answer is lost; Train goes on as it would have
        return
    time.sleep(_POLICY_CACHE_S)


_POLICY_CACHE_S = 1.2  # Train's elastic policy re-asks the coordinator at most once a second
_MOST_WAIT_S = 30.0


def restart_cause(state) -> str | None:
    """Why Train's controller is about to start a new worker group, from the state it entered: an elastic
    resize, a preemption (a drained node, charged to run.max_preemptions), or a fault (run.max_failures)."""
    from ray.train.v2._internal.execution.controller.state import ResizingState, RestartingState
    from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure

    if isinstance(state, ResizingState):
        return "resize"
    if isinstance(state, RestartingState):
        return "preemption" if _is_preemption_failure(state.training_failed_error) else "fault"
    return None


def record_group(groups_file: Path, **fields) -> None:
    with open(groups_file, "a") as handle:
        handle.write(json.dumps({"started_at": time.time(), **fields}) + "\n")


def remove_placement_groups_left(run_dir: Path, wait_s: float = 0.0) -> int:
    """Remove the placement groups of this run's worker groups that are still held; returns how many.

    Train's controller removes its group's placement group when it finishes or aborts; a controller that dies
    first (a stopped Tune trial whose actor Tune ends mid-abort, a crash) leaves it held for as long as the job
    lives (a 1-CPU group held after a search was seen on a loaded 2-core machine): a placement group is not
    fate-shared with the actor that created it, only with its job. A controller ended while it retries also
    leaves one it never recorded: seen in a search, a stopped trial's controller, its workers killed with its
    actor, retried and created the next group's placement group as it died. So the groups named in
    `worker_groups.jsonl` go, and every group that a controller named there created. Call this once the run is
    over: its controllers' groups are then garbage. Train's own detached cleaner, which covered only part of
    this, is not started (launch/torch_trainer.py): every run and every trial calls this instead.

    `wait_s`: first wait up to this long until no controller named there is still running
    (`running_controllers`). One killed mid-retry created its group 0.2 s after the GCS had marked it dead,
    between the raylet's SIGTERM and SIGKILL, so a sweep right after a search ended missed it."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    lines = _group_lines(run_dir)
    if not lines:
        return 0
    named = {line["placement_group"] for line in lines if line.get("placement_group")}
    controllers = controllers_of(run_dir)
    deadline = time.monotonic() + wait_s
    while running_controllers(controllers) and time.monotonic() < deadline:
        time.sleep(0.1)
    removed = 0
    for pg_id, creator in held_placement_groups().items():
        if pg_id in named or creator in controllers:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    return removed


def controllers_of(run_dir: Path) -> set[str]:
    """The actor IDs of the Train controllers that started this run's worker groups (worker_groups.jsonl)."""
    return {line["controller"] for line in _group_lines(run_dir) if line.get("controller")}


def _group_lines(run_dir: Path) -> list[dict]:
    path = run_dir / GROUPS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def running_controllers(actor_ids: set[str]) -> set[str]:
    """Those of these actors whose process the GCS still counts alive: a dead actor's process can still run
    for a moment, until the raylet's SIGKILL, and act (create a placement group). An actor that never got a
    process, or one the GCS no longer knows, is not running."""
    from ray._private.state import state
    from ray._raylet import ActorID, WorkerID
    from ray.core.generated import gcs_pb2

    accessor = state._connect_and_get_accessor()
    running = set()
    for actor_id in actor_ids:
        actor = accessor.get_actor_info(ActorID(bytes.fromhex(actor_id)))
        worker_id = gcs_pb2.ActorTableData.FromString(actor).address.worker_id if actor else b""
        worker = accessor.get_worker_info(WorkerID(worker_id)) if worker_id else None
        if worker is not None and gcs_pb2.WorkerTableData.FromString(worker).is_alive:
            running.add(actor_id)
    return running


def held_placement_groups() -> dict[str, str]:
    """Every placement group not yet removed, by ID, with the ID of the actor that created it (hex; empty for
    a driver's): Ray's public table leaves the creator out, so this reads the GCS's own records."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    held = {}
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if group.state != gcs_pb2.PlacementGroupTableData.REMOVED:
            held[group.placement_group_id.hex()] = group.creator_actor_id.hex()
    return held
