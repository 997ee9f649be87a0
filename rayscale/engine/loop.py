"""The training loop of one rank, without Ray: `TrainLoop(payload, context).run()`.

It restores the latest checkpoint, then trains the feed's segments (epochs, or online files) step by step:
each step is `train_step` over this rank's slice of a global step, then the components see it, then whatever
is due (a log line, a validation, a checkpoint) happens, in that order. Everything it needs from outside comes
through the context (engine/context.py): Ray Train's in a worker group, an in-process one in tests.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from rayscale import config
from rayscale.data.collate import micro_batches
from rayscale.engine import checkpoint, distributed
from rayscale.engine.clock import TIMING_KEYS
from rayscale.engine.components import Component, part_dict, read_part
from rayscale.engine.components import checkpointing as checkpoints
from rayscale.engine.components.adaptive_batch import AdaptiveBatch, AdaptiveBatchPart
from rayscale.engine.components.compilation import Compilation
from rayscale.engine.components.curriculum_metrics import CurriculumMeter
from rayscale.engine.components.empty_epoch import EmptyEpochCheck, weighed_by
from rayscale.engine.components.micro_batch import AutoMicroBatch, MicroBatchPart
from rayscale.engine.components.noise_scale import NoiseScaleMeter
from rayscale.engine.components.online_feed import OnlineFeed, OnlinePart
from rayscale.engine.components.preemption import PreemptionCheck, PreemptionPart
from rayscale.engine.components.rung_pause import RungPause, RungPausePart
from rayscale.engine.components.validation import ValidationSchedule, at_micro_batch, evaluate, shown
from rayscale.engine.components.weight_average import Averaging
from rayscale.engine.context import Context
from rayscale.engine.feed import EpochFeed, Segment, SplitStreams, run_lanes
from rayscale.engine.guard import NonFiniteGuard
from rayscale.engine.metrics import LogLine, MetricsLog
from rayscale.engine.optimizers import build_optimizer
from rayscale.engine.precision import make_precision
from rayscale.engine.run import Run
from rayscale.engine.state import TrainState, WorkerPayload
from rayscale.engine.step import StepResult, train_step
from rayscale.engine.strategies.ddp import DataParallel
from rayscale.engine.strategies.parameter_server import ParameterServer
from rayscale.engine.strategies.sharded_state import ShardedDataParallel
from rayscale.engine.tasks import Objective
from rayscale.math.adaptive_batch import plan_for
from rayscale.math.schedules import peak_lr, schedule_from_config, warmup_note
from rayscale.models import build_model
from rayscale.models.export import start_from


def line_keys() -> tuple[str, ...]:
    """Every key a log line (and so a report) can carry besides the validation metrics: what tune.metric may
    name beyond val_*. A component's keys appear only where its feature is on; every component class is
    imported above."""
    return (*LogLine.core_keys(), *TIMING_KEYS, *(key for component in Component.__subclasses__()
                                                   for key in component.logs))


class TrainLoop:
    def __init__(self, payload: WorkerPayload, context: Context, entered_at: float | None = None):
        self.cfg, self.payload, self.context = config.from_dict(payload.config), payload, context
        cfg, rank = self.cfg, context.rank
        run_dir = Path(payload.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # rank 0 may run on a node where the driver created nothing
        self.metrics = MetricsLog(run_dir, rank, context.device, cfg.train.log_every_samples,
                                  cfg.train.report_every_seconds)
        self.metrics.entered_at = entered_at or time.time()
        with context.restored() as directory:
            restored = checkpoints.read(directory, rank)
            state = restored.saved.train_state if restored else TrainState()
            self.metrics.resume_from(directory, state.samples_seen)
        lanes = run_lanes(state, payload, context.world_size) if not cfg.data.online else 1
        self.streams = SplitStreams(context, payload, cfg, lanes)
        self.feed = OnlineFeed(cfg, payload.spec, read_part(state, OnlineFeed.name, OnlinePart)) \
            if cfg.data.online else EpochFeed(cfg, payload, self.streams, state, context, lanes)
        self.checkpoints = checkpoints.CheckpointSchedule(cfg.run.checkpoint_every_samples, state.samples_seen,
                                                          cfg.run.checkpoint_every_seconds, context.rank)
        self.run = self._build(state, restored)
        self.validation = ValidationSchedule(cfg.train.eval_every_samples, payload.eval_at_samples,
                                             state.samples_seen, payload.val_rows > 0)
        self.run.say(self._plan_line(state if restored else None))
        self.metrics.started_at = time.time()

    def _plan_line(self, resumed: TrainState | None) -> str:
        """The run's first line: its batch plan, its rows, and what else shapes it."""
        cfg, rows = self.cfg, self.payload.train_rows
        parts = [self.run.plan.describe(), self.feed.describe(rows)]
        if resumed is not None:
            parts.append(f"resuming at epoch {resumed.epoch} step {resumed.step_in_epoch}")
        if self.compilation.backend:
            parts.append(self.compilation.describe())
        if not cfg.data.online:  # an online run's length is not known up front
            parts.append(warmup_note(cfg.schedule.warmup_samples, cfg.train.epochs * rows))
        return "; ".join(part for part in parts if part)

    def _build(self, state: TrainState, restored: checkpoints.Restored | None) -> Run:
        """The model, optimizer and components, restored where the run resumes."""
        cfg, payload, context = self.cfg, self.payload, self.context
        self.adaptive = AdaptiveBatch(cfg, payload.train_rows, context.world_size,
                                      read_part(state, AdaptiveBatch.name, AdaptiveBatchPart))
        plan = self.adaptive.plan()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        np.random.seed(cfg.seed)
        self.strategy = ParameterServer(context.parameter_client) if cfg.train.strategy == "parameter_server" \
            else ShardedDataParallel(context.rank) if cfg.optim.shard_state else DataParallel()
        model = build_model(cfg.model, payload.spec, payload.code.model)
        if cfg.model.init_from is not None and restored is None:  # a resumed run has its own weights
            start_from(model, cfg.model.init_from)
        model = self.strategy.wrap(model, context.device, context.world_size)
        # The lr scales from optim.base_batch_size, or (null) from the initial global batch: an adaptive batch
        # moves the lr by the scaling rule; a fixed one is its own base.
        lr = peak_lr(cfg.optim, plan.global_batch_size, cfg.batch.global_batch_size)
        optimizer = build_optimizer(cfg.optim, model, lr, self.strategy.optimizer_shards)
        run = Run(cfg, payload.spec, context.rank, context.world_size, context.device, model, optimizer,
                  make_precision(cfg.train.precision, context.device),
                  NonFiniteGuard(cfg.train.max_nonfinite_steps), state, plan, lr, plan.micro_batch_size,
                  payload.train_rows, payload.val_rows,
                  Objective(payload.spec.task, payload.code.loss_fn(cfg.train.loss)),
                  payload.code.metric_fns(cfg.train.metrics), payload.progress_lines)
        self.components = self._components(run, restored is not None)
        if restored is not None:
            checkpoint.restore(restored.saved, model, run.optimizer, run.precision.scaler)
            for component in self.components:
                component.restore(run, state.parts.get(component.name) if component.name else None)
            if restored.own_rng is not None:
                checkpoint.set_rng_states(restored.own_rng)
            state.resumes += 1
            run.guard.skipped_total = state.nonfinite_skipped
        for component in self.components:
            component.start_epoch(run, state.epoch)  # where it resumes: the micro-batch it found, say
        self.strategy.start(run, resumed=restored is not None)
        schedule = schedule_from_config(cfg.schedule, total_samples=cfg.train.epochs * payload.train_rows)
        self.lr_at = lambda samples: run.peak_lr * schedule(samples)
        # Unweighted per-row losses: a step's loss normaliser is its row count, known on every rank without the
        # scalar all-reduce train_step would otherwise make (zero-weight padding rows are not in rows_in_step).
        self.rows_are_the_count = payload.spec.task != "token_classification" and cfg.data.weight is None
        return run

    def _components(self, run: Run, resumed: bool) -> list[Component]:
        """Every feature of this run that hooks the loop, in the order their hooks run."""
        cfg, payload, state = self.cfg, self.payload, run.state
        base_batch = cfg.optim.base_batch_size or plan_for(cfg.batch.global_batch_size, cfg.batch.micro_batch_size,
                                                           run.world_size).micro_batch_size
        self.micro = AutoMicroBatch(run.plan.auto, read_part(state, AutoMicroBatch.name, MicroBatchPart))
        self.compilation = Compilation(cfg.train.compile)
        self.noise = NoiseScaleMeter(cfg, run.plan, world_size=run.world_size, fp16=run.precision.scaler is not None,
                                     gradients_all_reduced=self.strategy.gradients_all_reduced,
                                     base_batch=base_batch, in_tokens=payload.spec.task == "token_classification",
                                     device=run.device)
        self.rung_pause = RungPause(payload.pause_at_samples, state.samples_seen,
                                    read_part(state, RungPause.name, RungPausePart), resumed)
        half_life = cfg.train.ema_half_life_samples
        self.averaging = Averaging(run.model, half_life) if half_life else None
        self.preemption = PreemptionCheck(cfg.run.preemption_check_steps,
                                          self.context.drain_notice if self.context.watches_drains else None,
                                          read_part(state, PreemptionCheck.name, PreemptionPart))
        optional = [self.compilation if self.compilation.backend else None, self.averaging,
                    CurriculumMeter() if cfg.data.curriculum_column else None,
                    self.feed if isinstance(self.feed, Component) else None]
        self.weighed_by = weighed_by(run.objective.user_loss is not None, cfg.data.weight,
                                     payload.spec.task == "token_classification")
        empty = EmptyEpochCheck(self.weighed_by)
        return [empty, self.adaptive, self.micro, self.noise, self.rung_pause, *filter(None, optional),
                self.preemption, self.checkpoints, self.strategy]

    # ------------------------------------------------------------------------------------------------ training

    def train(self) -> None:
        """Train every segment the feed gives, checkpointing at each one's end."""
        if self.feed.finished(self.run.state):  # a finished run, started again: nothing to train
            self.context.report_finished({"samples_seen": self.run.state.samples_seen, "epoch": self.cfg.train.epochs,
                                          "training_done": True})
            return
        for segment in self.feed.segments(self):
            if self.train_segment(segment) or self.feed.end_segment(self, segment):
                return  # paused at a rung (ASHA by promotion), checkpointed there
        self.feed.finish(self)

    def start_epoch(self, epoch: int) -> None:
        for component in self.components:
            component.start_epoch(self.run, epoch)

    def train_segment(self, segment: Segment) -> bool:
        """Train a segment's steps; True: paused at a rung mid-segment, checkpointed there."""
        self.run.model.train()
        waited_from = time.perf_counter()
        for index, rows in enumerate(segment.steps, start=segment.first):
            self.train_one(rows, index, waited_from)
            if self.after_step(segment):
                return True
            waited_from = time.perf_counter()
        return False

    def train_one(self, rows, index: int, waited_from: float) -> None:
        run, state = self.run, self.run.state
        batch = micro_batches(rows, run.micro_batch_size, run.device)
        self.metrics.interval.data_wait += time.perf_counter() - waited_from
        samples_after = state.samples_seen + rows.rows_in_step
        lr = self.lr_at(samples_after)
        result = self.micro.take_step(run, rows, batch, lambda micro: self.strategy.step(
            run, lambda update: train_step(
                run.model, micro, run.optimizer, task=run.objective, lr=lr, precision=run.precision,
                grad_clip=self.cfg.train.grad_clip, measure_noise=self.noise.measures(state.step),
                global_count=rows.rows_in_step if self.rows_are_the_count else None,
                clock=self.metrics.interval.clock, oom_safe=self.micro.auto, update=update,
                forward_loss=self.compilation.forward_loss)))
        self.guard(result)
        for component in self.components:
            component.after_step(run, rows, result)
        self.metrics.interval.add_step(result, rows.rows_in_step)
        state.samples_seen, state.step, state.step_in_epoch = samples_after, state.step + 1, index + 1

    def guard(self, result: StepResult) -> None:
        """Count a skipped step: a flag on the device when the optimizer skipped there (read at the next line
        or checkpoint, never now), else the host's bool; an fp16 loss-scale overflow is the scaler's business."""
        skipped, run = result.skipped, self.run
        if isinstance(skipped, torch.Tensor):
            run.guard.observe_on_device(skipped, run.state.step)
            return
        overflow_only = skipped and run.precision.scaler is not None and bool(torch.isfinite(result.loss_sum))
        run.guard.observe(not skipped or overflow_only, run.state.step)

    def after_step(self, segment: Segment) -> bool:
        """The log line, validation and checkpoint due after this step, in that order. A line, validation or
        checkpoint due at the segment's last step is the segment end's (a checkpoint made before the epoch end
        would hold what that end then changes: the next epoch's batch). True: paused at a rung."""
        run, state = self.run, self.run.state
        seen, where = state.samples_seen, run.where(segment.epoch)
        inside = seen < segment.end_samples
        if self.metrics.due(seen) and inside:
            line, wanted = self.line_and_wish(segment.epoch)
            run.progress(f"{where} samples {seen:,} {line.shown()}")
            if wanted:
                self.metrics.reported()
                self.context.report({**line.to_json(), **state.validation()})
        if self.validation.due(seen) and inside:
            val = self.validate()
            self.set_validation(val)
            line = self.line(segment.epoch, evaluation=True, validation=val)
            run.progress(f"{where} samples {seen:,} {shown(val)}")
            self.metrics.reported()
            if self.rung_pause.pause_if_reached(seen):
                self.save(line.to_json())  # the rung's result and its checkpoint
                return True
            self.context.report(line.to_json())
        drain = self.preemption.notice(run)
        due = self.checkpoints.due(seen)
        if due and not inside and not drain:  # the segment end's, after its validation and end of epoch
            self.checkpoints.owed = True
        elif due or drain:
            self.save({"samples_seen": seen, "epoch": segment.epoch, **state.validation()})
        if drain:
            run.say(f"{where} samples {seen:,}: {drain.describe()}; checkpointed at step {state.step}, waiting for "
                    f"the group to restart without it")
            self.context.hold_for_restart(drain)
        return False

    # ------------------------------------------------------------------------------- what the feeds call too

    def line(self, epoch: int, **kinds) -> LogLine:
        return self.line_and_wish(epoch, **kinds)[0]

    def line_and_wish(self, epoch: int, **kinds) -> tuple[LogLine, bool]:
        """The interval's log line, and whether rank 0 wants it reported."""
        line, wanted = self.metrics.line(self.run, self.components, epoch, **kinds)
        for component in self.components:
            component.after_line(self.run, line)
        return line, wanted

    def validate(self) -> dict[str, float]:
        """Validation metrics ({} without validation rows); its time is left out of the interval's rates."""
        run = self.run
        if not run.val_rows:
            return {}
        began = time.perf_counter()
        self.strategy.before_validation(run)
        # The bare module, never DDP's forward: ranks evaluate shards of different sizes (one may have none), and
        # DDP's forward makes a collective. Rank 0's buffers (BatchNorm statistics, which each rank updates on its
        # own rows) go to every rank first, so all evaluate the one model rank 0's checkpoint holds.
        model = self.averaging.average.module if self.averaging else checkpoint.unwrap(run.model)
        distributed.broadcast_buffers(model)
        val = evaluate(model, self.streams.val(), at_micro_batch(run.plan, run.micro_batch_size), run.spec,
                       run.precision, run.device, run.objective, run.metrics, self.weighed_by)
        self.metrics.interval.started += time.perf_counter() - began
        return val

    def set_validation(self, val: dict[str, float]) -> None:
        self.run.state.val_loss = val.get("val_loss", self.run.state.val_loss)
        self.run.state.val_accuracy = val.get("val_accuracy", self.run.state.val_accuracy)
        self.run.state.val_metrics.update({key: value for key, value in val.items()
                                           if key not in ("val_loss", "val_accuracy")})

    def save(self, metrics: dict) -> None:
        """A checkpoint: every rank writes its part (rank 0 the state, each rank its RNG) into one directory."""
        run = self.run
        run.guard.settle()  # steps skipped on the device, counted before they are saved (or the run aborts here)
        run.state.nonfinite_skipped = run.guard.skipped_total
        run.state.parts = {component.name: part_dict(part) for component in self.components
                           if component.name and (part := component.part(run)) is not None}
        self.strategy.before_checkpoint(run)
        started = time.perf_counter()
        self.context.save(metrics, lambda directory: checkpoints.write_part(run, directory, self.metrics.path))
        self.checkpoints.saved(time.perf_counter() - started)
