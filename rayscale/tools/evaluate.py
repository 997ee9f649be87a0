"""`rayscale eval RUN_DIR [--data SRC]`: a finished run's model over its validation split, or over other data
with the run's columns, in this process (CPU, or the first GPU with --device cuda); the metrics the run logs at
a validation (val_loss, val_accuracy, train.metrics), printed and written to RUN_DIR/eval.json (or --output)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rayscale import config as config_module
from rayscale.errors import UserError, argument, give
from rayscale.files import CONFIG_FILE, EVAL_FILE, can_write_in, runs_own_named


def evaluate_run(run_dir: str | Path, data: Any = None, *, model: Any = None,
                 loss: Callable | None = None, metrics: Mapping[str, Any] | None = None, device: str = "cpu",
                 output: str | Path | None = None) -> dict:
    """The run's model over `data` (a source as data.source names one, or a ray.data.Dataset; default: the run's
    validation split): {"data", "rows", metrics...}, also
    written to `output` (default RUN_DIR/eval.json). `model`, `loss`, `metrics`: as handed to rayscale.train,
    for a run that got them as objects (the config's names are imported as in training)."""

    from rayscale.data import sources
    from rayscale.data.local_feed import read_shard
    from rayscale.data.splits import SplitSpec, shard_reads, split_chunk_rows
    from rayscale.driver.prepare import prepare
    from rayscale.engine.components.empty_epoch import weighed_by
    from rayscale.engine.components.validation import evaluate
    from rayscale.engine.precision import make_precision
    from rayscale.engine.tasks import Objective
    from rayscale.models.export import load_model, run_spec, run_summary, trained_features, usable_device
    from rayscale.plugins import UserCode

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: no {CONFIG_FILE}; expected the directory of a finished rayscale run")
    destination = _destination(run_dir, output)
    where = usable_device(device, argument("device"))
    _check_objects_given(run_dir, loss, metrics)
    cfg = config_module.load_run(run_dir)
    cfg.model = dataclasses.replace(cfg.model, init_from=None)  # the run's own weights are loaded below
    features = trained_features(run_dir)
    code = UserCode(model=model, loss=loss, metrics=tuple((metrics or {}).items()))
    stood_for = [source for source in (cfg.data.source, cfg.data.val_source)
                 if source is not None and source.startswith(sources.DATASET_PREFIX)]
    if data is None and stood_for:
        raise UserError(f"{run_dir}: the run trained on a ray.data.Dataset (data.source {cfg.data.source}), which "
                        f"it does not keep; give data (a Parquet source or a ray.data.Dataset)")
    info = None
    if data is not None and not isinstance(data, str | Path):
        from rayscale.data.datasets import inspect_dataset

        info, data = inspect_dataset(data, cfg.data, "data"), "ray.data.Dataset"
    elif data is not None:  # its columns taken by the names the model was trained on
        info = sources.inspect_by_name(str(data), cfg.data, cfg.seed, features, key=argument("data"))
    cfg.data = sources.by_name(cfg.data, features)
    # A run's Datasets are gone with the process that gave them: the data given stands for them.
    prepared = prepare(cfg, "eval", code=code, given={source: info for source in stood_for})  # model= is the one to build
    if info is None:
        if prepared.val is None:
            raise UserError(f"{run_dir}: the run has no validation split (data.val_fraction 0, no data.val_source); "
                            f"{give('data')}")
        split, label = prepared.val, "validation split"
    else:
        if not prepared.spec.takes_inputs_of(info.spec):
            raise UserError(f"{argument('data')}: {data} holds {info.spec.task} {info.spec.input_shape}, but the run "
                            f"trained on {prepared.spec.task} {prepared.spec.input_shape}")
        if (misfit := info.spec.beyond(run_spec(run_summary(run_dir)))) is not None:
            raise UserError(f"{argument('data')}: {data} has {misfit}")
        split, label = SplitSpec(info, "all", 0.0, cfg.data, cfg.seed), data
    network = load_model(run_dir, where, model)
    rows = split_chunk_rows(split)
    objective = Objective(prepared.spec.task, code.loss_fn(cfg.train.loss))
    found = evaluate(network, read_shard(split, shard_reads(rows, 1)[0]), prepared.plan, prepared.spec,
                     make_precision(cfg.train.precision, where), where, objective, code.metric_fns(cfg.train.metrics),
                     weighed_by(objective.user_loss is not None, cfg.data.weight,
                                prepared.spec.task == "token_classification"))
    result = {"data": label, "rows": sum(rows), **found}
    destination.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _check_objects_given(run_dir: Path, loss: Callable | None, metrics: Mapping[str, Any] | None) -> None:
    """A run trained with a loss or metrics handed in as Python objects (summary.json names them; the objects
    lived only in that process): without the loss again, val_loss would be the task's own, another number under
    the same name, so it is refused; a metric not given again is left out, and said so."""
    from rayscale.models.export import run_summary

    handed_in = run_summary(run_dir).get("python_objects", {})
    if "loss" in handed_in and loss is None:
        raise UserError(f"{run_dir}: the run's loss was handed to rayscale.train as a Python object "
                        f"({handed_in['loss']}); pass it again: rayscale.evaluate(run_dir, loss=...)")
    left_out = [key.removeprefix("metrics.") for key in handed_in
                if key.startswith("metrics.") and key.removeprefix("metrics.") not in (metrics or {})]
    if left_out:
        print(f"[rayscale] eval: {', '.join(f'val_{name}' for name in left_out)} left out: the run's metrics "
              f"{', '.join(left_out)} were Python objects; rayscale.evaluate(run_dir, metrics=...) takes them again",
              file=sys.stderr)


def _destination(run_dir: Path, output: str | Path | None) -> Path:
    """Where the metrics go, checked before anything is evaluated: a file in a directory that exists."""
    if output is None:
        if (run_dir / EVAL_FILE).is_dir():
            raise UserError(f"{run_dir / EVAL_FILE} is a directory; {give('output')} a file path to write")
        if not can_write_in(run_dir):
            raise UserError(f"{run_dir}: cannot write {EVAL_FILE} there; {give('output')} a file path to write")
        return run_dir / EVAL_FILE
    if not str(output).strip():
        raise UserError(f"{argument('output')}: expected a file path for the metrics' JSON, got an empty one")
    path = Path(output).expanduser()
    if path.is_dir():
        raise UserError(f"{argument('output')}: {path} is a directory; expected a file path for the metrics' JSON")
    if not path.parent.is_dir():
        raise UserError(f"{argument('output')}: {path.parent} does not exist; expected a file in an existing "
                        f"directory")
    if not can_write_in(path.parent):
        raise UserError(f"{argument('output')}: cannot write in {path.parent}; expected a file in a directory you "
                        f"can write to")
    if (own := runs_own_named(path, run_dir)) is not None:
        raise UserError(f"{argument('output')}: {path} would replace {own}; expected another file path")
    return path
