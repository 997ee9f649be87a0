"""rayscale from Python: what `rayscale train` and `rayscale tune` do, callable from a script or a notebook.

    import rayscale

    result = rayscale.train("configs/digits_mlp.yaml", overrides={"train.epochs": 3})
    result.final["val_accuracy"], result.run_dir
    model = result.load_model()              # the trained nn.Module, in eval mode

    search = rayscale.tune({"tune": {"num_samples": 4}})
    search.best["val_loss"], search.best_config_path

A config is a YAML file's path, a nested mapping with the same keys (`{"optim": {"lr": 0.1}}`), or a loaded
`rayscale.config.Config`; `overrides` are dotted keys (`{"optim.lr": 0.1}`, or `["optim.lr=0.1"]` as after
`--set`). Bad input raises `rayscale.UserError` with the same one line the CLI prints, before any cluster
resource is claimed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayscale import config as config_module

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

    def load_model(self, device: str = "cpu"):
        from rayscale.models.export import load_model

        return load_model(self.run_dir, device)


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
        return self.search_dir / "best_config.yaml"


def resolve_config(config: ConfigLike = None, overrides: Overrides = ()) -> config_module.Config:
    """The validated config for `config` with `overrides` applied (the CLI's -c and --set)."""
    if isinstance(overrides, str):
        raise config_module.ConfigError("overrides: expected a mapping or a list of KEY=VALUE strings, got a string")
    pairs = overrides.items() if isinstance(overrides, Mapping) \
        else [config_module.parse_override(text) for text in overrides]
    if config is None or isinstance(config, str | Path):
        raw = config_module.read_yaml(config) if config is not None else {}
    elif isinstance(config, config_module.Config):
        raw = config_module.to_dict(config)
    else:
        raw = _plain(config)
    return config_module.with_overrides(raw, pairs)


def train(config: ConfigLike = None, *, overrides: Overrides = (), address: str | None = None) -> Result:
    """Train as `rayscale train` does (an embedded Ray, or the cluster at `address` / RAY_ADDRESS) and return
    the run once it has written its outputs."""
    from rayscale.launch.trainer import train as run_training

    summary = run_training(resolve_config(config, overrides), address=address)
    return Result(Path(summary["run_dir"]), summary)


def tune(config: ConfigLike = None, *, overrides: Overrides = (), address: str | None = None,
         resume: bool = False) -> SearchResult:
    """Search as `rayscale tune` does; `resume` continues the search in run.output_dir / run.name."""
    from rayscale.driver.prepare import run_directory
    from rayscale.tune.search import search

    cfg = resolve_config(config, overrides)
    trials = search(cfg, address=address, resume=resume)
    return SearchResult(run_directory(cfg), trials)


def _plain(mapping: Mapping) -> dict:
    """A deep copy as plain dicts, so that applying overrides never changes the caller's mapping."""
    return {key: _plain(value) if isinstance(value, Mapping) else value for key, value in mapping.items()}
