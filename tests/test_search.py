"""rayscale/tuning/search.py's pieces that run inside a trial actor, without Ray (the searches themselves:
tests/test_tune.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.exceptions import RayActorError
from ray.train._internal import session as train_session
from ray.util import queue as ray_queue

from rayscale.tuning import search


class FakeQueue:
    made = 0

    def __init__(self, maxsize, actor_options=None):
        FakeQueue.made += 1
        self.items, self.asked, self.gone = [], 0, False

    def empty(self):
        self.asked += 1
        if self.gone:
            raise RayActorError()
        return not self.items

    def get_nowait(self):
        return self.items.pop(0)


@pytest.fixture
def trial_actor(monkeypatch):
    """A trial actor's process: a session per trial, as Tune makes when it reuses the actor."""
    sessions = []
    monkeypatch.setattr(train_session, "get_session", lambda: sessions[-1])
    monkeypatch.setattr(ray_queue, "Queue", FakeQueue)
    monkeypatch.setattr(search, "_REPORTS", [])
    FakeQueue.made = 0
    return lambda: sessions.append(SimpleNamespace(_inter_actor_queue=None)) or sessions[-1]


def test_a_trial_actors_trials_report_through_one_queue_emptied_before_each(trial_actor):
    first = trial_actor()
    queue = search._reports_queue()
    assert first._inter_actor_queue is queue
    assert queue.asked == 0  # a new queue is not waited for: its actor process is still starting
    queue.items.append({"val_loss": 1.0})  # put by the first trial's controller after Tune stopped that trial
    second = trial_actor()
    assert search._reports_queue() is queue and second._inter_actor_queue is queue
    assert FakeQueue.made == 1 and queue.empty()


def test_a_queue_whose_actor_is_gone_is_replaced(trial_actor):
    trial_actor()
    lost = search._reports_queue()
    lost.gone = True  # its node was lost
    second = trial_actor()
    queue = search._reports_queue()
    assert queue is not lost and second._inter_actor_queue is queue and FakeQueue.made == 2


def test_trains_callback_takes_the_queue_a_session_already_has():
    """What the reuse rests on: Train's Tune callback asks the session for its queue and makes one only if it
    has none."""
    held = object()
    owner = SimpleNamespace(_inter_actor_queue=held)
    assert train_session._TrainSession._get_or_create_inter_actor_queue(owner) is held


def _base_of_a_search(tmp_path, monkeypatch, *overrides: str) -> dict:
    """The base config a search started in tmp_path (on rows.parquet there) makes every trial's config from,
    caught as the search validates its space: nothing starts."""
    from parquet_fixtures import tabular, write

    from rayscale import config
    from rayscale.tuning import space

    for name in ("rows.parquet", "other.parquet"):
        write(tmp_path / name, tabular(0, 300))
    monkeypatch.chdir(tmp_path)
    bases = []

    def validate(base, domains):
        bases.append(base)
        raise RuntimeError("stop before anything starts")

    monkeypatch.setattr(space, "validate", validate)
    cfg = config.load(overrides=["data.source=rows.parquet", f"run.output_dir={tmp_path / 'runs'}", *overrides])
    with pytest.raises(RuntimeError, match="stop before"):
        search.search(cfg)
    return bases[0]


def test_every_trial_is_made_from_a_config_naming_its_data_absolutely(tmp_path, monkeypatch):
    """Tune runs each trial in a working directory of its own: the base config every trial's config is made from
    names a relative data.source by the absolute path it had where the search was started."""
    assert _base_of_a_search(tmp_path, monkeypatch)["data"]["source"] == str(tmp_path / "rows.parquet")


@pytest.mark.parametrize("metric, metric_names, task, message", [
    ("val_los", [], "classification", "tune.metric val_los: no trial reports it; expected one of val_loss, "
                                      "val_accuracy, or a training metric such as train_loss (did you mean val_loss?)"),
    ("val_f2", ["f1"], "classification", "tune.metric val_f2: no trial reports it; expected one of val_loss, "
                                         "val_accuracy, val_f1, or a training metric such as train_loss (did you mean "
                                         "val_f1?)"),
    ("val_accuracy", [], "regression", "tune.metric val_accuracy: no trial reports it; expected one of val_loss, or "
                                       "a training metric such as train_loss"),
    ("val_f1", ["f1"], "regression", None), ("val_accuracy", [], "token_classification", None),
    ("train_loss", [], "classification", None), ("gradient_noise_scale", [], "classification", None),
    ("micro_batch_s", [], "regression", None),
    # any other name was taken unchecked: every trial trained, then Tune's traceback
    ("train_los", [], "classification", "tune.metric train_los: no trial reports it; expected one of val_loss, "
                                        "val_accuracy, or a training metric such as train_loss (did you mean "
                                        "train_loss?)"),
    ("accuracy", [], "classification", "tune.metric accuracy: no trial reports it; expected one of val_loss, "
                                       "val_accuracy, or a training metric such as train_loss (did you mean "
                                       "val_accuracy?)"),
    ("started_at", [], "classification", "tune.metric started_at: no trial reports it; expected one of val_loss, "
                                         "val_accuracy, or a training metric such as train_loss"),
])
def test_a_validation_metric_no_trial_reports_is_refused_before_the_search(metric, metric_names, task, message):
    if message is None:
        search.check_metric_name(metric, metric_names, task)
        return
    with pytest.raises(search.UserError) as info:
        search.check_metric_name(metric, metric_names, task)
    assert str(info.value) == message


def test_paths_a_search_space_chooses_between_are_made_absolute_before_the_trials(tmp_path, monkeypatch):
    base = _base_of_a_search(tmp_path, monkeypatch,
                             "tune.space={data.source: {choice: [rows.parquet, other.parquet, digits]}}")
    assert base["tune"]["space"]["data.source"] == {
        "choice": [str(tmp_path / "rows.parquet"), str(tmp_path / "other.parquet"), "digits"]}


def _started_search(tmp_path, *overrides):
    """A search directory whose search.yaml holds the config of `overrides`; the config dict of the same."""
    import yaml

    from rayscale import config

    base = config.to_dict(config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=s", *overrides]))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "search.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    return tmp_path / "s", base


@pytest.mark.parametrize("changes", [
    pytest.param([], id="the-same"),
    pytest.param(["scaling.num_workers=4", "tune.max_concurrent_trials=1", "run.trackers=[tensorboard]"],
                 id="hardware-and-concurrency"),
])
def test_a_resume_may_change_where_and_on_how_much_it_runs(tmp_path, changes):
    from rayscale import config

    search_dir, _ = _started_search(tmp_path)
    resumed = config.to_dict(config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=s", *changes]))
    search.check_same_search(resumed, search_dir)


@pytest.mark.parametrize("change, key, was, now", [
    ("train.epochs=5", "train.epochs", 1, 5),
    ("tune.metric=val_accuracy", "tune.metric", "val_loss", "val_accuracy"),
    ("tune.space={optim.lr: {grid: [0.1, 0.2]}}", "tune.space", {}, {"optim.lr": {"grid": [0.1, 0.2]}}),
    ("optim.name=adamw", "optim.name", "sgd", "adamw"),
    ("model.kwargs={depth: 3}", "model.kwargs.depth", None, 3),
])
def test_a_resume_with_another_config_is_refused_naming_the_first_key_that_differs(tmp_path, change, key, was, now):
    """Tune keeps the finished trials; the rest would have trained under the new config and been ranked with
    them as one search."""
    from rayscale import config
    from rayscale.errors import UserError

    search_dir, _ = _started_search(tmp_path, "train.epochs=1")
    resumed = config.to_dict(config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=s", "train.epochs=1",
                                                    change]))
    with pytest.raises(UserError) as refused:
        search.check_same_search(resumed, search_dir)
    assert str(refused.value) == (
        f"resume: {key} is {now!r}, but {was!r} in the search's own config ({search_dir / 'search.yaml'}); resume "
        f"with the config it started with, or start a new search with another run.name")


def test_a_resume_from_python_with_a_tuple_in_the_model_kwargs_is_the_same_config(tmp_path):
    """search.yaml holds a list where the resumed config holds the tuple it was given."""

    search_dir, base = _started_search(tmp_path, "model.kwargs={hidden: [8, 4]}")
    base["model"]["kwargs"]["hidden"] = (8, 4)
    search.check_same_search(base, search_dir)


def test_a_key_the_search_yaml_lacks_counts_as_its_default(tmp_path):
    """A search started by an older rayscale, without a key added since, resumes when that key keeps its default
    (and is refused when it does not)."""
    import yaml

    from rayscale import config
    from rayscale.errors import UserError

    search_dir, base = _started_search(tmp_path)
    saved = yaml.safe_load((search_dir / "search.yaml").read_text())
    del saved["optim"]["momentum"]
    (search_dir / "search.yaml").write_text(yaml.safe_dump(saved))
    search.check_same_search(base, search_dir)
    changed = config.to_dict(config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=s", "optim.momentum=0.5"]))
    with pytest.raises(UserError, match=r"^resume: optim.momentum is 0.5, but 0.9 in the search's own config"):
        search.check_same_search(changed, search_dir)


def test_a_resume_whose_search_yaml_is_unreadable_is_refused_in_one_line(tmp_path):
    from rayscale.errors import UserError

    search_dir, base = _started_search(tmp_path)
    (search_dir / "search.yaml").write_text("a: [unclosed\n")
    with pytest.raises(UserError, match=r"^resume: .*search.yaml cannot be read \(ParserError\), so the "):
        search.check_same_search(base, search_dir)
    (search_dir / "search.yaml").write_text("- a list\n")
    with pytest.raises(UserError, match=r"^resume: .*search.yaml cannot be read \(not a mapping of keys\)"):
        search.check_same_search(base, search_dir)
