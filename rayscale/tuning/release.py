"""A while after a trial ends, the search's driver removes any placement group its Train run still holds
(launch/callbacks.py says how one is left), so that later trials never wait for CPUs that nothing uses
(Ray #54305).

It is a part of the search's schedulers (ReleasesLeftGroups), not a Tune callback: given any callback, Tune tags
its usage with their kinds and imports the MLflow, W&B, Comet and Aim integrations to name them (MLflow and W&B
themselves where installed), 1.2-1.5 s before the first trial starts on the 2-core machine
(benchmarks/trial_gaps.py). The scheduler hears of every end a callback would (a trial completed, stopped
while paused or pending, or failed) and is asked which trial to run on every step of Tune's loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rayscale.launch.callbacks import controllers_of, remove_placement_groups_left, running_controllers

RELEASE_DELAY_S = 10.0  # after a trial ends, before its left placement groups are removed


class LeftGroups:
    """The trials that ended, and when; `sweep` releases what each one's run left once `delay_s` have passed
    (its controller has had time to abort and clean up itself) and none of its controllers still runs (one
    still running, dying, could create a group after the sweep: the next sweep waits for it)."""

    def __init__(self, trials_dir: Path, delay_s: float = RELEASE_DELAY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.trials_dir, self.delay_s, self.clock = Path(trials_dir), delay_s, clock
        self.ended: dict[str, float] = {}

    def trial_ended(self, trial_id: str) -> None:
        self.ended[trial_id] = self.clock()

    def sweep(self) -> None:
        now = self.clock()
        for trial_id, ended in list(self.ended.items()):
            trial_dir = self.trials_dir / trial_id
            if now - ended >= self.delay_s and not running_controllers(controllers_of(trial_dir)):
                remove_placement_groups_left(trial_dir)
                del self.ended[trial_id]


class ReleasesLeftGroups:
    """A Tune scheduler's part (listed before its Tune base class): the trials it hears end go to `left_groups`,
    which is swept whenever Tune asks the scheduler which trial to run (every step of its loop)."""

    # A scheduler pickled by an older rayscale (a search resumed after an upgrade) has none: it released nothing,
    # its Tune callback did.
    left_groups: LeftGroups | None = None

    def __init__(self, *args, left_groups: LeftGroups | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.left_groups = left_groups

    def _ended(self, trial) -> None:
        if self.left_groups is not None:
            self.left_groups.trial_ended(trial.trial_id)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._ended(trial)

    def on_trial_remove(self, tune_controller, trial) -> None:  # stopped while paused or pending
        super().on_trial_remove(tune_controller, trial)
        self._ended(trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        super().on_trial_error(tune_controller, trial)
        self._ended(trial)

    def sweep_left_groups(self) -> None:
        if self.left_groups is not None:
            self.left_groups.sweep()

    def choose_trial_to_run(self, tune_controller):
        """(A scheduler that overrides this calls sweep_left_groups itself.)"""
        self.sweep_left_groups()
        return super().choose_trial_to_run(tune_controller)
