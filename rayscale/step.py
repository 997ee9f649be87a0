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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from rayscale import tasks
from rayscale.errors import ConfigError, NonFiniteError
from rayscale.step_clock import StepClock


@dataclass
class Precision:
    """Autocast dtype and, for fp16, the GradScaler that keeps small gradients from flushing to zero."""

    name: str  # fp32 | bf16 | fp16
    device_type: str  # cpu | cuda
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(device_type=self.device_type, dtype=dtype)


def make_precision(name: str, device: torch.device) -> Precision:
    if name == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision fp16 needs a GPU (scaling.use_gpu: true); use bf16 on CPU")
        return Precision(name, device.type, torch.amp.GradScaler("cuda"))
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision bf16: this GPU does not support bfloat16; use fp16")
    return Precision(name, device.type)


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this worker's summed loss (detached; no host sync)
    local_count: torch.Tensor  # this worker's real samples or tokens
    global_count: torch.Tensor  # all workers' real samples or tokens: the loss normaliser
    grad_norm: torch.Tensor  # global L2 norm before clipping
    # No update was applied (non-finite gradients or an fp16 overflow). A bool tensor on the device when the
    # optimizer skipped on the device (skips_on_device): reading it waits for the step, so the worker doesn't.
    skipped: bool | torch.Tensor
    # The noise scale's small batch (see noise_scale.py), when measured: the squared norm of the mean gradient
    # over `small_count` samples, and the count.
    small_sq: torch.Tensor | None = None
    small_count: torch.Tensor | None = None


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
            # instead of two, 4.9 -> 3.7 ms a step on 2 gloo processes (benchmarks/README.md, session 11).
            options["bucket_cap_mb"] = 25
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **options)
    return model


def is_out_of_memory(error: BaseException) -> bool:
    """A device out-of-memory error: CUDA's OutOfMemoryError, or another backend's RuntimeError saying so."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


class MicroBatchTooLarge(Exception):
    """Some rank ran out of device memory in this step's micro-batches: every rank redoes it smaller."""


def _average_gradients(parameters: list[torch.Tensor], world_size: int, bucket_mb: float = 25.0) -> None:
    """What DDP's all-reduce does (sum over ranks / world size), in flat buckets, for a step accumulated
    entirely under no_sync. A parameter without a gradient counts as zero, so every rank makes the same calls.
    Each gradient becomes a view of its reduced bucket, as under DDP's gradient_as_bucket_view: no copy back
    (the next step's zero_grad(set_to_none=True) lets DDP put its own bucket views in again)."""
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    limit = bucket_mb * 2**20
    for p in parameters:
        buckets = groups.setdefault((p.grad.dtype, p.grad.device), [[]])
        if buckets[-1] and sum(q.grad.numel() * q.grad.element_size() for q in buckets[-1]) >= limit:
            buckets.append([])
        buckets[-1].append(p)
    for buckets in groups.values():
        for bucket in buckets:
            grads = [p.grad for p in bucket]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat.div_(world_size))
            for p, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                p.grad = synced


def _squared_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.stack([norm.double() for norm in torch._foreach_norm(grads)]).pow(2).sum()


@dataclass
class NonFiniteGuard:
    """Skip non-finite steps and count them; abort after `max_in_a_row` in a row."""

    max_in_a_row: int
    skipped_total: int = 0
    in_a_row: int = field(default=0)
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def observe_on_device(self, skipped: torch.Tensor, step: int) -> None:
        """A step the optimizer may have skipped on the device: read at the next `settle`, not now (reading
        it would make the host wait for the step to finish)."""
        self.pending.append((step, skipped))

    def settle(self) -> None:
        """Read the flags observed on the device since the last call (one host sync) and apply the rule in
        step order: the error still names the step that reached the limit, found up to one log interval later
        (the worker settles before every log line and checkpoint, so nothing after that step is saved)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.stack([skipped for _, skipped in pending]).tolist()
        for (step, _), skipped in zip(pending, flags, strict=True):
            self.observe(not skipped, step)

    def observe(self, finite: bool, step: int) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.skipped_total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"non-finite loss or gradients at step {step}: {self.in_a_row} steps in a row were skipped "
                f"(train.max_nonfinite_steps={self.max_in_a_row}); lower optim.lr, set train.grad_clip, "
                f"or check the data for NaN")


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def _world_size(model: torch.nn.Module) -> int:
    if isinstance(model, DistributedDataParallel) and dist.is_initialized():
        return dist.get_world_size()
    return 1


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """PyTorch's fused Adam, AdamW and SGD skip their whole update (weights, moments, step count) on the device
    when given a `found_inf` flag, as GradScaler gives them: the non-finite guard then needs no host sync.
    SGD only without dampening (see _momentum_buffers_made)."""
    if not (optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False)):
        return False
    return not isinstance(optimizer, torch.optim.SGD) or all(g["dampening"] == 0 for g in optimizer.param_groups)


def _momentum_buffers_made(optimizer: torch.optim.Optimizer) -> None:
    """Fused SGD creates a momentum buffer uninitialised at a parameter's first step and fills it in the kernel:
    a first step skipped on the device would leave garbage in it. A zero buffer made before gives the same
    first step (buf = momentum x 0 + grad = grad, as PyTorch's buf = grad; dampening is 0)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"]:
            for parameter in group["params"]:
                if parameter.grad is not None and "momentum_buffer" not in optimizer.state[parameter]:
                    optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]],
               optimizer: torch.optim.Optimizer, *, task: str, lr: float, precision: Precision,
               grad_clip: float | None = None, global_count: float | None = None, measure_noise: bool = False,
               clock: StepClock | None = None, oom_safe: bool = False,
               update: Callable[[list[torch.Tensor], float], tuple[torch.Tensor, bool]] | None = None
               ) -> StepResult:
    """Accumulate gradients over `micro_batches` and apply one optimizer step at `lr`.

    Every worker must call this the same number of times, each with at least one micro-batch (a rank with
    no real rows passes a zero-weight one), because the last backward is a collective under DDP.

    `measure_noise`: also return the noise scale's small batch: under DDP this rank's share of the step (every
    micro-batch then runs under no_sync, the norm of this rank's gradient is taken, and the gradients are
    averaged in one pass after the backward, as under `oom_safe`), or with one worker and several micro-batches,
    the first one. Under DDP the step loses the overlap of its last backward with the all-reduce, which is why
    the worker measures only one step in train.noise_scale_every_steps; on 2 CPU processes it cost nothing
    measurable, where a Python communication hook that took the norm on every step cost 5-13%.
    `clock`: marks where the step's time goes (step_clock.py).
    `oom_safe` (batch.micro_batch_size: auto): a device out-of-memory error in a micro-batch raises
    MicroBatchTooLarge on every rank, with no gradient applied, so the caller can redo the step with smaller
    micro-batches. Under DDP the ranks must agree first, and a rank that ran out of memory before its last
    backward would leave the others waiting in that backward's all-reduce: so every micro-batch runs under
    no_sync, one scalar all-reduce says whether any rank failed, and the gradients are then averaged in one
    pass (the last micro-batch's backward no longer overlaps the all-reduce: the price of never hanging).
    `update` (train.strategy parameter_server): instead of clipping and stepping here, hand the gradients
    (each rank's sum / global count: they add up over ranks) and the lr to it; it returns the global norm and
    whether the step was applied (ps_actors.ParameterClient.update).
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch (use a zero-weight one on empty ranks)")
    if clock is not None:
        clock.mark("start", len(micro_batches))
    optimizer.zero_grad(set_to_none=True)
    world_size = _world_size(model)

    # The normaliser must be known before the first backward: the caller passes it when the step's size says
    # it (unweighted rows), else one scalar all-reduce gives it (sample weights, token counts).
    counts = [tasks.count(task, mb) for mb in micro_batches]
    local_count = counts[0] if len(counts) == 1 else torch.stack(counts).sum()
    # DDP averages gradients over ranks, so each rank scales by world_size to get sum / global_count. A count
    # the caller knows scales the loss as a Python number (no tensor op) and is filled in on the device (on a
    # GPU, torch.tensor would copy it from the host and wait for the stream).
    if global_count is None:
        global_count = _all_reduce_sum(local_count.detach().clone().to(torch.float64)).clamp_min(1e-12)
        loss_scale = world_size / global_count
    else:
        loss_scale = world_size / max(float(global_count), 1e-12)
        global_count = torch.full((), max(float(global_count), 1e-12), dtype=torch.float64,
                                  device=local_count.device)

    losses = []
    last = len(micro_batches) - 1
    small_sq = small_count = None
    if clock is not None:
        clock.mark("micro_batches")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    out_of_memory = False
    ddp = isinstance(model, DistributedDataParallel)
    average_after = ddp and (oom_safe or (measure_noise and world_size > 1))  # every micro-batch under no_sync
    for index, micro_batch in enumerate(micro_batches):
        # The forward must sit inside no_sync too: DDP prepares its all-reduce hooks during forward.
        sync = (index == last and not average_after) or not ddp
        if clock is not None and index == last:
            clock.mark("last_micro_batch")
        try:
            with contextlib.nullcontext() if sync else model.no_sync():
                with precision.autocast():
                    output = tasks.forward(model, micro_batch)
                micro_loss = tasks.loss_sum(task, output, micro_batch)
                scale = loss_scale if isinstance(loss_scale, float) else loss_scale.to(micro_loss.dtype)
                scaled = micro_loss * scale
                if precision.scaler is not None:
                    scaled = precision.scaler.scale(scaled)
                scaled.backward()
        except Exception as error:
            if not (oom_safe and is_out_of_memory(error)):
                raise
            out_of_memory = True
            break
        losses.append(micro_loss.detach())
        if measure_noise and world_size == 1 and index == 0 and last > 0:
            small_count = tasks.count(task, micro_batch).detach().to(torch.float64)
            small_sq = _squared_norm(parameters)
    if oom_safe:
        output = micro_loss = scaled = None  # free the failed micro-batch's activations before the retry
        failed = torch.tensor(float(out_of_memory), device=local_count.device)
        if world_size > 1:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            optimizer.zero_grad(set_to_none=True)
            raise MicroBatchTooLarge()
    if clock is not None:
        clock.mark("backward_done")
    loss_sum = losses[0].to(torch.float64) if len(losses) == 1 else torch.stack(losses).sum(dtype=torch.float64)
    if measure_noise and average_after:  # this rank's gradient, before averaging
        small_count, small_sq = local_count.detach().to(torch.float64), _squared_norm(parameters)
    if average_after and world_size > 1:
        _average_gradients([p for p in parameters if p.requires_grad], world_size)
    if small_sq is not None:
        # The gradients hold sum / global_count x world_size: back to this batch's mean gradient.
        small_sq = small_sq * (global_count / (world_size * small_count.clamp_min(1e-12))) ** 2

    if update is not None:
        set_lr(optimizer, lr)  # the servers step; the local copy's lr is what the log reports
        grad_norm, finite = update(parameters, lr)
        optimizer.zero_grad(set_to_none=True)
        if clock is not None:
            clock.mark("end")
        return StepResult(loss_sum, local_count.detach(), global_count, grad_norm.detach(), skipped=not finite,
                          small_sq=small_sq, small_count=small_count)
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
        _momentum_buffers_made(optimizer)
        optimizer.found_inf, optimizer.grad_scale = (~finite).to(torch.float32), None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
        skipped = ~finite
    else:
        # One host sync per optimizer step (never per micro-batch): fp16, LARS, LAMB, unfused optimizers.
        skipped = not bool(finite)
        if precision.scaler is not None:
            precision.scaler.step(optimizer)  # skips the update by itself on overflow
            precision.scaler.update()
        elif not skipped:
            optimizer.step()
        if skipped:
            optimizer.zero_grad(set_to_none=True)
    if clock is not None:
        clock.mark("end")
    return StepResult(loss_sum, local_count.detach(), global_count, grad_norm.detach(), skipped=skipped,
                      small_sq=small_sq, small_count=small_count)
