"""batch.adaptive: the pure decisions (adaptive_batch.py) and the checks made before a run."""

import pytest

from rayscale import cli
from rayscale.errors import ConfigError
from rayscale.math.adaptive_batch import goodput_batch, ladder, plan_for, step_batch, upper_limit


def test_step_mode_multiplies_the_batch_at_each_milestone_up_to_the_limit():
    grown = [step_batch(samples, 32, 2.0, 1000, 256, 2) for samples in (0, 999, 1000, 2500, 3000, 10**6)]
    assert grown == [32, 32, 64, 128, 256, 256]
    assert step_batch(2000, 30, 1.5, 1000, 1000, 4) == 64  # 67.5, rounded down to a multiple of 4 workers


def test_the_limit_defaults_to_the_doubling_ladder_within_the_training_rows():
    assert upper_limit(None, 32, 1437, 2, 16) == 1024
    assert upper_limit(None, 32, 10**6, 2, 16) == 2048  # 64x
    assert upper_limit(500, 32, 1437, 2, 16) == 500
    assert ladder(32, 500) == [32, 64, 128, 256, 500]


@pytest.mark.parametrize("limit, message", [
    (16, "batch.max_global_batch_size 16: expected at least batch.global_batch_size 32"),
    (2000, "batch.max_global_batch_size 2000 is more than the 1437 training rows"),
    (501, "batch.max_global_batch_size 501 is not divisible by 2 workers"),
])
def test_a_bad_limit_is_named(limit, message):
    with pytest.raises(ConfigError, match=message):
        upper_limit(limit, 32, 1437, 2, 16)


def test_an_epoch_plan_keeps_the_micro_batch_where_it_divides():
    assert (plan_for(256, 16, 2).micro_batch_size, plan_for(256, 16, 2).accumulation_steps) == (16, 8)
    assert plan_for(500, 16, 2).micro_batch_size == 10  # the largest divisor of 250 up to 16
    assert plan_for(256, "auto", 2).auto


def _lines(noise, *, micro=0.002, sync=0.020, update=0.010, per_sec=3000.0):
    return [{"samples_per_sec": per_sec, "data_wait_fraction": 0.0, "gradient_noise_scale": noise,
             "micro_batch_s": micro, "sync_micro_batch_s": sync, "update_s": update} for _ in range(3)]


def test_goodput_mode_grows_the_batch_when_the_noise_scale_is_large_and_steps_are_sync_bound():
    plan = plan_for(128, 32, 2)
    assert goodput_batch(_lines(5000.0), plan, 128, 1024) > 128
    assert goodput_batch(_lines(0.5), plan, 128, 1024) == 128  # never below the initial batch
    assert goodput_batch([{"evaluation": True, "val_loss": 1.0}], plan, 128, 1024) is None  # nothing measured


@pytest.mark.parametrize("overrides, message", [
    (["batch.adaptive=step"], "batch.growth_every_samples: batch.adaptive step needs it"),
    (["batch.adaptive=goodput", "train.noise_scale=false"], "batch.adaptive goodput needs the noise scale"),
    (["batch.adaptive=goodput", "scaling.num_workers=1", "batch.micro_batch_size=null"],
     "which one worker measures only with 2+ micro-batches"),
    (["batch.adaptive=step", "batch.growth_every_samples=1000", "batch.max_global_batch_size=64"],
     "batch.max_global_batch_size 64: expected at least batch.global_batch_size 128"),
    (["batch.adaptive=bigger"], "batch.adaptive: expected one of none, step, goodput"),
])
def test_bad_adaptive_settings_are_one_line_errors_before_anything_runs(tmp_path, capsys, overrides, message):
    args = ["train", "--set", f"run.output_dir={tmp_path}"]
    for item in overrides:
        args += ["--set", item]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
