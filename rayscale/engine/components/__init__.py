"""Features that hook the training loop, one file each, with their own state in the checkpoint.

A component overrides only the hooks it needs; the loop calls each hook on every component in the order of
its list (engine/loop.py). A feature is then: a config key, a rule in rules.py if it does not combine with
another, one file here with its state (`part`) and its hooks, and its unit tests.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from rayscale.data.assembly import StepRows
    from rayscale.engine.metrics import LogLine
    from rayscale.engine.run import Run
    from rayscale.engine.state import TrainState
    from rayscale.engine.step import StepResult

P = TypeVar("P")


def read_part(state: TrainState, name: str, part_type: type[P]) -> P:
    """A component's part of `state`, typed: its defaults where the checkpoint holds none."""
    raw = state.parts.get(name)
    return part_type(**raw) if raw else part_type()


class Component:
    name: str = ""  # the key of its part in TrainState.parts ("": it saves nothing)
    logs: tuple[str, ...] = ()  # the keys it may add to a log line (engine/loop.py's line_keys: tune.metric's)

    def part(self, run: Run) -> Any | None:
        """Its state for the next checkpoint: a dataclass (or None: nothing to save)."""
        return None

    def restore(self, run: Run, part: dict | None) -> None:
        """Resuming, after the weights and optimizer are restored: its part of the checkpoint (None if the
        checkpoint holds none). Not called on a fresh run."""

    def start_epoch(self, run: Run, epoch: int) -> None:
        """Before an epoch's (or an online file's) first step."""

    def after_step(self, run: Run, rows: StepRows, result: StepResult) -> None:
        """After every trained step (skipped ones too: `result.skipped` says so, maybe as a device flag that
        must not be read on the host here)."""

    def interval_sums(self) -> list[float]:
        """Numbers to sum over every rank at the next log line (one collective for every component); the
        component starts a new interval."""
        return []

    def log_fields(self, run: Run, sums: list[float], steps: int) -> dict[str, Any]:
        """Its keys in the log line, from its `interval_sums` summed over ranks and the interval's steps."""
        return {}

    def after_line(self, run: Run, line: LogLine) -> None:
        """After each log line is written."""

    def end_epoch(self, run: Run, epoch: int) -> None:
        """At an epoch's end, after its validation and epoch-end line, before its checkpoint."""


def part_dict(part: Any) -> dict:
    return dataclasses.asdict(part) if dataclasses.is_dataclass(part) else dict(part)
