"""`rayscale tune` end to end: small grids, tiny budgets, 1 worker per trial, on the embedded Ray."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import rayscale
from rayscale import cli
from rayscale.driver.outputs import read_metrics
from rayscale.files import GROUPS_FILE
from rayscale.launch.callbacks import remove_placement_groups_left

pytestmark = pytest.mark.slow

RAYSCALE = str(Path(sys.executable).parent / "rayscale")
# Trials one at a time, so ASHA's decisions do not depend on which trial finishes first; grids in the order
# written, so each test knows which trial runs first.
SMALL = ["scaling.num_workers=1", "tune.max_concurrent_trials=1", "data.val_fraction=0.2", "tune.grid_order=listed"]


def args(*overrides):
    out = []
    for item in overrides:
        out += ["--set", item]
    return out


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """A good learning rate first, then two hopeless ones: ASHA must stop both.

    Every trial trains with train.strategy parameter_server (one server actor per trial, sync): Tune over
    the parameter server is the same driver code as over DDP, and this search is also its end-to-end test
    (its stopped trials, the killed search and the resume included).

    The search's driver is SIGKILLed (with its embedded Ray) once the first trial has finished and the second is
    under way; the same command with --resume then finishes it, in this process, whose embedded Ray the other
    tests inspect. Yields the exit code, the search directory and the finished trial's summary.json with its
    mtime at the kill."""
    import ray

    ray.shutdown()
    out = tmp_path_factory.mktemp("tune")
    search_args = args(*SMALL, f"run.output_dir={out}", "run.name=grid", "train.epochs=1",
                       "tune.reduction_factor=2", "tune.num_samples=1", "train.strategy=parameter_server",
                       "tune.space={optim.lr: {grid: [0.3, 0.0003, 0.0001]}}", "run.trackers=[mlflow, tensorboard]")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    trials = out / "grid" / "trials"
    with open(out / "first.log", "w") as log:
        first = subprocess.Popen([RAYSCALE, "tune", *search_args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.time() + 400
        while time.time() < deadline:  # one finished trial and the next one under way
            finished = list(trials.glob("*/summary.json"))
            if finished and len(list(trials.glob("*/config.yaml"))) >= 2:
                break
            assert first.poll() is None, (out / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time: " + (out / "first.log").read_text()[-3000:])
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the embedded Ray with it
        first.wait()
    stamp = finished[0].stat().st_mtime_ns
    time.sleep(2)  # let the killed Ray's sockets close
    code = cli.main(["tune", "--resume", *search_args])
    yield code, out / "grid", (finished[0], stamp)
    ray.shutdown()


def rows(search_dir: Path) -> list[dict]:
    with open(search_dir / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def test_every_trial_reports_and_asha_stops_one_early(search, capsys):
    code, search_dir, _ = search
    assert code == 0
    table = rows(search_dir)
    assert sorted(float(r["optim.lr"]) for r in table) == [0.0001, 0.0003, 0.3]
    assert all(int(r["samples_seen"]) > 0 and r["best_val_loss"] for r in table)
    statuses = [r["status"] for r in table]
    assert "stopped early" in statuses and "completed" in statuses
    status = {float(r["optim.lr"]): r["status"] for r in table}
    assert status[0.0003] == status[0.0001] == "stopped early"  # hopeless: cut at the first rung
    assert status[float(table[0]["optim.lr"])] == "completed"  # the best ran its whole budget
    assert float(table[0]["optim.lr"]) == 0.3  # ranked best first
    stopped = [r for r in table if r["status"] == "stopped early"]
    assert all(int(r["samples_seen"]) < int(table[0]["samples_seen"]) for r in stopped)
    # The only rung (the 1,024-sample warmup, 8 steps of 128) falls inside the one epoch (~1,440 rows): the
    # hopeless trials were validated and cut there, not at the epoch end.
    assert int(table[0]["samples_seen"]) > 1024
    assert all(int(r["samples_seen"]) == 1024 for r in stopped)
    for r in table:
        evaluations = [(m["samples_seen"], bool(m.get("epoch_end"))) for m in
                       map(json.loads, (search_dir / "trials" / r["trial_id"] / "metrics.jsonl").open())
                       if m.get("evaluation")]
        assert evaluations[0] == (int(stopped[0]["samples_seen"]), False)  # same step for every trial
    assert (search_dir / "tune_curves.png").stat().st_size > 0


def test_stopped_trials_give_their_resources_back(search):
    """Ray #54305: a stopped trial's TorchTrainer must not keep its workers' CPUs."""
    import ray

    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


@pytest.fixture
def group_maker():
    """An actor that creates placement groups, as Train's controller does; ended after the test."""
    import ray

    @ray.remote(num_cpus=0)
    class Maker:
        def make(self) -> str:
            from ray.util.placement_group import placement_group

            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready(), timeout=60)
            return group.id.hex()

        def actor_id(self) -> str:
            return ray.get_runtime_context().get_actor_id()

        def make_then_exit(self, delay_s: float, record: str) -> None:
            """In a while, create a group (its ID written to `record`), then end this process."""
            import threading

            def later() -> None:
                time.sleep(delay_s)
                Path(record).write_text(self.make())
                os._exit(0)

            threading.Thread(target=later, daemon=True).start()

    makers = []
    yield lambda: makers.append(Maker.remote()) or makers[-1]
    for maker in makers:
        ray.kill(maker)


def test_placement_groups_a_run_left_are_removed(search, tmp_path, group_maker):
    """What the search does after each trial (remove_placement_groups_left): a placement group that a
    run's worker_groups.jsonl names and that is still held is removed, and so is one that a controller named
    there created without recording it (one dying while it retried did); removed ones, old lines and the
    groups of other controllers are left."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

    def state(pg_id: str) -> str:
        return placement_group_table(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))["state"]

    held = placement_group([{"CPU": 0.01}])
    ray.get(held.ready(), timeout=60)
    controller, other = group_maker(), group_maker()
    recorded, unrecorded, others = (ray.get(maker.make.remote(), timeout=60) for maker in (controller, controller,
                                                                                          other))
    controller_id = ray.get(controller.actor_id.remote(), timeout=60)
    ray.kill(controller)  # its groups stay held: a placement group lives as long as its job, not its creator
    assert state(unrecorded) == "CREATED"
    lines = [{"started_at": 0.0}, {"started_at": 1.0, "placement_group": held.id.hex()},
             {"started_at": 2.0, "placement_group": recorded, "controller": controller_id}]
    (tmp_path / GROUPS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert remove_placement_groups_left(tmp_path) == 3
    assert [state(pg_id) for pg_id in (held.id.hex(), recorded, unrecorded)] == ["REMOVED"] * 3
    assert state(others) == "CREATED"
    assert remove_placement_groups_left(tmp_path) == 0


def test_the_sweep_waits_for_a_controller_still_running_and_removes_the_group_it_created_last(
        search, tmp_path, group_maker):
    """A stopped trial's controller, killed while it retried, created a group 0.2 s after the GCS had marked it
    dead, and a sweep right after the search had ended missed it: with `wait_s`, the sweep first waits until
    every controller named in worker_groups.jsonl has no process left, then removes what it created."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    from rayscale.launch.callbacks import running_controllers

    controller = group_maker()
    controller_id = ray.get(controller.actor_id.remote(), timeout=60)
    (tmp_path / GROUPS_FILE).write_text(json.dumps({"started_at": 0.0, "controller": controller_id}) + "\n")
    assert running_controllers({controller_id, "ab" * 16}) == {controller_id}  # an unknown actor is not running
    record = tmp_path / "created"
    controller.make_then_exit.remote(2.0, str(record))
    assert remove_placement_groups_left(tmp_path, wait_s=120) == 1
    assert not running_controllers({controller_id})
    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(record.read_text())))
    assert placement_group_table(group)["state"] == "REMOVED"


def test_every_trial_names_its_placement_group(search):
    _, search_dir, _ = search
    for trial in (search_dir / "trials").iterdir():
        lines = [json.loads(line) for line in (trial / GROUPS_FILE).read_text().splitlines()]
        assert lines and all(len(line["placement_group"]) > 0 and len(line["controller"]) > 0 for line in lines)


def test_best_config_trains_as_it_is_and_reproduces_the_trial(search, tmp_path):
    _, search_dir, _ = search
    best = yaml.safe_load((search_dir / "best_config.yaml").read_text())
    assert best["train"]["strategy"] == "parameter_server"
    best["run"]["output_dir"] = str(tmp_path)  # written for the search's output dir; keep this test's apart
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(best))
    assert cli.main(["train", "-c", str(tmp_path / "best.yaml")]) == 0
    summary = json.loads((tmp_path / best["run"]["name"] / "summary.json").read_text())
    trial = rows(search_dir)[0]
    assert summary["final"]["val_loss"] == pytest.approx(float(trial["last_val_loss"]), rel=1e-9)


@pytest.mark.parametrize("overrides, message", [
    pytest.param(["tune.space={optim.lr: {uniform: [1]}}"], "tune.space.optim.lr: uniform expects [low, high]",
                 id="one-bound"),
    pytest.param(["tune.space={optim.lrr: {choice: [0.1]}}"], "unknown config key optim.lrr (did you mean optim.lr?)",
                 id="unknown-key"),
    pytest.param(["tune.space={batch.global_batch_size: {choice: [33]}}"], "not divisible by 2 workers",
                 id="indivisible-batch"),
    pytest.param(["tune.metric=val_loss", "data.val_fraction=0"], "tune.metric val_loss: there is no validation",
                 id="no-validation"),
    # Local mode has no Train worker group to report a trial to Tune: every trial failed, and the search exited 0.
    pytest.param(["scaling.num_workers=0"], "scaling.num_workers: 0 (local mode) cannot train a search's trials",
                 id="local-mode"),
    pytest.param(["tune.space={scaling.num_workers: {choice: [1, 0]}}"],
                 "tune.space.scaling.num_workers: scaling.num_workers=0 is not usable: scaling.num_workers: 0 "
                 "(local mode)", id="local-mode-sampled"),
])
def test_bad_search_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, overrides, message):
    code = cli.main(["tune", *args(f"run.output_dir={tmp_path}", *overrides)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("statuses, code", [(["error", "error"], 1), (["error", "completed"], 0),
                                             (["stopped early", "completed"], 0)])
def test_a_search_whose_every_trial_failed_exits_1_in_one_line(tmp_path, capsys, monkeypatch, statuses, code):
    """The search ran, so it is not bad input (2); but with no trial trained to a result there is nothing to rank,
    and a script running `rayscale tune` must not take it for a finished search."""
    from rayscale import api
    from rayscale.tuning import search

    trials = [{"trial_id": f"t{i}", "status": status} for i, status in enumerate(statuses)]
    monkeypatch.setattr(search, "search", lambda *a, **k: trials)
    overrides = [f"run.output_dir={tmp_path}", "run.name=search"]
    assert cli.main(["tune", *args(*overrides)]) == code
    err = capsys.readouterr().err
    if code:
        assert err.count("\n") == 1 and err.startswith("rayscale: error: every trial of the search failed (2 of 2)")
        assert str(tmp_path / "search" / "trials.csv") in err
        with pytest.raises(rayscale.SearchFailed) as raised:  # from Python too: a script gets no best trial
            api.tune(overrides=overrides)
        assert raised.value.trials == trials and raised.value.search_dir == tmp_path / "search"
    else:
        assert err == "" and api.tune(overrides=overrides).best == trials[0]


def test_missing_optional_searcher_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("ray")
    try:
        import optuna  # noqa: F401
        pytest.skip("optuna is installed here")
    except ImportError:
        pass
    assert cli.main(["tune", *args(f"run.output_dir={tmp_path}", "tune.search=optuna")]) == 2
    assert "tune.search optuna: the optuna package is not installed" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    assert cli.main(["tune", "--resume", *args(f"run.output_dir={tmp_path}")]) == 2
    assert "--resume: no search to resume" in capsys.readouterr().err
    with pytest.raises(rayscale.UserError, match="^resume: no search to resume"):  # the parameter's name
        rayscale.tune(overrides=[pair for pair in args(f"run.output_dir={tmp_path}") if pair != "--set"],
                      resume=True)


def test_a_resume_with_nothing_to_resume_is_refused_before_a_given_dataset_runs(tmp_path, monkeypatch):
    """rayscale.tune(train_data=<Dataset>): a Dataset runs once for the whole search, which can take long; a
    search that cannot start (nothing to resume, a search already there, no run.output_dir) is refused before
    that."""
    from rayscale import api
    from rayscale.launch import user_data

    def dataset_given(cfg, train_data, val_data):
        return cfg, {"train_data": train_data}

    def ran(*args, **kwargs):
        raise AssertionError("the Dataset ran before the resume was checked")

    monkeypatch.setattr(api, "with_data", dataset_given)
    monkeypatch.setattr(user_data, "dataset_sources", ran)
    overrides = [pair for pair in args(f"run.output_dir={tmp_path}") if pair != "--set"]
    with pytest.raises(rayscale.UserError, match="^resume: no search to resume"):
        rayscale.tune(overrides=overrides, resume=True, train_data=object())
    (tmp_path / "default" / "tune").mkdir(parents=True)  # and a new search where one is
    with pytest.raises(rayscale.UserError, match="already holds a search; pass resume=True"):
        rayscale.tune(overrides=overrides, train_data=object())
    with pytest.raises(rayscale.UserError, match="^run.output_dir: expected a directory path, got an empty one"):
        rayscale.tune(overrides=["run.output_dir="], resume=True, train_data=object())


def test_a_resume_with_another_training_config_is_refused_and_changes_nothing(search, capsys):
    """The finished search's own config with one training key changed: Tune would have kept the finished trials
    and ranked them with trials trained under the new config."""
    _, search_dir, _ = search
    before = {p: p.read_bytes() for p in (search_dir / "trials.csv", search_dir / "best_config.yaml")}
    capsys.readouterr()
    assert cli.main(["tune", "--resume", "-c", str(search_dir / "search.yaml"), "--set", "train.epochs=2"]) == 2
    assert capsys.readouterr().err == (f"rayscale: error: --resume: train.epochs is 2, but 1 in the search's own "
                                       f"config ({search_dir / 'search.yaml'}); resume with the config it started "
                                       f"with, or start a new search with another run.name\n")
    assert {p: p.read_bytes() for p in before} == before


def test_killed_search_resumes_without_rerunning_finished_trials_or_exceeding_its_concurrency(search):
    code, search_dir, (finished_summary, stamp) = search
    assert code == 0
    assert finished_summary.stat().st_mtime_ns == stamp  # the trial finished before the kill was not run again
    assert len(rows(search_dir)) == 3
    # tune.max_concurrent_trials=1 holds across the resume: no two trials ever trained at the same time.
    spans = []
    for trial in (search_dir / "trials").iterdir():
        lines = read_metrics(trial)
        assert lines, trial
        spans.append((min(r["started_at"] for r in lines), max(r["started_at"] + r["time"] for r in lines)))
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False)), spans


def test_every_trial_has_one_tracker_run_under_the_search_across_the_kill_and_the_resume(search):
    """run.trackers: one MLflow run per trial in the search's store and experiment, nested under the search's
    own run (continued by --resume, as the killed trial's is), each holding its trial's lines once; TensorBoard
    event files in each trial's directory."""
    from mlflow import MlflowClient
    from tracker_records import expected_points, mlflow_points

    _, search_dir, _ = search
    client = MlflowClient(f"sqlite:///{search_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    (parent,) = [run for run in runs if run.info.run_name == "grid"]
    trials = {run.info.run_name: run for run in runs if run is not parent}
    assert trials.keys() == {r["trial_id"] for r in rows(search_dir)} and parent.info.status == "FINISHED"
    status = {r["trial_id"]: r["status"] for r in rows(search_dir)}
    for trial_id, run in trials.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        lines = read_metrics(search_dir / "trials" / trial_id)
        points = mlflow_points(client, run.info.run_id, "val_loss")
        assert [step for step, _ in points] == [step for step, _ in expected_points(lines)["val_loss"]], trial_id
        # A stopped trial's Train run is aborted (its trackers end FAILED), or Tune ends its process first, and
        # the search's driver ends them (KILLED) with any line they missed.
        assert run.info.status in (("FINISHED",) if status[trial_id] == "completed" else ("FAILED", "KILLED"))
        assert list((search_dir / "trials" / trial_id / "tensorboard").glob("events.out.tfevents.*"))
