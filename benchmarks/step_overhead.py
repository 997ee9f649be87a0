"""Where rayscale's step loses or gains against the bare DDP loop, without Ray (a diagnostic, not in the suite).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python -m benchmarks.step_overhead [--blocks 40] [--steps 40]

Two gloo processes on 127.0.0.1, 1 thread each, the throughput benchmark's model (MLP 64-512-512-10) and a
per-worker batch of 128, three loops in alternating blocks of steps (each block's order reversed from the last,
so that drift of the machine falls on all three):
  bare      the plain DDP loop of throughput.py's (c): default DDP, torch.optim.SGD with momentum;
  settings  the same loop with the model and optimizer the worker builds (step.prepare_model, build_optimizer);
  rayscale  what the worker runs per step: rows from its lane cache through LaneSteps and collate, train_step
            (normaliser, loss and gradient-norm bookkeeping, the non-finite guard's sync, the step clock), and
            the interval's sums.
Prints per loop the median wall time per step, the training thread's CPU time per step, and the median over
blocks of bare's time / the loop's (above 1: faster than bare).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import gloo

LOOPS = ("bare", "settings", "rayscale")
FEATURES, HIDDEN, CLASSES, PER_WORKER, WORKERS, LR = 64, (512, 512), 10, 128, 2, 0.05


def _process(rank: int, port: int, blocks: int, steps: int, out: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rayscale.config import OptimConfig
    from rayscale.data.collate import micro_batches
    from rayscale.data.lane_steps import LaneCache, LaneOrder, LaneSteps, epoch_pieces
    from rayscale.engine.distributed import join_process_group
    from rayscale.engine.metrics import Interval
    from rayscale.engine.optimizers import build_optimizer
    from rayscale.engine.precision import make_precision
    from rayscale.engine.step import train_step
    from rayscale.engine.strategies.ddp import prepare_model
    from rayscale.math import lanes as lane_plan
    from rayscale.math.batching import plan_batches
    from rayscale.models import MLP

    torch.set_num_threads(1)
    join_process_group("gloo", "127.0.0.1", port, rank, WORKERS)
    rows, chunk = 20_480, 2_048
    rng = np.random.default_rng(0)
    columns = {"row_id": np.arange(rows), "x": rng.standard_normal((rows, FEATURES)).astype(np.float32),
               "y": rng.integers(0, CLASSES, rows)}
    lanes, chunk_rows = WORKERS, [chunk] * (rows // chunk)
    sizes, owned = lane_plan.lane_sizes(rows, lanes), lane_plan.owned_lanes(rank, WORKERS, lanes)
    cache = LaneCache({lane: sizes[lane] for lane in owned}, limit_bytes=1 << 30)
    pieces = [piece for lane in owned for piece in lane_plan.canonical_pieces(chunk_rows, lanes, lane)]
    first_row = {piece: piece.read.chunk * chunk + piece.read.skip for piece in pieces}
    for _ in cache.record((piece, {k: v[first_row[piece]:first_row[piece] + piece.read.take]
                                   for k, v in columns.items()}) for piece in pieces):
        pass
    x, y = torch.from_numpy(columns["x"]), torch.from_numpy(columns["y"])
    plan = plan_batches(PER_WORKER * WORKERS, PER_WORKER, WORKERS)
    device, precision = torch.device("cpu"), make_precision("fp32", torch.device("cpu"))

    def cached_steps():
        epoch = 0
        while True:
            order = LaneOrder(0, epoch, "none", window=2048 // lanes)
            steps = LaneSteps(plan, rank, WORKERS, lanes, rows, order)
            yield from steps.steps(cache.replay(epoch_pieces(chunk_rows, lanes, steps.starts, order)))
            epoch += 1

    loops, interval, stream = {}, Interval.fresh(device), cached_steps()
    for name in LOOPS:
        torch.manual_seed(0)
        if name == "bare":
            model = DistributedDataParallel(MLP(FEATURES, CLASSES, HIDDEN))
            optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        else:
            model = prepare_model(MLP(FEATURES, CLASSES, HIDDEN), device, WORKERS)
            optimizer = build_optimizer(OptimConfig(name="sgd", lr=LR, momentum=0.9, weight_decay=0.0), model, LR)
        loops[name] = (model, optimizer)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(name: str, index: int) -> None:
        model, optimizer = loops[name]
        if name != "rayscale":
            low = (index * WORKERS + rank) * PER_WORKER % rows
            loss = loss_fn(model(x[low:low + PER_WORKER]), y[low:low + PER_WORKER])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return
        step_rows = next(stream)
        result = train_step(model, micro_batches(step_rows, PER_WORKER, device), optimizer, task="classification",
                            lr=LR, precision=precision, global_count=step_rows.rows_in_step, clock=interval.clock)
        interval.add_step(result, step_rows.rows_in_step)

    wall = {name: [] for name in LOOPS}
    cpu = {name: [] for name in LOOPS}
    for name in LOOPS:  # warm-up: DDP rebuilds its buckets after the first iterations
        for index in range(10):
            step(name, index)
    for block in range(blocks):
        for name in LOOPS if block % 2 == 0 else LOOPS[::-1]:
            dist.barrier()
            began, began_cpu = time.perf_counter(), time.thread_time()
            for index in range(steps):
                step(name, index)
            wall[name].append((time.perf_counter() - began) / steps)
            cpu[name].append((time.thread_time() - began_cpu) / steps)
    gloo.finish(rank, out, {"wall": wall, "cpu": cpu})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40, help="steps per block")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        measured = gloo.spawn(_process, (args.blocks, args.steps), WORKERS, Path(directory) / "rank0.json")
    wall, cpu = measured["wall"], measured["cpu"]
    print(f"{args.blocks} blocks of {args.steps} steps; rank 0")
    print("| loop | wall ms/step | training thread CPU ms/step | speed vs bare (median over blocks) |")
    print("|---|---|---|---|")
    for name in LOOPS:
        speed = statistics.median(b / a for a, b in zip(wall[name], wall["bare"], strict=True))
        print(f"| {name} | {statistics.median(wall[name]) * 1e3:.3f} | {statistics.median(cpu[name]) * 1e3:.3f} "
              f"| {speed:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
