"""The memory, scale and GPU benchmarks' arithmetic, and the GPU benchmark's refusal without a GPU (their smoke
runs: tests/test_benchmarks.py, with the rest of the suite)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.memory import activation_mb
from benchmarks.scale import parameters, steady_samples_per_sec

REPO = Path(__file__).resolve().parents[1]


def test_parameter_count_matches_the_built_mlp():
    from rayscale.models import MLP

    for hidden in ([8], [64, 32], [256, 256]):
        model = MLP(in_features=32, num_outputs=10, hidden_sizes=tuple(hidden))
        assert parameters(32, hidden) == sum(p.numel() for p in model.parameters())


def test_steady_rate_leaves_out_the_first_interval_and_evaluations():
    records = [{"samples_seen": 1000, "time": 10.0},  # start-up is in here: left out
               {"samples_seen": 2000, "time": 11.0},
               {"samples_seen": 2000, "time": 13.0, "evaluation": True},
               {"samples_seen": 4000, "time": 12.0}]
    assert steady_samples_per_sec(records) == pytest.approx(3000 / 2.0)
    assert steady_samples_per_sec(records[:1]) is None


def test_activation_estimate_scales_with_the_micro_batch():
    assert activation_mb(256, [1024, 1024]) == pytest.approx(256 * 2048 * 2 * 4 / 2**20)
    assert activation_mb(512, [1024]) == pytest.approx(2 * activation_mb(256, [1024]))


def _stand_ins(monkeypatch, statuses: list[str], single_s: float, search_s: float):
    """trainer.train and tune.search replaced by calls that only let the clock run on."""
    import benchmarks.scale as scale
    from rayscale.launch import trainer
    from rayscale.tuning import search

    clock = {"now": 0.0}
    monkeypatch.setattr(scale.time, "perf_counter", lambda: clock["now"])

    def train(cfg):
        clock["now"] += single_s

    def tune(cfg):
        clock["now"] += search_s
        return [{"trial_id": f"t{i}", "status": status} for i, status in enumerate(statuses)]

    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(search, "search", tune)
    return scale


def test_the_tune_overhead_is_the_searchs_extra_time_per_trial(tmp_path, monkeypatch):
    """Part (c) of benchmarks/scale.py (not run at the smoke size): 2 configurations of 10 s each, searched in
    26 s one at a time: 3 s per trial."""
    scale = _stand_ins(monkeypatch, ["completed", "completed"], single_s=10.0, search_s=26.0)
    size = {**scale.SIZES["smoke"], "tune_lrs": [0.1, 0.3]}
    overhead = scale.tune_overhead(size, tmp_path)
    assert (overhead["trials"], overhead["single_runs_wall_s"], overhead["overhead_per_trial_s"]) == (2, 20.0, 3.0)
    assert overhead["one_at_a_time"] == {"wall_s": 26.0, "trials": 2, "concurrency": 1}


def test_the_tune_overhead_refuses_a_search_whose_trials_did_not_all_complete(tmp_path, monkeypatch):
    """A failed trial's time is not a trial's overhead (a local-mode search once failed every trial, and its
    time was reported as overhead)."""
    scale = _stand_ins(monkeypatch, ["completed", "error"], single_s=10.0, search_s=26.0)
    with pytest.raises(RuntimeError, match="1 of 2 trials of the one_at_a_time search did not complete"):
        scale.tune_overhead({**scale.SIZES["smoke"], "tune_lrs": [0.1, 0.3]}, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the full run is the benchmark itself")
def test_gpu_benchmark_refuses_a_full_run_without_a_gpu():
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    refused = subprocess.run([sys.executable, "-m", "benchmarks.gpu_mfu"], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "no CUDA GPU" in refused.stderr


@pytest.mark.parametrize("wheel, name", [
    pytest.param("aiohttp_cors-0.8.1-py3-none-any.whl", "aiohttp-cors", id="underscore"),
    pytest.param("PyYAML-6.0.3-cp312-cp312-manylinux_2_17_x86_64.whl", "pyyaml", id="capitals"),
    pytest.param("ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl", "ray", id="plain"),
])
def test_gpu_wheels_compare_distribution_names_as_pypi_does(wheel, name):
    from benchmarks.gpu_wheels import project_name

    assert project_name(wheel) == name


def test_gpu_wheels_slim_ray_loses_only_the_java_api_and_source_maps(tmp_path):
    import zipfile

    from benchmarks.gpu_wheels import LEFT_OUT_OF_RAY, without

    wheel = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    members = {"ray/__init__.py": b"x", "ray/jars/ray_dist.jar": b"j" * 1000, "ray/core/src/ray/raylet/raylet": b"r",
               "ray/dashboard/client/build/static/js/main.js": b"js", "ray/dashboard/client/build/main.js.map": b"m",
               "ray-2.60.0.dist-info/RECORD": b"record"}
    with zipfile.ZipFile(wheel, "w") as out:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o755 << 16  # raylet and gcs_server must stay executable
            out.writestr(info, data)
    without(wheel, LEFT_OUT_OF_RAY)
    with zipfile.ZipFile(wheel) as slim:
        assert sorted(slim.namelist()) == sorted(set(members) - {"ray/jars/ray_dist.jar",
                                                                 "ray/dashboard/client/build/main.js.map"})
        assert slim.read("ray/core/src/ray/raylet/raylet") == b"r"
        assert slim.getinfo("ray/core/src/ray/raylet/raylet").external_attr >> 16 == 0o755
