"""run.trackers with the real libraries: a run trained in this process (tests/inprocess.py) while the driver's
MetricsFollower feeds its trackers, then the MLflow store, the TensorBoard events and the W&B offline run read
back and compared with metrics.jsonl. The same wiring through Ray, and a search's grouped trials:
tests/test_pipeline.py."""

from __future__ import annotations

import json
import sqlite3
import sys

import pytest
from inprocess import train
from tracker_records import (
    expected_points,
    mlflow_points,
    tensorboard_points,
    tensorboard_text,
    wandb_config,
    wandb_run,
)

from rayscale import cli, config
from rayscale.driver.outputs import read_metrics
from rayscale.driver.progress import MetricsFollower
from rayscale.driver.trackers import flat
from rayscale.driver.tracking import (
    Tracking,
    destinations,
    end_cut_off,
    final_files,
    line_position,
    metric_values,
)
from rayscale.files import TRACKING_FILE

SHORT = ("train.epochs=2", "batch.global_batch_size=64", "train.log_every_samples=256",
         "train.eval_every_samples=512")  # mid-epoch validations share their samples_seen with a periodic line
ALL = "run.trackers=[mlflow, tensorboard, wandb]"


def tracked(tmp_path, name, *overrides):
    """What `rayscale train` does with run.trackers, around the in-process run: start them in the run
    directory, follow metrics.jsonl while it trains, finish with the final files (or as failed)."""
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", f"run.name={name}", "scaling.num_workers=1",
                                 *overrides])
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    tracking = Tracking.start(cfg, run_dir, destinations(run_dir))
    try:
        with MetricsFollower(run_dir / "metrics.jsonl", [tracking.log_line]):
            train(tmp_path, name, *overrides)
    except BaseException:
        tracking.finish([], [], "FAILED")
        raise
    tracking.finish(read_metrics(run_dir), final_files(run_dir))
    return cfg, run_dir


def mlflow_run(run_dir):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["trackers"]["mlflow"]["run_id"]
    return client, client.get_run(run_id)


def last_per_step(points):
    """W&B keeps one row per step: two lines at one samples_seen (a validation after a periodic line) merge."""
    return dict(points)


def test_every_line_the_config_and_the_model_reach_mlflow_tensorboard_and_wandb(tmp_path):
    cfg, run_dir = tracked(tmp_path, "tracked", *SHORT, ALL)
    lines = read_metrics(run_dir)
    expected = expected_points(lines)
    assert len(expected["val_loss"]) >= 5 and len(expected["train_loss"]) >= 10
    assert len({samples for samples, _ in expected["val_loss"]}) == len(expected["val_loss"])

    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params == {key: str(value) for key, value in flat(config.to_dict(cfg)).items()}
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["run.trackers"] == str(cfg.run.trackers)
    for name, points in expected.items():  # one point per line carrying it, at its samples_seen, the same value
        assert mlflow_points(client, run.info.run_id, name) == sorted(points), name
    assert "samples_seen" not in run.data.metrics and "started_at" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "model.safetensors", "model.pt", "config.yaml", "summary.json"}
    assert (run_dir / "mlflow-artifacts").is_dir()  # nothing outside the run directory

    scalars = tensorboard_points(run_dir / "tensorboard")
    assert scalars.keys() == expected.keys()
    for name, points in expected.items():  # TensorBoard keeps float32
        assert [step for step, _ in scalars[name]] == [step for step, _ in points], name
        assert [value for _, value in scalars[name]] == pytest.approx([value for _, value in points], rel=1e-6)
    assert "optim:\n      name: sgd\n      lr: 0.1" in tensorboard_text(run_dir / "tensorboard")

    wandb = wandb_run(run_dir)
    (wandb_meta,) = wandb["runs"]
    assert wandb_meta.display_name == "tracked" and wandb_meta.project == "rayscale" and not wandb_meta.run_group
    assert wandb_config(wandb_meta) == config.to_dict(cfg)
    for name, points in expected.items():
        assert last_per_step(wandb["points"][name]) == last_per_step(points), name
    assert {"model.safetensors", "model.pt", "config.yaml", "summary.json"} <= set(wandb["files"])
    saved = next(run_dir.glob("wandb/offline-run-*/files/model.safetensors"))
    assert saved.read_bytes() == (run_dir / "model.safetensors").read_bytes()


def test_a_resumed_run_goes_on_in_the_same_tracker_runs_and_logs_each_line_once(tmp_path):
    """Crashed in epoch 2 and run again: the log is rewritten from the checkpoint and the run writes lines after
    it again. Each tracker goes on in the run it started and only forward: it keeps what the first attempt logged
    and takes the second attempt's lines from there on, each point once."""
    crash = ("model.name=loop_models:crash_once", f"model.kwargs={{after: 30, marker: {tmp_path}/marker}}",
             "batch.micro_batch_size=null", "run.checkpoint_every_seconds=0")
    with pytest.raises(RuntimeError, match="injected crash"):
        tracked(tmp_path, "resumed", *SHORT, *crash, "run.trackers=[mlflow, tensorboard]")
    run_dir = tmp_path / "resumed"
    client, first = mlflow_run(run_dir)
    assert first.info.status == "FAILED"
    seen = read_metrics(run_dir)  # the crashed attempt's lines
    tracked(tmp_path, "resumed", *SHORT, *crash, "run.trackers=[mlflow, tensorboard]")
    client, run = mlflow_run(run_dir)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    final = read_metrics(run_dir)
    rewritten = [line for line in final if line_position(line) <= line_position(seen[-1])]
    assert len(rewritten) < len(seen)  # the lines after the checkpoint were written again, at other points
    expected = expected_points(seen + [line for line in final if line_position(line) > line_position(seen[-1])])
    for name, points in expected.items():
        assert mlflow_points(client, run.info.run_id, name) == sorted(points), name
    scalars = tensorboard_points(run_dir / "tensorboard")
    assert [step for step, _ in scalars["train_loss"]] == [step for step, _ in expected["train_loss"]]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per attempt


def test_a_tracker_that_fails_mid_run_is_dropped_with_a_warning_and_the_run_goes_on(tmp_path, capsys):
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=broken", "scaling.num_workers=1",
                                 *SHORT, "run.trackers=[mlflow, tensorboard]"])
    run_dir = tmp_path / "broken"
    run_dir.mkdir()
    tracking = Tracking.start(cfg, run_dir, destinations(run_dir))
    with sqlite3.connect(run_dir / "mlflow.db") as store:  # the store goes bad under the started run
        store.execute("ALTER TABLE metrics RENAME TO gone")
    with MetricsFollower(run_dir / "metrics.jsonl", [tracking.log_line]):
        trained = train(tmp_path, "broken", *SHORT)
    tracking.finish(read_metrics(run_dir), final_files(run_dir))
    err = capsys.readouterr().err
    assert err.count("[rayscale] warning: run.trackers mlflow failed and is dropped for the rest of this run") == 1
    assert trained.summary["samples_seen"] == 2 * trained.summary["train_rows"]  # trained to the end
    assert (run_dir / "model.safetensors").exists() and (run_dir / "summary.json").exists()
    steps = [step for step, _ in tensorboard_points(run_dir / "tensorboard")["train_loss"]]
    assert steps == [line["samples_seen"] for line in trained.lines if line["train_loss"] is not None]


def test_a_run_cut_off_before_its_trackers_ended_is_caught_up_from_its_files(tmp_path):
    """A trial Tune ends without waiting: its trackers logged the first lines and were never ended. The search's
    driver logs the rest from metrics.jsonl and ends them; a second look starts nothing again."""
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=cut", "run.trackers=[mlflow, tensorboard]"])
    run_dir = tmp_path / "cut"
    run_dir.mkdir()
    lines = [{"samples_seen": 64 * i, "step": i, "train_loss": 1.0 / i} for i in range(1, 5)]
    lines.append({"samples_seen": 256, "evaluation": True, "val_loss": 0.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tracking = Tracking.start(cfg, run_dir, destinations(run_dir))
    for line in lines[:2]:
        tracking.log_line(line)  # and then the process is gone
    end_cut_off(cfg, run_dir, destinations(run_dir), "KILLED")
    client, run = mlflow_run(run_dir)
    assert run.info.status == "KILLED"
    assert mlflow_points(client, run.info.run_id, "train_loss") == [(64 * i, 1.0 / i) for i in range(1, 5)]
    assert mlflow_points(client, run.info.run_id, "val_loss") == [(256, 0.5)]
    assert [step for step, _ in tensorboard_points(run_dir / "tensorboard")["train_loss"]] == [64, 128, 192, 256]
    end_cut_off(cfg, run_dir, destinations(run_dir), "KILLED")
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_a_line_logged_just_before_the_process_ended_unrecorded_is_not_logged_again(tmp_path):
    """A trial's actor ended by Tune between logging a line and recording it in tracking.json: the search's
    driver counts what MLflow and TensorBoard hold, so that line is not logged twice."""
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=cut", "run.trackers=[mlflow, tensorboard]"])
    run_dir = tmp_path / "cut"
    run_dir.mkdir()
    lines = [{"samples_seen": 64 * i, "step": i, "train_loss": 1.0 / i} for i in range(1, 5)]
    lines.append({"samples_seen": 256, "step": 4, "evaluation": True, "val_loss": 0.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tracking = Tracking.start(cfg, run_dir, destinations(run_dir))
    tracking.log_line(lines[0])
    for tracker in tracking.trackers.values():  # the second line reached the trackers, and then the process went
        tracker.log(metric_values(lines[1]), lines[1]["samples_seen"])
    tracking.trackers["tensorboard"].writer.close()
    end_cut_off(cfg, run_dir, destinations(run_dir), "KILLED")
    client, run = mlflow_run(run_dir)
    assert mlflow_points(client, run.info.run_id, "train_loss") == [(64 * i, 1.0 / i) for i in range(1, 5)]
    assert mlflow_points(client, run.info.run_id, "val_loss") == [(256, 0.5)]
    assert [step for step, _ in tensorboard_points(run_dir / "tensorboard")["train_loss"]] == [64, 128, 192, 256]


@pytest.mark.parametrize("line, position, metrics", [
    # a periodic line: its numbers, not the step itself, the wall-clock stamps or nulls
    ({"samples_seen": 256, "step": 4, "train_loss": 2.0, "started_at": 1.7e9, "entered_at": 1.7e9,
      "micro_batch_s": None}, (256, 0), {"step": 4.0, "train_loss": 2.0}),
    # a validation at the same samples_seen comes after it; flags are not metrics
    ({"samples_seen": 256, "evaluation": True, "val_loss": 1.5}, (256, 1), {"val_loss": 1.5}),
    # an epoch end without validation rows is still the last line at its samples_seen
    ({"samples_seen": 300, "epoch_end": True, "evaluation": False, "epoch": 0}, (300, 1), {"epoch": 0.0}),
    # text is skipped (a component's own non-numeric field)
    ({"samples_seen": 512, "note": "x", "lr": 0.1}, (512, 0), {"lr": 0.1}),
])
def test_a_line_becomes_its_numbers_at_its_position(line, position, metrics):
    assert line_position(line) == position and metric_values(line) == metrics


@pytest.mark.parametrize("command, trackers, hidden, message", [
    pytest.param("train", "[mlfow]", None,
                 "run.trackers: expected each to be one of mlflow, tensorboard, wandb, got 'mlfow' (did you mean "
                 "mlflow?)", id="unknown"),
    pytest.param("train", "[tensorboard, wandb]", "wandb",
                 "run.trackers: wandb needs the wandb package, which is not installed (pip install "
                 "'rayscale[wandb]')", id="no-wandb"),
    pytest.param("train", "[mlflow]", "sqlalchemy",
                 "run.trackers: mlflow needs the sqlalchemy package, which is not installed (pip install "
                 "'rayscale[mlflow]')", id="no-sqlalchemy"),
    pytest.param("tune", "[tensorboard]", "tensorboard",
                 "run.trackers: tensorboard needs the tensorboard package, which is not installed (pip install "
                 "'rayscale[tensorboard]')", id="tune-no-tensorboard"),
])
def test_an_unknown_or_missing_tracker_is_a_one_line_error_that_writes_nothing(tmp_path, capsys, monkeypatch,
                                                                             command, trackers, hidden, message):
    if hidden is not None:  # as if not installed: importing it fails, and the import system finds no spec
        monkeypatch.setitem(sys.modules, hidden, None)
    code = cli.main([command, "--set", f"run.output_dir={tmp_path}", f"run.trackers={trackers}"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"rayscale: error: {message}\n"
    assert not any(tmp_path.iterdir())
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
