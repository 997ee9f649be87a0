"""Plumbing shared by the benchmarks that spawn their own 2-process gloo group (no Ray)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path


def spawn(target: Callable, args: tuple, workers: int, out: Path) -> dict:
    """Run `target(rank, port, *args, out)` in `workers` spawned processes on a free 127.0.0.1 port; returns
    what rank 0 wrote to `out` with `finish`."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(target, args=(port, *args, str(out)), nprocs=workers, start_method="spawn")
    return json.loads(Path(out).read_text())


def finish(rank: int, out: str, result: dict) -> None:
    """Rank 0 writes the result; every rank leaves at a barrier without C++ destructors (gloo's teardown can
    abort a process after the work is done)."""
    import torch.distributed as dist

    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)
