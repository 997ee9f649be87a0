"""Ray Tune's ASHA, with rungs that survive a killed driver.

Tune's resume (`Tuner.restore`) restores its searcher but rebuilds the scheduler as it was first created: the
rungs forget every result recorded before the kill. A resumed search would then compare the next trials
against none of the trials that finished before it, and let a hopeless one run its whole budget. This
scheduler writes its rungs to a file after every decision and reads them back when a restored search first
uses it. (Ray's own `save`/`restore` methods exist, but nothing in Tune calls them.)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ray.tune.schedulers import AsyncHyperBandScheduler


class ResumableASHA(AsyncHyperBandScheduler):
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
        path = Path(self._state_file)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "w") as out:
            json.dump(state, out)
        os.replace(temporary, path)  # whole or not at all: a kill mid-write leaves the previous rungs

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
