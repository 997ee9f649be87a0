"""train.noise_scale: the gradient noise scale, the critical batch size and this batch's statistical efficiency,
measured as it trains (the estimators are in math/noise_scale.py).

One step in train.noise_scale_every_steps is measured: `train_step` then also returns the squared norm of a
small batch's gradient (a worker's share of the step under DDP, or the first micro-batch with one worker); with
the step's own norm that gives one estimate of |G|^2 and tr(S), on the device. They are summed over a log
interval and over workers, and folded into exponential moving averages whose ratio is B_simple.
"""

from __future__ import annotations

import torch

from rayscale.config import Config
from rayscale.engine.components import Component
from rayscale.math.batching import BatchPlan
from rayscale.math.noise_scale import NoiseScale, efficiency, two_batch_estimates


def step_noise_estimates(small_sq: torch.Tensor, small: torch.Tensor, big_sq: torch.Tensor,
                         big: torch.Tensor) -> torch.Tensor:
    """[|G|^2, tr(S), 1] from one step (two_batch_estimates on the device, no host sync), or zeros when the
    small batch is empty or the whole step (a rank with no rows, a lone micro-batch)."""
    valid = (small > 0) & (small < big)
    small, big = small.clamp_min(1e-12), torch.maximum(big, small + 1)  # finite where not valid
    true_sq, trace = two_batch_estimates(small_sq, small, big_sq, big)
    estimates = torch.stack([true_sq, trace, torch.ones_like(true_sq)])
    return torch.where(valid, estimates, torch.zeros_like(estimates))


class NoiseScaleMeter(Component):
    name = "noise_scale"
    logs = ("gradient_noise_scale", "critical_batch_size", "batch_efficiency")

    def __init__(self, cfg: Config, plan: BatchPlan, *, world_size: int, gradients_all_reduced: bool,
                 fp16: bool, base_batch: int, in_tokens: bool, device: torch.device):
        # Two batch sizes in one step: a worker's share and the whole step (2+ workers), or the first
        # micro-batch and the step (1 worker). fp16 leaves it out: its gradients carry the loss scale. The
        # parameter server's gradients never meet on a worker.
        self.possible = cfg.train.noise_scale and not fp16 and gradients_all_reduced
        self.on = self.possible and (world_size > 1 or plan.accumulation_steps > 1 or plan.auto)
        self.every = cfg.train.noise_scale_every_steps
        self.base_batch, self.in_tokens, self.device = base_batch, in_tokens, device
        self.noise = NoiseScale()
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def measures(self, step: int) -> bool:
        return self.on and step % self.every == 0

    def part(self, run):
        return self.noise.state_dict()

    def restore(self, run, part):
        if part:
            self.noise.load_state_dict(part)

    def start_epoch(self, run, epoch):
        self.on = self.on or (self.possible and run.plan.accumulation_steps > 1)  # batch.adaptive grew it

    def after_step(self, run, rows, result):
        skipped = result.skipped
        on_device = isinstance(skipped, torch.Tensor)
        if result.small_sq is not None and (on_device or not skipped):
            estimates = step_noise_estimates(result.small_sq, result.small_count, result.grad_norm.double() ** 2,
                                             result.global_count)
            self.sums += torch.where(skipped, 0.0, estimates) if on_device else estimates

    def interval_sums(self):
        sums, self.sums = self.sums.tolist(), torch.zeros(3, dtype=torch.float64, device=self.device)
        return sums

    def log_fields(self, run, sums, steps):
        true_sq, trace, estimates = sums
        if estimates:  # every rank updates its own copy with the same all-reduced means: all stay equal
            self.noise.update(true_sq / estimates, trace / estimates)
        value = self.noise.value
        return {"gradient_noise_scale": value,
                "critical_batch_size": round(value) if value is not None else None,
                # Sequences count tokens, so their noise scale is in tokens; efficiency is given for rows only.
                "batch_efficiency": efficiency(value, run.plan.global_batch_size, self.base_batch)
                if value is not None and not self.in_tokens else None}
