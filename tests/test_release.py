"""rayscale/tuning/release.py without Ray: when an ended trial's left placement groups are released, that both
search schedulers hear every trial end and sweep on every step of Tune's loop, and that a search hands Tune no
callbacks (the searches themselves: tests/test_tune.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from rayscale import config
from rayscale.driver.prepare import NO_CODE, NO_DATA
from rayscale.tuning import release, search
from rayscale.tuning.asha import PromotingASHA, ResumableASHA


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cluster(monkeypatch):
    """The controllers still running, and the trial directories whose groups were removed, in order."""
    state = SimpleNamespace(running=set(), removed=[])
    monkeypatch.setattr(release, "controllers_of", lambda trial_dir: {f"controller-of-{trial_dir.name}"})
    monkeypatch.setattr(release, "running_controllers", lambda ids: ids & state.running)
    monkeypatch.setattr(release, "remove_placement_groups_left", lambda trial_dir: state.removed.append(trial_dir))
    return state


def test_an_ended_trials_groups_are_released_after_the_delay_once_its_controller_is_gone(cluster, tmp_path):
    clock = Clock()
    left = release.LeftGroups(tmp_path, delay_s=10.0, clock=clock)
    left.trial_ended("a")
    clock.now += 9.9
    left.sweep()
    assert cluster.removed == []  # its controller may still be aborting
    clock.now += 0.2
    cluster.running = {"controller-of-a"}
    left.sweep()
    assert cluster.removed == []  # still running (dying): it could create a group after this sweep
    cluster.running = set()
    left.sweep()
    left.sweep()
    assert cluster.removed == [tmp_path / "a"]  # once, then forgotten


def test_a_trial_that_ends_again_is_timed_from_its_last_end(cluster, tmp_path):
    clock = Clock()
    left = release.LeftGroups(tmp_path, delay_s=10.0, clock=clock)
    left.trial_ended("a")  # an error Tune then retries
    clock.now += 8
    left.trial_ended("a")
    clock.now += 8
    left.sweep()
    assert cluster.removed == []
    clock.now += 2
    left.sweep()
    assert cluster.removed == [tmp_path / "a"]


def _trial(trial_id: str):
    return SimpleNamespace(trial_id=trial_id, config={}, status="RUNNING", evaluated_params={})


@pytest.mark.parametrize("make", [
    lambda tmp, left: ResumableASHA(time_attr="samples_seen", max_t=1000, grace_period=100, reduction_factor=4,
                                    stop_last_trials=False, state_file=tmp / "rungs.json", left_groups=left),
    lambda tmp, left: PromotingASHA(time_attr="samples_seen", milestones=[100], reduction_factor=4,
                                    state_file=tmp / "promotions.json", left_groups=left),
], ids=["asha", "promotion"])
def test_both_schedulers_pass_every_trial_end_on_and_sweep_when_asked_which_trial_to_run(make, tmp_path,
                                                                                      monkeypatch):
    swept = []
    left = release.LeftGroups(tmp_path / "trials")
    monkeypatch.setattr(left, "sweep", lambda: swept.append(sorted(left.ended)))
    scheduler = make(tmp_path, left)
    scheduler.set_search_properties("val_loss", "min")
    controller = SimpleNamespace(get_trials=lambda: [], search_alg=None)
    trials = [_trial(name) for name in ("done", "stopped", "failed")]
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
    scheduler.on_trial_complete(controller, trials[0], {"samples_seen": 1000, "val_loss": 0.5})
    scheduler.on_trial_remove(controller, trials[1])  # stopped while paused at a rung, or pending
    scheduler.on_trial_error(controller, trials[2])
    assert scheduler.choose_trial_to_run(controller) is None  # what its Tune base class chose
    assert swept == [["done", "failed", "stopped"]]


def test_a_searchs_tuner_hands_tune_no_callbacks(tmp_path, monkeypatch):
    """Given any callback, Tune imports the MLflow, W&B, Comet and Aim integrations to tag its usage (1.2-1.5 s
    before the first trial): the search's own hooks are its schedulers' (tuning/release.py)."""
    monkeypatch.setattr(search, "_this_node_resource", lambda: "node:127.0.0.1")
    for variant in ("stopping", "promotion"):
        cfg = config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=s", f"tune.asha_variant={variant}"])
        tuner = search._tuner(cfg, [], {}, tmp_path / variant, grace=100, max_t=1000, concurrency=1,
                              search_alg=None, resume=False, code=NO_CODE, given=NO_DATA, track_to=None)
        internal = tuner._local_tuner
        assert not internal.get_run_config().callbacks
        scheduler = internal._tune_config.scheduler
        assert isinstance(scheduler.left_groups, release.LeftGroups)
        assert scheduler.left_groups.trials_dir == Path(tmp_path / variant / "trials")


def test_a_scheduler_pickled_before_it_had_left_groups_still_runs(tmp_path):
    """A search started by an older rayscale and resumed after an upgrade: Tune unpickles its scheduler without
    calling __init__, so the instance has no left_groups of its own."""
    scheduler = ResumableASHA(time_attr="samples_seen", max_t=1000, grace_period=100, reduction_factor=4,
                              stop_last_trials=False, state_file=tmp_path / "rungs.json")
    del scheduler.__dict__["left_groups"]
    controller = SimpleNamespace(get_trials=lambda: [], search_alg=None)
    trial = _trial("a")
    scheduler.set_search_properties("val_loss", "min")
    scheduler.on_trial_add(controller, trial)
    scheduler.on_trial_error(controller, trial)
    assert scheduler.choose_trial_to_run(controller) is None
