"""[1] The Ray Train worker function: the only code that runs inside the training workers.

It rebuilds the typed config from the plain dict the driver sent, restores the latest checkpoint, then runs
the engine's `train_step` over this rank's slice of every global step. Ray is touched in four places only:
the train context, the dataset shards, `get_checkpoint` and `report` (interval and epoch end, never per
step: it is a barrier across workers).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rayscale import checkpoint, config, online, tasks
from rayscale.adaptive_batch import goodput_batch, plan_for, step_batch, upper_limit
from rayscale.averaging import WeightAverage
from rayscale.batching import smaller_micro_batch
from rayscale.data import SplitCache, StepAssembler, chunk_order, micro_batches
from rayscale.models import build_model
from rayscale.noise_scale import NoiseScale, efficiency, two_batch_estimates
from rayscale.optimizers import build_optimizer
from rayscale.ps_actors import ParameterClient, StaleGradient
from rayscale.schedules import scaled_lr, schedule_from_config
from rayscale.step import MicroBatchTooLarge, NonFiniteGuard, make_precision, prepare_model, train_step
from rayscale.step_clock import StepClock

METRICS_FILE = "metrics.jsonl"


@dataclass
class Interval:
    """Sums since the last log line, kept on the device so the hot loop never waits for the host."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    grad_norm_sum: torch.Tensor
    noise: torch.Tensor  # sums of the per-step |G|^2 and tr(S) estimates, and how many steps gave one
    steps: int = 0
    difficulty_sum: float = 0.0  # data.curriculum_column over this rank's rows (host side: numpy already)
    difficulty_rows: int = 0
    samples: int = 0
    data_wait: float = 0.0
    clock: StepClock | None = None
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def fresh(cls, device: torch.device) -> Interval:
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls(zero(), zero(), zero(), torch.zeros(3, dtype=torch.float64, device=device),
                   clock=StepClock(device))

    def add_step(self, result) -> None:
        """A train_step result's loss, count and norm, in place into the float64 sums (no conversion op); a
        skipped step's norm is not finite: it adds nothing (decided on the device when it was skipped there)."""
        self.loss_sum += result.loss_sum
        self.count += result.local_count
        if isinstance(result.skipped, torch.Tensor):
            self.grad_norm_sum += torch.where(result.skipped, 0.0, result.grad_norm)
        elif not result.skipped:
            self.grad_norm_sum += result.grad_norm


def _all_reduce(values: list[float] | torch.Tensor, device: torch.device, op=None) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    tensor = tensor.to(device=device, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_mb(device: torch.device) -> float:
    """Memory held now: tensors on a GPU, the process's resident set on CPU (0 where /proc is missing). The peak
    only ever grows; this is what shows a leak, epoch after epoch."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


def _restore_metrics(path: Path, saved: Path, samples_seen: int) -> None:
    """On resume, the log is the one saved in the checkpoint we restart from (rank 0 may now run on another node):
    lines logged after it go, since those steps run again."""
    source = saved if saved.exists() else path
    if not source.exists():
        return
    keep = [line for line in source.read_text().splitlines()
            if line.strip() and json.loads(line).get("samples_seen", 0) <= samples_seen]
    checkpoint.write_bytes_atomic(path, "".join(line + "\n" for line in keep).encode())


def evaluate(model, batches, plan, rank, spec: tasks.DataSpec, precision, device) -> dict[str, float]:
    """Validation loss (and accuracy) over all validation rows (`batches`: numpy blocks in order), each rank
    taking its slice."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    assembler = StepAssembler(plan, rank, seed=0, epoch=0, shuffle="none", window_rows=plan.global_batch_size)
    with torch.no_grad():
        for step in assembler.steps(batches):
            for batch in micro_batches(step, plan.micro_batch_size, device):
                with precision.autocast():
                    output = tasks.forward(model, batch)
                sums[0] += tasks.loss_sum(spec.task, output, batch).double()
                hits = tasks.correct(spec.task, output, batch)
                if hits is not None:
                    sums[1] += hits.double()
                sums[2] += tasks.count(spec.task, batch).double()
    model.train()
    loss, correct, count = _all_reduce(sums, device).tolist()
    metrics = {"val_loss": loss / max(count, 1e-12)}
    if spec.task != "regression":
        metrics["val_accuracy"] = correct / max(count, 1e-12)
    return metrics


def quiet_ray_data() -> None:
    """Ray Data and Train log every dataset execution and report at INFO, drowning the progress lines."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # "Reporting training result ..." comes from a logger named after its file, outside the ray.train tree.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Blocks in chunk order, always. Train passes DataConfig's execution options to its workers' shards, but a
    # local-mode run (the loop in the driver) gets none: without this, two identical local runs differed.
    ray.data.DataContext.get_current().execution_options.preserve_order = True


def train_worker(payload: dict) -> None:
    entered = time.time()  # start-up's split: launching the group before this, setting up the worker after
    import ray.train
    import ray.train.torch

    quiet_ray_data()
    cfg = config.from_dict(payload["config"])
    spec = tasks.DataSpec(**{**payload["spec"], "input_shape": tuple(payload["spec"]["input_shape"])})
    run_dir = Path(payload["run_dir"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    local_mode = payload["local_mode"]

    train_rows, epochs = payload["train_rows"], cfg.train.epochs
    # batch.adaptive: each epoch's global batch (adaptive_batch.py); the one the next epoch uses is checkpointed.
    initial_batch, adaptive = cfg.batch.global_batch_size, cfg.batch.adaptive
    batch_limit = upper_limit(cfg.batch.max_global_batch_size, initial_batch, train_rows, world_size,
                              cfg.batch.micro_batch_size) if adaptive != "none" else initial_batch
    metrics_path = run_dir / METRICS_FILE
    run_dir.mkdir(parents=True, exist_ok=True)  # rank 0 may run on a node where the driver created nothing
    restored = ray.train.get_checkpoint()
    if restored is None and local_mode:  # re-running a local-mode run.name resumes it too
        latest = checkpoint.latest_local(run_dir / "checkpoints")
        restored = ray.train.Checkpoint.from_directory(str(latest)) if latest is not None else None
    state = own_rng = None
    if restored is not None:
        with restored.as_directory() as directory:
            checkpoint.verify(directory)
            state = checkpoint.load(Path(directory) / checkpoint.STATE_FILE)
            if rank == 0:
                _restore_metrics(metrics_path, Path(directory) / METRICS_FILE, state["progress"]["samples_seen"])
            if (Path(directory) / f"rng_rank{rank}.pt").exists():  # each rank continues its own dropout stream
                own_rng = checkpoint.load(Path(directory) / f"rng_rank{rank}.pt")

    limit = payload.get("cache_mb", 0) * 2**20
    train_cache = SplitCache(payload["train_cache"], limit) if payload.get("train_cache") else None
    val_cache = SplitCache(payload["val_cache"], limit) if payload.get("val_cache") else None

    curriculum_epochs = set(payload.get("curriculum_epochs", ()))

    def rows_of(name: str, cache: SplitCache | None, order_epoch: int | None, shuffle: str, prefetch: int):
        """An epoch's numpy blocks: replayed from the worker's cache once it holds the split, else streamed
        from Ray Data (and kept on the way when it may be cached). A curriculum epoch's order is Ray Data's
        sort, which the cache cannot replay: it always streams (the cache may still record it)."""
        if cache is not None and cache.ready and order_epoch not in curriculum_epochs:
            return cache.replay(chunk_order(len(cache.starts), shuffle, cfg.seed, order_epoch))
        stream = ray.train.get_dataset_shard(name).iter_batches(batch_size=None, batch_format="numpy",
                                                                prefetch_batches=prefetch)
        return cache.record(stream) if cache is not None else stream

    # Ray Data's first blocks take seconds (read tasks start in new processes) and so does building DDP (its
    # constructor imports torch._dynamo, ~1.8 s): the first epoch starts streaming while the model is built.
    first_epoch = state["progress"]["epoch"] if state is not None else 0
    first_stream = started_early(rows_of(f"train_{first_epoch}", train_cache, first_epoch, cfg.data.shuffle, 4)) \
        if first_epoch < epochs and not cfg.data.online else None

    plan = plan_for((state["progress"].get("global_batch_size") if state else None) or initial_batch,
                    cfg.batch.micro_batch_size, world_size)
    # The lr scales from optim.base_batch_size, or (null) from the initial global batch: an adaptive batch
    # moves the lr by the scaling rule; a fixed one is its own base (scaled_lr leaves the lr as it is).
    lr_base = cfg.optim.base_batch_size or initial_batch
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    np.random.seed(cfg.seed)
    # train.strategy parameter_server: no DDP; the gradients go to the servers (ps_actors.py), which step.
    parameter_server = cfg.train.strategy == "parameter_server"
    model = prepare_model(build_model(cfg.model, spec), device, 1 if parameter_server else world_size)
    peak_lr = scaled_lr(cfg.optim.lr, plan.global_batch_size, lr_base, cfg.optim.scaling_rule)
    optimizer = build_optimizer(cfg.optim, model, peak_lr)
    half_life = cfg.train.ema_half_life_samples
    average = WeightAverage(model, half_life) if half_life else None
    precision = make_precision(cfg.train.precision, device)
    # The noise scale needs two batch sizes in one step: a worker's share and the whole step (2+ workers), or
    # the first micro-batch and the step (1 worker). fp16 leaves it out: its gradients carry the loss scale.
    # batch.micro_batch_size auto: from the whole per-worker batch, halved on every rank whenever one runs out of
    # device memory (the step is redone with the same rows). Under DDP a measured step accumulates under no_sync
    # and averages the gradients after its backward (train_step): one step in train.noise_scale_every_steps.
    auto_micro = plan.auto
    noise_possible = cfg.train.noise_scale and precision.scaler is None
    measure_noise = noise_possible and not parameter_server and (
        world_size > 1 or plan.accumulation_steps > 1 or auto_micro)
    noise = NoiseScale()
    base_batch = cfg.optim.base_batch_size or plan_for(initial_batch, cfg.batch.micro_batch_size,
                                                       world_size).micro_batch_size
    lr_multiplier = schedule_from_config(cfg.schedule, total_samples=epochs * train_rows)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    # Unweighted per-row losses: a step's loss normaliser is its row count, known on every rank without the
    # scalar all-reduce train_step would otherwise make (zero-weight padding rows are not in rows_in_step).
    rows_are_the_count = spec.task in ("classification", "regression") and cfg.data.weight is None

    progress = {"epoch": 0, "step_in_epoch": 0, "samples_seen": 0, "step": 0, "nonfinite_skipped": 0,
                "resumes": 0, "val_loss": None, "val_accuracy": None}
    if state is not None:
        progress = checkpoint.restore(state, model, optimizer, precision.scaler, average)
        if progress.get("noise_scale"):
            noise.load_state_dict(progress["noise_scale"])
        if own_rng is not None:
            checkpoint.set_rng_states(own_rng)
        progress["resumes"] += 1
        # Resumed from a rung's pause (ASHA by promotion): planned, not a fault. A crash that restores the same
        # checkpoint again counts it again from the same saved count, so this stays one per pause.
        if progress.pop("paused", False):
            progress["rung_resumes"] = progress.get("rung_resumes", 0) + 1
        guard.skipped_total = progress["nonfinite_skipped"]
    micro_size = progress.get("micro_batch_size") or plan.micro_batch_size  # a resumed run keeps what it found
    client = None
    if parameter_server:
        client = ParameterClient(payload["ps_servers"], payload["ps_shards"], model, cfg.ps.mode, rank,
                                 cfg.train.grad_clip)
        if rank == 0:  # the servers restart from this checkpoint (or the initial weights): nothing committed lost
            client.reset(optimizer.state_dict() if state is not None else None,
                         progress["step"] if cfg.ps.mode == "sync" else 0)
        _barrier()
    if rank == 0:
        if restored is None and metrics_path.exists():
            metrics_path.unlink()
        print(f"[rayscale] {plan.describe()}; "
              + (f"online over {cfg.data.source}" if cfg.data.online else f"{train_rows} training rows, {epochs} epochs")
              + (f"; resuming at epoch {progress['epoch']} step {progress['step_in_epoch']}" if restored else ""),
              flush=True)

    def write_line(record: dict) -> None:
        if rank == 0:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    staging_root = None if local_mode else checkpoint.fresh_staging_dir(run_dir, rank)

    def save_and_report(metrics: dict) -> None:
        """Every rank writes its part (rank 0 the state, each rank its RNG) into one merged checkpoint."""
        # Local mode keeps no copy in Ray's storage, so its checkpoints stay in the run directory.
        if local_mode:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        guard.settle()  # steps skipped on the device, counted before they are saved (or the run aborts here)
        staging = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=run_dir / "checkpoints" if local_mode
                                        else staging_root))
        progress["nonfinite_skipped"] = guard.skipped_total
        progress["noise_scale"] = noise.state_dict()
        if client is not None:
            _barrier()  # async: every worker's last update is in
            if rank == 0:  # the servers hold the model and the optimizer state: the checkpoint is theirs
                parameters, optimizer_state = client.full_state()
                with torch.no_grad():
                    for parameter, value in zip(model.parameters(), parameters, strict=True):
                        parameter.copy_(value)
                optimizer.load_state_dict(optimizer_state)
        if rank == 0:
            checkpoint.save_atomic(checkpoint.capture(model, optimizer, precision.scaler, progress, average),
                                   staging / checkpoint.STATE_FILE)
            if metrics_path.exists():  # the log so far travels with the checkpoint (multi-node: to the driver)
                shutil.copyfile(metrics_path, staging / METRICS_FILE)
        checkpoint.save_atomic(checkpoint.rng_states(), staging / f"rng_rank{rank}.pt")
        # Last: its presence says the part is whole.
        checkpoint.write_manifest(staging, rank, world_size)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)))
        if not local_mode:  # uploaded to the run's storage by now
            shutil.rmtree(staging, ignore_errors=True)

    interval = Interval.fresh(device)
    epoch_records: list[dict] = []  # this epoch's log lines: batch.adaptive goodput decides from them
    next_log = progress["samples_seen"] + cfg.train.log_every_samples
    every = cfg.run.checkpoint_every_samples
    next_checkpoint = progress["samples_seen"] + every if every else None
    eval_at = tuple(payload.get("eval_at_samples", ()))
    next_eval = next_evaluation(progress["samples_seen"], cfg.train.eval_every_samples, eval_at) \
        if payload["val_rows"] else None
    # ASHA by promotion: this run ends at the first rung past where it starts, checkpointed there.
    pause_at = next((p for p in payload.get("pause_at_samples", ()) if p > progress["samples_seen"]), None)
    last_report = time.perf_counter()
    started = time.time()

    def log(epoch: int, extra: dict | None = None) -> dict:
        nonlocal interval, last_report
        guard.settle()  # the interval's steps skipped on the device: counted, or the run aborts here
        elapsed = time.perf_counter() - interval.started
        want_report = float(rank == 0 and time.perf_counter() - last_report >= cfg.train.report_every_seconds)
        loss_sum, count, wants, true_sq, trace, estimates, difficulty_sum, difficulty_rows = _all_reduce(
            [interval.loss_sum.item(), interval.count.item(), want_report, *interval.noise.tolist(),
             interval.difficulty_sum, interval.difficulty_rows], device).tolist()
        if estimates:  # every rank updates its own copy with the same all-reduced means: all stay equal
            noise.update(true_sq / estimates, trace / estimates)
        noise_scale = noise.value
        # The slowest rank sets the step time; -1 stands for "not measured" (no no-sync micro-batch).
        timings = interval.clock.take().means()
        peak, now, *timed = _all_reduce([peak_memory_mb(device), memory_mb(device),
                                         *(-1.0 if t is None else t for t in timings.values())], device,
                                        op=dist.ReduceOp.MAX if dist.is_initialized() else None).tolist()
        record = {
            "step": progress["step"], "epoch": epoch, "samples_seen": progress["samples_seen"],
            **(_server_metrics(client, interval.steps, device) if client is not None else {}),
            "train_loss": loss_sum / count if count else None,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": interval.grad_norm_sum.item() / max(interval.steps, 1),
            "samples_per_sec": interval.samples / elapsed if elapsed > 0 else None,
            "data_wait_fraction": interval.data_wait / elapsed if elapsed > 0 else None,
            "gradient_noise_scale": noise_scale,
            "critical_batch_size": round(noise_scale) if noise_scale is not None else None,
            # Sequences count tokens, so their noise scale is in tokens; efficiency is given for rows only.
            "batch_efficiency": efficiency(noise_scale, plan.global_batch_size, base_batch)
            if noise_scale is not None and spec.task != "token_classification" else None,
            # Where a step's time goes (step_clock.py): what `rayscale suggest` predicts other batch sizes from.
            **{key: (value if value >= 0 else None) for key, value in zip(timings, timed, strict=True)},
            **({"micro_batch_size": micro_size} if auto_micro else {}),
            **({"global_batch_size": plan.global_batch_size} if adaptive != "none" else {}),
            "peak_memory_mb": peak, "memory_mb": now, "nonfinite_skipped": guard.skipped_total,
            # Mean data.curriculum_column of the rows trained since the last line: the curriculum at work.
            **({"curriculum_difficulty": difficulty_sum / difficulty_rows if difficulty_rows else None}
               if cfg.data.curriculum_column else {}),
            "time": time.time() - started,
            "started_at": started,
            "entered_at": entered,
            **(extra or {}),
        }
        write_line(record)
        if adaptive == "goodput":  # kept only where they are used: an online run logs without end
            epoch_records.append(record)
        interval = Interval.fresh(device)
        record["_report"] = wants > 0
        return record

    def validate() -> dict[str, float]:
        """Validation metrics; its time is left out of the interval's samples/s and data-wait fraction."""
        began = time.perf_counter()
        if client is not None:  # the newest parameters: every worker's updates in
            _barrier()
            client.pull(progress["step"])
        val = evaluate(average.module if average else model, rows_of("val", val_cache, None, "none", 2),
                       dataclasses.replace(plan, micro_batch_size=micro_size), rank, spec, precision, device)
        interval.started += time.perf_counter() - began
        return val

    def next_global_batch(records: list[dict], plan) -> int:
        """The next epoch's global batch. Goodput's inputs (times) differ between ranks, so rank 0 decides and
        every rank takes its answer: they must cut the same steps."""
        if adaptive == "step":
            return step_batch(progress["samples_seen"], initial_batch, cfg.batch.growth_factor,
                              cfg.batch.growth_every_samples, batch_limit, world_size)
        chosen = [goodput_batch(records, plan, initial_batch, batch_limit) or plan.global_batch_size]
        if dist.is_available() and dist.is_initialized() and world_size > 1:
            dist.broadcast_object_list(chosen, src=0)
        return chosen[0]

    def take_step(batch: list[dict], step_rows, lr: float):
        """train_step; under batch.micro_batch_size auto, redone with half the micro-batch on every rank until
        it fits (same rows, same global batch, batch-norm statistics put back)."""
        nonlocal micro_size
        buffers = [b.detach().clone() for b in model.buffers()] if auto_micro else []
        while True:
            try:
                if client is not None:
                    client.pull(progress["step"])
                return train_step(model, batch, optimizer, task=spec.task, lr=lr, precision=precision,
                                  grad_clip=cfg.train.grad_clip,
                                  global_count=step_rows.rows_in_step if rows_are_the_count else None,
                                  measure_noise=measure_noise
                                  and progress["step"] % cfg.train.noise_scale_every_steps == 0,
                                  clock=interval.clock,
                                  oom_safe=auto_micro, update=client.update if client is not None else None)
            except StaleGradient:  # async: computed from too old parameters; pull the newest and redo it
                continue
            except MicroBatchTooLarge:
                batch = None
                for buffer, saved in zip(model.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                micro_size = progress["micro_batch_size"] = smaller_micro_batch(micro_size)
                if rank == 0:
                    print(f"[rayscale] out of device memory at step {progress['step']}: every worker redoes it "
                          f"at micro-batch {micro_size} (batch.micro_batch_size auto)", flush=True)
                batch = micro_batches(step_rows, micro_size, device)

    def run_steps(stream: Iterator, skip: int, epoch: int, segment_end: int) -> bool:
        """Train the steps of one segment (an epoch, or a file in online mode), skipping the first `skip`
        (committed before a restart); logs, validates mid-segment and checkpoints on their intervals. True:
        stopped mid-segment at `pause_at`, checkpointed there."""
        nonlocal next_log, next_eval, next_checkpoint, last_report
        model.train()
        waited_from = time.perf_counter()
        for step_in_epoch, step_rows in enumerate(stream):
            if step_in_epoch < skip:  # committed before the restart: read past, never train twice
                waited_from = time.perf_counter()
                continue
            batch = micro_batches(step_rows, micro_size, device)
            interval.data_wait += time.perf_counter() - waited_from
            samples_after = progress["samples_seen"] + step_rows.rows_in_step
            result = take_step(batch, step_rows, peak_lr * lr_multiplier(samples_after))
            # Skipped or not: a flag on the device when the optimizer skipped there (nothing here may wait for
            # it, so what a skipped step must not touch is masked), else the host's bool.
            skipped = result.skipped
            on_device = isinstance(skipped, torch.Tensor)
            if on_device:
                guard.observe_on_device(skipped, progress["step"])
            else:
                overflow_only = skipped and precision.scaler is not None and bool(
                    torch.isfinite(result.loss_sum))  # fp16 loss-scale overflow: the scaler handles it
                guard.observe(not skipped or overflow_only, progress["step"])
            if average is not None and (on_device or not skipped):
                average.update(model, step_rows.rows_in_step, skipped=skipped if on_device else None)
            if result.small_sq is not None and (on_device or not skipped):
                estimates = step_noise_estimates(result.small_sq, result.small_count,
                                                 result.grad_norm.double() ** 2, result.global_count)
                interval.noise += torch.where(skipped, 0.0, estimates) if on_device else estimates
            interval.add_step(result)
            interval.steps += 1
            interval.samples += step_rows.rows_in_step
            if "difficulty" in step_rows.rows and not step_rows.padding:
                interval.difficulty_sum += float(step_rows.rows["difficulty"].sum())
                interval.difficulty_rows += len(step_rows.rows["difficulty"])
            progress.update(samples_seen=samples_after, step=progress["step"] + 1,
                            step_in_epoch=step_in_epoch + 1)

            due = progress["samples_seen"] >= next_log
            if due:
                next_log = progress["samples_seen"] + cfg.train.log_every_samples
            # A line due at an epoch's last step is the epoch-end line written after this loop: written here as
            # well, that one would cover no steps (nulls in summary.json's final). Online, at a file's last
            # step, these steps go into the next line.
            if due and progress["samples_seen"] < segment_end:
                record = log(epoch)
                if rank == 0:
                    print(f"[rayscale] {where(epoch)} samples {progress['samples_seen']:,} "
                          f"loss {record['train_loss']:.4f} lr {record['lr']:.4g} "
                          f"{record['samples_per_sec']:,.0f} samples/s", flush=True)
                if record.pop("_report"):
                    last_report = time.perf_counter()
                    ray.train.report({**record, **_val(progress)})
            # Mid-epoch validation (train.eval_every_samples, Tune's rungs); the epoch end validates anyway.
            if next_eval is not None and progress["samples_seen"] >= next_eval:
                next_eval = next_evaluation(progress["samples_seen"], cfg.train.eval_every_samples, eval_at)
                if progress["samples_seen"] < segment_end:
                    val = validate()
                    progress.update(val)
                    record = log(epoch, {"evaluation": True, **val})
                    record.pop("_report")
                    if rank == 0:
                        print(f"[rayscale] {where(epoch)} samples {progress['samples_seen']:,} "
                              f"{_shown(val)}", flush=True)
                    last_report = time.perf_counter()
                    if pause_at is not None and progress["samples_seen"] >= pause_at:
                        progress["paused"] = True  # the run resumed from here continues as planned
                        save_and_report(record)  # the rung's result and its checkpoint
                        return True
                    ray.train.report(record)
            if next_checkpoint is not None and progress["samples_seen"] >= next_checkpoint:
                next_checkpoint = progress["samples_seen"] + every
                save_and_report({"samples_seen": progress["samples_seen"], "epoch": epoch, **_val(progress)})
            waited_from = time.perf_counter()
        return False

    def where(epoch: int) -> str:
        return "online" if cfg.data.online else f"epoch {epoch + 1}/{epochs}"

    def broadcast(decide_on_rank_0):
        """Rank 0's answer on every rank (online mode: which file next)."""
        if world_size == 1:
            return decide_on_rank_0()
        box = [decide_on_rank_0() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    if local_mode and restored is not None and not cfg.data.online and progress["epoch"] >= epochs:
        # A finished local run, re-run: nothing to train; hand its last checkpoint back for the outputs.
        ray.train.report({"samples_seen": progress["samples_seen"], "epoch": epochs, "training_done": True},
                         checkpoint=restored)
        return

    if cfg.data.online:  # one pass over a growing directory, file by file (online.py)
        stream_state = progress.setdefault("online", online.fresh_state())
        while (name := online.wait_for_file(cfg.data.source, stream_state, cfg.data, broadcast)) is not None:
            skip = progress["step_in_epoch"] if stream_state["current"] == name else 0
            stream_state["current"], progress["step_in_epoch"] = name, 0
            chunks = online.file_chunks(cfg.data.source, name, cfg.data, cfg.seed, spec, stream_state["rows"])
            file_rows = chunks[-1].stop - stream_state["rows"]
            assembler = StepAssembler(plan, rank, seed=cfg.seed, epoch=0, shuffle="none",
                                      window_rows=plan.global_batch_size)
            run_steps(iter(assembler.steps(online.read_file(chunks, cfg.data, cfg.seed))), skip, 0,
                      stream_state["rows"] + file_rows)
            stream_state["files"].append(name)
            stream_state.update(rows=stream_state["rows"] + file_rows, current=None)
            progress["step_in_epoch"] = 0
            save_and_report({"samples_seen": progress["samples_seen"], "epoch": 0, "online_files":
                             len(stream_state["files"]), **_val(progress)})
        val = validate() if payload["val_rows"] else {}
        progress.update(epoch=1, step_in_epoch=0, **val)
        record = log(0, {"epoch_end": True, "evaluation": bool(val), "online_files": len(stream_state["files"]),
                         "online_rows": stream_state["rows"], **val})
        record.pop("_report")
        if rank == 0:
            print(f"[rayscale] online done: {len(stream_state['files'])} files, {stream_state['rows']:,} rows, "
                  f"nothing new for {cfg.data.online_idle_timeout_s:g} s {_shown(val)}", flush=True)
        save_and_report({**record, "epoch": 1, "training_done": True})
        return

    for epoch in range(progress["epoch"], epochs):
        if progress.get("global_batch_size", plan.global_batch_size) != plan.global_batch_size:
            plan = plan_for(progress["global_batch_size"], cfg.batch.micro_batch_size, world_size)
            peak_lr = scaled_lr(cfg.optim.lr, plan.global_batch_size, lr_base, cfg.optim.scaling_rule)
            micro_size = progress.get("micro_batch_size") or plan.micro_batch_size
            measure_noise = measure_noise or (noise_possible and plan.accumulation_steps > 1)
        epoch_records = []
        skip = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        progress["epoch"], progress["step_in_epoch"] = epoch, 0
        # A curriculum epoch arrives sorted (data.build_dataset): the assembler keeps that order.
        assembler = StepAssembler(plan, rank, seed=cfg.seed, epoch=epoch,
                                  shuffle="none" if epoch in curriculum_epochs else cfg.data.shuffle,
                                  window_rows=cfg.data.shuffle_buffer_rows,
                                  bucket_by_length=cfg.data.bucket_by_length, stratified=cfg.data.stratified)
        blocks = first_stream if epoch == first_epoch else rows_of(f"train_{epoch}", train_cache, epoch,
                                                                   cfg.data.shuffle, 4)
        stream = iter(assembler.steps(blocks))
        if run_steps(stream, skip, epoch, (epoch + 1) * train_rows):
            return

        val = validate() if payload["val_rows"] else {}
        progress.update(epoch=epoch + 1, step_in_epoch=0, **val)
        record = log(epoch, {"epoch_end": True, "evaluation": bool(val), **val})
        record.pop("_report")
        if rank == 0:
            print(f"[rayscale] epoch {epoch + 1}/{epochs} done: samples {progress['samples_seen']:,} {_shown(val)}",
                  flush=True)
        if adaptive != "none" and epoch + 1 < epochs:
            progress["global_batch_size"] = next_global_batch(epoch_records, plan)
            if rank == 0 and progress["global_batch_size"] != plan.global_batch_size:
                print(f"[rayscale] epoch {epoch + 2}/{epochs}: global batch {plan.global_batch_size} -> "
                      f"{progress['global_batch_size']} (batch.adaptive {adaptive}), peak lr "
                      f"{scaled_lr(cfg.optim.lr, progress['global_batch_size'], lr_base, cfg.optim.scaling_rule):.4g}",
                      flush=True)
        last_report = time.perf_counter()
        progress["paused"] = pause_at is not None and progress["samples_seen"] >= pause_at
        save_and_report({**record, "epoch": epoch + 1, "training_done": epoch + 1 == epochs})
        if progress["paused"]:
            return


def _server_metrics(client, steps: int, device: torch.device) -> dict:
    """Per log line under the parameter server: bytes each worker pulled and pushed per step (mean over
    workers), and in async mode the staleness of the applied gradients (in updates) and how many were refused."""
    counters = client.take_counters()
    pulled, pushed, total, count, refused = _all_reduce(
        [counters["bytes_pulled"], counters["bytes_pushed"], counters["staleness_sum"],
         counters["staleness_count"], counters["refused"]], device).tolist()
    worst = _all_reduce([counters["staleness_max"]], device, op=dist.ReduceOp.MAX).item()
    workers = dist.get_world_size() if dist.is_initialized() else 1
    metrics = {"bytes_pulled_per_step": pulled / workers / max(steps, 1),
               "bytes_pushed_per_step": pushed / workers / max(steps, 1)}
    if client.mode == "async":
        metrics.update(staleness_mean=total / count if count else None, staleness_max=int(worst),
                       stale_refused=int(refused))
    return metrics


def step_noise_estimates(small_sq: torch.Tensor, small: torch.Tensor, big_sq: torch.Tensor,
                         big: torch.Tensor) -> torch.Tensor:
    """[|G|^2, tr(S), 1] from one step (noise_scale.two_batch_estimates on the device, no host sync), or zeros
    when the small batch is empty or the whole step (a rank with no rows, a lone micro-batch)."""
    valid = (small > 0) & (small < big)
    small, big = small.clamp_min(1e-12), torch.maximum(big, small + 1)  # finite where not valid
    true_sq, trace = two_batch_estimates(small_sq, small, big_sq, big)
    estimates = torch.stack([true_sq, trace, torch.ones_like(true_sq)])
    return torch.where(valid, estimates, torch.zeros_like(estimates))


def started_early(blocks: Iterable) -> Iterator:
    """`blocks`, with the first one already being fetched by a thread: the fetch overlaps what the caller does
    next, and the caller's first `next` waits for it (and raises what it raised)."""
    source, box = iter(blocks), {}

    def fetch() -> None:
        try:
            box["first"] = next(source)
        except StopIteration:
            pass
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = error

    thread = threading.Thread(target=fetch, name="rayscale-first-block", daemon=True)
    thread.start()

    def rest() -> Iterator:
        thread.join()
        if "error" in box:
            raise box["error"]
        if "first" in box:
            yield box["first"]
            yield from source

    return rest()


def next_evaluation(samples_seen: int, every: int, at: list[int] | tuple[int, ...] = ()) -> int | None:
    """The first sample count past `samples_seen` at which to validate mid-epoch: the next multiple of
    `every` (0: none) or the next of the fixed points `at` (Tune's rung milestones), whichever comes first."""
    candidates = [point for point in at if point > samples_seen]
    if every:
        candidates.append((samples_seen // every + 1) * every)
    return min(candidates, default=None)


def _shown(val: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in val.items())


def _val(progress: dict) -> dict:
    return {key: progress[key] for key in ("val_loss", "val_accuracy") if progress.get(key) is not None}
