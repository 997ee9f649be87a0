"""Optimizers: LARS and LAMB against hand-computed steps, parameter groups, the builder, state round trips.

The hand-computed cases use p = [3, 4] (||p|| = 5) and g = [0.6, 0.8] (||g|| = 1) in float64, so most
expected values can be checked with pencil and paper; the arithmetic is in the comment of each row.
"""

import copy
import math

import pytest
import torch
from torch import nn

from rayscale.config import OptimConfig
from rayscale.engine.optimizers import LAMB, LARS, build_optimizer, param_groups
from rayscale.errors import ConfigError


def run_steps(optimizer_cls, p0, grads, **hyper):
    """Apply one optimizer step per gradient in `grads` to a float64 parameter starting at `p0`."""
    p = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    optimizer = optimizer_cls([p], **hyper)
    for grad in grads:
        p.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
    return p.detach()


G = [0.6, 0.8]  # ||G|| = 1
LARS_HYPER = {"lr": 0.1, "trust_coefficient": 0.01, "momentum": 0.9}


@pytest.mark.parametrize("grads, weight_decay, adapt, p0, expected", [
    # trust = 0.01 * 5 / 1 = 0.05; update = 0.1 * 0.05 * [0.6, 0.8] = [0.003, 0.004]
    pytest.param([G], 0.0, True, [3.0, 4.0], [2.997, 3.996], id="one-step"),
    # step 2: ||p|| = 4.995 (p still parallel to g), trust = 0.04995, update = [0.002997, 0.003996];
    # buf = 0.9 * [0.003, 0.004] + update = [0.005697, 0.007596]; p = [2.997, 3.996] - buf
    pytest.param([G, G], 0.0, True, [3.0, 4.0], [2.991303, 3.988404], id="two-steps"),
    # g = [0.8, 0.6] so that g' = g + 0.1 * p = [1.1, 1.0] is not parallel to g;
    # trust = 0.01 * 5 / (1 + 0.1 * 5) = 1/30; update = 0.1 / 30 * [1.1, 1.0] = [0.011/3, 0.01/3]
    pytest.param([[0.8, 0.6]], 0.1, True, [3.0, 4.0], [3 - 0.011 / 3, 4 - 0.01 / 3], id="one-step-decay"),
    # step 2: p = [2.99633.., 3.99666..], ||p|| = 4.99513342, g' = [1.09963333, 0.99966667],
    # trust = 0.0499513342 / 1.49951334 = 0.0333116971, update = [0.00366306525, 0.00333005932];
    # buf = 0.9 * [0.00366667, 0.00333333] + update = [0.00696306525, 0.00633005932]
    pytest.param([[0.8, 0.6], [0.8, 0.6]], 0.1, True, [3.0, 4.0], [2.98937026808, 3.99033660735],
                 id="two-steps-decay"),
    # no trust ratio: update = 0.1 * ([0.6, 0.8] + 0.1 * [3, 4]) = [0.09, 0.12]
    pytest.param([G], 0.1, False, [3.0, 4.0], [2.91, 3.88], id="no-adapt-one-step"),
    # step 2: update = 0.1 * ([0.6, 0.8] + 0.1 * [2.91, 3.88]) = [0.0891, 0.1188];
    # buf = 0.9 * [0.09, 0.12] + update = [0.1701, 0.2268]
    pytest.param([G, G], 0.1, False, [3.0, 4.0], [2.7399, 3.6532], id="no-adapt-two-steps"),
    # ||g|| = 0: trust = 1 instead of 0/0, and the update is zero
    pytest.param([[0.0, 0.0]], 0.0, True, [3.0, 4.0], [3.0, 4.0], id="zero-grad"),
    # ||g|| = 0 with decay: trust = 1, update = 0.1 * 0.1 * [3, 4] = [0.03, 0.04]
    pytest.param([[0.0, 0.0]], 0.1, True, [3.0, 4.0], [2.97, 3.96], id="zero-grad-decay"),
    # ||p|| = 0: trust = 1, update = 0.1 * [0.6, 0.8]
    pytest.param([G], 0.1, True, [0.0, 0.0], [-0.06, -0.08], id="zero-weight"),
])
def test_lars_matches_hand_computed_steps(grads, weight_decay, adapt, p0, expected):
    p = run_steps(LARS, p0, grads, weight_decay=weight_decay, adapt=adapt, **LARS_HYPER)
    assert p.dtype == torch.float64
    assert p.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


# Step 2 uses 2 * G so the bias corrections of m and v differ: m_hat = (0.9*0.1 + 0.1*2) / (1 - 0.81) * G
# = 0.29 / 0.19 * G = 1.5263158 * G; v_hat = (0.999*0.001 + 0.001*4) / (1 - 0.999^2) * G^2 = 2.5007504 * G^2;
# so r = 1.5263158 / sqrt(2.5007504) = 0.96518203 per coordinate (before weight decay).
R2 = (0.29 / 0.19) / math.sqrt(0.004999 / 0.001999)


@pytest.mark.parametrize("grads, weight_decay, adapt, p0, expected", [
    # step 1: m_hat = G, v_hat = G^2, r = [1, 1]; no trust ratio: p = [3, 4] - 0.1 * [1, 1]
    # (without bias correction r would be 0.1 / sqrt(0.001) = 3.16)
    pytest.param([G], 0.0, False, [3.0, 4.0], [2.9, 3.9], id="no-adapt-one-step"),
    # step 2: r = R2 = 0.96518203; p = [2.9, 3.9] - 0.1 * R2
    pytest.param([G, [1.2, 1.6]], 0.0, False, [3.0, 4.0], [2.9 - 0.1 * R2, 3.9 - 0.1 * R2],
                 id="no-adapt-two-steps"),
    # r = [1, 1], trust = 5 / sqrt(2); p = [3, 4] - 0.1 * 5 / sqrt(2) * [1, 1]
    pytest.param([G], 0.0, True, [3.0, 4.0], [3 - 0.5 / math.sqrt(2), 4 - 0.5 / math.sqrt(2)],
                 id="one-step"),
    # r = [1, 1] + 0.1 * [3, 4] = [1.3, 1.4], ||r|| = sqrt(3.65) = 1.91049732, trust = 2.61711961;
    # p = [3, 4] - 0.261711961 * [1.3, 1.4] = [3 - 0.34022555, 4 - 0.36639675]
    pytest.param([G], 0.1, True, [3.0, 4.0], [2.659774450316, 3.633603254187], id="one-step-decay"),
    # step 2: r = R2 * [1, 1] + 0.1 * p = [1.23115947, 1.32854235], ||r|| = 1.81129192,
    # ||p|| = 4.50305149, trust = 2.48609925; p = p - 0.248609925 * r
    pytest.param([G, [1.2, 1.6]], 0.1, True, [3.0, 4.0], [2.353695986187, 3.303314439435],
                 id="two-steps-decay"),
    # ||p|| = 0: trust = 1; r = [1, 1] + 0.1 * 0, p = -0.1 * [1, 1]
    pytest.param([G], 0.1, True, [0.0, 0.0], [-0.1, -0.1], id="zero-weight"),
    # g = 0: m = v = 0, r = 0 / eps = 0, ||r|| = 0 so trust = 1 (not 5/0), p unchanged and finite
    pytest.param([[0.0, 0.0]], 0.0, True, [3.0, 4.0], [3.0, 4.0], id="zero-grad"),
])
def test_lamb_matches_hand_computed_steps(grads, weight_decay, adapt, p0, expected):
    eps = 1e-6 if grads[0] == [0.0, 0.0] else 0.0  # eps = 0 keeps the others exact; 0/0 needs eps
    p = run_steps(LAMB, p0, grads, lr=0.1, betas=(0.9, 0.999), eps=eps, weight_decay=weight_decay,
                  adapt=adapt)
    assert p.dtype == torch.float64
    assert p.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("optimizer_cls, hyper", [
    pytest.param(LARS, LARS_HYPER, id="lars"),
    pytest.param(LAMB, {"lr": 0.1, "eps": 1e-6}, id="lamb"),
])
def test_step_never_syncs_with_the_device(monkeypatch, optimizer_cls, hyper):
    """Reading a tensor back to Python (`.item()`, `bool()`, `float()`) would stall a GPU once per tensor."""
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([0.6, 0.8])
    optimizer = optimizer_cls([p], weight_decay=0.1, **hyper)

    def host_sync(*args):
        raise AssertionError("optimizer step read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    optimizer.step()
    optimizer.step()
    monkeypatch.undo()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), torch.tensor([3.0, 4.0]))


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def test_param_groups_keep_biases_and_norms_out_of_decay():
    model = small_model()
    groups = {group["name"]: group for group in param_groups(model, weight_decay=0.05)}
    linear1, norm, linear2 = model
    assert {id(p) for p in groups["decay"]["params"]} == {id(linear1.weight), id(linear2.weight)}
    assert {id(p) for p in groups["no_decay"]["params"]} == {
        id(linear1.bias), id(norm.weight), id(norm.bias), id(linear2.bias)}
    assert (groups["decay"]["weight_decay"], groups["decay"]["adapt"]) == (0.05, True)
    assert (groups["no_decay"]["weight_decay"], groups["no_decay"]["adapt"]) == (0.0, False)


@pytest.mark.parametrize("frozen, expected_names", [
    # a frozen LayerNorm and frozen biases leave no_decay empty, so it is omitted
    pytest.param(("0.bias", "1.weight", "1.bias", "2.bias"), ["decay"], id="no-trainable-vectors"),
    # frozen weight matrices leave only no_decay
    pytest.param(("0.weight", "2.weight"), ["no_decay"], id="no-trainable-matrices"),
])
def test_param_groups_skip_frozen_parameters_and_empty_groups(frozen, expected_names):
    model = small_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    groups = param_groups(model, weight_decay=0.05)
    assert [group["name"] for group in groups] == expected_names
    assert all(p.requires_grad for group in groups for p in group["params"])


@pytest.mark.parametrize("name, expected_cls", [
    ("sgd", torch.optim.SGD),      # momentum SGD (L2 weight decay per group)
    ("adamw", torch.optim.AdamW),  # decoupled weight decay
    ("lars", LARS),                # layer-wise trust ratio on top of momentum SGD
    ("lamb", LAMB),                # layer-wise trust ratio on top of AdamW
])
def test_build_optimizer_returns_named_class_with_initial_lr(name, expected_cls):
    cfg = OptimConfig(name=name, weight_decay=0.01)
    optimizer = build_optimizer(cfg, small_model(), lr=0.4)
    assert type(optimizer) is expected_cls
    assert [group["name"] for group in optimizer.param_groups] == ["decay", "no_decay"]
    assert [group["initial_lr"] for group in optimizer.param_groups] == [0.4, 0.4]
    assert [group["lr"] for group in optimizer.param_groups] == [0.4, 0.4]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_kernels_on_cpu_and_cuda_give_the_per_tensor_update(name):
    torch.manual_seed(0)
    fused_model, plain_model = small_model(), small_model()
    plain_model.load_state_dict(fused_model.state_dict())
    cfg = OptimConfig(name=name, momentum=0.9, weight_decay=0.01)
    fused = build_optimizer(cfg, fused_model, lr=0.1)
    assert fused.defaults["fused"] is True
    groups = param_groups(plain_model, cfg.weight_decay)
    plain = (torch.optim.SGD(groups, lr=0.1, momentum=0.9) if name == "sgd"
             else torch.optim.AdamW(groups, lr=0.1, betas=cfg.betas, eps=cfg.eps))
    for _ in range(3):
        x = torch.randn(8, 4)
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if torch.cuda.is_available():  # checked where a GPU is lent; the CPU half above runs everywhere
        gpu = build_optimizer(OptimConfig(name=name), torch.nn.Linear(3, 2).cuda(), lr=0.1)
        assert gpu.defaults["fused"] is True


def test_build_optimizer_passes_hyperparameters_through():
    lars = build_optimizer(OptimConfig(name="lars", momentum=0.8, trust_coefficient=0.02), small_model(), 1.0)
    assert (lars.defaults["momentum"], lars.defaults["trust_coefficient"]) == (0.8, 0.02)
    lamb = build_optimizer(OptimConfig(name="lamb", betas=[0.8, 0.99], eps=1e-7), small_model(), 1.0)
    assert (lamb.defaults["betas"], lamb.defaults["eps"]) == ((0.8, 0.99), 1e-7)
    sgd = build_optimizer(OptimConfig(name="sgd", nesterov=True, momentum=0.9), small_model(), 1.0)
    assert sgd.defaults["nesterov"] is True


@pytest.mark.parametrize("overrides, message", [
    # one beta only
    ({"name": "adamw", "betas": [0.9]}, "optim.betas: expected two numbers in [0, 1), got [0.9]"),
    # beta of 1 never forgets (and bias correction divides by 0)
    ({"name": "lamb", "betas": [0.9, 1.0]}, "optim.betas: expected two numbers in [0, 1), got [0.9, 1.0]"),
    # negative beta
    ({"name": "adamw", "betas": [-0.1, 0.999]}, "optim.betas: expected two numbers in [0, 1)"),
])
def test_build_optimizer_rejects_bad_config(overrides, message):
    with pytest.raises(ConfigError) as info:
        build_optimizer(OptimConfig(**overrides), small_model(), lr=0.1)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb"])
def test_state_dict_round_trip_gives_identical_next_step(name):
    """A resumed optimizer must carry momentum / moments over, or the first step after resume differs."""
    cfg = OptimConfig(name=name, weight_decay=0.01, trust_coefficient=0.02)
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.randint(0, 3, (16,))

    def step(model, optimizer, scale):
        optimizer.zero_grad()
        (scale * nn.functional.cross_entropy(model(x), y)).backward()
        optimizer.step()

    model = small_model()
    optimizer = build_optimizer(cfg, model, lr=0.1)
    step(model, optimizer, 1.0)
    step(model, optimizer, 0.5)

    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(cfg, resumed_model, lr=0.1)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    step(model, optimizer, 2.0)
    step(resumed_model, resumed, 2.0)
    for original, restored in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(original, restored)


@pytest.mark.parametrize("optimizer_cls, hyper", [
    pytest.param(LARS, LARS_HYPER, id="lars"),
    pytest.param(LAMB, {"lr": 0.1}, id="lamb"),
])
def test_state_dict_round_trip_needs_the_state(optimizer_cls, hyper):
    """Guard for the test above: a fresh optimizer (no loaded state) takes a different step."""
    p_a = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    p_b = nn.Parameter(p_a.detach().clone())
    warm, fresh = optimizer_cls([p_a], **hyper), optimizer_cls([p_b], **hyper)
    p_a.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    warm.step()
    with torch.no_grad():
        p_b.copy_(p_a)
    for p in (p_a, p_b):  # not parallel to the first gradient, so LAMB's moments change the direction
        p.grad = torch.tensor([1.6, 0.2], dtype=torch.float64)
    warm.step()
    fresh.step()
    assert not torch.allclose(p_a, p_b)
