"""Each component of the loop on its own: its hooks and its part of the checkpoint, with a stand-in for the run
(what the loop shares with its components: engine/run.py). The loop with every component: test_loop.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rayscale import config
from rayscale.data.assembly import StepRows
from rayscale.engine.components import read_part
from rayscale.engine.components.adaptive_batch import AdaptiveBatch, AdaptiveBatchPart
from rayscale.engine.components.checkpointing import CheckpointSchedule
from rayscale.engine.components.curriculum_metrics import CurriculumMeter
from rayscale.engine.components.empty_epoch import EmptyEpochCheck, weighed_by
from rayscale.engine.components.micro_batch import AutoMicroBatch, MicroBatchPart
from rayscale.engine.components.noise_scale import NoiseScaleMeter
from rayscale.engine.components.rung_pause import RungPause, RungPausePart
from rayscale.engine.components.validation import ValidationSchedule
from rayscale.engine.state import TrainState
from rayscale.engine.step import MicroBatchTooLarge, StepResult
from rayscale.engine.strategies.parameter_server import ParameterServer, StaleGradient
from rayscale.errors import UserError
from rayscale.math.adaptive_batch import plan_for
from rayscale.math.batching import plan_batches

CPU = torch.device("cpu")


def run_like(plan, **fields):
    said = []
    return SimpleNamespace(plan=plan, peak_lr=0.1, micro_batch_size=plan.micro_batch_size, state=TrainState(),
                           rank=0, world_size=plan.num_workers, device=CPU, said=said, say=said.append, **fields)


def result(*, skipped=False, small_sq=None, small_count=None, grad_norm=1.0, global_count=64.0):
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return StepResult(f64(1.0), f64(32.0), f64(global_count), f64(grad_norm), skipped,
                      None if small_sq is None else f64(small_sq), None if small_count is None else f64(small_count))


# -------------------------------------------------------------------------------------------- rung pause

@pytest.mark.parametrize("saved, resumed, rung_resumes", [
    (RungPausePart(), False, 0),  # a fresh run
    (RungPausePart(paused=True, rung_resumes=0), True, 1),  # resumed from a rung's pause: planned, counted once
    (RungPausePart(paused=False, rung_resumes=1), True, 1),  # resumed from a later checkpoint: a restart
    (RungPausePart(paused=True, rung_resumes=1), True, 2),  # the second rung's pause
])
def test_a_resume_from_a_pause_counts_once_and_clears_the_flag(saved, resumed, rung_resumes):
    pause = RungPause((320, 960), samples_seen=0, saved=saved, resumed=resumed)
    assert pause.saved == RungPausePart(paused=False, rung_resumes=rung_resumes)


def test_the_pause_is_the_first_rung_past_where_the_run_starts():
    pause = RungPause((320, 960), samples_seen=320, saved=RungPausePart(), resumed=True)
    assert pause.at == 960 and not pause.reached(959) and pause.reached(960)
    assert not pause.pause_if_reached(900) and not pause.saved.paused
    assert pause.pause_if_reached(1000) and pause.part(None).paused
    assert RungPause((), 0, RungPausePart(), False).at is None


# ----------------------------------------------------------------------------------------- adaptive batch

def _adaptive(mode, saved=None, **batch):
    cfg = config.load(overrides=[f"batch.adaptive={mode}", "batch.global_batch_size=32", "batch.micro_batch_size=16",
                                 "scaling.num_workers=1", "train.epochs=4", "optim.scaling_rule=linear",
                                 *(f"batch.{k}={v}" for k, v in batch.items())])
    return AdaptiveBatch(cfg, train_rows=1000, world_size=1, saved=saved or AdaptiveBatchPart())


def test_an_adaptive_run_resumes_at_the_batch_its_checkpoint_named():
    adaptive = _adaptive("step", AdaptiveBatchPart(global_batch_size=128), growth_every_samples=100)
    assert adaptive.plan() == plan_for(128, 16, 1)
    run = run_like(plan_for(32, 16, 1))
    adaptive.start_epoch(run, 2)  # the epoch starts at the saved batch, the lr scaled from the initial one
    assert run.plan.global_batch_size == 128 and run.peak_lr == pytest.approx(0.1 * 128 / 32)


def test_step_mode_decides_the_next_epochs_batch_at_the_epoch_end_and_saves_it():
    adaptive = _adaptive("step", growth_every_samples=1000)
    run = run_like(plan_for(32, 16, 1))
    run.state.samples_seen = 1000
    assert adaptive.part(run) is None  # nothing decided yet: the initial batch
    adaptive.end_epoch(run, 0)
    assert adaptive.part(run) == AdaptiveBatchPart(global_batch_size=64)
    assert run.said == ["epoch 2/4: global batch 32 -> 64 (batch.adaptive step), peak lr 0.2"]
    adaptive.end_epoch(run, 3)  # the last epoch: nothing follows it
    assert adaptive.saved.global_batch_size == 64
    assert adaptive.log_fields(run, [], 0) == {"global_batch_size": 32}


def test_goodput_mode_decides_from_the_epochs_own_lines_only():
    adaptive = _adaptive("goodput")
    run = run_like(plan_for(32, 16, 1))
    adaptive.after_line(run, SimpleNamespace(to_json=lambda: {"samples_seen": 1}))
    adaptive.start_epoch(run, 1)
    assert adaptive.lines == []
    assert adaptive.next_batch(run) == 32  # no timed lines: it keeps the batch it has


# ----------------------------------------------------------------------------------------- auto micro-batch

def test_auto_halves_until_the_step_fits_and_puts_the_statistics_back():
    model = torch.nn.BatchNorm1d(2)
    run = run_like(plan_batches(64, "auto", 1), model=model)
    micro = AutoMicroBatch(True, MicroBatchPart())
    micro.start_epoch(run, 0)
    rows = StepRows({"row_id": torch.arange(64).numpy(), "x": torch.zeros(64, 2).numpy(),
                     "y": torch.zeros(64, dtype=torch.long).numpy()}, 64)
    sizes = []

    def attempt(batch):
        sizes.append([len(b["x"]) for b in batch])
        model.running_mean += 1  # a forward that changed the statistics before running out of memory
        if len(batch[0]["x"]) > 16:
            raise MicroBatchTooLarge()
        return "done"

    assert micro.take_step(run, rows, [{"x": torch.zeros(64, 2)}], attempt) == "done"
    assert sizes == [[64], [32, 32], [16, 16, 16, 16]]
    assert torch.equal(model.running_mean, torch.ones(2))  # only the step that fitted counts
    assert micro.part(run) == MicroBatchPart(micro_batch_size=16) and run.micro_batch_size == 16
    assert len(run.said) == 2 and "redoes it at micro-batch 16" in run.said[-1]


def test_a_fixed_micro_batch_never_retries():
    micro = AutoMicroBatch(False, MicroBatchPart())
    with pytest.raises(MicroBatchTooLarge):
        micro.take_step(run_like(plan_batches(64, 16, 1)), None, [], lambda batch: (_ for _ in ()).throw(
            MicroBatchTooLarge()))
    assert micro.part(None) is None and micro.log_fields(None, [], 0) == {}


# ------------------------------------------------------------------------------------------- noise scale

def _noise(plan, **overrides):
    cfg = config.load(overrides=[f"{k}={v}" for k, v in overrides.items()])
    return NoiseScaleMeter(cfg, plan, world_size=plan.num_workers, gradients_all_reduced=True, fp16=False,
                           base_batch=8, in_tokens=False, device=CPU)


@pytest.mark.parametrize("plan, on", [
    (plan_batches(64, 8, 2), True),  # two workers: a worker's share is the small batch
    (plan_batches(64, 8, 1), True),  # one worker, 8 micro-batches: the first one is
    (plan_batches(64, None, 1), False),  # one worker, one micro-batch: no second batch size in a step
    (plan_batches(64, "auto", 1), True),  # auto may split it
])
def test_the_noise_scale_is_measured_where_a_step_has_two_batch_sizes(plan, on):
    assert _noise(plan).on is on


def test_noise_estimates_sum_over_the_interval_mask_skipped_steps_and_feed_the_average():
    meter = _noise(plan_batches(64, 8, 2))
    run = run_like(plan_batches(64, 8, 2))
    assert [meter.measures(step) for step in range(5)] == [True, False, False, False, True]  # 1 step in 4
    meter.after_step(run, None, result(small_sq=2.0, small_count=32.0, grad_norm=1.0))
    meter.after_step(run, None, result(skipped=torch.tensor(True), small_sq=9.0, small_count=32.0))  # masked
    meter.after_step(run, None, result(skipped=True, small_sq=9.0, small_count=32.0))  # skipped on the host
    meter.after_step(run, None, result())  # not a measured step
    sums = meter.interval_sums()
    # small 32 with |g|^2 2, big 64 with |G|^2 1: |G|^2 = (64 - 64) / 32 = 0, tr(S) = 1 / (1/32 - 1/64) = 64
    assert sums == pytest.approx([0.0, 64.0, 1.0])
    assert meter.interval_sums() == [0.0, 0.0, 0.0]  # a new interval
    fields = meter.log_fields(run, [2.0, 100.0, 2.0], steps=4)  # means over 2 estimates: |G|^2 1, tr(S) 50
    assert fields["gradient_noise_scale"] == pytest.approx(50.0) and fields["critical_batch_size"] == 50
    assert fields["batch_efficiency"] == pytest.approx((50 + 8) / (50 + 64))
    assert meter.part(run)["updates"] == 1


def test_the_noise_scale_is_off_under_fp16_and_the_parameter_server_and_when_turned_off():
    plan = plan_batches(64, 8, 2)
    assert not _noise(plan, **{"train.noise_scale": "false"}).on
    for kwargs in ({"fp16": True}, {"gradients_all_reduced": False}):
        meter = NoiseScaleMeter(config.load(), plan, world_size=2, base_batch=8, in_tokens=False, device=CPU,
                                **{"fp16": False, "gradients_all_reduced": True, **kwargs})
        meter.start_epoch(run_like(plan), 1)
        assert not meter.on


# ------------------------------------------------------------------------------------------- curriculum

def test_the_curriculum_meter_averages_the_difficulty_of_real_rows_only():
    meter = CurriculumMeter()
    meter.after_step(None, StepRows({"difficulty": torch.tensor([1.0, 3.0]).numpy()}, 2), None)
    meter.after_step(None, StepRows({"difficulty": torch.tensor([100.0]).numpy()}, 2, padding=True), None)
    assert meter.interval_sums() == [4.0, 2] and meter.interval_sums() == [0.0, 0]
    assert meter.log_fields(None, [4.0, 2], 1) == {"curriculum_difficulty": 2.0}
    assert meter.log_fields(None, [0.0, 0], 1) == {"curriculum_difficulty": None}


# ------------------------------------------------------------------------------------------ empty epoch

def _weighed(check: EmptyEpochCheck, run, *counts: float) -> None:
    """Steps whose rows weighed `counts` on this rank, then a log line (its sums as if over every rank)."""
    for count in counts:
        check.after_step(run, None, StepResult(*(torch.tensor(v, dtype=torch.float64) for v in (0.0, count, 0.0, 1.0)),
                                               False))
    check.log_fields(run, check.interval_sums(), len(counts))


def test_an_epoch_whose_rows_all_weighed_0_ends_the_run_naming_what_weighs_them():
    run = run_like(plan_for(64, 32, 1))
    check = EmptyEpochCheck(weighed_by(user_loss=True, weight_column="w", tokens=False))
    check.start_epoch(run, 0)
    _weighed(check, run, 0.0, 0.0)  # a log interval of weightless rows: logged, not an error
    _weighed(check, run, 0.0, 3.0)
    check.end_epoch(run, 0)  # some rows counted
    check.start_epoch(run, 1)
    _weighed(check, run, 0.0)
    _weighed(check, run, 0.0, 0.0)
    with pytest.raises(UserError, match=r"^train.loss \(the weights it returns\) and data.weight \(column 'w'\): "
                                        r"every row of epoch 2 weighed 0 on every worker, so the epoch trained on "
                                        r"nothing; expected some rows with a positive weight$"):
        check.end_epoch(run, 1)


def test_an_epoch_resumed_part_way_is_not_judged_by_its_second_part():
    run = run_like(plan_for(64, 32, 1))
    run.state.step_in_epoch = 5  # the loop starts a resumed epoch before its position resets
    check = EmptyEpochCheck(weighed_by(user_loss=False, weight_column=None, tokens=True))
    check.start_epoch(run, 3)
    _weighed(check, run, 0.0)
    check.end_epoch(run, 3)
    run.state.step_in_epoch = 0
    check.start_epoch(run, 4)
    _weighed(check, run, 0.0)
    with pytest.raises(UserError, match=r"^the data's labels \(a token labelled -100 or masked does not count\): "
                                        r"every row of epoch 5 weighed 0"):
        check.end_epoch(run, 4)


# -------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("every, at, start, samples, due", [
    (400, (), 0, [399, 400, 430, 800], [False, True, False, True]),
    (0, (483, 1449), 0, [483, 500, 1449, 2000], [True, False, True, False]),
    (0, (), 0, [10**6], [False]),
])
def test_validation_is_due_at_each_point_once(every, at, start, samples, due):
    schedule = ValidationSchedule(every, at, start, has_rows=True)
    assert [schedule.due(s) for s in samples] == due


def test_no_validation_rows_no_mid_epoch_validation():
    assert not ValidationSchedule(10, (5,), 0, has_rows=False).due(100)


def test_a_checkpoint_is_due_every_n_samples_from_where_the_run_starts():
    schedule = CheckpointSchedule(320, samples_seen=100)
    assert [schedule.due(s) for s in (400, 420, 739, 740)] == [False, True, False, True]  # from the step that saved
    assert not CheckpointSchedule(None, 0).due(10**9)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_epoch_end_checkpoint_is_due_on_rank_0s_clock_once_the_interval_has_passed_since_the_last():
    """The wish rides in a log line's all-reduce (its second sum): rank 0's counts, other ranks add 0, and every
    rank reads the same answer from the sum. A checkpoint made meanwhile (mid-epoch, a drain) restarts the wait."""
    clock = FakeClock()
    run = SimpleNamespace(world_size=2)
    rank0, rank1 = (CheckpointSchedule(None, 0, every_seconds=10.0, rank=rank, clock=clock) for rank in (0, 1))

    def agreed() -> tuple[bool, bool]:
        sums = [a + b for a, b in zip(rank0.interval_sums(), rank1.interval_sums(), strict=True)]
        rank0.log_fields(run, sums, steps=1)
        rank1.log_fields(run, sums, steps=1)
        return rank0.epoch_end_due, rank1.epoch_end_due

    clock.now += 9.9
    assert agreed() == (False, False)
    clock.now += 0.1
    assert agreed() == (True, True)
    rank0.saved(0.02)
    rank1.saved(0.03)
    clock.now += 5
    assert agreed() == (False, False)
    assert rank1.interval_sums()[1] == 0.0  # another rank never wishes, however long it waits
    assert CheckpointSchedule(None, 0, every_seconds=0.0).epoch_end_due  # 0: every epoch end, from the first


def test_a_component_reads_its_part_typed_with_defaults_where_the_checkpoint_has_none():
    state = TrainState(parts={"micro_batch": {"micro_batch_size": 8}})
    assert read_part(state, "micro_batch", MicroBatchPart) == MicroBatchPart(8)
    assert read_part(state, "rung_pause", RungPausePart) == RungPausePart()


# -------------------------------------------------------------------------------------- parameter server

class FakeClient:
    mode = "async"

    def __init__(self, stale_times=0):
        self.calls, self.stale_times = [], stale_times

    def reset(self, optimizer_state, version):
        self.calls.append(("reset", optimizer_state is not None, version))

    def pull(self, step):
        self.calls.append(("pull", step))

    def update(self, parameters, lr):
        if self.stale_times:
            self.stale_times -= 1
            raise StaleGradient()
        return torch.tensor(1.0), True

    def full_state(self):
        return [torch.full((2,), 7.0)], {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}

    def take_counters(self):
        return {"bytes_pulled": 80, "bytes_pushed": 40, "staleness_sum": 3, "staleness_count": 2,
                "staleness_max": 2, "refused": 1}


def test_a_stale_gradient_is_pulled_again_and_recomputed_from_the_same_rows():
    client = FakeClient(stale_times=2)
    strategy = ParameterServer(lambda model: client)
    model = torch.nn.Linear(2, 1, bias=False)
    run = run_like(plan_batches(4, None, 1), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.start(run, resumed=False)
    attempts = []
    strategy.step(run, lambda update: attempts.append(1) or update([], 0.1))
    assert len(attempts) == 3 and [c for c in client.calls if c[0] == "pull"] == [("pull", 0)] * 3
    assert client.calls[0] == ("reset", False, 0)  # async: the servers' version starts at 0


def test_the_checkpoint_holds_the_servers_model_and_the_log_line_their_traffic():
    client = FakeClient()
    strategy = ParameterServer(lambda model: client)
    model = torch.nn.Linear(2, 1, bias=False)
    run = run_like(plan_batches(4, None, 1), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.start(run, resumed=True)
    strategy.before_checkpoint(run)
    assert torch.equal(model.weight.detach(), torch.full((1, 2), 7.0))
    assert strategy.log_fields(run, [], steps=2) == {
        "bytes_pulled_per_step": 40.0, "bytes_pushed_per_step": 20.0, "staleness_mean": 1.5, "staleness_max": 2,
        "stale_refused": 1}


def test_a_drain_notice_says_how_long_the_node_has_left_not_the_clock_time_of_its_deadline():
    from rayscale.engine.components.preemption import PreemptionNotice

    notice = PreemptionNotice(("0123456789abcdef",), (1,), deadline_ms=1_000_020_000)
    assert notice.describe(now_s=1_000_000) == "node(s) 0123456789ab (ranks [1]) being drained, going in 20 s"
    assert notice.describe(now_s=1_000_030).endswith("going in 0 s")  # the deadline has passed
    assert PreemptionNotice(("n",), (0,), None).describe(now_s=0) == "node(s) n (ranks [0]) being drained"
