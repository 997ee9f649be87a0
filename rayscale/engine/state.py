"""The typed contracts of a run: what the driver sends each worker, and what a checkpoint says of training.

Both cross a boundary (Ray's, or a restart's) as plain data with a version, so a reader never guesses at a key:
`WorkerPayload.from_dict` and `TrainState.from_checkpoint` refuse what they do not know, with one line naming
it. A component's own state (the weight average, the noise scale, the online feed...) travels in
`TrainState.parts` under the component's name, as the plain dict its `part()` gives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rayscale.data.sources import DataSpec
from rayscale.data.splits import SplitSpec
from rayscale.plugins import UserCode

PAYLOAD_VERSION = 4  # 2: the data layout in lanes (train_split, chunk rows, lanes); 3: watch_drains; 4: code
STATE_VERSION = 2  # 1: rayscale <= 0.1's `progress` dict (read, see _from_version_1)


class CheckpointVersionError(ValueError):
    """A checkpoint written by a rayscale this one cannot read."""


@dataclass(frozen=True)
class WorkerPayload:
    """Everything a worker needs besides its data and its checkpoint, built once by the driver."""

    config: dict  # config.to_dict(cfg): the worker's first line turns it back into the typed config
    spec: DataSpec  # what the model takes and gives, read from the data on the driver
    run_dir: str  # where rank 0 writes metrics.jsonl (and local checkpoints)
    train_rows: int  # rows in one epoch of the training split
    val_rows: int  # 0: no validation
    local_mode: bool = False  # scaling.num_workers 0: the loop runs in the driver's process
    train_split: SplitSpec | None = None  # which rows of which source each split holds (None: online)
    val_split: SplitSpec | None = None
    train_chunk_rows: tuple[int, ...] = ()  # training rows in each chunk of the source: the lanes are cut from it
    val_chunk_rows: tuple[int, ...] = ()  # and the validation shards
    lanes: int = 1  # data.lanes for a new run (a checkpoint's own lanes win on resume)
    cache_train: bool = False  # a worker may keep its lanes in memory (data.cache_mb, fixed-width rows)
    val_cache: tuple[tuple[int, int], ...] | None = None  # chunk bounds a worker may replay validation from
    eval_at_samples: tuple[int, ...] = ()  # extra validation points (Tune's rungs)
    pause_at_samples: tuple[int, ...] = ()  # ASHA by promotion: end at the first of these past the start
    ps_servers: tuple[str, ...] = ()  # train.strategy parameter_server: the servers' actor names
    ps_shards: tuple[tuple[int, ...], ...] = ()  # and each one's parameter indices
    watch_drains: bool = False  # on a cluster with Ray's preemption watcher: checkpoint when a node is drained
    code: UserCode = UserCode()  # rayscale.train's model=, loss=, metrics= (crosses pickled, as Ray sends it)
    progress_lines: bool = True  # rank 0 prints a line every log interval (False: the driver draws a bar)
    report_evaluations: bool = False  # every validation is reported (a Tune trial's), not only checkpoints

    def to_dict(self) -> dict:
        # The split specs cross as objects (Ray pickles them): they hold the source's chunk list and data config.
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"version": PAYLOAD_VERSION, **plain, "spec": dataclasses.asdict(self.spec)}

    @classmethod
    def from_dict(cls, raw: dict) -> WorkerPayload:
        raw = dict(raw)
        version = raw.pop("version", None)
        if version != PAYLOAD_VERSION:
            raise ValueError(f"worker payload version {version}: this rayscale reads version {PAYLOAD_VERSION} "
                             f"(driver and workers run different rayscale versions)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(raw) - known, {"config", "spec", "run_dir", "train_rows", "val_rows"} - set(raw)
        if unknown or missing:
            raise ValueError(f"worker payload: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
        spec = raw["spec"]
        raw["spec"] = DataSpec(**{**spec, "input_shape": tuple(spec["input_shape"])})
        for name in ("train_chunk_rows", "val_chunk_rows", "eval_at_samples", "pause_at_samples", "ps_servers"):
            raw[name] = tuple(raw.get(name, ()))
        raw["ps_shards"] = tuple(tuple(shard) for shard in raw.get("ps_shards", ()))
        if raw.get("val_cache") is not None:
            raw["val_cache"] = tuple(tuple(bounds) for bounds in raw["val_cache"])
        return cls(**raw)


@dataclass
class TrainState:
    """Where training stands. Saved in every checkpoint beside the weights, optimizer and RNG states."""

    epoch: int = 0  # the epoch in progress (epochs done, at an epoch end); online: 1 once the stream ended
    step_in_epoch: int = 0  # steps committed in that epoch (online: in the file in progress)
    lanes: int | None = None  # the lanes the training split is laid out in (math/lanes.py): fixed for the run
    samples_seen: int = 0  # rows trained, all workers together
    step: int = 0  # optimizer steps taken (skipped ones included)
    resumes: int = 0  # times a checkpoint was restored: restarts and resumes from a rung's pause
    nonfinite_skipped: int = 0  # steps skipped for non-finite loss or gradients
    val_loss: float | None = None  # the latest validation
    val_accuracy: float | None = None
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)  # each component's state, by its name
    val_metrics: dict[str, float] = field(default_factory=dict)  # the latest validation's train.metrics

    def validation(self) -> dict[str, float]:
        """The latest validation metrics that exist (for reports between validations)."""
        return {**{key: value for key, value in (("val_loss", self.val_loss), ("val_accuracy", self.val_accuracy))
                   if value is not None}, **self.val_metrics}

    def to_checkpoint(self) -> dict:
        return {"version": STATE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_checkpoint(cls, raw: dict, where: str) -> TrainState:
        """`raw`: what a checkpoint's state file holds under "train_state" (or a version 1 file's "progress")."""
        raw = dict(raw)
        version = raw.pop("version", 1)
        if version == 1:
            return _from_version_1(raw)
        if version != STATE_VERSION:
            raise CheckpointVersionError(f"checkpoint {where}: training state version {version}, but this rayscale "
                                         f"reads versions 1 to {STATE_VERSION}; resume it with the rayscale that "
                                         f"wrote it, or pick another run.name")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(raw) - known:
            raise CheckpointVersionError(f"checkpoint {where}: unknown training state keys "
                                         f"{sorted(set(raw) - known)}")
        return cls(**raw)


# A version 1 checkpoint's `progress` dict: its optional keys, and the component part each one now lives in.
_VERSION_1_PARTS = {"micro_batch_size": ("micro_batch", "micro_batch_size"),
                    "global_batch_size": ("adaptive_batch", "global_batch_size"),
                    "paused": ("rung_pause", "paused"), "rung_resumes": ("rung_pause", "rung_resumes")}


def _from_version_1(progress: dict) -> TrainState:
    core = {f.name for f in dataclasses.fields(TrainState)} - {"parts"}
    state = TrainState(**{key: value for key, value in progress.items() if key in core})
    for key, (part, name) in _VERSION_1_PARTS.items():
        if progress.get(key) is not None:
            state.parts.setdefault(part, {})[name] = progress[key]
    if progress.get("noise_scale"):
        state.parts["noise_scale"] = dict(progress["noise_scale"])
    if progress.get("online"):
        state.parts["online_feed"] = dict(progress["online"])
    return state
