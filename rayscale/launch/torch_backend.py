"""Ray Train's torch backend, driven from a Train controller that never imports torch.

Ray's `TorchConfig` lives in `ray.train.torch.config`, which imports torch at its top. Train's controller unpickles
the run's backend config, so every run's controller (and every Tune trial's, every restart's) imported torch only
to send its workers functions that need it: 1.55 of the controller's 2.4 s of imports, on the path from a run's
start to its workers' start (2-core machine). The config and backend here keep Ray's fields and make the calls
Ray's `_TorchBackend` makes for the gloo and NCCL backends rayscale uses, with the same functions of Ray's; each
is sent wrapped in a function of this module that imports Ray's torch module on the worker, where torch is loaded
anyway. tests/test_torch_backend.py holds the two call for call. One function differs: the process group's store
listens at MASTER_ADDR alone, where torch's env:// store listens on every interface of rank 0's node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig

BACKENDS = ("gloo", "nccl")


@dataclass
class TorchConfigOnWorkers(BackendConfig):
    """Ray's TorchConfig (backend, init_method, timeout_s) for the backends in BACKENDS, env:// init only."""

    backend: str = "gloo"
    init_method: str = "env"
    timeout_s: int = 1800

    def __post_init__(self):
        if self.backend not in BACKENDS or self.init_method != "env":
            raise ValueError(f"TorchConfigOnWorkers sets up {' or '.join(BACKENDS)} with env:// only, not "
                             f"backend {self.backend!r}, init_method {self.init_method!r}")

    @property
    def backend_cls(self):
        return TorchBackendOnWorkers

    @property
    def train_func_context(self):
        # Read where the trainer wraps the train function (the driver, which has torch); the wrapper runs on
        # the workers and never passes through the controller.
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


class TorchBackendOnWorkers(Backend):
    """`ray.train.torch.config._TorchBackend`'s on_start and on_shutdown for gloo and NCCL under Train V2."""

    share_cuda_visible_devices: bool = True  # as Ray's: each GPU worker sees the GPUs of its node's workers

    def on_start(self, worker_group, backend_config: TorchConfigOnWorkers):
        import ray
        from ray.train._internal.utils import get_address_and_port

        master_addr, master_port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(set_master_address, addr=master_addr, port=master_port)
        worker_group.execute(set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=len(worker_group),
                                                   init_method="env://", timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: TorchConfigOnWorkers):
        import logging

        import ray
        from ray._private import ray_constants
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        futures = worker_group.execute_async(shutdown_torch, destroy_process_group=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logging.getLogger(__name__).warning(f"Torch process group shutdown timed out after {timeout_s} seconds")


# Run on the workers: each calls Ray's own function of the same name, but for the process group's store.

def set_master_address(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def set_torch_distributed_env_vars() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def setup_torch_process_group(backend: str, world_rank: int, world_size: int, init_method: str,
                              timeout_s: int) -> None:
    """Ray's `_setup_torch_process_group` for env:// (its NCCL error handling included), except that rank 0's
    store listens at MASTER_ADDR alone (engine/distributed.py, join_process_group), not on every interface."""
    import datetime

    from rayscale.engine.distributed import join_process_group

    assert init_method == "env://", init_method  # TorchConfigOnWorkers refuses any other
    if backend == "nccl" and "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ \
            and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # a timed-out collective fails the worker, as Ray's
    join_process_group(backend, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_rank, world_size,
                       datetime.timedelta(seconds=timeout_s))


def shutdown_torch(**kwargs) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(**kwargs)
