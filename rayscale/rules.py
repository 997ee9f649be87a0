"""Which settings cannot combine, and why: one table, checked once before any cluster resource is claimed.

Each rule names the keys it is about, refuses a config with one message (the first key named, what to change,
and why), and carries an example that breaks it (tests/test_rules.py checks every example against its rule).
Rules that need the data (its row count, its columns) are checked by `driver.prepare` once the data is known;
rules on a single key's value (types, ranges, finiteness, names) live with the key in config.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from rayscale.config import Config
from rayscale.errors import ConfigError
from rayscale.math.batching import plan_batches

BUILTIN_SOURCES = ("digits", "synthetic")


@dataclass(frozen=True)
class Rule:
    keys: tuple[str, ...]  # what it is about; the message starts with the first
    refuses: Callable[[Config], bool]
    message: Callable[[Config], str]
    example: tuple[str, ...]  # --set overrides that break it
    scope: str = "run"  # run: every command that trains; search: rayscale tune only


def _parameter_server(cfg: Config) -> bool:
    return cfg.train.strategy == "parameter_server"


def _online_source_unusable(cfg: Config) -> bool:
    source = cfg.data.source
    return source in BUILTIN_SOURCES or "://" in source or not os.path.isdir(os.path.expanduser(source))


def _one_step_per_micro_batch(cfg: Config) -> bool:
    plan = plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    # auto starts at the whole share and halves only when a GPU runs out of memory: on CPUs it stays whole.
    return plan.num_workers == 1 and plan.accumulation_steps == 1 and not (plan.auto and cfg.scaling.use_gpu)


def _other_parts(cfg: Config) -> tuple[str, ...]:
    """The columns that are inputs, the label or the weight."""
    data = cfg.data
    return (*(data.features or ()), data.label, *(c for c in (data.weight, data.sequence) if c is not None))


def _counts_not_splitting(cfg: Config) -> list[int]:
    """Worker counts an elastic run may take that the global batch does not split over."""
    return [count for count in cfg.scaling.worker_counts() if cfg.batch.global_batch_size % count]


def every_count(cfg: Config) -> int:
    """The least common multiple of every worker count the run may take: a global batch or a number of lanes
    that is a multiple of it splits evenly at each."""
    return math.lcm(*cfg.scaling.worker_counts())


def _has_grid(cfg: Config) -> bool:
    return any(isinstance(domain, dict) and "grid" in domain for domain in cfg.tune.space.values())


RULES: tuple[Rule, ...] = (
    Rule(("train.precision", "scaling.use_gpu"),
         lambda c: c.train.precision == "fp16" and not c.scaling.use_gpu,
         lambda c: "train.precision fp16 needs a GPU (scaling.use_gpu: true); use bf16 on CPU",
         ("train.precision=fp16",)),
    Rule(("data.val_fraction", "data.val_source"),
         lambda c: c.data.val_source is None and not 0 <= c.data.val_fraction < 1,
         lambda c: f"data.val_fraction: expected a value in [0, 1), got {c.data.val_fraction}",
         ("data.val_fraction=1",)),
    Rule(("data.features", "data.sequence"),
         lambda c: c.data.sequence is not None and c.data.features is not None,
         lambda c: "data.features: set either data.features or data.sequence (the tokens are the input), not both",
         ("data.sequence=tokens", "data.features=[a]")),
    Rule(("optim.nesterov", "optim.momentum"),
         lambda c: c.optim.name == "sgd" and c.optim.nesterov and c.optim.momentum == 0,
         lambda c: f"optim.nesterov: needs optim.momentum > 0, got {c.optim.momentum:g}",
         ("optim.nesterov=true", "optim.momentum=0")),
    # The curriculum orders rows by a column and keeps that order through the step assembly.
    Rule(("data.curriculum_column", "data.source"),
         lambda c: c.data.curriculum_column is not None and c.data.source in BUILTIN_SOURCES,
         lambda c: f"data.curriculum_column: data.source {c.data.source} has no columns; a curriculum needs a "
                   f"Parquet source with a difficulty column",
         ("data.curriculum_column=hardness",)),
    # The built-in sources make their own columns, so these keys would be ignored without a word.
    *(Rule((f"data.{name}", "data.source"),
           lambda c, name=name: getattr(c.data, name) is not None and c.data.source in BUILTIN_SOURCES,
           lambda c, name=name: f"data.{name}: data.source {c.data.source} has no columns; data.{name} is for "
                                f"Parquet data (leave it null)",
           (f"data.{name}={value}",))
      for name, value in (("features", "[f0]"), ("weight", "w"), ("sequence", "tokens"), ("num_classes", "4"))),
    Rule(("data.curriculum_column", "data.features", "data.label", "data.weight", "data.sequence"),
         lambda c: c.data.curriculum_column in _other_parts(c),
         lambda c: f"data.curriculum_column: column {c.data.curriculum_column!r} is also used as a feature, label, "
                   f"weight or sequence; the difficulty must not be an input",
         ("data.source=x.parquet", "data.curriculum_column=hardness", "data.features=[f0, hardness]")),
    # Each column has one part: a label or a weight read as an input hands the model the answer (a run trained
    # to val_accuracy 1.00 in one epoch), and a feature named twice is one column counted twice.
    Rule(("data.features",),
         lambda c: c.data.features is not None and (not c.data.features
                                                    or len(set(c.data.features)) < len(c.data.features)),
         lambda c: f"data.features: expected distinct column names, at least one (null: every column not used "
                   f"otherwise), got {c.data.features}",
         ("data.source=x.parquet", "data.features=[f0, f0]")),
    Rule(("data.features", "data.label"),
         lambda c: c.data.label in (c.data.features or ()),
         lambda c: f"data.features: column {c.data.label!r} is data.label; the label must not be an input",
         ("data.source=x.parquet", "data.features=[f0, label]")),
    Rule(("data.weight", "data.label", "data.features"),
         lambda c: c.data.weight is not None and (c.data.weight == c.data.label
                                                  or c.data.weight in (c.data.features or ())),
         lambda c: f"data.weight: column {c.data.weight!r} is also the label or a feature; a sample weight is a "
                   f"column of its own",
         ("data.source=x.parquet", "data.weight=label")),
    *(Rule((f"data.{name}", "data.curriculum_column"),
           lambda c, name=name: c.data.curriculum_column is not None and getattr(c.data, name) > 1,
           lambda c, name=name: f"data.{name}: expected a share in (0, 1], got {getattr(c.data, name)}",
           ("data.source=x.parquet", "data.curriculum_column=hardness", f"data.{name}=1.5"))
      for name in ("curriculum_fraction", "curriculum_start")),
    *(Rule(("data.curriculum_column", f"data.{name}"),
           lambda c, name=name: c.data.curriculum_column is not None and getattr(c.data, name),
           lambda c, name=name: f"data.curriculum_column: not with data.{name}, which rearranges rows inside each "
                                f"window and would undo the curriculum's order",
           ("data.source=x.parquet", "data.curriculum_column=hardness", f"data.{name}=true"))
      for name in ("stratified", "bucket_by_length")),
    # Online mode: one pass over a growing directory, with no length known in advance and no epochs.
    Rule(("data.online", "data.source"),
         lambda c: c.data.online and _online_source_unusable(c),
         lambda c: f"data.online: data.source must be a local directory of Parquet files that may grow, got "
                   f"{c.data.source!r}",
         ("data.online=true",)),
    Rule(("data.curriculum_column", "data.online"),
         lambda c: c.data.online and c.data.curriculum_column is not None,
         lambda c: "data.curriculum_column: not with data.online (a stream is trained in arrival order)",
         ("data.source=.", "data.online=true", "data.curriculum_column=hardness", "schedule.name=constant")),
    Rule(("schedule.name", "data.online"),
         lambda c: c.data.online and c.schedule.name != "constant",
         lambda c: f"schedule.name: {c.schedule.name} decays over the run's length, which data.online does not "
                   f"know in advance; set schedule.name=constant (warmup still applies)",
         ("data.source=.", "data.online=true")),
    Rule(("data.online_poll_s", "run.hang_timeout_s"),
         lambda c: c.data.online and c.data.online_poll_s >= c.run.hang_timeout_s,
         lambda c: f"data.online_poll_s: {c.data.online_poll_s:g} s must be below run.hang_timeout_s "
                   f"({c.run.hang_timeout_s:g} s): the other ranks wait for rank 0's poll in a collective",
         ("data.source=.", "data.online=true", "schedule.name=constant", "data.online_poll_s=90")),
    Rule(("batch.adaptive", "data.online"),
         lambda c: c.batch.adaptive != "none" and c.data.online,
         lambda c: f"batch.adaptive {c.batch.adaptive}: not with data.online (the batch changes at epoch ends, "
                   f"and a stream has none)",
         ("data.source=.", "data.online=true", "schedule.name=constant", "batch.adaptive=step",
          "batch.growth_every_samples=100")),
    Rule(("data.lanes", "data.online"),
         lambda c: c.data.online and c.data.lanes is not None,
         lambda c: "data.lanes: not with data.online (a stream is read in file order, each file cut into steps)",
         ("data.source=.", "data.online=true", "schedule.name=constant", "data.lanes=2")),
    # Each worker owns whole lanes, at every worker count the run may take.
    Rule(("data.lanes", "scaling.num_workers"),
         lambda c: c.data.lanes is not None and c.data.lanes % every_count(c) != 0,
         lambda c: f"data.lanes {c.data.lanes} is not a multiple of "
                   + (f"every worker count from scaling.min_workers {c.scaling.min_workers} to "
                      f"scaling.num_workers {c.scaling.num_workers}" if c.scaling.elastic else
                      f"scaling.num_workers {max(c.scaling.num_workers, 1)}")
                   + f": each worker reads whole lanes; use a multiple of {every_count(c)} (null: that many)",
         ("data.lanes=3",)),
    # An elastic run restarts at any size in its range, with the same global batch (only accumulation changes).
    Rule(("scaling.min_workers", "scaling.num_workers"),
         lambda c: c.scaling.elastic and c.scaling.min_workers > c.scaling.num_workers,
         lambda c: f"scaling.min_workers {c.scaling.min_workers} is more than scaling.num_workers "
                   f"{c.scaling.num_workers}; an elastic run takes [min_workers, num_workers] workers"
                   + (" (0 is local mode, which cannot be elastic)" if c.scaling.num_workers == 0 else ""),
         ("scaling.min_workers=3", "scaling.num_workers=2")),
    Rule(("batch.global_batch_size", "scaling.min_workers"),
         lambda c: c.scaling.elastic and bool(_counts_not_splitting(c)),
         lambda c: f"batch.global_batch_size {c.batch.global_batch_size} does not split over "
                   f"{' or '.join(map(str, _counts_not_splitting(c)))} workers, and an elastic run may restart at "
                   f"any count from scaling.min_workers {c.scaling.min_workers} to scaling.num_workers "
                   f"{c.scaling.num_workers}; use a multiple of {every_count(c)}",
         ("scaling.num_workers=[2, 4]", "batch.global_batch_size=128", "batch.micro_batch_size=32")),
    Rule(("scaling.min_workers", "batch.adaptive"),
         lambda c: c.scaling.elastic and c.batch.adaptive != "none",
         lambda c: f"scaling.min_workers: an elastic run keeps its global batch at every size; batch.adaptive "
                   f"{c.batch.adaptive} changes it with the worker count, so set batch.adaptive none",
         ("scaling.num_workers=[1, 2]", "batch.adaptive=step", "batch.growth_every_samples=100")),
    Rule(("scaling.min_workers", "train.strategy"),
         lambda c: c.scaling.elastic and _parameter_server(c),
         lambda c: "scaling.min_workers: not with train.strategy parameter_server (its servers are sized for a "
                   "fixed number of workers); set a fixed scaling.num_workers",
         ("scaling.num_workers=[1, 2]", "train.strategy=parameter_server")),
    Rule(("scaling.min_workers", "data.online"),
         lambda c: c.scaling.elastic and c.data.online,
         lambda c: "scaling.min_workers: not with data.online (a stream's files are cut into steps for a fixed "
                   "number of workers); set a fixed scaling.num_workers",
         ("scaling.num_workers=[1, 2]", "data.source=.", "data.online=true", "schedule.name=constant")),
    Rule(("scaling.min_workers", "tune.space"),
         lambda c: c.scaling.elastic,
         lambda c: "scaling.min_workers: a search runs every trial at a fixed worker count (trials share the "
                   "cluster); set a fixed scaling.num_workers",
         ("scaling.num_workers=[1, 2]",), scope="search"),
    Rule(("scaling.num_workers", "tune.space"),
         lambda c: c.scaling.num_workers == 0,
         lambda c: "scaling.num_workers: 0 (local mode) cannot train a search's trials (a trial reports to Tune "
                   "through its Ray Train worker group, which local mode does not start); set it to 1 or more",
         ("scaling.num_workers=0",), scope="search"),
    # batch.adaptive needs what each mode decides from.
    Rule(("batch.growth_every_samples", "batch.adaptive"),
         lambda c: c.batch.adaptive == "step" and c.batch.growth_every_samples is None,
         lambda c: "batch.growth_every_samples: batch.adaptive step needs it (how many samples between two "
                   "growths)",
         ("batch.adaptive=step",)),
    Rule(("batch.adaptive", "train.noise_scale", "train.precision"),
         lambda c: c.batch.adaptive == "goodput" and (not c.train.noise_scale or c.train.precision == "fp16"),
         lambda c: "batch.adaptive goodput needs the noise scale: train.noise_scale true, and not "
                   "train.precision fp16",
         ("batch.adaptive=goodput", "train.noise_scale=false")),
    Rule(("batch.adaptive", "batch.micro_batch_size", "scaling.num_workers"),
         lambda c: c.batch.adaptive == "goodput" and _one_step_per_micro_batch(c),
         lambda c: "batch.adaptive goodput needs the noise scale, which one worker measures only with 2+ "
                   "micro-batches per step: set batch.micro_batch_size below batch.global_batch_size"
                   + (" (auto stays at the whole batch on CPUs)" if c.batch.micro_batch_size == "auto" else ""),
         ("batch.adaptive=goodput", "scaling.num_workers=1", "batch.micro_batch_size=null")),
    # The parameter server keeps the weights and optimizer on Ray actors, and steps there.
    Rule(("scaling.num_workers", "train.strategy"),
         lambda c: _parameter_server(c) and c.scaling.num_workers == 0,
         lambda c: "scaling.num_workers: train.strategy parameter_server needs at least 1 Ray Train worker (0 is "
                   "local mode, with no cluster for the servers)",
         ("train.strategy=parameter_server", "scaling.num_workers=0")),
    Rule(("train.precision", "train.strategy"),
         lambda c: _parameter_server(c) and c.train.precision == "fp16",
         lambda c: "train.precision fp16: not with train.strategy parameter_server (the GradScaler's loss scale "
                   "would have to travel with every gradient); use bf16 or fp32",
         ("train.strategy=parameter_server", "train.precision=fp16", "scaling.use_gpu=true")),
    Rule(("train.compile", "train.strategy"),
         lambda c: _parameter_server(c) and c.train.compile is not False,
         lambda c: "train.compile: not with train.strategy parameter_server (each pull replaces the workers' "
                   "weights under the compiled graph, which is not tested); use train.strategy ddp or "
                   "train.compile false",
         ("train.strategy=parameter_server", "train.compile=true")),
    Rule(("batch.micro_batch_size", "train.strategy"),
         lambda c: _parameter_server(c) and c.batch.micro_batch_size == "auto",
         lambda c: "batch.micro_batch_size auto: not with train.strategy parameter_server; set a number",
         ("train.strategy=parameter_server", "batch.micro_batch_size=auto")),
    Rule(("batch.adaptive", "train.strategy"),
         lambda c: _parameter_server(c) and c.batch.adaptive != "none",
         lambda c: f"batch.adaptive {c.batch.adaptive}: not with train.strategy parameter_server; set "
                   f"batch.adaptive none",
         ("train.strategy=parameter_server", "batch.adaptive=step", "batch.growth_every_samples=100")),
    Rule(("data.online", "train.strategy"),
         lambda c: _parameter_server(c) and c.data.online,
         lambda c: "data.online: not with train.strategy parameter_server",
         ("train.strategy=parameter_server", "data.source=.", "data.online=true", "schedule.name=constant")),
    Rule(("train.ema_half_life_samples", "train.strategy"),
         lambda c: _parameter_server(c) and c.train.ema_half_life_samples is not None,
         lambda c: "train.ema_half_life_samples: not with train.strategy parameter_server (the weights live on "
                   "the servers)",
         ("train.strategy=parameter_server", "train.ema_half_life_samples=100")),
    Rule(("optim.shard_state", "train.strategy"),
         lambda c: _parameter_server(c) and c.optim.shard_state,
         lambda c: "optim.shard_state: not with train.strategy parameter_server (its servers already hold the "
                   "optimizer state, off the workers); set optim.shard_state false or train.strategy ddp",
         ("train.strategy=parameter_server", "optim.shard_state=true")),
    Rule(("tune.search", "tune.space"),
         lambda c: c.tune.search != "random" and _has_grid(c),
         lambda c: f"tune.search {c.tune.search}: grid domains need tune.search random",
         ("tune.search=optuna", "tune.space={optim.lr: {grid: [0.1, 0.2]}}"), scope="search"),
)


def check(cfg: Config, scope: str = "run") -> None:
    """Raise ConfigError with the message of the first rule `cfg` breaks (search: the run's rules too)."""
    for rule in RULES:
        if (rule.scope == "run" or rule.scope == scope) and rule.refuses(cfg):
            raise ConfigError(rule.message(cfg))
