"""The goodput model behind `rayscale suggest` (pure math)."""

import pytest

from rayscale import goodput
from rayscale.batching import plan_batches
from rayscale.noise_scale import efficiency


def model(*, micro=0.010, sync=0.012, update=0.002, data=0.0, other=0.0, batch=128, micro_batch=32, workers=2,
          measured=True) -> goodput.StepModel:
    return goodput.StepModel(batch, micro_batch, workers, micro, comm_s=sync - micro, update_s=update,
                             data_s_per_sample=data, other_s=other, micro_batch_measured=measured)


# ------------------------------------------------------------------------------------------ the model

@pytest.mark.parametrize("batch, expected", [
    pytest.param(512, (32, 8), id="a multiple of workers x micro-batch: more micro-batches"),
    pytest.param(64, (32, 1), id="one micro-batch per worker"),
    pytest.param(32, (16, 1), id="below workers x micro-batch: the micro-batch shrinks to B/N"),
    pytest.param(96, (24, 2), id="48 per worker: the largest divisor of 48 up to 32"),
])
def test_plan_derives_micro_batch_and_accumulation_as_train_would(batch, expected):
    assert model().plan(batch) == expected
    micro, accumulation = expected
    assert plan_batches(batch, micro, 2).accumulation_steps == accumulation  # a plan train accepts


def test_step_time_is_k_minus_one_micro_batches_plus_the_synced_one_plus_the_update():
    step = model(micro=0.010, sync=0.015, update=0.003)
    assert step.step_s(512) == pytest.approx(7 * 0.010 + 0.015 + 0.003)  # k = 512 / (2 x 32) = 8
    assert step.step_s(64) == pytest.approx(0.015 + 0.003)
    # Below N x b only the compute shrinks (16 of 32 samples); the all-reduce wait does not.
    assert step.step_s(32) == pytest.approx(0.010 * 0.5 + 0.005 + 0.003)


def test_data_wait_grows_with_the_batch_and_other_time_is_per_step():
    step = model(micro=0.010, sync=0.010, update=0.0, data=1e-4, other=0.004)
    assert step.step_s(128) == pytest.approx(2 * 0.010 + 128 * 1e-4 + 0.004)
    assert step.step_s(256) == pytest.approx(4 * 0.010 + 256 * 1e-4 + 0.004)


def test_calibration_reproduces_the_measured_throughput_at_the_run_batch():
    fitted = goodput.calibrate(128, 32, 2, samples_per_sec=4000.0, data_wait_fraction=0.1, micro_batch_s=0.008,
                               sync_micro_batch_s=0.012, update_s=0.002)
    assert fitted.samples_per_sec(128) == pytest.approx(4000.0)
    assert fitted.data_s_per_sample == pytest.approx(0.1 * 0.032 / 128)  # a tenth of the 32 ms step
    assert fitted.other_s == pytest.approx(0.032 - 0.0032 - 0.022)
    assert fitted.comm_s == pytest.approx(0.004)


def test_without_a_no_sync_micro_batch_each_micro_batch_costs_a_synced_one():
    fitted = goodput.calibrate(64, 32, 2, samples_per_sec=3000.0, data_wait_fraction=0.0, micro_batch_s=None,
                               sync_micro_batch_s=0.015, update_s=0.002)
    assert not fitted.micro_batch_measured
    assert (fitted.micro_batch_s, fitted.comm_s) == (0.015, 0.0)
    assert fitted.step_s(256) - fitted.step_s(64) == pytest.approx(3 * 0.015)


def test_when_the_sync_and_update_dominate_larger_batches_have_more_throughput():
    step = model(micro=0.001, sync=0.050, update=0.020)
    throughput = [step.samples_per_sec(batch) for batch in (16, 64, 256, 1024, 4096)]
    assert throughput == sorted(throughput) and throughput[-1] > 10 * throughput[1]


def test_with_a_tiny_noise_scale_small_batches_win_and_with_a_large_one_large_batches_win():
    step = model(micro=0.002, sync=0.004, update=0.002)
    batches = goodput.candidate_batches(128, 2)
    assert goodput.best(goodput.predict(step, batches, noise_scale=0.5)).global_batch_size == batches[0]
    assert goodput.best(goodput.predict(step, batches, noise_scale=1e6)).global_batch_size == batches[-1]


def test_best_is_the_goodput_argmax_not_the_throughput_argmax():
    step = model(micro=0.002, sync=0.010, update=0.004)
    rows = goodput.predict(step, goodput.candidate_batches(128, 2), noise_scale=200.0)
    top = goodput.best(rows)
    assert top.goodput == max(row.goodput for row in rows)
    assert top.global_batch_size < max(rows, key=lambda row: row.samples_per_sec).global_batch_size
    for row in rows:
        assert row.efficiency == pytest.approx(efficiency(200.0, row.global_batch_size, 128))
        assert row.goodput == pytest.approx(row.samples_per_sec * row.efficiency)


@pytest.mark.parametrize("batch, workers, max_batch, expected", [
    pytest.param(128, 2, None, [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192], id="1/8 to 64x"),
    pytest.param(128, 2, 512, [16, 32, 64, 128, 256, 512], id="--max-batch caps"),
    pytest.param(96, 3, 192, [12, 24, 48, 96, 192], id="every one a multiple of the workers"),
    pytest.param(6, 2, 12, [6, 12], id="3 is not a multiple of 2 workers, 1.5 not a batch"),
])
def test_candidates(batch, workers, max_batch, expected):
    assert goodput.candidate_batches(batch, workers, max_batch) == expected
