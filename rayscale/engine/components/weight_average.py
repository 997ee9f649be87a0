"""train.ema_half_life_samples: an exponential moving average of the weights, with its horizon in samples.

Why it is here: at a high learning rate the weights bounce around the valley they are in, so a validation
loss taken mid-training measures that bounce as much as the valley. The average sits near the valley floor,
where the decayed lr would take the weights later (the reason SWA and LAWA work), so mid-training losses
rank runs by where they are heading. Tune's early stopping judges trials on exactly those mid-training
losses: benchmarks/tune_asha_vs_grid.py shows ASHA cutting the eventual winner on its raw loss and keeping
it on the average's.

The half-life is in samples, like every schedule here, so it means the same stretch of data at every batch
size: a step of B samples moves the average by 1 - 0.5 ** (B / half_life). Buffers (BatchNorm statistics)
are copied, not averaged: they are running averages already, and integer counters cannot be.
"""

from __future__ import annotations

import copy

import torch

from rayscale.engine.checkpoint import SavedState, unwrap
from rayscale.engine.components import Component


class WeightAverage:
    """`module` is the averaged copy: evaluate it, save its `state_dict()`."""

    def __init__(self, model: torch.nn.Module, half_life_samples: int):
        if half_life_samples <= 0:
            raise ValueError(f"half_life_samples must be positive, got {half_life_samples}")
        self.half_life_samples = half_life_samples
        self.module = copy.deepcopy(unwrap(model)).eval()
        self.module.requires_grad_(False)

    def decay(self, samples: int) -> float:
        """Weight of the old average after a step of `samples` samples."""
        return 0.5 ** (samples / self.half_life_samples)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, samples: int, skipped: torch.Tensor | None = None) -> None:
        """Fold in the weights after an optimizer step that trained `samples` samples. `skipped`: a bool on the
        device saying the step was skipped there (then nothing moves), read without a host sync."""
        source = unwrap(model)
        averaged = list(self.module.parameters())
        current = [p.detach() for p in source.parameters()]
        if averaged and skipped is None:
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay(samples))
        elif averaged:
            # A tensor weight as a plain argument would be read on the host: as a (broadcast) tensor per weight,
            # lerp takes it on the device (fp32 weights: the same bits as above; bf16 ones round the weight to
            # bf16 first: at most 0.2% off).
            weight = (~skipped).to(torch.float32) * (1.0 - self.decay(samples))
            by_dtype = {a.dtype: weight.to(a.dtype) for a in averaged}
            torch._foreach_lerp_(averaged, current, [by_dtype[a.dtype].expand_as(a) for a in averaged])
        for mine, theirs in zip(self.module.buffers(), source.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


class Averaging(Component):
    """The average as the loop sees it: updated after each step the optimizer applied, validated instead of
    the raw weights, saved in the checkpoint beside them and exported as model.pt."""

    name = "weight_average"

    def __init__(self, model: torch.nn.Module, half_life_samples: int):
        self.average = WeightAverage(model, half_life_samples)

    def part(self, run):
        return {"weights": self.average.state_dict()}

    def restore(self, run, part):
        # A run that turned the average on at resume starts it from the restored weights.
        self.average.load_state_dict(part["weights"] if part else unwrap(run.model).state_dict())

    def after_step(self, run, rows, result):
        skipped = result.skipped
        on_device = isinstance(skipped, torch.Tensor)
        if on_device or not skipped:
            self.average.update(run.model, rows.rows_in_step, skipped=skipped if on_device else None)


def exported_weights(saved: SavedState) -> dict[str, torch.Tensor]:
    """What model.pt holds: the weight average where the run kept one (the weights it validated), else the
    model's own."""
    part = saved.train_state.parts.get(Averaging.name)
    return part["weights"] if part else saved.model

