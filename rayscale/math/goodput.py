"""Predicted goodput at other global batch sizes, from one run's step timings and noise scale. Pure math.

A run measures, per log line (step_clock.py), where a step's time goes: `micro_batch_s` (one micro-batch
accumulated without a sync), `sync_micro_batch_s` (the step's last micro-batch, its backward waiting for the
gradient all-reduce) and `update_s` (zeroing, clipping, the optimizer step). With N workers and the run's
micro-batch b, a global batch B is planned as it would be by `rayscale train`: each worker takes B/N samples in
micro-batches of m = the largest divisor of B/N not above b (b itself whenever B/N is a multiple of b), so
k = B/(N m) of them, and one optimizer step takes

    T(B) = k t_micro (m/b)  +  t_comm  +  t_update  +  B d  +  t_other

- t_comm = t_sync - t_micro is the all-reduce wait: once per step, whatever the batch (DDP's gradient buckets
  have the model's size, not the batch's). When B >= N b this is (k - 1) t_micro + t_sync + t_update.
- Compute scales linearly with the micro-batch when it shrinks below b (m/b): optimistic for small
  micro-batches, whose fixed per-kernel cost does not shrink.
- When every step of the run was one micro-batch there is no no-sync micro-batch to time: t_micro is then
  taken as t_sync (t_comm = 0), which charges each added micro-batch an all-reduce wait: conservative.
- d is the time blocked on data per sample of the global batch (data_wait_fraction x step time / B): each
  worker reads its B / N rows of a step from its own lanes, so at a fixed worker count the wait grows with
  the global batch.
- t_other is what the run's measured step time (B / samples_per_sec) has beyond the rest: per-step host work
  (the lr, the non-finite check, logging), charged once per step. It makes the model reproduce the measured
  samples/s at the run's own batch, so every other row is an extrapolation from one measured point.

Throughput is B / T(B). Statistical efficiency (noise_scale.efficiency, Pollux) is taken against the run's own
batch B0, so it is 1 there and goodput = throughput x efficiency reads as "samples/s worth as much as samples at
B0": the row with the highest goodput reaches a given loss soonest, if the noise scale holds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from rayscale.math.batching import fit_micro_batch
from rayscale.math.noise_scale import efficiency


@dataclass(frozen=True)
class StepModel:
    """Seconds, from one run: its plan (global batch, micro-batch, workers) and its measured step parts."""

    global_batch_size: int
    micro_batch_size: int
    num_workers: int
    micro_batch_s: float  # one no-sync micro-batch of micro_batch_size samples
    comm_s: float  # all-reduce wait, once per step
    update_s: float  # zero grads, clip, optimizer step, once per step
    data_s_per_sample: float  # blocked on data, per sample of the global batch
    other_s: float  # the rest of the measured step time, once per step
    micro_batch_measured: bool  # False: micro_batch_s is the sync micro-batch's time (see the module doc)

    def plan(self, batch: int) -> tuple[int, int]:
        """(micro-batch, accumulation steps) at global batch `batch`, as `rayscale train` would need them."""
        if batch < self.num_workers or batch % self.num_workers:
            raise ValueError(f"global batch {batch} is not a positive multiple of {self.num_workers} workers")
        per_worker = batch // self.num_workers
        micro = fit_micro_batch(per_worker, self.micro_batch_size)
        return micro, per_worker // micro

    def step_s(self, batch: int) -> float:
        micro, accumulation = self.plan(batch)
        compute = accumulation * self.micro_batch_s * micro / self.micro_batch_size
        return compute + self.comm_s + self.update_s + batch * self.data_s_per_sample + self.other_s

    def samples_per_sec(self, batch: int) -> float:
        return batch / self.step_s(batch)


def calibrate(global_batch_size: int, micro_batch_size: int, num_workers: int, *, samples_per_sec: float,
              data_wait_fraction: float, micro_batch_s: float | None, sync_micro_batch_s: float,
              update_s: float) -> StepModel:
    """The step model of a run from its measured means (see the module doc for each term)."""
    measured = micro_batch_s is not None
    micro_s = micro_batch_s if measured else sync_micro_batch_s
    bare = StepModel(global_batch_size, micro_batch_size, num_workers, micro_s,
                     comm_s=max(sync_micro_batch_s - micro_s, 0.0), update_s=update_s,
                     data_s_per_sample=0.0, other_s=0.0, micro_batch_measured=measured)
    step = global_batch_size / samples_per_sec
    data_s = max(data_wait_fraction, 0.0) * step
    # Each part is the slowest worker's, so their sum can exceed the step: the rest is then taken as nothing.
    other = max(step - data_s - bare.step_s(global_batch_size), 0.0)
    return StepModel(global_batch_size, micro_batch_size, num_workers, micro_s, bare.comm_s, update_s,
                     data_s / global_batch_size, other, measured)


def later_half(values: list) -> list:
    """Skip the first (it holds start-up and the first compilations) when there is more, keep the later half:
    the steady state, where a run at another batch size will spend its time."""
    values = values[1:] if len(values) > 1 else values
    return values[len(values) // 2:]


def timed_lines(records: list[dict]) -> list[dict]:
    """The log lines that timed training steps (step_clock.py)."""
    return [r for r in records if r.get("samples_per_sec") and r.get("sync_micro_batch_s") is not None
            and r.get("update_s") is not None]


def medians(timed: list[dict], noise_lines: list[dict]) -> dict:
    """The inputs of `calibrate` and `predict`: medians over the later half of the timed lines (and of the lines
    that measured the noise scale, an EMA that settles as training goes on)."""
    used = later_half(timed)
    micro = [r["micro_batch_s"] for r in used if r.get("micro_batch_s") is not None]
    return {"lines_used": len(used),
            "samples_per_sec": statistics.median(r["samples_per_sec"] for r in used),
            "data_wait_fraction": statistics.median(r.get("data_wait_fraction") or 0.0 for r in used),
            "micro_batch_s": statistics.median(micro) if micro else None,
            "sync_micro_batch_s": statistics.median(r["sync_micro_batch_s"] for r in used),
            "update_s": statistics.median(r["update_s"] for r in used),
            "noise_scale": statistics.median(r["gradient_noise_scale"] for r in later_half(noise_lines))}


def candidate_batches(global_batch_size: int, num_workers: int, max_batch: int | None = None) -> list[int]:
    """The run's batch times 1/8, 1/4, ... 64 (the powers of two that give a whole multiple of the workers),
    up to `max_batch` (default: 64 times the run's)."""
    limit = max_batch if max_batch is not None else 64 * global_batch_size
    found = set()
    for shift in range(-3, 7):
        batch = global_batch_size << shift if shift >= 0 else global_batch_size >> -shift
        exact = batch << -shift == global_batch_size if shift < 0 else True
        if exact and batch >= num_workers and batch % num_workers == 0 and batch <= limit:
            found.add(batch)
    return sorted(found)


def smallest_candidate(global_batch_size: int, num_workers: int) -> int:
    return candidate_batches(global_batch_size, num_workers, max_batch=global_batch_size)[0]


@dataclass(frozen=True)
class Prediction:
    global_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    step_s: float
    samples_per_sec: float
    efficiency: float  # against the run's own global batch
    goodput: float  # samples_per_sec x efficiency


def predict(model: StepModel, batches: list[int], noise_scale: float) -> list[Prediction]:
    rows = []
    for batch in batches:
        micro, accumulation = model.plan(batch)
        step = model.step_s(batch)
        statistical = efficiency(noise_scale, batch, model.global_batch_size)
        rows.append(Prediction(batch, micro, accumulation, step, batch / step, statistical,
                               batch / step * statistical))
    return rows


def best(rows: list[Prediction]) -> Prediction:
    """The highest goodput; a tie goes to the smaller batch (less memory, more steps to learn from)."""
    return max(rows, key=lambda row: (row.goodput, -row.global_batch_size))
