"""The weight average (train.ema_half_life_samples): its arithmetic, its horizon in samples, its checkpoint."""

from types import SimpleNamespace

import pytest
import torch

from rayscale.engine import checkpoint
from rayscale.engine.components.weight_average import Averaging, WeightAverage, exported_weights
from rayscale.engine.state import TrainState


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def _set_weights(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_updates_follow_the_exponential_average_with_the_step_size_in_samples():
    model = _model()
    average = WeightAverage(model, half_life_samples=100)
    expected = [p.detach().double().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(1)
    for samples in (64, 64, 64, 17):  # a short last step moves the average less
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        average.update(model, samples)
        keep = 0.5 ** (samples / 100)
        expected = [keep * e + (1 - keep) * p.detach().double()
                    for e, p in zip(expected, model.parameters(), strict=True)]
    for got, want in zip(average.module.parameters(), expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(got, now)
               for got, now in zip(average.module.parameters(), model.parameters(), strict=True))


def test_a_step_flagged_on_the_device_folds_in_exactly_as_a_host_one_and_a_skipped_one_not_at_all():
    """With fused optimizers the step's "skipped" stays on the device (step.skips_on_device)."""
    model = _model()
    on_host, on_device = WeightAverage(model, half_life_samples=100), WeightAverage(model, half_life_samples=100)
    _set_weights(model, 1.0)
    on_host.update(model, 64)
    on_device.update(model, 64, skipped=torch.tensor(False))
    for a, b in zip(on_host.module.parameters(), on_device.module.parameters(), strict=True):
        assert torch.equal(a, b)
    before = [p.clone() for p in on_device.module.parameters()]
    _set_weights(model, 5.0)
    on_device.update(model, 64, skipped=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, on_device.module.parameters(), strict=True))


def test_half_life_is_in_samples_whatever_the_batch_size():
    """From weights 0 to weights held at 1: after half_life samples the average is 0.5, taken in one step of
    128 samples, two of 64 or sixteen of 8."""
    for step_samples in (128, 64, 8):
        model = _model()
        _set_weights(model, 0.0)
        average = WeightAverage(model, half_life_samples=128)
        _set_weights(model, 1.0)
        for _ in range(128 // step_samples):
            average.update(model, step_samples)
        for p in average.module.parameters():
            torch.testing.assert_close(p, torch.full_like(p, 0.5))


def test_buffers_are_copied_and_the_average_never_trains():
    model = _model()
    average = WeightAverage(model, half_life_samples=50)
    model.train()
    model(torch.randn(8, 4))  # BatchNorm updates its running statistics and counter
    average.update(model, 8)
    for mine, theirs in zip(average.module.buffers(), model.buffers(), strict=True):
        assert torch.equal(mine, theirs)
    assert int(average.module[1].num_batches_tracked) == 1
    assert not any(p.requires_grad for p in average.module.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the copy, not the model, was frozen


def test_half_life_must_be_positive():
    with pytest.raises(ValueError, match="half_life_samples"):
        WeightAverage(_model(), half_life_samples=0)


def test_checkpoint_carries_the_average_and_restores_it(tmp_path):
    """Through the checkpoint files: the Averaging component's part is saved in the training state, restored
    bit for bit, and is what model.pt exports; a checkpoint without it (the average turned on at resume) starts
    the average from the restored weights."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averaging = Averaging(model, half_life_samples=10)
    _set_weights(model, 3.0)
    averaging.average.update(model, 10)
    state = TrainState(samples_seen=10, parts={Averaging.name: averaging.part(SimpleNamespace(model=model))})
    checkpoint.save_atomic(checkpoint.capture(model, optimizer, None, state), tmp_path / checkpoint.STATE_FILE)
    saved = checkpoint.read_state(tmp_path)

    fresh_model = _model()
    fresh = Averaging(fresh_model, half_life_samples=10)
    checkpoint.restore(saved, fresh_model, torch.optim.SGD(fresh_model.parameters(), lr=0.1), None)
    fresh.restore(SimpleNamespace(model=fresh_model), saved.train_state.parts.get(Averaging.name))
    for a, b in zip(fresh.average.module.state_dict().values(), averaging.average.module.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b)
                   for a, b in zip(fresh.average.module.parameters(), fresh_model.parameters(), strict=True))
    exported = exported_weights(saved)
    assert all(torch.equal(exported[k], v) for k, v in averaging.average.state_dict().items())

    # A checkpoint written with the average off: turning it on at resume starts it from the restored weights.
    checkpoint.save_atomic(checkpoint.capture(model, optimizer, None, TrainState(samples_seen=10)),
                           tmp_path / checkpoint.STATE_FILE)
    without = checkpoint.read_state(tmp_path)
    assert Averaging.name not in without.train_state.parts
    assert all(torch.equal(exported_weights(without)[k], v) for k, v in model.state_dict().items())
    later_model = _model()
    later = Averaging(later_model, half_life_samples=10)
    checkpoint.restore(without, later_model, torch.optim.SGD(later_model.parameters(), lr=0.1), None)
    later.restore(SimpleNamespace(model=later_model), None)
    for a, b in zip(later.average.module.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
