"""What the trackers wrote, read back with each library's own reader: MLflow's client over the store,
TensorBoard's event accumulator over the event files, and W&B's record protobufs from an offline run's .wandb
file (W&B 0.31 ships no Python reader of it: the file is a LevelDB-style log of `Record` messages)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from rayscale.driver.tracking import metric_values

WANDB_BLOCK = 32 * 1024  # the log's block size; a record never starts in a block's last 6 bytes
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def expected_points(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metric name -> (samples_seen, value) of every metrics.jsonl line that carries it, in order."""
    points: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for name, value in metric_values(line).items():
            points.setdefault(name, []).append((line["samples_seen"], value))
    return points


def mlflow_points(client, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def tensorboard_points(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_text(log_dir: Path, tag: str = "config/text_summary") -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return events.Tensors(tag)[0].tensor_proto.string_val[0].decode()


def wandb_records(path: Path):
    """Every `Record` in a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", ident
    position, pending = 7, b""
    while position + 7 <= len(data):
        if WANDB_BLOCK - position % WANDB_BLOCK < 7:  # the block's tail is padding
            position += WANDB_BLOCK - position % WANDB_BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zeros: padding to the block's end
            position += WANDB_BLOCK - position % WANDB_BLOCK
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir: Path) -> dict:
    """The offline runs in `run_dir`/wandb, read together: the run record (config, group, id), the history
    points by metric (step, value), and the files saved."""
    found = {"runs": [], "points": {}, "files": []}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["runs"].append(record.run)
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                for name, value in items.items():
                    if not name.startswith("_"):
                        found["points"].setdefault(name, []).append((record.history.step.num, value))
            elif kind == "files":
                found["files"] += [file.path for file in record.files.files]
    return found


def wandb_config(run) -> dict:
    return {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
