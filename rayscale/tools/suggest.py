"""`rayscale suggest RUN_DIR`: read a finished run, predict goodput at other global batch sizes (goodput.py),
print the table and the command for the best one, write suggest.json and suggest.png. No Ray.

Every check runs before anything is written: bad input raises `UserError` and leaves the run directory as it was.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rayscale import config as config_module
from rayscale.engine.checkpoint import write_bytes_atomic
from rayscale.errors import UserError
from rayscale.files import (
    CONFIG_FILE,
    METRICS_FILE,
    SUGGEST_JSON,
    SUGGEST_PLOT,
    SUMMARY_FILE,
    can_write_in,
    runs_own_named,
)
from rayscale.math import goodput
from rayscale.math.batching import plan_batches
from rayscale.math.schedules import peak_lr, scaled_lr

TIMING_KEYS = ("micro_batch_s", "sync_micro_batch_s", "update_s")
# Every figure of metrics.jsonl the suggestion is computed from: each a finite number where a line has it.
MEASURED_KEYS = (*TIMING_KEYS, "samples_per_sec", "data_wait_fraction", "gradient_noise_scale", "batch_efficiency")


@dataclass
class RunMeasures:
    """Medians over the log lines used (see `measures`)."""

    lines_timed: int  # log lines that timed training steps
    lines_used: int  # the later half of them (after the first)
    samples_per_sec: float
    data_wait_fraction: float
    micro_batch_s: float | None
    sync_micro_batch_s: float
    update_s: float
    noise_scale: float


@dataclass
class Suggestion:
    run_dir: str
    measures: RunMeasures
    model: goodput.StepModel
    rows: list[goodput.Prediction]
    lrs: list[float]
    current: int
    recommended: int
    command: str
    notes: list[str] = field(default_factory=list)


def read_run(run_dir: Path) -> tuple[config_module.Config, list[dict]]:
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} " + ("is a file; expected the directory rayscale train wrote"
                                                       if run_dir.exists() else "does not exist"))
    for name in (CONFIG_FILE, METRICS_FILE):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir / name} does not exist; expected a run directory written by rayscale train")
    cfg = config_module.load_run(run_dir)
    records = []
    for number, line in enumerate((run_dir / METRICS_FILE).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{run_dir / METRICS_FILE} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{run_dir / METRICS_FILE} line {number}: expected a JSON object")
        for key in MEASURED_KEYS:  # a NaN or a string would become a recommendation, or a traceback
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):
                raise UserError(f"{run_dir / METRICS_FILE} line {number}: {key} is {value!r}; expected a finite "
                                f"number (or none)")
            # A time or a rate below 0 gave a table of negative goodputs and a recommendation. (The noise scale
            # may be: its estimate of the gradient's noise is a difference of two measurements.)
            if value is not None and value < 0 and key != "gradient_noise_scale":
                raise UserError(f"{run_dir / METRICS_FILE} line {number}: {key} is {value!r}; expected a number of "
                                f"at least 0")
        records.append(record)
    return cfg, records


def _why_no_noise_scale(cfg: config_module.Config, accumulation_steps: int, workers: int) -> str:
    if not cfg.train.noise_scale:
        return "train.noise_scale was false; train with it true"
    if cfg.train.precision == "fp16":
        return "it is not measured under train.precision fp16 (the gradients carry the loss scale); use bf16 or fp32"
    if workers == 1 and accumulation_steps == 1:
        return ("it needs two batch sizes in a step: 2+ workers, or with one worker a batch.micro_batch_size "
                "below batch.global_batch_size")
    return "no log line measured it yet; train longer (a few train.log_every_samples)"


def measures(cfg: config_module.Config, records: list[dict], metrics_path: Path) -> RunMeasures:
    """Robust inputs: medians over the later half of the log lines that timed steps."""
    plan = plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    if not any("sync_micro_batch_s" in r for r in records):
        raise UserError(f"{metrics_path}: no step timings ({', '.join(TIMING_KEYS)}); the run is from an older "
                        f"rayscale: train it again with this one")
    timed = goodput.timed_lines(records)
    if not timed:
        raise UserError(f"{metrics_path}: no log line timed a training step (samples_per_sec, sync_micro_batch_s); "
                        f"expected a run that trained at least one log interval")
    measured_noise = [r for r in records if r.get("gradient_noise_scale") is not None]
    if not measured_noise:
        raise UserError(f"{metrics_path}: no gradient_noise_scale: "
                        f"{_why_no_noise_scale(cfg, plan.accumulation_steps, plan.num_workers)}")
    if all(r.get("batch_efficiency") is None for r in measured_noise):
        raise UserError(f"{metrics_path}: the gradient_noise_scale is in tokens (a sequence task); suggest "
                        f"compares batch sizes in rows and supports row tasks only")
    found = goodput.medians(timed, measured_noise)
    return RunMeasures(lines_timed=len(timed), **found)


def lr_at(cfg: config_module.Config, batch: int) -> tuple[float, list[str]]:
    """The peak lr at `batch` by the run's optim.scaling_rule, and the overrides that make train use it.

    A rule with optim.base_batch_size unset means "lr was tuned at the global batch", so a new batch keeps the
    lr: the run's batch is pinned as the base to keep the rule. With rule none, the linear rule from the run's
    lr is shown and set as optim.lr (a starting point, not a tuned value).
    """
    run_batch, optim = cfg.batch.global_batch_size, cfg.optim
    if optim.scaling_rule == "none":
        lr = scaled_lr(optim.lr, batch, run_batch, "linear")
        return lr, [] if batch == run_batch else [f"optim.lr={lr:.6g}"]
    lr = peak_lr(optim, batch, run_batch)
    pin = optim.base_batch_size is None and batch != run_batch
    return lr, [f"optim.base_batch_size={run_batch}"] if pin else []


def overrides_for(cfg: config_module.Config, row: goodput.Prediction) -> list[str]:
    sets = [f"batch.global_batch_size={row.global_batch_size}"]
    # A null micro-batch means the whole per-worker batch: keep it null only where that is what the row uses.
    # Auto finds the micro-batch again at the new size.
    keeps = cfg.batch.micro_batch_size in ("auto", row.micro_batch_size) or (
        cfg.batch.micro_batch_size is None and row.accumulation_steps == 1)
    if not keeps:
        sets.append(f"batch.micro_batch_size={row.micro_batch_size}")
    sets += lr_at(cfg, row.global_batch_size)[1]
    # A new name: the same run.name would resume the finished run, which refuses another batch section.
    sets.append(f"run.name={cfg.run.name}-b{row.global_batch_size}")
    return sets


def _train_rows(run_dir: Path) -> int | None:
    """The run's training rows from summary.json, where the run finished and wrote one."""
    try:
        return int(json.loads((run_dir / SUMMARY_FILE).read_text())["train_rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def suggest(run_dir: Path, max_batch: int | None = None) -> Suggestion:
    cfg, records = read_run(run_dir)
    metrics_path = run_dir / METRICS_FILE
    plan = plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    if plan.auto:  # batch.micro_batch_size auto: the timings are of the micro-batch it settled on
        found = [r["micro_batch_size"] for r in records if r.get("micro_batch_size")]
        plan = plan_batches(plan.global_batch_size, found[-1] if found else None, plan.num_workers)
    run = measures(cfg, records, metrics_path)
    smallest = goodput.smallest_candidate(plan.global_batch_size, plan.num_workers)
    if max_batch is not None and max_batch < smallest:
        raise UserError(f"--max-batch {max_batch} is below the smallest candidate {smallest} (about an eighth of "
                        f"the run's global batch {plan.global_batch_size}, a multiple of {plan.num_workers} workers)")
    model = goodput.calibrate(plan.global_batch_size, plan.micro_batch_size, plan.num_workers,
                              samples_per_sec=run.samples_per_sec, data_wait_fraction=run.data_wait_fraction,
                              micro_batch_s=run.micro_batch_s, sync_micro_batch_s=run.sync_micro_batch_s,
                              update_s=run.update_s)
    notes = []
    batches = goodput.candidate_batches(plan.global_batch_size, plan.num_workers, max_batch)
    train_rows = _train_rows(run_dir)
    if train_rows is not None and batches[-1] > train_rows:
        # rayscale train refuses a global batch larger than an epoch (not one full step per epoch).
        batches = [batch for batch in batches if batch <= train_rows]
        notes.append(f"candidates above the run's {train_rows:,} training rows are left out (summary.json)")
    rows = goodput.predict(model, batches, run.noise_scale)
    top = goodput.best(rows)
    if not model.micro_batch_measured:
        notes.append("every step was one micro-batch, so no micro-batch ran without a sync: each added micro-batch "
                     "is charged the last one's time, all-reduce wait included (conservative for larger batches)")
    if model.samples_per_sec(plan.global_batch_size) < 0.99 * run.samples_per_sec:
        notes.append("the step's parts (each the slowest worker's) add up to more than the measured step, so "
                     "every prediction is below what the run measured: compare rows, not absolute values")
    if cfg.optim.scaling_rule == "none":
        notes.append(f"optim.scaling_rule is none: the lr column applies the linear rule to the run's lr "
                     f"({cfg.optim.lr:g} at {plan.global_batch_size}); a starting point, not a tuned value")
    if plan.global_batch_size not in [row.global_batch_size for row in rows]:
        notes.append(f"the run's own batch {plan.global_batch_size} is above --max-batch; efficiency is still "
                     f"relative to it")
    config_path = run_dir / CONFIG_FILE
    if top.global_batch_size == plan.global_batch_size:
        command = f"keep batch.global_batch_size={plan.global_batch_size}: the run's own batch has the best goodput"
    else:
        command = f"rayscale train -c {config_path} " + " ".join(
            f"--set {item}" for item in overrides_for(cfg, top))
    return Suggestion(str(run_dir), run, model, rows, [lr_at(cfg, row.global_batch_size)[0] for row in rows],
                      plan.global_batch_size, top.global_batch_size, command, notes)


def format_table(result: Suggestion) -> str:
    header = f"{'global batch':>12}  {'micro x accum':>13}  {'samples/s':>10}  {'efficiency':>10}  " \
             f"{'goodput':>10}  {'lr':>9}"
    lines = [header]
    for row, lr in zip(result.rows, result.lrs, strict=True):
        marks = [name for name, batch in (("current", result.current), ("recommended", result.recommended))
                 if batch == row.global_batch_size]
        lines.append(f"{row.global_batch_size:>12,}  {f'{row.micro_batch_size} x {row.accumulation_steps}':>13}  "
                     f"{row.samples_per_sec:>10,.0f}  {row.efficiency:>10.3f}  {row.goodput:>10,.0f}  {lr:>9.4g}"
                     + (f"  <- {', '.join(marks)}" if marks else ""))
    return "\n".join(lines)


def report(result: Suggestion) -> str:
    run, model = result.measures, result.model
    micro = f"{run.micro_batch_s * 1e3:.2f} ms" if run.micro_batch_s is not None else "not measured"
    inputs = [
        f"measured: medians of the later {run.lines_used} of {run.lines_timed} log lines that timed steps",
        f"  noise scale {run.noise_scale:.1f}; {run.samples_per_sec:,.0f} samples/s at global batch {result.current} "
        f"(micro-batch {model.micro_batch_size} x {model.plan(result.current)[1]} accumulation x "
        f"{model.num_workers} workers)",
        f"  per step: micro-batch {micro} (no sync), last micro-batch {run.sync_micro_batch_s * 1e3:.2f} ms "
        f"(with the all-reduce), update {run.update_s * 1e3:.2f} ms, data wait {run.data_wait_fraction:.1%} of "
        f"the step, other {model.other_s * 1e3:.2f} ms"]
    lines = [f"run: {result.run_dir}", *inputs, "", format_table(result), ""]
    lines += [f"note: {note}" for note in result.notes]
    lines.append("goodput = samples/s x efficiency (progress per sample against the run's own batch)")
    lines.append(f"suggested: {result.command}")
    return "\n".join(lines)


def to_json(result: Suggestion) -> dict:
    return {
        "run_dir": result.run_dir,
        "inputs": asdict(result.measures),
        "model": asdict(result.model),
        "current": result.current,
        "recommended": result.recommended,
        "command": result.command,
        "notes": result.notes,
        "candidates": [{**asdict(row), "lr": lr} for row, lr in zip(result.rows, result.lrs, strict=True)],
    }


def _check_writable_file(path: Path, flag: str) -> None:
    if path.is_dir():
        raise UserError(f"{flag}: {path} is a directory; expected the path of a file to write")
    if not path.parent.is_dir() or not can_write_in(path.parent):
        raise UserError(f"{flag}: cannot write {path} (its directory {path.parent} is missing or not writable)")


def suggest_from_cli(run_dir: str, max_batch: int | None = None, plot: str | None = None) -> int:
    directory = Path(run_dir).expanduser()
    result = suggest(directory, max_batch)
    json_path = directory / SUGGEST_JSON
    if plot is not None and not plot.strip():  # Path("") is the working directory
        raise UserError("--plot: expected the path of a file to write, got an empty one")
    plot_path = Path(plot).expanduser() if plot is not None else directory / SUGGEST_PLOT
    _check_writable_file(json_path, "RUN_DIR")
    _check_writable_file(plot_path, "--plot" if plot is not None else "RUN_DIR")  # the flag the user gave, if any
    if plot_path.resolve() == json_path.resolve():
        own = f"the run's {SUGGEST_JSON}"
    else:
        own = runs_own_named(plot_path, directory)
    if own is not None:
        raise UserError(f"--plot: {plot_path} would replace {own}; expected another file path")
    print(report(result))
    from rayscale.tools.plots import plot_goodput

    plot_goodput(result.rows, result.current, result.recommended, plot_path, title=directory.name)
    write_bytes_atomic(json_path, (json.dumps(to_json(result), indent=2) + "\n").encode())
    print(f"wrote {json_path} and {plot_path}")
    return 0
