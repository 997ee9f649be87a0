"""The gradient noise scale, measured during training from two batch sizes it already has. No Ray in here.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A): with |g_b|^2 the squared norm
of a mean gradient over b samples and |G_B|^2 the same over B > b samples of the same step,

    |G|^2  ~  (B |G_B|^2 - b |g_b|^2) / (B - b)          (the true gradient's squared norm)
    tr(S)  ~  (|g_b|^2 - |G_B|^2) / (1/b - 1/B)           (the trace of the per-sample gradient covariance)

are unbiased, and the simple noise scale B_simple = tr(S) / |G|^2 estimates the critical batch size: below it,
doubling the batch nearly halves the steps needed; above it, it buys little. Each estimate from one step is
very noisy, so numerator and denominator are averaged separately (an exponential moving average, as in the
paper) before dividing.

In rayscale the small batch is one worker's share of the step (its gradient before the all-reduce: a measured
step accumulates under no_sync and all-reduces after its backward) or, with one worker, its first micro-batch;
the big batch is the whole step. Neither costs a pass: only a squared norm over the gradients. One step in
train.noise_scale_every_steps is measured; the estimates are averaged over a log interval anyway.

Statistical efficiency (Pollux/adaptdl, Qiao et al. 2021): a batch of B samples makes (phi + B0) / (phi + B) of
the progress per sample that a batch of B0 would, phi being the noise scale. Throughput x efficiency = goodput.
"""

from __future__ import annotations

from dataclasses import dataclass


def two_batch_estimates(small_sq, small, big_sq, big):
    """(|G|^2, tr(S)) from one step: squared norms of the mean gradients over `small` and `big` samples.
    Plain arithmetic, so it takes floats or tensors alike (the worker passes tensors and checks 0 < small < big
    on the device; numbers are checked here)."""
    if isinstance(small, (int, float)) and isinstance(big, (int, float)) and not 0 < small < big:
        raise ValueError(f"need 0 < small < big batch, got {small} and {big}")
    true_sq = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1.0 / small - 1.0 / big)
    return true_sq, trace


def efficiency(noise_scale: float, batch: float, base_batch: float) -> float:
    """Progress per sample at `batch`, relative to `base_batch` (1 at base_batch, falling as batch grows)."""
    noise_scale = max(noise_scale, 0.0)
    return (noise_scale + base_batch) / (noise_scale + batch)


@dataclass
class NoiseScale:
    """Exponential moving averages of |G|^2 and tr(S) over steps; `value` is their ratio, B_simple (the ratio
    needs no bias correction: both averages start at zero and carry the same weight)."""

    decay: float = 0.95
    true_sq: float = 0.0
    trace: float = 0.0
    updates: int = 0

    def update(self, true_sq: float, trace: float) -> None:
        self.true_sq = self.decay * self.true_sq + (1 - self.decay) * true_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        self.updates += 1

    @property
    def value(self) -> float | None:
        """B_simple, or None before the first update or while the |G|^2 average is not positive (the gradient
        is all noise so far: no batch is too large)."""
        if self.updates == 0 or self.true_sq <= 0:
            return None
        return self.trace / self.true_sq

    def state_dict(self) -> dict:
        return {"decay": self.decay, "true_sq": self.true_sq, "trace": self.trace, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.true_sq, self.trace, self.updates = (state[k] for k in ("decay", "true_sq", "trace",
                                                                                    "updates"))
