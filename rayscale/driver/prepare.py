"""[2a] Everything that can be checked without a cluster (config, rules, batch plan, data sources and columns, the
model, the output directory), so bad input costs no cluster resources and leaves no half-written run directory;
and what the driver then sends every worker (`worker_payload`)."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rayscale import config as config_module
from rayscale import rules
from rayscale.config import Config
from rayscale.data import sources
from rayscale.data.splits import SplitSpec, cache_plan, count_rows, split_chunk_rows
from rayscale.driver.tracking import check_installed
from rayscale.engine.state import WorkerPayload
from rayscale.errors import UserCodeError, UserError
from rayscale.files import CHECKPOINTS_DIR, CONFIG_FILE, SEARCH_FILE, can_write_in, nearest_existing
from rayscale.math.adaptive_batch import upper_limit
from rayscale.math.batching import BatchPlan, plan_batches
from rayscale.plugins import UserCode, check_shippable, import_callable

NO_CODE = UserCode()  # a run with everything named in its config
NO_DATA: dict[str, sources.SourceInfo] = {}  # a run whose sources are all named in its config


@dataclass
class PreparedRun:
    cfg: Config
    plan: BatchPlan
    train: SplitSpec
    val: SplitSpec | None
    train_rows: int
    val_rows: int
    run_dir: Path
    code: UserCode = NO_CODE
    parameters: int = 0  # the model's, as built on the driver: named when the workers run out of memory

    @property
    def spec(self) -> sources.DataSpec:
        return self.train.info.spec


def run_directory(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).expanduser().resolve() / cfg.run.name


def prepare(cfg: Config, scope: str = "run", code: UserCode = NO_CODE,
            given: Mapping[str, sources.SourceInfo] = NO_DATA) -> PreparedRun:
    """Every check that needs no cluster. Raises UserError; writes nothing. `scope`: run, search (rayscale
    tune's rules too) or eval (a finished run's config, evaluated on data that need not fill its batch). `code`:
    rayscale.train's Python objects (model=, loss=, metrics=); `given`: the sources of its Ray Datasets
    (train_data=, val_data=), by the data.source / data.val_source that stands for them (launch/user_data.py
    inspects them)."""
    rules.check(cfg, scope)  # first: an elastic run's rule names the multiple every worker count splits
    plan = plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    check_installed(cfg.run.trackers)
    absolute_paths(cfg)
    train, val, train_rows, val_rows = _splits(cfg, given)
    if scope != "eval":  # eval: the data given stands for a finished run's Dataset, and nothing trains on it
        check_training_rows(cfg, plan, train_rows)
    _check_code(cfg, code)  # first: building a model= object copies it, which fails as pickling would
    model = check_model(cfg, train.info.spec, code)
    _try_user_code(cfg, train.info, model, code, validates=val is not None)
    if cfg.run.checkpoint_upload_fn is not None:  # imported where the workers run, but a typo fails here first
        import_callable(cfg.run.checkpoint_upload_fn, "run.checkpoint_upload_fn")
    check_output_dir(cfg)
    run_dir = run_directory(cfg)
    _check_writable("run.output_dir", run_dir)
    storage = cfg.run.storage_path  # made absolute above when local
    if storage is not None and "://" not in storage:
        if os.path.exists(storage) and not os.path.isdir(storage):
            raise UserError(f"run.storage_path: {storage} is a file; expected a directory (or a URI)")
        _check_writable("run.storage_path", Path(storage))
    return PreparedRun(cfg, plan, train, val, train_rows, val_rows, run_dir, code,
                       parameters=sum(p.numel() for p in model.parameters()))


def check_before_data(cfg: Config) -> None:
    """What a run can refuse before its data are read (rayscale.train calls it before it runs a Dataset, which
    can take long): no run directory, or one that holds a run of another config. Makes cfg's paths absolute."""
    absolute_paths(cfg)
    check_output_dir(cfg)
    check_same_config(cfg, run_directory(cfg))


def check_output_dir(cfg: Config) -> None:
    """run.output_dir is not empty, and run.name is no symbolic link: a run writes only inside run.output_dir
    (and run.storage_path), and a link there named as the run would lead its files wherever the link points."""
    if not cfg.run.output_dir.strip():  # it would be the working directory, unasked
        raise UserError("run.output_dir: expected a directory path, got an empty one")
    storage = cfg.run.storage_path
    for key, parent in (("run.output_dir", cfg.run.output_dir),
                        *([("run.storage_path", storage)] if storage and "://" not in storage else [])):
        entry = Path(parent).expanduser() / cfg.run.name
        if entry.is_symlink():
            raise UserError(f"run.name {cfg.run.name}: {entry} is a symbolic link (to {os.readlink(entry)}), and a "
                            f"run writes only inside {key}; expected a new name or a directory of its own")


def check_training_rows(cfg: Config, plan: BatchPlan, train_rows: int) -> None:
    """Enough training rows for the batch plan: a full step per epoch, a row per lane."""
    if train_rows == 0:
        raise UserError(f"data.source: {cfg.data.source} leaves no training rows")
    if train_rows < plan.global_batch_size and not cfg.data.online:  # online: small files are fine
        raise UserError(f"batch.global_batch_size: {plan.global_batch_size} is more than the {train_rows} training "
                        f"rows of {cfg.data.source} (not one full step per epoch); expected at most {train_rows}")
    if not cfg.data.online and lanes_of(cfg) > train_rows:
        raise UserError(f"data.lanes: {lanes_of(cfg)} lanes is more than the {train_rows} training rows of "
                        f"{cfg.data.source}; expected at most {train_rows}")
    if cfg.batch.adaptive != "none":
        upper_limit(cfg.batch.max_global_batch_size, plan.global_batch_size, train_rows, plan.num_workers,
                    cfg.batch.micro_batch_size)


def absolute_paths(cfg: Config) -> None:
    """Make the config's local paths absolute against this process's working directory, where the user gave
    them: Ray Train runs every worker (and Tune every trial) in a directory of its own. So are the paths a Tune
    space searches over. URIs and built-in sources are left as they are; a path that is absolute already is
    unchanged, so calling this again is safe."""
    cfg.data.source = _absolute("data.source", cfg.data.source)
    cfg.data.val_source = _absolute("data.val_source", cfg.data.val_source)
    cfg.model.init_from = _absolute("model.init_from", cfg.model.init_from)
    cfg.run.storage_path = _absolute("run.storage_path", cfg.run.storage_path)
    for dotted, domain in (cfg.tune.space or {}).items():
        if dotted in _PATH_KEYS and isinstance(domain, dict):
            for kind, values in domain.items():
                if isinstance(values, list):
                    domain[kind] = [_absolute(dotted, v) if isinstance(v, str) else v for v in values]


_PATH_KEYS = ("data.source", "data.val_source", "model.init_from", "run.storage_path")


def _absolute(key: str, value: str | None) -> str | None:
    if value is None or "://" in value:
        return value
    if not value.strip():  # made absolute, an empty path was the working directory: read, or written to
        what = "a built-in source, a path or a URI" if key.startswith("data.") else "a path or a URI"
        raise UserError(f"{key}: expected {what}, got an empty value" +
                        (" (null: no separate validation data)" if key == "data.val_source" else
                         "" if key == "data.source" else " (null: none)"))
    if key.startswith("data."):
        return sources.absolute_source(value)
    return str(Path(value).expanduser().resolve()) if key == "model.init_from" else \
        os.path.abspath(os.path.expanduser(value))


def _splits(cfg: Config, given: Mapping[str, sources.SourceInfo]) -> tuple[SplitSpec, SplitSpec | None, int, int]:
    """(training split, validation split or None, their rows), from the sources' metadata."""
    def inspect(source: str, key: str) -> sources.SourceInfo:
        return given[source] if source in given else sources.inspect_source(source, cfg.data, cfg.seed, key=key)

    info = inspect(cfg.data.source, "data.source")
    if cfg.data.val_source is not None:
        if cfg.data.val_source in given:
            val_info, val_data = given[cfg.data.val_source], cfg.data
        else:  # read by the training data's column names: the model was sized for those, in that order
            val_info = sources.inspect_by_name(cfg.data.val_source, cfg.data, cfg.seed, info.features,
                                               key="data.val_source")
            val_data = sources.by_name(cfg.data, info.features)
        if not info.spec.takes_inputs_of(val_info.spec):
            raise UserError(f"data.val_source: {cfg.data.val_source} does not match data.source "
                            f"({val_info.spec.task} {val_info.spec.input_shape} vs {info.spec.task} "
                            f"{info.spec.input_shape})")
        if (misfit := val_info.spec.beyond(info.spec)) is not None:
            raise UserError(f"data.val_source: {cfg.data.val_source} has {misfit}")
        return (SplitSpec(info, "all", 0.0, cfg.data, cfg.seed), SplitSpec(val_info, "all", 0.0, val_data, cfg.seed),
                info.num_rows, val_info.num_rows)
    if cfg.data.online:  # no held-out split of a stream: validation only with data.val_source
        return SplitSpec(info, "all", 0.0, cfg.data, cfg.seed), None, info.num_rows, 0
    val_rows = count_rows(info, "val", cfg.data.val_fraction)
    val = SplitSpec(info, "val", cfg.data.val_fraction, cfg.data, cfg.seed) if val_rows else None
    return (SplitSpec(info, "train", cfg.data.val_fraction, cfg.data, cfg.seed), val,
            count_rows(info, "train", cfg.data.val_fraction), val_rows)


def check_model(cfg: Config, spec: sources.DataSpec, code: UserCode):
    """Build the model once on the driver (CPU, tiny) so a bad name or kwargs fails before Ray starts."""
    from rayscale.engine.optimizers import check_optimizer
    from rayscale.models import build_model

    model = build_model(cfg.model, spec, code.model)
    if cfg.model.init_from is not None:  # read on every worker too; a bad file or a misfit fails here first
        from rayscale.models.export import start_from

        start_from(model, cfg.model.init_from)
    check_optimizer(cfg.optim, model, cfg.optim.lr)
    return model


def _check_code(cfg: Config, code: UserCode) -> None:
    """train.loss and train.metrics import here first; objects given from Python must pickle (UserCode)."""
    code.loss_fn(cfg.train.loss)
    code.metric_fns(cfg.train.metrics)
    for argument, value in (("model", code.model), ("loss", code.loss), *((f"metrics[{name!r}]", metric)
                                                                        for name, metric in code.metrics)):
        if value is not None:
            check_shippable(value, argument)


def _try_user_code(cfg: Config, info: sources.SourceInfo, model, code: UserCode, validates: bool) -> None:
    """What every worker would meet at its first step, retried run.max_failures times after Ray started, tried
    first on two training rows on the driver's CPU and refused in one line naming its key: the model's forward
    (train mode; eval mode too where the run validates), its output's width against the data's classes under the
    task's own loss, the loss (the user's or the task's), and the metrics where the run validates. Where the
    workers train on CPUs too, any failure here would be theirs; where they train on GPUs, only failures that no
    device changes are refused (`_misfit`). Code that needs a worker's process group is left to the workers."""
    same_device = not cfg.scaling.use_gpu
    loss = code.loss_fn(cfg.train.loss)
    metrics = code.metric_fns(cfg.train.metrics) if validates else {}
    if not same_device and loss is None and not metrics:  # a GPU run's model may be too big for a CPU forward
        return
    rows = _first_rows(cfg, info, 2)
    if rows is None:
        return
    import torch

    from rayscale.data.collate import collate
    from rayscale.engine.tasks import forward
    from rayscale.engine.user_metrics import UserMetrics
    from rayscale.plugins import first_line

    cpu = torch.device("cpu")
    batch = collate(rows, cpu)
    tried = f"{len(rows['y'])} rows of {cfg.data.source}"

    def attempt(key: str, call):
        """call(), or _LeftToWorkers where its failure is not known to be the workers' too."""
        try:
            return call()
        except (Exception, SystemExit) as exc:  # a loss or metric that exits would end rayscale with its code
            if not _needs_a_worker(exc) and (same_device or _misfit(exc)):
                raise UserError(f"{key}: failed on {tried} ({type(exc).__name__}: {first_line(exc)})") from None
            raise _LeftToWorkers from exc

    model_key = "model=" if code.model is not None else "model.name"
    try:
        output = attempt(model_key, lambda: forward(model.train(), batch))
        if same_device and isinstance(output, torch.Tensor) and output.is_floating_point() \
                and not torch.isfinite(output).all():  # every step would be skipped, and the lr blamed
            raise UserError(f"{model_key}: gave non-finite outputs (nan or inf) on {tried} before any training "
                            f"step; expected finite outputs")
        if loss is None:
            _check_output_width(model_key, output, info.spec)
        loss_key = model_key if loss is None else "loss=" if code.loss is not None else "train.loss"
        attempt(loss_key, lambda: _loss_once(info.spec.task, loss, output, batch))
        if not validates:  # where the run validates, the model's eval mode runs too (with or without metrics)
            return
        with torch.no_grad():
            output = attempt(model_key, lambda: forward(model.eval(), batch))
        for name, metric in metrics.items():
            key = f"metrics[{name!r}]" if name in dict(code.metrics) else f"train.metrics.{name}"
            once = UserMetrics({name: metric}, cpu)
            attempt(key, lambda once=once: (once.update(output, batch), once.results(once.totals.tolist())))
    except _LeftToWorkers:
        return


def _loss_once(task: str, loss, output, batch) -> None:
    """The loss of a batch as the step takes it (the user's called once), and the weights a user loss returned
    with it: a negative weight turns a loss into a gain (the run then diverged, and was stopped as a non-finite
    one, blaming the lr)."""
    import torch

    from rayscale.engine.tasks import Objective

    returned = []

    def kept(output, batch):
        returned.append(loss(output, batch))
        return returned[-1]

    total, _ = Objective(task, kept if loss is not None else None).loss(output, batch)
    if not torch.isfinite(total):  # every step would be skipped, and the run stopped blaming the lr
        raise UserCodeError(f"train.loss: returned non-finite losses ({total.item():g}) before any training step; "
                            f"expected finite losses")
    losses = returned[0][0] if returned and isinstance(returned[0], tuple) else returned[0] if returned else None
    if isinstance(losses, torch.Tensor) and output.requires_grad and not losses.requires_grad:
        # The workers' first backward would fail (in every one, retried run.max_failures times).
        raise UserCodeError("train.loss: returned losses that do not depend on the model's output (no gradient "
                            "reaches the model); expected losses computed from the output")
    weights = returned[0][1] if returned and isinstance(returned[0], tuple) else None
    if isinstance(weights, torch.Tensor) and not (torch.isfinite(weights).all() and (weights >= 0).all()):
        raise UserCodeError(f"train.loss: returned weights from {weights.min().item():g} to "
                            f"{weights.max().item():g}; expected finite weights of at least 0")


class _LeftToWorkers(Exception):
    """A failure on the driver that the workers might not meet (their GPU): they check for themselves."""


def _check_output_width(key: str, output, spec: sources.DataSpec) -> None:
    """Under the task's cross-entropy a class needs a logit: fewer than the data's classes fail at the first
    row labelled past them (an IndexError, in every worker, at a step no one can predict)."""
    if spec.task == "regression" or output.dim() < 2 or output.shape[-1] >= spec.num_outputs:
        return
    per = "token" if spec.task == "token_classification" else "row"
    raise UserError(f"{key}: the model gives {output.shape[-1]} values per {per}, but the data has "
                    f"{spec.num_outputs} classes; expected {spec.num_outputs} logits (one per class)")


def _needs_a_worker(exc: Exception) -> bool:
    """A failure from what only a worker has: a process group, a GPU (on a driver without one)."""
    said = str(exc)
    return any(word in said for word in ("CUDA", "cuda", "process group", "init_process_group", "NCCL", "nccl"))


def _misfit(exc: Exception) -> bool:
    """Whether a failure on the driver's CPU is one the workers would meet on any device: a call that does not
    fit its signature, a key or attribute the code expected and the batch or output does not have, an index out
    of range (a class past the model's outputs), rayscale's own checks of what came back, or a torchmetrics
    object refusing the output (another number of classes)."""
    import traceback

    if "device" in str(exc):
        return False
    if isinstance(exc, TypeError | KeyError | IndexError | AttributeError | NameError):
        return True
    if isinstance(exc, ValueError):
        if str(exc).startswith(("train.loss:", "train.metrics.")):  # Objective's and UserMetrics' own checks
            return True
        frames = traceback.extract_tb(exc.__traceback__)
        return bool(frames) and "torchmetrics" in frames[-1].filename
    return False


def _first_rows(cfg: Config, info: sources.SourceInfo, rows: int) -> dict | None:
    """The first rows of the source as the workers read them (numpy columns), or None where there are none yet."""
    if not info.chunks:  # an online directory with no file yet
        return None
    if info.kind in ("digits", "synthetic", "ray_dataset"):  # a Dataset's first block, in Ray's object store
        read = sources.read_chunk(info.kind, info.chunks[0], cfg.data, cfg.seed)
    elif info.kind == "parquet":
        path = info.chunks[0].path
        read = sources.table_rows(sources.first_rows(path, None, rows), cfg.data, path, 0, 0)
    else:
        return None
    return {name: column[:rows] for name, column in read.items()} if len(read["y"]) else None


def _check_writable(key: str, directory: Path) -> None:
    probe = nearest_existing(directory)
    if not probe.is_dir() or not can_write_in(probe):
        raise UserError(f"{key}: cannot write to {probe} (needed for {directory})")


def saved_attempt(cfg: Config, run_dir: Path) -> bool:
    """Whether an earlier attempt of this run left a checkpoint to resume from: in the run directory's
    checkpoints/ (local mode's, and Ray Train's without run.storage_path) or under <run.storage_path>/<run.name>.
    Assumed so for storage behind a URI, which is not looked into here."""
    storage = cfg.run.storage_path
    if storage is not None and "://" in storage:
        return True
    places = [run_dir / CHECKPOINTS_DIR, *([Path(storage) / cfg.run.name] if storage else [])]
    return any(place.is_dir() and any(entry.name.startswith("checkpoint") and entry.is_dir()
                                      for entry in place.iterdir()) for place in places)


def as_saved(config_dict: dict) -> dict:
    """A config dict as its YAML file reads back (a tuple in model.kwargs becomes a list): what is compared with
    a saved config."""
    return yaml.safe_load(yaml.safe_dump(config_dict, sort_keys=False))


def first_change(saved: dict, now: dict, skip: Collection[str] = (), whole: Collection[str] = ()
                 ) -> tuple[str, Any, Any] | None:
    """The first key (dotted, in sorted order) whose value in `now` differs from `saved`'s, with both values.
    Keys in `skip` are not compared (nor what is below them); those in `whole` are compared as one value. A key
    `saved` lacks (a config written by an older rayscale) counts as its default."""
    return _first_change(saved, as_saved(now), config_module.to_dict(config_module.from_dict({})), "", skip, whole)


def _first_change(saved: dict, now: dict, defaults: Any, prefix: str, skip: Collection[str],
                  whole: Collection[str]) -> tuple[str, Any, Any] | None:
    defaults = defaults if isinstance(defaults, dict) else {}
    for key in sorted(set(saved) | set(now), key=str):
        name = f"{prefix}{key}"
        if name in skip:
            continue
        was, is_now = saved.get(key, defaults.get(key)), now.get(key, defaults.get(key))
        if isinstance(was, dict) and isinstance(is_now, dict) and name not in whole:
            if (found := _first_change(was, is_now, defaults.get(key), f"{name}.", skip, whole)) is not None:
                return found
        elif was != is_now:
            return name, was, is_now
    return None


def check_same_config(cfg: Config, run_dir: Path) -> None:
    """Resuming a run with other training settings would silently mix two experiments. An attempt that saved no
    checkpoint (it failed at its start) has nothing to resume: the run starts over with the config given."""
    if (run_dir / SEARCH_FILE).exists():  # its trials' files and a run's would mix in one directory
        raise UserError(f"run.name {cfg.run.name}: {run_dir} holds a search ({SEARCH_FILE}); pick another run.name")
    existing = run_dir / CONFIG_FILE
    if not existing.exists() or not saved_attempt(cfg, run_dir):
        return
    try:
        old = yaml.safe_load(existing.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict):  # it would have resumed those checkpoints under whatever config was given
        raise UserError(f"run.name {cfg.run.name}: {existing} is not a config rayscale can read, so the checkpoints "
                        f"there cannot be matched to this config; pick another run.name")
    for key in ("source", "val_source"):  # a run saved with a relative path (local mode), resumed from where it ran
        if isinstance(old.get("data"), dict) and isinstance(old["data"].get(key), str):
            old["data"][key] = _absolute(f"data.{key}", old["data"][key])
    # Where and on how much hardware may change between attempts; tune is not training.
    if (changed := first_change(old, config_module.to_dict(cfg), skip=("run", "scaling", "tune"))) is not None:
        section = changed[0].split(".")[0]
        raise UserError(f"run.name {cfg.run.name}: {run_dir} holds a run with a different '{section}' "
                        f"config; pick another run.name or the same config to resume it")


def lanes_of(cfg: Config) -> int:
    """data.lanes, or one lane per worker of this (the first) run; elastic: as many as every worker count it may
    take can share."""
    return cfg.data.lanes or rules.every_count(cfg)


def worker_payload(prepared: PreparedRun, eval_at_samples=(), pause_at_samples=()) -> WorkerPayload:
    """What every worker gets: plain data (the Ray layer adds the parameter servers' names)."""
    cfg = prepared.cfg
    return WorkerPayload(
        config=config_module.to_dict(cfg), spec=prepared.spec, run_dir=str(prepared.run_dir),
        train_rows=prepared.train_rows, val_rows=prepared.val_rows, local_mode=cfg.scaling.num_workers == 0,
        train_split=prepared.train, val_split=prepared.val,
        # Counted here once (the validation split's row-id hash over the whole source), not in every worker.
        train_chunk_rows=tuple(split_chunk_rows(prepared.train)) if not cfg.data.online else (),
        val_chunk_rows=tuple(split_chunk_rows(prepared.val)) if prepared.val is not None else (),
        lanes=lanes_of(cfg), cache_train=cfg.data.cache_mb > 0 and cfg.data.sequence is None,
        val_cache=_bounds(cache_plan(prepared.val, prepared.val_rows, cfg.data.cache_mb)
                          if prepared.val is not None else None),
        code=prepared.code, eval_at_samples=tuple(int(point) for point in eval_at_samples),
        pause_at_samples=tuple(int(point) for point in pause_at_samples))


def _bounds(plan: list[tuple[int, int]] | None) -> tuple[tuple[int, int], ...] | None:
    return tuple(plan) if plan is not None else None
