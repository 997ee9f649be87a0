"""The training loop's behaviours, through the in-process context: no Ray, one rank in this process or two gloo
processes where DDP matters (tests/inprocess.py). What needs Ray itself is in test_pipeline.py."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from inprocess import train, whole_split_metrics

from rayscale import config
from rayscale.driver.outputs import print_summary
from rayscale.engine import checkpoint
from rayscale.engine.components import checkpointing
from rayscale.engine.context import HeldForRestart
from rayscale.errors import ConfigError, UserError
from rayscale.math.adaptive_batch import goodput_batch, plan_for
from rayscale.math.schedules import schedule_from_config

BASE = ("train.epochs=2", "batch.global_batch_size=64")
AVERAGED = "train.ema_half_life_samples=200"
CRAMPED = ("model.name=loop_models:cramped", "model.kwargs={limit: 16, hidden_sizes: [32]}")


def crash_once(tmp_path, name, after):
    """A model that raises once, at its `after`-th training forward: a crashed run, for a re-run to resume."""
    return ("model.name=loop_models:crash_once", f"model.kwargs={{after: {after}, marker: {tmp_path / name}.marker}}")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def crash_after_a_checkpoint(monkeypatch):
    """The next run dies (a RuntimeError out of the loop) 128 samples after its first mid-epoch checkpoint."""
    real, saved = checkpointing.CheckpointSchedule.due, []

    def due(self, samples_seen):
        if saved and samples_seen >= saved[0] + 128:
            monkeypatch.setattr(checkpointing.CheckpointSchedule, "due", real)
            raise RuntimeError("injected crash")
        answer = real(self, samples_seen)
        if answer:
            saved.append(samples_seen)
        return answer

    monkeypatch.setattr(checkpointing.CheckpointSchedule, "due", due)


def test_the_loop_trains_and_writes_the_run_directory(tmp_path):
    run = train(tmp_path, "plain", *BASE, "batch.micro_batch_size=16")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.pt", "curves.png"):
        assert (run.run_dir / name).stat().st_size > 0, name
    losses = [r["train_loss"] for r in run.lines if r["train_loss"] is not None]
    assert losses[-1] < losses[0] * 0.7  # it learned
    assert run.summary["samples_seen"] == 2 * run.summary["train_rows"] and run.summary["rows_left_out"] == 0
    for key in ("step", "epoch", "samples_seen", "train_loss", "lr", "grad_norm", "samples_per_sec",
                "data_wait_fraction", "peak_memory_mb", "memory_mb", "gradient_noise_scale", "update_s"):
        assert key in run.lines[0], key
    assert run.lines[-1]["memory_mb"] > 0 and run.lines[-1]["val_accuracy"] > 0.5
    last, directory = run.reports[-1]  # the last epoch end always checkpoints: the outputs are made from it
    assert last["training_done"] and directory is not None


@pytest.mark.parametrize(("overrides", "report_evaluations", "reports"), [
    # every epoch end a checkpoint, reported with its line
    (("run.checkpoint_every_seconds=0",), False, [(1, True), (2, True)]),
    # epochs far shorter than the interval: only the last epoch end checkpoints, and nothing else is reported
    (("run.checkpoint_every_seconds=3600",), False, [(2, True)]),
    # a Tune trial: the epoch end without a checkpoint still reports its validation
    (("run.checkpoint_every_seconds=3600",), True, [(1, False), (2, True)]),
    # run.checkpoint_every_samples goes on mid-epoch (1,024, then the step past 2,048), whatever the seconds say
    (("run.checkpoint_every_seconds=3600", "run.checkpoint_every_samples=1024"), False,
     [(1024, True), (2090, True), (2, True)]),
])
def test_an_epoch_end_checkpoints_when_due_and_reports_when_wanted(tmp_path, overrides, report_evaluations, reports):
    run = train(tmp_path, "policy", *BASE, "batch.micro_batch_size=64", "train.report_every_seconds=3600",
                *overrides, report_evaluations=report_evaluations)
    assert [(metrics["epoch"] if metrics.get("epoch_end") or "training_done" in metrics else metrics["samples_seen"],
             directory is not None) for metrics, directory in run.reports] == reports
    for metrics, _ in run.reports:
        if metrics.get("epoch_end"):
            assert metrics["evaluation"] and "val_loss" in metrics


def test_a_crash_after_epoch_ends_without_checkpoints_resumes_from_the_last_one_bitwise(tmp_path):
    """Three epochs, checkpoints only where run.checkpoint_every_samples says (1,024 and 2,090, inside epochs 1 and
    2; epoch 2's end makes none), a crash in epoch 3: the run resumes from 2,090, replays epoch 2's end and what
    followed, and ends on the uninterrupted model, bit for bit."""
    def crashing(name, crash_after):
        return train(tmp_path, name, "train.epochs=3", "batch.global_batch_size=64", "batch.micro_batch_size=64",
                     "run.checkpoint_every_samples=1024", "run.checkpoint_every_seconds=3600",
                     *crash_once(tmp_path, name, crash_after))

    whole = crashing("whole", 10**9)
    with pytest.raises(RuntimeError, match="injected crash"):
        crashing("crashed", 2 * 23 + 2)  # 23 steps an epoch: step 2 of epoch 3
    resumed = crashing("crashed", 2 * 23 + 2)
    saved = checkpoint.read_state(checkpoint.latest_local(resumed.run_dir / "checkpoints")).train_state
    assert saved.resumes == 1 and resumed.summary["restarts"] == 1
    assert same(whole.model, resumed.model)
    samples = [r["samples_seen"] for r in resumed.lines]
    assert samples == sorted(samples) and len(samples) == len(whole.lines)  # lines after the checkpoint replaced


def test_a_run_that_failed_before_its_first_checkpoint_starts_over_with_a_corrected_config(tmp_path):
    """Nothing to resume, so nothing to mix: the fixed config trains under the same run.name (it was refused as
    another run's config) and counts no restart. Once a checkpoint exists, another config is refused again."""
    with pytest.raises(RuntimeError, match="injected crash"):
        train(tmp_path, "fixed", *BASE, *crash_once(tmp_path, "fixed", 2))
    assert not (tmp_path / "fixed" / "checkpoints").exists() or not any((tmp_path / "fixed" / "checkpoints").iterdir())
    fixed = train(tmp_path, "fixed", *BASE)
    assert fixed.summary["restarts"] == 0 and fixed.summary["samples_seen"] == 2 * fixed.summary["train_rows"]
    assert [line["epoch"] for line in fixed.lines if line.get("epoch_end")] == [0, 1]
    with pytest.raises(UserError, match="holds a run with a different .optim. config"):
        train(tmp_path, "fixed", *BASE, "optim.lr=0.3")


def test_a_checkpoint_due_at_an_epochs_last_step_is_made_by_the_epoch_end(tmp_path):
    """run.checkpoint_every_samples falls on epoch 1's last step. Made there, before the epoch end, the checkpoint
    held the epoch unfinished: a restart replayed its end without the epoch's lines, so batch.adaptive goodput
    (which decides there, from them) went on at another batch than the run had chosen; and the epoch end's own
    checkpoint tied with it on samples seen. Now it is one checkpoint, after the end."""
    trained = train(tmp_path, "at_end", "train.epochs=2", "batch.global_batch_size=64", "batch.adaptive=goodput",
                    "batch.micro_batch_size=16", "run.checkpoint_every_samples=1450", "run.checkpoint_every_seconds=3600")
    saved = [checkpoint.read_state(path).train_state for path in (trained.run_dir / "checkpoints").iterdir()]
    at_the_end = [state for state in saved if state.samples_seen == 1450]
    assert [(state.epoch, state.step_in_epoch) for state in at_the_end] == [(1, 0)]
    assert [line["samples_seen"] for line in trained.lines if line.get("epoch_end")] == [1450, 2900]


def test_weight_average_is_validated_and_exported_and_leaves_training_alone(tmp_path):
    plain = train(tmp_path, "plain", *BASE)
    averaged = train(tmp_path, "averaged", *BASE, AVERAGED)
    state = checkpoint.read_state(checkpoint.latest_local(averaged.run_dir / "checkpoints"))
    assert same(plain.model, state.model)  # training never reads the average
    assert same(averaged.model, state.train_state.parts["weight_average"]["weights"])
    assert not same(averaged.model, plain.model)
    assert averaged.summary["final"]["val_loss"] != plain.summary["final"]["val_loss"]  # the average validated
    assert averaged.summary["final"]["val_accuracy"] > 0.8


def test_auto_micro_batch_halves_on_out_of_memory_and_trains_the_same_model(tmp_path, capsys):
    """A model that runs out of memory above 16 rows: 64 and 32 fail, the run settles on 16 and ends with the
    model a fixed micro-batch of 16 gives, bit for bit. At 0 rows nothing fits: a one-line error."""
    auto = train(tmp_path, "auto", *BASE, "batch.micro_batch_size=auto", *CRAMPED)
    fixed = train(tmp_path, "fixed", *BASE, "batch.micro_batch_size=16", *CRAMPED)
    assert same(auto.model, fixed.model)
    assert (auto.summary["batch_plan"]["micro_batch_size"], auto.summary["batch_plan"]["accumulation_steps"]) == (16, 4)
    logged = [r for r in auto.lines if not r.get("evaluation")]
    assert logged and all(r["micro_batch_size"] == 16 for r in logged)
    assert "every worker redoes it at micro-batch 32" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="batch.micro_batch_size auto: out of device memory even at micro-batch 1"):
        train(tmp_path, "none_fits", "train.epochs=1", "batch.micro_batch_size=auto", "model.name=loop_models:cramped",
              "model.kwargs={limit: 0}")


def test_a_crashed_run_resumes_mid_epoch_at_the_micro_batch_it_found(tmp_path, capsys, crash_after_a_checkpoint):
    """Killed mid-epoch after a checkpoint and started again: it resumes from that checkpoint at micro-batch 16
    (without running out of memory again), and ends with the uninterrupted run's model, bit for bit."""
    overrides = (*BASE, "batch.micro_batch_size=auto", *CRAMPED, "run.checkpoint_every_samples=320")
    with pytest.raises(RuntimeError, match="injected crash"):
        train(tmp_path, "crashed", *overrides)
    capsys.readouterr()
    resumed = train(tmp_path, "crashed", *overrides)
    assert "out of device memory" not in capsys.readouterr().out
    whole = train(tmp_path, "whole", *overrides)
    assert resumed.summary["restarts"] == 1 and resumed.summary["batch_plan"]["micro_batch_size"] == 16
    assert same(whole.model, resumed.model)
    samples = [r["samples_seen"] for r in resumed.lines]
    assert samples == sorted(samples) and len(samples) == len(whole.lines)  # lines after the checkpoint replaced


def test_adaptive_batch_grows_at_epoch_ends_and_a_crashed_run_resumes_at_the_grown_batch(tmp_path):
    """batch.adaptive step: 32 for two epochs, then 64, then 128, the lr following the linear rule. A run that
    crashes in epoch 4 (global batch 64) and is started again resumes from its last checkpoint at 64, and ends with
    the uninterrupted run's model, bit for bit. Goodput: the second epoch's batch is what the decision makes of the
    first epoch's lines."""
    def adaptive(name, crash_after):
        return train(tmp_path, name, "train.epochs=5", "batch.global_batch_size=32", "batch.micro_batch_size=16",
                     "batch.adaptive=step", "batch.growth_every_samples=2800", "optim.scaling_rule=linear",
                     "run.checkpoint_every_seconds=0", *crash_once(tmp_path, name, crash_after))

    whole = adaptive("whole", 10**9)
    rows = whole.summary["train_rows"]
    assert 1400 < rows < 1500  # so the milestones at 2,800 and 5,600 samples fall in epochs 2 and 4
    batches = {r["epoch"]: r["global_batch_size"] for r in whole.lines}
    assert batches == {0: 32, 1: 32, 2: 64, 3: 64, 4: 128}
    multiplier = schedule_from_config(config.load().schedule, total_samples=5 * rows)
    for line in (line for line in whole.lines if multiplier(line["samples_seen"]) > 1e-3):  # cosine ends at 0
        assert line["lr"] / multiplier(line["samples_seen"]) == pytest.approx(0.1 * line["global_batch_size"] / 32,
                                                                              rel=1e-9), line
    plan = whole.summary["batch_plan"]
    assert (plan["global_batch_size"], plan["accumulation_steps"]) == (128, 8)
    assert whole.summary["samples_seen"] == 5 * rows  # every row, every epoch, whatever the batch

    crash_at = 2 * (-(-rows // 32)) * 2 + (-(-rows // 64)) * 4 + 20  # forwards: inside epoch 4
    with pytest.raises(RuntimeError, match="injected crash"):
        adaptive("crashed", crash_at)
    resumed = adaptive("crashed", crash_at)
    assert resumed.summary["restarts"] == 1  # resumed, not retrained from scratch (which gives the same model)
    assert same(whole.model, resumed.model)
    assert {r["epoch"]: r["global_batch_size"] for r in resumed.lines} == batches

    goodput = train(tmp_path, "goodput", "train.epochs=2", "batch.global_batch_size=32", "batch.micro_batch_size=16",
                    "batch.adaptive=goodput", "train.log_every_samples=256")
    first = [r for r in goodput.lines if r["epoch"] == 0]
    chosen = goodput_batch(first, plan_for(32, 16, 1), 32, 1024)
    assert chosen is not None and [r["global_batch_size"] for r in goodput.lines if r["epoch"] == 1][0] == chosen


def test_a_resume_from_a_rung_pause_is_no_restart_and_a_crash_after_it_is_one(tmp_path, capsys):
    """Paused at 320 samples (ASHA by promotion's rung) and started again: `rung_resumes` 1, `restarts` 0. Resumed
    from the pause, crashed before the next checkpoint and started again: the pause checkpoint is restored a second
    time, still one rung resume, now one restart, and the uninterrupted model."""
    def paused(name, crash_after):
        return train(tmp_path, name, "train.epochs=2", "batch.global_batch_size=32", "batch.micro_batch_size=16",
                     *crash_once(tmp_path, name, crash_after), eval_at_samples=[320], pause_at_samples=[320]).summary

    expected = train(tmp_path, "whole", "train.epochs=2", "batch.global_batch_size=32", "batch.micro_batch_size=16",
                     *crash_once(tmp_path, "whole", 10**9)).model
    at_rung = paused("clean", 10**9)
    assert (at_rung["samples_seen"], at_rung["epochs"], at_rung["rung_resumes"], at_rung["restarts"]) == (320, 0, 0, 0)
    resumed = paused("clean", 10**9)
    assert (resumed["samples_seen"], resumed["rung_resumes"], resumed["restarts"]) == (2 * resumed["train_rows"], 1, 0)
    capsys.readouterr()
    print_summary(resumed)  # what `rayscale train` prints at the end
    printed = capsys.readouterr().out
    assert re.search(r"restarts +0\n +rung resumes +1\n", printed), printed[-2000:]

    # 2 forwards a step: 10 steps to the rung (20 forwards) trains on; 30 steps past it, inside epoch 1, crash.
    assert paused("crashed", 60)["samples_seen"] == 320
    with pytest.raises(RuntimeError, match="injected crash"):
        paused("crashed", 60)
    summary = paused("crashed", 60)
    assert (summary["rung_resumes"], summary["restarts"]) == (1, 1)
    assert same(expected, torch.load(tmp_path / "crashed" / "model.pt"))


def test_a_log_line_due_at_the_epoch_end_is_the_epoch_end_line(tmp_path):
    """train.log_every_samples dividing the epoch: the line due at its last step is the epoch-end line itself, so
    it carries the interval's loss and rate, and no two lines stand at the same sample count."""
    run = train(tmp_path, "aligned", *BASE, "data.source=synthetic", "data.synthetic.rows=512", "data.val_fraction=0",
                "train.log_every_samples=256")
    assert [(r["samples_seen"], bool(r.get("epoch_end"))) for r in run.lines] == [
        (256, False), (512, True), (768, False), (1024, True)]
    assert all(r["train_loss"] is not None and r["samples_per_sec"] > 0 and r["grad_norm"] > 0 for r in run.lines)
    assert run.summary["final"]["train_loss"] == run.lines[-1]["train_loss"]


def test_nonfinite_steps_are_skipped_counted_and_abort_the_run_when_too_many_in_a_row(tmp_path):
    """The default SGD is fused: the loop never reads the skipped flag per step, yet the count, the average, the
    logged norm and the abort (naming the step that reached train.max_nonfinite_steps) hold."""
    common = ["train.epochs=1", "batch.global_batch_size=64", "batch.micro_batch_size=64",
              "train.log_every_samples=256", "model.name=loop_models:nan_at", AVERAGED]
    run = train(tmp_path, "two_bad", *common, "model.kwargs={at: [2, 4]}")
    assert run.summary["nonfinite_skipped"] == 2
    assert all(torch.isfinite(tensor).all() for tensor in run.model.values())
    logged = [r for r in run.lines if not r.get("evaluation")]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in logged)
    # The loss averages the steps taken, as the norm does: one skipped step made its interval's loss NaN.
    assert all(math.isfinite(r["train_loss"]) for r in logged) and math.isfinite(run.summary["final"]["train_loss"])
    assert logged[-1]["nonfinite_skipped"] == 2
    with pytest.raises(Exception, match="at step 5: 3 steps in a row were skipped"):
        train(tmp_path, "from_third", *common, "model.kwargs={at: [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]}",
              "train.max_nonfinite_steps=3")


def test_one_rank_accumulating_8_micro_batches_trains_the_model_of_one_batch_of_64(tmp_path):
    full = train(tmp_path, "micro64", *BASE, "batch.micro_batch_size=64")
    accumulated = train(tmp_path, "micro8", *BASE, "batch.micro_batch_size=8")
    for key in full.model:
        assert torch.allclose(full.model[key], accumulated.model[key], rtol=1e-4, atol=1e-5), key


def test_a_run_shorter_than_its_warmup_learns_and_says_its_lr_stays_below_the_peak(tmp_path, capsys):
    """One epoch of 865 rows under the default cosine schedule and its 1024 samples of warmup: every step once
    had lr 0 (the empty decay span read as fully decayed) and the run learnt nothing, silently."""
    trained = train(tmp_path, "short", "train.epochs=1", "data.val_fraction=0.5", "optim.lr=0.5")
    assert "warmup 1,024 samples is not shorter than the run's 865" in capsys.readouterr().out
    logged = [line for line in trained.lines if "lr" in line]
    assert logged and all(0 < line["lr"] < 0.5 for line in logged)
    assert trained.summary["final"]["val_accuracy"] > 0.5


def test_a_finished_run_started_again_trains_nothing(tmp_path):
    first = train(tmp_path, "done", "train.epochs=1")
    again = train(tmp_path, "done", "train.epochs=1")
    assert same(first.model, again.model) and again.summary["steps"] == first.summary["steps"]
    assert again.reports == [({"samples_seen": first.summary["samples_seen"], "epoch": 1, "training_done": True},
                              None)]


# --------------------------------------------------------------------------------- two ranks (gloo, DDP)

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two ranks, micro-batch 8 of a global 64 (4 accumulation steps each), checkpoints mid-epoch."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    return train(tmp, "micro8", *BASE, "batch.micro_batch_size=8", "run.checkpoint_every_samples=320", AVERAGED,
                 workers=2)


def test_two_ranks_learn_count_every_row_and_measure_the_noise_scale(two_ranks):
    summary = two_ranks.summary
    assert summary["world_size"] == 2 and summary["batch_plan"]["accumulation_steps"] == 4
    assert summary["samples_seen"] == 2 * summary["train_rows"]  # the partial last step is trained too
    assert summary["final"]["val_accuracy"] > 0.8
    logged = [r for r in two_ranks.lines if not r.get("evaluation")]
    assert logged and all(r["gradient_noise_scale"] > 0 for r in logged)  # a rank's share is the small batch
    assert all(r["critical_batch_size"] == round(r["gradient_noise_scale"]) for r in logged)
    assert all(0 < r["batch_efficiency"] < 1 for r in logged)  # base batch: the micro-batch, 8 < 64


def test_two_ranks_validating_mid_epoch_and_streaming_every_epoch_train_the_same_model(two_ranks, tmp_path):
    """The same config and seed, validating mid-epoch too and reading every epoch from the feed (the reference
    replays epochs 2+ from each rank's cache): the same model, bit for bit, and the validations are logged."""
    evaluated = train(tmp_path, "evaluated", *BASE, "batch.micro_batch_size=8", "run.checkpoint_every_samples=320",
                      "train.eval_every_samples=400", "data.cache_mb=0", AVERAGED, workers=2)
    assert same(two_ranks.model, evaluated.model)  # validation touches no training state; the cache replays
    rows = two_ranks.summary["train_rows"]
    step_ends = [epoch * rows + min(k * 64, rows) for epoch in (0, 1) for k in range(1, -(-rows // 64) + 1)]
    crossings = [next(end for end in step_ends if end >= point) for point in range(400, 2 * rows, 400)]
    mid = [r for r in evaluated.lines if r.get("evaluation") and not r.get("epoch_end")]
    assert [r["samples_seen"] for r in mid] == [end for end in crossings if end % rows]
    assert all(0 < r["val_loss"] < 10 and 0 <= r["val_accuracy"] <= 1 for r in mid)


def test_two_ranks_agree_to_halve_the_micro_batch_and_train_the_same_maths(two_ranks, tmp_path):
    """Micro-batch 16 found by batch.micro_batch_size auto (both ranks redo the first step at 16 together: the DDP
    path of an OOM-safe step) instead of the reference's 8: the same maths, other sums."""
    found = train(tmp_path, "micro16", *BASE, "batch.micro_batch_size=auto", "model.name=loop_models:cramped",
                  "model.kwargs={limit: 16}", AVERAGED, workers=2)
    assert (found.summary["batch_plan"]["micro_batch_size"], found.summary["batch_plan"]["accumulation_steps"]) == (16, 2)
    for key in two_ranks.model:
        assert torch.allclose(two_ranks.model[key], found.model[key], rtol=1e-4, atol=1e-5), key
    assert not same(two_ranks.model, found.model)


def test_a_batch_norm_model_halving_on_one_rank_only_goes_on_instead_of_hanging(tmp_path):
    """Rank 1 runs out of memory in a forward rank 0 completes: DDP's decision to broadcast the buffers before
    the next forward then differed between the ranks, and the redone step waited in two different collectives
    until the timeout (120 s here)."""
    found = train(tmp_path, "one_rank", *BASE, "batch.micro_batch_size=auto", "model.name=loop_models:cramped_on_one_rank",
                  "model.kwargs={limit: 16}", workers=2)
    assert found.summary["batch_plan"]["micro_batch_size"] == 16
    assert found.summary["samples_seen"] == 2 * found.summary["train_rows"]


def close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5) for key in a)


def test_at_fixed_lanes_other_worker_counts_train_the_same_steps_to_the_model_within_fp32_reduction_order(
        two_ranks, tmp_path):
    """The two-rank reference laid its rows out in 2 lanes (one per rank). One rank with data.lanes 2 trains the
    same rows in every step (tests/test_lane_steps.py checks the rows), but sums them in another grouping (its 8
    micro-batches, not two ranks' 4 then the all-reduce): the model is equal within fp32 reduction order, not
    bit for bit. So is a run paused at 2 workers and resumed at 1: it keeps its checkpoint's 2 lanes."""
    options = (*BASE, "batch.micro_batch_size=8", "run.checkpoint_every_samples=320", AVERAGED)
    one = train(tmp_path, "one_rank", *options, "data.lanes=2")
    assert close(one.model, two_ranks.model) and not same(one.model, two_ranks.model)
    paused = train(tmp_path, "resized", *options, workers=2, eval_at_samples=[320], pause_at_samples=[320])
    assert paused.summary["samples_seen"] == 320
    resized = train(tmp_path, "resized", *options, eval_at_samples=[320], pause_at_samples=[320])
    assert resized.summary["samples_seen"] == 2 * resized.summary["train_rows"]
    assert close(resized.model, two_ranks.model) and not same(resized.model, two_ranks.model)


def test_a_run_paused_at_2_workers_resumes_at_4_when_its_lanes_let_4_share_them(tmp_path):
    """data.lanes 4 (a multiple of both counts): stopped at 2 workers and started again with 4, the run trains
    the same rows in every step and ends with the fixed-size run's model within fp32 reduction order (the
    fixed-size reference here is one rank over the same 4 lanes)."""
    options = (*BASE, "batch.micro_batch_size=8", "data.lanes=4")
    fixed = train(tmp_path, "fixed", *options)
    paused = train(tmp_path, "resized", *options, workers=2, eval_at_samples=[320], pause_at_samples=[320])
    assert paused.summary["samples_seen"] == 320
    resized = train(tmp_path, "resized", *options, workers=4)
    assert resized.summary["samples_seen"] == 2 * resized.summary["train_rows"]
    assert close(resized.model, fixed.model)


def test_a_worker_count_that_cannot_share_the_checkpoints_lanes_is_refused_naming_the_key(tmp_path):
    """data.lanes null: the first run's 3 workers made 3 lanes, which its checkpoints keep."""
    options = ("train.epochs=2", "batch.global_batch_size=66", "batch.micro_batch_size=null")
    train(tmp_path, "three_lanes", *options, workers=3, eval_at_samples=[330], pause_at_samples=[330])
    # Each rank raises it (in its spawned process here; under Ray, `rayscale train` prints it as one line).
    with pytest.raises(torch.multiprocessing.ProcessRaisedException,
                       match=r"UserError: data.lanes: this run's training rows are laid out in 3 lanes \(its "
                             r"checkpoint says so\), which 2 workers cannot share evenly"):
        train(tmp_path, "three_lanes", *options, workers=2)


def test_the_log_is_written_by_rank_0_once_and_travels_with_every_checkpoint(two_ranks):
    lines = (two_ranks.run_dir / "metrics.jsonl").read_text().splitlines()
    samples = [json.loads(line)["samples_seen"] for line in lines]
    assert samples == sorted(samples) and len(samples) == len(set(zip(samples, lines, strict=True)))
    final = checkpoint.latest_local(two_ranks.run_dir / "checkpoints")
    assert (final / "metrics.jsonl").read_text().splitlines() == lines
    assert sorted(p.name for p in final.iterdir()) == ["manifest_rank0.json", "manifest_rank1.json", "metrics.jsonl",
                                                      "rng_rank0.pt", "rng_rank1.pt", "state.pt"]


def test_two_ranks_validate_each_row_once_and_reduce_to_one_processs_metrics(two_ranks):
    """Each rank evaluates only its shard of the validation split: the reduced accuracy is exactly that of
    evaluating the final model on the whole split in one process (a row missed or counted twice would move it by
    1 / rows), and the loss equal within fp32 rounding (other sums, other batches)."""
    from rayscale.data.splits import shard_reads, split_chunk_rows
    from rayscale.driver.prepare import prepare

    prepared = prepare(config.load(two_ranks.run_dir / "config.yaml"))
    shards = shard_reads(split_chunk_rows(prepared.val), 2)
    assert sum(read.take for shard in shards for read in shard) == prepared.val_rows
    assert abs(sum(read.take for read in shards[0]) - sum(read.take for read in shards[1])) <= 1
    whole = whole_split_metrics(two_ranks.run_dir, two_ranks.model)  # model.pt: the average, which was validated
    final = two_ranks.summary["final"]
    assert final["val_accuracy"] == whole["val_accuracy"]
    assert final["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)


def test_a_rank_without_validation_rows_validates_a_model_with_buffers_and_the_run_goes_on(tmp_path):
    """One validation row for two ranks: rank 1's shard is empty. With BatchNorm buffers, DDP's forward would
    broadcast them, a collective rank 1 never makes (the run hung): validation evaluates the bare module with rank
    0's buffers, so the run ends and its metrics are the whole split's."""
    from rayscale.data.splits import shard_reads, split_chunk_rows
    from rayscale.driver.prepare import prepare
    from rayscale.models import build_model

    overrides = ("data.source=synthetic", "data.synthetic.kind=image", "data.synthetic.rows=40",
                 "data.val_fraction=0.02", "model.name=cnn", "batch.global_batch_size=8", "batch.micro_batch_size=4",
                 "train.epochs=1", "train.noise_scale_every_steps=100")
    run = train(tmp_path, "one_val_row", *overrides, workers=2)
    prepared = prepare(config.load(run.run_dir / "config.yaml"))
    assert prepared.val_rows == 1 and [len(shard) for shard in shard_reads(split_chunk_rows(prepared.val), 2)] == [1, 0]
    assert any(True for _ in build_model(prepared.cfg.model, prepared.spec).buffers())  # BatchNorm statistics
    whole = whole_split_metrics(run.run_dir, run.model)
    assert run.summary["final"]["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)


def test_a_drain_notice_checkpoints_at_the_step_it_is_asked_and_the_restart_trains_no_step_twice(tmp_path):
    """The ranks ask every run.preemption_check_steps steps; the third answer announces a drain: the loop
    checkpoints at that step (9) and holds (here: HeldForRestart). The restarted run resumes there and ends with
    the uninterrupted run's model bit for bit: nothing after the notice was kept, nothing before it redone."""
    options = (*BASE, "batch.micro_batch_size=16", "run.preemption_check_steps=3")
    uninterrupted = train(tmp_path, "uninterrupted", *options)
    with pytest.raises(HeldForRestart, match=r"node\(s\) node-b \(ranks \[1\]\) being drained"):
        train(tmp_path, "drained", *options, drain_on_ask=3)
    saved = checkpoint.read_state(checkpoint.latest_local(tmp_path / "drained" / "checkpoints")).train_state
    assert (saved.step, saved.samples_seen) == (9, 9 * 64)
    assert saved.parts["preemption"] == {"checkpoints": 1, "last_step": 9}
    resumed = train(tmp_path, "drained", *options)
    assert same(resumed.model, uninterrupted.model)
    assert resumed.summary["preemption_checkpoints"] == 1 and resumed.summary["samples_seen"] == \
        uninterrupted.summary["samples_seen"]
    steps = [line["step"] for line in resumed.lines]
    assert steps == sorted(set(steps))  # no logged step twice: the resumed run went on from step 9
    assert {line["world_size"] for line in resumed.lines} == {1}


def test_every_key_a_line_carries_is_one_tune_metric_may_name(tmp_path):
    """rayscale tune checks tune.metric against engine.loop.line_keys() before the search: a key a line carries
    that it does not list would be refused although trials report it."""
    from rayscale.engine.loop import line_keys

    goodput = train(tmp_path, "goodput", *BASE, "batch.adaptive=goodput", "batch.micro_batch_size=16",
                    "train.log_every_samples=256")
    auto = train(tmp_path, "auto", *BASE, "batch.micro_batch_size=auto", "train.log_every_samples=256")
    carried = {key for line in [*goodput.lines, *auto.lines] for key in line} - {"evaluation", "epoch_end"}
    assert {"global_batch_size", "micro_batch_size", "gradient_noise_scale", "checkpoint_s", "update_s"} <= carried
    assert {key for key in carried if not key.startswith("val_")} <= set(line_keys())
