"""[2] The driver on Ray: validates a run, builds its TorchTrainer, runs it and writes the run's outputs.

The only place that builds Ray Train objects (Tune builds its trials with `train` from here too). The checks
that need no cluster come first (driver/prepare.py), so bad input costs no cluster resources.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import yaml

from rayscale import config as config_module
from rayscale.config import Config
from rayscale.data.datasets import quiet_ray_data
from rayscale.data.sources import SourceInfo
from rayscale.driver import data_record
from rayscale.driver.outputs import (
    finished_run,
    print_summary,
    read_metrics,
    start_loading_plots,
    startup_phases,
    write_outputs,
)
from rayscale.driver.prepare import (
    NO_CODE,
    NO_DATA,
    PreparedRun,
    check_same_config,
    prepare,
    saved_attempt,
    worker_payload,
)
from rayscale.driver.progress import MetricsFollower, ProgressBar, wants_bar
from rayscale.driver.trackers import Destinations
from rayscale.driver.tracking import Tracking, destinations, final_files
from rayscale.errors import NonFiniteError, UserError, WorkersOutOfMemory, errors_inside, user_error_inside
from rayscale.files import CHECKPOINTS_DIR, CHECKPOINTS_KEPT, CONFIG_FILE, GROUPS_FILE, METRICS_FILE
from rayscale.launch.callbacks import controller_callback, record_group, remove_placement_groups_left
from rayscale.launch.connect import PREEMPTION_WATCHER_ENV, autoscaler_requests, connect
from rayscale.launch.fit import check_cluster_fits, check_fits_before_start
from rayscale.math.schedules import peak_lr
from rayscale.plugins import UserCode

HEALTH_CHECK_TIMEOUT_ENV = "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"  # Train's controller reads it (default 600)
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # and this one (default 2 s)


def build_trainer(prepared: PreparedRun, *, storage_path: str | None = None, name: str = CHECKPOINTS_DIR,
                  callbacks: list | None = None, eval_at_samples: list[int] | tuple[int, ...] = (),
                  pause_at_samples: list[int] | tuple[int, ...] = (), progress_lines: bool = True,
                  report_evaluations: bool = False):
    """`report_evaluations`: every validation is reported (a Tune trial's), not only those of the epoch ends
    that checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from rayscale.launch.torch_backend import TorchConfigOnWorkers
    from rayscale.launch.torch_trainer import trainer_class
    from rayscale.launch.worker import train_worker

    cfg = prepared.cfg
    quiet_ray_data()
    # A SIGSTOPped or deadlocked worker: its peers' next collective times out after run.hang_timeout_s
    # (the torch config below), and a lone worker stops answering the controller's health check, whose timeout
    # Train takes from the environment it passes to its controller. Both far below Ray's 30 and 10 minutes.
    os.environ[HEALTH_CHECK_TIMEOUT_ENV] = str(cfg.run.hang_timeout_s)
    # ray.train.report is a barrier released at the controller's next poll: at Ray's 2 s, a 12-epoch digits run
    # took 82 s, at 0.2 s 33 s (measured, 2 cores). Polling a worker is one small actor call.
    os.environ[POLL_INTERVAL_ENV] = str(cfg.run.poll_interval_s)
    # No datasets here: each worker builds the Ray Data reads of its own lanes and validation shard
    # (launch/ray_context.py), which only it knows once the group's size is known.
    payload = dataclasses.replace(worker_payload(prepared, eval_at_samples, pause_at_samples),
                                  watch_drains=watches_drains(), progress_lines=progress_lines,
                                  report_evaluations=report_evaluations)
    if cfg.train.strategy == "parameter_server":
        from rayscale.launch.ps_actors import start_servers

        lr = peak_lr(cfg.optim, prepared.plan.global_batch_size, cfg.batch.global_batch_size)
        names, shards, handles = start_servers(cfg, prepared.spec, lr, prepared.code.model)
        payload = dataclasses.replace(payload, ps_servers=tuple(names), ps_shards=tuple(map(tuple, shards)))
        _SERVERS[str(prepared.run_dir)] = handles  # owned by this process: they live as long as it does
    return trainer_class()(
        train_worker,
        train_loop_config=payload.to_dict(),
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfigOnWorkers(backend="nccl" if cfg.scaling.use_gpu else "gloo",
                                          timeout_s=int(cfg.run.hang_timeout_s)),
        run_config=RunConfig(
            # Without run.storage_path the checkpoints live in the run directory; with it (a bucket or a shared
            # mount, which multi-node clusters need), under <storage_path>/<run.name>.
            name=cfg.run.name if cfg.run.storage_path and storage_path is None else name,
            storage_path=storage_path or cfg.run.storage_path or str(prepared.run_dir),
            # Faults and preemptions (a node drained first, then lost) have budgets of their own.
            failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                         max_preemption_failures=-1 if cfg.run.max_preemptions is None
                                         else cfg.run.max_preemptions),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            callbacks=callbacks or [],
            # Train V2 re-routes print() through its logger, which echoes every progress line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        autoscaler_requests=autoscaler_requests(),
    )


def scaling_config(cfg: Config):
    """Ray Train's workers: a fixed count, or an elastic range. An elastic group starts at the most workers the
    cluster fits, and Train restarts it from the latest checkpoint when a worker is lost or, every
    scaling.resize_check_s, when more fit; each start derives the batch plan again for its size (engine/loop.py),
    with the global batch, lr, schedule and data order unchanged."""
    from ray.train import ScalingConfig

    workers = (cfg.scaling.min_workers, cfg.scaling.num_workers) if cfg.scaling.elastic else cfg.scaling.num_workers
    return ScalingConfig(num_workers=workers, use_gpu=cfg.scaling.use_gpu,
                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                               **({"GPU": 1} if cfg.scaling.use_gpu else {})},
                         **({"elastic_resize_monitor_interval_s": cfg.scaling.resize_check_s}
                            if cfg.scaling.elastic else {}))


def watches_drains() -> bool:
    """Whether Ray Train's preemption watcher runs for this run's groups: on a cluster, unless turned off (the
    embedded Ray turns it off: one node has no other to move to)."""
    return os.environ.get(PREEMPTION_WATCHER_ENV, "1").strip().lower() not in ("0", "false")


_SERVERS: dict[str, list] = {}  # parameter-server actors by run directory (see build_trainer)


def stop_servers(run_dir: Path) -> None:
    import ray

    for handle in _SERVERS.pop(str(run_dir), []):
        ray.kill(handle)


def train(cfg: Config, *, address: str | None = None, callbacks: list | None = None,
          eval_at_samples: list[int] | tuple[int, ...] = (), pause_at_samples: list[int] | tuple[int, ...] = (),
          code: UserCode = NO_CODE, given: Mapping[str, SourceInfo] = NO_DATA,
          track_to: Destinations | None = None, report_evaluations: bool = False) -> dict:
    """Validate, run and write outputs; returns the summary. `eval_at_samples`: extra points (samples seen)
    at which the workers validate mid-epoch — Tune's rung milestones. `pause_at_samples`: the run ends at the
    first of these past where it starts, with a checkpoint there (ASHA by promotion: a trial paused at a rung);
    the same call again resumes from it. `code`: rayscale.train's model=, loss=, metrics= objects; `given`: the
    sources of its Ray Datasets (launch/user_data.py). `track_to`: where run.trackers write (a search's trials:
    the search's; default: the run directory, or the libraries' environment variables). `report_evaluations`:
    every validation is reported to `callbacks` (a Tune trial's ASHA decides on each), not only those of the
    epoch ends that checkpoint."""
    started = time.time()
    prepared = prepare(cfg, code=code, given=given)
    check_same_config(cfg, prepared.run_dir)
    data_record.check_same_data(prepared)
    if (finished := finished_run(cfg, prepared.run_dir)) is not None:
        print(f"[rayscale] run directory {prepared.run_dir}: trained all {cfg.train.epochs} epochs already "
              f"(summary.json); nothing to train (another run.name trains the config again)", flush=True)
        return finished
    check_fits_before_start(address, cfg, prepared.parameters)
    connecting = time.time()
    connect(address)
    connected = time.time()
    check_cluster_fits(cfg)
    prepared.run_dir.mkdir(parents=True, exist_ok=True)
    groups = prepared.run_dir / GROUPS_FILE
    if not (prepared.run_dir / CONFIG_FILE).exists() or not saved_attempt(cfg, prepared.run_dir):
        groups.unlink(missing_ok=True)  # a new run, or one starting over; otherwise earlier attempts count
    (prepared.run_dir / CONFIG_FILE).write_text(
        yaml.safe_dump(config_module.to_dict(cfg), sort_keys=False))
    data_record.write(prepared)
    print(f"[rayscale] run directory {prepared.run_dir}", flush=True)
    if cfg.scaling.num_workers == 0:  # local mode: this process is the one "worker group" (no controller)
        record_group(groups, local=True)
    tracking = Tracking.start(cfg, prepared.run_dir, track_to or destinations(prepared.run_dir))
    try:
        summary = _fit(prepared, groups, callbacks, eval_at_samples, pause_at_samples, report_evaluations,
                       tracking, (started, connecting, connected))
    except BaseException as exc:
        if tracking is not None:  # what the follower saw is logged; the tracker runs end as failed or killed
            tracking.finish([], [], "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if tracking is not None:
        tracking.finish(read_metrics(prepared.run_dir), final_files(prepared.run_dir))
    print_summary(summary)
    return summary


# Ray's memory monitor's words, in the error it gives for the process it killed (an OutOfMemoryError saying how
# full the node was), which Train wraps in its ControllerError or WorkerGroupError.
MEMORY_KILL = "running low on memory"
_NODE_MEMORY = re.compile(r"Memory on the node \(IP: ([^,]+), ID: \w+\) was ([\d.]+ ?GB used / [\d.]+ ?GB limit)")


def memory_kill(exc: BaseException) -> str | None:
    """Ray's message, where a run failed because its memory monitor killed one of the run's processes."""
    return next((str(error) for error in errors_inside(exc) if MEMORY_KILL in str(error)), None)


def out_of_memory_line(message: str, prepared: PreparedRun) -> str:
    node = _NODE_MEMORY.search(message)
    where = f" on node {node[1]} ({node[2]})" if node else ""
    return (f"the run failed: Ray killed one of its workers{where}, the node's memory nearly full; the model "
            f"has {prepared.parameters:,} parameters ({prepared.parameters * 4 / 2**20:.4g} MiB in float32; each "
            f"worker also holds their gradients, the optimizer's state and a micro-batch's activations); expected "
            f"a smaller model.*, batch.micro_batch_size (rayscale find-batch-size measures what fits) or fewer "
            f"workers per node")


def _fit(prepared: PreparedRun, groups: Path, callbacks: list | None, eval_at_samples, pause_at_samples,
         report_evaluations: bool, tracking: Tracking | None, times: tuple[float, float, float]) -> dict:
    """Train (the progress bar and the trackers following metrics.jsonl meanwhile) and write the outputs."""
    cfg, (started, connecting, connected) = prepared.cfg, times
    bar = wants_bar(cfg.run.progress, sys.stdout)
    try:
        fitting = build_trainer(prepared, callbacks=[*(callbacks or []), controller_callback(groups, cfg.scaling.elastic)],
                                eval_at_samples=eval_at_samples, pause_at_samples=pause_at_samples,
                                progress_lines=not bar, report_evaluations=report_evaluations)
        with ExitStack() as following:
            readers = [tracking.log_line] if tracking is not None else []
            if bar:
                readers.append(following.enter_context(ProgressBar(
                    None if cfg.data.online else cfg.train.epochs * prepared.train_rows, cfg.train.epochs)).show)
            if readers:  # entered last, so it leaves first: its last look comes before the bar closes
                following.enter_context(MetricsFollower(prepared.run_dir / METRICS_FILE, readers))
            if cfg.scaling.num_workers > 0:  # local mode trains in this process: a thread there would slow it
                start_loading_plots()
            result = fitting.fit()
    except Exception as exc:
        # Bad input found only while the data streams (a NaN in a later row group, a file changed mid-run)
        # is still the user's one-line error, not a traceback from inside a worker.
        found = user_error_inside(exc)
        if found is not None:
            raise UserError(str(found)) from exc
        # A run that diverged: its workers' error says why and what to change, in one line.
        if (diverged := user_error_inside(exc, NonFiniteError)) is not None:
            raise NonFiniteError(str(diverged)) from exc
        if (memory := memory_kill(exc)) is not None:
            raise WorkersOutOfMemory(out_of_memory_line(memory, prepared)) from exc
        raise
    finally:
        stop_servers(prepared.run_dir)
        # What Train's own cleaner did (launch/torch_trainer.py): a controller that died before removing its
        # worker group's placement group (a stopped Tune trial's, or a crash) leaves it held until the job ends.
        if sys.modules["ray"].is_initialized():  # not after a Ctrl-C that shut it down
            remove_placement_groups_left(prepared.run_dir)
    records = read_metrics(prepared.run_dir)
    # Start-up: from this command's start to the moment the (latest) worker group began training. A run that
    # was already finished trains nothing: its last line is an earlier command's, and this one has no start-up.
    latest = records[-1] if records and records[-1].get("entered_at", 0) >= started else {}
    first_step_at = latest.get("started_at")
    phases = startup_phases(started, connecting, connected, latest)
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint; see the log above")
    with result.checkpoint.as_directory() as directory:
        return write_outputs(prepared, Path(directory), started, first_step_at, phases)
