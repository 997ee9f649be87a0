"""Waiting for a run's first committed checkpoint, for the tests that kill or stop a run after it.

A checkpoint directory appears while a checkpoint is still being reported, and an epoch-end line in
metrics.jsonl is written before its checkpoint is; a fault at either point may restart the run from scratch.
Only once Train's controller has registered a checkpoint does a restart resume from it."""

from __future__ import annotations

import json
import time
from pathlib import Path


def registered_checkpoint(experiment: Path) -> bool:
    """Whether Train's controller has committed a checkpoint of this run: its snapshot, written after it registers
    one, names a latest checkpoint."""
    snapshot = experiment / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False


def wait_for_registered_checkpoint(experiment: Path, timeout: float) -> bool:
    """Poll until the run under `experiment` has a committed checkpoint; False if `timeout` seconds pass first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if registered_checkpoint(experiment):
            return True
        time.sleep(0.05)
    return False
