"""Whether a run fits the cluster it joins, the reads included: workers that reserve every CPU would leave Ray
Data's read tasks waiting forever ("The job may hang forever unless the cluster scales up"), so such a run is
refused before it starts, with the numbers and what to change; an autoscaling cluster is judged by the most it
can grow to."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from rayscale import config
from rayscale.errors import UserError
from rayscale.launch.fit import check_cluster_fits


@pytest.fixture
def cluster_of(monkeypatch):
    """Stand in for a joined cluster with `now` resources up and `most` in its autoscaling config (None: fixed)."""
    import ray

    def make(now: dict, most: dict | None = None) -> None:
        monkeypatch.setattr(ray, "cluster_resources", lambda: now)
        monkeypatch.setattr(ray._private.state.state, "get_max_resources_from_cluster_config", lambda: most)

    return make


@pytest.mark.parametrize("cpus, overrides, refused", [
    (2.0, (), "2 workers x 1 CPUs reserve 2 CPUs and the cluster has 2, leaving none for reading the data (Ray "
              "Data's read tasks need 0.25 CPU each); set scaling.cpus_per_worker to at most 0.875"),  # the laptop
    (2.0, ("scaling.cpus_per_worker=0.875",), None),  # one read task at a time beside the workers
    (2.1, (), "leaving none for reading"),  # 0.1 left: less than one read task
    (3.0, (), None),  # what the embedded Ray declares on 2 cores
    (2.0, ("scaling.num_workers=0",), None),  # local mode reserves nothing
    (1.0, ("scaling.num_workers=4", "scaling.cpus_per_worker=0.25"), "leaving none for reading the data (Ray Data's "
                                                                     "read tasks need 0.25 CPU each); set "
                                                                     "scaling.cpus_per_worker to at most 0.187"),
])
def test_workers_that_leave_no_cpu_for_the_reads_are_refused_with_what_to_change(cluster_of, cpus, overrides,
                                                                                 refused):
    cluster_of({"CPU": cpus})
    cfg = config.load(overrides=list(overrides))
    if refused is None:
        check_cluster_fits(cfg)
        return
    with pytest.raises(UserError, match="^scaling.cpus_per_worker: ") as error:
        check_cluster_fits(cfg)
    assert refused in str(error.value) and "\n" not in str(error.value)


def test_an_autoscaling_cluster_is_judged_by_what_it_can_grow_to(cluster_of):
    cluster_of({"CPU": 2.0}, most={"CPU": 16.0, "GPU": 4.0})  # only the head is up yet
    check_cluster_fits(config.load(overrides=["scaling.num_workers=4", "batch.micro_batch_size=32"]))
    check_cluster_fits(config.load(overrides=["scaling.num_workers=4", "scaling.use_gpu=true",
                                              "batch.micro_batch_size=32"]))
    with pytest.raises(UserError, match=r"scaling.num_workers: 32 workers x 1 CPUs need 32 CPUs, the cluster can "
                                        r"grow to 16$"):
        check_cluster_fits(config.load(overrides=["scaling.num_workers=32", "batch.global_batch_size=256"]))
    with pytest.raises(UserError, match=r"scaling.cpus_per_worker: .* the cluster can grow to 16, leaving none"):
        check_cluster_fits(config.load(overrides=["scaling.num_workers=8", "scaling.cpus_per_worker=2",
                                                  "batch.global_batch_size=256"]))


@pytest.mark.slow
def test_a_run_with_the_defaults_on_a_2_cpu_cluster_is_refused_in_one_line_instead_of_hanging(tmp_path):
    """A laptop's `ray start --head --num-cpus=2` and `rayscale train` with its defaults (2 workers of 1 CPU):
    exit 2, one line, nothing trained, within seconds of connecting (it used to wait for read tasks forever)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        started = time.time()
        done = subprocess.run([sys.executable, "-m", "rayscale.cli", "train", "--address", cluster.address,
                               "--set", f"run.output_dir={tmp_path}"], capture_output=True, text=True, env=env,
                              timeout=300)  # a hang guard only
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("rayscale: error: scaling.cpus_per_worker: ")
        assert "at most 0.875" in done.stderr
        assert not (tmp_path / "default" / "metrics.jsonl").exists()
        assert time.time() - started < 120
    finally:
        cluster.shutdown()
