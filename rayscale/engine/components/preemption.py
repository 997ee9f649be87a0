"""Preemption-aware checkpoints: when a node of this run is being drained (a spot interruption, an autoscaler
scale-down), every rank checkpoints at the same step and then holds until Ray Train restarts the group without
that node, so nothing trained before the drain notice is trained again.

The ranks ask the context every `run.preemption_check_steps` steps, all at the same steps: under Ray Train the
question is a barrier (rank 0's answer goes to every rank), so they agree on where to checkpoint. The answer
arrives as soon as Ray's watcher sees the drain (it polls every 5 s), so the checkpoint lands within that many
steps of the notice reaching the workers. The embedded single-node Ray has no watcher, and the ranks never ask.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rayscale.engine.components import Component
from rayscale.engine.run import Run


@dataclass(frozen=True)
class PreemptionNotice:
    """A drain Ray announced: the nodes going, the ranks on them, and when they go (None: not said)."""

    nodes: tuple[str, ...]
    ranks: tuple[int, ...]
    deadline_ms: int | None

    def describe(self, now_s: float | None = None) -> str:
        """`now_s`: the time to count the deadline from (default: now)."""
        left_s = self.deadline_ms / 1000 - (time.time() if now_s is None else now_s) if self.deadline_ms else None
        when = f", going in {max(left_s, 0):.0f} s" if left_s is not None else ""
        return f"node(s) {', '.join(n[:12] for n in self.nodes)} (ranks {list(self.ranks)}) being drained{when}"


@dataclass
class PreemptionPart:
    checkpoints: int = 0  # checkpoints written on a drain notice over the run
    last_step: int | None = None  # the step the latest one was written at


class PreemptionCheck(Component):
    name = "preemption"

    def __init__(self, every_steps: int, ask: Callable[[], PreemptionNotice | None] | None, saved: PreemptionPart):
        """`ask`: the context's question (a collective); None where no node can be drained (never asks)."""
        self.every, self.ask, self.saved = every_steps, ask, saved

    def part(self, run: Run) -> PreemptionPart:
        return self.saved

    def notice(self, run: Run) -> PreemptionNotice | None:
        """After a step: the drain to checkpoint for, when this is a step the ranks ask at and one is announced.
        The caller checkpoints, then holds (the context never returns from its hold)."""
        if self.ask is None or run.state.step % self.every:
            return None
        found = self.ask()
        if found is not None:
            self.saved.checkpoints += 1
            self.saved.last_step = run.state.step
        return found
