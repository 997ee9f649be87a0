"""ASHA by promotion (tune.asha_variant promotion): the run ends at the first of Tune's rungs past where it
starts, validated and checkpointed there; the same run started again resumes from that checkpoint, which says it
was a planned pause, not a fault (summary.json counts `rung_resumes` apart from `restarts`)."""

from __future__ import annotations

from dataclasses import dataclass

from rayscale.engine.components import Component


@dataclass
class RungPausePart:
    paused: bool = False  # this checkpoint is a rung's pause
    rung_resumes: int = 0  # resumes from a pause so far


class RungPause(Component):
    name = "rung_pause"

    def __init__(self, pause_at_samples: tuple[int, ...], samples_seen: int, saved: RungPausePart, resumed: bool):
        # A crash that restores the same pause checkpoint again counts it again from the same saved count, so
        # this stays one per pause.
        if resumed and saved.paused:
            saved.rung_resumes += 1
        saved.paused = False
        self.saved = saved
        self.at = next((point for point in pause_at_samples if point > samples_seen), None)

    def part(self, run):
        return self.saved

    def reached(self, samples_seen: int) -> bool:
        return self.at is not None and samples_seen >= self.at

    def pause_if_reached(self, samples_seen: int) -> bool:
        """At a validation: whether to end the run here (the next checkpoint then marks itself a pause)."""
        self.saved.paused = self.reached(samples_seen)
        return self.saved.paused
