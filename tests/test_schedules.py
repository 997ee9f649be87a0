"""LR scaling rules and schedules: pure functions checked against tables of expected values."""

import math

import pytest

from rayscale.math.schedules import lr_multiplier, scaled_lr

COMMON = dict(warmup_samples=0, step_samples=None, gamma=0.1, power=2.0, final_lr_ratio=0.0)


@pytest.mark.parametrize("rule, global_bs, base, expected", [
    pytest.param("none", 1024, 256, 0.1, id="none-keeps-lr"),
    pytest.param("linear", 1024, 256, 0.4, id="linear-4x-batch-4x-lr"),  # Goyal et al.
    pytest.param("sqrt", 1024, 256, 0.2, id="sqrt-4x-batch-2x-lr"),
    pytest.param("linear", 64, 256, 0.025, id="linear-smaller-batch"),
    pytest.param("linear", 1024, None, 0.1, id="no-base-no-scaling"),
])
def test_scaled_lr(rule, global_bs, base, expected):
    assert scaled_lr(0.1, global_bs, base, rule) == pytest.approx(expected)


@pytest.mark.parametrize("name, samples, overrides, expected", [
    pytest.param("constant", 500, {}, 1.0, id="constant"),
    # step: gamma 0.1 every 300 samples (explicit)
    pytest.param("step", 299, {"step_samples": 300}, 1.0, id="step-before-first-drop"),
    pytest.param("step", 300, {"step_samples": 300}, 0.1, id="step-first-drop"),
    pytest.param("step", 650, {"step_samples": 300}, 0.01, id="step-second-drop"),
    # step with the default step_samples: a third of the 900-sample decay span
    pytest.param("step", 600, {}, 0.01, id="step-default-thirds"),
    # exponential: 0.1 ** (150 / 300)
    pytest.param("exponential", 150, {"step_samples": 300}, math.sqrt(0.1), id="exponential-half-period"),
    # polynomial power 2: (1 - 0.5) ** 2
    pytest.param("polynomial", 450, {}, 0.25, id="square-decay-halfway"),
    pytest.param("polynomial", 900, {}, 0.0, id="square-decay-end"),
    pytest.param("polynomial", 450, {"power": 1.0, "final_lr_ratio": 0.1}, 0.55, id="linear-decay-floor"),
    # cosine: 0.5 * (1 + cos(pi / 2)) at the middle
    pytest.param("cosine", 450, {}, 0.5, id="cosine-middle"),
    pytest.param("cosine", 900, {"final_lr_ratio": 0.2}, 0.2, id="cosine-end-floor"),
    pytest.param("cosine", 0, {}, 1.0, id="cosine-start"),
])
def test_decay_table(name, samples, overrides, expected):
    kw = {**COMMON, **overrides}
    assert lr_multiplier(samples, 900, name=name, **kw) == pytest.approx(expected)


@pytest.mark.parametrize("samples, expected", [
    pytest.param(25, 0.25, id="quarter-warmup"),
    pytest.param(100, 1.0, id="warmup-done"),
    # after warmup the cosine runs over the remaining 800 samples: 500 is halfway
    pytest.param(500, 0.5, id="cosine-after-warmup"),
])
def test_warmup_then_cosine(samples, expected):
    kw = {**COMMON, "warmup_samples": 100}
    assert lr_multiplier(samples, 900, name="cosine", **kw) == pytest.approx(expected)


@pytest.mark.parametrize("name", ["cosine", "polynomial", "step", "exponential", "constant"])
def test_a_run_no_longer_than_its_warmup_still_warms_up(name):
    """865 samples under the default 1024 of warmup: the lr ramps for the whole run instead of decaying to 0
    before the first step (the decay span is empty, which once read as fully decayed)."""
    kw = {**COMMON, "warmup_samples": 1024}
    assert [lr_multiplier(s, 865, name=name, **kw) for s in (64, 512, 865)] == \
        pytest.approx([64 / 1024, 512 / 1024, 865 / 1024])
    assert lr_multiplier(1024, 1024, name=name, **kw) == 1.0  # the run ends as its warmup does


def test_schedule_means_the_same_at_every_batch_size():
    """Measured in samples: batch 64 and batch 512 see the same lr after the same data."""
    kw = {**COMMON, "warmup_samples": 1024}
    small = [lr_multiplier(s, 8192, name="cosine", **kw) for s in range(64, 8193, 64)]
    large = [lr_multiplier(s, 8192, name="cosine", **kw) for s in range(512, 8193, 512)]
    assert large == small[7::8]
