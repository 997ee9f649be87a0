"""train.compile: the compiled forward and loss give eager's gradients, under accumulation, DDP and a whole run,
and the graphs compiled stay few however long the run and whatever its micro-batch sizes.

Most tests use the aot_eager backend (Dynamo's tracing and AOTAutograd's joint forward-backward graph, without
code generation: seconds); one compiles a tiny model with inductor, the default, which takes tens of seconds
on 2 cores the first time a machine compiles it (PyTorch caches the kernels)."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
from inprocess import start_ranks, train
from torch import nn

from benchmarks.gpt import make as make_gpt
from rayscale.engine.components import compilation
from rayscale.engine.components.compilation import Compilation, backend_of, compiler
from rayscale.engine.distributed import join_process_group
from rayscale.engine.precision import Precision
from rayscale.engine.step import train_step
from rayscale.engine.strategies.ddp import prepare_model
from rayscale.engine.tasks import Objective
from rayscale.launch.connect import free_loopback_port

FP32 = Precision("fp32", "cpu")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def rows(count, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(count, 6, generator=gen), "y": torch.randint(0, 3, (count,), generator=gen)}


def cut(batch, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({key: value[start:start + size] for key, value in batch.items()})
        start += size
    return out


def tokens(count, length, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (count,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]  # padded to the micro-batch's longest
    return {"x": torch.randint(0, 20, (count, length), generator=gen),
            "y": torch.randint(0, 20, (count, length), generator=gen), "mask": mask}


def weighted_per_token(output, batch):
    """A user loss that weighs its own tokens: its count is known only after the forward."""
    losses = nn.functional.cross_entropy(output.transpose(1, 2), batch["y"], reduction="none")
    return losses, torch.linspace(0.5, 1.5, losses.shape[1]).expand_as(losses)


def trained(model, steps, objective, forward_loss=None, lr=0.1):
    """The parameters after one train_step per list of micro-batches, and each step's result."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    extra = {"forward_loss": forward_loss} if forward_loss is not None else {}
    results = [train_step(model, micro_batches, optimizer, task=objective, lr=lr, precision=FP32, **extra)
               for micro_batches in steps]
    return torch.cat([p.detach().flatten() for p in model.parameters()]), results


CASES = {
    # rows: full micro-batches, a partial last one, a zero-weight padding row alone (size 1: its own graph)
    "classification": (mlp, Objective("classification"),
                       [cut(rows(24), [8, 8, 8]), cut(rows(13, seed=2), [8, 5]),
                        [{**rows(1, seed=3), "weight": torch.zeros(1)}]]),
    # sequences padded to each micro-batch's longest: the length changes too
    "tokens": (lambda: make_gpt(vocab_size=20, max_length=12, num_outputs=20, d_model=16, n_layer=2, n_head=2),
               Objective("token_classification"),
               [[tokens(4, 12, 1), tokens(4, 12, 2)], [tokens(4, 9, 3), tokens(3, 9, 4)]]),
    "user-loss-with-weights": (
        lambda: make_gpt(vocab_size=20, max_length=12, num_outputs=20, d_model=16, n_layer=1, n_head=2),
        Objective("token_classification", weighted_per_token), [[tokens(4, 12, 5), tokens(2, 7, 6)]]),
}


@pytest.mark.parametrize("case, graphs", [
    pytest.param("classification", 3, id="classification"),  # 8 rows; the batch dimension symbolic; 1 row
    pytest.param("tokens", 3, id="tokens"),  # (4, 12); the length symbolic; the batch symbolic too
    pytest.param("user-loss-with-weights", 2, id="user-loss-with-weights"),  # (4, 12); both symbolic at once
])
def test_compiled_steps_give_eagers_parameters_and_losses(case, graphs):
    build, objective, steps = CASES[case]
    model = build()
    compiled = Compilation("aot_eager")
    eager_params, eager_results = trained(model, steps, objective)
    compiled_params, compiled_results = trained(model, steps, objective, compiled.forward_loss)
    assert torch.allclose(compiled_params, eager_params, rtol=1e-5, atol=1e-6)
    for eager, got in zip(eager_results, compiled_results, strict=True):
        assert torch.allclose(got.loss_sum, eager.loss_sum, rtol=1e-5)
        assert torch.allclose(got.grad_norm, eager.grad_norm, rtol=1e-5)
        assert torch.equal(got.global_count, eager.global_count)  # the normaliser is eager's, exactly
    assert compiled.graphs == graphs  # one per shape class, not per step (see the module's docstring)


def test_inductor_compiles_a_step_with_eagers_gradients():
    steps = [cut(rows(24), [8, 8, 8]), cut(rows(13, seed=2), [8, 5])]
    compiled = Compilation(True)
    assert compiled.backend == "inductor"
    eager_params, _ = trained(mlp(), steps, Objective("classification"))
    compiled_params, _ = trained(mlp(), steps, Objective("classification"), compiled.forward_loss)
    assert torch.allclose(compiled_params, eager_params, rtol=1e-5, atol=1e-6)
    assert compiled.graphs == 2  # 8 rows as they are, then the batch dimension symbolic (5, and every other)


def test_inductor_computes_tanh_in_its_exp_form():
    """train.compile's one inductor setting (INDUCTOR_SETTINGS): tanh in its exp form, whose only sign is that it
    rounds a tanh too small for it to 0 where inductor's default gives the value. (The MLP above is a tanh one:
    its compiled step keeps eager's parameters that way.)"""
    tiny = torch.full((64,), 1e-10)  # a whole vector: the scalar tail of a kernel may be generated apart
    torch.compiler.reset()
    assert torch.equal(torch.compile(torch.tanh, backend=compiler("inductor"))(tiny), torch.zeros(64))
    torch.compiler.reset()
    assert torch.equal(torch.compile(torch.tanh, backend="inductor")(tiny), tiny)


def test_a_cpu_graph_gets_a_cpp_wrapper_and_a_gpu_graph_inductors_default(monkeypatch):
    """CPU_SETTINGS for a graph whose inputs are on the CPU; a graph with an input elsewhere (a GPU's; here the
    meta device, which no CPU-only machine lacks) gets INDUCTOR_SETTINGS alone."""
    from rayscale.engine.components import compilation

    given = []
    monkeypatch.setattr(torch._dynamo, "lookup_backend",
                        lambda name: lambda graph, inputs, config_patches: given.append(config_patches))
    compile_graph = compiler("inductor")
    compile_graph(None, [torch.ones(2), 3])
    compile_graph(None, [torch.ones(2), torch.ones(2, device="meta")])
    assert given == [compilation.CPU_SETTINGS, compilation.INDUCTOR_SETTINGS]
    assert given[0]["cpp_wrapper"] and "cpp_wrapper" not in given[1]
    assert given[0]["cpp.use_decompose_tanh"] and given[1]["cpp.use_decompose_tanh"]


def test_a_nonfinite_compiled_step_is_skipped_and_leaves_the_weights():
    batch = rows(8)
    batch["x"][0, 0] = float("inf")
    compiled = Compilation("aot_eager")
    before, _ = trained(mlp(), [], Objective("classification"))
    after, (result,) = trained(mlp(), [cut(batch, [4, 4])], Objective("classification"), compiled.forward_loss)
    assert result.skipped and torch.equal(before, after)


def test_the_setting_names_the_backend_and_off_compiles_nothing():
    assert [backend_of(v) for v in (False, True, "inductor", "aot_eager")] == [None, "inductor", "inductor",
                                                                               "aot_eager"]
    eager = Compilation(False)
    trained(mlp(), [cut(rows(8), [4, 4])], Objective("classification"), eager.forward_loss)
    assert eager.graphs == 0 and eager.log_fields(None, [], 1) == {}


# ------------------------------------------------------------------------------------- two ranks (gloo, DDP)

def _ddp_worker(rank, world, port, result_path):
    """Rank 0: 8 rows in micro-batches of 3 (3, 3, 2); rank 1: 3 rows, then nothing (a zero-weight row)."""
    join_process_group("gloo", "127.0.0.1", port, rank, world)
    torch.set_num_threads(1)
    data = rows(11)
    mine = cut(data, [8, 3])[rank]
    steps = [cut(mine, [3, 3, 2] if rank == 0 else [3]),
             cut(mine, [3, 3, 2]) if rank == 0 else [{**cut(data, [1])[0], "weight": torch.zeros(1)}]]
    model = prepare_model(mlp(), torch.device("cpu"), world)
    all_reduces = []

    def counting_hook(state, bucket):
        all_reduces.append(1)
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0] / world)

    model.register_comm_hook(None, counting_hook)
    compiled = Compilation("aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for micro_batches in steps:
        train_step(model, micro_batches, optimizer, task="classification", lr=0.1, precision=FP32,
                   forward_loss=compiled.forward_loss)
    if rank == 0:
        torch.save({"params": [p.detach() for p in model.module.parameters()], "all_reduces": len(all_reduces),
                    "graphs": compiled.graphs}, result_path)
    dist.barrier()
    os._exit(0)  # as tests/test_step.py's DDP workers: no gloo teardown race after the result is written


def test_two_ddp_ranks_compiled_train_one_eager_processs_model(tmp_path):
    result_path = tmp_path / "rank0.pt"
    start_ranks(_ddp_worker, (2, free_loopback_port(), str(result_path)), 2)
    got = torch.load(result_path)
    data = rows(11)
    steps = [[cut(data, [8, 3])[0], cut(data, [8, 3])[1]], [cut(data, [8, 3])[0]]]
    expected, _ = trained(mlp(), steps, Objective("classification"))
    assert torch.allclose(torch.cat([p.flatten() for p in got["params"]]), expected, rtol=1e-5, atol=1e-6)
    assert got["all_reduces"] == 2  # one per step: no_sync still holds back the other micro-batches
    assert got["graphs"] == 2  # rank 0's: 3 rows, then the batch dimension symbolic


# ------------------------------------------------------------------------------------------------ a whole run

@pytest.fixture
def out_of_memory_above_16_rows(monkeypatch):
    """Device memory for 16 rows per micro-batch: CUDA's error from the compiled function's call, as a GPU's
    allocator raises it while the graph runs (a raise traced into the graph would only make Dynamo give up
    on the function)."""
    real = Compilation.__init__

    def cramped(self, setting):
        real(self, setting)
        forward_loss = self.forward_loss

        def limited(model, micro_batch, objective, precision):
            if model.training and len(micro_batch["x"]) > 16:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward_loss(model, micro_batch, objective, precision)

        self.forward_loss = limited

    monkeypatch.setattr(compilation.Compilation, "__init__", cramped)


def test_a_compiled_run_halving_its_micro_batch_compiles_a_bounded_few_graphs_and_trains_eagers_model(
        tmp_path, out_of_memory_above_16_rows):
    """Digits, 3 epochs of 1,450 rows at a global batch of 64: each epoch ends on a partial step of 42 rows (16,
    16, 10), and batch.micro_batch_size auto halves 64 -> 32 -> 16 at the first step."""
    common = ("train.epochs=3", "batch.global_batch_size=64", "batch.micro_batch_size=auto",
              "model.kwargs={hidden_sizes: [32]}", "train.log_every_samples=256")
    compiled = train(tmp_path, "compiled", *common, "train.compile=aot_eager")
    eager = train(tmp_path, "eager", *common)
    assert compiled.summary["train_rows"] % 64 == 42 and compiled.summary["batch_plan"]["micro_batch_size"] == 16
    assert compiled.model.keys() == eager.model.keys()  # model.pt holds the module's own keys (no _orig_mod.)
    for key in eager.model:
        assert torch.allclose(compiled.model[key], eager.model[key], rtol=1e-5, atol=1e-6), key
    lines = [line for line in compiled.lines if not line.get("evaluation")]
    assert "compiles" not in eager.lines[0]
    counts = [line["compiles"] for line in lines]
    first_epoch_end = next(i for i, line in enumerate(compiled.lines) if line.get("epoch_end"))
    assert counts[0] == 1 and counts[-1] == 2  # 16 rows, then the batch dimension symbolic once (10 rows)
    assert compiled.lines[first_epoch_end]["compiles"] == counts[-1]  # epochs 2 and 3 compile nothing new


def test_the_compile_benchmark_runs_every_config_at_smoke_size(capsys):
    """benchmarks/compile.py at its smoke size (aot_eager: the harness, not the compiler's speed): a row for each
    config, the shipped transformer config's steps among them, and a verdict for each transformer config."""
    from benchmarks import compile as benchmark

    assert benchmark.main(["--smoke", "--blocks", "2", "--steps", "3", "--backend", "aot_eager"]) == 0
    out = capsys.readouterr().out
    for name in benchmark.CONFIGS:
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        eager, compiled = (float(cell.replace(",", "")) for cell in row.split("|")[2:4])
        assert eager > 0 and compiled > 0
    assert sum(line.startswith("target: ") for line in out.splitlines()) == 2
