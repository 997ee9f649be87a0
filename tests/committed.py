"""A run's committed checkpoints, for the tests that kill or stop a run after one, or check where it resumed.

A checkpoint directory appears while a checkpoint is still being reported, and an epoch-end line in
metrics.jsonl is written before its checkpoint is; a fault at either point may restart the run from scratch.
A checkpoint is committed once Train's controller has registered it: a restart resumes from it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path


def registered_checkpoint(experiment: Path) -> bool:
    """Whether Train's controller has committed a checkpoint of the run under `experiment` (run.storage_path /
    run.name, or the run directory's checkpoints/): its snapshot, written after it registers one, names a latest
    checkpoint."""
    snapshot = experiment / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False


def wait_for_registered_checkpoint(experiment: Path, run_over: threading.Event, timeout: float) -> bool:
    """Poll until the run has a committed checkpoint; False once `run_over` is set or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not run_over.is_set():
        if registered_checkpoint(experiment):
            return True
        time.sleep(0.05)
    return False


def latest_state(directories):
    """The state of the checkpoint furthest into training among `directories` (their times can tie on a coarse
    clock)."""
    from rayscale.engine import checkpoint

    states = [checkpoint.read_state(d) for d in directories]
    return max(states, key=lambda state: state.train_state.samples_seen)
