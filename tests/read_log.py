"""A Ray `worker_process_setup_hook` for tests: every process of the job appends what it reads to
$RAYSCALE_TEST_READ_LOG/<pid>.jsonl. A Ray Data read task logs each chunk it reads from the source (its node,
the split, the chunk and the chunk's rows: what Parquet decoded); a training rank logs the chunk pieces it asks
for (its rank, node, the split and the pieces). Nothing is logged unless the variable is set."""

from __future__ import annotations

import json
import os
from pathlib import Path


def install() -> None:
    directory = os.environ.get("RAYSCALE_TEST_READ_LOG")
    if not directory:
        return
    import ray

    from rayscale.data import splits
    from rayscale.launch import ray_context

    def log(record: dict) -> None:
        with open(Path(directory) / f"{os.getpid()}.jsonl", "a") as out:
            out.write(json.dumps(record) + "\n")

    read_chunk = splits._read_split_chunk

    def logged_chunk(index, spec):
        chunk = spec.info.chunks[index]
        log({"kind": "read", "node": ray.get_runtime_context().get_node_id(), "split": spec.split,
             "chunk": int(index), "rows": int(chunk.stop - chunk.start)})
        return read_chunk(index, spec)

    splits._read_split_chunk = logged_chunk
    asked = ray_context.RayTrainContext.read

    def logged_read(self, split, reads, prefetch):
        log({"kind": "ask", "rank": self.rank, "node": self.node_id, "split": split,
             "pieces": [[read.chunk, read.skip, read.take] for read in reads]})
        return asked(self, split, reads, prefetch)

    ray_context.RayTrainContext.read = logged_read


def records(directory: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(Path(directory).glob("*.jsonl"))
            for line in path.read_text().splitlines()]
