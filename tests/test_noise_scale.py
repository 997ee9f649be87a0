"""The gradient noise scale estimators against an exact per-example computation on a fixed model."""

import pytest
import torch

from rayscale.math.noise_scale import NoiseScale, efficiency, two_batch_estimates


def _per_example_gradients(rows: int = 2048, features: int = 8, classes: int = 4) -> torch.Tensor:
    """(rows, parameters): the gradient of each example's loss for a fixed linear classifier at its init."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=generator)
    teacher = torch.randn(features, classes, generator=generator)
    y = (x @ teacher + 0.5 * torch.randn(rows, classes, generator=generator)).argmax(dim=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(features, classes)

    def loss(params, xi, yi):
        logits = torch.func.functional_call(model, params, (xi[None],))
        return torch.nn.functional.cross_entropy(logits, yi[None])

    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(rows, -1) for g in grads.values()], dim=1).double()


def test_two_batch_estimates_are_exact_for_known_norms():
    """With |g_b|^2 = |G|^2 + tr(S)/b and |G_B|^2 = |G|^2 + tr(S)/B (their expectations) the estimators return
    |G|^2 and tr(S) exactly."""
    true_sq, trace, b, big = 2.0, 30.0, 8, 64
    assert two_batch_estimates(true_sq + trace / b, b, true_sq + trace / big, big) == pytest.approx((true_sq, trace))


@pytest.mark.parametrize("small, big", [(16, 64), (32, 256)])
def test_noise_scale_matches_the_exact_per_example_computation(small, big):
    grads = _per_example_gradients()
    mean = grads.mean(dim=0)
    exact = ((grads - mean) ** 2).sum(dim=1).mean() / (mean ** 2).sum()  # tr(S) / |G|^2, the whole set
    generator = torch.Generator().manual_seed(1)
    estimate = NoiseScale(decay=0.999)
    for _ in range(6):  # 3,000 steps, 500 at a time
        batches = grads[torch.randint(0, len(grads), (500, big), generator=generator)]  # i.i.d., as in the paper
        small_sq = (batches[:, :small].mean(dim=1) ** 2).sum(dim=1).tolist()
        big_sq = (batches.mean(dim=1) ** 2).sum(dim=1).tolist()
        for step_small, step_big in zip(small_sq, big_sq, strict=True):
            estimate.update(*two_batch_estimates(step_small, small, step_big, big))
    assert 5 < exact < 500  # a regime where the batch size matters
    assert estimate.value == pytest.approx(exact.item(), rel=0.10)


def test_noise_scale_is_none_until_the_gradient_shows_through_and_round_trips():
    estimate = NoiseScale()
    assert estimate.value is None
    estimate.update(-1.0, 5.0)  # |G|^2 estimates can be negative when the gradient is all noise
    assert estimate.value is None
    estimate.update(4.0, 5.0)
    assert estimate.value == pytest.approx(estimate.trace / estimate.true_sq)
    copy = NoiseScale()
    copy.load_state_dict(estimate.state_dict())
    assert copy == estimate


def test_efficiency_is_one_at_the_base_batch_and_falls_past_the_noise_scale():
    assert efficiency(100.0, 32, 32) == 1.0
    assert efficiency(100.0, 100, 1) == pytest.approx(101 / 200)
    assert efficiency(100.0, 1000, 32) < efficiency(100.0, 100, 32) < 1.0
    assert efficiency(-5.0, 64, 32) == pytest.approx(32 / 64)  # a negative estimate counts as no noise


def test_small_batch_must_be_smaller():
    with pytest.raises(ValueError, match="small < big"):
        two_batch_estimates(1.0, 64, 1.0, 64)


def test_the_workers_device_estimates_match_and_skip_steps_without_a_small_batch():
    from rayscale.engine.components.noise_scale import step_noise_estimates

    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = step_noise_estimates(t(5.75), t(8.0), t(2.5), t(64.0))
    assert got.tolist() == pytest.approx([*two_batch_estimates(5.75, 8, 2.5, 64), 1.0])
    for small, big in ((0.0, 64.0), (64.0, 64.0)):  # an empty rank; a lone micro-batch is the whole step
        assert step_noise_estimates(t(5.75), t(small), t(2.5), t(big)).tolist() == [0.0, 0.0, 0.0]
