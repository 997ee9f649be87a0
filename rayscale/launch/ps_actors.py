"""The parameter server on Ray (train.strategy parameter_server): the server actors, and the client each training
worker uses to pull parameters and push gradients. The arithmetic is in engine/strategies/ps_shards.py, the
worker's side of the strategy in engine/strategies/parameter_server.py.

The driver creates the servers (`start_servers`, named, owned by the driver, restarted by Ray if killed) and
sends their names to the workers. When a worker group starts, rank 0 loads the servers from the checkpoint it
resumed from (or from the initial weights): a killed server comes back empty, its calls fail, Ray Train
restarts the worker group, and that reload puts back every update up to the last checkpoint.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable

import torch

from rayscale import config
from rayscale.data.sources import DataSpec
from rayscale.engine.strategies.parameter_server import StaleGradient
from rayscale.engine.strategies.ps_shards import (
    ShardState,
    StalenessGate,
    clip_coefficient,
    merge_states,
    shard_parameters,
)
from rayscale.models import build_model

__all__ = ["ParameterClient", "ServerActor", "StaleGradient", "start_servers"]


class ServerActor:
    """One shard. Its methods are coroutines: a sync push waits for the other workers' without blocking them."""

    def __init__(self, config_dict: dict, spec: DataSpec, owned: list[int], num_workers: int, lr: float,
                 model: torch.nn.Module | Callable | None = None):
        torch.set_num_threads(1)
        cfg = config.from_dict(config_dict)
        torch.manual_seed(cfg.seed)  # the workers' initial weights, until rank 0 loads the real ones
        self.shard = ShardState(build_model(cfg.model, spec, model), owned, cfg.optim, lr, num_workers)
        self.gate = StalenessGate(cfg.ps.max_staleness)
        self.norms: dict[int, float] = {}  # sync: each complete step's squared norm, until it is applied
        self.generation = 0  # bumped by reset: waiters from a failed worker group give up
        self.loaded = False  # a server Ray restarted after a kill holds nothing until rank 0 reloads it
        self._changed: asyncio.Condition | None = None

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:  # created inside the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    def _check_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError("parameter server restarted and lost its shard: the worker group restarts from "
                               "the last checkpoint")

    async def _wait_for(self, predicate) -> None:
        generation = self.generation
        async with self.changed:
            await self.changed.wait_for(lambda: predicate() or self.generation != generation)
        if self.generation != generation:
            raise RuntimeError("parameter server was reset while a worker waited (its worker group was replaced)")

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def reset(self, parameters: list[torch.Tensor], optimizer_state: dict | None, version: int) -> None:
        self.shard.load(parameters, optimizer_state, version)
        self.gate.reset(version)
        self.norms.clear()
        self.generation += 1
        self.loaded = True
        await self._notify()

    async def pull(self, min_version: int) -> tuple[int, list[torch.Tensor]]:
        self._check_loaded()
        await self._wait_for(lambda: self.shard.version >= min_version)
        return self.shard.version, self.shard.values()

    async def push(self, rank: int, step: int, gradients: list[torch.Tensor]) -> float:
        """sync: returns the squared norm of the step's summed gradient on this shard, once every worker's is in."""
        self._check_loaded()
        if self.shard.add(rank, step, gradients):
            self.norms[step] = self.shard.squared_norm()
            await self._notify()
        await self._wait_for(lambda: step in self.norms)
        return self.norms[step]

    async def apply(self, step: int, lr: float, coefficient: float, finite: bool) -> None:
        if self.shard.version == step:
            self.shard.apply_summed(step, lr, coefficient, finite)
            self.norms.pop(step, None)
            await self._notify()

    async def admit(self, pulled_version: int) -> tuple[int, int] | None:
        self._check_loaded()
        return self.gate.admit(pulled_version)

    async def offer(self, sequence: int, gradients: list[torch.Tensor], lr: float, coefficient: float) -> None:
        self._check_loaded()
        if self.shard.offer(sequence, gradients, lr, coefficient):
            await self._notify()

    async def state(self) -> dict:
        self._check_loaded()
        return self.shard.state()


def server_name(run_id: str, index: int) -> str:
    return f"rayscale-ps-{run_id}-{index}"


def start_servers(cfg: config.Config, spec: DataSpec, lr: float, model: torch.nn.Module | Callable | None = None
                  ) -> tuple[list[str], list[list[int]], list]:
    """Driver side: the server actors for one run (no CPU reserved: they wait most of the time, and the workers
    hold the cores). Returns their names, each one's parameter indices, and the handles to keep. `model`:
    rayscale.train's model= (else model.name builds it)."""
    import ray

    sizes = [p.numel() for p in build_model(cfg.model, spec, model).parameters()]
    shards = shard_parameters(sizes, cfg.ps.num_servers)
    run_id = uuid.uuid4().hex[:12]
    remote = ray.remote(ServerActor)
    handles = [remote.options(name=server_name(run_id, i), num_cpus=0, max_restarts=-1, max_concurrency=64)
               .remote(config.to_dict(cfg), spec, owned, cfg.scaling.num_workers, lr, model)
               for i, owned in enumerate(shards)]
    return [server_name(run_id, i) for i in range(len(shards))], shards, handles


class ParameterClient:
    """Worker side: pull before each step, push after its backward (as train_step's `update`)."""

    def __init__(self, names: list[str], shards: list[list[int]], model: torch.nn.Module, mode: str,
                 rank: int, grad_clip: float | None):
        import ray

        self.ray = ray
        self.servers = [ray.get_actor(name) for name in names]
        self.shards = shards
        self.parameters = list(model.parameters())
        self.mode, self.rank, self.grad_clip = mode, rank, grad_clip
        self.step = 0
        self.pulled_version = 0
        self.bytes_pulled = self.bytes_pushed = 0  # since the last `take_counters`
        self.staleness: list[int] = []
        self.refused = 0

    def reset(self, optimizer_state: dict | None, version: int) -> None:
        """Rank 0, at start: load every server from this worker's model and optimizer state."""
        parameters = [p.detach().cpu() for p in self.parameters]
        self.ray.get([server.reset.remote(parameters, optimizer_state, version) for server in self.servers])

    def pull(self, step: int) -> None:
        """The parameters into the local model: sync, after `step` updates; async, the newest."""
        self.step = step
        if self.mode == "sync":
            answers = self.ray.get([server.pull.remote(step) for server in self.servers])
            self.pulled_version = step
        else:  # shard 0's version first: the others are at least there (updates reach shard 0 first)
            first = self.ray.get(self.servers[0].pull.remote(0))
            answers = [first, *self.ray.get([server.pull.remote(first[0]) for server in self.servers[1:]])]
            self.pulled_version = first[0]
        with torch.no_grad():
            for owned, (_, values) in zip(self.shards, answers, strict=True):
                for index, value in zip(owned, values, strict=True):
                    self.parameters[index].copy_(value)
                    self.bytes_pulled += value.numel() * value.element_size()

    def update(self, parameters: list[torch.Tensor], lr: float) -> tuple[torch.Tensor, bool]:
        """train_step's `update`: push this worker's gradients; returns (global norm, applied)."""
        gradients = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu()
                     for p in self.parameters]
        by_shard = [[gradients[i] for i in owned] for owned in self.shards]
        self.bytes_pushed += sum(g.numel() * g.element_size() for g in gradients)
        if self.mode == "sync":
            norms = self.ray.get([server.push.remote(self.rank, self.step, part)
                                  for server, part in zip(self.servers, by_shard, strict=True)])
            total, coefficient = clip_coefficient(norms, self.grad_clip)
            finite = math.isfinite(total)
            self.ray.get([server.apply.remote(self.step, lr, coefficient, finite) for server in self.servers])
            return torch.tensor(total), finite
        # async: this worker's gradient is an update of its own, clipped by its own norm.
        total, coefficient = clip_coefficient([float(sum(g.double().pow(2).sum() for g in gradients))],
                                              self.grad_clip)
        if not math.isfinite(total):
            return torch.tensor(total), False
        admitted = self.ray.get(self.servers[0].admit.remote(self.pulled_version))
        if admitted is None:
            self.refused += 1
            raise StaleGradient()
        sequence, staleness = admitted
        self.staleness.append(staleness)
        self.ray.get([server.offer.remote(sequence, part, lr, coefficient)
                      for server, part in zip(self.servers, by_shard, strict=True)])
        return torch.tensor(total), True

    def full_state(self) -> tuple[list[torch.Tensor], dict]:
        """Every server's shard, merged: (parameters in model order, the whole optimizer state dict)."""
        parameters, optimizer_state = merge_states(self.ray.get([server.state.remote() for server in self.servers]))
        return [parameters[i] for i in range(len(self.parameters))], optimizer_state

    def take_counters(self) -> dict[str, float]:
        """Bytes moved and staleness since the last call (this worker)."""
        counters = {"bytes_pulled": self.bytes_pulled, "bytes_pushed": self.bytes_pushed,
                    "staleness_sum": sum(self.staleness), "staleness_count": len(self.staleness),
                    "staleness_max": max(self.staleness, default=0), "refused": self.refused}
        self.bytes_pulled = self.bytes_pushed = self.refused = 0
        self.staleness = []
        return counters
