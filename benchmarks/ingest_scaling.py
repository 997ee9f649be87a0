"""Ingest-only scaling on a simulated cluster: an I/O-bound source (each chunk read sleeps), read for one epoch by
1, 2 and 4 workers (one per node of `ray.cluster_utils.Cluster`), three ways side by side in one run:

- lanes (rayscale): each worker reads its own lanes through its own Ray Data execution on its own node
  (data/datasets.build_reads);
- every worker reads all (rayscale before sharded ingest): each worker streams the whole epoch and would keep
  1/N of each step;
- streaming_split (Ray Train's default): one execution on the driver, `streaming_split(N, equal=True)`.

For each: the epoch's wall time (slowest worker), rows decoded by read tasks (counted in every process by a Ray
setup hook, `benchmarks/ingest_scaling.py:install`) per training row, rows delivered to the workers, and how
many read tasks ran on the node of the worker that wanted the rows. Target: the lanes' epoch time falls as 1/N
(time at N x N / time at 1 within 0.75-1.33), and they read each row about once.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python -m benchmarks.ingest_scaling [--chunks 48] [--sleep 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

LOG_ENV, SLEEP_ENV = "RAYSCALE_BENCH_READ_LOG", "RAYSCALE_BENCH_READ_SLEEP_S"
CHUNK_ROWS = 8192  # the synthetic source's rows per generated block
WORKERS = (1, 2, 4)


def install() -> None:
    """Ray setup hook: every chunk a read task decodes sleeps (an I/O-bound source) and is logged with its node."""
    directory = os.environ.get(LOG_ENV)
    if not directory:
        return
    import ray

    from rayscale.data import splits

    read_chunk, sleep = splits._read_split_chunk, float(os.environ.get(SLEEP_ENV, "1"))

    def slow_chunk(index, spec):
        time.sleep(sleep)
        chunk = spec.info.chunks[index]
        with open(Path(directory) / f"{os.getpid()}.jsonl", "a") as out:
            out.write(json.dumps({"node": ray.get_runtime_context().get_node_id(), "chunk": int(index),
                                  "rows": int(chunk.stop - chunk.start)}) + "\n")
        return read_chunk(index, spec)

    splits._read_split_chunk = slow_chunk


def _drain(log: Path) -> list[dict]:
    records = [json.loads(line) for path in log.glob("*.jsonl") for line in path.read_text().splitlines()]
    for path in log.glob("*.jsonl"):
        path.unlink()
    return records


def run(chunks: int, sleep: float) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    from rayscale.config import DataConfig, SyntheticConfig
    from rayscale.data import sources
    from rayscale.data.datasets import (
        READ_CPUS,
        build_reads,
        node_read_slots,
        quiet_ray_data,
        read_tasks_at_once,
    )
    from rayscale.data.splits import SplitSpec, read_split_pieces
    from rayscale.math import lanes as lane_plan

    log = Path(tempfile.mkdtemp(prefix="rayscale-ingest-scaling-"))
    os.environ.update({LOG_ENV: str(log), SLEEP_ENV: str(sleep)})
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                os.environ.get("PYTHONPATH", "")])
    data = DataConfig(source="synthetic", val_fraction=0.0,
                      synthetic=SyntheticConfig(rows=chunks * CHUNK_ROWS, num_features=4))
    info = sources.inspect_source("synthetic", data, seed=0)
    spec = SplitSpec(info, "train", 0.0, data, 0)
    rows_per_chunk = [chunk.stop - chunk.start for chunk in info.chunks]
    rows = sum(rows_per_chunk)
    # Each node: 1.5 CPUs for its worker, half a CPU (two read tasks) for reads; the head trains and reads nothing.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(max(WORKERS)):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": "benchmarks.ingest_scaling.install",
                          "env_vars": {LOG_ENV: str(log), SLEEP_ENV: str(sleep)}})
    quiet_ray_data()

    @ray.remote(num_cpus=1.5)
    class Reader:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def read(self, reads, local: bool) -> tuple[int, float, int]:
            quiet_ray_data()
            started, got = time.perf_counter(), 0
            node = self.node() if local else None
            slots = min(read_tasks_at_once(len(reads)), node_read_slots(node))  # what build_reads will use
            for block in build_reads(spec, reads, node).iter_batches(batch_size=None, batch_format="numpy"):
                got += len(block["row_id"])
            return got, time.perf_counter() - started, slots

        def iterate(self, split) -> tuple[int, float, None]:
            started, got = time.perf_counter(), 0
            for block in split.iter_batches(batch_size=None, batch_format="numpy"):
                got += len(block["row_id"])
            return got, time.perf_counter() - started, None

    @ray.remote(num_cpus=READ_CPUS)
    def warm(seconds: float) -> None:
        import ray.data  # noqa: F401 - what a read task imports, done once in this pooled process

        time.sleep(seconds)

    def settle(nodes: list[str]) -> None:
        """Read slots are sized by each node's free CPUs when a read starts: wait until the last design's tasks
        have given theirs back, and start each node's read processes (pooled, so imports are paid once)."""
        ray.get([warm.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(1.0)
                 for node in nodes for _ in range(2)])
        deadline = time.time() + 30
        while time.time() < deadline:
            free = ray._private.state.available_resources_per_node()
            if all(free.get(node, {}).get("CPU", 0) >= 0.5 - 1e-9 for node in nodes):
                return
            time.sleep(0.2)

    everything = lane_plan.lane_reads(rows_per_chunk, range(len(rows_per_chunk)), 0, rows)
    results = []
    try:
        for workers in WORKERS:
            group = placement_group([{"CPU": 1.5}] * workers, strategy="STRICT_SPREAD")
            ray.get(group.ready())
            readers = [Reader.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, index)).remote()
                       for index in range(workers)]
            nodes = ray.get([reader.node.remote() for reader in readers])
            designs = {}
            lanes = [[piece.read for lane in lane_plan.owned_lanes(rank, workers, workers)
                      for piece in lane_plan.canonical_pieces(rows_per_chunk, workers, lane)]
                     for rank in range(workers)]
            for name, wanted in (("lanes", lanes), ("every_worker_reads_all", [everything] * workers)):
                settle(nodes)
                _drain(log)
                started = time.perf_counter()
                out = ray.get([reader.read.remote(reads, local=True) for reader, reads in zip(readers, wanted,
                                                                                                 strict=True)])
                asked = {read.chunk: node for node, reads in zip(nodes, wanted, strict=True) for read in reads}
                designs[name] = _figures(out, time.perf_counter() - started, _drain(log), rows,
                                         asked if name == "lanes" else None)
            settle(nodes)
            _drain(log)
            items = [{"chunk": r.chunk, "skip": r.skip, "take": r.take} for r in everything]
            dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                read_split_pieces, fn_kwargs={"spec": spec}, batch_size=1, batch_format="numpy", num_cpus=0.25)
            splits = dataset.streaming_split(workers, equal=True)
            started = time.perf_counter()
            out = ray.get([reader.iterate.remote(split) for reader, split in zip(readers, splits, strict=True)])
            designs["streaming_split"] = _figures(out, time.perf_counter() - started, _drain(log), rows)
            results.append({"workers": workers, **designs})
            for reader in readers:
                ray.kill(reader)
            ray.util.remove_placement_group(group)
    finally:
        ray.shutdown()
        cluster.shutdown()
    base = results[0]["lanes"]["epoch_s"]
    ratios = {r["workers"]: r["lanes"]["epoch_s"] * r["workers"] / base for r in results}
    return {"chunks": chunks, "rows": rows, "sleep_per_chunk_s": sleep, "runs": results,
            "targets": [{"name": f"lanes: epoch time x {w} workers / time at 1", "value": round(v, 3),
                         "target": "0.75-1.33", "pass": 0.75 <= v <= 1.33} for w, v in ratios.items() if w > 1]
            + [{"name": f"lanes: rows decoded / training rows at {r['workers']} workers",
                "value": r["lanes"]["rows_decoded_per_row"], "target": "<= 1 + (N - 1) x chunk / rows",
                "pass": r["lanes"]["rows_decoded_per_row"] <= 1 + (r["workers"] - 1) * CHUNK_ROWS / rows}
               for r in results]}


def _figures(out, wall: float, reads: list[dict], rows: int, asked: dict[int, str] | None = None) -> dict:
    figures = {"epoch_s": round(wall, 2), "worker_s": [round(seconds, 2) for _, seconds, _ in out],
               "read_slots": [slots for _, _, slots in out], "rows_delivered": sum(got for got, _, _ in out),
               "rows_decoded_per_row": round(sum(r["rows"] for r in reads) / rows, 3), "read_tasks": len(reads)}
    if asked is not None:  # lanes on chunk boundaries: each chunk is one worker's, read on that worker's node?
        figures["read_tasks_on_the_asking_workers_node"] = sum(r["node"] == asked[r["chunk"]] for r in reads)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=48)
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds each chunk read sleeps")
    args = parser.parse_args()
    result = run(args.chunks, args.sleep)
    print(json.dumps(result, indent=1))
    lines = ["| workers | design | epoch s | rows decoded / row | rows delivered |", "|---|---|---|---|---|"]
    for r in result["runs"]:
        for design in ("lanes", "every_worker_reads_all", "streaming_split"):
            f = r[design]
            lines.append(f"| {r['workers']} | {design} | {f['epoch_s']} | {f['rows_decoded_per_row']} | "
                         f"{f['rows_delivered']:,} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
