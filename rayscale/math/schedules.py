"""Learning rate as a pure function of samples seen.

Warmup and decay are measured in samples, not steps, so a schedule means the same thing at every batch
size: a Tune trial with global batch 512 decays at the same point of the data as one with 64. No torch here.
"""

from __future__ import annotations

import math


def scaled_lr(lr: float, global_batch_size: int, base_batch_size: int | None, rule: str) -> float:
    """Peak lr for this global batch from the lr tuned at `base_batch_size`.

    linear: Goyal et al. 2017 (lr grows with the batch); sqrt: Krizhevsky 2014 / Hoffer et al. 2017,
    the usual choice for adaptive optimizers.
    """
    if rule == "none" or base_batch_size is None:
        return lr
    ratio = global_batch_size / base_batch_size
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"unknown scaling rule {rule!r}")


def warmup_factor(samples: int, warmup_samples: int) -> float:
    if warmup_samples <= 0 or samples >= warmup_samples:
        return 1.0
    return samples / warmup_samples


def decay_factor(name: str, samples_after_warmup: float, decay_samples: float, *, step_samples: float,
                 gamma: float, power: float, final_lr_ratio: float) -> float:
    """Multiplier in [0, 1] for `samples_after_warmup` of a decay span `decay_samples` long."""
    if name == "constant":
        return 1.0
    if name == "step":  # multiply by gamma every step_samples
        return gamma ** math.floor(samples_after_warmup / step_samples)
    if name == "exponential":  # the same decay, continuously
        return gamma ** (samples_after_warmup / step_samples)
    if decay_samples > 0:
        progress = min(max(samples_after_warmup / decay_samples, 0.0), 1.0)
    else:  # a run no longer than its warmup: no decay while it warms up (its lr never reaches the peak)
        progress = 0.0 if samples_after_warmup <= 0 else 1.0
    if name == "polynomial":  # power 2 is the "square decay"
        return final_lr_ratio + (1.0 - final_lr_ratio) * (1.0 - progress) ** power
    if name == "cosine":
        return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {name!r}")


def lr_multiplier(samples: int, total_samples: int, *, name: str, warmup_samples: int,
                  step_samples: int | None, gamma: float, power: float, final_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the optimizer step that ends at `samples` samples seen.

    Evaluated at the step's end so the first warmup step already moves (an lr of exactly 0 would waste it).
    """
    decay_samples = max(total_samples - warmup_samples, 0)
    after = max(samples - warmup_samples, 0)
    step = step_samples if step_samples is not None else max(decay_samples / 3, 1)
    return warmup_factor(samples, warmup_samples) * decay_factor(
        name, after, decay_samples, step_samples=step, gamma=gamma, power=power,
        final_lr_ratio=final_lr_ratio)


def warmup_note(warmup_samples: int, total_samples: int) -> str | None:
    """What the plan line says of a warmup as long as the run or longer (a short first try of a config
    under the default warmup): its lr never reaches the peak."""
    if warmup_samples < total_samples:
        return None
    return (f"warmup {warmup_samples:,} samples is not shorter than the run's {total_samples:,}: the lr stays "
            f"below its peak (lower schedule.warmup_samples)")


def schedule_from_config(schedule, total_samples: int):
    """Bind a ScheduleConfig and the run length: returns samples -> multiplier."""

    def multiplier(samples: int) -> float:
        return lr_multiplier(samples, total_samples, name=schedule.name,
                             warmup_samples=schedule.warmup_samples, step_samples=schedule.step_samples,
                             gamma=schedule.gamma, power=schedule.power,
                             final_lr_ratio=schedule.final_lr_ratio)

    return multiplier


def peak_lr(optim, global_batch_size: int, initial_global_batch_size: int) -> float:
    """The peak lr of a run at `global_batch_size`: optim.lr scaled by optim.scaling_rule from
    optim.base_batch_size, or (null) from the run's initial global batch (so a fixed batch is its own base and
    keeps optim.lr, and batch.adaptive moves the lr by the rule as the batch grows). `optim`: an OptimConfig."""
    return scaled_lr(optim.lr, global_batch_size, optim.base_batch_size or initial_global_batch_size,
                     optim.scaling_rule)
