"""The batch plan: from the global batch the user states to what each worker does per optimizer step.

Pure arithmetic, no torch, no Ray. The user gives `batch.global_batch_size` (samples per optimizer step,
all workers together) and optionally `batch.micro_batch_size`; accumulation steps are derived, never
configured, and every inconsistency is reported with the arithmetic that failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayscale.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int  # samples per optimizer step, all workers together
    num_workers: int  # data-parallel ranks (local mode counts as 1)
    per_worker_batch_size: int  # samples one worker contributes to a step
    micro_batch_size: int  # samples per forward/backward
    accumulation_steps: int  # micro-batches per worker per optimizer step
    auto: bool = False  # batch.micro_batch_size auto: the micro-batch above is where it starts

    def describe(self) -> str:
        micro = f"micro-batch auto (from {self.micro_batch_size})" if self.auto else \
            f"micro-batch {self.micro_batch_size}"
        return (f"global batch {self.global_batch_size} = {micro} "
                f"x {self.accumulation_steps} accumulation steps x {self.num_workers} workers")


AUTO = "auto"


def plan_batches(global_batch_size: int, micro_batch_size: int | str | None, num_workers: int) -> BatchPlan:
    """`micro_batch_size` auto starts at the whole per-worker batch (see smaller_micro_batch)."""
    if micro_batch_size == AUTO:
        plan = plan_batches(global_batch_size, None, num_workers)
        return BatchPlan(**{**plan.__dict__, "auto": True})
    workers = max(num_workers, 1)  # num_workers=0 is Ray Train's local mode: one process
    if global_batch_size % workers:
        raise ConfigError(
            f"batch.global_batch_size {global_batch_size} is not divisible by {workers} workers "
            f"(scaling.num_workers); use a multiple of {workers}")
    per_worker = global_batch_size // workers
    micro = per_worker if micro_batch_size is None else micro_batch_size
    if micro > per_worker:
        raise ConfigError(
            f"batch.micro_batch_size {micro} is larger than the per-worker batch {per_worker} "
            f"(global_batch_size {global_batch_size} / {workers} workers); lower it or set it to null")
    if per_worker % micro:
        raise ConfigError(
            f"batch.global_batch_size {global_batch_size} is not micro_batch_size {micro} x accumulation "
            f"x {workers} workers (per-worker batch {per_worker} is not a multiple of {micro})")
    return BatchPlan(global_batch_size, workers, per_worker, micro, per_worker // micro)


def rank_slice(rows_in_step: int, plan: BatchPlan, rank: int) -> tuple[int, int]:
    """[start, stop) of the step's rows that `rank` trains on.

    Each rank takes a contiguous `per_worker_batch_size` slice of the step's rows in global order, so which
    rows a worker sees never depends on the micro-batch size. In a partial last step the later ranks get
    fewer rows, possibly none (the training step then runs a zero-weight micro-batch to keep DDP in step).
    """
    start = min(rank * plan.per_worker_batch_size, rows_in_step)
    stop = min(start + plan.per_worker_batch_size, rows_in_step)
    return start, stop


def micro_batch_bounds(rows: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """Split a worker's rows for one step into micro-batches of at most `micro_batch_size` rows."""
    if rows == 0:
        return []
    return [(start, min(start + micro_batch_size, rows)) for start in range(0, rows, micro_batch_size)]


def smaller_micro_batch(size: int) -> int:
    """The next micro-batch after running out of memory at `size`: half (Composer's rule). The global batch
    stays: more accumulation steps, the same update (Accelerate shrinks the global batch instead, which
    changes training)."""
    if size <= 1:
        raise ConfigError("batch.micro_batch_size auto: out of device memory even at micro-batch 1; use a smaller "
                          "model or sequences, train.precision bf16, or a device with more memory")
    return size // 2


def steps_per_epoch(rows: int, global_batch_size: int) -> int:
    """Optimizer steps in an epoch of `rows` rows; the last one is partial when rows do not divide."""
    return -(-rows // global_batch_size)


def fit_micro_batch(per_worker_batch_size: int, limit: int | str | None) -> int | str | None:
    """The largest divisor of the per-worker batch not above `limit` (null stays null).

    Tune trials sample the global batch; a fixed micro-batch would not divide every sample, so in a search
    `batch.micro_batch_size` is the memory limit and each trial uses the largest micro-batch that fits it.
    """
    if limit == AUTO:
        return AUTO
    if limit is None or per_worker_batch_size <= limit:
        return None if limit is None else per_worker_batch_size
    return max(d for d in range(1, limit + 1) if per_worker_batch_size % d == 0)
