"""Sharded ingest on a simulated two-node cluster (`ray.cluster_utils.Cluster`, one training worker per node):
each rank reads only its own lanes, its read tasks run on its own node, and the whole run reads about the file
once per pass; and the model is the one two ranks in two processes of this machine train, bit for bit. Every
process logs what it reads through a Ray setup hook (tests/read_log.py)."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import parquet_fixtures
import pytest

from rayscale import config
from rayscale.math import lanes as lane_plan

ROWS, ROW_GROUP, EPOCHS = 4000, 250, 2


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head with no CPU (nothing trains or reads there) and two nodes of 2 CPUs: a worker of 1.5 CPUs fits
    one per node, leaving each node half a CPU (two read tasks) for its own reads."""
    import ray
    from ray.cluster_utils import Cluster

    log = tmp_path_factory.mktemp("reads")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": "read_log.install",
                          "env_vars": {"RAYSCALE_TEST_READ_LOG": str(log)}})
    yield cluster, nodes, log
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_each_rank_reads_its_own_lanes_on_its_own_node_and_the_run_reads_the_file_once_per_pass(
        two_nodes, tmp_path):
    import read_log
    import torch
    from inprocess import train as train_in_process

    from rayscale.launch.trainer import train

    cluster, nodes, log = two_nodes
    source = parquet_fixtures.write(tmp_path / "rows.parquet", parquet_fixtures.tabular(0, ROWS),
                                    row_group_size=ROW_GROUP)
    options = [f"data.source={source}", "data.val_fraction=0.1", "data.cache_mb=0", "data.read_in_worker_mb=0",
               f"train.epochs={EPOCHS}", "batch.global_batch_size=64", "batch.micro_batch_size=null"]
    cfg = config.load(overrides=[*options, "scaling.num_workers=2", "scaling.cpus_per_worker=1.5",
                                 f"run.output_dir={tmp_path}", "run.name=sharded"])
    summary = train(cfg, address=cluster.address)
    train_rows = summary["train_rows"]
    assert summary["samples_seen"] == EPOCHS * train_rows
    assert summary["world_sizes"] == [2] and summary["restarts"] == 0
    # DDP under Train, a rank per node, trains the model that two ranks in two processes of this machine train.
    one_node = train_in_process(tmp_path, "one_node", *options, workers=2)
    model = torch.load(Path(summary["run_dir"]) / "model.pt")
    assert model.keys() == one_node.model.keys()
    assert all(torch.equal(model[key], one_node.model[key]) for key in model)

    records = read_log.records(log)
    asked = [r for r in records if r["kind"] == "ask" and r["split"] == "train"]
    reads = [r for r in records if r["kind"] == "read" and r["split"] == "train"]
    # Each rank asked for its own lanes, once per epoch (streamed: no cache), one rank per node.
    assert sorted(r["rank"] for r in asked) == [0, 0, 1, 1]
    node_of = {r["rank"]: r["node"] for r in asked}
    assert sorted(node_of.values()) == sorted(node.node_id for node in nodes)
    for record in asked:
        lane = record["rank"]  # two lanes, two workers: rank r owns lane r
        start, stop = lane_plan.lane_ranges(train_rows, 2)[lane]
        assert sum(take for _, _, take in record["pieces"]) == stop - start
    # The read tasks ran on the node of the rank that asked: per node, the chunks read are the chunks asked.
    wanted = collections.Counter((r["node"], chunk) for r in asked for chunk, _, _ in r["pieces"])
    assert collections.Counter((r["node"], r["chunk"]) for r in reads) == wanted
    # About the file once per pass: whole row groups, one of them cut between the two lanes read twice.
    decoded = sum(r["rows"] for r in reads)
    assert EPOCHS * ROWS <= decoded <= EPOCHS * (ROWS + ROW_GROUP)
    print(json.dumps({"rows_decoded_per_pass": decoded / EPOCHS, "file_rows": ROWS,
                      "amplification": decoded / (EPOCHS * ROWS)}))
    # Validation: each rank its shard, every row group of the file read about once per validation.
    val_reads = [r for r in records if r["kind"] == "read" and r["split"] == "val"]
    validations = len([r for r in records if r["kind"] == "ask" and r["split"] == "val"]) // 2
    assert validations >= EPOCHS
    assert validations * ROWS <= sum(r["rows"] for r in val_reads) <= validations * (ROWS + ROW_GROUP)
