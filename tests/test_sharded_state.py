"""optim.shard_state: sharded optimizer state against unsharded DDP on 2 gloo processes for every optimizer, the
checkpoint format, a kill and resume, and what find-batch-size counts. No Ray (tests/inprocess.py for the loop)."""

from __future__ import annotations

import copy
import datetime
import math

import pytest
import torch
import torch.distributed as dist
from inprocess import start_ranks, train
from torch import nn
from torch.multiprocessing.spawn import ProcessException

from rayscale import config
from rayscale.config import OptimConfig
from rayscale.engine import checkpoint, distributed
from rayscale.engine.distributed import join_process_group
from rayscale.engine.optimizers import build_optimizer
from rayscale.engine.precision import Precision
from rayscale.engine.step import train_step
from rayscale.engine.strategies.ddp import prepare_model
from rayscale.engine.strategies.ps_shards import shard_parameters
from rayscale.engine.strategies.sharded_state import OptimizerShards, largest_shard, state_bytes
from rayscale.launch.connect import free_loopback_port
from rayscale.tools import batch_size_finder

OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")
STEPS, NONFINITE_STEP, CLIP = 5, 2, 0.5
CPU = torch.device("cpu")


def _model() -> nn.Module:
    """Two matrices and four vectors: with 2 ranks the first matrix is one shard, the rest the other, so both
    shards hold decayed (adapted) and undecayed tensors."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))


def _steps(rank: int, name: str, sharded: bool) -> dict:
    """STEPS steps of train_step under DDP (2 micro-batches, clipped by the global norm, one non-finite step from
    rank 1's rows); what the rank holds after."""
    model = prepare_model(_model(), CPU, 2)
    shards = OptimizerShards(rank, 2) if sharded else None
    optimizer = build_optimizer(OptimConfig(name=name, lr=0.05, momentum=0.9, weight_decay=0.01), model, 0.05,
                                shards)
    norms, skipped = [], []
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator)
        if step == NONFINITE_STEP and rank == 1:
            x[0, 0] = float("nan")
        result = train_step(model, [{"x": x[:8], "y": y[:8]}, {"x": x[8:], "y": y[8:]}], optimizer,
                            task="classification", lr=0.05, precision=Precision("fp32", "cpu"), grad_clip=CLIP,
                            global_count=32)
        norms.append(float(result.grad_norm))
        skipped.append(bool(result.skipped))
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    held = sorted(index[id(p)] for p in optimizer.state)
    held_bytes = state_bytes(optimizer)
    if sharded:
        shards.gather(optimizer)  # a collective: rank 0's state_dict() is then the whole optimizer's
    whole = copy.deepcopy(optimizer.state_dict()) if rank == 0 else None
    loaded = None
    if sharded:  # the whole state dict (a checkpoint's) loaded into a fresh sharded optimizer on every rank
        fresh_shards = OptimizerShards(rank, 2)
        fresh = build_optimizer(OptimConfig(name=name, lr=0.05, momentum=0.9, weight_decay=0.01),
                                prepare_model(_model(), CPU, 2), 0.05, fresh_shards)
        fresh.load_state_dict(distributed.from_rank_0(lambda: whole, rank))
        loaded = copy.deepcopy(fresh.state_dict()["state"])
    return {"parameters": [p.detach().clone() for p in model.parameters()], "norms": norms, "skipped": skipped,
            "held": held, "bytes": held_bytes, "whole": whole, "loaded": loaded}


def _engine_rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    join_process_group("gloo", "127.0.0.1", port, rank, 2, datetime.timedelta(seconds=120))
    try:
        results = {(name, sharded): _steps(rank, name, sharded) for name in OPTIMIZERS for sharded in (False, True)}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    start_ranks(_engine_rank, (free_loopback_port(), str(out)), 2)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_state_trains_unsharded_ddps_model_on_every_rank(two_ranks, name):
    """The same weights on both ranks, and the unsharded run's within fp32 tolerance: the clip saw the global
    norm (it clipped), and the non-finite step was skipped on both ranks in both runs."""
    for rank in range(2):
        plain, sharded = two_ranks[rank][name, False], two_ranks[rank][name, True]
        assert sharded["skipped"] == plain["skipped"] == [step == NONFINITE_STEP for step in range(STEPS)]
        assert sharded["norms"][0] == pytest.approx(plain["norms"][0], rel=1e-6) and plain["norms"][0] > CLIP
        for a, b in zip(sharded["parameters"], plain["parameters"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(two_ranks[0][name, True]["parameters"], two_ranks[1][name, True]["parameters"], strict=True):
        assert torch.equal(a, b)  # the owner's broadcast: no rank drifts


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_rank_holds_only_its_shards_state_and_rank_0_saves_the_whole(two_ranks, name):
    """Every tensor's state on exactly one rank (its shard's), as many bytes in all as unsharded; rank 0's
    state dict after the gather has the unsharded one's entries and values; loaded back, each rank keeps its
    own."""
    plain, sharded = [two_ranks[r][name, False] for r in range(2)], [two_ranks[r][name, True] for r in range(2)]
    sizes = [p.numel() for p in _model().parameters()]
    order = [i for i, p in enumerate(_model().parameters()) if p.ndim >= 2] + \
            [i for i, p in enumerate(_model().parameters()) if p.ndim <= 1]  # the optimizer's numbering
    shards = shard_parameters([sizes[i] for i in order], 2)
    assert [sharded[r]["held"] for r in range(2)] == shards and plain[0]["held"] == list(range(len(sizes)))
    assert sharded[0]["bytes"] + sharded[1]["bytes"] == plain[0]["bytes"]
    assert all(s["bytes"] < plain[0]["bytes"] for s in sharded)
    whole, reference = sharded[0]["whole"], plain[0]["whole"]
    assert list(whole["state"]) == list(reference["state"]) and whole["param_groups"] == reference["param_groups"]
    for index, entry in reference["state"].items():
        assert entry.keys() == whole["state"][index].keys()
        for key, value in entry.items():
            torch.testing.assert_close(whole["state"][index][key], value, rtol=1e-5, atol=1e-6)
    for rank in range(2):
        loaded = sharded[rank]["loaded"]
        assert sorted(loaded) == shards[rank]
        assert all(torch.equal(torch.as_tensor(loaded[i][k]), torch.as_tensor(whole["state"][i][k]))
                   for i in loaded for k in loaded[i])


def test_one_worker_holds_the_whole_state():
    """optim.shard_state with one worker (or local mode): one shard, all its own, the plain optimizer's steps."""
    model, reference = _model(), _model()
    optimizer = build_optimizer(OptimConfig(name="adamw"), model, 0.01, OptimizerShards(0, 1))
    plain = build_optimizer(OptimConfig(name="adamw"), reference, 0.01)
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    for net, opt in ((model, optimizer), (reference, plain)):
        train_step(net, [{"x": x, "y": y}], opt, task="classification", lr=0.01, precision=Precision("fp32", "cpu"))
    assert len(optimizer.state) == len(plain.state) == len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))


# ------------------------------------------------------------------------------------------ the loop, resumed

LOOP = ("train.epochs=1", "batch.global_batch_size=64", "batch.micro_batch_size=32", "optim.name=adamw",
        "optim.lr=0.01", "optim.shard_state=true", "run.checkpoint_every_samples=320")


def _crashing(tmp_path, name, after):
    return ("model.name=loop_models:crash_once", f"model.kwargs={{after: {after}, marker: {tmp_path / name}.marker}}")


def test_a_sharded_run_killed_mid_epoch_resumes_to_the_uninterrupted_model_from_unsharded_checkpoints(tmp_path):
    """2 gloo processes, AdamW with sharded state: the checkpoints hold the whole optimizer (every tensor's
    moments, numbered as unsharded). Killed mid-epoch after a checkpoint (one rank raises, the other is
    terminated) and started again, the run ends with the uninterrupted run's model, bit for bit (each rank
    took its shard back from the whole state)."""
    whole = train(tmp_path, "whole", *LOOP, *_crashing(tmp_path, "whole", 10**9), workers=2)
    saved = checkpoint.read_state(checkpoint.latest_local(whole.run_dir / "checkpoints")).optimizer
    assert list(saved["state"]) == list(range(len(whole.model)))  # an MLP: every entry is a parameter
    assert all(saved["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"} for i in saved["state"])

    steps = math.ceil(whole.summary["train_rows"] / 64)
    crashing = (*LOOP, *_crashing(tmp_path, "crashed", steps - 3))  # one forward per step and rank
    # One rank raises "injected crash"; the other, in the step's all-reduce by then, fails with gloo's own error,
    # and which of the two the parent hears first is a race: the marker says the crash was injected.
    with pytest.raises(ProcessException):  # raised, or ended by a signal, in either rank
        train(tmp_path, "crashed", *crashing, workers=2)
    assert (tmp_path / "crashed.marker").exists()
    resumed = train(tmp_path, "crashed", *crashing, workers=2)
    final = checkpoint.read_state(checkpoint.latest_local(resumed.run_dir / "checkpoints")).train_state
    assert final.resumes == 1  # restored from the mid-epoch checkpoint before the crash
    assert all(torch.equal(resumed.model[key], whole.model[key]) for key in whole.model)


# ------------------------------------------------------------------------------------------ find-batch-size

def test_largest_shard_is_the_most_loaded_workers():
    parameters = [torch.zeros(n) for n in (100, 60, 50, 10)]
    assert [p.numel() for p in largest_shard(parameters, 2)] == [100, 10]  # 110 against 60 + 50
    assert [p.numel() for p in largest_shard(parameters, 1)] == [100, 60, 50, 10]


def test_find_batch_size_counts_the_most_loaded_workers_share_of_the_optimizer_state():
    """AdamW on the default MLP, 2 workers: the memory that does not grow with the batch drops by the two
    moments of the tensors the other worker owns."""
    base = ["optim.name=adamw", "scaling.num_workers=2", "batch.micro_batch_size=null"]
    replicated = batch_size_finder.find(config.load(overrides=base), limit=4)
    sharded = batch_size_finder.find(config.load(overrides=[*base, "optim.shard_state=true"]), limit=4)
    params = list(_finder_model().parameters())
    owned = {id(p) for p in largest_shard([p for p in params if p.ndim >= 2] + [p for p in params if p.ndim <= 1], 2)}
    others = sum(p.numel() for p in params if id(p) not in owned)
    saved_mb = replicated.per_sample[1] - sharded.per_sample[1]
    assert saved_mb * 2**20 == pytest.approx(others * 4 * 2, rel=0.02)  # two fp32 moments each
    assert sharded.per_sample[0] == pytest.approx(replicated.per_sample[0], rel=1e-6)


def _finder_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10))


def test_the_benchmark_measures_about_half_the_state_per_worker_and_the_same_weights(tmp_path):
    """benchmarks/sharded_state.py at its smoke size: its figures, from 2 gloo processes."""
    from benchmarks import sharded_state

    result = sharded_state.run("smoke", tmp_path)
    replicated, sharded = result["replicated"]["state_bytes_per_worker"], result["sharded"]["state_bytes_per_worker"]
    assert replicated[0] == replicated[1] and sum(sharded) == replicated[0]
    assert result["targets"][0]["pass"] and result["bitwise_equal"]
