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

    def make(now: dict, most: dict | None = None, nodes: list[dict] | None = None) -> None:
        """`nodes`: each node's resources (default: one node holding `now`)."""
        monkeypatch.setattr(ray, "cluster_resources", lambda: now)
        monkeypatch.setattr(ray._private.state.state, "get_max_resources_from_cluster_config", lambda: most)
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in (nodes or [now])])

    return make


@pytest.mark.parametrize("cpus, overrides, refused", [
    (2.0, (), "2 workers x 1 CPUs reserve 2 CPUs and the cluster has 2, leaving 0 for reading the data, less than "
              "the 0.25 CPU a Ray Data read task needs; set scaling.cpus_per_worker to at most 0.875"),  # the laptop
    (2.0, ("scaling.cpus_per_worker=0.875",), None),  # one read task at a time beside the workers
    (2.1, (), "leaving 0.1 for reading the data"),  # less than one read task
    (3.0, (), None),  # what the embedded Ray declares on 2 cores
    (2.0, ("scaling.num_workers=0",), None),  # local mode reserves nothing
    (1.0, ("scaling.num_workers=4", "scaling.cpus_per_worker=0.25"), "set scaling.cpus_per_worker to at most 0.1875"),
    # The suggestion itself passes: 25 x 0.07 is 1.7500000000000002 in floating point, not more than 1.75.
    (2.0, ("scaling.num_workers=25", "scaling.cpus_per_worker=0.07", "batch.global_batch_size=100",
           "batch.micro_batch_size=null"), None),
    (2.0, ("scaling.num_workers=25", "scaling.cpus_per_worker=0.08", "batch.global_batch_size=100",
           "batch.micro_batch_size=null"), "at most 0.07,"),
    # No number of CPUs per worker leaves a read task its share: only local mode or a bigger cluster.
    (0.25, ("scaling.num_workers=1", "scaling.cpus_per_worker=0.1", "batch.micro_batch_size=null"),
     "use scaling.num_workers 0 (local mode), or give the cluster more CPUs"),
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


def test_a_tune_trials_own_actor_counts_against_the_reads(cluster_of):
    """Each trial's actor holds a sliver of a CPU beside its workers: 2 workers x 0.875 fit a bare run on 2 CPUs,
    not a trial (0.24 left)."""
    cluster_of({"CPU": 2.0})
    cfg = config.load(overrides=["scaling.cpus_per_worker=0.875"])
    check_cluster_fits(cfg)
    with pytest.raises(UserError, match=r"the cluster has 2 \(0.01 of them held beside the workers\), leaving 0.24 "
                                        r"for reading the data.*at most 0.87,"):
        check_cluster_fits(cfg, beside=0.01)


def test_a_ray_client_connection_has_no_autoscaling_config_to_read(monkeypatch):
    """Over ray:// this process has no view of Ray's state: the cluster's resources now are what is judged."""
    import ray

    from rayscale.data.datasets import most_resources

    def no_state():
        raise ray.exceptions.RaySystemError("Ray has not been started yet")

    monkeypatch.setattr(ray._private.state.state, "get_max_resources_from_cluster_config", no_state)
    assert most_resources() == {}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    check_cluster_fits(config.load())


def test_an_autoscaling_cluster_is_judged_by_what_it_can_grow_to(cluster_of):
    cluster_of({"CPU": 2.0}, most={"CPU": 16.0, "GPU": 4.0})  # only the head is up yet
    check_cluster_fits(config.load(overrides=["scaling.num_workers=4", "batch.micro_batch_size=32"]))
    check_cluster_fits(config.load(overrides=["scaling.num_workers=4", "scaling.use_gpu=true",
                                              "batch.micro_batch_size=32"]))
    with pytest.raises(UserError, match=r"scaling.num_workers: 32 workers x 1 CPUs need 32 CPUs, the cluster can "
                                        r"grow to 16$"):
        check_cluster_fits(config.load(overrides=["scaling.num_workers=32", "batch.global_batch_size=256"]))
    with pytest.raises(UserError, match=r"scaling.cpus_per_worker: .* the cluster can grow to 16, leaving 0 for"):
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


def test_an_elastic_run_needs_room_for_its_fewest_workers_and_the_reads_beside_the_most_that_fit(cluster_of):
    """An elastic group starts with as many workers as fit: 3 CPUs hold 1 of [1, 4] workers of 2 CPUs and leave
    the reads 1; 1.5 CPUs hold none."""
    elastic = config.load(overrides=["scaling.num_workers=[1, 4]", "scaling.cpus_per_worker=2",
                                     "batch.global_batch_size=96", "batch.micro_batch_size=null"])
    cluster_of({"CPU": 3.0})
    check_cluster_fits(elastic)
    cluster_of({"CPU": 1.5})
    with pytest.raises(UserError, match=r"^scaling.min_workers: 1 workers x 2 CPUs need 2 CPUs, the cluster has 1.5"):
        check_cluster_fits(elastic)
    # 8 CPUs hold all 4 workers and leave the reads nothing.
    cluster_of({"CPU": 8.0})
    with pytest.raises(UserError, match=r"^scaling.cpus_per_worker: 4 workers x 2 CPUs reserve 8 CPUs"):
        check_cluster_fits(elastic)


@pytest.mark.parametrize("nodes, overrides, refused", [
    # Workers filling their nodes, the spare CPU on the head: Ray Data reserved none for the reads and the run hung.
    ([1, 2, 2], ("scaling.cpus_per_worker=2",), "1 workers x 2 CPUs fill a node of 2 CPUs, leaving 0 beside them for reading their data, less than the 0.25 "
     "CPU a Ray Data read task needs on the workers' own node; set scaling.cpus_per_worker to at most 1.75"),
    ([1, 2, 2], ("scaling.cpus_per_worker=1.75",), None),  # a quarter of a CPU beside each worker
    ([0, 2, 2], ("scaling.cpus_per_worker=1.5",), None),  # the simulated cluster of tests/test_elastic.py
    ([8, 1], ("scaling.num_workers=4", "batch.micro_batch_size=32", "scaling.cpus_per_worker=2"),
     "4 workers x 2 CPUs fill a node of 8 CPUs, leaving 0"),
    # Train packs its workers onto as few nodes as it can: all four on one of two 8-CPU nodes.
    ([8, 8], ("scaling.num_workers=4", "batch.micro_batch_size=32", "scaling.cpus_per_worker=2"),
     "4 workers x 2 CPUs fill a node of 8 CPUs"),
    ([8, 8], ("scaling.num_workers=4", "batch.micro_batch_size=32", "scaling.cpus_per_worker=1.9375"), None),
    # An elastic group takes what fits: two workers of 1.5 CPUs on each 4-CPU node leave 1 beside them.
    ([4, 4], ("scaling.num_workers=[1, 4]", "data.lanes=12", "batch.global_batch_size=120",
              "batch.micro_batch_size=null", "scaling.cpus_per_worker=1.5"), None),
])
def test_the_reads_need_room_on_the_workers_own_nodes(cluster_of, nodes, overrides, refused):
    cluster_of({"CPU": float(sum(nodes))}, nodes=[{"CPU": float(cpus)} for cpus in nodes])
    cfg = config.load(overrides=list(overrides))
    if refused is None:
        check_cluster_fits(cfg)
    else:
        with pytest.raises(UserError, match=refused.replace("(", r"\(").replace(")", r"\)")):
            check_cluster_fits(cfg)


def test_gpu_workers_are_placed_by_their_gpus_on_each_node(cluster_of):
    """A head of 2 CPUs and two GPU nodes of 4 CPUs and 1 GPU: one worker each; 4 CPUs a worker would fill its
    node (the head's spare CPUs do not help the reads)."""
    nodes = [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    cluster_of({"CPU": 10.0, "GPU": 2.0}, nodes=nodes)
    check_cluster_fits(config.load(overrides=["scaling.use_gpu=true", "scaling.cpus_per_worker=3"]))
    with pytest.raises(UserError, match="1 workers x 4 CPUs fill a node of 4 CPUs"):
        check_cluster_fits(config.load(overrides=["scaling.use_gpu=true", "scaling.cpus_per_worker=4"]))


@pytest.mark.parametrize("overrides, copies", [
    ([], 3),  # weights, gradients, SGD's momentum
    (["optim.momentum=0"], 2),
    (["optim.name=adamw"], 4),  # two moments
    (["optim.name=lamb"], 4),
    (["optim.name=lars"], 3),
    (["optim.name=adamw", "optim.shard_state=true"], 3),  # the moments split over the 2 workers
    (["optim.name=adamw", "train.strategy=parameter_server", "batch.micro_batch_size=64"], 2),  # the servers' state
])
def test_a_cpu_worker_holds_at_least_its_weights_gradients_and_optimizer_state(overrides, copies):
    from rayscale.launch.fit import parameter_copies

    assert parameter_copies(config.load(overrides=overrides), 2) == copies


def test_an_embedded_run_whose_workers_cannot_hold_their_model_in_this_machines_memory_is_refused(monkeypatch):
    """A 1-billion-parameter MLP on 2 CPU workers and 24 GiB started Ray and its workers, then Ray's memory monitor
    killed one; the least the workers hold is known before Ray starts."""
    from rayscale.launch import fit

    monkeypatch.setattr(fit, "available_memory", lambda: 2**30)
    cfg = config.load()  # 2 workers, SGD with momentum: 12 bytes per parameter each
    fit.check_machine_memory(cfg, parameters=40_000_000)  # 0.96 GB in all
    with pytest.raises(UserError) as refused:
        fit.check_machine_memory(cfg, parameters=50_000_000)  # 0.6 GB each, 1.2 GB in all
    assert str(refused.value) == (
        "scaling.num_workers: 2 workers of a model of 50,000,000 parameters need at least 1.12 GiB (0.559 GiB each: "
        "weights, gradients and sgd's state in float32), and this machine has 1 GiB available (embedded Ray); "
        "expected a smaller model, fewer workers, or a cluster (--address)")
    with pytest.raises(UserError, match=r"^model.name mlp: 2 workers of a model of 100,000,000 parameters"):
        fit.check_machine_memory(cfg, parameters=100_000_000)  # one worker alone would not fit
    fit.check_machine_memory(config.load(overrides=["scaling.use_gpu=true"]), parameters=10**9)  # GPU memory
    monkeypatch.setattr(fit, "available_memory", lambda: None)  # not Linux: unknown, not checked
    fit.check_machine_memory(cfg, parameters=10**9)


def test_this_machines_available_memory_is_read():
    from rayscale.launch.fit import available_memory

    available = available_memory()
    assert available is not None and 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
