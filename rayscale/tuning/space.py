"""Search spaces written with the same dotted keys as the config, validated before any trial starts.

    tune:
      space:
        batch.global_batch_size: {choice: [32, 64, 128]}
        optim.lr: {loguniform: [0.01, 1.0]}
        schedule.name: {grid: [cosine, step]}

Pure Python: `rayscale.tuning.search` turns the parsed domains into Ray Tune's.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rayscale import config as config_module
from rayscale import rules
from rayscale.config import Config
from rayscale.errors import ConfigError
from rayscale.math.batching import fit_micro_batch, plan_batches

DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")

# Batch size, peak lr and how it decays: the questions users ask after their first run.
DEFAULT_SPACE = {
    "batch.global_batch_size": {"choice": [32, 64, 128, 256]},
    "optim.lr": {"loguniform": [0.01, 0.5]},
    "schedule.name": {"choice": ["step", "exponential", "polynomial", "cosine"]},
    "schedule.gamma": {"uniform": [0.05, 0.5]},  # step / exponential
    "schedule.power": {"uniform": [1.0, 3.0]},  # polynomial
    "schedule.warmup_samples": {"choice": [0, 512, 1024]},
}


@dataclass(frozen=True)
class Domain:
    key: str  # dotted config key
    kind: str  # one of DOMAINS
    values: tuple  # choices, or (low, high)

    def check_values(self) -> tuple:
        """Values that, if valid, make every sample valid: config checks are bounds, choices and, for a
        randint, divisibility (a global batch must divide by the workers), so small integer ranges are
        checked whole."""
        if self.kind == "randint":
            low, high = int(self.values[0]), int(self.values[1])
            return tuple(range(low, high + 1)) if high - low <= 256 else (low, high)
        return self.values


MAX_COMBINATIONS = 2000


def parse_space(raw: dict) -> list[Domain]:
    if not isinstance(raw, dict):
        raise ConfigError(f"tune.space: expected a mapping of dotted keys to domains, got {raw!r}")
    domains = []
    for dotted, spec in (raw or DEFAULT_SPACE).items():
        if not isinstance(dotted, str):
            raise ConfigError(f"tune.space: keys are dotted config keys such as optim.lr, got {dotted!r}")
        where = f"tune.space.{dotted}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: expected one domain such as {{choice: [...]}} or {{uniform: [low, high]}}, "
                              f"got {spec!r}")
        (kind, values), = spec.items()
        if kind not in DOMAINS:
            raise ConfigError(f"{where}: unknown domain {kind!r}; expected one of {', '.join(DOMAINS)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} expects a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"{where}: {kind} expects [low, high] numbers, got {values!r}")
            low, high = values
            if not (math.isfinite(low) and math.isfinite(high)):  # nan fails every comparison below
                raise ConfigError(f"{where}: {kind} expects finite [low, high], got {values!r}")
            if not low < high:
                raise ConfigError(f"{where}: {kind} expects low < high, got {values!r}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: loguniform expects low > 0, got {low!r}")
            if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
                raise ConfigError(f"{where}: randint expects integer bounds, got {values!r}")
        if dotted.startswith("tune.") or dotted.startswith("run."):
            raise ConfigError(f"{where}: {dotted.split('.')[0]} keys cannot be searched")
        if kind in ("uniform", "loguniform") and config_module.key_type(dotted) in (int, int | None):
            raise ConfigError(f"{where}: {kind} samples fractions but {dotted} is an integer; use randint or "
                              f"choice")
        domains.append(Domain(dotted, kind, tuple(values)))
    return domains


def apply(base: dict, sampled: dict[str, Any]) -> Config:
    """The trial's config: base config dict with the sampled values set, the micro-batch fitted."""
    raw = copy.deepcopy(base)
    for dotted, value in sampled.items():
        config_module.set_dotted(raw, dotted, value)
    cfg = config_module.from_dict(raw)
    workers = max(cfg.scaling.num_workers, 1)
    if cfg.batch.global_batch_size % workers == 0:
        cfg.batch.micro_batch_size = fit_micro_batch(cfg.batch.global_batch_size // workers,
                                                     cfg.batch.micro_batch_size)
    plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    return cfg


def validate(base: dict, domains: list[Domain]) -> None:
    """Every value a trial can get must give a valid config; errors name the space key and the value.

    Keys interact (a global batch must divide by the workers), so combinations are checked together when
    there are at most MAX_COMBINATIONS of them, each domain alone otherwise. The base config's own rules are
    checked first, so that what it breaks is reported as its own, not as a sampled value's.
    """
    rules.check(config_module.from_dict(base), "search")
    for sampled in check_points(domains):
        _check(base, sampled, " + ".join(sampled))


def check_points(domains: list[Domain]) -> Iterator[dict[str, Any]]:
    """The sampled values a check must see for every trial to pass it: each domain's values alone (so that an
    error names the one key at fault), then every combination when there are at most MAX_COMBINATIONS."""
    for domain in domains:
        for value in domain.check_values():
            yield {domain.key: value}
    values = [domain.check_values() for domain in domains]
    if len(domains) > 1 and math.prod(len(v) for v in values) <= MAX_COMBINATIONS:
        for combination in itertools.product(*values):
            yield dict(zip((d.key for d in domains), combination, strict=True))


def _check(base: dict, sampled: dict, where: str) -> None:
    try:
        rules.check(apply(base, sampled), "search")  # a trial's own settings must combine too
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in sampled.items())
        raise ConfigError(f"tune.space.{where}: {shown} is not usable: {exc}") from None


def max_value(domains: list[Domain], key: str, default: float) -> float:
    """Largest value a key can take in the space (for the grace period: at least the longest warmup)."""
    values = [v for d in domains if d.key == key for v in d.values if isinstance(v, (int, float))]
    return max([default, *values]) if values else default


def grid_size(domains: list[Domain]) -> int:
    return math.prod(len(d.values) for d in domains if d.kind == "grid")


def grid_points(domains: list[Domain], order: str = "shuffled", seed: int = 0) -> list[dict[str, Any]]:
    """Every combination of the grid domains, in the order the trials will run them.

    `listed`: as written (the last key varies fastest). `shuffled`: a permutation seeded by `seed`. Order
    matters to ASHA: a trial is promoted when it beats what its rung has recorded so far, and a grid listed
    from the smallest learning rate up makes every new trial beat the ones before it, so nearly all are
    promoted; a random order is what ASHA's analysis assumes (Li et al. 2020, trials drawn at random).
    """
    grids = [d for d in domains if d.kind == "grid"]
    points = [dict(zip((d.key for d in grids), values, strict=True))
              for values in itertools.product(*(d.values for d in grids))]
    if order == "shuffled":
        random.Random(seed).shuffle(points)
    return points if grids else []
