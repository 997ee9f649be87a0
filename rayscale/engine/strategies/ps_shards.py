"""The parameter server's arithmetic (train.strategy parameter_server): the shards the server actors hold.

The model's parameters are cut into shards of whole tensors (LARS and LAMB scale each tensor's step by its own
trust ratio, so a tensor must never straddle two shards), balanced by size. Each shard's `ShardState` builds
the config's optimizer over the whole model, the same parameter groups and indices as a DDP run, then frees
the tensors it does not own: only its own parameters are ever given a gradient, so only they are stepped and
only they get optimizer state. The shards' states merge back into one model and one optimizer state dict,
which is what a checkpoint holds, whatever the strategy.

Two modes:
- sync: a step's gradient is the sum of every worker's (each already divided by the step's global sample
  count, so the sum is exactly DDP's average); the servers step once it is complete. Clipping needs the norm
  of the whole summed gradient: each shard gives its squared norm, the workers add them up (the same numbers
  in the same order on every worker) and hand back one clip coefficient.
- async, with a bounded staleness (stale-synchronous): a worker's gradient is applied on its own, as soon
  as it arrives. Shard 0 issues sequence numbers (`StalenessGate`); a gradient computed from parameters more
  than `max_staleness` updates old is refused, and the worker pulls again and recomputes it from the same
  rows. Every shard applies the admitted gradients in sequence order (`ShardState.offer`), so the shards
  always hold the model a single server would.
"""

from __future__ import annotations

import copy

import torch

from rayscale.config import OptimConfig
from rayscale.engine.optimizers import build_optimizer
from rayscale.engine.step import set_lr


def shard_parameters(sizes: list[int], num_shards: int) -> list[list[int]]:
    """Parameter indices per shard: whole tensors, largest first onto the lightest shard (ties: lowest
    index), each shard's indices in model order. Every index lands in exactly one shard."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    loads = [0] * num_shards
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = min(range(num_shards), key=lambda s: (loads[s], s))
        shards[lightest].append(index)
        loads[lightest] += sizes[index]
    return [sorted(shard) for shard in shards]


def clip_coefficient(squared_norms: list[float], max_norm: float | None) -> tuple[float, float]:
    """(global norm, factor to multiply the gradient by), as torch.nn.utils.clip_grad_norm_ computes them."""
    total = sum(squared_norms) ** 0.5
    if max_norm is None:
        return total, 1.0
    return total, min(max_norm / (total + 1e-6), 1.0)


class ShardState:
    """One server's shard: its parameters, its part of the optimizer, and a version (updates applied)."""

    def __init__(self, model: torch.nn.Module, owned: list[int], optim: OptimConfig, lr: float,
                 num_workers: int):
        self.parameters = list(model.parameters())
        self.optimizer = build_optimizer(optim, model, lr)  # before freeing: the groups depend on shapes
        self.owned = list(owned)
        owned_set = set(owned)
        for index, parameter in enumerate(self.parameters):
            if index not in owned_set:
                parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)
        # The optimizer's state dict numbers parameters in group order, not model order.
        position = {id(p): i for i, p in enumerate(self.parameters)}
        self.optimizer_index = {position[id(p)]: n for n, p in enumerate(
            p for group in self.optimizer.param_groups for p in group["params"])}
        self.num_workers = num_workers
        self.version = 0
        self.pending: dict[int, list[torch.Tensor]] = {}  # sync: this step's gradients by worker rank
        self.waiting: dict[int, tuple] = {}  # async: admitted updates that arrived before their turn

    # ------------------------------------------------------------------ state

    def values(self) -> list[torch.Tensor]:
        return [self.parameters[i].detach() for i in self.owned]

    def state(self) -> dict:
        """This shard's parameters (model index -> tensor) and optimizer state (optimizer index -> state)."""
        full = copy.deepcopy(self.optimizer.state_dict())  # state_dict() shares the live tensors
        mine = {self.optimizer_index[i] for i in self.owned}
        return {"parameters": {i: self.parameters[i].detach().clone() for i in self.owned},
                "optimizer": {"state": {k: v for k, v in full["state"].items() if k in mine},
                              "param_groups": full["param_groups"]},
                "version": self.version}

    def load(self, parameters: list[torch.Tensor], optimizer_state: dict | None, version: int) -> None:
        """Start over from the whole model's parameters (model order) and optimizer state dict (None: fresh)."""
        with torch.no_grad():
            for i in self.owned:
                self.parameters[i].data = parameters[i].detach().clone().to(self.parameters[i].dtype)
        self.optimizer.state.clear()
        if optimizer_state is not None:
            mine = {self.optimizer_index[i] for i in self.owned}
            self.optimizer.load_state_dict({"state": {k: v for k, v in optimizer_state["state"].items()
                                                      if k in mine},
                                            "param_groups": optimizer_state["param_groups"]})
        self.version = version
        self.pending.clear()
        self.waiting.clear()

    # ------------------------------------------------------------------ updates

    def _step(self, gradients: list[torch.Tensor], lr: float, coefficient: float) -> None:
        for parameter in self.parameters:
            parameter.grad = None
        for i, gradient in zip(self.owned, gradients, strict=True):
            self.parameters[i].grad = gradient if coefficient == 1.0 else gradient * coefficient
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        for parameter in self.parameters:
            parameter.grad = None
        self.version += 1

    def add(self, rank: int, step: int, gradients: list[torch.Tensor]) -> bool:
        """sync: worker `rank`'s gradients for `step` (this shard's tensors); True once every worker's are in."""
        if step != self.version:
            raise RuntimeError(f"parameter server: a gradient for step {step} arrived at version {self.version}")
        self.pending[rank] = gradients
        return len(self.pending) == self.num_workers

    def summed(self) -> list[torch.Tensor]:
        """sync: the step's gradient, added up in rank order (the same result whatever the arrival order)."""
        ranks = sorted(self.pending)
        total = [g.clone() for g in self.pending[ranks[0]]]
        for rank in ranks[1:]:
            for acc, g in zip(total, self.pending[rank], strict=True):
                acc.add_(g)
        return total

    def squared_norm(self) -> float:
        gradients = self.summed()
        return float(sum(g.double().pow(2).sum() for g in gradients)) if gradients else 0.0

    def apply_summed(self, step: int, lr: float, coefficient: float, finite: bool) -> None:
        """sync: step once with the summed gradient (or skip it when non-finite). Every worker may call this;
        the first call for `step` applies, later ones find the version moved on."""
        if step != self.version:
            return
        total = self.summed()
        self.pending.clear()
        if finite:
            self._step(total, lr, coefficient)
        else:
            self.version += 1  # a skipped step still counts: every worker moves on to the next one

    def offer(self, sequence: int, gradients: list[torch.Tensor], lr: float, coefficient: float) -> int:
        """async: an admitted update; applied now if it is next, else kept until those before it arrive.
        Returns how many updates were applied."""
        self.waiting[sequence] = (gradients, lr, coefficient)
        applied = 0
        while self.version in self.waiting:
            self._step(*self.waiting.pop(self.version))
            applied += 1
        return applied


class StalenessGate:
    """async (shard 0): numbers the updates and refuses one computed from parameters more than `max_staleness`
    updates older than it would be applied to."""

    def __init__(self, max_staleness: int):
        self.max_staleness = max_staleness
        self.issued = 0

    def admit(self, pulled_version: int) -> tuple[int, int] | None:
        """(sequence number, staleness) for a gradient computed at `pulled_version`, or None: too stale."""
        staleness = self.issued - pulled_version
        if staleness > self.max_staleness:
            return None
        sequence, self.issued = self.issued, self.issued + 1
        return sequence, staleness

    def reset(self, version: int) -> None:
        self.issued = version


def merge_states(states: list[dict]) -> tuple[dict[int, torch.Tensor], dict]:
    """The shards' `state()`s -> (model index -> parameter, the whole optimizer's state dict)."""
    parameters: dict[int, torch.Tensor] = {}
    optimizer_state: dict = {}
    for state in states:
        parameters.update(state["parameters"])
        optimizer_state.update(state["optimizer"]["state"])
    return parameters, {"state": optimizer_state, "param_groups": states[0]["optimizer"]["param_groups"]}
