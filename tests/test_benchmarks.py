"""The benchmark scripts' own arithmetic (the scripts themselves are not part of the test run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.chaos import account

REPO = Path(__file__).resolve().parents[1]

# The uninterrupted run: two ranks, each a sequence of micro-batches (row indices).
REFERENCE = {101: [(0.0, (0, 1)), (0.1, (4, 5)), (0.2, (8, 9))],
             102: [(0.0, (2, 3)), (0.1, (6, 7)), (0.2, (10, 11))]}


def test_restarts_that_replay_uncommitted_steps_lose_and_duplicate_nothing():
    attempts = {1: [(0, (0, 1)), (0, (4, 5))], 2: [(0, (2, 3)), (0, (6, 7))],  # killed after step 2
                3: [(0, (4, 5)), (0, (8, 9))], 4: [(0, (6, 7)), (0, (10, 11))]}  # resumed at step 2
    assert account(REFERENCE, attempts) == {"rows_lost": 0, "rows_duplicated": 0}


def test_a_resume_past_the_checkpoint_loses_rows():
    attempts = {1: [(0, (0, 1))], 2: [(0, (2, 3))], 3: [(0, (8, 9))], 4: [(0, (10, 11))]}  # skipped step 2
    assert account(REFERENCE, attempts) == {"rows_lost": 4, "rows_duplicated": 0}


def test_a_resumed_stream_that_drifts_is_counted_both_ways():
    attempts = {1: [(0, (0, 1)), (0, (4, 5)), (0, (4, 5))], 2: [(0, (2, 3)), (0, (6, 7)), (0, (10, 11))]}
    assert account(REFERENCE, attempts) == {"rows_lost": 2, "rows_duplicated": 2}


def test_an_output_dir_holding_an_earlier_run_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """`python -m benchmarks` twice with the same --output-dir: the second is refused (exit 2) before anything
    runs. Its runs would have found the first one's: a finished run left there was resumed, trained nothing, and
    its old figures were reported as new."""
    import importlib
    from types import SimpleNamespace

    from benchmarks import __main__ as suite

    given = []

    def run(size: str, work: Path) -> dict:
        assert not any(work.iterdir()), f"{work} holds an earlier run"
        (work / "round_1").mkdir()
        given.append(work)
        return {"targets": []}

    monkeypatch.setattr(importlib, "import_module", lambda name: SimpleNamespace(run=run, table=lambda r: "-"))
    monkeypatch.setattr(suite, "machine", lambda: {"cpus": 2})
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # main adds the repository to it
    argv = ["--smoke", "--only", "throughput,throughput", "--output-dir", str(tmp_path / "work"),
            "--results-dir", str(tmp_path / "results")]
    assert suite.main(argv) == 0
    assert given == [(tmp_path / "work" / "throughput").resolve()]  # named twice, run once
    capsys.readouterr()
    assert suite.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--output-dir" in error and "not empty" in error, error
    assert len(given) == 1 and [p.name for p in given[0].iterdir()] == ["round_1"]  # nothing ran, nothing changed


def test_a_benchmarks_scratch_is_the_given_directory_when_new_or_empty_or_a_temporary_one(tmp_path, capsys):
    from benchmarks import scratch_or_none

    assert scratch_or_none("epoch_end", tmp_path / "new") == (tmp_path / "new").resolve()
    assert (tmp_path / "new").is_dir()
    (tmp_path / "new" / "round_1").mkdir()
    assert scratch_or_none("epoch_end", tmp_path / "new") is None
    assert capsys.readouterr().err.startswith("epoch_end: --output-dir ")
    temporary = scratch_or_none("trial_gaps", None)
    assert temporary.is_dir() and not any(temporary.iterdir()) and temporary.name.startswith("rayscale-trial_gaps-")
    temporary.rmdir()


@pytest.mark.slow
def test_the_benchmark_suite_runs_at_tiny_sizes(tmp_path):
    """`python -m benchmarks --smoke`: each benchmark runs and writes its result; the figures mean nothing.
    (Memory and scale: tests/test_benchmarks_memory_scale_gpu.py, a file of its own so it can run beside this.)"""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--output-dir", str(tmp_path / "work"),
                           "--results-dir", str(tmp_path / "results"),
                           "--only", "throughput,ingest,accumulation,noise_overhead,mfu"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("throughput", "ingest", "accumulation", "noise_overhead", "mfu"):
        result = json.loads((tmp_path / "results" / f"{name}.smoke.json").read_text())
        assert result["targets"] and result["machine"]["cpus"], name
    throughput = json.loads((tmp_path / "results" / "throughput.smoke.json").read_text())
    assert all(throughput[k]["samples_per_sec"] > 0 for k in ("rayscale", "ray_train", "plain_ddp"))
    (only_round,) = throughput["rounds"]  # the smoke size runs one round; each ratio is that round's own
    assert throughput["targets"][0]["value"] == pytest.approx(
        only_round["rayscale"]["samples_per_sec"] / only_round["ray_train"]["samples_per_sec"])
    ingest = json.loads((tmp_path / "results" / "ingest.smoke.json").read_text())
    assert 0 <= ingest["streamed"]["steady_data_wait_fraction"] <= 1
    accumulation = json.loads((tmp_path / "results" / "accumulation.smoke.json").read_text())
    assert accumulation["rayscale"]["allreduce_rounds_per_step"] == 1
    assert accumulation["naive"]["allreduce_rounds_per_step"] == 4
    noise = json.loads((tmp_path / "results" / "noise_overhead.smoke.json").read_text())
    assert noise["estimates_taken"] > 0 and noise["step_s"]["on"] > 0
    assert "| benchmark | measure |" in (tmp_path / "results" / "summary.smoke.md").read_text()


def test_the_step_overhead_diagnostic_runs_and_prints_every_loop():
    """`python -m benchmarks.step_overhead` at 2 blocks of 2 steps: every loop gets a row of positive figures."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.step_overhead", "--blocks", "2", "--steps", "2"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| loop")}
    assert set(rows) == {"bare", "settings", "rayscale"}
    for line in rows.values():
        wall, cpu, speed = (float(cell) for cell in line.split("|")[2:5])
        assert wall > 0 and cpu > 0 and speed > 0


def test_the_lane_orderings_benchmark_compares_every_lane_count_to_the_global_order():
    """`python benchmarks/lane_orderings.py` at a small size: one lane is the global order (no step shift), more
    lanes shift the curriculum little on a spread file and a lot on a file sorted by difficulty."""
    done = subprocess.run([sys.executable, "benchmarks/lane_orderings.py", "--rows", "4000", "--batch", "64"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    spread, banded = report["curriculum_spread_file"], report["curriculum_file_sorted_by_difficulty"]
    assert spread["1"]["mean_step_shift"] == banded["1"]["mean_step_shift"] == 0
    assert 0 < spread["8"]["mean_step_shift"] < 0.05 < banded["8"]["mean_step_shift"]
    padding = report["bucketing_padding_per_real_token"]
    assert all(padding[str(lanes)] < 0.5 * padding["no bucketing, 1 lane"] for lanes in (1, 2, 4, 8))
