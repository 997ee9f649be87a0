"""[1] The Ray Train worker function: what runs inside every training worker. It turns the driver's plain
payload back into the typed one and runs the engine's loop through Ray Train's context."""

from __future__ import annotations

import os
import time


def train_worker(payload: dict) -> None:
    entered = time.time()  # start-up's split: launching the group before this, setting up the worker after
    from rayscale.data.datasets import quiet_ray_data
    from rayscale.engine.loop import TrainLoop
    from rayscale.engine.state import WorkerPayload
    from rayscale.launch.ray_context import RayTrainContext

    quiet_ray_data()
    threads_as_ray_assigned()
    typed = WorkerPayload.from_dict(payload)
    TrainLoop(typed, RayTrainContext(typed), entered_at=entered).train()


def threads_as_ray_assigned() -> None:
    """Torch's intra-op threads as OMP_NUM_THREADS says: Ray sets it to the floor of the worker's CPUs as the
    actor starts, unless the user set it. A process that imported torch before then (a Ray
    worker_process_setup_hook, a user's module) has a thread pool the size of the machine instead, which
    oversubscribes the node's CPUs and changes a run's numbers with the import order (a reduction split over
    more threads rounds differently)."""
    import torch

    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0 and torch.get_num_threads() != int(wanted):
        torch.set_num_threads(int(wanted))
