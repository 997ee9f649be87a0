"""The non-finite guard: a step whose loss or gradients are not finite is skipped (by the step) and counted
here; `max_in_a_row` of them in a row abort the run, naming the step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rayscale.errors import NonFiniteError


@dataclass
class NonFiniteGuard:
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
        (the loop settles before every log line and checkpoint, so nothing after that step is saved)."""
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
