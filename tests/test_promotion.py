"""ASHA by promotion (rayscale/promotion.py, rayscale/asha.py PromotingASHA): pure bookkeeping, no Ray cluster."""

import itertools
import json
import pickle
import random
from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from rayscale.files import PROMOTION_FILE
from rayscale.tuning.asha import PromotingASHA, read_promotion_state
from rayscale.tuning.promotion import RUNG_PAUSE, Rungs, replay_one_at_a_time

MILESTONES = [100, 400, 1600]  # budget 2,700: as the benchmark's 1, 4, 16 of 27 epochs
BUDGET = 2700


def test_a_trial_is_recorded_once_per_rung_in_order():
    rungs = Rungs(MILESTONES, 4)
    assert rungs.record("a", 50, -1.0) is None  # before the first rung
    assert rungs.record("a", 100, -0.9) == 0
    assert rungs.record("a", 200, -0.8) is None  # between rungs: nothing new
    assert rungs.target("a") == 1 and rungs.waiting_at("a") == 0
    rungs.promote("a")
    assert rungs.waiting_at("a") is None and rungs.target("a") == 1
    assert rungs.record("a", 410, -0.5) == 1  # past the milestone (a step that crossed it)
    assert rungs.recorded[1] == {"a": -0.5}


def test_a_nan_metric_ranks_last_at_its_rung():
    rungs = Rungs(MILESTONES, 4)
    rungs.record("bad", 100, float("nan"))
    for i, score in enumerate([-3.0, -2.0, -1.0]):
        rungs.record(f"t{i}", 100, score)
    assert rungs.best(0, settled=True) == ["t2"]
    assert rungs.recorded[0]["bad"] == float("-inf")


@pytest.mark.parametrize("n, settled, expected", [
    (1, False, 0), (3, False, 0), (4, False, 1), (7, False, 1), (8, False, 2), (12, False, 3),
    (0, True, 0), (1, True, 1), (3, True, 1), (12, True, 3),
])
def test_quota_is_a_quarter_rounded_down_and_one_once_settled(n, settled, expected):
    rungs = Rungs(MILESTONES, 4)
    for i in range(n):
        rungs.record(f"t{i}", 100, float(i))
    assert rungs.quota(0, settled) == expected


def test_nothing_is_promoted_from_a_rung_of_one_until_it_is_settled():
    """Ray's stopping ASHA lets the first trial at a rung go on; promotion waits for company."""
    rungs = Rungs(MILESTONES, 4)
    rungs.record("first", 100, -0.5)
    waiting = {"first"}
    assert rungs.to_promote(waiting, rungs.settled({"second": 0}, exhausted=False)) == []
    assert rungs.to_promote(waiting, rungs.settled({}, exhausted=False)) == []  # more trials may come
    assert rungs.to_promote(waiting, rungs.settled({}, exhausted=True)) == ["first"]


def test_settled_rungs_need_the_rung_below_settled_and_done():
    rungs = Rungs(MILESTONES, 4)
    for i in range(4):
        rungs.record(f"t{i}", 100, float(i))  # t3 best
    assert rungs.settled({}, exhausted=True) == [True, False, False]  # t3 not promoted yet: more to come
    rungs.promote("t3")
    assert rungs.settled({"t3": 1}, exhausted=True) == [True, False, False]  # t3 on its way to rung 1
    rungs.record("t3", 400, 3.0)
    assert rungs.settled({}, exhausted=True) == [True, True, False]
    assert rungs.hopeless({"t0", "t1", "t2", "t3"}, rungs.settled({}, exhausted=True)) == ["t0", "t1", "t2"]


def simulate(curves: dict[str, list[tuple[int, float]]], order: list[str]) -> dict[str, int]:
    """One trial at a time over curves of losses (rayscale.tuning.promotion.replay_one_at_a_time takes scores)."""
    scores = {t: [(s, -v) for s, v in c] for t, c in curves.items()}
    return replay_one_at_a_time(scores, order, MILESTONES, 4)


def curve(final: float, early: float) -> list[tuple[int, float]]:
    """Validation every 100 samples from `early` at 100 to `final` at the budget."""
    points = range(100, BUDGET + 1, 100)
    return [(s, early + (final - early) * (s - 100) / (BUDGET - 100)) for s in points]


def test_promotion_trains_the_same_samples_and_keeps_the_winner_in_every_order():
    rng = random.Random(0)
    curves = {f"t{i}": curve(final=rng.uniform(0.1, 1.0), early=rng.uniform(1.0, 2.0)) for i in range(12)}
    curves["winner"] = curve(final=0.05, early=0.9)  # best from the first rung on
    trials = list(curves)
    results = [simulate(curves, rng.sample(trials, len(trials))) for _ in range(50)]
    totals = sorted(sum(r.values()) for r in results)
    # Synchronous successive halving would train 13 trials to rung 0, floor(13/4) = 3 to rung 1 and
    # max(1, floor(3/4)) = 1 on: never less. Promotions decided while trials still arrive may add a trial to a
    # rung (one that led a quarter of the rung at the time), but only one trial ever trains the whole budget.
    halving = 13 * 100 + 3 * 300 + 1200 + 1100
    assert totals[0] == halving and totals[len(totals) // 2] <= 1.1 * halving and totals[-1] < 2 * halving
    assert all(r["winner"] == BUDGET for r in results)
    assert all(sum(v == BUDGET for v in r.values()) == 1 for r in results)


def test_every_hopeless_trial_stops_exactly_at_a_rung():
    curves = {f"t{i}": curve(final=0.1 * (i + 1), early=1.0 + 0.1 * i) for i in range(8)}
    for order in itertools.islice(itertools.permutations(curves), 0, 40, 7):
        trained = simulate(curves, list(order))
        assert all(v in (*MILESTONES, BUDGET) for v in trained.values())
        assert trained["t0"] == BUDGET


# ------------------------------------------------------------------------------------ the Tune scheduler

class FakeController:
    def __init__(self, trials, finished=True):
        self.trials = trials
        self.search_alg = SimpleNamespace(is_finished=lambda: finished)
        self.stopped = []

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        trial.status = Trial.TERMINATED


def fake_trial(trial_id, status=Trial.RUNNING):
    return SimpleNamespace(trial_id=trial_id, status=status)


def scheduler(tmp_path, mode="min"):
    made = PromotingASHA(time_attr="samples_seen", milestones=MILESTONES, reduction_factor=4,
                         state_file=tmp_path / "asha_promotions.json")
    made.set_search_properties("val_loss", mode)
    return made


def test_the_scheduler_pauses_on_the_trials_signal_promotes_the_best_and_stops_the_rest(tmp_path):
    asha = scheduler(tmp_path)
    trials = [fake_trial(f"t{i}") for i in range(4)]
    controller = FakeController(trials)
    for i, trial in enumerate(trials):  # t0 has the lowest loss
        assert asha.on_trial_result(controller, trial, {"samples_seen": 100, "val_loss": 0.5 + i}) == \
            TrialScheduler.CONTINUE
        assert asha.on_trial_result(controller, trial, {"samples_seen": 100, "val_loss": 0.5 + i,
                                                        RUNG_PAUSE: True}) == TrialScheduler.PAUSE
    assert asha.choose_trial_to_run(controller) is None  # none paused yet: nothing to resume
    for trial in trials:
        trial.status = Trial.PAUSED
    assert asha.choose_trial_to_run(controller) is trials[0]
    assert asha.choose_trial_to_run(controller) is trials[0]  # idempotent until Tune restarts it
    assert sorted(controller.stopped) == ["t1", "t2", "t3"]  # rung settled: they never will be promoted
    saved = read_promotion_state(tmp_path / "asha_promotions.json")
    assert saved.promoted[0] == ["t0"] and set(saved.recorded[0]) == {"t0", "t1", "t2", "t3"}


def test_the_scheduler_waits_while_more_trials_can_reach_the_rung(tmp_path):
    asha = scheduler(tmp_path, mode="max")
    first, second = fake_trial("first", Trial.PAUSED), fake_trial("second", Trial.PENDING)
    controller = FakeController([first, second])
    asha.on_trial_result(controller, first, {"samples_seen": 100, "val_loss": 0.9})
    assert asha.choose_trial_to_run(controller) is None and controller.stopped == []
    asha.on_trial_result(controller, second, {"samples_seen": 100, "val_loss": 0.1})  # mode max: worse
    second.status = Trial.PAUSED
    assert asha.choose_trial_to_run(controller) is first
    assert controller.stopped == ["second"]


def test_a_restored_scheduler_reads_its_rungs_back(tmp_path):
    asha = scheduler(tmp_path)
    as_created = pickle.dumps(asha)  # what Tune restores after a killed driver
    trial = fake_trial("a", Trial.PAUSED)
    asha.on_trial_result(FakeController([trial]), trial, {"samples_seen": 100, "val_loss": 0.3})
    restored = pickle.loads(as_created)
    assert restored.rungs().recorded[0] == {"a": -0.3}
    assert restored.choose_trial_to_run(FakeController([trial])) is trial  # alone and settled: promoted


# ------------------------------------------------------------------------------------ the trial function

def test_a_trial_restored_while_waiting_at_its_rung_pauses_again_without_training(tmp_path, monkeypatch):
    """`rayscale tune --resume` restarts a trial Tune had paused; unless it was promoted, it reports its rung's
    result with the pause signal at once and trains nothing."""
    import ray.tune

    from rayscale import config
    from rayscale.files import METRICS_FILE
    from rayscale.launch import trainer
    from rayscale.tuning import search as tune

    base = config.to_dict(config.load())
    rungs = Rungs(MILESTONES, 4)
    rungs.record("t1", 100, -0.7)
    (tmp_path / PROMOTION_FILE).write_text(json.dumps(rungs.to_dict()))
    run_dir = tmp_path / "trials" / "t1"
    run_dir.mkdir(parents=True)
    evaluation = {"samples_seen": 100, "val_loss": 0.7, "evaluation": True}
    (run_dir / METRICS_FILE).write_text(json.dumps({"samples_seen": 50}) + "\n" + json.dumps(evaluation))
    reports = []
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(ray.tune, "report", reports.append)
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("a waiting trial must not train"))
    tune._trial({}, base=base, search_dir=str(tmp_path), metric="val_loss", eval_at_samples=MILESTONES,
                promotion=True)
    assert reports == [{**evaluation, RUNG_PAUSE: True}]

    rungs.promote("t1")  # promoted: it trains on
    (tmp_path / PROMOTION_FILE).write_text(json.dumps(rungs.to_dict()))
    calls = []
    monkeypatch.setattr(trainer, "train", lambda cfg, **k: calls.append(k) or {"epochs": cfg.train.epochs})
    monkeypatch.setattr(tune, "_watch_for_stop", lambda marker: None)
    monkeypatch.setattr(tune, "_trial_callbacks", lambda metric, marker: [])
    tune._trial({}, base=base, search_dir=str(tmp_path), metric="val_loss", eval_at_samples=MILESTONES,
                promotion=True)
    assert calls[0]["pause_at_samples"] == MILESTONES and len(reports) == 1
