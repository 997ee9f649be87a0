"""Whether the workers fit the cluster: checked with the numbers before anything waits on a placement group
that can never be placed."""

from __future__ import annotations

import os

from rayscale.config import Config
from rayscale.data.datasets import READ_CPUS, most_resources
from rayscale.errors import UserError
from rayscale.launch.connect import will_embed


def check_fits_before_start(address: str | None, cfg: Config, parameters: int = 0) -> None:
    """Called before `connect`: when the cluster will be the embedded one, its size is known already.
    `parameters`: the model's, as the driver built it."""
    if will_embed(address):
        check_machine_fits(cfg)
        check_machine_memory(cfg, parameters)


def available_memory() -> int | None:
    """Bytes of memory this machine can give without swapping (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def parameter_copies(cfg: Config, workers: int) -> float:
    """Float32 copies of the model's parameters a CPU worker holds at least, whatever its batch: the weights,
    their gradients (DDP's buckets are views of them) and its optimizer's state (sharded over the workers with
    optim.shard_state; held by the servers under the parameter server)."""
    state = {"adamw": 2, "lamb": 2}.get(cfg.optim.name, 1 if cfg.optim.momentum > 0 else 0)
    if cfg.train.strategy == "parameter_server":
        state = 0
    elif cfg.optim.shard_state:
        state /= workers
    return 2 + state


def check_machine_memory(cfg: Config, parameters: int) -> None:
    """For the embedded Ray on CPUs: what the workers hold at least must fit this machine's available memory. A
    model too big for it started Ray and its workers, then Ray's memory monitor killed one (nearly a minute, and
    ~500 lines of Ray's process tables, for a 1-billion-parameter MLP on 2 workers and 24 GiB)."""
    available = available_memory()
    if cfg.scaling.use_gpu or not parameters or available is None:
        return
    workers = cfg.scaling.worker_counts()[0]
    per_worker = parameters * 4 * parameter_copies(cfg, workers)
    if workers * per_worker <= available:
        return
    gib = 2**30
    key = f"model.name {cfg.model.name}" if per_worker > available else "scaling.num_workers"
    raise UserError(f"{key}: {workers} worker{'s' if workers > 1 else ''} of a model of {parameters:,} parameters "
                    f"need at least {workers * per_worker / gib:.3g} GiB ({per_worker / gib:.3g} GiB each: weights, "
                    f"gradients and {cfg.optim.name}'s state in float32), and this machine has "
                    f"{available / gib:.3g} GiB available (embedded Ray); expected a smaller model, fewer workers, or "
                    f"a cluster (--address)")


def check_machine_fits(cfg: Config) -> None:
    """For the embedded Ray: the workers must fit this machine's cores and GPUs, or they would wait forever."""
    import torch

    gpus = torch.cuda.device_count() if cfg.scaling.use_gpu and torch.cuda.is_available() else 0
    _check_fits(cfg, os.cpu_count() or 1, gpus, "this machine has {} (embedded Ray)")


def check_cluster_fits(cfg: Config, beside: float = 0.0) -> None:
    """Fail fast with the numbers instead of waiting forever on a placement group that cannot fit, or on read
    tasks that never get a CPU. An autoscaling cluster is judged by the most it can grow to (waiting for its
    nodes is fine; waiting on a fixed cluster that is too small is not). `beside`: CPUs the run holds besides
    its workers (a Tune trial's own actor)."""
    import ray

    now, most = ray.cluster_resources(), most_resources()
    has = "the cluster can grow to {:g}" if most else "the cluster has {:g}"
    cpus, gpus = (max(now.get(kind, 0), most.get(kind, 0)) for kind in ("CPU", "GPU"))
    _check_fits(cfg, cpus, gpus, has)
    _check_reads_fit(cfg, cpus - beside, has.format(cpus) + (f" ({beside:g} of them held beside the workers)"
                                                             if beside else ""))
    if not most:  # a fixed cluster: its nodes are the ones up now (an autoscaling one's are not known yet)
        try:
            nodes = [(node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0))
                     for node in ray.nodes() if node["Alive"]]
        except ray.exceptions.RaySystemError:  # no view of the nodes from this process
            return
        _check_reads_fit_on_nodes(cfg, nodes)


def _check_fits(cfg: Config, cpus: float, gpus: float, has: str) -> None:
    """The fewest workers the run takes must fit (an elastic run starts with what fits, and grows later)."""
    workers = cfg.scaling.worker_counts()[0]
    key = "scaling.min_workers" if cfg.scaling.elastic else "scaling.num_workers"
    need_cpu = workers * cfg.scaling.cpus_per_worker
    if cfg.scaling.num_workers and need_cpu > cpus:
        raise UserError(f"{key}: {workers} workers x {cfg.scaling.cpus_per_worker:g} CPUs need "
                        f"{need_cpu:g} CPUs, {has.format(cpus)}")
    if cfg.scaling.use_gpu and workers > gpus:
        raise UserError(f"scaling.use_gpu: {workers} workers need {workers} GPUs, {has.format(gpus)}")


def _check_reads_fit(cfg: Config, cpus: float, has: str) -> None:
    """Ray Data's read tasks run beside the workers and need READ_CPUS of a CPU each: workers that reserve
    every CPU would leave them waiting forever (Ray Data only warns that "the job may hang forever"). The
    embedded Ray declares a CPU more than the machine has for them; a cluster must have it too. Compared in
    Ray's own unit, 1/10,000 of a CPU, so that the value suggested here is one that passes."""
    workers, per_worker = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    if not workers:  # local mode reserves nothing: the reads share the driver's CPUs
        return
    # An elastic group takes as many workers as fit, so the reads get what the most that fit leave.
    workers = min(workers, max(cfg.scaling.worker_counts()[0], int(cpus // per_worker)))
    left = round((cpus - workers * per_worker) * _UNITS)
    if left >= round(READ_CPUS * _UNITS):
        return
    most_per_worker = (round(cpus * _UNITS) - round(READ_CPUS * _UNITS)) // workers / _UNITS
    fix = f"set scaling.cpus_per_worker to at most {most_per_worker:g}, use fewer scaling.num_workers, " \
        if most_per_worker > 0 else "use scaling.num_workers 0 (local mode), "
    raise UserError(f"scaling.cpus_per_worker: {workers} workers x {per_worker:g} CPUs reserve "
                    f"{workers * per_worker:g} CPUs and {has}, leaving {max(left, 0) / _UNITS:g} for reading the "
                    f"data, less than the {READ_CPUS:g} CPU a Ray Data read task needs; {fix}or give the cluster "
                    f"more CPUs (ray start --num-cpus)")


def _check_reads_fit_on_nodes(cfg: Config, nodes: list[tuple[float, float]]) -> None:
    """A worker's reads need room on its own node too: with workers filling their nodes and the spare CPUs
    elsewhere (a head node, say), Ray Data reserved no CPU for any read task and the run hung (Ray 2.60's
    autoscaling coordinator splits each node's leftover CPUs between the concurrent executions in whole CPUs,
    and the read tasks prefer the rank's node). `nodes`: each node's (CPUs, GPUs). The workers are placed as
    Train packs them: the largest nodes first, each filled with as many as fit (by CPUs, and by GPUs with
    scaling.use_gpu)."""
    workers, per_worker = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    if not workers:
        return
    need, read = round(per_worker * _UNITS), round(READ_CPUS * _UNITS)
    if need <= 0:
        return
    units = [(round(cpus * _UNITS), gpus) for cpus, gpus in nodes]
    fits = [(cpus, min(cpus // need, int(gpus)) if cfg.scaling.use_gpu else cpus // need) for cpus, gpus in units]
    workers = min(workers, sum(fit for _, fit in fits))  # an elastic group takes what fits
    for cpus, fit in sorted(fits, reverse=True):
        if workers <= 0:
            return
        hosted = min(workers, fit)
        workers -= hosted
        if hosted and cpus - hosted * need < read:
            fix = (f"set scaling.cpus_per_worker to at most {(cpus - read) // hosted / _UNITS:g}, "
                   if cpus - read >= hosted else "")
            raise UserError(f"scaling.cpus_per_worker: {hosted} workers x {per_worker:g} CPUs fill a node of "
                            f"{cpus / _UNITS:g} CPUs, leaving {(cpus - hosted * need) / _UNITS:g} beside them for "
                            f"reading their data, less than the {READ_CPUS:g} CPU a Ray Data read task needs on the "
                            f"workers' own node; {fix}or give the worker nodes more CPUs (ray start --num-cpus)")


_UNITS = 10_000  # Ray's resolution of fractional resources
