"""Ray Tune's ASHA, with rungs that survive a killed driver; and ASHA by promotion (PromotingASHA).

Tune's resume (`Tuner.restore`) restores its searcher but rebuilds the scheduler as it was first created: the
rungs forget every result recorded before the kill. A resumed search would then compare the next trials
against none of the trials that finished before it, and let a hopeless one run its whole budget. This
scheduler writes its rungs to a file after every decision and reads them back when a restored search first
uses it. (Ray's own `save`/`restore` methods exist, but nothing in Tune calls them.)

Both schedulers also release the placement groups an ended trial's run left (ReleasesLeftGroups, release.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from rayscale.tuning.promotion import RUNG_PAUSE, Rungs
from rayscale.tuning.release import LeftGroups, ReleasesLeftGroups


class ResumableASHA(ReleasesLeftGroups, AsyncHyperBandScheduler):
    def __init__(self, *, state_file: str | Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self._state_file = str(state_file)
        self._loaded = False

    def __getstate__(self) -> dict:
        # Tune pickles the scheduler with the tuner; whoever unpickles it must read the file again.
        return {**self.__dict__, "_loaded": False}

    def rungs(self) -> list[list[dict]]:
        """Per bracket, per rung (highest milestone first, as Ray keeps them): {trial_id: signed metric}."""
        return [[dict(recorded) for _, recorded in bracket._rungs] for bracket in self._brackets]

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self._state_file)
        if not path.exists():
            return
        saved = json.loads(path.read_text())
        for bracket, rungs in zip(self._brackets, saved["brackets"], strict=False):
            for (milestone, recorded), saved_rung in zip(bracket._rungs, rungs, strict=False):
                if saved_rung["milestone"] == milestone:  # the same budget and grace: the same rungs
                    recorded.update(saved_rung["recorded"])
        self._num_stopped = saved["num_stopped"]

    def _save(self) -> None:
        state = {"num_stopped": self._num_stopped,
                 "brackets": [[{"milestone": milestone, "recorded": recorded} for milestone, recorded in b._rungs]
                              for b in self._brackets]}
        _write_json_atomic(Path(self._state_file), state)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        if result.get(self._time_attr, 0) >= self._max_t:
            # The whole budget is trained. Ray puts a rung at max_t when grace x rf^k reaches it (grace equal to
            # a trial's samples, say): stopping there saves no training and would cut the trial off while it
            # writes its outputs (model.pt, summary.json), listed as completed with none of them.
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


class PromotingASHA(ReleasesLeftGroups, FIFOScheduler):
    """`tune.asha_variant: promotion` (rayscale/promotion.py says why): a trial reports its rung's validation,
    its Train run ends at the rung with a checkpoint there, and the trial reports RUNG_PAUSE; it is paused then,
    holding nothing, and resumed from that checkpoint when promoted. Hopeless trials are stopped as soon as
    their rung is settled. Rungs are saved to `state_file` after every change, as ResumableASHA does, and read
    by resumed trials too (a trial restored by `--resume` while waiting at a rung pauses again at once)."""

    def __init__(self, *, time_attr: str, milestones: list[int], reduction_factor: float,
                 state_file: str | Path, left_groups: LeftGroups | None = None) -> None:
        super().__init__(left_groups=left_groups)
        self._time_attr = time_attr
        self._state_file = str(state_file)
        self._rungs = Rungs(milestones=list(milestones), reduction_factor=reduction_factor)
        self._loaded = False
        self._mode = "min"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": False}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        self._mode = mode or self._mode
        return super().set_search_properties(metric, mode, **spec)

    def rungs(self) -> Rungs:
        self._load()
        return self._rungs

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        saved = read_promotion_state(self._state_file)
        if saved is not None and saved.milestones == self._rungs.milestones:
            self._rungs = saved

    def _save(self) -> None:
        _write_json_atomic(Path(self._state_file), self._rungs.to_dict())

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        if result.get(RUNG_PAUSE):
            return TrialScheduler.PAUSE
        if self._metric in result and self._time_attr in result:
            sign = 1.0 if self._mode == "max" else -1.0
            if self._rungs.record(trial.trial_id, int(result[self._time_attr]),
                                  sign * float(result[self._metric])) is not None:
                self._save()
        return TrialScheduler.CONTINUE

    def choose_trial_to_run(self, tune_controller):
        """Promote the waiting trials that earned it (Tune restarts them once resources allow) and stop those
        that never will; new trials Tune starts by itself. Idempotent, as Tune requires."""
        self.sweep_left_groups()
        self._load()
        trials = [t for t in tune_controller.get_trials() if t.status not in (Trial.TERMINATED, Trial.ERROR)]
        rungs = self._rungs
        waiting = {t.trial_id for t in trials if t.status == Trial.PAUSED and rungs.waiting_at(t.trial_id) is not None}
        moving = {t.trial_id: rungs.target(t.trial_id) for t in trials if t.trial_id not in waiting}
        search_alg = tune_controller.search_alg
        hopeless, chosen = rungs.decide(waiting, moving, exhausted=search_alg is None or search_alg.is_finished())
        by_id = {t.trial_id: t for t in trials}
        for trial_id in hopeless:
            tune_controller.stop_trial(by_id[trial_id])
        if chosen is not None:
            self._save()
            return by_id[chosen]
        # Promoted but not restarted yet (Tune may ask again before it stages the trial).
        return next((t for t in trials if t.status == Trial.PAUSED and t.trial_id not in waiting), None)

    def debug_string(self) -> str:
        self._load()
        return "Promotion ASHA: " + ", ".join(f"rung {m:,}: {len(r)} recorded, {len(p)} promoted" for m, r, p in
                                              zip(self._rungs.milestones, self._rungs.recorded,
                                                  self._rungs.promoted, strict=True))


def read_promotion_state(state_file: str | Path) -> Rungs | None:
    path = Path(state_file)
    return Rungs.from_dict(json.loads(path.read_text())) if path.exists() else None


def _write_json_atomic(path: Path, state: dict) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        json.dump(state, out)
    os.replace(temporary, path)  # whole or not at all: a kill mid-write leaves the previous state
