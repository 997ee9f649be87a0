"""[2c] The run directory after training: metrics.jsonl brought back with the final checkpoint, model.pt,
summary.json and curves.png, and the summary table printed at the end."""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path

from rayscale.config import Config
from rayscale.driver.prepare import PreparedRun
from rayscale.engine import checkpoint
from rayscale.engine.components import read_part
from rayscale.engine.components.adaptive_batch import AdaptiveBatch, AdaptiveBatchPart
from rayscale.engine.components.micro_batch import AutoMicroBatch, MicroBatchPart
from rayscale.engine.components.online_feed import OnlineFeed, OnlinePart
from rayscale.engine.components.preemption import PreemptionCheck, PreemptionPart
from rayscale.engine.components.rung_pause import RungPause, RungPausePart
from rayscale.engine.components.weight_average import exported_weights
from rayscale.engine.state import TrainState
from rayscale.errors import UserError
from rayscale.files import (
    CURVES_FILE,
    GROUPS_FILE,
    METRICS_FILE,
    MODEL_FILE,
    MODEL_SAFETENSORS_FILE,
    SUMMARY_FILE,
)
from rayscale.math.adaptive_batch import plan_for
from rayscale.math.batching import BatchPlan
from rayscale.math.schedules import peak_lr
from rayscale.models.export import safetensors_bytes


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def startup_phases(started: float, connecting: float, connected: float, record: dict) -> dict:
    """Where start-up went, in seconds: `prepare` (the config checked, the data's metadata read), `connect` (Ray
    started or joined), `launch` (Train's controller, the worker processes, their process group and dataset
    shards, up to the latest worker group entering the training function) and `worker_setup` (the checkpoint
    restored, model, DDP and optimizer built, up to its first step). The last two are read off rank 0's clock:
    across nodes they carry the clocks' skew, as the start-up time itself does."""
    entered, began = record.get("entered_at"), record.get("started_at")
    phases = {"prepare": connecting - started, "connect": connected - connecting,
              "launch": entered - connected if entered else None,
              "worker_setup": began - entered if entered and began else None}
    return {name: (round(value, 3) if value is not None else None) for name, value in phases.items()}


def start_loading_plots() -> None:
    """The plotting library's import, started in the background while the workers train (tools/plots.py)."""
    from rayscale.tools.plots import load_in_background

    load_in_background()


def finished_run(cfg: Config, run_dir: Path) -> dict | None:
    """The summary of a run that already trained to its last epoch in `run_dir` (its config the same:
    check_same_config), or None: started again, it has nothing to train, so it claims nothing and counts no
    restart (a search's trial found again on --resume is reported from its files). An online run is never
    finished: new files may have arrived."""
    path = run_dir / SUMMARY_FILE
    if cfg.data.online or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (ValueError, OSError):  # cut short by a kill while it was written: the run writes it again
        return None
    finished = isinstance(summary, dict) and summary.get("epochs", 0) >= cfg.train.epochs  # a paused run's are fewer
    return summary if finished else None


def write_outputs(prepared: PreparedRun, final_checkpoint: Path, started: float, first_step_at: float | None,
                  phases: dict | None = None) -> dict:
    """From the run's final checkpoint directory: every output file; returns the summary."""
    from rayscale.tools.plots import plot_curves

    run_dir = prepared.run_dir
    try:
        checkpoint.verify(final_checkpoint)
    except checkpoint.IncompleteCheckpoint as damaged:  # after Ray registered it: a run.checkpoint_upload_fn's copy
        raise UserError(f"{damaged}: the run's last checkpoint is not whole, so no output was written; run the same "
                        f"command again: it trains on from the last whole checkpoint") from None
    saved = checkpoint.read_state(final_checkpoint)
    logged = final_checkpoint / METRICS_FILE
    # Rank 0 may have run on another node: the final checkpoint carries its metrics.jsonl.
    if logged.exists():
        checkpoint.write_bytes_atomic(run_dir / METRICS_FILE, logged.read_bytes())
    # With train.ema_half_life_samples the averaged weights are the ones validated, so they are the model.
    weights = exported_weights(saved)
    checkpoint.save_atomic(weights, run_dir / MODEL_FILE)
    checkpoint.write_bytes_atomic(run_dir / MODEL_SAFETENSORS_FILE, safetensors_bytes(weights))
    records = read_metrics(run_dir)
    summary = summarize(prepared, saved.train_state, records, started, first_step_at, phases)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(records, run_dir / CURVES_FILE, title=prepared.cfg.run.name)
    return summary


def summarize(prepared: PreparedRun, state: TrainState, records: list[dict], started: float,
              first_step_at: float | None, phases: dict | None) -> dict:
    cfg = prepared.cfg
    epoch_ends = [r for r in records if r.get("epoch_end")]
    final = dict(epoch_ends[-1]) if epoch_ends else (records[-1] if records else {})
    final.pop("epoch_end", None)
    online = read_part(state, OnlineFeed.name, OnlinePart)
    rung_resumes = read_part(state, RungPause.name, RungPausePart).rung_resumes
    batch = read_part(state, AdaptiveBatch.name, AdaptiveBatchPart).global_batch_size or cfg.batch.global_batch_size
    groups = read_groups(prepared.run_dir / GROUPS_FILE)
    sizes = [group["world_size"] for group in groups if "world_size" in group]
    world_size = final.get("world_size") or (sizes[-1] if sizes else prepared.plan.num_workers)
    plan = prepared.plan if world_size == prepared.plan.num_workers else \
        plan_for(prepared.plan.global_batch_size, cfg.batch.micro_batch_size, world_size)
    # Worker groups started after the first, by this driver or an earlier (killed) one, less the planned
    # resumes from a rung's pause (ASHA by promotion); in local mode, attempts of this driver's loop.
    restarts = max(state.resumes, len(groups) - 1) - rung_resumes
    causes = [group.get("cause") for group in groups[1:]]
    drains = read_part(state, PreemptionCheck.name, PreemptionPart)
    return {
        "run_dir": str(prepared.run_dir),
        "final": final,
        "samples_seen": state.samples_seen,
        "steps": state.step,
        "epochs": state.epoch,
        "wall_time_s": round(time.time() - started, 3),
        "startup_time_s": round(first_step_at - started, 3) if first_step_at else None,
        "startup_phases_s": phases or {},
        "world_size": world_size,  # the last worker group's
        "world_sizes": sizes,  # every worker group's, in order (elastic runs resize)
        "batch_plan": final_plan(plan, batch, read_part(state, AutoMicroBatch.name, MicroBatchPart),
                                 cfg.batch.micro_batch_size),
        "effective_lr": peak_lr(cfg.optim, batch, cfg.batch.global_batch_size),  # at the batch it ended with
        "data_spec": dataclasses.asdict(prepared.spec),  # what the model was sized for (rayscale.load_model)
        # The Parquet columns it read, in order: eval and predict take another file's columns by these names.
        "feature_columns": list(prepared.train.info.features) or None,
        # rayscale.train's model=, loss=, metrics=, train_data=, val_data= (not in the config)
        "python_objects": {**prepared.code.described(), **_datasets(prepared)},
        "train_rows": online.rows if cfg.data.online else prepared.train_rows,
        "val_rows": prepared.val_rows,
        "rows_left_out": 0,  # partial last steps are trained, never dropped (data/assembly.py)
        **({"online_files": len(online.files), "online_rows": online.rows} if cfg.data.online else {}),
        "restarts": restarts,
        # Why, apart: Train grew or shrank an elastic group; a node was drained first; the rest (a worker or
        # node lost without notice, a driver started again).
        "resizes": (resizes := causes.count("resize")),
        "preemptions": (preemptions := causes.count("preemption")),
        "fault_restarts": restarts - resizes - preemptions,
        "preemption_checkpoints": drains.checkpoints,  # written on a drain notice
        "last_preemption_step": drains.last_step,
        "rung_resumes": rung_resumes,
        "nonfinite_skipped": state.nonfinite_skipped,
        "precision": cfg.train.precision,
        # The driver only plans and collects: this stays flat however many rows stream past it.
        "driver_peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def final_plan(plan: BatchPlan, global_batch_size: int, found: MicroBatchPart,
               micro_batch_size: int | str | None) -> dict:
    """The batch plan as the run ended: under batch.adaptive, at the last epoch's global batch; under
    batch.micro_batch_size auto, with the micro-batch it settled on."""
    if global_batch_size != plan.global_batch_size:
        plan = plan_for(global_batch_size, micro_batch_size, plan.num_workers)
    if not plan.auto or not found.micro_batch_size:
        return dataclasses.asdict(plan)
    return {**dataclasses.asdict(plan), "micro_batch_size": found.micro_batch_size,
            "accumulation_steps": -(-plan.per_worker_batch_size // found.micro_batch_size)}


def read_groups(path: Path) -> list[dict]:
    """The worker groups started for a run, one per line (launch/callbacks.py): when, world size, cause."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_summary(summary: dict) -> None:
    final = summary["final"]
    rows = [
        ("run", summary["run_dir"]),
        ("samples seen", f"{summary['samples_seen']:,} in {summary['steps']:,} steps, "
                         + (f"{summary['online_files']} files (online)" if "online_files" in summary
                            else f"{summary['epochs']} epochs")),
        ("batch plan", "global {global_batch_size} = micro {micro_batch_size} x {accumulation_steps} accumulation"
                       " x {num_workers} workers".format(**summary["batch_plan"])),
        ("train loss", _fmt(final.get("train_loss"))),
        ("val loss", _fmt(final.get("val_loss"))),
        ("val accuracy", _fmt(final.get("val_accuracy"))),
        ("wall time", f"{summary['wall_time_s']:.1f} s (" + (
            f"start-up {summary['startup_time_s']:.1f} s" if summary["startup_time_s"] is not None
            else "no step trained") + _phases(summary.get("startup_phases_s") or {}) + ")"),
        ("rows left out", str(summary["rows_left_out"])),
        ("restarts", f"{summary['restarts']} ({summary['resizes']} resizes, {summary['preemptions']} "
                     f"preemptions, {summary['fault_restarts']} faults)" if summary["restarts"] else "0"),
        *([("world sizes", " -> ".join(map(str, summary["world_sizes"])))]
          if len(set(summary["world_sizes"])) > 1 else []),
        *([("rung resumes", str(summary["rung_resumes"]))] if summary["rung_resumes"] else []),
        ("non-finite steps skipped", str(summary["nonfinite_skipped"])),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)


def _phases(phases: dict) -> str:
    """': prepare 0.1, Ray 4.2, launch 6.0, worker setup 3.1' (seconds), or nothing when unknown."""
    names = {"prepare": "prepare", "connect": "Ray", "launch": "launch", "worker_setup": "worker setup"}
    known = [f"{names[key]} {value:.1f}" for key, value in phases.items() if value is not None and key in names]
    return ": " + ", ".join(known) if known else ""


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _datasets(prepared: PreparedRun) -> dict[str, str]:
    splits = [split for split in (prepared.train, prepared.val) if split is not None]
    return {split.info.chunks[0].path: f"ray.data.Dataset ({split.info.num_rows:,} rows)"
            for split in splits if split.info.kind == "ray_dataset"}
