"""train.strategy ddp: DistributedDataParallel; its all-reduce is the last micro-batch's backward."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from rayscale.engine.components import Component


def prepare_model(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """The model on `device`, wrapped in DDP when there are several workers."""
    # Batch statistics over all ranks on GPU; PyTorch's SyncBatchNorm refuses CPU modules under DDP, so on
    # CPU each rank normalises with its own micro-batch statistics.
    if world_size > 1 and device.type == "cuda" and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if world_size > 1:
        # Gradients as views into DDP's all-reduce buckets: no copy of every gradient out of the bucket after
        # each all-reduce, and one gradient-sized buffer less per worker.
        options: dict = {"gradient_as_bucket_view": True}
        if device.type != "cuda":
            # gloo: each all-reduce call has a fixed cost that dwarfs the overlap PyTorch's small first bucket
            # (1 MiB, for NCCL: the first all-reduce starts while most of the backward is left) buys. An explicit
            # cap applies to the first bucket too: the throughput MLP's 1.2 MB of gradients go in one all-reduce
            # instead of two, 4.9 -> 3.7 ms a step on 2 gloo processes (docs/performance.md).
            options["bucket_cap_mb"] = 25
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **options)
    return model


class DataParallel(Component):
    """Every worker holds the model and the optimizer; DDP averages the gradients."""

    gradients_all_reduced = True
    optimizer_shards = None  # optim.shard_state: sharded_state.ShardedDataParallel's

    def wrap(self, model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
        return prepare_model(model, device, world_size)

    def start(self, run, resumed: bool) -> None:
        """After the model and optimizer are built (and restored)."""

    def step(self, run, train):
        """One step: `train(update)` is train_step with its arguments bound but `update`."""
        return train(None)

    def before_validation(self, run) -> None:
        """The weights every rank evaluates are its own, already up to date."""

    def before_checkpoint(self, run) -> None:
        """Rank 0's weights and optimizer are the run's."""
