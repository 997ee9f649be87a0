"""The engine's context (engine/context.py) inside a Ray Train worker: the train context's rank and device, this
rank's own Ray Data reads (data/datasets.py), `get_checkpoint` and `report`. `report` is a barrier across workers, which is why the loop
reports on an interval and at epoch ends, never per step."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pyarrow.fs
import ray
import ray.train
import ray.train.torch

from rayscale import config
from rayscale.data.datasets import build_reads, quiet_ray_data
from rayscale.engine import checkpoint
from rayscale.engine.components.preemption import PreemptionNotice
from rayscale.engine.context import Blocks, WritePart
from rayscale.engine.state import WorkerPayload
from rayscale.errors import UserError
from rayscale.files import CHECKPOINTS_DIR, CHECKPOINTS_KEPT
from rayscale.math.lanes import ChunkRead
from rayscale.plugins import import_callable


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
        self.watches_drains = payload.watch_drains and not self.local_mode
        self.upload = _upload_options(self.cfg.run.checkpoint_upload, self.cfg.run.checkpoint_upload_fn)

    def read(self, split: str, reads: list[ChunkRead], prefetch: int) -> Blocks:
        spec = self.payload.train_split if split == "train" else self.payload.val_split
        dataset = build_reads(spec, reads, node_id=self.node_id)
        return dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch)

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        if self._restored is None:
            yield None
            return
        with whole_checkpoint(self._restored, say=print if self.rank == 0 else None) as directory:
            yield directory

    def save(self, metrics: dict, write: WritePart) -> None:
        if self.local_mode:
            (self.run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=self.run_dir / CHECKPOINTS_DIR if self.local_mode
                                        else self.staging_root))
        write(staging)
        if self.local_mode:  # the checkpoint stays where it was written, with the latest few before it
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)))
            checkpoint.keep_latest(self.run_dir / CHECKPOINTS_DIR, CHECKPOINTS_KEPT)
            return
        # Ray copies the part to the run's storage (in the background with checkpoint_upload async) and deletes
        # the staged copy once it is there; the checkpoint counts only when every rank's copy is whole.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                         delete_local_checkpoint_after_upload=True, **self.upload)

    def report(self, metrics: dict) -> None:
        # Ray hands reports to the controller in the order they were made, so a report made while a checkpoint
        # uploads in the background waits for that upload; made the same way (queued behind it), it does not
        # hold up training.
        ray.train.report(metrics, **({} if self.local_mode
                                     else {"checkpoint_upload_mode": self.upload["checkpoint_upload_mode"]}))

    def report_finished(self, metrics: dict) -> None:
        # Local mode: hand the last checkpoint back for the outputs (Ray Train has none of its own there).
        if self.local_mode and self._restored is not None:
            ray.train.report(metrics, checkpoint=self._restored)

    def parameter_client(self, model):
        from rayscale.launch.ps_actors import ParameterClient

        return ParameterClient(list(self.payload.ps_servers), [list(s) for s in self.payload.ps_shards], model,
                               self.cfg.ps.mode, self.rank, self.cfg.train.grad_clip)

    def drain_notice(self) -> PreemptionNotice | None:
        info = ray.train.get_preemption_info()  # a barrier: every rank gets rank 0's answer
        if info is None:
            return None
        return PreemptionNotice(tuple(info.preempted_node_ids), tuple(info.preempted_ranks), info.deadline_ms)

    def hold_for_restart(self, notice: PreemptionNotice) -> NoReturn:
        """Ray Train's controller restarts the group at the drain's deadline (or when every rank has stopped),
        charging Ray's preemption budget; until then this rank sleeps, its checkpoint uploading. Bounded: past
        the deadline by run.hang_timeout_s (Ray assumes 120 s when the drain gave none) it gives up."""
        deadline_s = (notice.deadline_ms / 1000 if notice.deadline_ms else time.time() + _RAY_DEFAULT_DRAIN_S)
        give_up_at = deadline_s + self.cfg.run.hang_timeout_s
        while time.time() < give_up_at:
            time.sleep(0.5)
        raise RuntimeError(f"{notice.describe()}: the group was not restarted within run.hang_timeout_s "
                           f"{self.cfg.run.hang_timeout_s:g} s of the drain's deadline")


@contextlib.contextmanager
def whole_checkpoint(latest: ray.train.Checkpoint, say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """The directory of `latest` (the checkpoint Ray registered last), or of the newest whole one Ray keeps
    before it where `latest` was damaged after Ray registered it (storage lost a file; a run.checkpoint_upload_fn
    copied part of it and returned). Resuming from the latest alone, every restart would fail the same way; the
    one before is as exact a resume, as after a kill that lost a checkpoint mid-upload, and only replays steps.
    Every rank checks the same files, so all resume from the same checkpoint. `say`: where to tell the user."""
    damaged = []
    for candidate in _newest_first(latest):
        with candidate.as_directory() as directory:
            try:
                checkpoint.verify(directory)
            except checkpoint.IncompleteCheckpoint as error:
                damaged.append(str(error))
                continue
            if damaged and say is not None:
                say(f"[rayscale] {'; '.join(damaged)}: resuming from the whole checkpoint before it, "
                    f"{Path(candidate.path).name}")
            yield Path(directory)
            return
    # The user's to settle (every restart would end here): one line, as bad input is.
    raise UserError(f"no whole checkpoint to resume from: {'; '.join(damaged)}; to start the run over, remove "
                    f"its run directory or pick another run.name")


def _newest_first(latest: ray.train.Checkpoint) -> Iterator[ray.train.Checkpoint]:
    """`latest`, then the checkpoints beside it in the run's storage made before it, newest first (Ray names
    each by the local time it was made). Listed only if `latest` is not whole. A clock set back could misorder
    two; any whole checkpoint of the run resumes it exactly, so that would only replay more steps."""
    yield latest
    parent, name = latest.path.rstrip("/").rsplit("/", 1)
    listed = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    earlier = sorted((info.path for info in listed if info.type == pyarrow.fs.FileType.Directory
                      and info.base_name.startswith(_RAY_CHECKPOINT_PREFIX) and info.base_name < name),
                     reverse=True)
    for path in earlier:
        yield ray.train.Checkpoint(path, filesystem=latest.filesystem)


_RAY_CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint_<date>_<time>.<microseconds> in the run's storage
_RAY_DEFAULT_DRAIN_S = 120.0  # what Train's controller waits for a drain that gives no deadline


def _upload_options(mode: str, upload_fn: str | None) -> dict:
    """ray.train.report's upload arguments for run.checkpoint_upload and run.checkpoint_upload_fn."""
    options: dict = {"checkpoint_upload_mode": ray.train.CheckpointUploadMode.ASYNC if mode == "async"
                     else ray.train.CheckpointUploadMode.SYNC}
    if upload_fn is not None:
        copy = import_callable(upload_fn, "run.checkpoint_upload_fn")

        def upload(checkpoint: ray.train.Checkpoint, directory_name: str) -> ray.train.Checkpoint:
            storage = ray.train.get_context().get_storage()
            destination = f"{storage.experiment_fs_path}/{directory_name}"
            copy(checkpoint.path, destination)
            return ray.train.Checkpoint(destination, filesystem=storage.storage_filesystem)

        options["checkpoint_upload_fn"] = upload
    return options

