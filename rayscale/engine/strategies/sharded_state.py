"""optim.shard_state: under DDP each rank keeps the optimizer state of its own share of the tensors only (ZeRO
stage 1, as PyTorch's ZeroRedundancyOptimizer).

The trainable tensors are cut into shards of whole tensors balanced by size (`ps_shards.shard_parameters`, which
the parameter server's shards use too): LARS's and LAMB's trust ratios are per tensor, so a tensor kept whole
gets exactly the step it gets unsharded. Every rank still all-reduces and holds the whole gradient, so clipping
by the global norm and the non-finite guard (the fused optimizers' skip on the device included) see what they
see unsharded. Then each rank steps its own tensors only -- an optimizer skips a tensor without a gradient and
never makes state for it -- and broadcasts them to the others. The optimizer state per worker is about 1/N of
the replicated one; weights and gradients stay whole on every rank.

Checkpoints keep the unsharded format: before a save every rank sends its entries to rank 0, whose
`state_dict()` is then the whole optimizer's. On restore each rank loads that whole state dict and keeps its own
tensors' entries, so a checkpoint resumes at any worker count, sharded or not.
"""

from __future__ import annotations

import torch

from rayscale.engine import distributed
from rayscale.engine.strategies.ddp import DataParallel
from rayscale.engine.strategies.ps_shards import shard_parameters


def trainable(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's tensors in its state dict's numbering (group order)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer state this process holds, in bytes."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


def largest_shard(parameters: list[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """The tensors of the shard with the most elements: what the most loaded worker keeps state for."""
    shards = shard_parameters([p.numel() for p in parameters], max(world_size, 1))
    heaviest = max(shards, key=lambda shard: sum(parameters[i].numel() for i in shard))
    return [parameters[i] for i in heaviest]


class OptimizerShards:
    """Which rank steps which tensors, as hooks on the optimizer (attached by build_optimizer)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.by_rank: list[list[torch.Tensor]] = []
        self.own_indices: set[int] = set()
        self.others: list[torch.Tensor] = []  # stepped by another rank
        self.gathered: dict[int, dict] | None = None  # rank 0, between a gather and the state_dict() it serves

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        parameters = trainable(optimizer)
        shards = shard_parameters([p.numel() for p in parameters], self.world_size)
        self.by_rank = [[parameters[i] for i in shard] for shard in shards]
        self.own_indices = set(shards[self.rank])
        self.others = [p for i, p in enumerate(parameters) if i not in self.own_indices]
        # Registered first: later pre-hooks (fused SGD's zero momentum buffers) see only this rank's gradients.
        optimizer.register_step_pre_hook(self._drop_other_gradients)
        optimizer.register_step_post_hook(self._share_updates)
        optimizer.register_state_dict_post_hook(self._with_gathered)
        optimizer.register_load_state_dict_pre_hook(self._own_entries)

    # ------------------------------------------------------------------ the step

    def _drop_other_gradients(self, optimizer, args, kwargs) -> None:
        """After the clip (which needs every gradient), before the step: another rank steps these."""
        for parameter in self.others:
            parameter.grad = None

    def _share_updates(self, optimizer, args, kwargs) -> None:
        """Every rank's stepped tensors to every other rank (in rank order: the same calls on every rank). A step
        the fused optimizer skipped on the device broadcasts unchanged weights: no host sync to know."""
        for rank, tensors in enumerate(self.by_rank):
            distributed.broadcast_from(tensors, rank)

    # ------------------------------------------------------------------ checkpoints

    def gather(self, optimizer: torch.optim.Optimizer) -> None:
        """A collective, before a checkpoint: rank 0 receives every rank's state entries (on the CPU), which its
        next state_dict() merges in."""
        index = {id(p): i for i, p in enumerate(trainable(optimizer))}
        mine = {index[id(p)]: {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
                               for key, value in state.items()}
                for p, state in optimizer.state.items() if index.get(id(p)) in self.own_indices}
        every = distributed.gather_to_rank_0(mine)
        if every is not None:
            self.gathered = {i: entry for rank, entries in enumerate(every) if rank != self.rank
                             for i, entry in entries.items()}

    def _with_gathered(self, optimizer, state_dict: dict) -> dict:
        """Rank 0's state_dict() after a gather: the whole optimizer's, numbered as unsharded."""
        if self.gathered is None:
            return state_dict
        merged = {**state_dict["state"], **self.gathered}
        self.gathered = None
        return {**state_dict, "state": {i: merged[i] for i in sorted(merged)}}

    def _own_entries(self, optimizer, state_dict: dict) -> dict:
        """A whole optimizer's state dict (a checkpoint's) loaded here: this rank keeps its own tensors' state."""
        return {**state_dict, "state": {i: entry for i, entry in state_dict["state"].items()
                                        if i in self.own_indices}}


class ShardedDataParallel(DataParallel):
    """train.strategy ddp with optim.shard_state: DDP's all-reduce, then each rank steps its own tensors."""

    def __init__(self, rank: int):
        self.rank = rank
        self.optimizer_shards: OptimizerShards | None = None

    def wrap(self, model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
        self.optimizer_shards = OptimizerShards(self.rank, world_size)  # one worker: one shard, all its own
        return super().wrap(model, device, world_size)

    def before_checkpoint(self, run) -> None:
        """Rank 0's optimizer state dict is the whole optimizer's (see OptimizerShards.gather)."""
        self.optimizer_shards.gather(run.optimizer)
