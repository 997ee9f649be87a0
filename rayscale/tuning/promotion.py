"""ASHA as Li et al. (2020) wrote it: trials pause at each rung, and the best of a rung are promoted.

Ray's ASHAScheduler is the stopping variant: a trial that reaches a rung continues only if it beats what the
rung has recorded so far. It decides with what it has seen, so the first trial at a rung always continues,
and when trials come one or two at a time (a small cluster, `tune.max_concurrent_trials: 1`) the first few
train their whole budget whatever they are worth: on the ASHA benchmark's 12-point grid that trained 28-48%
of the grid's samples depending on nothing but the order of the trials.

Promotion waits instead. A trial that reaches rung k pauses there (its checkpoint at the rung, its resources
given back); it is promoted once it is among the best floor(n / eta) of the n trials recorded at rung k. When
no other trial can still reach rung k (the rung is *settled*), its best max(1, floor(n / eta)) are promoted
and the rest are stopped, so that a small search still trains one trial to the end. Every trial is then
judged against every other at the same rung, whatever order they came in.

Pure bookkeeping, no Ray: `rayscale.tuning.asha.PromotingASHA` drives it from Tune. Scores are "higher is better"
(a minimized metric is passed negated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

RUNG_PAUSE = "rung_pause"  # a trial's report that its Train run stopped at a rung (rayscale.tuning.search._trial)


@dataclass
class Rungs:
    milestones: list[int]  # samples seen at each rung, ascending, all below the trial budget
    reduction_factor: float
    recorded: list[dict[str, float]] = field(default_factory=list)  # per rung: trial id -> score
    promoted: list[list[str]] = field(default_factory=list)  # per rung: trials sent on past it

    def __post_init__(self) -> None:
        self.recorded = self.recorded or [{} for _ in self.milestones]
        self.promoted = self.promoted or [[] for _ in self.milestones]

    # --------------------------------------------------------------------------------------------- a trial

    def target(self, trial: str) -> int:
        """The rung a trial is training towards (len(milestones): the end of its budget)."""
        return sum(trial in recorded for recorded in self.recorded)

    def record(self, trial: str, samples: int, score: float) -> int | None:
        """Note a validation result; returns the rung it was recorded at, if it reached one."""
        rung = self.target(trial)
        if rung >= len(self.milestones) or samples < self.milestones[rung]:
            return None
        self.recorded[rung][trial] = score if math.isfinite(score) else -math.inf  # NaN: last at its rung
        return rung

    def waiting_at(self, trial: str) -> int | None:
        """The rung a trial waits at: recorded there and not (yet) promoted."""
        rung = self.target(trial) - 1
        return rung if rung >= 0 and trial not in self.promoted[rung] else None

    # --------------------------------------------------------------------------------------------- a rung

    def quota(self, rung: int, settled: bool) -> int:
        """How many of a rung's trials go on: floor(n / eta), and at least one once the rung is settled."""
        n = len(self.recorded[rung])
        quota = int(n / self.reduction_factor + 1e-9)
        return max(quota, 1) if settled and n else quota

    def best(self, rung: int, settled: bool) -> list[str]:
        ranked = sorted(self.recorded[rung], key=lambda t: (-self.recorded[rung][t], t))
        return ranked[:self.quota(rung, settled)]

    def settled(self, moving: dict[str, int], exhausted: bool) -> list[bool]:
        """Per rung, whether any other trial can still be recorded there. `moving`: trials running or about to
        (pending, or promoted and not yet restarted) -> the rung each trains towards; `exhausted`: the search
        will create no more trials. A rung is settled when the one below is, the one below has promoted all
        it will, and no moving trial is headed to it or below."""
        flags: list[bool] = []
        below_settled, below_done = exhausted, True
        for rung in range(len(self.milestones)):
            headed = any(target <= rung for target in moving.values())
            flags.append(below_settled and below_done and not headed)
            below_settled = flags[-1]
            below_done = set(self.best(rung, below_settled)) <= set(self.promoted[rung])
        return flags

    def promote(self, trial: str) -> None:
        rung = self.waiting_at(trial)
        if rung is not None:
            self.promoted[rung].append(trial)

    def to_promote(self, waiting: set[str], settled: list[bool]) -> list[str]:
        """Waiting trials to promote now, highest rung first (closest to a finished trial)."""
        chosen = []
        for rung in reversed(range(len(self.milestones))):
            chosen += [t for t in self.best(rung, settled[rung]) if t in waiting and t not in self.promoted[rung]]
        return chosen

    def hopeless(self, waiting: set[str], settled: list[bool]) -> list[str]:
        """Waiting trials that will never be promoted: their rung is settled and they are not in its best."""
        out = []
        for rung in range(len(self.milestones)):
            if settled[rung]:
                keep = set(self.best(rung, True))
                out += [t for t in self.recorded[rung] if t in waiting and self.waiting_at(t) == rung
                        and t not in keep]
        return out

    def decide(self, waiting: set[str], moving: dict[str, int], exhausted: bool) -> tuple[list[str], str | None]:
        """One scheduling decision: the waiting trials to stop, and the one to promote now (marked promoted)."""
        settled = self.settled(moving, exhausted)
        hopeless = self.hopeless(waiting, settled)
        chosen = self.to_promote(waiting - set(hopeless), settled)
        if chosen:
            self.promote(chosen[0])
        return hopeless, chosen[0] if chosen else None

    # --------------------------------------------------------------------------------------------- state

    def to_dict(self) -> dict:
        return {"milestones": self.milestones, "reduction_factor": self.reduction_factor,
                "recorded": self.recorded, "promoted": self.promoted}

    @classmethod
    def from_dict(cls, saved: dict) -> Rungs:
        return cls(milestones=list(saved["milestones"]), reduction_factor=saved["reduction_factor"],
                   recorded=[dict(r) for r in saved["recorded"]], promoted=[list(p) for p in saved["promoted"]])


def replay_one_at_a_time(curves: dict[str, list[tuple[int, float]]], order: list[str], milestones: list[int],
                         reduction_factor: float) -> dict[str, int]:
    """What PromotingASHA does with one trial at a time, replayed over known curves (trial -> [(samples, score)],
    higher is better). After each trial's run, as Tune asks the scheduler between runs, the trials that have
    earned it are promoted and the hopeless stopped; a promoted trial runs after the trials already queued (Ray
    grants queued resource requests in order). Returns the samples each trial trains."""
    rungs = Rungs(list(milestones), reduction_factor)
    trained = dict.fromkeys(order, 0)
    queue, waiting = list(order), set()
    while queue:
        trial = queue.pop(0)
        for samples, score in curves[trial]:
            if samples <= trained[trial]:
                continue
            trained[trial] = samples
            if rungs.record(trial, samples, score) is not None:
                waiting.add(trial)
                break
        while True:
            hopeless, chosen = rungs.decide(waiting, {t: rungs.target(t) for t in queue}, exhausted=True)
            waiting -= {*hopeless, chosen}
            if chosen is None:
                break
            queue.append(chosen)
    return trained
