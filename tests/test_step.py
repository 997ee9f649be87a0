"""The training step: accumulation is exact, DDP syncs once, AMP and the non-finite policy behave."""

import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
from inprocess import start_ranks
from torch import nn

from rayscale.engine import checkpoint, distributed
from rayscale.engine.clock import StepClock
from rayscale.engine.guard import NonFiniteGuard
from rayscale.engine.precision import Precision, make_precision
from rayscale.engine.state import TrainState
from rayscale.engine.step import MicroBatchTooLarge, is_out_of_memory, skips_on_device, train_step
from rayscale.engine.strategies.ddp import prepare_model
from rayscale.errors import ConfigError, NonFiniteError
from rayscale.launch.connect import free_loopback_port

FP32 = Precision("fp32", "cpu")


def tiny_model(dtype=torch.float64, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)).to(dtype)


def dataset(rows, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (rows,), generator=gen)


def split(x, y, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({"x": x[start:start + size], "y": y[start:start + size]})
        start += size
    return out


def step_params(model, micro_batches, lr=0.5, **kw):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    result = train_step(model, micro_batches, optimizer, task="classification", lr=lr, precision=FP32, **kw)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), result


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype, tol", [
    pytest.param(torch.float64, 1e-12, id="float64"),  # the bound for exact arithmetic
    pytest.param(torch.float32, 1e-6, id="float32"),
])
@pytest.mark.parametrize("sizes", [
    pytest.param([4, 4, 4, 4], id="even-4x4"),
    pytest.param([4, 4, 2], id="partial-tail"),  # dataset not divisible: the last window is short
    pytest.param([1, 9], id="very-uneven"),
])
def test_accumulated_update_equals_full_batch(dtype, tol, sizes):
    x, y = dataset(sum(sizes), dtype)
    full, _ = step_params(tiny_model(dtype), [{"x": x, "y": y}])
    accumulated, _ = step_params(tiny_model(dtype), split(x, y, sizes))
    assert max_rel(accumulated, full) < tol


def test_dividing_by_accumulation_steps_would_be_caught():
    """The equivalence above is sensitive: the common 'loss / k' recipe fails it on a partial tail."""
    x, y = dataset(10)
    full, _ = step_params(tiny_model(), [{"x": x, "y": y}])
    wrong_model = tiny_model()
    optimizer = torch.optim.SGD(wrong_model.parameters(), lr=0.5)
    micro = split(x, y, [4, 4, 2])
    for mb in micro:  # mean per micro-batch, divided by the number of micro-batches
        (nn.functional.cross_entropy(wrong_model(mb["x"]), mb["y"]) / len(micro)).backward()
    optimizer.step()
    wrong = torch.cat([p.detach().flatten() for p in wrong_model.parameters()])
    assert max_rel(wrong, full) > 1e-4


def test_zero_weight_rows_change_nothing():
    x, y = dataset(8)
    plain, _ = step_params(tiny_model(), [{"x": x[:5], "y": y[:5]}])
    padded_weights = torch.tensor([1.0] * 5 + [0.0] * 3, dtype=torch.float64)
    padded, result = step_params(tiny_model(), [{"x": x, "y": y, "weight": padded_weights}])
    assert max_rel(padded, plain) < 1e-12
    assert result.global_count.item() == 5


@pytest.mark.parametrize("scale", [1e-19, 1e19])
def test_a_step_is_the_same_with_every_weight_multiplied_by_one_number_down_to_data_weights_limits(scale):
    """A weighted mean does not see the weights' scale, within float32. Tiny weights were divided by a floor of
    1e-12 instead of their own sum, which shrank the step ~10^6-fold."""
    x, y = dataset(8, torch.float32)
    weights = torch.linspace(0.5, 1.5, 8)
    reference, _ = step_params(tiny_model(torch.float32), [{"x": x[:5], "y": y[:5], "weight": weights[:5]},
                                                           {"x": x[5:], "y": y[5:], "weight": weights[5:]}])
    scaled, result = step_params(tiny_model(torch.float32), [
        {"x": x[:5], "y": y[:5], "weight": weights[:5] * scale}, {"x": x[5:], "y": y[5:], "weight": weights[5:] * scale}])
    assert max_rel(scaled, reference) < 1e-6
    assert result.global_count.item() == pytest.approx(weights.sum().item() * scale, rel=1e-6)


def test_token_loss_is_normalised_by_real_tokens():
    """Sequences of different lengths: micro-batching them equals one batch, tokens counted exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 4)).double()
    x = torch.randint(0, 11, (6, 5))
    y = torch.randint(0, 4, (6, 5))
    lengths = torch.tensor([5, 1, 3, 2, 5, 4])
    mask = torch.arange(5)[None, :] < lengths[:, None]

    class Masked(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens, mask):
            return self.inner(tokens)

    def run(sizes):
        m = Masked(copy.deepcopy(model))
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        mbs, start = [], 0
        for size in sizes:
            sl = slice(start, start + size)
            mbs.append({"x": x[sl], "y": y[sl], "mask": mask[sl]})
            start += size
        result = train_step(m, mbs, opt, task="token_classification", lr=1.0, precision=FP32)
        return torch.cat([p.detach().flatten() for p in m.parameters()]), result

    full, result = run([6])
    accumulated, _ = run([2, 2, 2])
    assert result.global_count.item() == lengths.sum().item()  # 20 real tokens, not 30
    assert max_rel(accumulated, full) < 1e-12


def test_grad_clip_reports_the_unclipped_norm_and_clips():
    x, y = dataset(8)
    model = tiny_model()
    reference = copy.deepcopy(model)
    params, result = step_params(model, [{"x": x, "y": y}], lr=1.0, grad_clip=1e-3)
    # Recompute the unclipped gradient by hand.
    loss = nn.functional.cross_entropy(reference(x), y, reduction="sum") / 8
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert abs(result.grad_norm.item() - norm.item()) < 1e-9
    moved = params - torch.cat([p.detach().flatten() for p in reference.parameters()])
    assert abs(moved.norm().item() - 1e-3) < 1e-8  # lr 1 x clipped norm


def test_nonfinite_step_is_skipped_and_counted():
    x, y = dataset(4)
    x[0, 0] = float("nan")
    model = tiny_model()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    after, result = step_params(model, [{"x": x, "y": y}])
    assert result.skipped
    assert torch.equal(before, after)
    assert all(p.grad is None for p in model.parameters())


def test_guard_aborts_after_n_in_a_row_naming_the_step():
    guard = NonFiniteGuard(max_in_a_row=3)
    for step, finite in enumerate([False, False, True, False, False]):
        guard.observe(finite, step)
    assert guard.skipped_total == 4
    with pytest.raises(NonFiniteError, match="at step 5: 3 steps in a row"):
        guard.observe(False, 5)


def _fused(name: str, model) -> torch.optim.Optimizer:
    from rayscale.config import OptimConfig
    from rayscale.engine.optimizers import build_optimizer

    return build_optimizer(OptimConfig(name=name, lr=0.1, momentum=0.9), model, 0.1)


def _state(optimizer) -> dict:
    return {(index, key): value.clone() for index, per_param in enumerate(optimizer.state.values())
            for key, value in per_param.items()}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_fused_optimizer_skips_a_nonfinite_step_on_the_device_as_if_it_never_came(name):
    """rayscale's SGD and AdamW are PyTorch's fused kernels: train_step hands them the non-finite flag instead
    of reading it, and they leave weights, moments and step counts as they were. Fused SGD's momentum buffers
    exist from the start, so a skipped first step leaves no uninitialised memory behind (it did before)."""
    x, y = dataset(8, torch.float32)
    bad = x.clone()
    bad[0, 0] = float("nan")
    model, reference = tiny_model(torch.float32), tiny_model(torch.float32)
    optimizer, reference_optimizer = _fused(name, model), _fused(name, reference)
    assert skips_on_device(optimizer)
    before, state_before = copy.deepcopy(model.state_dict()), _state(optimizer)
    result = train_step(model, [{"x": bad, "y": y}], optimizer, task="classification", lr=0.1, precision=FP32)
    assert isinstance(result.skipped, torch.Tensor) and bool(result.skipped)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # AdamW makes its state at its first step, skipped or not: zero moments at step 0, as if none yet.
    assert all(torch.equal(value, state_before.get(key, torch.zeros_like(value)))
               for key, value in _state(optimizer).items())
    for _ in range(2):  # then it trains exactly as an optimizer that never saw the bad step
        for net, opt in ((model, optimizer), (reference, reference_optimizer)):
            result = train_step(net, [{"x": x, "y": y}], opt, task="classification", lr=0.1, precision=FP32)
            assert not bool(result.skipped)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))


def test_zeroed_momentum_buffers_give_pytorchs_first_sgd_step():
    """The buffers made up front change nothing: the same weights as PyTorch's own SGD after 3 steps."""
    x, y = dataset(8, torch.float32)
    model, reference = tiny_model(torch.float32), tiny_model(torch.float32)
    optimizer = _fused("sgd", model)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    # With dampening a zero buffer would not give PyTorch's first step: such an SGD reads the flag on the host.
    assert not skips_on_device(torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, dampening=0.5,
                                               fused=True))
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, plain)):
            train_step(net, [{"x": x, "y": y}], opt, task="classification", lr=0.1, precision=FP32)
    assert max(max_rel(a.detach(), b.detach()) for a, b in zip(model.parameters(), reference.parameters(),
                                                                 strict=True)) < 1e-6


def test_a_step_with_a_fused_optimizer_reads_nothing_back_from_the_device(monkeypatch):
    """What makes the host wait for a GPU: a tensor read as a Python value. On CPU, forbid every such read in
    a step of 4 micro-batches (tests/test_gpu.py counts the real synchronisations on CUDA)."""
    x, y = dataset(32, torch.float32)
    model = tiny_model(torch.float32)
    optimizer = _fused("adamw", model)

    def read(*_args, **_kwargs):
        raise AssertionError("a tensor was read on the host inside the step")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, read)
    result = train_step(model, split(x, y, [8, 8, 8, 8]), optimizer, task="classification", lr=0.1,
                        precision=FP32, global_count=32)
    monkeypatch.undo()
    assert not bool(result.skipped) and torch.isfinite(result.grad_norm)


def test_guard_reads_device_flags_when_settled_and_names_the_step():
    guard = NonFiniteGuard(max_in_a_row=3)
    flags = [True, False, True, True]
    for step, skipped in enumerate(flags):
        guard.observe_on_device(torch.tensor(skipped), step)
    assert guard.skipped_total == 0  # nothing read yet
    guard.settle()
    assert (guard.skipped_total, guard.in_a_row) == (3, 2)
    guard.observe_on_device(torch.tensor(True), 4)
    with pytest.raises(NonFiniteError, match="at step 4: 3 steps in a row"):
        guard.settle()


def test_bf16_autocast_on_cpu_trains_close_to_fp32():
    x, y = dataset(16, torch.float32)
    fp32, _ = step_params(tiny_model(torch.float32), [{"x": x, "y": y}])
    model = tiny_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    result = train_step(model, split(x, y, [8, 8]), optimizer, task="classification", lr=0.5,
                        precision=make_precision("bf16", torch.device("cpu")))
    bf16 = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not result.skipped
    assert max_rel(bf16, fp32) < 2e-2  # bf16 has 8 mantissa bits
    assert not torch.equal(bf16, fp32)  # autocast really ran in lower precision


def test_fp16_on_cpu_is_refused_before_a_run_and_by_the_engine():
    """The user's error comes from the one table of rules (before any resource is claimed); the engine, handed
    a CPU device anyway, refuses too, as a bug in its caller."""
    from rayscale import config, rules

    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        rules.check(config.load(overrides=["train.precision=fp16"]))
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        make_precision("fp16", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_gradscaler_on_gpu():
    x, y = dataset(16, torch.float32)
    model = tiny_model(torch.float32).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    precision = make_precision("fp16", torch.device("cuda"))
    result = train_step(model, split(x.cuda(), y.cuda(), [8, 8]), optimizer, task="classification", lr=0.5,
                        precision=precision)
    assert torch.isfinite(result.grad_norm)


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """Dropout and momentum make the continuation depend on RNG and optimizer state: both must travel."""
    x, y = dataset(32, torch.float32)

    def steps(model, optimizer, count, offset):
        for i in range(offset, offset + count):
            sl = slice((i % 4) * 8, (i % 4) * 8 + 8)
            train_step(model, [{"x": x[sl], "y": y[sl]}], optimizer, task="classification", lr=0.1,
                       precision=FP32)

    torch.manual_seed(5)
    model = tiny_model(torch.float32, dropout=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps(model, optimizer, 3, 0)
    checkpoint.save_atomic(checkpoint.capture(model, optimizer, None, TrainState(step=3)), tmp_path / "state.pt")
    steps(model, optimizer, 3, 3)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(999)  # a fresh process would start from other RNG states
    resumed = tiny_model(torch.float32, seed=123, dropout=0.3)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    saved = checkpoint.read_state(tmp_path)
    checkpoint.restore(saved, resumed, resumed_opt, None)
    assert saved.train_state == TrainState(step=3)
    steps(resumed, resumed_opt, 3, 3)
    for a, b in zip(uninterrupted, resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_save_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    checkpoint.save_atomic({"v": 1}, target)

    def boom(obj, handle):
        handle.write(b"half")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"v": 2}, target)
    assert checkpoint.load(target) == {"v": 1}


# --------------------------------------------------------------------------- 2-process gloo DDP on loopback

def _join(rank, world, port, rows_per_rank):
    """Join the gloo group; every row of the test data and this rank's consecutive share of them."""
    distributed.join_process_group("gloo", "127.0.0.1", port, rank, world)
    torch.set_num_threads(1)
    x, y = dataset(sum(rows_per_rank))
    start = sum(rows_per_rank[:rank])
    return x, y, x[start:start + rows_per_rank[rank]], y[start:start + rows_per_rank[rank]]


def _count_gradient_all_reduces(model, world) -> list:
    """A DDP communication hook that does what DDP's own does and appends to the returned list per call."""
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(
            lambda fut: fut.value()[0] / world)

    model.register_comm_hook(None, counting_hook)
    return calls


def _ddp_worker(rank, world, port, rows_per_rank, micro, result_path, known_count):
    x, y, mine_x, mine_y = _join(rank, world, port, rows_per_rank)
    if len(mine_x) == 0:  # an empty rank still takes part with a zero-weight row
        mbs = [{"x": x[:1], "y": y[:1], "weight": torch.zeros(1, dtype=torch.float64)}]
    else:
        mbs = [{"x": mine_x[i:i + micro], "y": mine_y[i:i + micro]} for i in range(0, len(mine_x), micro)]
    model = prepare_model(tiny_model(), torch.device("cpu"), world)  # as the worker wraps it
    calls = _count_gradient_all_reduces(model, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # the step's global row count, when given, replaces the normaliser's all-reduce
        train_step(model, mbs, optimizer, task="classification", lr=0.5, precision=FP32,
                   global_count=sum(rows_per_rank) if known_count else None)
    if rank == 0:
        torch.save({"params": [p.detach() for p in model.module.parameters()], "hook_calls": len(calls),
                    "micro_batches": len(mbs)}, result_path)
    # Tearing gloo down while the peer's connection closes sometimes ends in std::terminate (SIGABRT, about
    # 1 run in 20 here) after the result is written: meet at a barrier, then leave without C++ destructors.
    dist.barrier()
    os._exit(0)


@pytest.mark.parametrize("rows_per_rank, micro, known_count", [
    pytest.param([8, 8], 2, False, id="even-4-microbatches"),
    pytest.param([8, 3], 2, False, id="partial-tail-uneven-ranks"),  # rank 1 has fewer rows and micro-batches
    pytest.param([5, 0], 2, False, id="empty-rank"),  # rank 1 has nothing left in the last window
    pytest.param([5, 0], 2, True, id="empty-rank-count-given"),  # the worker's path for unweighted rows
])
def test_ddp_two_processes_match_one_process(tmp_path, rows_per_rank, micro, known_count):
    result_path = tmp_path / "rank0.pt"
    start_ranks(_ddp_worker, (2, free_loopback_port(), rows_per_rank, micro, str(result_path), known_count), 2)
    got = torch.load(result_path)
    # Same two steps in one process on all rows as a single batch.
    x, y = dataset(sum(rows_per_rank))
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        train_step(model, [{"x": x, "y": y}], optimizer, task="classification", lr=0.5, precision=FP32)
    for a, b in zip(got["params"], model.parameters(), strict=True):
        assert torch.allclose(a, b.detach(), rtol=1e-12, atol=1e-14)
    # One gradient all-reduce per optimizer step (the model fits one DDP bucket), none per micro-batch.
    assert got["hook_calls"] == 2


def _bucket_worker(rank, world, port, result_path):
    distributed.join_process_group("gloo", "127.0.0.1", port, rank, world)
    torch.manual_seed(0)
    # 1.6 MB of float32 gradients: over PyTorch's 1 MiB first bucket, under rayscale's cap.
    model = prepare_model(nn.Sequential(nn.Linear(64, 600), nn.ReLU(), nn.Linear(600, 600), nn.ReLU(),
                                        nn.Linear(600, 10)), torch.device("cpu"), world)
    calls = _count_gradient_all_reduces(model, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    per_step = []
    for _ in range(4):  # DDP rebuilds its buckets in the order gradients arrive after the first step
        before = len(calls)
        train_step(model, [{"x": x, "y": y}], optimizer, task="classification", lr=0.1,
                   precision=Precision("fp32", "cpu"), global_count=32)
        per_step.append(len(calls) - before)
    if rank == 0:
        torch.save(per_step, result_path)
    dist.barrier()
    os._exit(0)  # see _ddp_worker


def test_on_cpu_the_gradients_of_a_step_go_in_one_all_reduce(tmp_path):
    """gloo's fixed cost per all-reduce call outweighs the overlap of PyTorch's small first bucket: a model with
    more than 1 MiB of gradients still makes one all-reduce a step once DDP has rebuilt its buckets."""
    result_path = tmp_path / "calls.pt"
    start_ranks(_bucket_worker, (2, free_loopback_port(), str(result_path)), 2)
    assert torch.load(result_path)[1:] == [1, 1, 1]


def _sum_and_max_worker(rank, world, port, result_path):
    distributed.join_process_group("gloo", "127.0.0.1", port, rank, world)
    calls = []
    for name in ("all_gather", "all_reduce", "broadcast"):  # every collective the helper could make, counted
        real = getattr(dist, name)
        setattr(dist, name, lambda *args, _real=real, _name=name, **kwargs: calls.append(_name) or _real(*args, **kwargs))
    got = distributed.sum_and_max([rank + 1.0, 10.0 * rank], [float(rank), -float(rank)], torch.device("cpu"))
    if rank == 0:
        torch.save({"got": got, "calls": calls}, result_path)
    dist.barrier()
    os._exit(0)  # see _ddp_worker


def test_a_log_lines_sums_and_maxima_over_the_ranks_take_one_collective(tmp_path):
    """Each collective waits for the slowest rank: a log line reduces its sums and its maxima in one."""
    result_path = tmp_path / "reduced.pt"
    start_ranks(_sum_and_max_worker, (2, free_loopback_port(), str(result_path)), 2)
    result = torch.load(result_path)
    assert result["got"] == ([3.0, 10.0], [1.0, 0.0])
    assert result["calls"] == ["all_gather"]


# ------------------------------------------------------------------------------ the noise scale's small batch

def _mean_gradient_squared_norm(x, y):
    """|g|^2 of the mean loss over (x, y) at tiny_model's init: the quantity the step must report."""
    model = tiny_model()
    nn.functional.cross_entropy(model(x), y).backward()
    return sum((p.grad ** 2).sum() for p in model.parameters()).item()


def test_one_worker_reports_its_first_micro_batch_as_the_small_batch():
    x, y = dataset(10)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    result = train_step(model, split(x, y, [4, 4, 2]), optimizer, task="classification", lr=0.5, precision=FP32,
                        measure_noise=True)
    assert result.small_count.item() == 4
    assert result.small_sq.item() == pytest.approx(_mean_gradient_squared_norm(x[:4], y[:4]), rel=1e-10)
    assert result.grad_norm.item() ** 2 == pytest.approx(_mean_gradient_squared_norm(x, y), rel=1e-10)
    # Off by default, and nothing to measure with a single micro-batch on one worker.
    assert step_params(tiny_model(), split(x, y, [4, 6]))[1].small_sq is None
    assert step_params(tiny_model(), split(x, y, [10]), measure_noise=True)[1].small_sq is None


def _ddp_noise_worker(rank, world, port, rows_per_rank, result_dir):
    _, _, mine_x, mine_y = _join(rank, world, port, rows_per_rank)
    model = prepare_model(tiny_model(), torch.device("cpu"), world)  # as the worker wraps it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sizes = [2] * (len(mine_x) // 2) + [1] * (len(mine_x) % 2)  # micro-batches of 2 and a short last one
    result = train_step(model, split(mine_x, mine_y, sizes), optimizer, task="classification", lr=0.5,
                        precision=FP32, measure_noise=True)
    measured = {"small_sq": result.small_sq.item(), "small_count": result.small_count.item(),
                "params": [p.detach().clone() for p in model.module.parameters()]}
    # The next step, not measured, syncs through DDP's own all-reduce as usual: the same update as a measured one.
    after = [train_step(model, split(mine_x, mine_y, sizes), optimizer, task="classification", lr=0.5,
                        precision=FP32, measure_noise=flag).small_sq for flag in (False, True)]
    params_after = [p.detach() for p in model.module.parameters()]
    torch.save({**measured, "unmeasured_small_sq": after[0], "params_after": params_after},
               f"{result_dir}/rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # see _ddp_worker


def test_ddp_reports_each_ranks_share_as_the_small_batch_and_still_averages_exactly(tmp_path):
    """A measured step takes each rank's gradient norm before averaging the gradients itself: every rank's small
    batch is its own rows, and the update is the one-process update, as is that of the steps after it, measured
    (averaged by train_step) or not (by DDP)."""
    rows_per_rank = [6, 3]
    start_ranks(_ddp_noise_worker, (2, free_loopback_port(), rows_per_rank, str(tmp_path)), 2)
    x, y = dataset(sum(rows_per_rank))
    for rank, (start, rows) in enumerate([(0, 6), (6, 3)]):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["small_count"] == rows
        assert got["small_sq"] == pytest.approx(_mean_gradient_squared_norm(x[start:start + rows],
                                                                            y[start:start + rows]), rel=1e-10)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_step(model, [{"x": x, "y": y}], optimizer, task="classification", lr=0.5, precision=FP32)
    got = torch.load(tmp_path / "rank0.pt")
    for a, b in zip(got["params"], model.parameters(), strict=True):
        assert torch.allclose(a, b.detach(), rtol=1e-12, atol=1e-14)
    for _ in range(2):
        train_step(model, [{"x": x, "y": y}], optimizer, task="classification", lr=0.5, precision=FP32)
    assert got["unmeasured_small_sq"] is None
    for a, b in zip(got["params_after"], model.parameters(), strict=True):
        assert torch.allclose(a, b.detach(), rtol=1e-12, atol=1e-14)


class _Sleepy(nn.Module):
    """tiny_model whose forward takes at least 20 ms."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()

    def forward(self, x):
        time.sleep(0.02)
        return self.inner(x)


def test_step_clock_splits_a_step_into_micro_batches_and_the_update():
    """What `rayscale suggest` predicts other batch sizes from: the no-sync micro-batches, the last one, and
    the update, each timed apart (the optimizer step here takes at least 200 ms, a micro-batch 20 ms)."""
    x, y = dataset(12)
    model = _Sleepy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    plain_step = optimizer.step
    optimizer.step = lambda: (time.sleep(0.2), plain_step())
    clock = StepClock(torch.device("cpu"))
    for _ in range(2):
        train_step(model, split(x, y, [4, 4, 4]), optimizer, task="classification", lr=0.5, precision=FP32,
                   clock=clock)
    times = clock.take()
    assert (times.steps, times.no_sync_micro_batches) == (2, 4)
    means = times.means()
    assert 0.02 <= means["micro_batch_s"] < 0.2 and 0.02 <= means["sync_micro_batch_s"] < 0.2
    assert means["update_s"] >= 0.2
    assert clock.take().steps == 0  # taken: the next interval starts afresh
    train_step(model, split(x, y, [12]), optimizer, task="classification", lr=0.5, precision=FP32, clock=clock)
    lone = clock.take().means()  # one micro-batch: nothing accumulated without a sync
    assert lone["micro_batch_s"] is None and lone["sync_micro_batch_s"] >= 0.02


# ------------------------------------------------------------------------ batch.micro_batch_size auto (OOM)

class _Cramped(nn.Module):
    """tiny_model on a device that runs out of memory above `limit` rows per forward (an injected CUDA OOM)."""

    def __init__(self, limit):
        super().__init__()
        self.inner, self.limit = tiny_model(), limit

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} rows")
        return self.inner(x)


def test_an_oom_safe_step_raises_for_a_retry_and_changes_nothing():
    x, y = dataset(16)
    model = _Cramped(limit=4)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(MicroBatchTooLarge):  # the second micro-batch of 8 fails after the first one's backward
        train_step(model, split(x, y, [4, 8, 4]), optimizer, task="classification", lr=0.5, precision=FP32,
                   oom_safe=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(torch.OutOfMemoryError):  # without oom_safe it is an error like any other
        train_step(model, split(x, y, [8, 8]), optimizer, task="classification", lr=0.5, precision=FP32)
    # Redone at 4 rows per micro-batch: the update of one batch of 16.
    got, _ = step_params(model, split(x, y, [4, 4, 4, 4]), oom_safe=True)
    want, _ = step_params(_Cramped(limit=16), [{"x": x, "y": y}])
    assert max_rel(got, want) < 1e-12


def test_out_of_memory_is_recognised_by_type_or_message():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def _ddp_oom_worker(rank, world, port, rows_per_rank, result_path):
    """Only rank 1 runs out of memory (at more than 2 rows): both ranks must learn it, redo the step at the
    next smaller micro-batch together, and still average exactly."""
    from rayscale.math.batching import smaller_micro_batch

    _, _, mine_x, mine_y = _join(rank, world, port, rows_per_rank)
    model = prepare_model(_Cramped(limit=2 if rank == 1 else 100), torch.device("cpu"), world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    micro, sizes_tried = len(mine_x), []
    while True:
        sizes_tried.append(micro)
        try:
            result = train_step(model, split(mine_x, mine_y, [micro] * (len(mine_x) // micro)), optimizer,
                                task="classification", lr=0.5, precision=FP32, oom_safe=True, measure_noise=True)
            break
        except MicroBatchTooLarge:
            micro = smaller_micro_batch(micro)
    torch.save({"params": [p.detach() for p in model.module.inner.parameters()], "tried": sizes_tried,
                "small_count": result.small_count.item()}, f"{result_path}.{rank}")
    dist.barrier()
    os._exit(0)  # see _ddp_worker


def test_ddp_ranks_agree_to_halve_the_micro_batch_when_one_runs_out_of_memory(tmp_path):
    start_ranks(_ddp_oom_worker, (2, free_loopback_port(), [8, 8], str(tmp_path / "rank")), 2)
    got = [torch.load(tmp_path / f"rank.{rank}") for rank in (0, 1)]
    assert got[0]["tried"] == got[1]["tried"] == [8, 4, 2]  # rank 0 never failed, yet redid the step with 1
    assert got[0]["small_count"] == 8  # the noise scale's small batch is still each rank's share
    x, y = dataset(16)
    model = tiny_model()
    train_step(model, [{"x": x, "y": y}], torch.optim.SGD(model.parameters(), lr=0.5), task="classification",
               lr=0.5, precision=FP32)
    for rank in (0, 1):
        for a, b in zip(got[rank]["params"], model.parameters(), strict=True):
            assert torch.allclose(a, b.detach(), rtol=1e-12, atol=1e-14)
