"""One optimizer step over a worker's micro-batches. No Ray in here.

zero grads -> for each micro-batch { no_sync unless last; forward; loss / global count; backward }
-> [a step that measures the noise scale or is OOM-safe: every micro-batch no_sync, then one all-reduce]
-> unscale / clip -> skip if non-finite -> step

The loss of every micro-batch is its *sum* divided by the real sample (or token) count of the whole global
batch, summed over micro-batches and workers. Dividing by the number of accumulation steps instead (what
Accelerate and Lightning do) weighs a short last window wrongly; dividing by the global count makes k
micro-batches give exactly the update of one batch with the same samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from rayscale.engine import distributed, tasks
from rayscale.engine.clock import StepClock
from rayscale.engine.precision import Precision

# train.strategy parameter_server: hands the gradients and the lr to the servers; returns (global norm, applied)
RemoteUpdate = Callable[[list[torch.Tensor], float], tuple[torch.Tensor, bool]]
# (model, micro-batch, objective, precision) -> (summed loss, the count of a loss that weighs its own, or None):
# forward_and_loss below, or train.compile's compiled version of it (components/compilation.py)
ForwardLoss = Callable[[torch.nn.Module, dict[str, torch.Tensor], tasks.Objective, Precision],
                       tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this worker's summed loss (detached; no host sync)
    local_count: torch.Tensor  # this worker's real samples or tokens
    global_count: torch.Tensor  # all workers' real samples or tokens: the loss normaliser
    grad_norm: torch.Tensor  # global L2 norm before clipping
    # No update was applied (non-finite gradients or an fp16 overflow). A bool tensor on the device when the
    # optimizer skipped on the device (skips_on_device): reading it waits for the step, so the loop doesn't.
    skipped: bool | torch.Tensor
    # The noise scale's small batch (see math/noise_scale.py), when measured: the squared norm of the mean
    # gradient over `small_count` samples, and the count.
    small_sq: torch.Tensor | None = None
    small_count: torch.Tensor | None = None


def is_out_of_memory(error: BaseException) -> bool:
    """A device out-of-memory error: CUDA's OutOfMemoryError, or another backend's RuntimeError saying so."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


class MicroBatchTooLarge(Exception):
    """Some rank ran out of device memory in this step's micro-batches: every rank redoes it smaller."""


def squared_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.stack([norm.double() for norm in torch._foreach_norm(grads)]).pow(2).sum()


def _world_size(model: torch.nn.Module) -> int:
    return distributed.world_size() if isinstance(model, DistributedDataParallel) else 1


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """PyTorch's fused Adam, AdamW and SGD skip their whole update (weights, moments, step count) on the device
    when given a `found_inf` flag, as GradScaler gives them: the non-finite guard then needs no host sync.
    SGD only without dampening (see optimizers._zero_momentum_buffers)."""
    if not (optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False)):
        return False
    return not isinstance(optimizer, torch.optim.SGD) or all(g["dampening"] == 0 for g in optimizer.param_groups)


def forward_and_loss(model: torch.nn.Module, micro_batch: dict[str, torch.Tensor], objective: tasks.Objective,
                     precision: Precision) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A micro-batch's summed loss (not yet normalised) and its own count when the loss weighs its own rows."""
    with precision.autocast():
        output = tasks.forward(model, micro_batch)
    return objective.loss(output, micro_batch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]],
               optimizer: torch.optim.Optimizer, *, task: str | tasks.Objective, lr: float, precision: Precision,
               grad_clip: float | None = None, global_count: float | None = None, measure_noise: bool = False,
               clock: StepClock | None = None, oom_safe: bool = False, update: RemoteUpdate | None = None,
               forward_loss: ForwardLoss = forward_and_loss) -> StepResult:
    """Accumulate gradients over `micro_batches` and apply one optimizer step at `lr`.

    Every worker must call this the same number of times, each with at least one micro-batch (a rank with
    no real rows passes a zero-weight one), because the last backward is a collective under DDP.

    `global_count`: the step's loss normaliser when the caller knows it (unweighted rows: the step's row
    count), else one scalar all-reduce gives it (sample weights, token counts).
    `measure_noise`: also return the noise scale's small batch: under DDP this rank's share of the step (every
    micro-batch then runs under no_sync, the norm of this rank's gradient is taken, and the gradients are
    averaged in one pass after the backward, as under `oom_safe`), or with one worker and several micro-batches,
    the first one. Under DDP the step loses the overlap of its last backward with the all-reduce, which is why
    the loop measures only one step in train.noise_scale_every_steps.
    `clock`: marks where the step's time goes (clock.py).
    `oom_safe` (batch.micro_batch_size: auto): a device out-of-memory error in a micro-batch raises
    MicroBatchTooLarge on every rank, with no gradient applied, so the caller can redo the step with smaller
    micro-batches. Under DDP the ranks must agree first, and a rank that ran out of memory before its last
    backward would leave the others waiting in that backward's all-reduce: so every micro-batch runs under
    no_sync, one scalar all-reduce says whether any rank failed, and the gradients are then averaged in one
    pass (the last micro-batch's backward no longer overlaps the all-reduce: the price of never hanging).
    `update` (train.strategy parameter_server): instead of clipping and stepping here, hand the gradients
    (each rank's sum / global count: they add up over ranks) and the lr to it.
    `forward_loss`: what runs each micro-batch's forward and loss (train.compile passes a compiled one).
    `task`: the task's name, or an Objective with a user loss; one that weighs its own losses gives its count
    only after the forward: the backward then scales by the task's count, and the gradients are corrected to
    the loss's own global count (one more scalar all-reduce) before they are clipped or applied.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch (use a zero-weight one on empty ranks)")
    mark = clock.mark if clock is not None else (lambda name, micro_batches=0: None)
    mark("start", len(micro_batches))
    optimizer.zero_grad(set_to_none=True)
    world_size = _world_size(model)
    objective = task if isinstance(task, tasks.Objective) else tasks.Objective(task)
    local_count, global_count, loss_scale = _normaliser(objective, micro_batches, global_count, world_size)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    average_after = isinstance(model, DistributedDataParallel) and (oom_safe or (measure_noise and world_size > 1))
    mark("micro_batches")
    losses, out_of_memory, small, own_counts = _accumulate(
        model, micro_batches, objective=objective, precision=precision, loss_scale=loss_scale, sync_last=not average_after,
        oom_safe=oom_safe, first_is_small=measure_noise and world_size == 1, parameters=parameters, mark=mark,
        forward_loss=forward_loss)
    if oom_safe:
        _agree_on_memory(out_of_memory, world_size, local_count.device, optimizer)
    mark("backward_done")
    loss_sum = losses[0].to(torch.float64) if len(losses) == 1 else torch.stack(losses).sum(dtype=torch.float64)
    scaled_by = global_count  # what the backward divided by
    if own_counts:
        local_count = torch.stack(own_counts).sum().to(torch.float64)
        global_count = distributed.all_reduce_sum_(local_count.clone()).clamp_min(tasks.COUNT_FLOOR)
    if measure_noise and average_after:  # this rank's gradient, before averaging
        small = local_count.detach().to(torch.float64), squared_norm(parameters)
    if average_after and world_size > 1:
        distributed.average_gradients([p for p in parameters if p.requires_grad])
    small_count, small_sq = small if small is not None else (None, None)
    if small_sq is not None:
        # The gradients hold sum / global_count x world_size: back to this batch's mean gradient.
        small_sq = small_sq * (scaled_by / (world_size * small_count.clamp_min(tasks.COUNT_FLOOR))) ** 2
    if own_counts:  # from the sum over the task's count to the sum over the loss's own
        torch._foreach_mul_([p.grad for p in parameters if p.grad is not None], scaled_by / global_count)
    if update is not None:
        set_lr(optimizer, lr)  # the servers step; the local copy's lr is what the log reports
        grad_norm, applied = update(parameters, lr)
        skipped = not applied
        optimizer.zero_grad(set_to_none=True)
    else:
        grad_norm, skipped = _clip_and_step(optimizer, parameters, lr, precision, grad_clip)
    mark("end")
    return StepResult(loss_sum, local_count.detach(), global_count, grad_norm.detach(), skipped=skipped,
                      small_sq=small_sq, small_count=small_count)


def _normaliser(objective: tasks.Objective, micro_batches: list[dict[str, torch.Tensor]], global_count: float | None,
                world_size: int) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
    """(this rank's count, the step's count, what each micro-batch's summed loss is multiplied by). DDP
    averages gradients over ranks, so each rank scales by world_size to get sum / global count. A count the
    caller knows scales the loss as a Python number (no tensor op) and is filled in on the device (on a GPU,
    torch.tensor would copy it from the host and wait for the stream)."""
    counts = [objective.count(mb) for mb in micro_batches]
    local_count = counts[0] if len(counts) == 1 else torch.stack(counts).sum()
    if global_count is None:
        reduced = distributed.all_reduce_sum_(local_count.detach().clone().to(torch.float64)).clamp_min(tasks.COUNT_FLOOR)
        return local_count, reduced, world_size / reduced
    known = max(float(global_count), tasks.COUNT_FLOOR)
    return local_count, torch.full((), known, dtype=torch.float64, device=local_count.device), world_size / known


def _accumulate(model, micro_batches, *, objective, precision, loss_scale, sync_last: bool, oom_safe: bool,
                first_is_small: bool, parameters, mark, forward_loss: ForwardLoss
                ) -> tuple[list[torch.Tensor], bool, tuple | None, list[torch.Tensor]]:
    """Forward and backward of every micro-batch: (their detached summed losses, whether one ran out of device
    memory (`oom_safe` only; the rest are then not run), the first micro-batch's (count, squared gradient
    norm) when `first_is_small` and there are several, the counts a user loss gave with its own weights)."""
    losses, small, own_counts = [], None, []
    last = len(micro_batches) - 1
    ddp = isinstance(model, DistributedDataParallel)
    for index, micro_batch in enumerate(micro_batches):
        # The forward must sit inside no_sync too: DDP prepares its all-reduce hooks during forward.
        sync = (index == last and sync_last) or not ddp
        if index == last:
            mark("last_micro_batch")
        try:
            with contextlib.nullcontext() if sync else model.no_sync():
                micro_loss, own_count = forward_loss(model, micro_batch, objective, precision)
                scale = loss_scale if isinstance(loss_scale, float) else loss_scale.to(micro_loss.dtype)
                scaled = micro_loss * scale
                if precision.scaler is not None:
                    scaled = precision.scaler.scale(scaled)
                scaled.backward()
        except Exception as error:
            if not (oom_safe and is_out_of_memory(error)):
                raise
            return losses, True, small, own_counts  # this frame, and the failed micro-batch's activations, go
        losses.append(micro_loss.detach())
        if own_count is not None:
            own_counts.append(own_count)
        if first_is_small and index == 0 and last > 0:
            counted = own_count if own_count is not None else objective.count(micro_batch)
            small = counted.detach().to(torch.float64), squared_norm(parameters)
    return losses, False, small, own_counts


def _agree_on_memory(out_of_memory: bool, world_size: int, device: torch.device,
                     optimizer: torch.optim.Optimizer) -> None:
    """An OOM-safe step: raise MicroBatchTooLarge on every rank if any rank ran out of device memory."""
    failed = distributed.all_reduce([float(out_of_memory)], device, op="max") if world_size > 1 else out_of_memory
    if bool(failed):
        optimizer.zero_grad(set_to_none=True)
        raise MicroBatchTooLarge()


def _clip_and_step(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor], lr: float,
                   precision: Precision, grad_clip: float | None) -> tuple[torch.Tensor, bool | torch.Tensor]:
    """Unscale, clip and step, skipping a non-finite step: (the global norm before clipping, skipped)."""
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer)
    parameters = [p for p in parameters if p.grad is not None]
    # The norm is logged and guards every step; scaling the gradients by 1 (clip_grad_norm_ with no limit) would
    # cost a pass over them for nothing.
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip, grad_norm)
    # The norm is taken after the all-reduce, so every rank reaches the same decision and optimizer states
    # never diverge.
    finite = torch.isfinite(grad_norm)
    set_lr(optimizer, lr)
    if precision.scaler is None and skips_on_device(optimizer):
        # No host sync: the fused kernels read the flag on the device and leave everything as it was.
        optimizer.found_inf, optimizer.grad_scale = (~finite).to(torch.float32), None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
        return grad_norm, ~finite
    # One host sync per optimizer step (never per micro-batch): fp16, LARS, LAMB, unfused optimizers.
    skipped = not bool(finite)
    if precision.scaler is not None:
        precision.scaler.step(optimizer)  # skips the update by itself on overflow
        precision.scaler.update()
    elif not skipped:
        optimizer.step()
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped
