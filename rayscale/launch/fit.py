"""Whether the workers fit the cluster: checked with the numbers before anything waits on a placement group
that can never be placed."""

from __future__ import annotations

import os

from rayscale.config import Config
from rayscale.errors import UserError
from rayscale.launch.connect import loopback_unless_joining


def check_fits_before_start(address: str | None, cfg: Config) -> None:
    """Called before `connect`: when the cluster will be the embedded one, its size is known already."""
    import sys

    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if loopback_unless_joining(address) is None and not running:
        check_machine_fits(cfg)


def check_machine_fits(cfg: Config) -> None:
    """For the embedded Ray: the workers must fit this machine's cores and GPUs, or they would wait forever."""
    import torch

    gpus = torch.cuda.device_count() if cfg.scaling.use_gpu and torch.cuda.is_available() else 0
    _check_fits(cfg, os.cpu_count() or 1, gpus, "this machine has {} (embedded Ray)")


def check_cluster_fits(cfg: Config) -> None:
    """Fail fast with the numbers instead of waiting forever on a placement group that cannot fit."""
    import ray

    total = ray.cluster_resources()
    _check_fits(cfg, total.get("CPU", 0), total.get("GPU", 0), "the cluster has {:g}")


def _check_fits(cfg: Config, cpus: float, gpus: float, has: str) -> None:
    workers = max(cfg.scaling.num_workers, 1)
    need_cpu = workers * cfg.scaling.cpus_per_worker
    if cfg.scaling.num_workers and need_cpu > cpus:
        raise UserError(f"scaling.num_workers: {workers} workers x {cfg.scaling.cpus_per_worker:g} CPUs need "
                        f"{need_cpu:g} CPUs, {has.format(cpus)}")
    if cfg.scaling.use_gpu and workers > gpus:
        raise UserError(f"scaling.use_gpu: {workers} workers need {workers} GPUs, {has.format(gpus)}")
