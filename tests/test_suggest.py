"""`rayscale suggest`: the goodput model (pure math), the command on hand-written run directories, its bad
input, and once end to end after a local-mode training run."""

import json
from pathlib import Path

import pytest
import yaml

from rayscale import cli, config
from rayscale.math import goodput
from rayscale.math.batching import plan_batches
from rayscale.math.noise_scale import efficiency
from rayscale.math.schedules import scaled_lr
from rayscale.tools import suggest


def model(*, micro=0.010, sync=0.012, update=0.002, data=0.0, other=0.0, batch=128, micro_batch=32, workers=2,
          measured=True) -> goodput.StepModel:
    return goodput.StepModel(batch, micro_batch, workers, micro, comm_s=sync - micro, update_s=update,
                             data_s_per_sample=data, other_s=other, micro_batch_measured=measured)


# ------------------------------------------------------------------------------------------ the model

@pytest.mark.parametrize("batch, expected", [
    pytest.param(512, (32, 8), id="a multiple of workers x micro-batch: more micro-batches"),
    pytest.param(64, (32, 1), id="one micro-batch per worker"),
    pytest.param(32, (16, 1), id="below workers x micro-batch: the micro-batch shrinks to B/N"),
    pytest.param(96, (24, 2), id="48 per worker: the largest divisor of 48 up to 32"),
])
def test_plan_derives_micro_batch_and_accumulation_as_train_would(batch, expected):
    assert model().plan(batch) == expected
    micro, accumulation = expected
    assert plan_batches(batch, micro, 2).accumulation_steps == accumulation  # a plan train accepts


def test_step_time_is_k_minus_one_micro_batches_plus_the_synced_one_plus_the_update():
    step = model(micro=0.010, sync=0.015, update=0.003)
    assert step.step_s(512) == pytest.approx(7 * 0.010 + 0.015 + 0.003)  # k = 512 / (2 x 32) = 8
    assert step.step_s(64) == pytest.approx(0.015 + 0.003)
    # Below N x b only the compute shrinks (16 of 32 samples); the all-reduce wait does not.
    assert step.step_s(32) == pytest.approx(0.010 * 0.5 + 0.005 + 0.003)


def test_data_wait_grows_with_the_batch_and_other_time_is_per_step():
    step = model(micro=0.010, sync=0.010, update=0.0, data=1e-4, other=0.004)
    assert step.step_s(128) == pytest.approx(2 * 0.010 + 128 * 1e-4 + 0.004)
    assert step.step_s(256) == pytest.approx(4 * 0.010 + 256 * 1e-4 + 0.004)


def test_calibration_reproduces_the_measured_throughput_at_the_run_batch():
    fitted = goodput.calibrate(128, 32, 2, samples_per_sec=4000.0, data_wait_fraction=0.1, micro_batch_s=0.008,
                               sync_micro_batch_s=0.012, update_s=0.002)
    assert fitted.samples_per_sec(128) == pytest.approx(4000.0)
    assert fitted.data_s_per_sample == pytest.approx(0.1 * 0.032 / 128)  # a tenth of the 32 ms step
    assert fitted.other_s == pytest.approx(0.032 - 0.0032 - 0.022)
    assert fitted.comm_s == pytest.approx(0.004)


def test_without_a_no_sync_micro_batch_each_micro_batch_costs_a_synced_one():
    fitted = goodput.calibrate(64, 32, 2, samples_per_sec=3000.0, data_wait_fraction=0.0, micro_batch_s=None,
                               sync_micro_batch_s=0.015, update_s=0.002)
    assert not fitted.micro_batch_measured
    assert (fitted.micro_batch_s, fitted.comm_s) == (0.015, 0.0)
    assert fitted.step_s(256) - fitted.step_s(64) == pytest.approx(3 * 0.015)


def test_when_the_sync_and_update_dominate_larger_batches_have_more_throughput():
    step = model(micro=0.001, sync=0.050, update=0.020)
    throughput = [step.samples_per_sec(batch) for batch in (16, 64, 256, 1024, 4096)]
    assert throughput == sorted(throughput) and throughput[-1] > 10 * throughput[1]


def test_with_a_tiny_noise_scale_small_batches_win_and_with_a_large_one_large_batches_win():
    step = model(micro=0.002, sync=0.004, update=0.002)
    batches = goodput.candidate_batches(128, 2)
    assert goodput.best(goodput.predict(step, batches, noise_scale=0.5)).global_batch_size == batches[0]
    assert goodput.best(goodput.predict(step, batches, noise_scale=1e6)).global_batch_size == batches[-1]


def test_best_is_the_goodput_argmax_not_the_throughput_argmax():
    step = model(micro=0.002, sync=0.010, update=0.004)
    rows = goodput.predict(step, goodput.candidate_batches(128, 2), noise_scale=200.0)
    top = goodput.best(rows)
    assert top.goodput == max(row.goodput for row in rows)
    assert top.global_batch_size < max(rows, key=lambda row: row.samples_per_sec).global_batch_size
    for row in rows:
        assert row.efficiency == pytest.approx(efficiency(200.0, row.global_batch_size, 128))
        assert row.goodput == pytest.approx(row.samples_per_sec * row.efficiency)


@pytest.mark.parametrize("batch, workers, max_batch, expected", [
    pytest.param(128, 2, None, [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192], id="1/8 to 64x"),
    pytest.param(128, 2, 512, [16, 32, 64, 128, 256, 512], id="--max-batch caps"),
    pytest.param(96, 3, 192, [12, 24, 48, 96, 192], id="every one a multiple of the workers"),
    pytest.param(6, 2, 12, [6, 12], id="3 is not a multiple of 2 workers, 1.5 not a batch"),
])
def test_candidates(batch, workers, max_batch, expected):
    assert goodput.candidate_batches(batch, workers, max_batch) == expected


@pytest.mark.parametrize("rule, base, batch, lr, sets", [
    pytest.param("linear", 64, 512, 0.8, [], id="linear from base 64: the config already scales it"),
    pytest.param("sqrt", 64, 256, 0.2, [], id="sqrt: 4x the base, 2x the lr"),
    pytest.param("linear", None, 512, 0.4, ["optim.base_batch_size=128"], id="no base: pin the run's batch"),
    pytest.param("none", None, 512, 0.4, ["optim.lr=0.4"], id="no rule: linear shown and set as optim.lr"),
    pytest.param("none", None, 128, 0.1, [], id="the run's own batch keeps its lr"),
])
def test_lr_follows_the_runs_scaling_rule(rule, base, batch, lr, sets):
    cfg = config.load(overrides=[f"optim.scaling_rule={rule}", f"optim.base_batch_size={base or 'null'}",
                                 "optim.lr=0.1"])
    assert suggest.lr_at(cfg, batch) == (pytest.approx(lr), sets)


# ---------------------------------------------------------------------------------- the command, by hand

def metrics_line(samples: int, *, noise=400.0, micro=0.002, sync=0.020, update=0.010, per_sec=3000.0,
                 **extra) -> dict:
    return {"step": samples // 128, "epoch": 0, "samples_seen": samples, "train_loss": 1.0,
            "samples_per_sec": per_sec, "data_wait_fraction": 0.02, "gradient_noise_scale": noise,
            "batch_efficiency": 0.5 if noise is not None else None, "micro_batch_s": micro,
            "sync_micro_batch_s": sync, "update_s": update, **extra}


def write_run(directory: Path, lines: list[dict] | None = None, *overrides: str) -> Path:
    directory.mkdir(parents=True)
    cfg = config.load(overrides=["run.name=hand", *overrides])
    (directory / "config.yaml").write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
    if lines is None:  # a start-up interval, then a steady state
        lines = [metrics_line(2048, per_sec=500.0, sync=0.5)] + [metrics_line(2048 * i) for i in range(2, 8)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def test_suggest_prints_the_table_writes_its_files_and_recommends_the_models_argmax(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    assert cli.main(["suggest", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "<- current" in out and "<- recommended" in out and "goodput" in out
    written = json.loads((run_dir / "suggest.json").read_text())
    assert (run_dir / "suggest.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(run_dir.glob(".*tmp*"))  # no temporary file left behind

    # The same model by hand: the skipped start-up line does not count, the steady lines do.
    fitted = goodput.calibrate(128, 32, 2, samples_per_sec=3000.0, data_wait_fraction=0.02, micro_batch_s=0.002,
                               sync_micro_batch_s=0.020, update_s=0.010)
    expected = goodput.best(goodput.predict(fitted, goodput.candidate_batches(128, 2), 400.0))
    assert written["recommended"] == expected.global_batch_size != 128  # a sync-bound run, a noisy gradient
    assert written["inputs"]["samples_per_sec"] == 3000.0 and written["inputs"]["noise_scale"] == 400.0
    row = next(r for r in written["candidates"] if r["global_batch_size"] == 128)
    assert row["samples_per_sec"] == pytest.approx(3000.0) and row["efficiency"] == 1.0

    # The printed command is a config train accepts, with the recommended batch and the table's lr.
    command = next(line for line in out.splitlines() if line.startswith("suggested: rayscale train"))
    cfg = config.load(run_dir / "config.yaml", [part.strip() for part in command.split("--set ")[1:]])
    plan = plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    assert (plan.global_batch_size, plan.micro_batch_size) == (expected.global_batch_size, 32)
    assert cfg.run.name != "hand"  # the same name would resume the finished run
    lr = next(r["lr"] for r in written["candidates"] if r["global_batch_size"] == expected.global_batch_size)
    assert scaled_lr(cfg.optim.lr, cfg.batch.global_batch_size, cfg.optim.base_batch_size,
                     cfg.optim.scaling_rule) == pytest.approx(lr)


def test_a_tiny_noise_scale_recommends_the_smallest_batch_and_plot_and_max_batch_are_honoured(tmp_path, capsys):
    lines = [metrics_line(2048 * i, noise=0.1, sync=0.0025, update=0.0002, per_sec=5000.0) for i in range(1, 6)]
    run_dir = write_run(tmp_path / "run", lines, "batch.global_batch_size=16", "batch.micro_batch_size=8")
    plot = tmp_path / "elsewhere.png"
    assert cli.main(["suggest", str(run_dir), "--plot", str(plot), "--max-batch", "64"]) == 0
    out = capsys.readouterr().out
    written = json.loads((run_dir / "suggest.json").read_text())
    assert [r["global_batch_size"] for r in written["candidates"]] == [2, 4, 8, 16, 32, 64]
    assert written["recommended"] == 2
    assert "--set batch.global_batch_size=2 --set batch.micro_batch_size=1" in out  # 1 sample per worker
    assert plot.is_file() and not (run_dir / "suggest.png").exists()


def test_a_run_without_no_sync_micro_batches_says_its_estimate_is_conservative(tmp_path, capsys):
    lines = [metrics_line(2048 * i, micro=None) for i in range(1, 6)]
    run_dir = write_run(tmp_path / "run", lines, "batch.micro_batch_size=null")
    assert cli.main(["suggest", str(run_dir)]) == 0
    assert "conservative" in capsys.readouterr().out
    assert json.loads((run_dir / "suggest.json").read_text())["model"]["micro_batch_measured"] is False


def test_candidates_stop_at_the_runs_training_rows(tmp_path):
    run_dir = write_run(tmp_path / "run")
    (run_dir / "summary.json").write_text(json.dumps({"train_rows": 1450}))
    result = suggest.suggest(run_dir)
    assert max(row.global_batch_size for row in result.rows) == 1024


# ------------------------------------------------------------------------------------------ bad input

def _no_timings(tmp_path):
    old = [{k: v for k, v in metrics_line(2048 * i).items() if k not in suggest.TIMING_KEYS} for i in (1, 2)]
    return [str(write_run(tmp_path / "run", old))], "older rayscale"


BAD = {
    "missing run dir": lambda tmp_path: ([str(tmp_path / "nope")], "does not exist"),
    "run dir is a file": lambda tmp_path: ([str(_file(tmp_path / "run.txt"))], "run.txt is a file; expected the "
                                                                                 "directory rayscale train wrote"),
    "no config.yaml": lambda tmp_path: ([str(_without(write_run(tmp_path / "run"), "config.yaml"))],
                                        "config.yaml does not exist"),
    "no metrics.jsonl": lambda tmp_path: ([str(_without(write_run(tmp_path / "run"), "metrics.jsonl"))],
                                          "metrics.jsonl does not exist"),
    "noise scale off": lambda tmp_path: (
        [str(write_run(tmp_path / "run", [metrics_line(2048, noise=None)], "train.noise_scale=false"))],
        "train.noise_scale was false"),
    "one worker, one micro-batch": lambda tmp_path: (
        [str(write_run(tmp_path / "run", [metrics_line(2048, noise=None, micro=None)], "scaling.num_workers=1",
                       "batch.micro_batch_size=null"))], "batch.micro_batch_size below"),
    "no timing keys": _no_timings,
    "max batch below the smallest candidate": lambda tmp_path: (
        [str(write_run(tmp_path / "run")), "--max-batch", "8"], "below the smallest candidate 16"),
    "plot directory missing": lambda tmp_path: (
        [str(write_run(tmp_path / "run")), "--plot", str(tmp_path / "no" / "x.png")], "--plot: cannot write"),
    "plot where nothing can be written": lambda tmp_path: (
        [str(write_run(tmp_path / "run")), "--plot", "/proc/x.png"], "--plot: cannot write /proc/x.png"),
    # Figures suggest computes from: a string gave a TypeError traceback, a NaN a recommendation.
    "a noise scale that is not a number": lambda tmp_path: (
        [str(write_run(tmp_path / "run", [metrics_line(2048), metrics_line(4096, noise="big")]))],
        "metrics.jsonl line 2: gradient_noise_scale is 'big'; expected a finite number (or none)"),
    "a noise scale of NaN": lambda tmp_path: (
        [str(write_run(tmp_path / "run", [metrics_line(2048, noise=float("nan"))]))],
        "metrics.jsonl line 1: gradient_noise_scale is nan; expected a finite number"),
    "a throughput of true": lambda tmp_path: (
        [str(write_run(tmp_path / "run", [metrics_line(2048, per_sec=True)]))],
        "metrics.jsonl line 1: samples_per_sec is True; expected a finite number"),
    "a negative throughput": lambda tmp_path: (
        [str(write_run(tmp_path / "run", [metrics_line(2048, per_sec=-3)]))],
        "metrics.jsonl line 1: samples_per_sec is -3; expected a number of at least 0"),
    # The run's own files: suggest.png written over its metrics.jsonl left a run suggest could not read again.
    "plot over the run's metrics": lambda tmp_path: (
        [str(write_run(tmp_path / "run")), "--plot", str(tmp_path / "run" / "metrics.jsonl")],
        "--plot: " + f"{tmp_path / 'run' / 'metrics.jsonl'} would replace the run's metrics.jsonl; expected another"),
    "plot over the run's config": lambda tmp_path: (
        [str(write_run(tmp_path / "run")), "--plot", str(tmp_path / "run") + "/./config.yaml"],
        "would replace the run's config.yaml"),
    "plot over suggest's own json": lambda tmp_path: (
        [str(write_run(tmp_path / "run")), "--plot", str(tmp_path / "run" / "suggest.json")],
        "would replace the run's suggest.json"),
    "a key the run's config does not know": lambda tmp_path: (
        [str(_with_line(write_run(tmp_path / "run"), "config.yaml", "bogus: 1\n"))],
        f"{tmp_path / 'run' / 'config.yaml'}: unknown config key bogus"),
    "plot is empty": lambda tmp_path: ([str(write_run(tmp_path / "run")), "--plot", ""],
                                       "--plot: expected the path of a file to write, got an empty one"),
    "the default plot is a directory": lambda tmp_path: (
        [str(_with_dir(write_run(tmp_path / "run"), "suggest.png"))], "RUN_DIR: " + f"{tmp_path / 'run' / 'suggest.png'} "
                                                                      "is a directory"),
    "plot is a directory": lambda tmp_path: (
        [str(write_run(tmp_path / "run")), "--plot", str(tmp_path)], "--plot: " + f"{tmp_path} is a directory"),
}


def _with_line(run_dir: Path, name: str, line: str) -> Path:
    with open(run_dir / name, "a") as handle:
        handle.write(line)
    return run_dir


def _with_dir(run_dir: Path, name: str) -> Path:
    (run_dir / name).mkdir()
    return run_dir


def _file(path: Path) -> Path:
    path.write_text("not a run\n")
    return path


def _without(run_dir: Path, name: str) -> Path:
    (run_dir / name).unlink()
    return run_dir


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    argv, expected = BAD[case](tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(["suggest", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("rayscale: error: ") and captured.err.count("\n") == 1, captured.err
    assert expected in captured.err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------------------ end to end

def test_suggest_after_a_training_run(tmp_path, capsys):
    """On a real run directory: the training loop's own lines and config (in-process, as `rayscale train` writes
    them without Ray; the CLI's train command itself is tested end to end in test_pipeline.py)."""
    from inprocess import train

    train(tmp_path, "e2e", "batch.micro_batch_size=16", "train.epochs=1", "train.log_every_samples=256")
    capsys.readouterr()
    assert cli.main(["suggest", str(tmp_path / "e2e")]) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "e2e" / "suggest.json").read_text())
    assert written["current"] == 128 and written["model"]["micro_batch_measured"]  # 8 micro-batches a step
    assert written["inputs"]["noise_scale"] > 0 and "<- current" in out
    assert (tmp_path / "e2e" / "suggest.png").is_file()


def test_a_run_with_auto_micro_batch_is_modelled_at_the_micro_batch_it_settled_on(tmp_path, capsys):
    """batch.micro_batch_size auto started at 64 and ran out of memory: the lines say 16. The table's plans use
    16, and the command leaves auto to find it again."""
    lines = [metrics_line(2048 * i, micro_batch_size=16) for i in range(1, 6)]
    run_dir = write_run(tmp_path / "run", lines, "batch.micro_batch_size=auto")
    assert cli.main(["suggest", str(run_dir)]) == 0
    out = capsys.readouterr().out
    rows = {r["global_batch_size"]: r for r in json.loads((run_dir / "suggest.json").read_text())["candidates"]}
    assert (rows[128]["micro_batch_size"], rows[128]["accumulation_steps"]) == (16, 4)
    assert "batch.micro_batch_size=" not in out
