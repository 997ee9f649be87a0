"""A Ray `worker_process_setup_hook` for tests: every training rank appends each step it trains to
$RAYSCALE_TEST_STEP_LOG/<pid>.jsonl: when, its rank and world size, the epoch, the step's index in it, and the
row ids it trained (none for a zero-weight stand-in); in <pid>.notice.jsonl, when Train's watcher handed the rank
a drain notice; in <pid>.held.jsonl, when the rank checkpointed for a drain and began holding for the restart.
Nothing is logged unless the variable is set.

$RAYSCALE_TEST_COORDINATOR_TICK_S, where set, is how often Ray Data's AutoscalingCoordinator (which Train's elastic
policy asks what the cluster holds) looks at the cluster's nodes: every 20 s in Ray, so a node added waits up to
that long before an elastic run may grow onto it."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

COORDINATOR = "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator"


def install() -> None:
    from after_import import on_import

    tick = os.environ.get("RAYSCALE_TEST_COORDINATOR_TICK_S")
    if tick:  # read by the coordinator's thread before each of its sleeps, so set before its actor starts
        on_import(COORDINATOR, lambda module: setattr(module._AutoscalingCoordinatorActor, "TICK_INTERVAL_S",
                                                      float(tick)))
    directory = os.environ.get("RAYSCALE_TEST_STEP_LOG")
    if not directory:
        return

    def log_steps(loop) -> None:
        train_one = loop.TrainLoop.train_one

        def logged(self, rows, index, waited_from):
            train_one(self, rows, index, waited_from)
            record = {"time": time.time(), "pid": os.getpid(), "rank": self.run.rank,
                      "world_size": self.run.world_size, "epoch": self.run.state.epoch, "index": index,
                      "rows": [] if rows.padding else rows.rows["row_id"].tolist()}
            with open(Path(directory) / f"{os.getpid()}.jsonl", "a") as out:
                out.write(json.dumps(record) + "\n")

        loop.TrainLoop.train_one = logged

    def log_holds(ray_context) -> None:
        hold_for_restart = ray_context.RayTrainContext.hold_for_restart

        def held(self, notice):
            record = {"time": time.time(), "pid": os.getpid(), "rank": self.rank}
            with open(Path(directory) / f"{os.getpid()}.held.jsonl", "a") as out:
                out.write(json.dumps(record) + "\n")
            hold_for_restart(self, notice)

        ray_context.RayTrainContext.hold_for_restart = held

    def log_notices(worker) -> None:
        """When Train's preemption watcher hands this rank a drain notice (the worker actor's method it calls)."""
        mark_preempt = worker.RayTrainWorker.mark_preempt

        def noticed(self, info):
            from ray.train.v2._internal.execution.context import get_train_context

            record = {"time": time.time(), "pid": os.getpid(), "rank": get_train_context().get_world_rank()}
            with open(Path(directory) / f"{os.getpid()}.notice.jsonl", "a") as out:
                out.write(json.dumps(record) + "\n")
            mark_preempt(self, info)

        worker.RayTrainWorker.mark_preempt = noticed

    # Patched where they are imported: a training rank. Task workers and the controller never import the loop.
    on_import("rayscale.engine.loop", log_steps)
    on_import("rayscale.launch.ray_context", log_holds)
    on_import("ray.train.v2._internal.execution.worker_group.worker", log_notices)


def records(directory: Path) -> list[dict]:
    return _read(Path(directory).glob("*[0-9].jsonl"))


def holds(directory: Path) -> list[dict]:
    """Every rank's start of a hold for a restart after a drain's checkpoint, oldest first."""
    return _read(Path(directory).glob("*.held.jsonl"))


def notices(directory: Path) -> list[dict]:
    """Every drain notice a rank was handed by Train's watcher, oldest first."""
    return _read(Path(directory).glob("*.notice.jsonl"))


def _read(paths) -> list[dict]:
    found = [json.loads(line) for path in sorted(paths) for line in path.read_text().splitlines()]
    return sorted(found, key=lambda record: record["time"])


def kept_steps(records: list[dict]) -> tuple[dict[tuple[int, int], list[int]], set[tuple[int, int]]]:
    """The rows each (epoch, step) was last trained on (by the last worker group that trained it: as many latest
    entries as its world size), and the steps trained more than once (redone after a restart)."""
    by_step: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for record in records:
        by_step[(record["epoch"], record["index"])].append(record)
    kept, redone = {}, set()
    for key, entries in by_step.items():
        last = entries[-entries[-1]["world_size"]:]
        assert len({entry["pid"] for entry in last}) == len(last), f"step {key}: a rank logged it twice in a row"
        kept[key] = sorted(row for entry in last for row in entry["rows"])
        if len(entries) > len(last):
            redone.add(key)
    return kept, redone


def global_step(steps_per_epoch: int):
    """A record's step counted over the run, as the loop counts it (the first step is 1)."""
    return lambda record: record["epoch"] * steps_per_epoch + record["index"] + 1


def every_row_once(kept: dict[tuple[int, int], list[int]], epoch: int, train_rows: int) -> bool:
    """Whether the steps kept for `epoch` trained each of the `train_rows` rows exactly once."""
    rows = [row for (e, _), step_rows in kept.items() if e == epoch for row in step_rows]
    return len(rows) == train_rows and len(set(rows)) == train_rows
