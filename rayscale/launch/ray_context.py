"""The engine's context (engine/context.py) inside a Ray Train worker: the train context's rank and device, this
rank's own Ray Data reads (data/datasets.py), `get_checkpoint` and `report`. `report` is a barrier across workers, which is why the loop
reports on an interval and at epoch ends, never per step."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray
import ray.train
import ray.train.torch

from rayscale import config
from rayscale.data.datasets import build_reads, quiet_ray_data
from rayscale.engine import checkpoint
from rayscale.engine.context import Blocks, WritePart
from rayscale.engine.state import WorkerPayload
from rayscale.files import CHECKPOINTS_DIR
from rayscale.math.lanes import ChunkRead


class RayTrainContext:
    def __init__(self, payload: WorkerPayload):
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()  # where this rank's read tasks should run
        quiet_ray_data()  # in this process too: it runs its own reads (and keeps their blocks in order)
        self.payload, self.run_dir = payload, Path(payload.run_dir)
        self.local_mode, self.cfg = payload.local_mode, config.from_dict(payload.config)
        self._restored = ray.train.get_checkpoint()
        if self._restored is None and self.local_mode:  # re-running a local-mode run.name resumes it too
            latest = checkpoint.latest_local(self.run_dir / CHECKPOINTS_DIR)
            self._restored = ray.train.Checkpoint.from_directory(str(latest)) if latest is not None else None
        # Local mode keeps no copy in Ray's storage, so its checkpoints stay in the run directory; otherwise
        # each rank stages its part on local disk and Ray copies it to storage.
        self.staging_root = None if self.local_mode else checkpoint.fresh_staging_dir(self.run_dir, self.rank)

    def read(self, split: str, reads: list[ChunkRead], prefetch: int) -> Blocks:
        spec = self.payload.train_split if split == "train" else self.payload.val_split
        dataset = build_reads(spec, reads, node_id=self.node_id)
        return dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch)

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        if self._restored is None:
            yield None
            return
        with self._restored.as_directory() as directory:
            yield Path(directory)

    def save(self, metrics: dict, write: WritePart) -> None:
        if self.local_mode:
            (self.run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=self.run_dir / CHECKPOINTS_DIR if self.local_mode
                                        else self.staging_root))
        write(staging)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)))
        if not self.local_mode:  # uploaded to the run's storage by now
            shutil.rmtree(staging, ignore_errors=True)

    def report(self, metrics: dict) -> None:
        ray.train.report(metrics)

    def report_finished(self, metrics: dict) -> None:
        # Local mode: hand the last checkpoint back for the outputs (Ray Train has none of its own there).
        if self.local_mode and self._restored is not None:
            ray.train.report(metrics, checkpoint=self._restored)

    def parameter_client(self, model):
        from rayscale.launch.ps_actors import ParameterClient

        return ParameterClient(list(self.payload.ps_servers), [list(s) for s in self.payload.ps_shards], model,
                               self.cfg.ps.mode, self.rank, self.cfg.train.grad_clip)
