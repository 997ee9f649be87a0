"""Adaptive global batch (`batch.adaptive`): which global batch the next epoch trains with. No Ray, no torch.

- step: Smith et al. (2018), "Don't decay the learning rate, increase the batch size": the batch is multiplied
  by `batch.growth_factor` every `batch.growth_every_samples`. The gradient noise of SGD goes as lr / B, so
  growing B anneals it as an lr decay would, with fewer, larger (more parallel) steps. With
  `optim.scaling_rule: none` the lr stays put, as in the paper; with linear or sqrt it follows the batch.
- goodput: Pollux (Qiao et al. 2021): the candidate with the highest predicted goodput (throughput x
  statistical efficiency), from the noise scale and step times the epoch measured (goodput.py). The noise scale
  grows as the loss falls, so the best batch grows too.

The batch changes only at epoch ends: each epoch's plan is fixed, so the steps it cuts (and a mid-epoch
resume's count of them) never depend on a decision taken inside it. The batch of the next epoch is saved in
every checkpoint: a restarted run continues with the same sequence of batches.
"""

from __future__ import annotations

from rayscale.errors import ConfigError
from rayscale.math import goodput
from rayscale.math.batching import BatchPlan, fit_micro_batch, plan_batches


def upper_limit(max_global_batch_size: int | None, initial: int, train_rows: int, workers: int,
                micro_batch_size: int | str | None) -> int:
    """batch.max_global_batch_size, or (null) the largest batch of the initial one's doubling ladder up to 64x it
    and at most the training rows (a larger batch would not fill one step per epoch)."""
    if max_global_batch_size is not None:
        if max_global_batch_size < initial:
            raise ConfigError(f"batch.max_global_batch_size {max_global_batch_size}: expected at least "
                              f"batch.global_batch_size {initial}")
        if max_global_batch_size > train_rows:
            raise ConfigError(f"batch.max_global_batch_size {max_global_batch_size} is more than the {train_rows} "
                              f"training rows (not one full step per epoch)")
        if max_global_batch_size % workers:
            raise ConfigError(f"batch.max_global_batch_size {max_global_batch_size} is not divisible by {workers} "
                              f"workers (scaling.num_workers)")
        return max_global_batch_size
    limit = initial
    while limit * 2 <= min(64 * initial, train_rows):
        limit *= 2
    return limit


def plan_for(global_batch_size: int, micro_batch_size: int | str | None, workers: int) -> BatchPlan:
    """The plan of an epoch at `global_batch_size`: the configured micro-batch where it divides the per-worker
    batch, else the largest that does (as in a Tune trial)."""
    per_worker = global_batch_size // max(workers, 1)
    return plan_batches(global_batch_size, fit_micro_batch(per_worker, micro_batch_size), workers)


def step_batch(samples_seen: int, initial: int, factor: float, every: int, limit: int, workers: int) -> int:
    """The batch after `samples_seen` samples: initial x factor^(milestones passed), a multiple of the workers,
    at most `limit`."""
    grown = initial * factor ** (samples_seen // every)
    return max(initial, min(limit, int(grown // workers) * workers))


def goodput_batch(records: list[dict], plan: BatchPlan, initial: int, limit: int) -> int | None:
    """The candidate (initial x powers of two, up to `limit`) with the best predicted goodput from an epoch's log
    lines (goodput.medians, as `rayscale suggest` reads a run), or None where they do not say (no timing or
    noise scale yet)."""
    timed = [r for r in goodput.timed_lines(records) if not r.get("evaluation")]
    noise_lines = [r for r in timed if r.get("gradient_noise_scale")]
    if not noise_lines:
        return None
    found = goodput.medians(timed, noise_lines)
    model = goodput.calibrate(plan.global_batch_size, plan.micro_batch_size, plan.num_workers,
                              samples_per_sec=found["samples_per_sec"],
                              data_wait_fraction=found["data_wait_fraction"], micro_batch_s=found["micro_batch_s"],
                              sync_micro_batch_s=found["sync_micro_batch_s"], update_s=found["update_s"])
    candidates = [batch for batch in ladder(initial, limit) if batch % plan.num_workers == 0]
    return goodput.best(goodput.predict(model, candidates, found["noise_scale"])).global_batch_size


def ladder(initial: int, limit: int) -> list[int]:
    """initial, 2 initial, 4 initial, ... up to limit (and limit itself)."""
    batches = [initial]
    while batches[-1] * 2 <= limit:
        batches.append(batches[-1] * 2)
    return sorted({*batches, limit})
