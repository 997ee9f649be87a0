"""`rayscale find-batch-size`: the largest micro-batch that fits on the device, and the memory per sample.

Doubling from 1 until a micro-batch does not fit, then bisection between the last that fit and the first that
did not (Lightning's "binsearch"). A probe is one whole training step of the config's model, optimizer and
precision (forward, backward, optimizer step: an Adam-style state is allocated by the first step) on real rows
of the config's data, repeated to size. Sequences use the longest ones, so every probe pads to the worst case.

What "fits" means:
- CUDA: the step ran without an out-of-memory error; the peak is `max_memory_allocated`.
- CPU: running out of memory kills the process instead of raising, so the probe must not go there. It counts
  the step's tensor memory instead (parameters, gradients, optimizer state -- under optim.shard_state the most
  loaded worker's share only --, the batch, and the activations autograd keeps for backward, through
  saved-tensor hooks), and a micro-batch fits when that stays within
  the budget (`--memory-mb`, default half the memory available now). A probe whose memory, extrapolated from
  the two largest that fit, exceeds the budget is not run: its step could take more than the machine has, and
  the kernel kills the process without a word (`--max 1000000000` did, at 23 GiB). An injected out-of-memory
  error (tests) counts as not fitting on a CPU too.

No Ray here: the rows come straight from the source, on this machine.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from rayscale.config import Config
from rayscale.errors import UserError

SAMPLE_ROWS = 4096  # real rows read to build the probes from (repeated up to the probe's size)


@dataclass
class Probe:
    micro_batch_size: int
    fits: bool
    peak_mb: float | None  # device peak (CUDA) or counted tensor memory (CPU); None where it did not fit
    seconds: float
    predicted_mb: float | None = None  # CPU: not run, its memory predicted from the probes before it over the budget


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int | None:
    """The largest m in [1, limit] with fits(m), for a monotone `fits`: doubling, then bisection. None when not
    even 1 fits."""
    if not fits(1):
        return None
    low, high = 1, None  # low fits, high does not
    while high is None:
        candidate = min(2 * low, limit)
        if candidate == low:
            return low
        if fits(candidate):
            low = candidate
        else:
            high = candidate
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def memory_per_sample(probes: list[Probe]) -> tuple[float, float] | None:
    """(MiB per sample, fixed MiB) from the two largest probes that fit: the slope between them, so what does not
    grow with the batch (weights, gradients, optimizer state) is not charged to the samples."""
    fitted = sorted((p for p in probes if p.fits and p.peak_mb is not None), key=lambda p: p.micro_batch_size)
    if len(fitted) < 2:
        return None
    small, large = fitted[-2], fitted[-1]
    slope = (large.peak_mb - small.peak_mb) / (large.micro_batch_size - small.micro_batch_size)
    return slope, large.peak_mb - slope * large.micro_batch_size


def predicted_mb(probes: list[Probe], size: int) -> float:
    """The memory of a micro-batch of `size` on the line through the two largest probes that fit (0 before two
    have: the first probes, 1 and 2, are run)."""
    line = memory_per_sample(probes)
    return 0.0 if line is None else line[1] + line[0] * size


def available_mb() -> float:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


class TensorMemory:
    """Counts the tensor memory of a CPU step: what the model, optimizer and batch hold, plus the activations
    autograd saves for backward (each storage once, parameters and inputs not again)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 state_of: list[torch.Tensor] | None = None) -> None:
        """`state_of`: the parameters whose optimizer state a worker holds (optim.shard_state: the most loaded
        worker's shard; None: every parameter's)."""
        self.model, self.optimizer = model, optimizer
        self.state_of = None if state_of is None else {id(p) for p in state_of}
        self.saved: dict[int, int] = {}
        self._known: set[int] = set()

    def _held(self, batch: dict[str, torch.Tensor], every_state: bool = False) -> list[torch.Tensor]:
        tensors = [*self.model.parameters(), *self.model.buffers(), *batch.values()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        return tensors + [v for p, state in self.optimizer.state.items() for v in state.values()
                          if isinstance(v, torch.Tensor)
                          and (every_state or self.state_of is None or id(p) in self.state_of)]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._known:
            self.saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooks(self, batch: dict[str, torch.Tensor]) -> torch.autograd.graph.saved_tensors_hooks:
        # What already exists is told apart by address now, before backward frees the activations: afterwards
        # the allocator hands their memory to the gradients, and the addresses would collide.
        self.saved = {}
        self._known = {t.untyped_storage().data_ptr() for t in self._held(batch, every_state=True)}
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def total_mb(self, batch: dict[str, torch.Tensor]) -> float:
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._held(batch)}
        return (sum(held.values()) + sum(self.saved.values())) / 2**20


@dataclass
class Finding:
    device: str
    budget_mb: float | None  # CPU only
    largest: int | None
    probes: list[Probe] = field(default_factory=list)
    per_sample: tuple[float, float] | None = None  # (MiB per sample, fixed MiB)
    limit: int = 0


def _sample_rows(cfg: Config) -> tuple[dict[str, np.ndarray], object]:
    from rayscale.data import sources

    info = sources.inspect_source(cfg.data.source, cfg.data, cfg.seed)
    parts, rows = [], 0
    for chunk in info.chunks:
        part = sources.read_chunk(info.kind, chunk, cfg.data, cfg.seed)
        parts.append(part)
        rows += len(part["row_id"])
        if rows >= SAMPLE_ROWS:
            break
    columns = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    if columns["x"].dtype == object:  # the longest sequences first: every probe pads to the worst case
        order = np.argsort([-len(sequence) for sequence in columns["x"]], kind="stable")
        columns = {key: value[order] for key, value in columns.items()}
    return columns, info.spec


def find(cfg: Config, *, limit: int | None = None, memory_mb: float | None = None,
         started: Callable[[], None] = lambda: None, progress: Callable[[Probe], None] = lambda probe: None) -> Finding:
    """Probe micro-batch sizes on this machine. `started` is called once the config, the data and the model have
    been checked and built (a bad one raises before it), `progress` after each probe."""
    from rayscale import rules
    from rayscale.data.collate import collate
    from rayscale.engine.optimizers import build_optimizer
    from rayscale.engine.precision import make_precision
    from rayscale.engine.step import is_out_of_memory, train_step
    from rayscale.engine.strategies.sharded_state import largest_shard, trainable
    from rayscale.math.batching import plan_batches
    from rayscale.math.schedules import peak_lr
    from rayscale.models import build_model

    plan = plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    rules.check(cfg)
    if cfg.scaling.use_gpu and not torch.cuda.is_available():
        raise UserError("scaling.use_gpu: no CUDA GPU on this machine; run find-batch-size where the workers run, "
                        "or set scaling.use_gpu false to measure the CPU")
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
    precision = make_precision(cfg.train.precision, device)
    limit = limit or 8 * plan.per_worker_batch_size
    budget = None if device.type == "cuda" else (memory_mb or available_mb() / 2)
    rows, spec = _sample_rows(cfg)
    have = len(rows["row_id"])

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, spec).to(device)
    lr = peak_lr(cfg.optim, plan.global_batch_size, cfg.batch.global_batch_size)
    optimizer = build_optimizer(cfg.optim, model, lr)
    # optim.shard_state: a worker keeps the state of its own shard only; the most loaded one's is what must fit.
    counter = TensorMemory(model, optimizer, largest_shard(trainable(optimizer), cfg.scaling.num_workers)
                           if cfg.optim.shard_state else None)
    finding = Finding(device=str(device), budget_mb=budget, largest=None, limit=limit)

    def fits(size: int) -> bool:
        if budget is not None and (predicted := predicted_mb(finding.probes, size)) > budget:
            probe = Probe(size, False, None, 0.0, predicted_mb=predicted)
            finding.probes.append(probe)
            progress(probe)
            return False
        began = time.perf_counter()
        batch = collate({key: value[np.arange(size) % have] for key, value in rows.items()}, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        peak = None
        try:
            with counter.hooks(batch):
                train_step(model, [batch], optimizer, task=spec.task, lr=lr, precision=precision)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) / 2**20
            else:
                peak = counter.total_mb(batch)
            ok = budget is None or peak <= budget
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            ok = False
        batch = None
        optimizer.zero_grad(set_to_none=True)
        counter.saved = {}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        probe = Probe(size, ok, peak if ok else None, time.perf_counter() - began)
        finding.probes.append(probe)
        progress(probe)
        return ok

    started()
    finding.largest = largest_fitting(fits, limit)
    finding.per_sample = memory_per_sample(finding.probes)
    return finding


def report(finding: Finding, cfg: Config) -> list[str]:
    """The lines `rayscale find-batch-size` prints after its probes."""
    from rayscale.math.batching import fit_micro_batch, plan_batches

    plan = plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    capped = finding.largest == finding.limit
    lines = [f"largest micro-batch that fits: {finding.largest}"
             + (" (the most tried: raise --max to go further)" if capped else "")]
    if finding.per_sample is not None:
        slope, fixed = finding.per_sample
        state = (f"the most loaded of {max(cfg.scaling.num_workers, 1)} workers' share of the optimizer state"
                 if cfg.optim.shard_state else "optimizer state")
        lines.append(f"memory per sample: {slope:.4g} MiB, plus {fixed:.4g} MiB that does not grow with the batch "
                     f"(weights, gradients, {state})")
    micro = fit_micro_batch(plan.per_worker_batch_size, finding.largest)
    lines.append(f"for batch.global_batch_size {plan.global_batch_size} on {plan.num_workers} workers: "
                 f"--set batch.micro_batch_size={micro} (the largest divisor of the per-worker batch "
                 f"{plan.per_worker_batch_size} that fits)")
    return lines
