"""launch/torch_backend.py against Ray's own TorchConfig and _TorchBackend: the same calls to the same worker
functions, from a module a Train controller can load without torch."""

import datetime
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from rayscale.launch import torch_backend

# Ours, sent to the workers, and the function of Ray's that each runs there (the closure Ray defines inline to set
# the master address has the name set_env_vars).
RAYS_NAME = {torch_backend.set_master_address: "set_env_vars",
             torch_backend.set_torch_distributed_env_vars: "_set_torch_distributed_env_vars",
             torch_backend.setup_torch_process_group: "_setup_torch_process_group",
             torch_backend.shutdown_torch: "_shutdown_torch"}


class RecordingWorkerGroup:
    """Train's worker group as a backend sees it, recording what it is asked to run on which worker."""

    def __init__(self, size: int, ours: bool):
        self.size, self.ours, self.calls = size, ours, []

    def __len__(self):
        return self.size

    def _record(self, how, index, fn, kwargs):
        self.calls.append((how, index, RAYS_NAME.get(fn, fn.__name__) if self.ours else fn.__name__, kwargs))

    def get_resources_per_worker(self):
        return {"CPU": 1}

    def execute_single(self, index, fn, **kwargs):
        self._record("single", index, fn, kwargs)
        return ("10.0.0.7", 29500)  # what get_address_and_port answers on worker 0

    def execute(self, fn, **kwargs):
        self._record("all", None, fn, kwargs)

    def execute_single_async(self, index, fn, **kwargs):
        self._record("single_async", index, fn, kwargs)
        return index

    def execute_async(self, fn, **kwargs):
        self._record("all_async", None, fn, kwargs)
        return list(range(self.size))


@pytest.fixture
def no_ray_get(monkeypatch):
    """Both backends wait on their futures with ray.get: here the futures are plain values."""
    import ray

    waited = []
    monkeypatch.setattr(ray, "get", lambda futures, timeout=None: waited.append((futures, timeout)) or futures)
    return waited


@pytest.mark.parametrize("backend", torch_backend.BACKENDS)
@pytest.mark.parametrize("size", [1, 3])
def test_start_and_shutdown_send_the_workers_rays_calls_in_rays_order(backend, size, no_ray_get):
    from ray.train.torch.config import TorchConfig, _TorchBackend

    theirs, ours = RecordingWorkerGroup(size, ours=False), RecordingWorkerGroup(size, ours=True)
    _TorchBackend().on_start(theirs, TorchConfig(backend=backend, timeout_s=45))
    _TorchBackend().on_shutdown(theirs, TorchConfig(backend=backend, timeout_s=45))
    config = torch_backend.TorchConfigOnWorkers(backend=backend, timeout_s=45)
    config.backend_cls().on_start(ours, config)
    config.backend_cls().on_shutdown(ours, config)
    assert ours.calls == theirs.calls
    assert [call[2] for call in ours.calls] == ["get_address_and_port", "set_env_vars",
                                                "_set_torch_distributed_env_vars",
                                                *["_setup_torch_process_group"] * size, "_shutdown_torch"]
    assert ours.calls[1][3] == {"addr": "10.0.0.7", "port": 29500}
    assert ours.calls[2 + size][3] == {"backend": backend, "world_rank": size - 1, "world_size": size,
                                           "init_method": "env://", "timeout_s": 45}
    assert no_ray_get[0] == (list(range(size)), None) and no_ray_get[1][0] == list(range(size))


@pytest.mark.parametrize("backend", torch_backend.BACKENDS)
def test_the_worker_functions_do_what_rays_do(backend, monkeypatch):
    """Each calls Ray's function of its name, but for the process group's set-up: Ray's NCCL error handling,
    then the group joined through a store at MASTER_ADDR alone (engine/distributed.py)."""
    import ray.train.torch.config as rays

    from rayscale.engine import distributed

    monkeypatch.setenv("MASTER_ADDR", "unset")
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    torch_backend.set_master_address(addr="10.0.0.7", port=29500)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.7", "29500")
    called = []
    for name in ("_set_torch_distributed_env_vars", "_setup_torch_process_group", "_shutdown_torch"):
        monkeypatch.setattr(rays, name, lambda _name=name, **kwargs: called.append((_name, kwargs)))
    monkeypatch.setattr(distributed, "join_process_group", lambda *args: called.append(("join", args)))
    torch_backend.set_torch_distributed_env_vars()
    torch_backend.setup_torch_process_group(backend=backend, world_rank=1, world_size=2, init_method="env://",
                                            timeout_s=9)
    torch_backend.shutdown_torch(destroy_process_group=True)
    assert called == [("_set_torch_distributed_env_vars", {}),
                      ("join", (backend, "10.0.0.7", 29500, 1, 2, datetime.timedelta(seconds=9))),
                      ("_shutdown_torch", {"destroy_process_group": True})]
    assert os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == ("1" if backend == "nccl" else None)


def _listening_rank(rank: int, port: int, out: str) -> None:
    """Join a gloo group of 2 as the workers do; rank 0 writes what both ranks' processes listen on."""
    import subprocess

    import torch
    import torch.distributed as dist

    from rayscale.engine.distributed import join_process_group

    join_process_group("gloo", "127.0.0.1", port, rank, 2, datetime.timedelta(seconds=60))
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    pids = [torch.tensor([os.getpid()]) for _ in range(2)]
    dist.all_gather(pids, torch.tensor([os.getpid()]))
    if rank == 0:
        sockets = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout.splitlines()
        mine = [line.split()[3] for line in sockets if any(f"pid={int(pid)}," in line for pid in pids)]
        Path(out).write_text(json.dumps({"sum": total.item(), "listening": mine}))
    dist.barrier()
    dist.destroy_process_group()


def test_a_process_group_listens_on_the_address_it_is_given_and_nowhere_else(tmp_path):
    """torch's own store (init_method env://, as Ray Train's backend joins) listened on every interface of rank
    0's node (`ss`: *:port) while a run trained. Ours listens at MASTER_ADDR, and gloo's connections are there
    too: on 127.0.0.1 here, as the loopback-only embedded Ray's workers get."""
    from inprocess import start_ranks

    from rayscale.launch.connect import free_loopback_port

    out = tmp_path / "rank0.json"
    start_ranks(_listening_rank, (free_loopback_port(), str(out)), 2)
    seen = json.loads(out.read_text())
    assert seen["sum"] == 3.0
    assert len(seen["listening"]) >= 3  # the store, and gloo's listener in each rank
    assert all(address.startswith("127.0.0.1:") for address in seen["listening"]), seen["listening"]


def test_the_config_is_rays_to_the_trainer_and_the_accelerator_set_up():
    from ray.train.torch.config import TorchConfig, TorchConfigContextManager, _TorchBackend

    ours, theirs = torch_backend.TorchConfigOnWorkers(backend="nccl", timeout_s=45), TorchConfig(backend="nccl",
                                                                                                timeout_s=45)
    assert ours.to_dict() == theirs.to_dict() and ours.framework == theirs.framework
    assert ours.train_func_context is TorchConfigContextManager
    assert ours.backend_cls.share_cuda_visible_devices is _TorchBackend.share_cuda_visible_devices is True
    assert ours.backend_cls.has_replica_groups == _TorchBackend.has_replica_groups


@pytest.mark.parametrize("fields", [{"backend": "tpu_dist"}, {"backend": "hccl"}, {"backend": None},
                                    {"init_method": "tcp"}])
def test_what_it_does_not_set_up_it_refuses(fields):
    with pytest.raises(ValueError, match="gloo or nccl with env:// only"):
        torch_backend.TorchConfigOnWorkers(**fields)


def test_a_process_that_unpickles_the_config_and_builds_its_backend_imports_no_torch():
    """What Train's controller does with it."""
    pickled = pickle.dumps(torch_backend.TorchConfigOnWorkers(backend="gloo", timeout_s=45))
    script = ("import pickle, sys; config = pickle.loads(sys.stdin.buffer.read()); config.backend_cls(); "
              "config.to_dict(); config.framework; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    done = subprocess.run([sys.executable, "-c", script], input=pickled, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().strip() == "[]"
