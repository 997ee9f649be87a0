"""The data a run's checkpoints were made on (`data.json` in its run directory), and the check that a resumed run
still reads the same. A checkpoint holds a position in the epoch's row order and a model sized for the data's
classes and inputs: resumed on other data, the position falls on other rows (or past the end) and the weights
no longer fit the model the new data sizes. check_same_config compares the config; this compares what the same
`data.source` path gives now, before any cluster resource is claimed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from rayscale.data.sources import DataSpec, SourceInfo
from rayscale.driver.prepare import PreparedRun, saved_attempt
from rayscale.errors import UserError
from rayscale.files import DATA_RECORD_FILE

RECORD_VERSION = 1


@dataclass(frozen=True)
class DataRecord:
    """What a resumed run must find again: the model's sizes, the rows of each split, the feature columns by
    name, and each source's layout (its files and row groups, rows each) that row ids are counted over."""

    spec: DataSpec
    train_rows: int
    val_rows: int
    feature_columns: tuple[str, ...]
    train_layout: str  # a digest of the training source's chunks; "" where rows are not files (a Ray Dataset)
    val_layout: str  # data.val_source's; "" without one

    @classmethod
    def of(cls, prepared: PreparedRun) -> DataRecord:
        val_source = prepared.val.info if prepared.val is not None and prepared.cfg.data.val_source else None
        return cls(prepared.spec, prepared.train_rows, prepared.val_rows, prepared.train.info.features,
                   layout(prepared.train.info, prepared.cfg.data.source),
                   layout(val_source, prepared.cfg.data.val_source) if val_source is not None else "")

    def to_dict(self) -> dict:
        return {"version": RECORD_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict) -> DataRecord:
        spec = dict(raw["spec"])
        spec["input_shape"] = tuple(spec["input_shape"])
        return cls(DataSpec(**spec), int(raw["train_rows"]), int(raw["val_rows"]), tuple(raw["feature_columns"]),
                   str(raw["train_layout"]), str(raw["val_layout"]))


def layout(info: SourceInfo, source: str) -> str:
    """A digest of which rows come from where: each chunk's file (relative to `source`), row group and row ids.
    Digits and synthetic data are fixed by the config; a Ray Dataset's blocks are new objects every run."""
    if info.kind != "parquet":
        return ""
    digest = hashlib.sha256()
    for chunk in info.chunks:
        path = chunk.path[len(source):] if chunk.path and chunk.path.startswith(source) else chunk.path
        digest.update(f"{path}\0{chunk.row_group}\0{chunk.start}\0{chunk.stop}\n".encode())
    return digest.hexdigest()


def write(prepared: PreparedRun) -> None:
    (prepared.run_dir / DATA_RECORD_FILE).write_text(json.dumps(DataRecord.of(prepared).to_dict(), indent=2) + "\n")


def check_same_data(prepared: PreparedRun) -> None:
    """A run that left checkpoints resumes only on the data they were made on. An online run's source grows by
    design: only what sizes its model is compared. A run directory without the record (an older rayscale's) is
    not checked."""
    cfg, path = prepared.cfg, prepared.run_dir / DATA_RECORD_FILE
    if not path.is_file() or not saved_attempt(cfg, prepared.run_dir):
        return
    try:
        raw = json.loads(path.read_text())
        saved = DataRecord.from_dict(raw) if raw.get("version") == RECORD_VERSION else None
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        saved = None
    if saved is None:
        raise UserError(f"run.name {cfg.run.name}: {path} is not a data record this rayscale reads, so the "
                        f"checkpoints there cannot be matched to the data; pick another run.name")
    now = DataRecord.of(prepared)
    val_key = "data.val_source" if cfg.data.val_source else "data.source"
    if (change := _first_difference(saved, now, cfg.data.online, val_key)) is None:
        return
    key, what = change
    raise UserError(f"{key}: {what}, but the checkpoints in {prepared.run_dir} were made on other data; "
                    f"expected the data the run started on, or another run.name to train on this data")


def _first_difference(saved: DataRecord, now: DataRecord, online: bool, val_key: str) -> tuple[str, str] | None:
    """(the config key, what its data gives now against what it gave) of the first difference; None if none."""
    if saved.spec != now.spec:
        return "data.source", f"now gives {_sized(now.spec)} (was {_sized(saved.spec)})"
    if saved.feature_columns != now.feature_columns:
        return "data.source", (f"now has the feature columns {', '.join(now.feature_columns)} "
                               f"(was {', '.join(saved.feature_columns)})")
    if online:
        return None
    if saved.train_rows != now.train_rows:
        return "data.source", f"now leaves {now.train_rows} training rows (was {saved.train_rows})"
    if saved.train_layout != now.train_layout:
        return "data.source", "now has other files or row groups (the same number of rows)"
    if saved.val_rows != now.val_rows:
        return val_key, f"now leaves {now.val_rows} validation rows (was {saved.val_rows})"
    if saved.val_layout != now.val_layout:
        return val_key, "now has other files or row groups (the same number of rows)"
    return None


def _sized(spec: DataSpec) -> str:
    outputs = "targets" if spec.task == "regression" else "classes"
    vocabulary = f", a vocabulary of {spec.vocab_size}" if spec.vocab_size is not None else ""
    return f"{spec.task} data with inputs {spec.input_shape}, {spec.num_outputs} {outputs}{vocabulary}"
