"""[2] The driver: validates a config, builds the TorchTrainer, runs it and writes the run's outputs.

Everything that can be checked without a cluster (config, batch plan, data sources and columns, the model,
the output directory) is checked before Ray starts, so bad input costs no cluster resources and leaves no
half-written run directory. Tune (tune.py) builds its trials with `build_trainer` from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from rayscale import config as config_module
from rayscale import data, sources
from rayscale.batching import BatchPlan, plan_batches
from rayscale.config import Config
from rayscale.errors import UserError
from rayscale.schedules import scaled_lr

HEALTH_CHECK_TIMEOUT_ENV = "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"  # Train's controller reads it (default 600)
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # and this one (default 2 s)
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # its controller reads this too
SHUTDOWN_TIMEOUT_ENV = "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"  # Train's torch backend reads it (default 30)
SHUTDOWN_TIMEOUT_S = 5
GROUPS_FILE = "worker_groups.jsonl"  # one line per worker group started (see _controller_callback)


@dataclass
class PreparedRun:
    cfg: Config
    plan: BatchPlan
    train: data.SplitSpec
    val: data.SplitSpec | None
    train_rows: int
    val_rows: int
    run_dir: Path

    @property
    def spec(self):
        return self.train.info.spec


def run_directory(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).expanduser().resolve() / cfg.run.name


def prepare(cfg: Config) -> PreparedRun:
    """Every check that needs no cluster. Raises UserError; writes nothing."""
    plan = plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    if cfg.train.precision == "fp16" and not cfg.scaling.use_gpu:
        raise UserError("train.precision fp16 needs a GPU (scaling.use_gpu: true); use bf16 on CPU")
    if cfg.data.val_source is None and not 0 <= cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction: expected a value in [0, 1), got {cfg.data.val_fraction}")
    _check_curriculum(cfg)
    _check_online(cfg)
    _check_parameter_server(cfg)
    info = sources.inspect_source(cfg.data.source, cfg.data, cfg.seed)
    if cfg.data.val_source is not None:
        val_info = sources.inspect_source(cfg.data.val_source, cfg.data, cfg.seed, key="data.val_source")
        if val_info.spec.input_shape[1:] != info.spec.input_shape[1:] or val_info.spec.task != info.spec.task:
            raise UserError(f"data.val_source: {cfg.data.val_source} does not match data.source "
                            f"({val_info.spec.task} {val_info.spec.input_shape} vs {info.spec.task} "
                            f"{info.spec.input_shape})")
        train = data.SplitSpec(info, "all", 0.0, cfg.data, cfg.seed)
        val = data.SplitSpec(val_info, "all", 0.0, cfg.data, cfg.seed)
        train_rows, val_rows = info.num_rows, val_info.num_rows
    elif cfg.data.online:  # no held-out split of a stream: validation only with data.val_source
        train, val = data.SplitSpec(info, "all", 0.0, cfg.data, cfg.seed), None
        train_rows, val_rows = info.num_rows, 0
    else:
        train = data.SplitSpec(info, "train", cfg.data.val_fraction, cfg.data, cfg.seed)
        val = data.SplitSpec(info, "val", cfg.data.val_fraction, cfg.data, cfg.seed)
        train_rows = data.count_rows(info, "train", cfg.data.val_fraction)
        val_rows = data.count_rows(info, "val", cfg.data.val_fraction)
        val = val if val_rows else None
    if train_rows == 0:
        raise UserError(f"data.source: {cfg.data.source} leaves no training rows")
    if train_rows < plan.global_batch_size and not cfg.data.online:  # online: small files are fine
        raise UserError(f"batch.global_batch_size: {plan.global_batch_size} is more than the {train_rows} training "
                        f"rows of {cfg.data.source} (not one full step per epoch); expected at most {train_rows}")
    _check_adaptive(cfg, plan, train_rows)
    _check_model(cfg, info.spec)
    run_dir = run_directory(cfg)
    _check_writable(run_dir)
    return PreparedRun(cfg, plan, train, val, train_rows, val_rows, run_dir)


def _check_curriculum(cfg: Config) -> None:
    data = cfg.data
    if data.curriculum_column is None:
        return
    if data.source in sources.BUILTIN:
        raise UserError(f"data.curriculum_column: data.source {data.source} has no columns; a curriculum needs "
                        f"a Parquet source with a difficulty column")
    for name, value in (("curriculum_fraction", data.curriculum_fraction), ("curriculum_start", data.curriculum_start)):
        if value > 1:
            raise UserError(f"data.{name}: expected a share in (0, 1], got {value}")
    if data.stratified or data.bucket_by_length:
        which = "data.stratified" if data.stratified else "data.bucket_by_length"
        raise UserError(f"data.curriculum_column: not with {which}, which rearranges rows inside each window "
                        f"and would undo the curriculum's order")


def _check_parameter_server(cfg: Config) -> None:
    """What train.strategy parameter_server does not combine with, each named by its key."""
    if cfg.train.strategy != "parameter_server":
        return
    unsupported = [
        (cfg.scaling.num_workers == 0, "scaling.num_workers: train.strategy parameter_server needs at least 1 "
                                       "Ray Train worker (0 is local mode, with no cluster for the servers)"),
        (cfg.train.precision == "fp16", "train.precision fp16: not with train.strategy parameter_server (the "
                                        "GradScaler's loss scale would have to travel with every gradient); use "
                                        "bf16 or fp32"),
        (cfg.batch.micro_batch_size == "auto", "batch.micro_batch_size auto: not with train.strategy "
                                               "parameter_server; set a number"),
        (cfg.batch.adaptive != "none", f"batch.adaptive {cfg.batch.adaptive}: not with train.strategy "
                                       f"parameter_server; set batch.adaptive none"),
        (cfg.data.online, "data.online: not with train.strategy parameter_server"),
        (cfg.train.ema_half_life_samples is not None, "train.ema_half_life_samples: not with train.strategy "
                                                      "parameter_server (the weights live on the servers)"),
    ]
    for refused, message in unsupported:
        if refused:
            raise UserError(message)


def _check_online(cfg: Config) -> None:
    data = cfg.data
    if not data.online:
        return
    if data.source in sources.BUILTIN or "://" in data.source or not os.path.isdir(os.path.expanduser(data.source)):
        raise UserError(f"data.online: data.source must be a local directory of Parquet files that may grow, got "
                        f"{data.source!r}")
    if data.curriculum_column is not None:
        raise UserError("data.curriculum_column: not with data.online (a stream is trained in arrival order)")
    if cfg.schedule.name != "constant":
        raise UserError(f"schedule.name: {cfg.schedule.name} decays over the run's length, which data.online does "
                        f"not know in advance; set schedule.name=constant (warmup still applies)")
    if data.online_poll_s >= cfg.run.hang_timeout_s:
        raise UserError(f"data.online_poll_s: {data.online_poll_s:g} s must be below run.hang_timeout_s "
                        f"({cfg.run.hang_timeout_s:g} s): the other ranks wait for rank 0's poll in a collective")


def _check_adaptive(cfg: Config, plan: BatchPlan, train_rows: int) -> None:
    from rayscale.adaptive_batch import upper_limit

    batch = cfg.batch
    if batch.adaptive == "none":
        return
    if cfg.data.online:
        raise UserError(f"batch.adaptive {batch.adaptive}: not with data.online (the batch changes at epoch ends, "
                        f"and a stream has none)")
    if batch.adaptive == "step" and batch.growth_every_samples is None:
        raise UserError("batch.growth_every_samples: batch.adaptive step needs it (how many samples between "
                        "two growths)")
    if batch.adaptive == "goodput" and (not cfg.train.noise_scale or cfg.train.precision == "fp16"):
        raise UserError("batch.adaptive goodput needs the noise scale: train.noise_scale true, and not "
                        "train.precision fp16")
    if batch.adaptive == "goodput" and plan.num_workers == 1 and plan.accumulation_steps == 1 and not plan.auto:
        raise UserError("batch.adaptive goodput needs the noise scale, which one worker measures only with 2+ "
                        "micro-batches per step: set batch.micro_batch_size below batch.global_batch_size")
    upper_limit(batch.max_global_batch_size, plan.global_batch_size, train_rows, plan.num_workers,
                batch.micro_batch_size)


def _check_model(cfg: Config, spec) -> None:
    """Build the model once on the driver (CPU, tiny) so a bad name or kwargs fails before Ray starts."""
    from rayscale.models import build_model
    from rayscale.optimizers import build_optimizer

    model = build_model(cfg.model, spec)
    build_optimizer(cfg.optim, model, cfg.optim.lr)


def _check_writable(run_dir: Path) -> None:
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"run.output_dir: cannot write to {probe} (needed for {run_dir})")


def _check_same_config(cfg: Config, run_dir: Path) -> None:
    """Resuming a run with other training settings would silently mix two experiments."""
    existing = run_dir / "config.yaml"
    if not existing.exists():
        return
    old = yaml.safe_load(existing.read_text()) or {}
    new = config_module.to_dict(cfg)
    for section in new:
        if section in ("run", "scaling", "tune"):
            continue  # where and on how much hardware may change between attempts; tune is not training
        if old.get(section) != new[section]:
            raise UserError(f"run.name {cfg.run.name}: {run_dir} holds a run with a different '{section}' "
                            f"config; pick another run.name or the same config to resume it")


def loopback_unless_joining(address: str | None) -> str | None:
    """The cluster address to join, if any; otherwise make the embedded Ray bind 127.0.0.1 only.

    Ray reads the variable when it is imported, so this runs before anything imports ray. It is not set when
    joining a cluster, whose nodes must keep advertising their real addresses.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return address


def _forget_dead_cluster_address() -> None:
    """Drop /tmp/ray/ray_current_cluster when nothing answers at the address it names.

    A head started with `ray start` and gone since leaves that file behind. Ray's state API, which Train V2
    uses to clean up placement groups, follows it even inside our own embedded Ray; pointing at a dead head,
    the clean-up fails and stopped Tune trials keep their CPUs, so later trials wait forever.
    """
    import socket

    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # a Ray without this layout: nothing we know how to check
        return
    path = Path(get_ray_address_file(None))
    try:
        host, port = path.read_text().strip().rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=1).close()
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        print(f"[rayscale] removed {path}: it named a Ray cluster that is no longer running", flush=True)


def connect(address: str | None, cfg: Config) -> None:
    """Join a cluster (`--address`, RAY_ADDRESS, or inside `ray job submit`), else start Ray on loopback."""
    address = loopback_unless_joining(address)
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level="WARNING")
        return
    _forget_dead_cluster_address()
    # Train's preemption watcher (an actor per worker group, polling for node drains to log them) has nothing
    # to watch on one embedded node, and cost ~7 CPU-seconds per 2-worker run here (43 -> 36 CPU-s for a
    # 1-epoch digits run, 2 cores). Set before ray.init so every process of this Ray inherits it; a user's
    # own setting wins.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    # Our own GCS port, so the address is known before Ray starts: every process of this cluster gets it
    # as RAY_ADDRESS. Ray's state API, which Train V2 uses to remove the placement groups of stopped runs,
    # otherwise refuses to guess when another Ray runs on the machine ("Found multiple active Ray
    # instances"), and stopped Tune trials then keep their CPUs.
    port = _free_loopback_port()
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        # address="local": always a fresh embedded instance, never another Ray found on this machine.
        # One logical CPU beyond the workers' reservation, or Ray Data's read tasks never get scheduled.
        # The dashboard stays on (Ray Train's state API needs it), on loopback only.
        ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, dashboard_host="127.0.0.1",
                 logging_level="WARNING", runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}})
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def user_error_inside(exc: BaseException) -> UserError | None:
    """The UserError a training failure carries: Ray wraps a worker's (or a Ray Data task's) exception in
    RayTaskError (`.cause`), Train in WorkerGroupError (`.worker_failures`) or ControllerError."""
    stack, seen = [exc], set()
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if isinstance(error, UserError) and not isinstance(cause, BaseException):
            return error
        stack += [cause if isinstance(cause, BaseException) else None, error.__cause__, error.__context__,
                  getattr(error, "controller_failure", None),
                  *(getattr(error, "worker_failures", None) or {}).values()]
    return None


def check_fits_before_start(address: str | None, cfg: Config) -> None:
    """Called before `connect`: when the cluster will be the embedded one, its size is known already."""
    import sys

    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if loopback_unless_joining(address) is None and not running:
        check_machine_fits(cfg)


def check_machine_fits(cfg: Config) -> None:
    """For the embedded Ray: the workers must fit this machine's cores and GPUs, or they would wait forever."""
    import torch

    gpus = torch.cuda.device_count() if cfg.scaling.use_gpu and torch.cuda.is_available() else 0
    _check_fits(cfg, os.cpu_count() or 1, gpus, "this machine has {} (embedded Ray)")


def check_cluster_fits(cfg: Config) -> None:
    """Fail fast with the numbers instead of waiting forever on a placement group that cannot fit."""
    import ray

    total = ray.cluster_resources()
    _check_fits(cfg, total.get("CPU", 0), total.get("GPU", 0), "the cluster has {:g}")


def _check_fits(cfg: Config, cpus: float, gpus: float, has: str) -> None:
    workers = max(cfg.scaling.num_workers, 1)
    need_cpu = workers * cfg.scaling.cpus_per_worker
    if cfg.scaling.num_workers and need_cpu > cpus:
        raise UserError(f"scaling.num_workers: {workers} workers x {cfg.scaling.cpus_per_worker:g} CPUs need "
                        f"{need_cpu:g} CPUs, {has.format(cpus)}")
    if cfg.scaling.use_gpu and workers > gpus:
        raise UserError(f"scaling.use_gpu: {workers} workers need {workers} GPUs, {has.format(gpus)}")


def payload(prepared: PreparedRun, eval_at_samples: list[int] | tuple[int, ...] = (),
            pause_at_samples: list[int] | tuple[int, ...] = ()) -> dict:
    """What crosses into the workers: plain data only."""
    return {
        "eval_at_samples": [int(point) for point in eval_at_samples],
        "pause_at_samples": [int(point) for point in pause_at_samples],
        "config": config_module.to_dict(prepared.cfg),
        "spec": dataclasses.asdict(prepared.spec),
        "train_rows": prepared.train_rows,
        "val_rows": prepared.val_rows,
        "curriculum_epochs": [epoch for epoch in range(prepared.cfg.train.epochs) if _curriculum(prepared, epoch)],
        "run_dir": str(prepared.run_dir),
        "local_mode": prepared.cfg.scaling.num_workers == 0,
        "cache_mb": prepared.cfg.data.cache_mb,
        "train_cache": data.cache_plan(prepared.train, prepared.train_rows, prepared.cfg.data.cache_mb),
        "val_cache": data.cache_plan(prepared.val, prepared.val_rows, prepared.cfg.data.cache_mb)
        if prepared.val is not None else None,
    }


def build_trainer(prepared: PreparedRun, *, storage_path: str | None = None, name: str = "checkpoints",
                  callbacks: list | None = None, eval_at_samples: list[int] | tuple[int, ...] = (),
                  pause_at_samples: list[int] | tuple[int, ...] = ()):
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayscale.worker import quiet_ray_data

    cfg = prepared.cfg
    quiet_ray_data()
    # A SIGSTOPped or deadlocked worker: its peers' next collective times out after run.hang_timeout_s
    # (TorchConfig below), and a lone worker stops answering the controller's health check, whose timeout
    # Train takes from the environment it passes to its controller. Both far below Ray's 30 and 10 minutes.
    os.environ[HEALTH_CHECK_TIMEOUT_ENV] = str(cfg.run.hang_timeout_s)
    # ray.train.report is a barrier released at the controller's next poll: at Ray's 2 s, a 12-epoch digits run
    # took 82 s, at 0.2 s 33 s (measured, 2 cores). Polling a worker is one small actor call.
    os.environ[POLL_INTERVAL_ENV] = str(cfg.run.poll_interval_s)
    # Online mode: the workers read the growing directory themselves (online.py), no train datasets.
    datasets = {f"train_{epoch}": data.build_dataset(prepared.train, epoch, _curriculum(prepared, epoch))
                for epoch in range(cfg.train.epochs)} if not cfg.data.online else {}
    if prepared.val is not None:
        datasets["val"] = data.build_dataset(prepared.val)
    execution = ray.data.ExecutionOptions(preserve_order=True)  # the same row order on every rank and run
    loop_config = payload(prepared, eval_at_samples, pause_at_samples)
    if cfg.train.strategy == "parameter_server":
        from rayscale.ps_actors import start_servers

        lr = scaled_lr(cfg.optim.lr, prepared.plan.global_batch_size,
                       cfg.optim.base_batch_size or cfg.batch.global_batch_size, cfg.optim.scaling_rule)
        names, shards, handles = start_servers(cfg, loop_config["spec"], lr)
        loop_config.update(ps_servers=names, ps_shards=shards)
        _SERVERS[str(prepared.run_dir)] = handles  # owned by this process: they live as long as it does
    return TorchTrainer(
        _worker_entry,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.scaling.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo",
                                 timeout_s=int(cfg.run.hang_timeout_s)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=execution),
        run_config=RunConfig(
            # Without run.storage_path the checkpoints live in the run directory; with it (a bucket or a shared
            # mount, which multi-node clusters need), under <storage_path>/<run.name>.
            name=cfg.run.name if cfg.run.storage_path and storage_path is None else name,
            storage_path=storage_path or cfg.run.storage_path or str(prepared.run_dir),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
            callbacks=callbacks or [],
            # Train V2 re-routes print() through its logger, which echoes every progress line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )


_SERVERS: dict[str, list] = {}  # parameter-server actors by run directory (see build_trainer)


def stop_servers(run_dir: Path) -> None:
    import ray

    for handle in _SERVERS.pop(str(run_dir), []):
        ray.kill(handle)


def _curriculum(prepared: PreparedRun, epoch: int) -> data.CurriculumOrder | None:
    return data.curriculum_order(prepared.train, epoch, prepared.cfg.train.epochs, prepared.train_rows)


def _controller_callback(groups_file: Path):
    """A callback for the Train controller, which runs on the driver's node.

    - One line in `groups_file` per worker group started: a checkpoint's progress counts the restores before
      it, but not a restart that failed again before the next checkpoint; this counts every one. The line
      names the group's placement group, for `remove_placement_groups_left` to find.
    - Before a failed group is replaced, Train waits up to 30 s for its process group to shut down gracefully,
      which a frozen worker never does: 5 s is plenty for a healthy group. The controller reads the variable
      from its own environment (Train does not pass it on from the driver), so it is set here, in the
      controller's process.
    """
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RunControl(WorkerGroupCallback):
        def before_worker_group_start(self, worker_group_context) -> None:
            os.environ.setdefault(SHUTDOWN_TIMEOUT_ENV, str(SHUTDOWN_TIMEOUT_S))

        def after_worker_group_start(self, worker_group) -> None:
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            _record_group(groups_file, placement_group=group.id.hex())

    return RunControl()


def _record_group(groups_file: Path, **fields) -> None:
    with open(groups_file, "a") as handle:
        handle.write(json.dumps({"started_at": time.time(), **fields}) + "\n")


def remove_placement_groups_left(run_dir: Path) -> int:
    """Remove the placement groups of this run's worker groups that are still held; returns how many.

    Train's controller removes its group's placement group when it finishes or aborts, and a detached cleaner
    removes it when the controller dies first; but the cleaner is stopped as the abort begins, so a controller
    killed mid-abort (a stopped Tune trial whose actor Tune ends at once) leaves the placement group held for
    as long as the job lives (a 1-CPU group held after a search was seen on a loaded 2-core machine). A
    placement group is not fate-shared with the actor that created it, only with its job."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    path = run_dir / GROUPS_FILE
    if not path.exists():
        return 0
    held = {pg_id for pg_id, entry in placement_group_table().items() if entry.get("state") != "REMOVED"}
    removed = 0
    for line in path.read_text().splitlines():
        pg_id = json.loads(line).get("placement_group") if line.strip() else None
        if pg_id in held:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    return removed


def _worker_entry(payload_dict: dict) -> None:
    from rayscale.worker import train_worker

    train_worker(payload_dict)


# --------------------------------------------------------------------------------------------- outputs

METRICS_FILE = "metrics.jsonl"


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


def write_outputs(prepared: PreparedRun, result, started: float, first_step_at: float | None,
                  phases: dict | None = None) -> dict:

    from rayscale import checkpoint
    from rayscale.plots import plot_curves

    run_dir, cfg = prepared.run_dir, prepared.cfg
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint; see the log above")
    with result.checkpoint.as_directory() as directory:
        checkpoint.verify(directory)
        state = checkpoint.load(Path(directory) / checkpoint.STATE_FILE)
        logged = Path(directory) / METRICS_FILE
        # Rank 0 may have run on another node: the final checkpoint carries its metrics.jsonl.
        if logged.exists():
            checkpoint.write_bytes_atomic(run_dir / METRICS_FILE, logged.read_bytes())
    # With train.ema_half_life_samples the averaged weights are the ones validated, so they are the model.
    checkpoint.save_atomic(state.get("average") or state["model"], run_dir / "model.pt")
    records = read_metrics(run_dir)
    epoch_ends = [r for r in records if r.get("epoch_end")]
    final = dict(epoch_ends[-1]) if epoch_ends else (records[-1] if records else {})
    for key in ("_report", "epoch_end"):
        final.pop(key, None)
    progress = state["progress"]
    rung_resumes = progress.get("rung_resumes", 0)
    wall = time.time() - started
    summary = {
        "run_dir": str(run_dir),
        "final": final,
        "samples_seen": progress["samples_seen"],
        "steps": progress["step"],
        "epochs": progress["epoch"],
        "wall_time_s": round(wall, 3),
        "startup_time_s": round(first_step_at - started, 3) if first_step_at else None,
        "startup_phases_s": phases or {},
        "world_size": prepared.plan.num_workers,
        "batch_plan": _final_plan(prepared.plan, progress, cfg.batch.micro_batch_size),
        # At the batch the run ended with (batch.adaptive scales from the initial batch when the base is null).
        "effective_lr": scaled_lr(cfg.optim.lr, progress.get("global_batch_size", cfg.batch.global_batch_size),
                                  cfg.optim.base_batch_size or cfg.batch.global_batch_size, cfg.optim.scaling_rule),
        "train_rows": progress["online"]["rows"] if cfg.data.online else prepared.train_rows,
        "val_rows": prepared.val_rows,
        "rows_left_out": 0,  # partial last steps are trained, never dropped (see data.py)
        **({"online_files": len(progress["online"]["files"]), "online_rows": progress["online"]["rows"]}
           if cfg.data.online else {}),
        # Worker groups started after the first, by this driver or an earlier (killed) one, less the planned
        # resumes from a rung's pause (ASHA by promotion); in local mode, attempts of this driver's loop.
        "restarts": max(progress.get("resumes", 0), _lines(run_dir / GROUPS_FILE) - 1) - rung_resumes,
        "rung_resumes": rung_resumes,
        "nonfinite_skipped": progress.get("nonfinite_skipped", 0),
        "precision": cfg.train.precision,
        # The driver only plans and collects: this stays flat however many rows stream past it.
        "driver_peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(records, run_dir / "curves.png", title=cfg.run.name)
    return summary


def _final_plan(plan: BatchPlan, progress: dict, micro_batch_size: int | str | None) -> dict:
    """The batch plan as the run ended: under batch.adaptive, at the last epoch's global batch; under
    batch.micro_batch_size auto, with the micro-batch it settled on."""
    from rayscale.adaptive_batch import plan_for

    if progress.get("global_batch_size", plan.global_batch_size) != plan.global_batch_size:
        plan = plan_for(progress["global_batch_size"], micro_batch_size, plan.num_workers)
    found = progress.get("micro_batch_size")
    if not plan.auto or not found:
        return dataclasses.asdict(plan)
    return {**dataclasses.asdict(plan), "micro_batch_size": found,
            "accumulation_steps": -(-plan.per_worker_batch_size // found)}


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


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
        ("wall time", f"{summary['wall_time_s']:.1f} s (start-up {_fmt(summary['startup_time_s'], '.1f')} s"
                      + _phases(summary.get("startup_phases_s") or {}) + ")"),
        ("rows left out", str(summary["rows_left_out"])),
        ("restarts", str(summary["restarts"])),
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


def train(cfg: Config, *, address: str | None = None, callbacks: list | None = None,
          eval_at_samples: list[int] | tuple[int, ...] = (), pause_at_samples: list[int] | tuple[int, ...] = ()
          ) -> dict:
    """Validate, run and write outputs; returns the summary. `eval_at_samples`: extra points (samples seen)
    at which the workers validate mid-epoch — Tune's rung milestones. `pause_at_samples`: the run ends at the
    first of these past where it starts, with a checkpoint there (ASHA by promotion: a trial paused at a rung);
    the same call again resumes from it."""
    started = time.time()
    prepared = prepare(cfg)
    _check_same_config(cfg, prepared.run_dir)
    check_fits_before_start(address, cfg)
    connecting = time.time()
    connect(address, cfg)
    connected = time.time()
    check_cluster_fits(cfg)
    prepared.run_dir.mkdir(parents=True, exist_ok=True)
    groups = prepared.run_dir / GROUPS_FILE
    if not (prepared.run_dir / "config.yaml").exists():  # a new run; otherwise earlier attempts count
        groups.unlink(missing_ok=True)
    (prepared.run_dir / "config.yaml").write_text(
        yaml.safe_dump(config_module.to_dict(cfg), sort_keys=False))
    print(f"[rayscale] run directory {prepared.run_dir}", flush=True)
    if cfg.scaling.num_workers == 0:  # local mode: this process is the one "worker group" (no controller)
        _record_group(groups, local=True)
    try:
        result = build_trainer(prepared, callbacks=[*(callbacks or []), _controller_callback(groups)],
                               eval_at_samples=eval_at_samples, pause_at_samples=pause_at_samples).fit()
    except Exception as exc:
        # Bad input found only while the data streams (a NaN in a later row group, a file changed mid-run)
        # is still the user's one-line error, not a traceback from inside a worker.
        found = user_error_inside(exc)
        if found is None:
            raise
        raise UserError(str(found)) from exc
    finally:
        stop_servers(prepared.run_dir)
    records = read_metrics(prepared.run_dir)
    # Start-up: from this command's start to the moment the (latest) worker group began training.
    first_step_at = records[-1].get("started_at") if records else None
    phases = startup_phases(started, connecting, connected, records[-1] if records else {})
    summary = write_outputs(prepared, result, started, first_step_at, phases)
    print_summary(summary)
    return summary


def train_from_cli(config_path: str | None, overrides: list[str], address: str | None = None) -> int:
    cfg = config_module.load(config_path, overrides)
    train(cfg, address=address)
    return 0
