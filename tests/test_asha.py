"""ASHA's rungs survive a killed search driver (rayscale/asha.py): no Ray cluster needed."""

import pickle
from types import SimpleNamespace

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from rayscale.tuning.asha import ResumableASHA

SETTINGS = {"time_attr": "samples_seen", "max_t": 4000, "grace_period": 1000, "reduction_factor": 2,
            "stop_last_trials": False}


def _scheduler(cls, **extra):
    scheduler = cls(**SETTINGS, **extra)
    scheduler.set_search_properties("val_loss", "min")
    return scheduler


def _result(scheduler, trial_id, samples, loss):
    trial = SimpleNamespace(trial_id=trial_id)
    if trial_id not in scheduler._trial_info:
        scheduler.on_trial_add(None, trial)
    return scheduler.on_trial_result(None, trial, {"samples_seen": samples, "val_loss": loss})


def test_a_restored_scheduler_remembers_the_rungs_recorded_before_the_kill(tmp_path):
    state = tmp_path / "asha_rungs.json"
    scheduler = _scheduler(ResumableASHA, state_file=state)
    as_created = pickle.dumps(scheduler)  # what Tune's tuner.pkl holds, and restores after a kill
    assert _result(scheduler, "good", 1000, 0.5) == TrialScheduler.CONTINUE
    assert _result(scheduler, "good", 4000, 0.2) == TrialScheduler.CONTINUE  # finished before the kill
    assert state.exists()

    restored = pickle.loads(as_created)
    assert _result(restored, "hopeless", 1000, 2.3) == TrialScheduler.STOP  # compared with "good"
    assert restored.rungs()[0][-1] == {"good": -0.5, "hopeless": -2.3}  # lowest rung last, metric signed
    # A copy pickled earlier (Tune may save the tuner again mid-search) still reads the latest rungs.
    earlier = pickle.dumps(restored)
    _result(restored, "third", 1000, 0.1)
    copy = pickle.loads(earlier)
    assert _result(copy, "fourth", 1000, 0.3) == TrialScheduler.CONTINUE  # against good, hopeless, third
    assert set(copy.rungs()[0][-1]) == {"good", "hopeless", "third", "fourth"}


def test_ray_s_own_asha_forgets_them_which_is_why_it_is_replaced():
    scheduler = _scheduler(AsyncHyperBandScheduler)
    as_created = pickle.dumps(scheduler)
    _result(scheduler, "good", 1000, 0.5)
    assert _result(pickle.loads(as_created), "hopeless", 1000, 2.3) == TrialScheduler.CONTINUE


def test_rungs_from_another_budget_are_not_mixed_in(tmp_path):
    state = tmp_path / "asha_rungs.json"
    _result(_scheduler(ResumableASHA, state_file=state), "good", 1000, 0.5)
    other = ResumableASHA(**{**SETTINGS, "grace_period": 500}, state_file=state)  # rungs at 500, 1000, 2000
    other.set_search_properties("val_loss", "min")
    # 1000 is a rung of both: kept; the new rungs at 500 and 2000 start empty.
    assert _result(other, "hopeless", 500, 2.3) == TrialScheduler.CONTINUE
    assert _result(other, "hopeless", 1000, 2.3) == TrialScheduler.STOP


def test_a_trial_that_trained_its_whole_budget_is_never_stopped_at_a_rung_there(tmp_path):
    """grace equal to the budget: Ray's ASHA has its one rung at max_t, where it would stop a worse trial at its
    last report, while the trial writes its outputs. Ray's own scheduler does; ours lets it finish."""
    settings = {**SETTINGS, "grace_period": SETTINGS["max_t"]}
    ours = ResumableASHA(**settings, state_file=tmp_path / "asha_rungs.json")
    ours.set_search_properties("val_loss", "min")
    rays = AsyncHyperBandScheduler(**settings)
    rays.set_search_properties("val_loss", "min")
    for scheduler in (ours, rays):
        assert _result(scheduler, "good", 4000, 0.2) == TrialScheduler.CONTINUE
    assert _result(rays, "worse", 4000, 0.9) == TrialScheduler.STOP
    assert _result(ours, "worse", 4000, 0.9) == TrialScheduler.CONTINUE
    assert _result(ours, "worse", 1000, 0.9) == TrialScheduler.CONTINUE  # below the rung: nothing to decide
