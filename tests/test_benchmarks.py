"""The benchmark scripts' own arithmetic, and the suite (`python -m benchmarks --smoke`) at tiny sizes."""

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


def test_the_epoch_end_benchmark_counts_each_kept_checkpoint_once(tmp_path):
    """benchmarks.epoch_end's checkpoints_kept: each checkpoint directory holds one manifest per rank, written as
    the engine writes them."""
    from benchmarks.epoch_end import checkpoints_kept
    from rayscale.engine.checkpoint import write_manifest

    assert checkpoints_kept(tmp_path) == 0
    for index in (3, 6):
        directory = tmp_path / "checkpoints" / f"checkpoint_00000{index}"
        directory.mkdir(parents=True)
        for rank in (0, 1):
            write_manifest(directory, rank, 2)
    assert checkpoints_kept(tmp_path) == 2


SMOKE = ("throughput", "ingest", "accumulation", "noise_overhead", "mfu", "memory", "scale", "gpu_mfu")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """`python -m benchmarks --smoke` over every benchmark of the suite, in one process and one embedded Ray: the
    results directory. The figures mean nothing; each benchmark ran and wrote its result."""
    out = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--output-dir", str(out / "work"),
                           "--results-dir", str(out / "results"), "--only", ",".join(SMOKE)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "results"


@pytest.mark.slow
def test_the_benchmark_suite_runs_at_tiny_sizes(smoke):
    for name in SMOKE:
        result = json.loads((smoke / f"{name}.smoke.json").read_text())
        assert result["targets"] and result["machine"]["cpus"], name
    throughput = json.loads((smoke / "throughput.smoke.json").read_text())
    assert all(throughput[k]["samples_per_sec"] > 0 for k in ("rayscale", "ray_train", "plain_ddp"))
    (only_round,) = throughput["rounds"]  # the smoke size runs one round; each ratio is that round's own
    assert throughput["targets"][0]["value"] == pytest.approx(
        only_round["rayscale"]["samples_per_sec"] / only_round["ray_train"]["samples_per_sec"])
    ingest = json.loads((smoke / "ingest.smoke.json").read_text())
    assert 0 <= ingest["streamed"]["steady_data_wait_fraction"] <= 1
    accumulation = json.loads((smoke / "accumulation.smoke.json").read_text())
    assert accumulation["rayscale"]["allreduce_rounds_per_step"] == 1
    assert accumulation["naive"]["allreduce_rounds_per_step"] == 4
    noise = json.loads((smoke / "noise_overhead.smoke.json").read_text())
    assert noise["estimates_taken"] > 0 and noise["step_s"]["on"] > 0
    summary = (smoke / "summary.smoke.md").read_text()
    assert "| benchmark | measure |" in summary and "| memory |" in summary


@pytest.mark.slow
def test_memory_scale_and_gpu_benchmarks_run_at_tiny_sizes(smoke):
    """The GPU benchmark's whole path too (Parquet sequences, the GPT factory in a Ray worker, bf16, the raw
    loop, FLOP counting), on the CPU when no GPU is here. (Their arithmetic: tests/test_benchmarks_memory_scale_gpu.py.)"""
    memory = json.loads((smoke / "memory.smoke.json").read_text())
    assert [p["micro_batch_size"] for p in memory["micro_sweep"]] == [64, 16]
    assert all(p["peak_memory_mb"] > 0 for p in memory["micro_sweep"])
    assert [e["epoch"] for e in memory["epochs"]] == [1, 2, 3] and all(e["memory_mb"] > 0 for e in memory["epochs"])
    scale = json.loads((smoke / "scale.smoke.json").read_text())
    assert [p["rows"] for p in scale["dataset_sizes"]] == [1000, 4000]
    assert all(p["driver_peak_memory_mb"] > 0 and p["samples_per_sec"] > 0 for p in scale["dataset_sizes"])
    assert scale["tune"] is None  # not at the smoke size: see test_the_tune_overhead_is_the_searchs_extra_time_per_trial
    gpu = json.loads((smoke / "gpu_mfu.smoke.json").read_text())
    assert gpu["flops_per_token"] > 0 and gpu["measured_matmul_tflops"] > 0
    assert all(gpu[part]["tokens_per_sec"] > 0 for part in ("raw", "step_only", "rayscale"))
    assert gpu["rayscale"]["log_lines"] >= 2  # one epoch, logged often enough for a steady window


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
