"""Typed config: one definition per key, with its type, default, unit and meaning.

A config is a tree of dataclasses. Users write YAML with the same nesting and override single keys with
dotted paths (`--set optim.lr=0.1`). Values are coerced to the declared type once, here, so the rest of the
code never re-parses strings. Crossing into Ray workers, the config travels as a plain dict
(`to_dict`) and is rebuilt with `from_dict` on the other side.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayscale.errors import ConfigError, argument
from rayscale.files import CONFIG_FILE


def key(default: Any, doc: str, *, unit: str | None = None, choices: tuple | None = None,
        minimum: float | None = None, exclusive_minimum: bool = False, maximum: float | None = None,
        words: tuple[str, ...] = (), name_in: str | None = None) -> Any:
    """A config field with its documentation; `minimum` is inclusive unless `exclusive_minimum`, `maximum`
    inclusive; `words`: the
    only strings a numeric key also takes (e.g. auto); `name_in`: the value names one entry of that directory
    (a file or directory name, never a path that could lead outside it). Every number must be finite."""
    meta = {"doc": doc, "unit": unit, "choices": choices, "minimum": minimum,
            "exclusive_minimum": exclusive_minimum, "maximum": maximum, "words": words, "name_in": name_in}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass
class SyntheticConfig:
    kind: str = key("classification", "what the generator makes",
                    choices=("classification", "regression", "image", "sequence"))
    rows: int = key(20_000, "rows generated (lazily, a chunk at a time where they are read; never whole on the "
                            "driver)", unit="rows",
                    minimum=1)
    num_features: int = key(32, "feature width for classification/regression", minimum=1)
    num_classes: int = key(10, "classes for classification/image/sequence labels", minimum=2)
    image_size: int = key(16, "side of the square single-channel images", unit="pixels", minimum=4)
    max_length: int = key(64, "longest sequence for kind=sequence", unit="tokens", minimum=2)
    vocab_size: int = key(64, "token vocabulary for kind=sequence", minimum=4)
    noise: float = key(0.5, "label noise / feature noise scale", minimum=0.0)


@dataclass
class DataConfig:
    source: str = key("digits", "digits | synthetic | a Parquet file, directory, glob or URI (s3://, gs://; a "
                                "relative path is from where rayscale runs) | ray_dataset:train_data (a "
                                "ray.data.Dataset given as rayscale.train(train_data=))")
    features: list[str] | None = key(None, "Parquet feature columns (null: every column not used otherwise)")
    label: str = key("label", "Parquet label column")
    weight: str | None = key(None, "optional Parquet per-sample weight column: weights from 0 to below 1e20, the "
                                     "largest at least 1e-20 (a weighted loss does not change when every weight is "
                                     "divided by one number)")
    sequence: str | None = key(None, "optional Parquet token-sequence column (list of ints); the label column "
                                     "then holds one label per token (a list of ints; -100 masks a token) or one "
                                     "per sequence (an int)")
    num_classes: int | None = key(None, "classes of an integer label (null: max label + 1, read from the data)",
                                  minimum=2)
    val_fraction: float = key(0.2, "share of rows held out for validation when val_source is not set",
                              minimum=0.0)
    val_source: str | None = key(None, "separate validation data (same kinds as source; "
                                       "ray_dataset:val_data: val_data=)")
    shuffle: str = key("local", "per-epoch shuffle: local (block order + seeded buffer), full, none",
                       choices=("local", "full", "none"))
    shuffle_buffer_rows: int = key(2048, "local shuffle buffer (all lanes together: each lane shuffles windows of "
                                         "this / data.lanes rows)", unit="rows", minimum=1)
    lanes: int | None = key(None, "the training rows are laid out in this many lanes, each read by one worker; "
                                  "fixed for a run (kept in its checkpoints), a multiple of the worker count "
                                  "(null: the first run's scaling.num_workers; elastic: the least common "
                                  "multiple of every worker count it may take)", minimum=1)
    cache_mb: float = key(1024.0, "a worker keeps its own lanes of the training split, and its shard of the "
                                  "validation split, in memory after a first full pass when they are at most "
                                  "this size, and replays later epochs from there bitwise (0: stream every "
                                  "epoch; never for sequences)", unit="MiB", minimum=0.0)
    read_in_worker_mb: float = key(64.0, "a split estimated at most this size is read by each worker itself, "
                                         "not by Ray Data's read tasks (which start in new processes, seconds "
                                         "before the first block); 0: always Ray Data", unit="MiB", minimum=0.0)
    bucket_by_length: bool = key(False, "group sequences of similar length to cut padding")
    stratified: bool = key(False, "class-balanced batches (classification)")
    curriculum_column: str | None = key(None, "curriculum: a numeric Parquet column, lower = easier; early epochs "
                                              "are ordered easy to hard (null: off; never a feature)")
    curriculum_fraction: float = key(0.3, "curriculum: share of training (epochs x training rows) over which "
                                          "harder rows are admitted; later epochs shuffle as usual",
                                     minimum=0.0, exclusive_minimum=True)
    curriculum_start: float = key(0.1, "curriculum: share of rows (the easiest) admitted from the first step",
                                  minimum=0.0, exclusive_minimum=True)
    online: bool = key(False, "one pass over data.source, a local directory that may grow while training runs: "
                              "files in name order, no epochs (train.epochs and data.val_fraction are ignored)")
    online_poll_s: float = key(2.0, "online: how often rank 0 lists the directory for new files",
                               unit="seconds", minimum=0.0, exclusive_minimum=True)
    online_idle_timeout_s: float = key(60.0, "online: the run ends when no new file has appeared for this long "
                                             "with nothing left to train", unit="seconds", minimum=0.0)
    synthetic: SyntheticConfig = section(SyntheticConfig, "generator settings for source=synthetic")


@dataclass
class ModelConfig:
    name: str = key("mlp", "mlp | cnn | transformer | package.module:factory")
    kwargs: dict = key({}, "keyword arguments for the model factory (e.g. hidden_sizes, d_model); a user factory "
                           "also gets the data sizes its signature names (input_shape, num_classes, vocab_size, ...)")
    init_from: str | None = key(None, "start a new run from these weights: a run directory, one of its "
                                      "checkpoints, or a .safetensors or .pt state_dict file (a resumed run "
                                      "continues from its own checkpoint); every worker reads it")
    activation_checkpointing: bool = key(False, "recompute activations in backward (built-in models; user models "
                                                "through an activation_checkpointing argument or attribute, or "
                                                "Hugging Face's gradient_checkpointing_enable)")


@dataclass
class BatchConfig:
    global_batch_size: int = key(128, "samples per optimizer step, all workers together", unit="samples",
                                 minimum=1)
    micro_batch_size: int | str | None = key(
        32, "samples per forward/backward on one worker; null: the whole per-worker batch (no accumulation); "
            "auto: start there and halve it on every worker whenever one runs out of device memory (the step is "
            "redone, the global batch kept)", unit="samples", minimum=1, words=("auto",))
    adaptive: str = key("none", "change the global batch at epoch ends: none; step (x batch.growth_factor every "
                                "batch.growth_every_samples: Smith et al. 2018, grow the batch instead of decaying "
                                "the lr); goodput (the best predicted goodput from the measured noise scale and "
                                "step times: Pollux). The lr follows optim.scaling_rule",
                        choices=("none", "step", "goodput"))
    growth_factor: float = key(2.0, "batch.adaptive step: the global batch is multiplied by this at each milestone",
                               minimum=1.0, exclusive_minimum=True)
    growth_every_samples: int | None = key(None, "batch.adaptive step: a milestone every this many samples (the "
                                                 "batch grows at the first epoch end past it)", unit="samples",
                                           minimum=1)
    max_global_batch_size: int | None = key(None, "batch.adaptive: the largest global batch (null: the initial one "
                                                  "doubled up to 64x, at most the training rows)", unit="samples",
                                            minimum=1)


@dataclass
class ScalingConfig:
    num_workers: int = key(2, "Ray Train workers (0: local mode, the loop runs in the driver; not in a search); with "
                              "scaling.min_workers, the most an elastic run grows to ([min, max] sets both)",
                           minimum=0)
    min_workers: int | None = key(None, "elastic: the fewest workers a run goes on with when nodes go (null: "
                                        "always num_workers); each worker group starts at the most the cluster "
                                        "fits, with the same global batch, lr and data order", minimum=1)
    resize_check_s: float = key(60.0, "elastic: how often Ray Train looks for room for more workers and grows "
                                      "the group (a restart from the latest checkpoint)", unit="seconds",
                                minimum=1.0)
    use_gpu: bool = key(False, "one GPU per worker, nccl backend")
    # Ray refuses a worker bundle of zero resources (and a GPU worker still runs its loop on a CPU).
    cpus_per_worker: float = key(1.0, "CPUs reserved per worker; its torch threads: the whole part, at least 1 "
                                      "(Ray's OMP_NUM_THREADS)", minimum=0.0, exclusive_minimum=True)

    @staticmethod
    def from_raw(raw: dict, prefix: str) -> dict:
        """`num_workers: [min, max]` is min_workers and num_workers in one key."""
        counts = raw.get("num_workers")
        if not isinstance(counts, (list, tuple)):
            return raw
        if len(counts) != 2 or "min_workers" in raw:
            raise ConfigError(f"{prefix}num_workers: expected an integer or [min, max] (and then no "
                              f"{prefix}min_workers), got {list(counts)!r}")
        return {**raw, "min_workers": counts[0], "num_workers": counts[1]}

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None

    def worker_counts(self) -> range:
        """Every worker count a group of this run may start with (local mode: the one process)."""
        most = max(self.num_workers, 1)
        return range(min(self.min_workers or most, most), most + 1)


@dataclass
class TrainConfig:
    epochs: int = key(12, "passes over the training data", minimum=1)
    precision: str = key("fp32", "fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, GPU only)",
                         choices=("fp32", "bf16", "fp16"))
    grad_clip: float | None = key(None, "clip gradients to this global L2 norm (null: off; norm is still "
                                        "reported)", minimum=0.0, exclusive_minimum=True)
    max_nonfinite_steps: int = key(5, "abort after this many non-finite steps in a row (each is skipped)",
                                   unit="steps", minimum=1)
    log_every_samples: int = key(2048, "rank 0 writes a metrics.jsonl line this often", unit="samples",
                                 minimum=1)
    eval_every_samples: int = key(0, "also validate mid-epoch every this many samples (0: at epoch ends only)",
                                  unit="samples", minimum=0)
    report_every_seconds: float = key(10.0, "ray.train.report at most this often (plus the epoch ends that "
                                            "checkpoint, and under rayscale tune every validation)",
                                      unit="seconds", minimum=0.0)
    noise_scale: bool = key(True, "measure the gradient noise scale, the critical batch size and this batch's "
                                  "statistical efficiency (needs 2+ workers or 2+ micro-batches; not with fp16)")
    noise_scale_every_steps: int = key(4, "measure the noise scale on one optimizer step in this many (with 2+ "
                                          "workers a measured step all-reduces after its backward, not during "
                                          "it)", unit="steps", minimum=1)
    compile: bool | str = key(False, "compile each micro-batch's forward and loss with torch.compile: true or "
                                     "inductor (generated kernels; on CPU needs a C++ compiler), aot_eager (traced "
                                     "but not code-generated: a check, no speed-up), false: eager; the backward, "
                                     "accumulation and optimizer step stay as they are; validation stays eager",
                              choices=(False, True, "inductor", "aot_eager"))
    strategy: str = key("ddp", "how workers combine gradients: ddp (all-reduce, every worker steps its own copy) "
                               "or parameter_server (workers pull the parameters from ps.num_servers Ray "
                               "actors, push gradients, and the optimizer steps on the servers)",
                        choices=("ddp", "parameter_server"))
    ema_half_life_samples: int | None = key(
        None, "validate and export an exponential moving average of the weights with this half-life (null: "
              "off); steadier mid-training val_loss for Tune's early stopping", unit="samples", minimum=1)
    loss: str | None = key(None, "package.module:function (output, batch) -> per-sample or per-token losses, or "
                                 "(losses, weights); rayscale sums and normalises them by the global count (null: "
                                 "the task's cross-entropy or MSE)")
    metrics: dict = key({}, "validation metrics, name: package.module:object (a function (output, batch) -> "
                            "per-sample values, or a torchmetrics Metric); written as val_<name> (not loss or accuracy: "
                            "rayscale's own)")


@dataclass
class ParameterServerConfig:
    num_servers: int = key(2, "server actors; the parameters are split between them by size, whole tensors "
                              "each", minimum=1)
    mode: str = key("sync", "sync: the servers wait for every worker's gradient, then step once (the model DDP "
                            "gives); async: each worker's gradient is applied as it arrives",
                    choices=("sync", "async"))
    max_staleness: int = key(2, "async: a gradient computed from parameters more than this many updates old is "
                                "refused, and the worker pulls and recomputes it", unit="updates", minimum=0)


@dataclass
class OptimConfig:
    name: str = key("sgd", "optimizer", choices=("sgd", "adamw", "lars", "lamb"))
    lr: float = key(0.1, "learning rate at base_batch_size (before the scaling rule)", minimum=0.0,
                    exclusive_minimum=True)
    momentum: float = key(0.9, "SGD/LARS momentum", minimum=0.0, maximum=1.0)
    nesterov: bool = key(False, "Nesterov momentum (SGD)")
    weight_decay: float = key(0.0, "decoupled for AdamW/LAMB; not applied to bias and norm parameters",
                              minimum=0.0)
    betas: list[float] = key([0.9, 0.999], "AdamW/LAMB moment coefficients")
    eps: float = key(1e-8, "AdamW/LAMB denominator epsilon", minimum=0.0, exclusive_minimum=True)
    trust_coefficient: float = key(0.001, "LARS trust coefficient (eta)", minimum=0.0, exclusive_minimum=True)
    base_batch_size: int | None = key(None, "batch size optim.lr was tuned for (null: the global batch)",
                                      unit="samples", minimum=1)
    scaling_rule: str = key("none", "how lr follows the global batch", choices=("none", "linear", "sqrt"))
    shard_state: bool = key(False, "DDP: each worker keeps the optimizer state (momentum, Adam moments) of its "
                                   "own share of the weight tensors only, about 1/num_workers of it, and "
                                   "broadcasts the tensors it steps (ZeRO stage 1); the same model within fp32 "
                                   "rounding, checkpoints as unsharded; with one worker it holds everything")


@dataclass
class ScheduleConfig:
    name: str = key("cosine", "decay after warmup",
                    choices=("constant", "step", "exponential", "polynomial", "cosine"))
    warmup_samples: int = key(1024, "linear warmup from 0 to the full lr", unit="samples", minimum=0)
    step_samples: int | None = key(None, "step/exponential: lr is multiplied by gamma every this many samples "
                                         "(null: a third of the decay span)", unit="samples", minimum=1)
    gamma: float = key(0.1, "step/exponential decay factor", minimum=0.0, exclusive_minimum=True)
    power: float = key(2.0, "polynomial power (2: square decay)", minimum=0.0, exclusive_minimum=True)
    final_lr_ratio: float = key(0.0, "polynomial/cosine: lr at the end as a fraction of the peak", minimum=0.0,
                                maximum=1.0)


@dataclass
class RunConfig:
    output_dir: str = key("runs", "where run directories are written (a local or shared-filesystem path)")
    name: str = key("default", "run directory name; re-running the same name resumes it (a name inside "
                               "run.output_dir: not a path, not a symbolic link)", name_in="run.output_dir")
    storage_path: str | None = key(None, "where Ray Train keeps checkpoints (null: <run dir>/checkpoints); on a "
                                         "multi-node cluster a URI every node reaches (s3://bucket/prefix, "
                                         "gs://..., or a shared mount)")
    checkpoint_every_samples: int | None = key(None, "also checkpoint mid-epoch this often (null: epoch ends only)",
                                               unit="samples", minimum=1)
    checkpoint_every_seconds: float = key(10.0, "an epoch end checkpoints only once this long has passed since "
                                                "the last checkpoint (0: every epoch end); the last epoch, a rung "
                                                "pause, a drain notice and run.checkpoint_every_samples "
                                                "checkpoint whatever it says", unit="seconds", minimum=0.0)
    max_failures: int = key(3, "worker-group restarts after a fault (a worker or node lost without notice) "
                               "before giving up", minimum=0)
    max_preemptions: int | None = key(None, "restarts after a preemption (a node drained first: spot "
                                            "interruption, autoscaler scale-down) before giving up (null: no "
                                            "limit); counted apart from run.max_failures", minimum=0)
    preemption_check_steps: int = key(4, "on a cluster, every this many steps the workers agree whether a node "
                                         "of theirs is being drained, and if so checkpoint at once and wait for "
                                         "the restart", unit="steps", minimum=1)
    checkpoint_upload: str = key("async", "async: a checkpoint is copied to storage in the background while "
                                          "training goes on (used once every rank's copy is whole); sync: "
                                          "training waits for the copy", choices=("async", "sync"))
    checkpoint_upload_fn: str | None = key(None, "pkg.module:function(local_dir, destination) that copies a "
                                                 "checkpoint part to storage, for storage Ray cannot write to "
                                                 "(null: Ray's pyarrow copy)")
    hang_timeout_s: float = key(60.0, "a frozen worker (a collective stuck this long, or no answer to Ray "
                                      "Train's health check) fails the attempt, which then restarts from the "
                                      "last checkpoint; Ray's defaults are 30 and 10 minutes", unit="seconds",
                                minimum=1.0)
    progress: str = key("auto", "auto: a progress bar with rate and ETA on an interactive terminal, else a line "
                                "every train.log_every_samples; bar; lines", choices=("auto", "bar", "lines"))
    poll_interval_s: float = key(0.25, "how often Ray Train's controller polls its workers; every report (and "
                                       "checkpoint) waits for a poll, so Ray's 2 s default costs up to 2 s per "
                                       "epoch end", unit="seconds", minimum=0.01, maximum=60.0)
    trackers: list[str] = key([], "experiment trackers the driver logs the config, every metrics.jsonl line and the "
                                  "final model to: mlflow (a sqlite store in the run directory unless "
                                  "MLFLOW_TRACKING_URI is set), tensorboard (<run dir>/tensorboard), wandb (offline "
                                  "in <run dir>/wandb unless WANDB_MODE is set); each is a pip extra",
                              choices=("mlflow", "tensorboard", "wandb"))


@dataclass
class TuneConfig:
    space: dict = key({}, "search space: dotted config key -> {choice|grid: [values]} or {uniform|loguniform|"
                          "randint: [low, high]} (empty: the built-in batch-size and lr-decay space)")
    num_samples: int = key(8, "trials to sample (with grid domains: repeats of the whole grid)", minimum=1)
    metric: str = key("val_loss", "what ASHA and the ranking compare (any reported metric)")
    mode: str = key("min", "whether lower or higher metric is better", choices=("min", "max"))
    grace_samples: int | None = key(None, "ASHA grace period (null: a trial's samples / "
                                          "reduction_factor^3, four rungs); never less than the largest warmup "
                                          "in the space", unit="samples", minimum=1)
    reduction_factor: float = key(3.0, "ASHA keeps 1/reduction_factor of trials at each rung", minimum=1.0,
                                  exclusive_minimum=True)
    asha_variant: str = key("stopping", "stopping: Ray's ASHA, a trial at a rung goes on only if it beats what "
                                        "the rung has recorded so far; promotion: Li et al.'s, trials pause at "
                                        "each rung and the best are resumed (fair whatever the trial order)",
                            choices=("stopping", "promotion"))
    grid_order: str = key("shuffled", "order the grid domains' combinations run in: shuffled (seeded by seed; "
                                      "what ASHA assumes) or listed (as written, last key fastest)",
                          choices=("shuffled", "listed"))
    search: str = key("random", "search algorithm (grid domains need random, which enumerates them); "
                                "optuna and hyperopt need their packages", choices=("random", "optuna", "hyperopt"))
    max_concurrent_trials: int | None = key(None, "trials at once (null: as many as the cluster's CPUs or GPUs "
                                                  "fit, one CPU kept for Ray Data)", minimum=1)


@dataclass
class Config:
    seed: int = key(0, "seeds data order, model init and dropout", minimum=0, maximum=2**32 - 1)  # numpy's and
    # torch's generators both take it (numpy refuses a negative seed, torch one of 2**64 or more)
    data: DataConfig = section(DataConfig, "where samples come from")
    model: ModelConfig = section(ModelConfig, "what is trained")
    batch: BatchConfig = section(BatchConfig, "global batch and micro-batching")
    scaling: ScalingConfig = section(ScalingConfig, "Ray Train workers")
    train: TrainConfig = section(TrainConfig, "training loop")
    optim: OptimConfig = section(OptimConfig, "optimizer and learning-rate scaling")
    ps: ParameterServerConfig = section(ParameterServerConfig, "train.strategy parameter_server: servers and mode")
    schedule: ScheduleConfig = section(ScheduleConfig, "warmup and decay, measured in samples")
    run: RunConfig = section(RunConfig, "outputs and checkpoints")
    tune: TuneConfig = section(TuneConfig, "rayscale tune: search space and ASHA")


# ---------------------------------------------------------------------------------------------- coercion

def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads 1e5 or 5_000 as strings; accept numbers written that way.
        try:
            return _coerce(float(value.replace("_", "")) if tp is float else
                           _integral(float(value.replace("_", ""))), tp, path)
        except (ValueError, ConfigError):
            pass
    elif tp is int:  # numbers.Integral: numpy's integers too (a value from a sweep in a notebook)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():  # 1e5 in YAML is a float
            return int(value)
    elif tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _integral(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(name: str, known: typing.Iterable[str], prefix: str) -> ConfigError:
    full = f"{prefix}{name}"
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ConfigError(f"unknown config key {full}{hint}")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {raw!r}")
    if hasattr(cls, "from_raw"):  # a section that also takes a shorthand form of its keys
        raw = cls.from_raw(raw, prefix)
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for name, value in raw.items():
        if name not in fields:
            raise _unknown(str(name), fields, prefix)
        tp = hints[name]
        if _is_section(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    obj = cls(**kwargs)
    _check_ranges(obj, prefix)
    return obj


def _check_ranges(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        _check_value(getattr(obj, f.name), f.metadata, f"{prefix}{f.name}", nullable="None" in str(f.type))


def _yaml_word(choice: Any) -> str:
    """A choice as the user writes it in YAML or --set: true, not True."""
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


def _check_value(value: Any, meta: typing.Mapping[str, Any], path: str, nullable: bool) -> None:
    """The schema's checks on one coerced value: its words or choices, finite, its minimum, a plain name."""
    words, choices, minimum, name_in = (meta.get(k) for k in ("words", "choices", "minimum", "name_in"))
    if words and isinstance(value, str) and value not in words:
        raise ConfigError(f"{path}: expected a number{', null' if nullable else ''} or "
                          f"{' or '.join(words)}, got {value!r}")
    for item in (value if choices and isinstance(value, list) else [value] if choices else []):  # a list: each
        if item not in choices:
            close = difflib.get_close_matches(str(item), [_yaml_word(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{path}: expected {'each to be ' if item is not value else ''}one of "
                              f"{', '.join(map(_yaml_word, choices))}, got {item!r}{hint}")
    # nan passes every comparison below and inf is no amount of anything: no key takes either. YAML's .nan
    # and .inf, and nan or inf written as a string, all arrive here as floats.
    if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    if minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("exclusive_minimum") and value <= minimum:
            raise ConfigError(f"{path}: expected a value greater than {minimum:g}, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{path}: expected a value of at least {minimum:g}, got {value!r}")
    maximum = meta.get("maximum")
    if maximum is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value > maximum:
        raise ConfigError(f"{path}: expected a value of at most {maximum}, got {value!r}")
    if name_in and not _is_plain_name(value):
        raise ConfigError(f"{path}: expected a name inside {name_in} (not empty, '.' or '..', no '/', at most "
                          f"{NAME_MAX} bytes), got {_shortened(value)}")


NAME_MAX = 255  # bytes in one directory entry (Linux, macOS, Windows' NTFS in UTF-16 units)


def _is_plain_name(name: str) -> bool:
    """One entry of a directory: joined to it, such a name cannot lead anywhere else, and a file system takes it."""
    separators = {"/", os.sep, os.altsep} - {None}
    return (name not in ("", ".", "..") and "\0" not in name and not any(s in name for s in separators)
            and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX)


def _shortened(value: Any) -> str:
    """repr(value), cut in the middle past 80 characters: an error line stays one readable line."""
    shown = repr(value)
    return shown if len(shown) <= 80 else f"{shown[:40]}...{shown[-20:]} ({len(str(value))} characters)"


# -------------------------------------------------------------------------------------------- public API

def to_dict(config: Any) -> dict:
    """Plain nested dict: what crosses the Ray boundary and what config.yaml holds."""
    return dataclasses.asdict(config)


def from_dict(raw: dict) -> Config:
    return _build(Config, raw)


def key_type(dotted: str) -> Any:
    """The schema's type of a dotted key (None: not a key of the schema, or inside a free-form mapping)."""
    cls: Any = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _takes_only_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                         and set(typing.get_args(tp)) == {str, type(None)})


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=0.1` -> ("optim.lr", 0.1). Values are read as YAML (1.2's plain scalars, `_ConfigLoader`), so
    `null`, `[1, 2]`, `true` work; a key that takes only text takes what was written (`run.name=010`)."""
    if "=" not in text:
        if argument("set") == "--set":
            raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set optim.lr=0.1")
        raise ConfigError(f"overrides: {text!r}: expected KEY=VALUE, e.g. 'optim.lr=0.1' (or a mapping)")
    dotted, raw_value = text.split("=", 1)
    dotted = dotted.strip()
    if not all(dotted.split(".")):  # `=3`, `.lr=3`, `optim..lr=3`: an empty key named nothing in its error
        shown = f"--set {text}" if argument("set") == "--set" else f"overrides: {text!r}"
        raise ConfigError(f"{shown}: expected a dotted key before '=', e.g. optim.lr=0.1, got {dotted!r}")
    try:
        value = yaml.load(raw_value, Loader=_ConfigLoader) if raw_value.strip() else ""  # noqa: S506 (safe)
    except RecursionError:
        raise ConfigError(f"{argument('set')} {dotted}: value nested too deeply to read") from None
    except yaml.YAMLError:
        value = raw_value
    if isinstance(value, int | float) and _takes_only_text(key_type(dotted)):  # (bool is an int)
        value = raw_value.strip()
    check_expansion(value, f"{argument('set')} {dotted}" if argument("set") == "--set" else f"overrides: {dotted!r}")
    return dotted, value


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set a dotted key in a raw (unvalidated) config dict, checking the key against the schema."""
    parts = dotted.split(".")
    cls: Any = Config
    node = raw
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth]) + ("." if depth else "")
        if cls is dict:  # free-form mapping such as model.kwargs: any key is allowed below it
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        fields = _fields(cls)
        if part not in fields:
            raise _unknown(part, fields, prefix)
        tp = _hints(cls)[part]
        last = depth == len(parts) - 1
        if last:
            if _is_section(tp):
                raise ConfigError(f"{dotted} is a section; set one of its keys, e.g. {dotted}."
                                  f"{next(iter(_fields(tp)))}=...")
            node[part] = value
            return
        if not (_is_section(tp) or tp is dict):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])} is a value, not a section")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, cls = child, tp


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last one silently,
    and a second `train:` section would drop the first one's keys)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, once or more, as YAML allows
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _ConfigLoader(_UniqueKeyLoader):
    """YAML 1.2's plain scalars instead of 1.1's, which PyYAML implements: `yes`, `no`, `on` and `off` are words,
    not booleans (`data.label: no` was False, `data.features: [on, off]` [True, False]); 010 is ten, not eight;
    1:30 is text, not 90 (sexagesimal); 2024-01-05 is text, not a date (`run.name: 2024-01-05`)."""


_BOOL, _INT, _FLOAT = (f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float"))
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers
            if tag not in (_BOOL, _INT, _FLOAT, "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|[-+]?0x[0-9a-fA-F_]+|[-+]?0o[0-7_]+)$"),
                                    list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
    r"|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    """Decimal whatever its leading zeros; 0x hexadecimal and 0o octal only when written so."""
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    return sign * (int(digits, 0) if digits[:2] in ("0x", "0o") else int(digits, 10))


_ConfigLoader.add_constructor(_INT, _construct_int)

MAX_EXPANDED_VALUES = 100_000  # a config holds a few hundred; YAML aliases nested k deep expand to n**k


def check_expansion(value: Any, where: str) -> None:
    """Refuse YAML whose aliases expand too far, or refer to themselves: the config is copied as a tree of
    values, and a few lines of nested aliases (`b: [*a, *a, ...]`, 8 deep) took minutes and gigabytes to copy
    before failing. Counted over the shared values once each, so the count itself stays cheap; a config without
    aliases is never refused, whatever its size."""
    sizes: dict[int, int] = {}
    shared = False

    def size(node: Any) -> int:
        nonlocal shared
        if not isinstance(node, dict | list):
            return 1
        if sizes.get(id(node)) == -1:
            raise ConfigError(f"{where}: a YAML alias refers to the value that holds it; write the value out")
        if id(node) in sizes:
            shared = True  # an alias: this value appears again
        else:
            sizes[id(node)] = -1  # in progress
            sizes[id(node)] = 1 + sum(size(item) for item in (node.values() if isinstance(node, dict) else node))
        return sizes[id(node)]

    if size(value) > MAX_EXPANDED_VALUES and shared:
        raise ConfigError(f"{where}: its YAML aliases expand to more than {MAX_EXPANDED_VALUES:,} values; a config "
                          f"holds a few hundred")


def read_yaml(path: str | Path) -> dict:
    if not str(path).strip():  # Path("") is the working directory
        raise ConfigError("config file: expected a YAML file's path, got an empty one")
    if "\n" in str(path):  # YAML text handed where a path goes: its 'does not exist' ran over several lines
        raise ConfigError("config file: expected a YAML file's path, got text of several lines (from Python, pass "
                          "the config as a dict)")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: cannot read it: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:  # a directory, no permission
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader)
    except RecursionError:  # PyYAML's parser recurses once per level: [[[... a thousand deep
        raise ConfigError(f"config file {path}: values nested too deeply to read (a config needs a few "
                          f"levels)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}: malformed YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys at the top, got {type(raw).__name__}")
    check_expansion(raw, f"config file {path}")
    return raw


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `--set` overrides, validated."""
    return with_overrides(read_yaml(path) if path is not None else {}, [parse_override(text) for text in overrides])


def load_run(run_dir: str | Path) -> Config:
    """A run's own config.yaml, as suggest, eval and predict read it: an error names the file (a key the file
    holds that this rayscale does not know was reported as if the user had given it)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        return load(path)
    except ConfigError as exc:
        if str(exc).startswith("config file "):
            raise
        raise ConfigError(f"{path}: {exc}") from None


def with_overrides(raw: dict, overrides: typing.Iterable[tuple[str, Any]]) -> Config:
    """`raw` (changed in place) with each (dotted key, value) set, validated."""
    for dotted, value in overrides:
        set_dotted(raw, dotted, value)
    return from_dict(raw)


def describe() -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every key: docs/reference/config.md's table is built from this."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if _is_section(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata["doc"] + (f" [{f.metadata['unit']}]" if f.metadata.get("unit") else "")
            type_name = _type_name(tp)
            if f.metadata.get("words"):  # "an integer or a string or null" says less than the words it takes
                type_name = type_name.replace("a string", " or ".join(f.metadata["words"]))
            if f.metadata.get("choices"):  # a closed set: name its members, not their type
                members = (yaml.safe_dump(choice).strip().removesuffix("...").strip()
                           for choice in f.metadata["choices"])
                type_name = ("a list, each one of " if typing.get_origin(tp) is list else "one of ") + ", ".join(members)
            rows.append((f"{prefix}{f.name}", type_name, yaml.safe_dump(default).strip()
                         .removesuffix("...").strip(), doc))

    walk(Config, "")
    return rows
