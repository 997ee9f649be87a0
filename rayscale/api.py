"""rayscale from Python: what `rayscale train` and `rayscale tune` do, callable from a script or a notebook.

    import rayscale

    result = rayscale.train("configs/digits_mlp.yaml", overrides={"train.epochs": 3})
    result.final["val_accuracy"], result.run_dir
    model = result.load_model()              # the trained nn.Module, in eval mode

    search = rayscale.tune({"tune": {"num_samples": 4}})
    search.best["best_val_loss"], search.best_config_path    # best_<tune.metric>, last_<tune.metric>

    # Your own model, loss and metrics, as Python objects:
    result = rayscale.train(cfg, model=make_model, loss=per_sample_loss, metrics={"f1": MulticlassF1Score(10)})

A config is a YAML file's path, a nested mapping with the same keys (`{"optim": {"lr": 0.1}}`), or a loaded
`rayscale.config.Config`; `overrides` are dotted keys (`{"optim.lr": 0.1}`, or `["optim.lr=0.1"]` as after
`--set`). Bad input raises `rayscale.UserError` with the same one line the CLI prints, before any cluster
resource is claimed.

`model`, `loss` and `metrics` stand for the config's model.name, train.loss and train.metrics (docs/guide/
bring-your-own.md has the contracts). A module-level function or class of an importable module is recorded in
the config by its import path; anything else (an nn.Module instance, a lambda, a function defined in a script
or a notebook, a torchmetrics object) travels to the workers pickled, and is refused up front, naming the
argument, when it cannot be pickled.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayscale import config as config_module
from rayscale.errors import SearchFailed, UserError
from rayscale.files import BEST_CONFIG_FILE
from rayscale.plugins import UserCode, import_path

ConfigLike = str | Path | Mapping | config_module.Config | None
Overrides = Mapping[str, Any] | Sequence[str]


@dataclass(frozen=True)
class Result:
    """A finished training run: its directory and summary.json; the rest is read from the directory."""

    run_dir: Path
    summary: dict

    @property
    def final(self) -> dict:
        """The last epoch end's metrics (val_loss, val_accuracy, train_loss, ...)."""
        return self.summary["final"]

    @property
    def metrics(self) -> list[dict]:
        """Every metrics.jsonl line."""
        from rayscale.driver.outputs import read_metrics

        return read_metrics(self.run_dir)

    def load_model(self, device: str = "cpu", model=None):
        """The trained model in eval mode; `model`: the module or factory again if train got it as an object."""
        from rayscale.models.export import load_model

        check_code_objects(model, None, None)
        return load_model(self.run_dir, device, model)


@dataclass(frozen=True)
class SearchResult:
    """A finished search: its directory and the trials, best first (as trials.csv lists them)."""

    search_dir: Path
    trials: list[dict]

    @property
    def best(self) -> dict:
        return self.trials[0]

    @property
    def best_config_path(self) -> Path:
        """best_config.yaml: `rayscale.train(search.best_config_path)` trains the best trial's config as it is."""
        return self.search_dir / BEST_CONFIG_FILE


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` (default RAY_ADDRESS), else start the Ray that `rayscale.train` would start
    (on 127.0.0.1, in this process). Call it before building a ray.data.Dataset for train_data=, so that the
    Dataset runs on the cluster that trains (Ray Data would otherwise start a default Ray of its own)."""
    from rayscale.launch.connect import connect as join

    check_argument_types(address=address)
    join(address)


def check_argument_types(*, address: Any = None, paths: Mapping[str, Any] | None = None, workers: Any = None,
                         resume: Any = False) -> None:
    """The API's plain arguments, refused in one line when of the wrong type (the CLI's parser does this for
    its flags): otherwise a TypeError from deep inside, or a value taken for another (workers=True)."""
    if address is not None and not isinstance(address, str):
        raise UserError(f"address: expected a string such as 127.0.0.1:6379, ray://host:10001 or auto, got "
                        f"{type(address).__name__}")
    for name, value in (paths or {}).items():
        if not isinstance(value, str | os.PathLike):
            raise UserError(f"{name}: expected a path (a str or a pathlib.Path), got {type(value).__name__}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)):
        raise UserError(f"workers: expected a whole number of actors, got {workers!r}")
    if not isinstance(resume, bool):
        raise UserError(f"resume: expected True or False, got {resume!r}")


def resolve_config(config: ConfigLike = None, overrides: Overrides = ()) -> config_module.Config:
    """The validated config for `config` with `overrides` applied (the CLI's -c and --set)."""
    overrides = () if overrides is None else overrides
    if isinstance(overrides, str) or not isinstance(overrides, Mapping | Sequence):
        raise config_module.ConfigError(f"overrides: expected a mapping or a list of KEY=VALUE strings, got "
                                        f"{'a string' if isinstance(overrides, str) else type(overrides).__name__}")
    if not isinstance(overrides, Mapping) and not all(isinstance(text, str) for text in overrides):
        raise config_module.ConfigError("overrides: expected KEY=VALUE strings in the list (or a mapping)")
    if isinstance(overrides, Mapping) and not all(isinstance(key, str) for key in overrides):
        odd = next(key for key in overrides if not isinstance(key, str))
        raise config_module.ConfigError(f"overrides: expected dotted key strings such as 'optim.lr' as the "
                                        f"mapping's keys, got {odd!r}")
    pairs = overrides.items() if isinstance(overrides, Mapping) \
        else [config_module.parse_override(text) for text in overrides]
    if config is None or isinstance(config, str | Path):
        raw = config_module.read_yaml(config) if config is not None else {}
    elif isinstance(config, config_module.Config):
        raw = config_module.to_dict(config)
    elif isinstance(config, Mapping):
        raw = _plain(config)
    else:
        raise config_module.ConfigError(f"config: expected a YAML file's path, a mapping of keys or a "
                                        f"rayscale.config.Config, got {type(config).__name__}")
    return config_module.with_overrides(raw, pairs)


def train(config: ConfigLike = None, *, overrides: Overrides = (), address: str | None = None,
          model: Any = None, loss: Callable | None = None, metrics: Mapping[str, Any] | None = None,
          train_data: Any = None, val_data: Any = None) -> Result:
    """Train as `rayscale train` does (an embedded Ray, or the cluster at `address` / RAY_ADDRESS) and return
    the run once it has written its outputs.

    `model`: a torch.nn.Module, or a factory called with model.kwargs and the data sizes it names
    (input_shape, num_classes, vocab_size, ...). `loss`: (output, batch) -> per-sample (or per-token) losses,
    or (losses, weights). `metrics`: {name: function or torchmetrics Metric}, validated as val_<name>.
    `train_data`, `val_data`: ray.data.Datasets standing for data.source and data.val_source (run once, their
    rows held in the object store while the run trains; docs/guide/bring-your-own.md)."""
    check_argument_types(address=address)
    cfg, code = with_code(resolve_config(config, overrides), model, loss, metrics)
    cfg, datasets = with_data(cfg, train_data, val_data)
    # Imported once the config is known to be good: torch and Ray take ~1.5 s to import, a bad key is refused
    # without them.
    from rayscale.driver.prepare import check_before_data
    from rayscale.launch.trainer import train as run_training
    from rayscale.launch.user_data import dataset_sources

    if datasets:  # a Dataset runs only for a run that can start (train() checks this again, for the CLI)
        check_before_data(cfg)
    given = dataset_sources(cfg, datasets, address=address)
    summary = run_training(cfg, address=address, code=code, given=given)
    return Result(Path(summary["run_dir"]), summary)


def tune(config: ConfigLike = None, *, overrides: Overrides = (), address: str | None = None,
         resume: bool = False, model: Any = None, loss: Callable | None = None,
         metrics: Mapping[str, Any] | None = None, train_data: Any = None, val_data: Any = None) -> SearchResult:
    """Search as `rayscale tune` does; `resume` continues the search in run.output_dir / run.name. `model`,
    `loss`, `metrics`, `train_data` and `val_data` as for `train`, the same for every trial (tune.metric may
    name val_<name>); a Dataset runs once for the whole search. Raises SearchFailed when every trial failed."""
    check_argument_types(address=address, resume=resume)
    cfg, code = with_code(resolve_config(config, overrides), model, loss, metrics)
    cfg, datasets = with_data(cfg, train_data, val_data)
    from rayscale.driver.prepare import run_directory  # once the config is good, as in train
    from rayscale.launch.user_data import dataset_sources
    from rayscale.tuning.search import check_before_data, search

    if datasets:  # a Dataset runs only for a search that can start (search() checks this again, for the CLI)
        check_before_data(cfg, address=address, resume=resume)
    given = dataset_sources(cfg, datasets, address=address, scope="search")
    trials = search(cfg, address=address, resume=resume, code=code, given=given)
    if trials and all(trial["status"] == "error" for trial in trials):  # nothing to rank, nothing best
        raise SearchFailed(run_directory(cfg), trials)
    return SearchResult(run_directory(cfg), trials)


def evaluate(run_dir: str | Path, data: Any = None, *, model: Any = None, loss: Callable | None = None,
             metrics: Mapping[str, Any] | None = None, device: str = "cpu", output: str | Path | None = None
             ) -> dict:
    """`rayscale eval`: the run's model over its validation split (or `data`, with the run's columns: a source
    as data.source names one, or a ray.data.Dataset), in this process; returns {"data", "rows", val_loss, ...}
    and writes it to RUN_DIR/eval.json (or `output`)."""
    from rayscale.data.sources import is_dataset
    from rayscale.tools.evaluate import evaluate_run

    check_argument_types(paths={"run_dir": run_dir, **({"output": output} if output is not None else {})})
    if data is not None and not isinstance(data, str | os.PathLike) and not is_dataset(data):
        raise UserError(f"data: expected a path (a source as data.source names one) or a ray.data.Dataset, got "
                        f"{type(data).__name__}")
    check_code_objects(model, loss, metrics)
    return evaluate_run(run_dir, data, model=model, loss=loss, metrics=metrics, device=device, output=output)


def predict(run_dir: str | Path, data: Any, output: str | Path, *, address: str | None = None,
            workers: int | None = None, model: Any = None) -> Path:
    """`rayscale predict`: the run's model over `data` (Parquet, or a ray.data.Dataset, with the run's input
    columns) with Ray Data, on an actor pool over the cluster (a GPU per actor where there are GPUs); every row
    with its `prediction` (and `probabilities`) written to the new directory `output` as Parquet, in `data`'s
    order. Returns `output`."""
    from rayscale.launch.predict import predict as run_prediction

    check_argument_types(address=address, paths={"run_dir": run_dir, "output": output}, workers=workers)
    check_code_objects(model, None, None)
    run_prediction(run_dir, data, output, address=address, workers=workers, model=model)
    return Path(output).expanduser().resolve()


def with_code(cfg: config_module.Config, model: Any, loss: Callable | None, metrics: Mapping[str, Any] | None
              ) -> tuple[config_module.Config, UserCode]:
    """The config naming what can be named by import path, and the objects that travel pickled."""
    import dataclasses

    check_code_objects(model, loss, metrics)
    _check_not_named_twice(cfg, model, loss, metrics)
    named_model, named_loss = import_path(model), import_path(loss)
    named_metrics = {name: path for name, metric in (metrics or {}).items() if (path := import_path(metric))}
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, name=named_model or cfg.model.name),
        train=dataclasses.replace(cfg.train, loss=named_loss or cfg.train.loss,
                                  metrics={**cfg.train.metrics, **named_metrics}))
    code = UserCode(model=None if named_model else model, loss=None if named_loss else loss,
                    metrics=tuple((name, metric) for name, metric in (metrics or {}).items()
                                  if name not in named_metrics))
    return cfg, code


def check_code_objects(model: Any, loss: Any, metrics: Any) -> None:
    if model is not None and not callable(model):  # a torch.nn.Module is callable too
        raise UserError(f"model: expected a torch.nn.Module or a factory returning one, got {type(model).__name__}")
    if loss is not None and not callable(loss):
        raise UserError(f"loss: expected a function (output, batch) -> losses, got {type(loss).__name__}")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise UserError(f"metrics: expected a mapping of name to function or torchmetrics Metric, got "
                        f"{type(metrics).__name__}")
    for name, metric in (metrics or {}).items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise UserError(f"metrics[{name!r}]: expected an identifier naming a function or torchmetrics Metric")
        if not callable(metric):
            raise UserError(f"metrics[{name!r}]: expected a function (output, batch) -> values or a torchmetrics "
                            f"Metric, got {type(metric).__name__}")


def _check_not_named_twice(cfg: config_module.Config, model: Any, loss: Any, metrics: Any) -> None:
    """An object given beside a config that names another for the same part: the object silently won, and
    config.yaml recorded the other (an unchecked train.loss, a model.name the run never built)."""
    default_model = config_module.ModelConfig().name
    if model is not None and cfg.model.name not in (default_model, import_path(model)):
        raise UserError(f"model: given with model.name {cfg.model.name} in the config; give one of them")
    if loss is not None and cfg.train.loss not in (None, import_path(loss)):
        raise UserError(f"loss: given with train.loss {cfg.train.loss} in the config; give one of them")
    for name, metric in (metrics or {}).items():
        if cfg.train.metrics.get(name) not in (None, import_path(metric)):
            raise UserError(f"metrics[{name!r}]: given with train.metrics.{name} {cfg.train.metrics[name]} in the "
                            f"config; give one of them")


def with_data(cfg: config_module.Config, train_data: Any, val_data: Any
              ) -> tuple[config_module.Config, dict[str, Any]]:
    """The config whose data.source / data.val_source stand for the Datasets given (ray_dataset:train_data,
    config.yaml records so), and the Datasets by argument."""
    import dataclasses

    from rayscale.data.sources import DATASET_PREFIX, is_dataset

    datasets = {name: value for name, value in (("train_data", train_data), ("val_data", val_data))
                if value is not None}
    for name, value in datasets.items():  # known before Ray starts (the Dataset itself is checked once it runs)
        if not is_dataset(value):
            key = "data.source" if name == "train_data" else "data.val_source"
            given = "a path" if isinstance(value, str | Path) else type(value).__name__
            raise UserError(f"{name}: expected a ray.data.Dataset, got {given}"
                            + (f"; name files with {key} instead" if given == "a path" else ""))
    data = cfg.data
    if train_data is not None:
        data = dataclasses.replace(data, source=DATASET_PREFIX + "train_data")
    if val_data is not None:
        data = dataclasses.replace(data, val_source=DATASET_PREFIX + "val_data")
    return dataclasses.replace(cfg, data=data), datasets


def _plain(mapping: Mapping) -> dict:
    """A deep copy as plain dicts, so that applying overrides never changes the caller's mapping."""
    return {key: _plain(value) if isinstance(value, Mapping) else value for key, value in mapping.items()}
