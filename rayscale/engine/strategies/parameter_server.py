"""train.strategy parameter_server, the worker's side: pull the parameters before each step, push the gradients
after its backward; the servers step (their arithmetic: ps_shards.py). The client that talks to them is built by
the Ray layer (launch/ps_actors.py) and handed in: the engine only calls the methods below."""

from __future__ import annotations

from typing import Protocol

import torch

from rayscale.engine import distributed
from rayscale.engine.components import Component
from rayscale.engine.strategies.ddp import prepare_model


class StaleGradient(Exception):
    """async: the gradient was computed from parameters more than ps.max_staleness updates old: pull, redo."""


class ParameterClient(Protocol):
    mode: str  # sync | async

    def reset(self, optimizer_state: dict | None, version: int) -> None: ...
    def pull(self, step: int) -> None: ...
    def update(self, parameters: list[torch.Tensor], lr: float) -> tuple[torch.Tensor, bool]: ...
    def full_state(self) -> tuple[list[torch.Tensor], dict]: ...
    def take_counters(self) -> dict[str, float]: ...


class ParameterServer(Component):
    gradients_all_reduced = False  # no worker ever holds the summed gradient: no noise scale
    optimizer_shards = None  # the servers hold the optimizer state (rules.py refuses optim.shard_state)

    def __init__(self, make_client):
        self.make_client = make_client  # model -> ParameterClient, once the model exists
        self.client: ParameterClient | None = None

    def wrap(self, model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
        return prepare_model(model, device, 1)  # no DDP: the gradients go to the servers

    def start(self, run, resumed: bool) -> None:
        """Rank 0 loads the servers from this checkpoint (or the initial weights): nothing committed is lost
        when a server or a worker group restarted."""
        self.client = self.make_client(run.model)
        if run.rank == 0:
            self.client.reset(run.optimizer.state_dict() if resumed else None,
                              run.state.step if self.client.mode == "sync" else 0)
        distributed.barrier()

    def step(self, run, train):
        while True:
            self.client.pull(run.state.step)
            try:
                return train(self.client.update)
            except StaleGradient:  # async: computed from too old parameters; pull the newest and redo it
                continue

    def before_validation(self, run) -> None:
        distributed.barrier()  # the newest parameters: every worker's updates in
        self.client.pull(run.state.step)

    def before_checkpoint(self, run) -> None:
        distributed.barrier()  # async: every worker's last update is in
        if run.rank == 0:  # the servers hold the model and the optimizer state: the checkpoint is theirs
            parameters, optimizer_state = self.client.full_state()
            with torch.no_grad():
                for parameter, value in zip(run.model.parameters(), parameters, strict=True):
                    parameter.copy_(value)
            run.optimizer.load_state_dict(optimizer_state)

    def log_fields(self, run, sums, steps):
        """Bytes each worker pulled and pushed per step (mean over workers), and in async mode the staleness of
        the applied gradients (in updates) and how many were refused."""
        counters = self.client.take_counters()
        pulled, pushed, total, count, refused = distributed.all_reduce(
            [counters["bytes_pulled"], counters["bytes_pushed"], counters["staleness_sum"],
             counters["staleness_count"], counters["refused"]], run.device).tolist()
        worst = distributed.all_reduce([counters["staleness_max"]], run.device, op="max").item()
        workers = distributed.world_size()
        fields = {"bytes_pulled_per_step": pulled / workers / max(steps, 1),
                  "bytes_pushed_per_step": pushed / workers / max(steps, 1)}
        if self.client.mode == "async":
            fields.update(staleness_mean=total / count if count else None, staleness_max=int(worst),
                          stale_refused=int(refused))
        return fields
