"""Search spaces and the search's bookkeeping: parsing, one-line errors, per-trial configs, the ranking.

Pure: no Ray cluster. `max_concurrent` sees a fake `ray` module; results are simple stand-ins for Tune's.
"""

import json
import math
import re
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from rayscale import config
from rayscale.errors import ConfigError
from rayscale.math.batching import fit_micro_batch
from rayscale.tuning import search as tune
from rayscale.tuning import space
from rayscale.tuning.space import Domain


def base_dict(*overrides: str) -> dict:
    """The plain config dict a search starts from (defaults: 2 workers, global 128, micro 32)."""
    return config.to_dict(config.load(overrides=list(overrides)))


# ------------------------------------------------------------------------------------------- parse_space

def test_empty_space_is_the_built_in_default():
    domains = space.parse_space({})
    by_key = {d.key: d for d in domains}
    assert list(by_key) == ["batch.global_batch_size", "optim.lr", "schedule.name", "schedule.gamma",
                            "schedule.power", "schedule.warmup_samples"]
    assert by_key["batch.global_batch_size"] == Domain("batch.global_batch_size", "choice", (32, 64, 128, 256))
    assert by_key["optim.lr"].kind == "loguniform"
    assert set(by_key["schedule.name"].values) == {"step", "exponential", "polynomial", "cosine"}
    assert {by_key[k].kind for k in ("schedule.gamma", "schedule.power")} == {"uniform"}
    assert by_key["schedule.warmup_samples"].kind == "choice"


def test_default_space_is_valid_for_the_default_config():
    space.validate(base_dict(), space.parse_space({}))  # raises ConfigError if any corner is unusable


def test_space_written_as_a_cli_override_parses():
    cfg = config.load(overrides=["tune.space={optim.lr: {loguniform: [0.01, 1.0]}}"])
    assert space.parse_space(cfg.tune.space) == [Domain("optim.lr", "loguniform", (0.01, 1.0))]


@pytest.mark.parametrize("raw, expected", [
    # discrete values sampled at random
    pytest.param({"schedule.name": {"choice": ["cosine", "step"]}},
                 Domain("schedule.name", "choice", ("cosine", "step")), id="choice"),
    # every value, in every sample
    pytest.param({"batch.global_batch_size": {"grid": [32, 64]}},
                 Domain("batch.global_batch_size", "grid", (32, 64)), id="grid"),
    # [low, high] floats
    pytest.param({"schedule.gamma": {"uniform": [0.05, 0.5]}},
                 Domain("schedule.gamma", "uniform", (0.05, 0.5)), id="uniform"),
    # [low, high], low > 0
    pytest.param({"optim.lr": {"loguniform": [0.001, 1]}},
                 Domain("optim.lr", "loguniform", (0.001, 1)), id="loguniform"),
    # integer bounds written as floats are accepted
    pytest.param({"schedule.warmup_samples": {"randint": [0, 2048.0]}},
                 Domain("schedule.warmup_samples", "randint", (0, 2048.0)), id="randint"),
    # below a free-form mapping any key can be searched
    pytest.param({"model.kwargs.hidden_sizes": {"choice": [[32], [64, 64]]}},
                 Domain("model.kwargs.hidden_sizes", "choice", ([32], [64, 64])), id="free-form-key"),
])
def test_each_domain_kind_parses(raw, expected):
    assert space.parse_space(raw) == [expected]


@pytest.mark.parametrize("raw, message", [
    # a list instead of a mapping of keys
    pytest.param([{"optim.lr": {"choice": [0.1]}}], "tune.space: expected a mapping of dotted keys",
                 id="not-a-mapping"),
    # a bare list, no domain kind
    pytest.param({"optim.lr": [0.1, 0.2]}, "tune.space.optim.lr: expected one domain such as {choice: [...]}",
                 id="domain-not-a-mapping"),
    # two kinds in one domain
    pytest.param({"optim.lr": {"choice": [0.1], "uniform": [0.1, 1]}}, "tune.space.optim.lr: expected one domain",
                 id="two-key-domain"),
    # normal is not a supported distribution
    pytest.param({"optim.lr": {"normal": [0.1, 0.01]}},
                 "tune.space.optim.lr: unknown domain 'normal'; expected one of choice, grid, uniform, "
                 "loguniform, randint", id="unknown-kind"),
    # nothing to choose from
    pytest.param({"optim.lr": {"choice": []}}, "tune.space.optim.lr: choice expects a non-empty list, got []",
                 id="empty-list"),
    # a scalar instead of a list
    pytest.param({"optim.lr": {"grid": 0.1}}, "tune.space.optim.lr: grid expects a non-empty list, got 0.1",
                 id="scalar-not-list"),
    # one bound
    pytest.param({"schedule.gamma": {"uniform": [0.1]}},
                 "tune.space.schedule.gamma: uniform expects [low, high] numbers, got [0.1]", id="one-bound"),
    # strings are not bounds
    pytest.param({"schedule.gamma": {"uniform": ["a", "b"]}},
                 "tune.space.schedule.gamma: uniform expects [low, high] numbers", id="non-numbers"),
    # booleans are not numbers here
    pytest.param({"schedule.gamma": {"uniform": [False, True]}},
                 "tune.space.schedule.gamma: uniform expects [low, high] numbers", id="booleans"),
    # equal bounds
    pytest.param({"schedule.gamma": {"uniform": [0.5, 0.5]}},
                 "tune.space.schedule.gamma: uniform expects low < high, got [0.5, 0.5]", id="low-equals-high"),
    # reversed bounds
    pytest.param({"optim.lr": {"loguniform": [1.0, 0.1]}}, "tune.space.optim.lr: loguniform expects low < high",
                 id="low-above-high"),
    # log of zero
    pytest.param({"optim.lr": {"loguniform": [0, 1]}}, "tune.space.optim.lr: loguniform expects low > 0, got 0",
                 id="loguniform-zero"),
    # log of a negative number
    pytest.param({"optim.lr": {"loguniform": [-1, 1]}}, "tune.space.optim.lr: loguniform expects low > 0",
                 id="loguniform-negative"),
    # an infinite bound (YAML .inf): every sample past some point would be inf
    pytest.param({"optim.lr": {"uniform": [0.1, float("inf")]}},
                 "tune.space.optim.lr: uniform expects finite [low, high], got [0.1, inf]", id="infinite-bound"),
    # a NaN bound fails every comparison, so without its own check it read as "low < high"
    pytest.param({"optim.lr": {"loguniform": [float("nan"), 1]}},
                 "tune.space.optim.lr: loguniform expects finite [low, high], got [nan, 1]", id="nan-bound"),
    # randint's bounds too
    pytest.param({"train.epochs": {"randint": [1, float("-inf")]}},
                 "tune.space.train.epochs: randint expects finite [low, high]", id="randint-infinite-bound"),
    # fractional randint bounds
    pytest.param({"schedule.warmup_samples": {"randint": [0, 10.5]}},
                 "tune.space.schedule.warmup_samples: randint expects integer bounds, got [0, 10.5]",
                 id="randint-fraction"),
    # where the trial writes is not a hyperparameter
    pytest.param({"run.name": {"choice": ["a", "b"]}}, "tune.space.run.name: run keys cannot be searched",
                 id="run-key"),
    # the search cannot search itself
    pytest.param({"tune.num_samples": {"choice": [1, 2]}},
                 "tune.space.tune.num_samples: tune keys cannot be searched", id="tune-key"),
    # a YAML integer key
    pytest.param({1: {"choice": [1]}}, "tune.space: keys are dotted config keys such as optim.lr, got 1",
                 id="non-string-key"),
])
def test_bad_spaces_raise_one_line_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as excinfo:
        space.parse_space(raw)
    text = str(excinfo.value)
    assert text.startswith(message.split(":")[0] + ":")
    assert message in text
    assert "\n" not in text


# -------------------------------------------------------------------------------------- validate(base, ...)

@pytest.mark.parametrize("raw, overrides, message", [
    # typo in the searched key, with a suggestion
    pytest.param({"optim.lrr": {"choice": [0.1]}}, [],
                 "tune.space.optim.lrr: optim.lrr=0.1 is not usable: unknown config key optim.lrr "
                 "(did you mean optim.lr?)", id="unknown-key"),
    # a section is not a value
    pytest.param({"batch": {"choice": [1]}}, [], "tune.space.batch: batch=1 is not usable: batch is a section",
                 id="section-key"),
    # a string where a number is declared
    pytest.param({"optim.lr": {"choice": ["fast"]}}, [],
                 "tune.space.optim.lr: optim.lr='fast' is not usable: optim.lr: expected a number, got 'fast'",
                 id="wrong-type"),
    # the low corner of uniform is lr 0, but lr must be > 0
    pytest.param({"optim.lr": {"uniform": [0, 1]}}, [],
                 "tune.space.optim.lr: optim.lr=0 is not usable: optim.lr: expected a value greater than 0",
                 id="out-of-range"),
    # 33 samples cannot be split over 2 workers
    pytest.param({"batch.global_batch_size": {"choice": [32, 33]}}, ["scaling.num_workers=2"],
                 "tune.space.batch.global_batch_size: batch.global_batch_size=33 is not usable: batch.global_batch_size 33 is not "
                 "divisible by 2 workers", id="global-not-divisible"),
    # the high corner of a randint too wide to check whole (more than 256 values)
    pytest.param({"batch.global_batch_size": {"randint": [32, 1001]}}, ["scaling.num_workers=2"],
                 "tune.space.batch.global_batch_size: batch.global_batch_size=1001 is not usable", id="randint-corner-not-divisible"),
    # a typo among the schedule names, with a suggestion
    pytest.param({"schedule.name": {"choice": ["cosine", "cosin"]}}, [],
                 "tune.space.schedule.name: schedule.name='cosin' is not usable: schedule.name: expected one of constant, "
                 "step, exponential, polynomial, cosine, got 'cosin' (did you mean cosine?)", id="unknown-schedule"),
    # grid values are checked the same way
    pytest.param({"optim.name": {"grid": ["sgd", "adam"]}}, [],
                 "tune.space.optim.name: optim.name='adam' is not usable: optim.name: expected one of", id="grid-choice"),
    # the corners 32 and 64 divide by 2, but Tune's randint also samples 33: small ranges are checked whole
    pytest.param({"batch.global_batch_size": {"randint": [32, 64]}}, ["scaling.num_workers=2"],
                 "tune.space.batch.global_batch_size: batch.global_batch_size=33 is not usable",
                 id="randint-inner-value-not-divisible"),
    # uniform samples fractions such as 512.5, which an integer key cannot take
    pytest.param({"schedule.warmup_samples": {"uniform": [0, 1024]}}, [],
                 "tune.space.schedule.warmup_samples: uniform samples fractions", id="uniform-on-integer-key"),
    # a choice of a non-finite value is refused by the key's own check
    pytest.param({"optim.lr": {"choice": [0.1, float("nan")]}}, [],
                 "tune.space.optim.lr: optim.lr=nan is not usable: optim.lr: expected a finite number, got nan",
                 id="nan-choice"),
    # keys interact: 34 divides by 2 workers but not by 4
    pytest.param({"batch.global_batch_size": {"choice": [34, 64]}, "scaling.num_workers": {"choice": [2, 4]}}, [],
                 "batch.global_batch_size=34, scaling.num_workers=4 is not usable", id="combination"),
])
def test_validate_rejects_unusable_values_in_one_line(raw, overrides, message):
    with pytest.raises(ConfigError) as excinfo:
        space.validate(base_dict(*overrides), space.parse_space(raw))
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("raw", [
    # every default batch size divides by 2 workers
    pytest.param({"batch.global_batch_size": {"grid": [32, 64, 128, 256]}}, id="global-batches"),
    # both corners are positive
    pytest.param({"optim.lr": {"loguniform": [1e-4, 1.0]}}, id="lr"),
    # every schedule the config knows
    pytest.param({"schedule.name": {"choice": ["constant", "step", "exponential", "polynomial", "cosine"]}},
                 id="schedules"),
    # micro-batch is a memory limit in a search: 100 > per-worker 64 is fitted down, not rejected
    pytest.param({"batch.micro_batch_size": {"choice": [8, 100]}}, id="micro-limit"),
    # randint corners are integers
    pytest.param({"schedule.warmup_samples": {"randint": [0, 4096]}}, id="randint"),
])
def test_validate_accepts_usable_spaces(raw):
    space.validate(base_dict(), space.parse_space(raw))  # raises ConfigError if any corner is unusable


# ------------------------------------------------------------------------------------------------ apply

@pytest.mark.parametrize("overrides, sampled, expected_micro", [
    # per-worker 16 fits under the limit 32: no accumulation
    pytest.param(["batch.micro_batch_size=32"], {"batch.global_batch_size": 32}, 16, id="32-over-2-workers"),
    # per-worker 128: the limit itself divides it
    pytest.param(["batch.micro_batch_size=32"], {"batch.global_batch_size": 256}, 32, id="256-over-2-workers"),
    # per-worker 48: 32 does not divide it, 24 is the largest divisor not above 32
    pytest.param(["batch.micro_batch_size=32"], {"batch.global_batch_size": 96}, 24, id="96-over-2-workers"),
    # per-worker 34 is 2 x 17: 17 is the largest divisor not above 32
    pytest.param(["batch.micro_batch_size=32"], {"batch.global_batch_size": 68}, 17, id="68-over-2-workers"),
    # per-worker 1: micro 1
    pytest.param(["batch.micro_batch_size=32"], {"batch.global_batch_size": 2}, 1, id="one-sample-per-worker"),
    # local mode counts as one worker: per-worker 64
    pytest.param(["batch.micro_batch_size=32", "scaling.num_workers=0"], {"batch.global_batch_size": 64}, 32,
                 id="local-mode"),
    # the sampled micro-batch is the limit: per-worker 64, largest divisor not above 20 is 16
    pytest.param([], {"batch.global_batch_size": 128, "batch.micro_batch_size": 20}, 16, id="sampled-limit"),
    # null micro-batch: the whole per-worker batch, no fitting
    pytest.param(["batch.micro_batch_size=null"], {"batch.global_batch_size": 96}, None, id="null-stays-null"),
])
def test_apply_fits_the_micro_batch_per_trial(overrides, sampled, expected_micro):
    cfg = space.apply(base_dict(*overrides), sampled)
    assert cfg.batch.global_batch_size == sampled["batch.global_batch_size"]
    assert cfg.batch.micro_batch_size == expected_micro
    if expected_micro is not None:
        per_worker = cfg.batch.global_batch_size // max(cfg.scaling.num_workers, 1)
        limit = sampled.get("batch.micro_batch_size", 32)
        assert per_worker % expected_micro == 0 and expected_micro <= limit
        assert not any(per_worker % d == 0 for d in range(expected_micro + 1, limit + 1))  # the largest


def test_apply_sets_sampled_values_and_leaves_the_base_alone():
    base = base_dict()
    before = json.dumps(base, sort_keys=True)
    cfg = space.apply(base, {"optim.lr": 0.05, "schedule.name": "step", "schedule.warmup_samples": 512,
                             "model.kwargs.hidden_sizes": [16]})
    assert (cfg.optim.lr, cfg.schedule.name, cfg.schedule.warmup_samples) == (0.05, "step", 512)
    assert cfg.model.kwargs == {"hidden_sizes": [16]}
    assert json.dumps(base, sort_keys=True) == before


# ------------------------------------------------------------------------------------------ fit_micro_batch

@pytest.mark.parametrize("per_worker, limit, expected", [
    pytest.param(16, 32, 16, id="per-worker-below-limit"),  # the whole per-worker batch fits
    pytest.param(32, 32, 32, id="per-worker-equals-limit"),  # exactly the limit
    pytest.param(128, 32, 32, id="limit-divides"),  # 128 = 32 x 4
    pytest.param(48, 32, 24, id="limit-does-not-divide"),  # 48 = 24 x 2
    pytest.param(100, 30, 25, id="largest-divisor"),  # divisors of 100 up to 30: 1, 2, 4, 5, 10, 20, 25
    pytest.param(37, 32, 1, id="prime-above-limit"),  # a prime has no divisor but 1 below itself
    pytest.param(31, 32, 31, id="prime-below-limit"),  # fits whole
    pytest.param(64, 1, 1, id="limit-one"),  # one sample per forward
    pytest.param(1, 1, 1, id="one-and-one"),  # smallest case
    pytest.param(96, None, None, id="null-stays-null"),  # no limit: the whole per-worker batch
])
def test_fit_micro_batch(per_worker, limit, expected):
    assert fit_micro_batch(per_worker, limit) == expected


@pytest.mark.parametrize("limit", [1, 7, 16, 32, 50])
def test_fit_micro_batch_is_the_largest_divisor_not_above_the_limit(limit):
    for per_worker in range(1, 200):
        micro = fit_micro_batch(per_worker, limit)
        assert per_worker % micro == 0 and micro <= limit
        assert not any(per_worker % d == 0 for d in range(micro + 1, min(limit, per_worker) + 1))


# ------------------------------------------------------------------------------------ max_value, grid_size

@pytest.mark.parametrize("raw, default, expected", [
    # the default space's largest warmup equals the config default
    pytest.param({}, 1024, 1024, id="default-space"),
    # a longer warmup in the space wins
    pytest.param({"schedule.warmup_samples": {"choice": [0, 4096]}}, 1024, 4096, id="space-larger"),
    # the base default wins when it is larger than every value
    pytest.param({"schedule.warmup_samples": {"choice": [0, 256]}}, 1024, 1024, id="default-larger"),
    # randint: the high bound
    pytest.param({"schedule.warmup_samples": {"randint": [100, 3000]}}, 0, 3000, id="randint-high"),
    # randint: the high bound is inclusive
    pytest.param({"schedule.warmup_samples": {"randint": [0, 2000]}}, 0, 2000, id="randint-high"),
    # the key is not searched
    pytest.param({"optim.lr": {"choice": [5000.0]}}, 512, 512, id="other-key-ignored"),
])
def test_max_value_of_warmup(raw, default, expected):
    assert space.max_value(space.parse_space(raw), "schedule.warmup_samples", default) == expected


def test_max_value_ignores_non_numbers():
    domains = space.parse_space({"schedule.name": {"choice": ["cosine", "step"]}})
    assert space.max_value(domains, "schedule.name", 7) == 7


@pytest.mark.parametrize("raw, expected", [
    pytest.param({"optim.lr": {"choice": [0.1, 0.2]}}, 1, id="no-grid"),  # random domains add no grid points
    pytest.param({"optim.lr": {"grid": [0.1, 0.2, 0.3]}}, 3, id="one-grid"),  # one point per value
    pytest.param({"optim.lr": {"grid": [0.1, 0.2]}, "schedule.name": {"grid": ["cosine", "step", "constant"]}},
                 6, id="product"),  # the grids' product
])
def test_grid_size(raw, expected):
    assert space.grid_size(space.parse_space(raw)) == expected


GRIDS = {"optim.lr": {"grid": [0.03, 0.1, 0.3]}, "schedule.name": {"grid": ["cosine", "step"]},
         "batch.global_batch_size": {"grid": [64, 128]}, "optim.weight_decay": {"uniform": [0.0, 0.1]}}


def test_grid_points_listed_run_as_written_last_key_fastest():
    points = space.grid_points(space.parse_space(GRIDS), "listed")
    assert len(points) == 12
    assert points[:3] == [{"optim.lr": 0.03, "schedule.name": "cosine", "batch.global_batch_size": 64},
                          {"optim.lr": 0.03, "schedule.name": "cosine", "batch.global_batch_size": 128},
                          {"optim.lr": 0.03, "schedule.name": "step", "batch.global_batch_size": 64}]
    assert points[-1] == {"optim.lr": 0.3, "schedule.name": "step", "batch.global_batch_size": 128}


def test_grid_points_shuffled_are_a_seeded_permutation_of_the_listed():
    domains = space.parse_space(GRIDS)
    listed = space.grid_points(domains, "listed")
    shuffled = space.grid_points(domains, "shuffled", seed=0)
    key = lambda p: tuple(p.values())  # noqa: E731
    assert sorted(shuffled, key=key) == sorted(listed, key=key)  # every combination once, nothing else
    assert shuffled != listed
    assert shuffled == space.grid_points(domains, "shuffled", seed=0)  # the same seed, the same order
    assert shuffled != space.grid_points(domains, "shuffled", seed=1)
    # learning rates no longer come smallest first (what made ASHA promote nearly every trial)
    assert [p["optim.lr"] for p in shuffled] != sorted(p["optim.lr"] for p in shuffled)


def test_grid_points_without_grid_domains_are_none():
    assert space.grid_points(space.parse_space({"optim.lr": {"choice": [0.1, 0.2]}})) == []


@pytest.mark.parametrize("order", ["shuffled", "listed"])
def test_tune_gets_one_grid_domain_in_the_order_chosen_and_trials_see_dotted_keys(order):
    from ray.tune.search.variant_generator import generate_variants

    cfg = config.load(overrides=[f"tune.grid_order={order}", "seed=3"])
    domains = space.parse_space(GRIDS)
    trial_configs = [c for _, c in generate_variants(tune.param_space(domains, cfg))]
    expected = space.grid_points(domains, order, seed=3)
    assert [tune.sampled_values(c) for c in trial_configs] == [
        {**point, "optim.weight_decay": c["optim.weight_decay"]}
        for point, c in zip(expected, trial_configs, strict=True)]
    assert all(0.0 <= c["optim.weight_decay"] <= 0.1 for c in trial_configs)  # sampled domains unchanged


def test_a_space_without_grids_gives_tune_no_grid_domain():
    cfg = config.load()
    assert set(tune.param_space(space.parse_space({"optim.lr": {"choice": [0.1]}}), cfg)) == {"optim.lr"}


# ----------------------------------------------------------------------------- summarize and print_ranking

class FakeResult:
    """What `summarize` reads from a Tune Result."""

    def __init__(self, trial_id, samples=(), values=(), *, error=None, config=None, metric="val_loss",
                 frame=True):
        self.metrics_dataframe = pd.DataFrame({"samples_seen": list(samples), metric: list(values)}) if frame else None
        self.error = error
        self.config = config or {}
        self.metrics = {"trial_id": trial_id} if trial_id else {}
        self.path = f"/searches/s/tune/{trial_id or 'from_path_0001'}"


MAX_T = 300
nan = float("nan")


@pytest.mark.parametrize("result, status, samples, best_min, best_max, last", [
    # reached max_t
    pytest.param(FakeResult("a", [100, 200, 300], [0.9, 0.5, 0.6]), "completed", 300, 0.5, 0.9, 0.6,
                 id="completed"),
    # beyond max_t counts as completed too
    pytest.param(FakeResult("a", [150, 310], [0.9, 0.5]), "completed", 310, 0.5, 0.9, 0.5, id="past-max-t"),
    # ASHA stopped it at the first rung
    pytest.param(FakeResult("b", [100], [0.7]), "stopped early", 100, 0.7, 0.7, 0.7, id="stopped-early"),
    # an error wins over reaching max_t
    pytest.param(FakeResult("c", [100, 200, 300], [0.8, 0.4, 0.45], error=RuntimeError("boom")), "error", 300,
                 0.4, 0.8, 0.45, id="error"),
    # NaN values are dropped, not taken as best
    pytest.param(FakeResult("d", [100, 200, 300], [nan, 0.3, 0.35]), "completed", 300, 0.3, 0.35, 0.35,
                 id="nan-ignored"),
    # no reports at all
    pytest.param(FakeResult("e", frame=False), "stopped early", 0, None, None, None, id="no-dataframe"),
    # reports without the metric column: it still trained 100 samples
    pytest.param(FakeResult("f", [100], [0.5], metric="train_loss"), "stopped early", 100, None, None, None,
                 id="metric-missing"),
])
def test_summarize_one_trial(result, status, samples, best_min, best_max, last):
    for mode, best in (("min", best_min), ("max", best_max)):
        (row,) = tune.summarize([result], config.load(overrides=[f"tune.mode={mode}"]), [], MAX_T)
        assert (row["status"], row["samples_seen"], row["best_val_loss"], row["last_val_loss"]) == (
            status, samples, best, last)
        assert all(not math.isnan(m) for _, m in row["history"])


def four_trials():
    return [
        FakeResult("a", [100, 200, 300], [0.9, 0.5, 0.6], config={"optim.lr": 0.1}),  # best 0.5, max 0.9
        FakeResult("b", [100], [0.7], config={"optim.lr": 0.2}),  # best 0.7, max 0.7
        FakeResult("c", [100, 200], [nan, 0.3], config={"optim.lr": 0.3}),  # best 0.3, max 0.3
        FakeResult("e", frame=False, config={"optim.lr": 0.4}),  # no metric: always last
        FakeResult("d", [100, 200], [0.8, 0.75], config={"optim.lr": 0.5}),  # best 0.75, max 0.8
    ]


@pytest.mark.parametrize("mode, order", [
    pytest.param("min", ["c", "a", "b", "d", "e"], id="min-lowest-first"),  # 0.3, 0.5, 0.7, 0.75, none
    pytest.param("max", ["a", "d", "b", "c", "e"], id="max-highest-first"),  # 0.9, 0.8, 0.7, 0.3, none
])
def test_summarize_sorts_best_first(mode, order):
    cfg = config.load(overrides=[f"tune.mode={mode}"])
    rows = tune.summarize(four_trials(), cfg, space.parse_space({"optim.lr": {"choice": [0.1]}}), MAX_T)
    assert [r["trial_id"] for r in rows] == order
    assert {r["trial_id"]: r["optim.lr"] for r in rows} == {"a": 0.1, "b": 0.2, "c": 0.3, "e": 0.4, "d": 0.5}


def test_summarize_reads_the_grid_combination_from_the_trial_config():
    cfg = config.load()
    domains = space.parse_space({"optim.lr": {"grid": [0.1, 0.2]}, "schedule.name": {"choice": ["step"]}})
    result = FakeResult("a", [300], [0.4], config={tune.GRID_KEY: {"optim.lr": 0.2}, "schedule.name": "step"})
    (row,) = tune.summarize([result], cfg, domains, MAX_T)
    assert (row["optim.lr"], row["schedule.name"]) == (0.2, "step")


def test_summarize_names_the_metric_and_falls_back_to_the_path():
    cfg = config.load(overrides=["tune.metric=val_accuracy", "tune.mode=max"])
    domains = space.parse_space({"optim.lr": {"choice": [0.1]}, "schedule.name": {"choice": ["step"]}})
    results = [FakeResult(None, [300], [0.9], metric="val_accuracy", config={"optim.lr": 0.1})]
    (row,) = tune.summarize(results, cfg, domains, MAX_T)
    assert row["trial_id"] == "from_path_0001"
    assert (row["best_val_accuracy"], row["last_val_accuracy"]) == (0.9, 0.9)
    assert (row["optim.lr"], row["schedule.name"]) == (0.1, None)  # a key missing from the trial's config


def test_print_ranking_prints_a_header_and_one_aligned_line_per_trial(capsys):
    cfg = config.load()
    domains = space.parse_space({"optim.lr": {"choice": [0.1]}})
    rows = tune.summarize(four_trials(), cfg, domains, MAX_T)
    tune.print_ranking(rows, cfg, domains)
    header, *lines = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", header.strip()) == ["rank", "trial", "optim.lr", "best val_loss", "samples",
                                                   "status"]
    assert len(lines) == len(rows) == 5
    for rank, (line, row) in enumerate(zip(lines, rows, strict=True), start=1):
        assert line.split()[:2] == [str(rank), row["trial_id"]]
        assert line.rstrip().endswith(row["status"])
        assert line.index(row["status"]) == header.index("status")  # columns line up
    assert re.split(r"\s{2,}", lines[0].strip()) == ["1", "c", "0.3", "0.3", "200", "stopped early"]
    assert re.split(r"\s{2,}", lines[-1].strip()) == ["5", "e", "0.4", "-", "0", "stopped early"]


def test_print_ranking_formats_thousands_and_short_floats(capsys):
    cfg = config.load()
    domains = space.parse_space({"optim.lr": {"loguniform": [0.001, 1]}})
    rows = tune.summarize([FakeResult("t", [12_000], [0.123456], config={"optim.lr": 0.0123456})], cfg, domains,
                          12_000)
    tune.print_ranking(rows, cfg, domains)
    _, line = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", line.strip()) == ["1", "t", "0.01235", "0.1235", "12,000", "completed"]


def test_print_ranking_with_no_trials_prints_the_header_only(capsys):
    tune.print_ranking([], config.load(), [])
    assert capsys.readouterr().out.split() == ["rank", "trial", "best", "val_loss", "samples", "status"]


# ------------------------------------------------------------------------ _finished_records, max_concurrent

@pytest.mark.parametrize("summary_epochs, expected_epochs", [
    pytest.param(None, None, id="no-summary"),  # never finished: run the trial
    pytest.param(1, None, id="other-epochs"),  # finished a shorter run: run again
    pytest.param(2, [(0, 15), (1, 20), (2, 40)], id="finished"),  # report its validations from the files
])
def test_finished_records(tmp_path, summary_epochs, expected_epochs):
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", "run.name=trial_1", "train.epochs=2"])
    run_dir = Path(tmp_path) / "trial_1"
    run_dir.mkdir()
    records = [{"epoch": 0, "samples_seen": 10}, {"epoch": 0, "evaluation": True, "samples_seen": 15},
               {"epoch": 1, "epoch_end": True, "evaluation": True, "samples_seen": 20},
               {"epoch": 1, "samples_seen": 30}, {"epoch": 2, "epoch_end": True, "evaluation": True,
                                                  "samples_seen": 40}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary_epochs is not None:
        (run_dir / "summary.json").write_text(json.dumps({"epochs": summary_epochs}))
    finished = tune._finished_records(cfg)
    assert (None if finished is None else [(r["epoch"], r["samples_seen"]) for r in finished]) == expected_epochs


def fake_ray(resources: dict | None) -> types.ModuleType:
    module = types.ModuleType("ray")

    def cluster_resources():
        if resources is None:
            raise AssertionError("max_concurrent asked the cluster although tune.max_concurrent_trials is set")
        return resources

    module.cluster_resources = cluster_resources
    return module


@pytest.mark.parametrize("overrides, resources, expected", [
    # stated by the user: the cluster is not asked
    pytest.param(["tune.max_concurrent_trials=3"], None, 3, id="stated"),
    # (8 CPUs - 1 for Ray Data) // (2 workers x 1 CPU)
    pytest.param([], {"CPU": 8.0}, 3, id="cpu"),
    # local mode: one worker
    pytest.param(["scaling.num_workers=0"], {"CPU": 8.0}, 7, id="local-mode"),
    # fractional CPUs per worker
    pytest.param(["scaling.cpus_per_worker=0.5"], {"CPU": 8.0}, 7, id="half-cpu-workers"),
    # too small a cluster still runs one trial
    pytest.param([], {"CPU": 2.0}, 1, id="at-least-one"),
    # GPUs: 4 GPUs // 2 workers
    pytest.param(["scaling.use_gpu=true"], {"CPU": 1.0, "GPU": 4.0}, 2, id="gpu"),
    # no GPU in the cluster: one
    pytest.param(["scaling.use_gpu=true"], {"CPU": 16.0}, 1, id="gpu-missing"),
    # (8 CPUs - 1) // (2 workers x 3 CPUs); a worker reserving no CPU is refused by the config
    pytest.param(["scaling.cpus_per_worker=3"], {"CPU": 8.0}, 1, id="three-cpus-per-worker"),
])
def test_max_concurrent(monkeypatch, overrides, resources, expected):
    monkeypatch.setitem(sys.modules, "ray", fake_ray(resources))
    assert tune.max_concurrent(config.load(overrides=overrides)) == expected


# ------------------------------------------------------------------------------------ rung milestones

@pytest.mark.parametrize("grace, max_t, factor, expected", [
    (1450, 13050, 3.0, [1450, 4350]),  # 9x: rungs at 1, 3 (and 9) epochs; max_t itself is the epoch end
    (483, 13050, 3.0, [483, 1449, 4347, 13041]),  # 27.02x: four rungs, the last just before max_t
    (100, 1000, 2.0, [100, 200, 400, 800]),
    (1000, 1000, 3.0, []),  # grid: one rung, at the end
])
def test_rung_milestones_match_rays_bracket(grace, max_t, factor, expected):
    from ray.tune.schedulers.async_hyperband import _Bracket

    assert tune.rung_milestones(grace, max_t, factor) == expected
    rays = sorted(math.ceil(m) for m, _ in _Bracket(grace, max_t, factor, s=0)._rungs)
    assert [m for m in rays if m != max_t] == expected
