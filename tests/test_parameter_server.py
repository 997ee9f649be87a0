"""The parameter server's arithmetic without Ray: sharding, sync == one optimizer step on the summed gradient,
the staleness bound, checkpoint state."""

import copy
import json
import os
import random
import signal
import sys
import textwrap
import threading

import pytest
import ray
import torch
from committed import latest_state, wait_for_registered_checkpoint

from rayscale import cli, config
from rayscale.config import OptimConfig
from rayscale.data import sources
from rayscale.driver.outputs import read_metrics
from rayscale.engine import checkpoint
from rayscale.engine.optimizers import build_optimizer
from rayscale.engine.strategies.ps_shards import (
    ShardState,
    StalenessGate,
    clip_coefficient,
    merge_states,
    shard_parameters,
)
from rayscale.launch import ps_actors, trainer
from rayscale.launch.connect import connect
from rayscale.models import build_model


@pytest.mark.parametrize("sizes, shards", [
    ([10, 10, 10, 10], 2),  # equal tensors: two each
    ([1000, 1, 1, 1, 500, 499], 2),  # one big tensor alone, the rest balance it
    ([5, 3], 4),  # more shards than tensors: some stay empty
    ([7], 1),  # one shard holds everything
])
def test_sharding_covers_every_parameter_once_and_balances(sizes, shards):
    result = shard_parameters(sizes, shards)
    assert sorted(i for shard in result for i in shard) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in shard) for shard in result]
    # Greedy largest-first: no shard exceeds the lightest by more than the largest tensor.
    assert max(loads) - min(loads) <= max(sizes)


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.ReLU(),
                               torch.nn.Linear(5, 3)).to(dtype)


def _gradients(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]


def _servers(model, num_shards, optim, num_workers):
    sizes = [p.numel() for p in model.parameters()]
    return [ShardState(copy.deepcopy(model), owned, optim, 0.1, num_workers)
            for owned in shard_parameters(sizes, num_shards)]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb"])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_sync_over_two_workers_is_one_step_on_the_summed_gradient(name, dtype, tolerance, max_norm):
    optim = OptimConfig(name=name, weight_decay=0.01, momentum=0.9)
    model = _model(dtype)
    reference = copy.deepcopy(model)
    reference_optimizer = build_optimizer(optim, reference, 0.1)
    servers = _servers(model, 2, optim, num_workers=2)
    for step in range(3):
        per_worker = [_gradients(model, 10 * step + rank) for rank in range(2)]
        # The reference: one optimizer step on the summed gradient, clipped as train_step clips.
        for p, a, b in zip(reference.parameters(), *per_worker, strict=True):
            p.grad = a + b
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), max_norm or float("inf"))
        reference_optimizer.step()
        # The servers: both workers push, in reverse rank order, then one clip coefficient from all shards.
        for rank in (1, 0):
            for server in servers:
                server.add(rank, step, [per_worker[rank][i] for i in server.owned])
        norm, coefficient = clip_coefficient([s.squared_norm() for s in servers], max_norm)
        for server in servers:
            server.apply_summed(step, 0.1, coefficient, finite=True)
            server.apply_summed(step, 0.1, coefficient, finite=True)  # the second worker's call: no-op
    parameters, optimizer_state = merge_states([s.state() for s in servers])
    for i, p in enumerate(reference.parameters()):
        torch.testing.assert_close(parameters[i], p.detach(), rtol=tolerance, atol=tolerance)
    expected = reference_optimizer.state_dict()
    assert sorted(optimizer_state["state"]) == sorted(expected["state"])
    assert all(s.version == 3 for s in servers)


def test_a_non_finite_step_is_skipped_on_every_shard():
    model = _model()
    servers = _servers(model, 2, OptimConfig(), num_workers=1)
    before = [p.clone() for s in servers for p in s.values()]
    gradients = _gradients(model, 0)
    gradients[0][0, 0] = float("nan")
    for server in servers:
        server.add(0, 0, [gradients[i] for i in server.owned])
    norm, coefficient = clip_coefficient([s.squared_norm() for s in servers], None)
    for server in servers:
        server.apply_summed(0, 0.1, coefficient, finite=norm == norm)
    assert all(torch.equal(a, b) for a, b in zip(before, [p for s in servers for p in s.values()], strict=True))
    assert [s.version for s in servers] == [1, 1]


@pytest.mark.parametrize("max_staleness", [0, 1, 3])
def test_async_staleness_never_exceeds_the_bound_and_every_gradient_is_applied_in_order(max_staleness):
    """Three simulated workers in a random interleaving of pull / compute / push; shards receive the admitted
    updates in shuffled order. Every gradient is eventually applied once, none staler than the bound, and the
    shards end equal to one server applying the same sequence."""
    rng = random.Random(max_staleness)
    model = _model(torch.float64)
    optim = OptimConfig(name="sgd", momentum=0.0)
    servers = _servers(model, 2, optim, num_workers=3)
    gate = StalenessGate(max_staleness)
    single = copy.deepcopy(model)
    single_optimizer = build_optimizer(optim, single, 0.1)
    pulled = {}  # worker -> version it computed from
    todo = {worker: 6 for worker in range(3)}  # gradients each worker still has to get in
    in_flight = []  # admitted (sequence, gradients) not yet delivered to the shards
    staleness_seen, refused = [], 0
    while any(todo.values()) or in_flight:
        choice = rng.random()
        if in_flight and (choice < 0.3 or not any(todo.values())):
            sequence, gradients = in_flight.pop(rng.randrange(len(in_flight)))
            for server in servers:
                server.offer(sequence, [gradients[i] for i in server.owned], 0.1, 1.0)
            continue
        worker = rng.choice([w for w in todo if todo[w]])
        if worker not in pulled:
            pulled[worker] = servers[0].version
            continue
        admitted = gate.admit(pulled.pop(worker))
        if admitted is None:
            refused += 1  # too stale: pull again, recompute from the same rows
            continue
        sequence, staleness = admitted
        staleness_seen.append(staleness)
        gradients = _gradients(model, 100 + sequence)
        in_flight.append((sequence, gradients))
        todo[worker] -= 1
        for p, g in zip(single.parameters(), gradients, strict=True):
            p.grad = g
        single_optimizer.step()
    assert len(staleness_seen) == 18 and max(staleness_seen) <= max_staleness
    if max_staleness == 0:
        assert refused > 0  # the bound was actually exercised
    assert all(s.version == 18 for s in servers)
    parameters, _ = merge_states([s.state() for s in servers])
    for i, p in enumerate(single.parameters()):
        torch.testing.assert_close(parameters[i], p.detach(), rtol=1e-12, atol=1e-12)


def test_state_round_trips_through_load():
    optim = OptimConfig(name="adamw")
    model = _model()
    servers = _servers(model, 3, optim, num_workers=1)
    for step in range(2):
        gradients = _gradients(model, step)
        for server in servers:
            server.add(0, step, [gradients[i] for i in server.owned])
            server.apply_summed(step, 0.1, 1.0, finite=True)
    parameters, optimizer_state = merge_states([s.state() for s in servers])
    fresh = _servers(model, 3, optim, num_workers=1)
    for server in fresh:
        server.load([parameters[i] for i in range(len(parameters))], optimizer_state, version=2)
    gradients = _gradients(model, 7)
    for group in (servers, fresh):
        for server in group:
            server.add(0, 2, [gradients[i] for i in server.owned])
            server.apply_summed(2, 0.1, 1.0, finite=True)
    a, _ = merge_states([s.state() for s in servers])
    b, _ = merge_states([s.state() for s in fresh])
    assert all(torch.equal(a[i], b[i]) for i in a)


# ------------------------------------------------------------------------------------- through Ray

SLOW_MODEL = textwrap.dedent('''
    """The digits MLP, slowed down (numerics untouched) so that a test can kill a server actor or a worker
    mid-run; each process that trains it records its pid in $RAYSCALE_TEST_PID_DIR."""
    import os
    import sys
    import time
    from pathlib import Path

    from rayscale.models import MLP


    class Slow(MLP):
        def forward(self, x):
            if not _on_the_driver():  # a killed pid must be a training worker's, never this test's
                Path(os.environ["RAYSCALE_TEST_PID_DIR"], str(os.getpid())).touch()
            time.sleep(0.02)
            return super().forward(x)


    def _on_the_driver():
        """The driver's try of the model on two rows before the run (rayscale/driver/prepare.py)."""
        frame = sys._getframe()
        while frame is not None and frame.f_code.co_name != "_try_user_code":
            frame = frame.f_back
        return frame is not None


    def make(**kwargs):
        return Slow(in_features=64, num_outputs=10, hidden_sizes=(64, 64))
''')


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One embedded Ray for the module, started as `rayscale train` starts it, with the slow model importable."""
    import ray

    plugin_dir = tmp_path_factory.mktemp("ps_models")
    (plugin_dir / "ps_slow_model.py").write_text(SLOW_MODEL)
    os.environ["RAYSCALE_TEST_PID_DIR"] = str(plugin_dir / "pids")  # inherited by the Ray it starts
    (plugin_dir / "pids").mkdir()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(plugin_dir))
    ray.shutdown()
    connect(None)
    yield plugin_dir
    ray.shutdown()


@pytest.mark.slow
def test_async_servers_keep_the_staleness_bound_under_concurrent_workers(ray_session):
    """Three threads, each a worker with its own ParameterClient, pushing as fast as they can to two real server
    actors with ps.max_staleness 1: no applied gradient is staler than 1, some are refused and redone, and every
    admitted one is applied on both shards."""
    cfg = config.load(overrides=["train.strategy=parameter_server", "ps.mode=async", "ps.max_staleness=1",
                                 "scaling.num_workers=3", "model.kwargs={hidden_sizes: [16]}"])
    spec = sources.inspect_source("digits", cfg.data, 0).spec
    names, shards, handles = ps_actors.start_servers(cfg, spec, 0.01)
    models = [build_model(cfg.model, spec) for _ in range(3)]
    clients = [ps_actors.ParameterClient(names, shards, model, "async", rank, grad_clip=1.0)
               for rank, model in enumerate(models)]
    clients[0].reset(None, 0)
    errors = []

    def work(client, model):
        try:
            for step in range(15):
                while True:
                    client.pull(step)
                    for p in model.parameters():
                        p.grad = torch.full_like(p, 0.01)
                    try:
                        client.update(list(model.parameters()), 0.01)
                        break
                    except ps_actors.StaleGradient:
                        continue
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=work, args=pair) for pair in zip(clients, models, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    counters = [client.take_counters() for client in clients]
    assert sum(c["staleness_count"] for c in counters) == 45
    assert max(c["staleness_max"] for c in counters) <= 1
    states = ray.get([handle.state.remote() for handle in handles])
    assert [state["version"] for state in states] == [45, 45]
    for handle in handles:
        ray.kill(handle)


def _run(tmp_path, name, *overrides):
    cfg = config.load(overrides=[f"run.output_dir={tmp_path}", f"run.name={name}", "train.epochs=4",
                                 "batch.global_batch_size=128", "model.name=ps_slow_model:make", "model.kwargs={}",
                                 "train.grad_clip=0.5", "train.noise_scale=false", *overrides])
    summary = trainer.train(cfg)
    return summary, torch.load(tmp_path / name / "model.pt")


def _resumes(run_dir) -> int:
    """How many times the run restored a checkpoint, as its checkpoint furthest into training counts them."""
    return latest_state(d for d in (run_dir / "checkpoints").glob("checkpoint_*")
                        if (d / checkpoint.STATE_FILE).exists()).train_state.resumes


def _kill_a_server_after_the_first_checkpoint(run_dir, run_over: threading.Event, killed: list) -> None:
    """Once the run's first checkpoint is committed, kill server 0; Ray restarts it empty."""
    if wait_for_registered_checkpoint(run_dir / "checkpoints", run_over, timeout=600):
        names = sorted(name for name in ray.util.list_named_actors() if name.startswith("rayscale-ps-"))
        ray.kill(ray.get_actor(names[0]), no_restart=False)
        killed.append(names[0])


@pytest.mark.slow
def test_sync_parameter_server_matches_ddp_and_survives_a_killed_server(ray_session, tmp_path):
    """The same data order, the same clipping: the model of the sync parameter server (two servers, one killed
    mid-run and the run restarted from its last checkpoint) equals DDP's within fp32 rounding."""
    # The reference needs no slowing down: the built-in MLP of the same sizes has the same weights and numerics.
    # Nor Ray Train's start-up: local mode runs the same step over all of each global batch (accumulation is
    # exact, tests/test_step.py), so it is the 2-worker DDP model within fp32 rounding, given the same data
    # order: the 2 lanes the 2-worker run lays its rows out in.
    ddp_summary, ddp = _run(tmp_path, "ddp", "model.name=mlp", "model.kwargs={hidden_sizes: [64, 64]}",
                            "scaling.num_workers=0", "data.lanes=2")
    killed: list = []
    run_over = threading.Event()
    killer = threading.Thread(target=_kill_a_server_after_the_first_checkpoint,
                              args=(tmp_path / "ps", run_over, killed))
    killer.start()
    try:
        ps_summary, ps = _run(tmp_path, "ps", "train.strategy=parameter_server", "ps.num_servers=2",
                              "run.checkpoint_every_seconds=0")  # a checkpoint at every epoch end, however short
    finally:
        run_over.set()
        killer.join()
    assert killed, "the run ended before a checkpoint of it was committed"
    assert ps_summary["restarts"] >= 1
    assert _resumes(tmp_path / "ps") >= 1  # the run went on from a checkpoint, not from scratch
    assert ps_summary["samples_seen"] == ddp_summary["samples_seen"] == 4 * ddp_summary["train_rows"]
    for key in ddp:
        torch.testing.assert_close(ps[key], ddp[key], rtol=1e-4, atol=1e-5)
    logged = read_metrics(tmp_path / "ps")
    assert all(r["bytes_pushed_per_step"] > 0 for r in logged if not r.get("evaluation"))


def _kill_a_worker_after_the_first_checkpoint(run_dir, pid_dir, run_over: threading.Event, killed: list) -> None:
    """Once the run's first checkpoint is committed, SIGKILL one training worker process. (Killed between its
    epoch-end line and the controller's registering its checkpoint, the run would start over from scratch.)"""
    if wait_for_registered_checkpoint(run_dir / "checkpoints", run_over, timeout=600):
        pid = int(sorted(pid_dir.iterdir())[0].name)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


@pytest.mark.slow
def test_async_parameter_server_from_the_cli_keeps_its_staleness_bound_and_survives_a_killed_worker(
        ray_session, tmp_path, capsys):
    """`rayscale train` with ps.mode async and 2 workers: one worker is SIGKILLed after the first checkpoint. Ray
    Train restarts the group from that checkpoint and rank 0 reloads the servers from it, so the run trains
    every epoch, its learning continues where the checkpoint left it, and no applied gradient was ever more
    than ps.max_staleness updates old."""
    pid_dir = ray_session / "pids"
    for stale in pid_dir.iterdir():
        stale.unlink()
    killed: list = []
    run_over = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_the_first_checkpoint,
                              args=(tmp_path / "async", pid_dir, run_over, killed))
    killer.start()
    overrides = [f"run.output_dir={tmp_path}", "run.name=async", "train.epochs=4", "batch.global_batch_size=128",
                 "model.name=ps_slow_model:make", "model.kwargs={}", "train.noise_scale=false",
                 "run.checkpoint_every_seconds=0",
                 "train.strategy=parameter_server", "ps.mode=async", "ps.max_staleness=1", "ps.num_servers=2"]
    try:
        code = cli.main(["train", *[arg for item in overrides for arg in ("--set", item)]])
    finally:
        run_over.set()
        killer.join()
    assert code == 0
    assert killed, "the run ended before a checkpoint of it was committed"
    summary = json.loads((tmp_path / "async" / "summary.json").read_text())
    assert summary["restarts"] >= 1
    assert summary["samples_seen"] == 4 * summary["train_rows"]
    assert _resumes(tmp_path / "async") >= 1  # the new group started from a checkpoint, not from scratch
    logged = read_metrics(tmp_path / "async")
    measured = [r for r in logged if r.get("staleness_max") is not None]
    assert measured and all(r["staleness_max"] <= 1 for r in measured)
    assert all(0 <= r["staleness_mean"] <= r["staleness_max"] for r in measured)
    epoch_losses = [r["val_loss"] for r in logged if r.get("epoch_end")]
    assert len(epoch_losses) == 4 and epoch_losses[-1] < epoch_losses[0]
    assert summary["final"]["val_accuracy"] > 0.6
    assert "rayscale: error" not in capsys.readouterr().err
