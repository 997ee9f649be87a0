"""The engine without Ray, for tests: a config trained by `engine.loop.TrainLoop` through the in-process context,
in this process (one rank) or in spawned gloo processes (several), its outputs written as `rayscale train` writes
them (driver/outputs.py). What `rayscale train` adds on top is Ray: tests/test_pipeline.py runs that."""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from rayscale import config
from rayscale.data.local_feed import LocalReads
from rayscale.driver import data_record
from rayscale.driver.outputs import read_metrics, write_outputs
from rayscale.driver.prepare import NO_CODE, check_same_config, prepare, saved_attempt, worker_payload
from rayscale.engine import checkpoint
from rayscale.engine.components.preemption import PreemptionNotice
from rayscale.engine.context import InProcessContext
from rayscale.engine.distributed import join_process_group
from rayscale.engine.loop import TrainLoop
from rayscale.files import CHECKPOINTS_DIR, CONFIG_FILE, GROUPS_FILE, MODEL_FILE
from rayscale.launch.callbacks import record_group
from rayscale.launch.connect import free_loopback_port
from rayscale.plugins import UserCode

COLLECTIVE_TIMEOUT_S = 120
# What every rank imports, done once in the fork server (start_ranks).
RANK_IMPORTS = ["torch", "torch.distributed", "rayscale.engine.loop", "rayscale.data.local_feed",
                "rayscale.driver.prepare"]


@dataclass
class Trained:
    summary: dict
    model: dict[str, torch.Tensor]  # model.pt
    reports: list[tuple[dict, Path | None]]  # rank 0's, in order
    run_dir: Path

    @property
    def lines(self) -> list[dict]:
        return read_metrics(self.run_dir)


class DrainOnAsk:
    """Stands in for Ray's preemption watcher: a node is being drained from the `ask`-th question on."""

    def __init__(self, ask: int):
        self.ask, self.asked = ask, 0

    def __call__(self) -> PreemptionNotice | None:
        self.asked += 1
        return PreemptionNotice(("node-b",), (1,), None) if self.asked >= self.ask else None


def train(output_dir: Path, name: str, *overrides: str, workers: int = 1, eval_at_samples=(),
          pause_at_samples=(), drain_on_ask: int | None = None, code: UserCode = NO_CODE,
          progress_lines: bool = True, report_evaluations: bool = False) -> Trained:
    """`rayscale train` for `overrides`, without Ray. Re-running the same name resumes, as there.
    `drain_on_ask`: a node is drained from that question of the loop on (one rank: HeldForRestart is raised
    after the drain's checkpoint). `code`: rayscale.train's model=, loss=, metrics= objects.
    `report_evaluations`: every validation is reported, as for a Tune trial."""
    cfg = config.load(overrides=[f"run.output_dir={output_dir}", f"run.name={name}",
                                 f"scaling.num_workers={workers}", *overrides])
    started = time.time()
    prepared = prepare(cfg, code=code)
    check_same_config(cfg, prepared.run_dir)
    data_record.check_same_data(prepared)
    prepared.run_dir.mkdir(parents=True, exist_ok=True)
    groups = prepared.run_dir / GROUPS_FILE
    if not (prepared.run_dir / CONFIG_FILE).exists() or not saved_attempt(cfg, prepared.run_dir):
        groups.unlink(missing_ok=True)  # a new run, or one starting over; otherwise earlier attempts count
    record_group(groups, in_process=True)  # as local mode does: each run of the loop is one worker group
    (prepared.run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
    data_record.write(prepared)
    payload = dataclasses.replace(worker_payload(prepared, eval_at_samples, pause_at_samples),
                                  progress_lines=progress_lines, report_evaluations=report_evaluations)
    feed = LocalReads(prepared.train, prepared.val)
    if workers == 1:
        reports = _rank(0, 1, 0, payload, feed, drain_on_ask)
    else:
        out = prepared.run_dir / ".reports"
        start_ranks(_spawned, (workers, free_loopback_port(), payload, feed, str(out), drain_on_ask), workers)
        reports = pickle.loads(out.read_bytes())
    final = checkpoint.latest_local(prepared.run_dir / CHECKPOINTS_DIR)
    summary = write_outputs(prepared, final, started, first_step_at=None)
    return Trained(summary, torch.load(prepared.run_dir / MODEL_FILE), reports, prepared.run_dir)


def _rank(rank: int, world_size: int, port: int, payload, feed, drain_on_ask: int | None = None) -> list:
    context = InProcessContext(payload.run_dir, feed, rank=rank, world_size=world_size,
                               drains=DrainOnAsk(drain_on_ask) if drain_on_ask else None)
    TrainLoop(payload, context).train()
    return context.reports


def _spawned(rank: int, world_size: int, port: int, payload, feed, out: str, drain_on_ask: int | None) -> None:
    torch.set_num_threads(1)
    os.environ["RANK"] = str(rank)  # what a test model may read to tell the ranks apart
    # A collective one rank never makes fails the test after this long instead of hanging it.
    join_process_group("gloo", "127.0.0.1", port, rank, world_size, datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        reports = _rank(rank, world_size, port, payload, feed, drain_on_ask)
        if rank == 0:
            Path(out).write_bytes(pickle.dumps(reports))
    finally:
        dist.destroy_process_group()


def start_ranks(fn, args: tuple, nprocs: int) -> None:
    """`fn(rank, *args)` in `nprocs` new processes, as torch.multiprocessing.spawn runs it (an exception in a rank
    is raised here as ProcessRaisedException), each forked from multiprocessing's fork server, which imported
    RANK_IMPORTS once: a start takes ~0.05 s instead of ~4 CPU-seconds of imports per spawned process (on the
    2-core machine, minutes over the suite). Like spawn, no state of this process reaches the ranks; but a
    forked rank inherits the server's environment, not this process's, so `fn` runs under os.environ as it is
    here now."""
    multiprocessing.set_forkserver_preload(RANK_IMPORTS)  # no effect once this process's server runs
    mp.start_processes(_in_environment, args=(dict(os.environ), fn, args), nprocs=nprocs, start_method="forkserver")


def _in_environment(rank: int, environment: dict, fn, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(environment)
    fn(rank, *args)


def whole_split_metrics(run_dir: Path, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Validation metrics of `weights` (a run's model.pt) over the run's whole validation split, in this one
    process: what the ranks' sharded validation must reduce to."""
    from rayscale.data.local_feed import read_shard
    from rayscale.data.splits import shard_reads, split_chunk_rows
    from rayscale.engine.components.validation import evaluate
    from rayscale.engine.precision import make_precision
    from rayscale.models import build_model

    prepared = prepare(config.load(Path(run_dir) / CONFIG_FILE))
    model = build_model(prepared.cfg.model, prepared.spec)
    model.load_state_dict(weights)
    cpu = torch.device("cpu")
    whole = shard_reads(split_chunk_rows(prepared.val), 1)[0]
    return evaluate(model, read_shard(prepared.val, whole), prepared.plan, prepared.spec,
                    make_precision("fp32", cpu), cpu)
