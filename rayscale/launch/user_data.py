"""Ray Datasets handed to rayscale.train / rayscale.tune (`train_data=`, `val_data=`): each is run once here, on
the cluster, into a source like any other (data/datasets.py), before the run is prepared.

A Dataset can only be inspected by running it, so this is the one check that uses the cluster before a run
starts; the config's own rules are checked first, so a config that cannot run costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rayscale import rules
from rayscale.config import Config
from rayscale.data.datasets import inspect_dataset, quiet_ray_data
from rayscale.data.sources import DATASET_PREFIX, SourceInfo
from rayscale.launch.connect import connect


def dataset_sources(cfg: Config, datasets: Mapping[str, Any], *, address: str | None = None,
                    scope: str = "run") -> dict[str, SourceInfo]:
    """{data.source or data.val_source standing for a Dataset: its SourceInfo}; `datasets`: {argument: Dataset}
    (train_data, val_data), as api.with_data named them in the config."""
    if not datasets:
        return {}
    rules.check(cfg, scope)
    connect(address)
    quiet_ray_data()  # Ray Data's execution logs at INFO would bury the lines below
    found = {}
    for argument, dataset in datasets.items():
        print(f"[rayscale] running {argument} once to count, check and hold its rows", flush=True)
        found[DATASET_PREFIX + argument] = inspect_dataset(dataset, cfg.data, argument)
    return found
