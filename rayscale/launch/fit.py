"""Whether the workers fit the cluster: checked with the numbers before anything waits on a placement group
that can never be placed."""

from __future__ import annotations

import math
import os

from rayscale.config import Config
from rayscale.data.datasets import READ_CPUS
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
    """Fail fast with the numbers instead of waiting forever on a placement group that cannot fit, or on read
    tasks that never get a CPU. An autoscaling cluster is judged by the most it can grow to (waiting for its
    nodes is fine; waiting on a fixed cluster that is too small is not)."""
    import ray

    now = ray.cluster_resources()
    most = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    has = "the cluster can grow to {:g}" if most else "the cluster has {:g}"
    cpus, gpus = (max(now.get(kind, 0), most.get(kind, 0)) for kind in ("CPU", "GPU"))
    _check_fits(cfg, cpus, gpus, has)
    _check_reads_fit(cfg, cpus, has)


def _check_fits(cfg: Config, cpus: float, gpus: float, has: str) -> None:
    workers = max(cfg.scaling.num_workers, 1)
    need_cpu = workers * cfg.scaling.cpus_per_worker
    if cfg.scaling.num_workers and need_cpu > cpus:
        raise UserError(f"scaling.num_workers: {workers} workers x {cfg.scaling.cpus_per_worker:g} CPUs need "
                        f"{need_cpu:g} CPUs, {has.format(cpus)}")
    if cfg.scaling.use_gpu and workers > gpus:
        raise UserError(f"scaling.use_gpu: {workers} workers need {workers} GPUs, {has.format(gpus)}")


def _check_reads_fit(cfg: Config, cpus: float, has: str) -> None:
    """Ray Data's read tasks run beside the workers and need READ_CPUS of a CPU each: workers that reserve
    every CPU would leave them waiting forever (Ray Data only warns that "the job may hang forever"). The
    embedded Ray declares a CPU more than the machine has for them; a cluster must have it too."""
    if not cfg.scaling.num_workers:  # local mode reserves nothing: the reads share the driver's CPUs
        return
    reserved = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if cpus - reserved >= READ_CPUS:
        return
    most_per_worker = math.floor((cpus - READ_CPUS) / cfg.scaling.num_workers * 1000) / 1000
    fix = f"set scaling.cpus_per_worker to at most {most_per_worker:g}, " if most_per_worker > 0 else ""
    raise UserError(f"scaling.cpus_per_worker: {cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker:g} "
                    f"CPUs reserve {reserved:g} CPUs and {has.format(cpus)}, leaving none for reading the data "
                    f"(Ray Data's read tasks need {READ_CPUS:g} CPU each); {fix}use fewer scaling.num_workers, or "
                    f"give the cluster more CPUs (ray start --num-cpus)")
