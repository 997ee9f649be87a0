"""[1] The Ray Train worker function: what runs inside every training worker. It turns the driver's plain
payload back into the typed one and runs the engine's loop through Ray Train's context."""

from __future__ import annotations

import time


def train_worker(payload: dict) -> None:
    entered = time.time()  # start-up's split: launching the group before this, setting up the worker after
    from rayscale.data.datasets import quiet_ray_data
    from rayscale.engine.loop import TrainLoop
    from rayscale.engine.state import WorkerPayload
    from rayscale.launch.ray_context import RayTrainContext

    quiet_ray_data()
    typed = WorkerPayload.from_dict(payload)
    TrainLoop(typed, RayTrainContext(typed), entered_at=entered).train()
